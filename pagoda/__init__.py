"""pagoda: an LLM inference and serving engine.

The public names are imported on first use, so `pagoda --help` does not
pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "pagoda.engine.llm",
    "LLMEngine": "pagoda.engine.llm_engine",
    "SamplingParams": "pagoda.sampling_params",
    "RequestOutputKind": "pagoda.sampling_params",
    "StructuredOutputsParams": "pagoda.structured_output.params",
    "RequestOutput": "pagoda.outputs",
    "CompletionOutput": "pagoda.outputs",
    "LoRARequest": "pagoda.model.lora.request",
}
__all__ = ["LLM", "LLMEngine", "SamplingParams", "StructuredOutputsParams", "RequestOutputKind", "RequestOutput", "CompletionOutput",
           "LoRARequest"]

if TYPE_CHECKING:
    from pagoda.engine.llm import LLM
    from pagoda.engine.llm_engine import LLMEngine
    from pagoda.model.lora.request import LoRARequest
    from pagoda.outputs import CompletionOutput, RequestOutput
    from pagoda.sampling_params import RequestOutputKind, SamplingParams
    from pagoda.structured_output.params import StructuredOutputsParams


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pagoda' has no attribute {name!r}")
