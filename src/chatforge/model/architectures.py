"""The architectures a chatforge model can be, named in one place.

`GPT` is one transformer with switches (`GPTConfig.qkv_bias`, `qk_norm`); a given setting of them is
exactly one architecture of the outside world: Llama (none), Qwen2 (q/k/v biases) or Qwen3 (q/k
norms). Each `Architecture` says what the others call it: the HF class and `model_type`
(`GPT.hf_config`, HF export), llama.cpp's `general.architecture` (GGUF export and import), and
whether llama.cpp's files hold its q/k rows permuted.

    arch = architecture_of(model.config)          # exporting: the switches name the architecture
    arch = from_hf_model_type("qwen2", where)     # importing an HF folder: its switches
    arch = from_gguf_name("llama", where)         # importing a GGUF file
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from chatforge.errors import ChatforgeError


@dataclass(frozen=True)
class Architecture:
    name: str                   # HF `model_type`
    hf_class: str               # the transformers class whose maths the model is
    gguf_name: str              # llama.cpp's `general.architecture`
    qkv_bias: bool = False      # GPTConfig switches that make the model this architecture
    qk_norm: bool = False
    gguf_permuted_qk: bool = False  # llama.cpp's converter interleaves the halves of q/k rows (rotary layout)
    hf_fields: tuple[tuple[str, object], ...] = ()   # what `hf_config` adds for this class's config

    @property
    def switches(self) -> dict[str, bool]:
        """The `GPTConfig` fields that make a model this architecture."""
        return {"qkv_bias": self.qkv_bias, "qk_norm": self.qk_norm}

    def hf_config(self, fields: dict) -> dict:
        """`fields` (the model's sizes under HF's names) completed into this class's config."""
        return {**fields, **dict(self.hf_fields), "model_type": self.name, "architectures": [self.hf_class]}

    def gguf_tensor_names(self, n_layer: int):
        """The `gguf` package's map from HF tensor names to this architecture's GGUF names."""
        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.gguf_name)
        return gguf.get_tensor_name_map(arch, n_layer)


LLAMA = Architecture("llama", "LlamaForCausalLM", "llama", gguf_permuted_qk=True,
                     hf_fields=(("attention_bias", False), ("mlp_bias", False)))
QWEN2 = Architecture("qwen2", "Qwen2ForCausalLM", "qwen2", qkv_bias=True,
                     hf_fields=(("use_sliding_window", False),))
QWEN3 = Architecture("qwen3", "Qwen3ForCausalLM", "qwen3", qk_norm=True,
                     hf_fields=(("attention_bias", False), ("use_sliding_window", False)))
# Mistral is Llama's maths (its sliding window aside, `hf_import` caps the context there); its
# GGUF files say "llama", and a model imported from it exports as Llama.
MISTRAL = Architecture("mistral", "MistralForCausalLM", "llama", gguf_permuted_qk=True)

EXPORTED = (LLAMA, QWEN2, QWEN3)
HF_IMPORTED = {a.name: a for a in (LLAMA, MISTRAL, QWEN2, QWEN3)}        # by config.json's model_type
GGUF_IMPORTED = {a.gguf_name: a for a in EXPORTED}                        # by general.architecture


def architecture_of(config) -> Architecture:
    """The architecture a model with `GPTConfig` `config` is (its qkv_bias / qk_norm switches)."""
    found = [a for a in EXPORTED if (a.qkv_bias, a.qk_norm) == (config.qkv_bias, config.qk_norm)]
    if not found:
        raise ChatforgeError("a model with both qkv_bias and qk_norm matches no HF model class or llama.cpp "
                             "architecture")
    return found[0]


def from_hf_model_type(model_type, where: str) -> Architecture:
    """The architecture of an HF config.json's `model_type`; an unsupported one is an error."""
    if model_type not in HF_IMPORTED:
        raise ChatforgeError(f"{where}: unsupported architecture {model_type!r} (model_type in config.json); "
                             f"chatforge imports {', '.join(HF_IMPORTED)}")
    return HF_IMPORTED[model_type]


def from_gguf_name(name, where: str) -> Architecture:
    """The architecture of a GGUF file's `general.architecture`; an unsupported one is an error."""
    if name not in GGUF_IMPORTED:
        raise ChatforgeError(f"{where}: unsupported architecture {name!r} (general.architecture); chatforge "
                             f"imports GGUF files of {', '.join(GGUF_IMPORTED)} (Mistral's are llama)")
    return GGUF_IMPORTED[name]
