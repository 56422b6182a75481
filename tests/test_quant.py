"""Weight-only int8 / int4 linear layers (`model/quant.py`) and the engine's `quant` setting."""

from __future__ import annotations

import pytest
import torch

from chatforge.errors import ChatforgeError
from chatforge.infer.engine import Engine, GenerationConfig
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model import quant
from chatforge.model.quant import Int4Linear, Int8Linear, quantize_model, quantized_bytes


def tiny(qkv_bias: bool = False) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=128, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=128,
                         max_seq_len=64, qkv_bias=qkv_bias)).eval()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_layers_compute_with_their_dequantized_weights(mode):
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 96, bias=True)
    layer = Int8Linear(linear) if mode == "int8" else Int4Linear(linear, 32)
    w = layer.dequantized()
    x = torch.randn(3, 5, 64)
    expected = x @ w.T + linear.bias
    assert torch.allclose(layer(x), expected, atol=0.05, rtol=0.02)   # bf16 compute
    # The rounding error is what the format allows: half a step per weight (a little more at
    # the ends of a range, where the bf16-rounded scale may fall short of the extreme weight).
    step = layer.scale[:, None].float() if mode == "int8" else layer.qparams[..., 0].T.float().repeat_interleave(32, dim=1)
    assert ((w - linear.weight).abs() <= 0.51 * step + 1e-6).all()


def test_int4_many_rows_run_dense_on_the_kernels_own_weights(monkeypatch):
    """A prefill-sized int4 input is multiplied by the dequantized weight in bf16: the weight is
    exactly the one the kernel uses, the output equal within bf16 rounding."""
    if quant._int4_layout() is None:
        pytest.skip("this torch build packs int4 in a layout chatforge does not read")
    monkeypatch.setattr(quant, "DENSE_CHUNK", 128)          # several chunks, and a short last block
    torch.manual_seed(3)
    linear = torch.nn.Linear(64, 3 * 128 + 32, bias=True)
    layer = Int4Linear(linear, 32)
    # The kernel applied to the identity gives its weight, rounded to bf16.
    kernel_w = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(64, dtype=torch.bfloat16), layer.packed, 32, layer.qparams)
    assert torch.equal(layer.dequantized().to(torch.bfloat16), kernel_w.T)
    rows = quant.INT4_DENSE_ROWS
    x = torch.randn(2, rows // 2, 64)                       # 2 x rows / 2 = rows: the dense path
    dense = layer(x)
    monkeypatch.setattr(quant, "INT4_DENSE_ROWS", 10**9)
    kernel = layer(x)
    assert dense.shape == kernel.shape == (2, rows // 2, 3 * 128 + 32)
    assert torch.allclose(dense, kernel, atol=0.02, rtol=0.01)


def test_quantize_model_keeps_the_original_and_shrinks_the_weights():
    model = tiny(qkv_bias=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q8, q4 = quantize_model(model, "int8"), quantize_model(model, "int4")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(q8.lm_head, Int8Linear) and isinstance(q4.layers[0].mlp.up_proj, Int4Linear)
    assert q4.layers[0].self_attn.q_proj.bias is not None
    assert q8.embed_tokens.weight is model.embed_tokens.weight          # shared, not copied
    full = quantized_bytes(model)
    assert quantized_bytes(q4) < quantized_bytes(q8) < full
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(ids)[0]
        for q, tol in ((q8, 0.02), (q4, 0.15)):
            out = q(ids)[0]
            assert (out - ref).abs().max() / ref.abs().max() < tol
            assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_quantized_layers_are_the_separate_ones_side_by_side(mode):
    """quantize_model(fuse=True), as the engine quantizes: one q/k/v and one gate/up layer, with
    exactly the separate layers' codes and scales, and the same logits."""
    model = tiny(qkv_bias=True)
    sep, fused = quantize_model(model, mode), quantize_model(model, mode, fuse=True)
    a, f = sep.layers[0].self_attn, fused.layers[0].self_attn
    assert not hasattr(f, "q_proj") and hasattr(model.layers[0].self_attn, "q_proj")    # the original untouched
    if mode == "int8":
        assert torch.equal(f.qkv_proj.qweight, torch.cat([a.q_proj.qweight, a.k_proj.qweight, a.v_proj.qweight]))
        assert torch.equal(f.qkv_proj.scale, torch.cat([a.q_proj.scale, a.k_proj.scale, a.v_proj.scale]))
    else:
        m, fm = sep.layers[0].mlp, fused.layers[0].mlp
        assert torch.equal(fm.gate_up_proj.packed, torch.cat([m.gate_proj.packed, m.up_proj.packed]))
        assert torch.equal(fm.gate_up_proj.qparams, torch.cat([m.gate_proj.qparams, m.up_proj.qparams], dim=1))
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = sep(ids)[0]
        assert (fused(ids)[0] - ref).abs().max() <= 0.01 * ref.abs().max()      # bf16 compute


def test_int4_falls_back_to_int8_where_the_group_does_not_divide_the_input():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, d_model=48, n_layer=1, n_head=4, n_kv_head=2, d_ff=96, max_seq_len=32))
    q = quantize_model(model, "int4", group_size=32)
    assert isinstance(q.lm_head, Int8Linear)                   # 48 inputs: not a multiple of 32
    assert isinstance(quantize_model(model, "int4", group_size=32).layers[0].mlp.down_proj, Int4Linear)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_engine_generates_with_quantized_weights(mode, dtype):
    model = tiny()
    prompts = [[3, 14, 15, 92, 65], [35, 89]]
    cfg = GenerationConfig(max_new_tokens=12)
    full = Engine(model, stop_ids=[], dtype=dtype).generate(prompts, cfg)
    engine = Engine(model, stop_ids=[], dtype=dtype, quant=mode)
    assert engine.quant == mode and isinstance(engine.model.lm_head, (Int8Linear, Int4Linear))
    out = engine.generate(prompts, cfg)
    assert [len(r.tokens) for r in out] == [12, 12]
    # Measured, not asserted equal: the first tokens of a random tiny model mostly agree.
    agree = sum(a == b for r, f in zip(out, full) for a, b in zip(r.tokens[:4], f.tokens[:4]))
    assert agree >= 4


def test_bad_settings():
    with pytest.raises(ChatforgeError, match="quantization"):
        quantize_model(tiny(), "int3")
    with pytest.raises(ChatforgeError, match="group_size"):
        quantize_model(tiny(), "int4", group_size=48)
