"""LoRA: a wrapped model starts identical, trains only its adapters, merges exactly, saves and loads."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from chatforge.errors import ChatforgeError
from chatforge.model import lora
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.lora import (DEFAULT_TARGETS, LoRALinear, apply_lora, load_lora, lora_modules,
                                  lora_state_dict, merge_lora, merged_state_dict, save_lora)


def tiny(tie: bool = True) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, max_seq_len=32, d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                         d_ff=64, tie_embeddings=tie))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (4, 16), generator=g)
    return x, torch.roll(x, -1, dims=1)


def train_steps(model: GPT, steps: int = 5) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for i in range(steps):
        x, y = batch(i)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_wrapped_model_starts_identical_and_freezes_base():
    model = tiny()
    x, _ = batch()
    before = model(x)[0]
    apply_lora(model, rank=4, alpha=8)
    assert torch.equal(model(x)[0], before)  # B starts at zero
    wrapped = lora_modules(model)
    assert len(wrapped) == 2 * len(DEFAULT_TARGETS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_training_changes_only_adapters():
    model = tiny()
    apply_lora(model, rank=4, alpha=8, dropout=0.1)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model)
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"frozen {n} changed"
    assert any(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters)
    # B moved away from zero, so the adapters now change the output.
    assert any(m.lora_B.weight.abs().sum() > 0 for m in lora_modules(model).values())


def test_merge_equals_base_plus_adapter():
    model = tiny()
    names_before = set(model.state_dict())
    apply_lora(model, rank=4, alpha=8)
    train_steps(model)
    model.eval()
    x, _ = batch(7)
    with torch.no_grad():
        with_adapters = model(x)[0]
        merge_lora(model)
        merged = model(x)[0]
    assert not lora_modules(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == names_before  # a plain GPT again
    assert torch.allclose(merged, with_adapters, atol=1e-5)
    # Tied embeddings survive the wrapping and unwrapping.
    assert model.lm_head.weight is model.embed_tokens.weight


def test_save_load_round_trip(tmp_path):
    model = tiny()
    apply_lora(model, rank=2, alpha=4, targets=["q_proj", "v_proj"])
    train_steps(model, 3)
    save_lora(model, tmp_path, base="runs/x/pretrain")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["rank"] == 2 and cfg["targets"] == ["q_proj", "v_proj"] and cfg["base"] == "runs/x/pretrain"
    assert set(lora_state_dict(model)) == {f"layers.{i}.self_attn.{t}.{ab}.weight"
                                           for i in range(2) for t in ("q_proj", "v_proj")
                                           for ab in ("lora_A", "lora_B")}
    fresh = load_lora(tiny(), tmp_path)  # same base weights (seeded), adapters from disk
    model.eval(), fresh.eval()
    x, _ = batch(3)
    assert torch.equal(fresh(x)[0], model(x)[0])


def test_bad_targets_and_tied_head():
    with pytest.raises(ChatforgeError, match="no linear layer"):
        apply_lora(tiny(), targets=["nope"])
    with pytest.raises(ChatforgeError, match="tied"):
        apply_lora(tiny(tie=True), targets=["lm_head"])
    model = apply_lora(tiny(tie=False), rank=2, targets=["lm_head"])
    assert "lm_head" in lora_modules(model)


def test_load_adapter_into_wrong_model(tmp_path):
    model = apply_lora(tiny(), rank=2)
    save_lora(model, tmp_path)
    other = GPT(GPTConfig(vocab_size=64, max_seq_len=32, d_model=48, n_layer=2, n_head=4, n_kv_head=2, d_ff=64))
    with pytest.raises(ChatforgeError, match="does not fit"):
        load_lora(other, tmp_path)
    with pytest.raises(ChatforgeError, match="no LoRA adapter"):
        load_lora(tiny(), tmp_path / "missing")


def test_merged_state_dict_leaves_model_wrapped():
    model = tiny()
    apply_lora(model, rank=4, alpha=8)
    train_steps(model, 3)
    merged = merged_state_dict(model)
    assert lora_modules(model)  # still wrapped
    plain = tiny()
    plain.load_state_dict(merged)
    model.eval(), plain.eval()
    x, _ = batch(5)
    assert torch.allclose(plain(x)[0], model(x)[0], atol=1e-5)


def test_merged_state_dict_of_biased_projections():
    """Qwen2-style q/k/v biases come back under the plain names (`q_proj.bias`), so that the merged
    state dict loads into the plain model (a LoRA fine-tune of an imported Qwen2 saves it)."""
    def qwen2_like() -> GPT:
        torch.manual_seed(0)
        return GPT(GPTConfig(vocab_size=64, max_seq_len=32, d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                             d_ff=64, qkv_bias=True))

    model = qwen2_like()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0, 0.5)
    apply_lora(model, rank=4, alpha=8, targets=["q_proj", "k_proj", "v_proj"])
    train_steps(model, 3)
    merged = merged_state_dict(model)
    assert not any("base_layer" in k for k in merged)
    plain = qwen2_like()
    plain.load_state_dict(merged, strict=True)
    model.eval(), plain.eval()
    x, _ = batch(5)
    assert torch.allclose(plain(x)[0], model(x)[0], atol=1e-5)
    assert torch.equal(plain.layers[0].self_attn.q_proj.bias, model.layers[0].self_attn.q_proj.base_layer.bias)


# ------------------------------------------------------------------------ the fused layer

@pytest.mark.parametrize("bias, p", [(False, 0.0), (True, 0.3)])
def test_fused_layer_equals_the_formula(monkeypatch, bias, p):
    """Output and gradients (input, A, B) of the one-node layer equal the formula written as
    separate ops, with the same dropout mask."""
    torch.manual_seed(0)
    base = nn.Linear(12, 20, bias=bias).requires_grad_(False)
    layer = LoRALinear(base, rank=4, alpha=8, dropout=p).train()
    nn.init.normal_(layer.lora_B.weight)
    keep = torch.rand(3, 5, 12) > p
    monkeypatch.setattr(lora, "_keep_mask", lambda shape, p_, device: keep)
    x = torch.randn(3, 5, 12, requires_grad=True)
    gy = torch.randn(3, 5, 20)

    def run(forward) -> list[torch.Tensor]:
        x.grad = layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
        y = forward(x)
        y.backward(gy)
        return [y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]

    fused = run(layer)
    reference = run(lambda x: base(x) + layer.lora_B(layer.lora_A(x * keep / (1 - p))) * layer.scaling)
    for got, want in zip(fused, reference):
        assert torch.allclose(got, want, atol=1e-5)
    assert base.weight.grad is None


def test_dropout_mask_keeps_one_minus_p():
    keep = lora._keep_mask(torch.Size([400, 500]), 0.05, torch.device("cpu"))
    assert keep.dtype == torch.bool and abs(keep.float().mean().item() - 0.95) < 0.005


def test_bf16_autocast_casts_the_frozen_weight_once():
    model = apply_lora(tiny(), rank=4, alpha=8)
    plain = tiny()
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # B is zero: the wrapped model computes exactly what autocast computes for the plain one.
        assert torch.equal(model(x)[0], plain(x)[0])
    layer = lora_modules(model)["layers.0.self_attn.q_proj"]
    cached = layer._cast["weight"][1]
    assert cached.dtype == torch.bfloat16 and torch.equal(cached, layer.weight.to(torch.bfloat16))
    nn.init.normal_(layer.lora_B.weight)
    h = torch.randn(2, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(h)
    assert layer._cast["weight"][1] is cached                        # reused, not cast again
    want = layer.base_layer(h) + layer.lora_B(layer.lora_A(h)) * layer.scaling
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), want, atol=0.05, rtol=0.02)
    with torch.no_grad():
        layer.base_layer.weight.mul_(2)                               # changed in place: cast again
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(h)
    assert layer._cast["weight"][1] is not cached
    assert copy.deepcopy(layer)._cast == {}                          # a copy does not carry it
    # Training under autocast: fp32 gradients on the adapters only.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, y)[1]
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n and g.dtype == torch.float32 for n, g in grads.items())
