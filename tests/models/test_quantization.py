"""Quantized linear methods through the engine.

- int8 / int4 quantize a float checkpoint at load: every linear layer is packed and
  the engine generates (quality is measured on the real model by
  benchmarks/quant_quality.py, not on random tiny models);
- the default model with its GGUF Q4_1 blocks kept packed (quantization='gguf')
  against the same file dequantized (quantization='none'), both bf16: greedy
  tokens agree on a measured share of steps.
"""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.model.layers.linear import Linear
from tests.conftest import TINY_VOCAB, make_tiny_checkpoint, requires_smollm2


def _greedy(llm: LLM, prompts: list[list[int]], tokens: int = 12) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def _prompts(count: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, TINY_VOCAB, (7 + 4 * i,), generator=gen).tolist() for i in range(count)]


def _first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_float_checkpoint_loads_and_generates(tmp_path, arch, quantization):
    folder = make_tiny_checkpoint(tmp_path, arch)
    kwargs = dict(show_progress=False, kv_cache_memory=32 * 1024**2)
    llm = LLM(str(folder), dtype="bfloat16", quantization=quantization, **kwargs)
    linears = [m for m in llm.engine.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight is None for m in linears)
    tokens = _greedy(llm, _prompts(8))
    assert all(len(seq) == 12 and all(0 <= t < TINY_VOCAB for t in seq) for seq in tokens)
    if quantization == "int8":
        # Random tiny models are no quality benchmark (benchmarks/quant_quality.py is), but
        # int8 still starts like the float model on most prompts (measured: 6 of 8).
        reference = _greedy(LLM(str(folder), dtype="bfloat16", quantization="none", **kwargs), _prompts(8))
        assert sum(a[0] == b[0] for a, b in zip(tokens, reference)) >= 5


def test_gguf_quantization_of_a_float_checkpoint_names_the_field(tiny_llama):
    with pytest.raises(ValueError, match="quantization='gguf'"):
        LLM(str(tiny_llama), quantization="gguf", show_progress=False)


PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


@requires_smollm2
def test_gguf_packed_greedy_tokens_track_the_float_model():
    kwargs = dict(dtype="bfloat16", show_progress=False, kv_cache_memory=64 * 1024**2, max_model_len=512)
    float_llm = LLM(quantization="none", **kwargs)
    packed_llm = LLM(quantization="gguf", **kwargs)
    assert all(m.weight is None for m in packed_llm.engine.model.modules() if isinstance(m, Linear))
    params = SamplingParams(temperature=0, max_tokens=16)
    floats = [o.outputs[0].token_ids for o in float_llm.generate(PROMPTS, params)]
    packs = [o.outputs[0].token_ids for o in packed_llm.generate(PROMPTS, params)]
    # Measured: the first greedy token matches on every prompt and the paths run
    # together for most of 16 tokens (quantization noise flips a near-tie now and then).
    assert all(f[0] == p[0] for f, p in zip(floats, packs))
    shared = sum(_first_divergence(f, p) for f, p in zip(floats, packs))
    assert shared >= 0.5 * sum(len(f) for f in floats), (floats, packs)
