"""Preemption by swap end to end on a tiny model: a cache small enough to preempt, the
same greedy tokens as an unpreempted run and as recompute, every request finished
once, and every device and host block free at the end."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch

from pagoda import LLM, SamplingParams
from tests.conftest import TINY_VOCAB

# The tiny checkpoint: 2 layers x 2 KV heads x head_dim 16, float32, K and V = 512 bytes per token.
_BLOCK_SIZE = 4
_BLOCK_BYTES = _BLOCK_SIZE * 512


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _llm(tiny_llama, **kwargs) -> LLM:
    return LLM(str(tiny_llama), dtype="float32", show_progress=False, block_size=_BLOCK_SIZE, **kwargs)


def _small(tiny_llama, mode: str, host_blocks: int = 0) -> LLM:
    # 24 blocks of 4 = 96 tokens for 6 requests of up to 48 tokens each: preemptions are certain.
    return _llm(tiny_llama, num_blocks=24, max_model_len=64, preemption_mode=mode,
                swap_space=host_blocks * _BLOCK_BYTES / 1024**3)


def _workload() -> tuple[list[list[int]], list[SamplingParams]]:
    system = _tokens(12, seed=5)  # a shared prefix: swapped blocks are also prefix-cache blocks
    prompts = [system + _tokens(8 + i, seed=40 + i) for i in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True) for _ in prompts]
    params[2] = SamplingParams(temperature=0.8, seed=7, max_tokens=20, n=2, ignore_eos=True)  # siblings share blocks
    return prompts, params


def _run(llm: LLM, prompts, params) -> dict[str, list[list[int]]]:
    """Steps the engine by hand; checks that every request finishes exactly once."""
    engine = llm.engine
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    finished: Counter[str] = Counter()
    results = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] += 1
                results[output.request_id] = [list(c.token_ids) for c in output.outputs]
    assert finished == Counter({rid: 1 for rid in ids})
    for rid, sp in zip(ids, params):
        assert [len(t) for t in results[rid]] == [sp.max_tokens] * sp.n
    return {str(i): results[rid] for i, rid in enumerate(ids)}


def _assert_all_free(llm: LLM) -> None:
    engine = llm.engine
    kv = engine.kv_cache_manager
    assert kv.num_free_blocks == kv.pool.num_blocks and kv.num_requests_holding_blocks() == 0
    swap = engine.swap_space
    if swap is not None:
        assert swap.num_free_blocks == swap.num_blocks and swap.num_requests == 0 and swap.num_in_flight == 0
    assert not engine.scheduler.waiting and not engine.scheduler.running


@pytest.fixture(scope="module")
def reference(tiny_llama):
    llm = _llm(tiny_llama, kv_cache_memory=64 * 1024**2)
    prompts, params = _workload()
    result = _run(llm, prompts, params)
    assert llm.engine.stats().num_preemptions_total == 0
    return result


def test_swap_gives_the_same_tokens_as_no_preemption_and_as_recompute(tiny_llama, reference):
    prompts, params = _workload()
    swap = _small(tiny_llama, "swap", host_blocks=64)
    assert swap.engine.swap_space.num_blocks == 64
    assert len(swap.engine.host_kv_caches) == 2 and swap.engine.host_kv_caches[0][0].shape == (64, 4, 2, 16)
    swapped = _run(swap, prompts, params)
    stats = swap.engine.stats()
    assert stats.num_swapped_out_total > 0, "the cache was meant to be small enough to swap"
    assert stats.num_swapped_in_total == stats.num_swapped_out_total
    assert stats.num_blocks_swapped_in_total == stats.num_blocks_swapped_out_total
    assert swap.engine.swap_space.pool.peak_blocks_in_use <= 64
    assert swapped == reference
    _assert_all_free(swap)

    recompute = _small(tiny_llama, "recompute")
    assert recompute.engine.swap_space is None and recompute.engine.host_kv_caches is None
    assert _run(recompute, prompts, params) == reference
    assert recompute.engine.stats().num_preemptions_total > 0
    assert recompute.engine.stats().num_swapped_out_total == 0
    _assert_all_free(recompute)


def test_a_small_swap_space_mixes_swap_and_recompute(tiny_llama, reference):
    prompts, params = _workload()
    llm = _small(tiny_llama, "swap", host_blocks=7)
    assert _run(llm, prompts, params) == reference
    stats = llm.engine.stats()
    assert stats.num_swapped_out_total > 0
    assert stats.num_preemptions_total > stats.num_swapped_out_total  # some fell back to recompute
    assert stats.num_tokens_dropped_total > 0
    assert llm.engine.swap_space.pool.peak_blocks_in_use <= 7
    _assert_all_free(llm)


def test_no_swap_space_falls_back_to_recompute_with_a_warning(tiny_llama, caplog):
    with caplog.at_level(logging.WARNING, logger="pagoda.engine.llm_engine"):
        llm = _llm(tiny_llama, num_blocks=24, max_model_len=64, preemption_mode="swap", swap_space=0)
    assert "every preemption will recompute" in caplog.text
    assert llm.engine.swap_space is None
    prompts, params = _workload()
    _run(llm, prompts[:4], params[:4])
    assert llm.engine.stats().num_preemptions_total > 0 and llm.engine.stats().num_swapped_out_total == 0
    _assert_all_free(llm)


def test_abort_of_a_swapped_request_frees_its_host_blocks(tiny_llama):
    llm = _small(tiny_llama, "swap", host_blocks=64)
    engine = llm.engine
    prompts, _ = _workload()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    while engine.swap_space.num_requests == 0:
        engine.step()
    swapped = next(rid for rid in ids if engine.swap_space.holds(rid))
    engine.abort_request(swapped)
    assert not engine.swap_space.holds(swapped)
    while engine.has_unfinished_requests():
        engine.step()
    _assert_all_free(llm)
