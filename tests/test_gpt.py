"""The GPT: causality, parity with HF LlamaForCausalLM, mixture-of-experts routing and learning."""

from __future__ import annotations

import pytest
import torch

from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig, preset


def small_config(**kw) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=97, max_seq_len=32, d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                               d_ff=64), **kw})


@pytest.mark.parametrize("n_experts", [0, 4])
def test_changing_a_later_token_never_changes_earlier_logits(n_experts):
    torch.manual_seed(0)
    model = GPT(small_config(n_experts=n_experts)).eval()
    idx = torch.randint(0, 97, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_logits_match_hf_llama(tied, n_kv_head):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT(small_config(tie_embeddings=tied, n_kv_head=n_kv_head)).eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.hf_config())).eval()
    missing, unexpected = hf.load_state_dict(model.hf_state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_hf_loss_matches_too():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    model = GPT(small_config()).eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.hf_config())).eval()
    hf.load_state_dict(model.hf_state_dict(), strict=False)
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        _, ours = model(idx[:, :-1], idx[:, 1:])
        theirs = hf(idx, labels=idx).loss
    assert abs(ours.item() - theirs.item()) < 1e-4


def test_moe_sends_each_token_to_exactly_k_experts():
    torch.manual_seed(0)
    model = GPT(small_config(n_experts=4, experts_per_token=2)).eval()
    with torch.no_grad():
        model(torch.randint(0, 97, (3, 12)))
    for block in model.layers:
        choice = block.mlp.last_choice                                  # (N, k)
        assert choice.shape == (3 * 12, 2)
        assert all(len(set(row.tolist())) == 2 for row in choice)       # k distinct experts a token
        assert choice.min() >= 0 and choice.max() < 4
    assert model.aux_loss.item() >= 1.0 - 1e-4                          # 1.0 = perfectly balanced


def test_a_tiny_moe_model_learns():
    torch.manual_seed(0)
    model = GPT(small_config(n_experts=4, experts_per_token=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # A learnable pattern: each sequence counts up modulo the vocabulary from a random start.
    start = torch.randint(0, 97, (16, 1))
    seq = (start + torch.arange(17)) % 97
    losses = []
    for _ in range(40):
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_too_long_input_and_bad_config_are_clear_errors():
    model = GPT(small_config())
    with pytest.raises(ChatforgeError, match="longer than the model's context"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ChatforgeError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ChatforgeError, match="multiple of n_kv_head"):
        small_config(n_kv_head=3)


def test_extending_the_context_keeps_what_the_model_already_computes():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, max_seq_len=16, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64)).eval()
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        before = model(ids[:, :16])[0]
        with pytest.raises(ChatforgeError, match="longer than the model's context"):
            model(ids)
        model.extend_context(40)
        after = model(ids)[0]
    assert model.config.max_seq_len == 40 and after.shape == (2, 40, 64)
    torch.testing.assert_close(after[:, :16], before, atol=1e-5, rtol=1e-5)
    model.extend_context(8)   # never shrinks
    assert model.config.max_seq_len == 40


# --- the switches for imported checkpoints (Qwen2: qkv_bias, Qwen3: qk_norm + explicit head size)

def _hf_peer(model: GPT):
    """The HF class `hf_config` names, holding the model's weights."""
    transformers = pytest.importorskip("transformers")
    cfg = dict(model.hf_config())
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    hf.eval()
    missing, unexpected = hf.load_state_dict(model.hf_state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf


@pytest.mark.parametrize("switches,hf_class", [
    (dict(qkv_bias=True), "Qwen2ForCausalLM"),
    (dict(qk_norm=True), "Qwen3ForCausalLM"),
    (dict(qk_norm=True, head_size=16), "Qwen3ForCausalLM"),      # 4 heads x 16 = 64 wide, d_model 32
    (dict(head_size=16), "LlamaForCausalLM"),
])
def test_switched_models_match_their_hf_class(switches, hf_class):
    torch.manual_seed(0)
    model = GPT(small_config(**switches)).eval()
    with torch.no_grad():
        # Random, not the initial zeros / ones: the biases and norm weights must really be used.
        for name, p in model.named_parameters():
            if name.endswith(("_proj.bias", "q_norm.weight", "k_norm.weight")):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("norm.weight") else 0.0))
    hf = _hf_peer(model)
    assert type(hf).__name__ == hf_class
    if switches.get("head_size"):
        assert model.layers[0].self_attn.q_proj.weight.shape == (4 * 16, 32)
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_switches_default_off_and_old_config_files_still_load():
    old = dict(vocab_size=97, max_seq_len=32, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64,
               rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True, dropout=0.0, n_experts=0,
               experts_per_token=2, moe_aux_weight=0.01)      # a config.json from before the switches
    cfg = GPTConfig.from_dict(old)
    assert (cfg.head_size, cfg.qkv_bias, cfg.qk_norm) == (None, False, False) and cfg.head_dim == 8
    names = set(GPT(cfg).state_dict())
    assert not any(n.endswith((".bias", "q_norm.weight", "k_norm.weight")) for n in names)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert GPT(cfg).hf_config()["model_type"] == "llama"


def test_one_architecture_per_switch_setting_named_alike_on_export_and_import():
    """model/architectures.py: what the switches export as is what importing that name gives."""
    from chatforge.model.architectures import EXPORTED, architecture_of, from_gguf_name, from_hf_model_type

    for arch in EXPORTED:
        cfg = small_config(**arch.switches)
        assert architecture_of(cfg) is arch
        hf = GPT(cfg).hf_config()
        assert (hf["model_type"], hf["architectures"]) == (arch.name, [arch.hf_class])
        assert from_hf_model_type(hf["model_type"], "x") is arch and from_gguf_name(arch.gguf_name, "x") is arch
    mistral = from_hf_model_type("mistral", "x")
    assert mistral.switches == EXPORTED[0].switches and architecture_of(small_config(**mistral.switches)).name == "llama"
    with pytest.raises(ChatforgeError, match="x: unsupported architecture 'gpt2'.*llama, mistral, qwen2, qwen3"):
        from_hf_model_type("gpt2", "x")
    with pytest.raises(ChatforgeError, match="x: unsupported architecture 'mistral'.*llama, qwen2, qwen3"):
        from_gguf_name("mistral", "x")


def test_switch_errors_are_clear():
    with pytest.raises(ChatforgeError, match="head size .* must be even"):
        small_config(head_size=7)
    with pytest.raises(ChatforgeError, match="divisible by n_head"):
        small_config(d_model=30)
    small_config(d_model=30, head_size=8)            # an explicit head size needs no divisibility
    with pytest.raises(ChatforgeError, match="matches no HF model class"):
        GPT(small_config(qkv_bias=True, qk_norm=True)).hf_config()


def test_loss_only_equals_the_full_loss_and_its_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, max_seq_len=32, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64))
    x = torch.randint(0, 97, (3, 20))
    y = torch.randint(0, 97, (3, 20))
    y[:, :12] = -100                      # a prompt: no targets there
    y[1] = -100                           # a row with no target at all
    logits, full = model(x, y)
    full.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    none, part = model(x, y, loss_only=True)
    part.backward()
    assert none is None and torch.allclose(full, part, atol=1e-6) and logits.shape == (3, 20, 97)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6), n
