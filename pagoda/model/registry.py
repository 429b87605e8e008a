"""Architecture name (HF `architectures[0]` or `model_type`) -> model class."""

from __future__ import annotations

from torch import nn

from pagoda.model.llama import LlamaForCausalLM
from pagoda.model.qwen2 import Qwen2ForCausalLM
from pagoda.model.qwen3 import Qwen3ForCausalLM

_BY_ARCHITECTURE: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}
_BY_MODEL_TYPE = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCHITECTURE)


def model_class_for(hf_config) -> type[nn.Module]:
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    model_type = getattr(hf_config, "model_type", None)
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    raise ValueError(
        f"architecture {getattr(hf_config, 'architectures', None) or model_type!r} is not supported; "
        f"supported: {', '.join(supported_architectures())}."
    )
