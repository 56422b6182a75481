"""`chatforge export`: a model folder for transformers (HF folder), llama.cpp / Ollama (GGUF and a
Modelfile), or its LoRA adapter alone (the work: `chatforge.model.export.export_model`)."""

from __future__ import annotations

import argparse

from chatforge.commands import leaf
from chatforge.errors import ChatforgeError
from chatforge.model.export import FORMATS, HF_QUANTS, export_model


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("example:\n"
                     "  chatforge export --model runs/demo/sft --format hf --out runs/demo/export/hf\n"
                     "  chatforge export --model runs/demo/sft --format gguf --quant q8_0 --out runs/demo/export/q8_0\n"
                     "  chatforge export --model runs/demo/sft --format gguf --quant q4_0 --name acme \\\n"
                     "      --system \"You are the support assistant of Acme.\"\n"
                     "the LoRA adapter alone (sft --lora-save adapter), on its base exported once:\n"
                     "  chatforge export --model runs/x/base --format hf --out runs/x/export/base-hf\n"
                     "  chatforge export --model runs/x/sft --format peft --base-export runs/x/export/base-hf\n"
                     "  chatforge export --model runs/x/base --format gguf --quant q8_0 --out runs/x/export/base-q8_0\n"
                     "  chatforge export --model runs/x/sft --format gguf-lora --base-export runs/x/export/base-q8_0\n"
                     "then: transformers AutoModelForCausalLM.from_pretrained(OUT); llama-cli -m OUT/NAME-QUANT.gguf;\n"
                     "      cd OUT && ollama create NAME -f Modelfile")
    parser.add_argument("--model", metavar="DIR", default=None, help="model folder to export (needed)")
    parser.add_argument("--format", choices=FORMATS, default="gguf",
                        help="hf: a transformers model folder; gguf: a llama.cpp file and an Ollama Modelfile; "
                             "peft: the LoRA adapter alone in PEFT's format (transformers + peft, vLLM); gguf-lora: "
                             "the adapter as llama.cpp's LoRA GGUF (llama.cpp --lora, Ollama ADAPTER)")
    parser.add_argument("--quant", choices=sorted(set(HF_QUANTS) | {"q8_0", "q4_0", "q4_1"}), default=None,
                        help="stored weight type; default f32 for hf, peft and gguf-lora (logits equal "
                             "chatforge's), f16 for gguf; q8_0 / q4_0 / q4_1 are gguf only")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output folder (an earlier export there is replaced); default: MODEL-FORMAT[-QUANT] "
                             "beside the model folder")
    parser.add_argument("--name", default=None,
                        help="model name: GGUF general.name and file name NAME-QUANT.gguf (gguf-lora: "
                             "NAME-lora-QUANT.gguf; peft: the LoRA module name in the printed vLLM command); "
                             "default: the model folder's name")
    parser.add_argument("--system", metavar="TEXT", default=None,
                        help="gguf, gguf-lora: the system message of the Ollama Modelfile; default: the chat "
                             "template's default system message, if it has one")
    parser.add_argument("--base-export", metavar="PATH", default=None,
                        help="peft / gguf-lora: the export of the adapter's base (its --format hf folder for peft, "
                             "recorded as base_model_name_or_path; its --format gguf folder or file for gguf-lora, "
                             "the FROM of the Ollama Modelfile written then)")
    leaf(parser, run)


def run(args: argparse.Namespace) -> int:
    if not args.model:
        raise ChatforgeError("pass --model DIR: the model folder to export (e.g. runs/demo/sft)")
    print(f"exporting {args.model} as {args.format} ...", flush=True)
    result = export_model(args.model, args.format, args.out, args.quant, args.name, args.system, args.base_export)
    print(result.summary())
    return 0
