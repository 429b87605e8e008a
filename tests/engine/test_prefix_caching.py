"""Prefix caching end to end on a tiny model: same greedy tokens with it on
and off, hits on shared system prompts and multi-turn chats, no leaks."""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM, SamplingParams
from tests.conftest import TINY_VOCAB


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _llm(tiny_llama, caching: bool, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory", 64 * 1024**2)
    return LLM(str(tiny_llama), dtype="float32", show_progress=False, enable_prefix_caching=caching,
               block_size=4, **kwargs)


def _greedy(max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def engines(tiny_llama):
    return _llm(tiny_llama, True), _llm(tiny_llama, False)


def test_shared_system_prompt_hits_and_gives_the_same_tokens(engines):
    on, off = engines
    system = _tokens(41, seed=1)
    prompts = [system + _tokens(5 + i, seed=10 + i) for i in range(6)]
    before = on.engine.stats()
    first = on.generate(prompts[:1], _greedy())  # fills the cache
    rest = on.generate(prompts[1:], _greedy())
    stats = on.engine.stats()
    hits = stats.prefix_cache_hits_total - before.prefix_cache_hits_total
    assert hits >= 5 * 40  # each later request reuses the 10 full blocks of the system prompt
    assert stats.prefix_cache_queries_total - before.prefix_cache_queries_total == sum(map(len, prompts))
    assert _ids(first + rest) == _ids(off.generate(prompts, _greedy()))
    assert off.engine.stats().prefix_cache_hits_total == 0
    assert on.engine.kv_cache_manager.usage == 0.0  # cached blocks are free, not held


def test_multi_turn_chat_reuses_the_previous_turn(engines):
    on, off = engines
    turn1 = _tokens(30, seed=2)
    reply = on.generate([turn1], _greedy(12))[0]
    turn2 = turn1 + list(reply.outputs[0].token_ids) + _tokens(6, seed=3)
    before = on.engine.stats().prefix_cache_hits_total
    second = on.generate([turn2], _greedy(12))
    # The prompt and the reply's written KV: every full block of turn 1 + reply but the last token's.
    assert on.engine.stats().prefix_cache_hits_total - before >= 40
    assert _ids(second) == _ids(off.generate([turn2], _greedy(12)))


def test_same_prompt_twice_in_one_batch_and_with_n(engines):
    on, off = engines
    prompt = _tokens(26, seed=4)
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=6, n=3, ignore_eos=True)
    a = on.generate([prompt, prompt], [_greedy(), params])
    b = off.generate([prompt, prompt], [_greedy(), params])
    assert [[list(c.token_ids) for c in o.outputs] for o in a] == [[list(c.token_ids) for c in o.outputs] for o in b]


def test_preemption_resumes_from_cached_blocks_without_leaks(tiny_llama):
    on = _llm(tiny_llama, True, kv_cache_memory=None, num_blocks=24, max_model_len=64)
    off = _llm(tiny_llama, False, kv_cache_memory=None, num_blocks=24, max_model_len=64)
    system = _tokens(16, seed=5)
    prompts = [system + _tokens(8, seed=20 + i) for i in range(6)]
    a = on.generate(prompts, _greedy(24))
    b = off.generate(prompts, _greedy(24))
    assert _ids(a) == _ids(b)
    assert on.engine.scheduler.num_preemptions_total > 0  # the cache was small enough to preempt
    assert on.engine.kv_cache_manager.usage == 0.0
    assert on.engine.kv_cache_manager.num_requests_holding_blocks() == 0


def test_prompt_logprobs_are_computed_for_every_position(engines):
    on, off = engines
    prompt = _tokens(33, seed=6)
    on.generate([prompt], _greedy(2))  # cache it
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    with_cache = on.generate([prompt], params)[0]
    without = off.generate([prompt], params)[0]
    assert len(with_cache.prompt_logprobs) == len(prompt)
    for x, y in zip(with_cache.prompt_logprobs[1:], without.prompt_logprobs[1:]):
        assert x.keys() == y.keys()


def test_siblings_sharing_prompt_blocks_sample_what_unshared_ones_do(tiny_llama):
    shared = _llm(tiny_llama, True)
    unshared = LLM(str(tiny_llama), dtype="float32", show_progress=False, enable_prefix_caching=False,
                   enable_fork_sharing=False, block_size=4, kv_cache_memory=64 * 1024**2)
    prompts = [_tokens(23, seed=8), _tokens(24, seed=9)]  # a partly filled and a full last block
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True)
    a = shared.generate(prompts, params)
    b = unshared.generate(prompts, params)
    assert [[list(c.token_ids) for c in o.outputs] for o in a] == [[list(c.token_ids) for c in o.outputs] for o in b]
    pool_a, pool_b = shared.engine.kv_cache_manager.pool, unshared.engine.kv_cache_manager.pool
    assert pool_a.peak_blocks_in_use < pool_b.peak_blocks_in_use
    assert shared.engine.kv_cache_manager.usage == 0.0
