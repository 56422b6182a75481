"""`chatforge export`: hand a model folder to transformers, llama.cpp and Ollama (the command's
options: `chatforge.commands.export`).

    chatforge export --model runs/demo/sft --format hf --out runs/demo/export/hf
    chatforge export --model runs/demo/sft --format gguf --quant q8_0 --out runs/demo/export/q8_0
    ollama create acme -f runs/demo/export/q8_0/Modelfile     # Ollama, from the GGUF folder
    chatforge export --model runs/x/sft --format peft --base-export runs/x/export/base-hf    # LoRA adapter alone
    chatforge export --model runs/x/sft --format gguf-lora --base-export runs/x/export/base-q8_0

`--format hf` writes a folder `transformers` loads with `AutoModelForCausalLM` and
`AutoTokenizer`: `config.json` naming `LlamaForCausalLM` (or `Qwen2ForCausalLM` /
`Qwen3ForCausalLM` for models imported as such: `GPT.hf_config`), `model.safetensors` under HF's
parameter names (`GPT.hf_state_dict`; a tied head stored once, as transformers saves it),
`generation_config.json` (stop at `<|im_end|>` and `<|endoftext|>`, as chatforge's engine does)
and the tokenizer files with the chat template (`ChatTokenizer.save`). `--quant` f32 (default:
logits equal chatforge's), f16 or bf16.

`--format gguf` writes `NAME-QUANT.gguf` (model/gguf_export.py: architecture metadata, llama.cpp's
q/k permutation, the tokenizer, weights as f32, f16 (default), bf16, q8_0, q4_0 or q4_1) and an
Ollama `Modelfile` beside it: `FROM` the file, a ChatML `TEMPLATE`, `SYSTEM` (`--system`, else the
chat template's default system message, if any), the stop tokens and the context length.

A LoRA fine-tune (`chatforge sft --method lora`) is saved merged already: `hf` and `gguf` export
its `model.safetensors` and leave an adapter kept beside it (`--lora-save adapter`) out. That
adapter alone is what `--format peft` (PEFT's folder: transformers + peft, vLLM) and `--format
gguf-lora` (llama.cpp's LoRA GGUF, and an Ollama Modelfile with `ADAPTER`) write, for an engine
that runs the base, exported once with `hf` / `gguf` (`--base-export` names that export; see
model/adapter_export.py). A `last/` checkpoint of a LoRA run holds the unmerged training weights
and is refused: export the run's folder. Every export goes to a temporary folder first, so `--out` appears complete or not at all;
an existing export folder there is replaced, any other existing folder is left alone (an error).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chatforge import files
from chatforge.errors import ChatforgeError
from chatforge.model import adapter_export as ae
from chatforge.model.folder import WEIGHTS, load_config, load_model, load_tokenizer
from chatforge.model.gguf_export import QUANTS, modelfile, write_gguf
from chatforge.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

FORMATS = ("hf", "gguf", "peft", "gguf-lora")
ADAPTER_FORMATS = ("peft", "gguf-lora")
HF_QUANTS = ("f32", "f16", "bf16")
DEFAULT_QUANT = {"hf": "f32", "gguf": "f16", "peft": "f32", "gguf-lora": "f32"}
MARKER = "chatforge_export.json"     # marks a folder this command wrote (and may replace)


@dataclass
class ExportResult:
    out: Path
    format: str
    quant: str
    files: list[Path]
    seconds: float
    notes: list[str] = field(default_factory=list)
    types: dict[str, int] = field(default_factory=dict)   # gguf: stored type -> tensor count
    usage: list[str] = field(default_factory=list)         # adapters: how an engine loads them

    def summary(self) -> str:
        lines = [f"exported {self.format} ({self.quant}) in {self.seconds:.1f} s -> {self.out}"]
        lines += [f"  {p.name}: {p.stat().st_size / 1e6:.1f} MB" for p in self.files]
        if self.types:
            lines.append("  tensors: " + ", ".join(f"{t} x{n}" for t, n in self.types.items()))
        lines += [f"  note: {n}" for n in self.notes]
        if self.format == "hf":
            lines.append(f"  transformers: AutoModelForCausalLM.from_pretrained({str(self.out)!r}), "
                         f"AutoTokenizer.from_pretrained({str(self.out)!r})")
        elif self.format in ADAPTER_FORMATS:
            lines += self.usage
        else:
            gguf_file = next(p for p in self.files if p.suffix == ".gguf")
            lines.append(f"  llama.cpp: llama-cli -m {gguf_file} -cnv   (llama-cpp-python: Llama(model_path=...))")
            lines.append(f"  Ollama: cd {self.out} && ollama create {gguf_file.stem.rsplit('-', 1)[0]} -f Modelfile")
        return "\n".join(lines)


def load_for_export(folder: str | Path):
    """(model in fp32, tokenizer, notes) of a model folder, refusing unmerged LoRA weights."""
    folder = Path(folder)
    notes = []
    weights = folder / WEIGHTS
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as f:
                wrapped = any(".lora_A." in name for name in f.keys())
        except Exception:  # noqa: BLE001 - load_model below reports a damaged file with its own message
            wrapped = False
        if wrapped:
            raise ChatforgeError(f"{folder} holds unmerged LoRA training weights (a `last/` checkpoint of a LoRA "
                                 "run); export the run's own folder, where chatforge sft saved the merged model")
    model, tokenizer = load_model(folder)
    if (folder / ADAPTER_WEIGHTS).is_file() or (folder / ADAPTER_CONFIG).is_file():
        notes.append(f"{ADAPTER_WEIGHTS} is already merged into {WEIGHTS} (chatforge sft saves LoRA runs merged); "
                     "the export holds the merged weights and no adapter")
    return model.float(), tokenizer, notes


def export_hf(model, tokenizer, out: Path, quant: str = "f32") -> list[Path]:
    """Write the HF folder into `out` (an existing, empty folder); returns the files written."""
    dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    if quant not in dtypes:
        raise ChatforgeError(f"--format hf stores weights as {', '.join(HF_QUANTS)} (what transformers loads from "
                             f"safetensors), not {quant}; use --format gguf for quantized weights")
    dtype = dtypes[quant]
    state = model.hf_state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")                # transformers ties it to the embedding itself
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    # safetensors creates the file private (0600); the other files of the folder are ordinary ones.
    os.chmod(out / "model.safetensors", 0o666 & ~files._umask())
    dtype_name = str(dtype).removeprefix("torch.")
    special = {"bos_token_id": _token_id(tokenizer, tokenizer.bos_token),
               "eos_token_id": tokenizer.im_end_id, "pad_token_id": tokenizer.pad_id}
    # transformers 4 reads `torch_dtype`, 5 `dtype`: both are written.
    files.write_json(out / "config.json", {**model.hf_config(), **special, "torch_dtype": dtype_name,
                                           "dtype": dtype_name})
    # The engine stops at either token; so does HF generate with this file.
    stops = list(dict.fromkeys([tokenizer.im_end_id, tokenizer.eot_id]))
    files.write_json(out / "generation_config.json", {
        "bos_token_id": special["bos_token_id"], "eos_token_id": stops, "pad_token_id": tokenizer.pad_id})
    tokenizer.save(out)
    return [out / n for n in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                              "tokenizer_config.json", "special_tokens_map.json")]


def _token_id(tokenizer, token: str | None) -> int | None:
    return None if token is None else tokenizer.hf_tokenizer.token_to_id(token)


def export_gguf(model, tokenizer, out: Path, quant: str, name: str, system: str | None) -> tuple[list[Path], dict]:
    """Write NAME-QUANT.gguf and its Modelfile into `out`; returns (files, stored type counts)."""
    if quant not in QUANTS:
        raise ChatforgeError(f"unknown --quant {quant!r} for gguf; choose one of {', '.join(QUANTS)}")
    # The Modelfile first: a system message it cannot hold fails before minutes of quantizing.
    gguf_name = f"{name}-{quant}.gguf"
    text = modelfile(gguf_name, tokenizer, model.config.max_seq_len, system)
    types = write_gguf(model, tokenizer, out / gguf_name, quant, name)
    files.write_text(out / "Modelfile", text)
    return [out / gguf_name, out / "Modelfile"], dict(types)


def check_out(model_dir: Path, out: Path) -> None:
    """`out` may be written: not the model folder nor a folder holding it, and either absent,
    empty, or a folder this command wrote before (which is replaced)."""
    m, o = model_dir.resolve(), out.resolve()
    if o == m or o in m.parents:
        raise ChatforgeError(f"--out {out} would replace the model folder {model_dir}; choose another folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise ChatforgeError(f"{out} exists and is not an export folder; choose another --out "
                             "(a folder chatforge export wrote is replaced)")


def export_model(model_dir: str | Path, fmt: str, out: str | Path | None = None, quant: str | None = None,
                 name: str | None = None, system: str | None = None,
                 base_export: str | Path | None = None) -> ExportResult:
    """Export the model folder `model_dir` as `fmt` (hf, gguf, or its LoRA adapter alone: peft,
    gguf-lora) into the folder `out`. `base_export`: for the adapter formats, the base's own
    export (hf for peft, gguf for gguf-lora)."""
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    if fmt not in FORMATS:
        raise ChatforgeError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    quant = quant or DEFAULT_QUANT[fmt]
    if fmt == "hf" and quant not in HF_QUANTS:
        raise ChatforgeError(f"--format hf stores weights as {', '.join(HF_QUANTS)}, not {quant}; use --format gguf "
                             "for quantized weights")
    if fmt in ADAPTER_FORMATS and quant not in HF_QUANTS:
        raise ChatforgeError(f"--format {fmt} stores the adapter as {', '.join(HF_QUANTS)}, not {quant} (an adapter "
                             "is small; quantize the base's own --format gguf export instead)")
    if fmt in ("hf", "peft") and system is not None:
        raise ChatforgeError(f"--system goes into the Ollama Modelfile of --format gguf / gguf-lora; --format {fmt} "
                             "keeps the chat template's own system message")
    if base_export is not None and fmt not in ADAPTER_FORMATS:
        raise ChatforgeError("--base-export names the base's export for --format peft / gguf-lora (an adapter); "
                             f"--format {fmt} exports the whole model")
    if fmt in ADAPTER_FORMATS:
        return _export_adapter(model_dir, fmt, out, quant, name, system, base_export, t0)
    name = name or model_dir.resolve().name
    _check_name(name)
    out = Path(out) if out else model_dir.parent / f"{model_dir.name}-{fmt}{'' if fmt == 'hf' else '-' + quant}"
    check_out(model_dir, out)
    model, tokenizer, notes = load_for_export(model_dir)
    types: dict = {}
    with files.atomic_dir(out) as tmp:
        if fmt == "hf":
            written = export_hf(model, tokenizer, tmp, quant)
        else:
            written, types = export_gguf(model, tokenizer, tmp, quant, name, system)
        files.write_json(tmp / MARKER, {"source": str(model_dir.resolve()), "format": fmt, "quant": quant,
                                        "files": [p.name for p in written]})
    return ExportResult(out, fmt, quant, [out / p.name for p in written], time.perf_counter() - t0, notes, types)


def _vllm_rank(rank: int) -> int:
    """The smallest value vLLM's --max-lora-rank accepts that holds `rank`."""
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ChatforgeError(f"--name {name!r} must be letters, digits, '.', '_' or '-' (it names the GGUF file)")


