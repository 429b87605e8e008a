"""pagoda: an LLM inference and serving engine."""

from pagoda.engine.llm import LLM
from pagoda.engine.llm_engine import LLMEngine
from pagoda.outputs import CompletionOutput, RequestOutput
from pagoda.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
