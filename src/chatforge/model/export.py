"""`chatforge export`: hand a model folder to transformers, llama.cpp and Ollama.

    chatforge export --model runs/demo/sft --format hf --out runs/demo/export/hf
    chatforge export --model runs/demo/sft --format gguf --quant q8_0 --out runs/demo/export/q8_0
    ollama create acme -f runs/demo/export/q8_0/Modelfile     # Ollama, from the GGUF folder

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

A LoRA fine-tune (`chatforge sft --method lora`) is saved merged already: its `model.safetensors`
is exported and an adapter kept beside it (`--lora-save adapter`) is left out. A `last/`
checkpoint of a LoRA run holds the unmerged training weights and is refused: export the run's
folder. Every export goes to a temporary folder first, so `--out` appears complete or not at all;
an existing export folder there is replaced, any other existing folder is left alone (an error).
"""

from __future__ import annotations

import argparse
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from chatforge.cli import leaf
from chatforge.errors import ChatforgeError

FORMATS = ("hf", "gguf")
HF_QUANTS = ("f32", "f16", "bf16")
DEFAULT_QUANT = {"hf": "f32", "gguf": "f16"}
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

    def summary(self) -> str:
        lines = [f"exported {self.format} ({self.quant}) in {self.seconds:.1f} s -> {self.out}"]
        lines += [f"  {p.name}: {p.stat().st_size / 1e6:.1f} MB" for p in self.files]
        if self.types:
            lines.append("  tensors: " + ", ".join(f"{t} x{n}" for t, n in self.types.items()))
        lines += [f"  note: {n}" for n in self.notes]
        if self.format == "hf":
            lines.append(f"  transformers: AutoModelForCausalLM.from_pretrained({str(self.out)!r}), "
                         f"AutoTokenizer.from_pretrained({str(self.out)!r})")
        else:
            gguf_file = next(p for p in self.files if p.suffix == ".gguf")
            lines.append(f"  llama.cpp: llama-cli -m {gguf_file} -cnv   (llama-cpp-python: Llama(model_path=...))")
            lines.append(f"  Ollama: cd {self.out} && ollama create {gguf_file.stem.rsplit('-', 1)[0]} -f Modelfile")
        return "\n".join(lines)


def load_for_export(folder: str | Path):
    """(model in fp32, tokenizer, notes) of a model folder, refusing unmerged LoRA weights."""
    from safetensors import safe_open

    from chatforge.model.folder import WEIGHTS, load_model
    from chatforge.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

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
    import torch
    from safetensors.torch import save_file

    from chatforge import files

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
    from chatforge import files
    from chatforge.model.gguf_export import QUANTS, modelfile, write_gguf

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
                 name: str | None = None, system: str | None = None) -> ExportResult:
    """Export the model folder `model_dir` as `fmt` ("hf" or "gguf") into the folder `out`."""
    from chatforge import files

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    if fmt not in FORMATS:
        raise ChatforgeError(f"unknown --format {fmt!r}; choose hf or gguf")
    quant = quant or DEFAULT_QUANT[fmt]
    if fmt == "hf" and quant not in HF_QUANTS:
        raise ChatforgeError(f"--format hf stores weights as {', '.join(HF_QUANTS)}, not {quant}; use --format gguf "
                             "for quantized weights")
    if fmt == "hf" and system is not None:
        raise ChatforgeError("--system goes into the Ollama Modelfile of --format gguf; an HF folder keeps the "
                             "chat template's own system message")
    name = name or model_dir.resolve().name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ChatforgeError(f"--name {name!r} must be letters, digits, '.', '_' or '-' (it names the GGUF file)")
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


# ---- the command --------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("example:\n"
                     "  chatforge export --model runs/demo/sft --format hf --out runs/demo/export/hf\n"
                     "  chatforge export --model runs/demo/sft --format gguf --quant q8_0 --out runs/demo/export/q8_0\n"
                     "  chatforge export --model runs/demo/sft --format gguf --quant q4_0 --name acme \\\n"
                     "      --system \"You are the support assistant of Acme.\"\n"
                     "then: transformers AutoModelForCausalLM.from_pretrained(OUT); llama-cli -m OUT/NAME-QUANT.gguf;\n"
                     "      cd OUT && ollama create NAME -f Modelfile")
    parser.add_argument("--model", metavar="DIR", default=None, help="model folder to export (needed)")
    parser.add_argument("--format", choices=FORMATS, default="gguf",
                        help="hf: a transformers model folder; gguf: a llama.cpp file and an Ollama Modelfile")
    parser.add_argument("--quant", choices=sorted(set(HF_QUANTS) | {"q8_0", "q4_0", "q4_1"}), default=None,
                        help="stored weight type; default f32 for hf (logits equal chatforge's), f16 for gguf; "
                             "q8_0 / q4_0 / q4_1 are gguf only")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output folder (an earlier export there is replaced); default: MODEL-FORMAT[-QUANT] "
                             "beside the model folder")
    parser.add_argument("--name", default=None,
                        help="model name: GGUF general.name and file name NAME-QUANT.gguf; default: the model "
                             "folder's name")
    parser.add_argument("--system", metavar="TEXT", default=None,
                        help="gguf: the system message of the Ollama Modelfile; default: the chat template's "
                             "default system message, if it has one")
    leaf(parser, run)


def run(args: argparse.Namespace) -> int:
    if not args.model:
        raise ChatforgeError("pass --model DIR: the model folder to export (e.g. runs/demo/sft)")
    print(f"exporting {args.model} as {args.format} ...", flush=True)
    result = export_model(args.model, args.format, args.out, args.quant, args.name, args.system)
    print(result.summary())
    return 0