def _export_adapter(model_dir: Path, fmt: str, out, quant: str, name: str | None, system: str | None,
                    base_export, t0: float) -> ExportResult:
    """--format peft / gguf-lora: the LoRA adapter saved beside the model, alone."""
    name = name or model_dir.resolve().name
    _check_name(name)
    suffix = "" if fmt == "peft" else "-" + quant
    if not model_dir.is_dir():
        raise ChatforgeError(f"model folder {model_dir} does not exist")
    if fmt == "gguf-lora" and system is not None and base_export is None:
        raise ChatforgeError("--system goes into the Ollama Modelfile, which needs --base-export (the base's "
                             "--format gguf export) for its FROM line")
    out = Path(out) if out else model_dir.parent / f"{model_dir.name}-{fmt}{suffix}"
    check_out(model_dir, out)
    config = load_config(model_dir)
    adapter = ae.read_adapter(model_dir, config)
    ae.check_against_base(adapter, model_dir)
    base_file = ae.find_base_export(base_export, fmt, adapter, MARKER) if base_export is not None else None
    base_cmd = (f"chatforge export --model {adapter.base or 'BASE'} --format {'hf' if fmt == 'peft' else 'gguf'}")
    notes, usage = list(adapter.notes), []
    with files.atomic_dir(out) as tmp:
        if fmt == "peft":
            base_ref = str(base_file.resolve()) if base_file else None
            written = ae.write_peft(adapter, config, tmp, quant, base_ref)
            types = {}
            base_hf = base_ref or "BASE_HF"
            if base_file is None:
                notes.append(f"no --base-export: base_model_name_or_path is empty; the engine takes the base's HF "
                             f"export ({base_cmd})")
            usage = [(f"  peft: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_hf!r}), "
                      f"{str(out)!r})"),
                     (f"  vLLM: python -m vllm.entrypoints.openai.api_server --model {base_hf} --enable-lora "
                      f"--lora-modules {name}={out} --max-lora-rank {_vllm_rank(adapter.rank)}   "
                      f"(then \"model\": \"{name}\")")]
        else:
            gguf_name = f"{name}-lora-{quant}.gguf"
            text = None
            if base_file is not None:
                # First the Modelfile, as --format gguf does: a bad system message fails before writing.
                text = modelfile(ae.relative_ref(base_file, out), load_tokenizer(model_dir), config.max_seq_len,
                                 system, adapter=gguf_name)
            types = dict(ae.write_gguf_lora(adapter, config, tmp / gguf_name, quant, name))
            written = [tmp / gguf_name]
            base_gguf = str(base_file) if base_file else "BASE.gguf"
            usage = [(f"  llama.cpp: llama-server -m {base_gguf} --lora {out / gguf_name}   "
                      "(llama-cpp-python: Llama(model_path=..., lora_path=...))")]
            if text is not None:
                files.write_text(tmp / "Modelfile", text)
                written.append(tmp / "Modelfile")
                usage.append(f"  Ollama: cd {out} && ollama create {name} -f Modelfile")
            else:
                notes.append(f"no --base-export: no Ollama Modelfile (it needs FROM the base's GGUF: {base_cmd})")
        files.write_json(tmp / MARKER, {"source": str(model_dir.resolve()), "format": fmt, "quant": quant,
                                        "files": [p.name for p in written],
                                        "base": str(adapter.base) if adapter.base else None})
    notes.append(f"LoRA rank {adapter.rank}, alpha {adapter.alpha:g}, {len(adapter.modules)} adapted layers; "
                 f"base: {adapter.base}")
    return ExportResult(out, fmt, quant, [out / p.name for p in written], time.perf_counter() - t0, notes, types,
                        usage)
