"""Batched steps that fail without a culprit (a transient device error) fail no request.

The failure is injected into steps that move blocks (swap-out, swap-in, copy on
write, loads from the offload tier), either before the worker did anything or
after it applied the moves. The engine undoes the step, runs the suspects
alone, and every request must still give the tokens of a clean run, once,
with every device and host block free at the end.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pagoda import LLM, SamplingParams
from tests.conftest import TINY_VOCAB

_BLOCK_SIZE = 4
_BLOCK_BYTES = _BLOCK_SIZE * 512  # the tiny checkpoint, float32: K and V of 2 layers are 512 bytes per token


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _llm(tiny_llama, **kwargs) -> LLM:
    return LLM(str(tiny_llama), dtype="float32", show_progress=False, block_size=_BLOCK_SIZE, **kwargs)


def _workload() -> tuple[list[list[int]], list[SamplingParams]]:
    system = _tokens(12, seed=5)  # a shared prefix
    prompts = [system + _tokens(8 + i, seed=40 + i) for i in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True) for _ in prompts]
    params[2] = SamplingParams(temperature=0.8, seed=7, max_tokens=20, n=2, ignore_eos=True)  # copy on write
    return prompts, params


def _run(llm: LLM, prompts, params) -> dict[int, list[list[int]]]:
    engine = llm.engine
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    finished: Counter[str] = Counter()
    results = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.error is None, output.error
            if output.finished:
                finished[output.request_id] += 1
                results[output.request_id] = [list(c.token_ids) for c in output.outputs]
    assert finished == Counter({rid: 1 for rid in ids})
    return {i: results[rid] for i, rid in enumerate(ids)}


def _assert_all_free(llm: LLM) -> None:
    engine = llm.engine
    kv = engine.kv_cache_manager
    assert kv.num_free_blocks == kv.pool.num_blocks and kv.num_requests_holding_blocks() == 0
    swap = engine.swap_space
    if swap is not None:
        assert swap.num_free_blocks == swap.num_blocks and swap.num_requests == 0 and swap.num_in_flight == 0
    assert not engine.scheduler.waiting and not engine.scheduler.running and not engine._suspects


_GARBAGE = torch.Generator().manual_seed(0)


def _scribble(caches, blocks) -> None:
    """Large finite garbage into these blocks of every layer's K and V: what a copy that was cut
    short leaves behind. Any use of it as KV changes the tokens; positions masked out do not."""
    for k_cache, v_cache in caches or ():
        for cache in (k_cache, v_cache):
            for block in blocks:
                cache[block] = torch.randn(cache[block].shape, generator=_GARBAGE) * 50


def _half_done(runner, step, after_moves: bool) -> None:
    """The state a step that failed part way may leave: before the moves ran, every destination
    may hold anything; after them (and the worker's batch updates), the positions the forward
    pass was writing."""
    out = step
    if after_moves:
        runner.apply_block_copies(out)
        runner.input_batch.apply(out)
        block_size = runner.block_size
        for row in out.rows:
            table = runner.input_batch.block_table[runner.input_batch.states[row.request_id].row]
            for position in range(row.start, row.end):
                slot = position % block_size
                for k_cache, v_cache in runner.kv_caches:
                    for cache in (k_cache, v_cache):
                        cache[int(table[position // block_size]), slot] = \
                            torch.randn(cache.shape[2:], generator=_GARBAGE) * 50
        return
    _scribble(runner.kv_caches, [d for _, d in out.blocks_to_swap_in + out.blocks_to_copy + out.blocks_to_load])
    _scribble(runner.host_kv_caches, [h for _, h in out.blocks_to_swap_out])
    _scribble(runner.offload_host, [h for _, h in out.blocks_to_offload])


MOVES = ("blocks_to_swap_out", "blocks_to_swap_in", "blocks_to_copy", "blocks_to_load")


def _inject(llm: LLM, monkeypatch, after_moves: bool, targets=MOVES, per_kind: int = 3) -> Counter:
    """Fails batched steps with a kind of block move in `targets` failed fewer than `per_kind`
    times so far, never two steps in a row, leaving them half done; returns how many failed
    steps had each kind."""
    runner, executor = llm.engine.runner, llm.engine.executor
    execute = executor.execute_model
    kinds: Counter[str] = Counter()
    last_failed = [False]

    def flaky(step):
        moves = [name for name in MOVES if getattr(step, name)]
        wanted = any(kinds[name] < per_kind for name in moves if name in targets)
        if wanted and len(step.rows) > 1 and not last_failed[0]:
            last_failed[0] = True
            kinds.update(moves)
            kinds["steps"] += 1
            _half_done(runner, step, after_moves)
            raise RuntimeError("injected transient failure")
        last_failed[0] = False
        return execute(step)

    monkeypatch.setattr(executor, "execute_model", flaky)
    return kinds


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return _run(_llm(tiny_llama, kv_cache_memory=64 * 1024**2), *_workload())


@pytest.mark.parametrize("after_moves", [False, True], ids=["before-moves", "after-moves"])
@pytest.mark.parametrize("target", ["blocks_to_swap_out", "blocks_to_swap_in"])
def test_transient_failures_around_swaps_fail_no_request(tiny_llama, reference, monkeypatch, target, after_moves):
    # 24 blocks of 4 for 6 requests of up to 44 tokens: swaps are certain (test_preemption_modes.py).
    # Failing swap-outs and swap-ins apart: a victim whose swap-out failed must not be swapped in.
    llm = _llm(tiny_llama, num_blocks=24, max_model_len=64, preemption_mode="swap",
               swap_space=64 * _BLOCK_BYTES / 1024**3)
    kinds = _inject(llm, monkeypatch, after_moves, targets=[target])
    assert _run(llm, *_workload()) == reference
    assert kinds["steps"] >= 2 and kinds[target] >= 2, kinds
    _assert_all_free(llm)


def test_transient_failures_with_copy_on_write_fail_no_request(tiny_llama, reference, monkeypatch):
    llm = _llm(tiny_llama, num_blocks=24, max_model_len=64, preemption_mode="recompute")
    kinds = _inject(llm, monkeypatch, after_moves=False, targets=["blocks_to_copy"])
    assert _run(llm, *_workload()) == reference
    assert kinds["blocks_to_copy"], kinds
    _assert_all_free(llm)


PREFIX = _tokens(60, seed=1)
OTHERS = [_tokens(60, seed=10 + i) for i in range(3)]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _offload_llm(tiny_llama, **kwargs) -> LLM:
    return LLM(str(tiny_llama), dtype="float32", show_progress=False, block_size=4, max_model_len=96,
               num_blocks=24, **kwargs)


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "batched"])
def test_blocks_a_failed_step_was_loading_are_not_left_in_the_prefix_cache(tiny_llama, monkeypatch, alone):
    plain = _offload_llm(tiny_llama, enable_prefix_caching=False)
    expected = [o.outputs[0].token_ids for o in plain.generate([PREFIX + [5], [7, 8, 9]], GREEDY)]

    llm = _offload_llm(tiny_llama, kv_offload_cpu_gb=64 * 2 * 2 * 4 * 2 * 16 * 4 / 1024**3)
    llm.generate([PREFIX + [5]], GREEDY)
    for other in OTHERS:  # one by one: each evicts the last, PREFIX's blocks go to host memory
        llm.generate([other + [5]], GREEDY)
    engine = llm.engine
    execute, failures = engine.executor.execute_model, []

    def failing_load(step):
        if step.blocks_to_load and not failures:
            failures.append(len(step.blocks_to_load))
            _half_done(engine.runner, step, after_moves=False)
            raise RuntimeError("injected failure while loading")
        return execute(step)

    monkeypatch.setattr(engine.executor, "execute_model", failing_load)
    engine.add_request(PREFIX + [5], GREEDY, "prefix")
    if not alone:
        engine.add_request([7, 8, 9], GREEDY, "other")
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert failures and failures[0] >= 10  # most of PREFIX's 15 blocks were being loaded
    if alone:  # it ran alone: it was the culprit
        assert "injected failure while loading" in finals["prefix"].error
    else:  # run alone afterwards, both succeeded
        assert finals["prefix"].outputs[0].token_ids == expected[0]
        assert finals["other"].outputs[0].token_ids == expected[1]
    monkeypatch.undo()
    # The blocks the failed step registered but never filled must not be hit: same tokens as a clean run.
    [again] = llm.generate([PREFIX + [5]], GREEDY)
    assert again.outputs[0].token_ids == expected[0] and again.num_cached_tokens == 60
    assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.pool.num_blocks

