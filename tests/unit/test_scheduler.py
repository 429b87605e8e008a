"""Unit tests for pagoda.core.scheduler, with the model simulated by a callback.

Every test drives `Scheduler.schedule()` / `update_from_output()` the way the
engine does, handing back a sampled token for every chunk whose `.samples` is
True, and checks the scheduler's invariants after every step.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable
from typing import NamedTuple

import pytest

from pagoda.config import SchedulerConfig
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.scheduler import RequestUpdate, Scheduler
from pagoda.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagoda.request import Request, RequestStatus
from pagoda.sampling_params import SamplingParams

EOS = 0
FILLER = 7  # a token that ends nothing


# --------------------------------------------------------------------------- helpers


def make_scheduler(
    *, num_blocks: int, block_size: int, budget: int, max_seqs: int = 256, max_model_len: int = 100_000,
    prefix_caching: bool = True,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs),
        KVCacheManager(num_blocks, block_size, prefix_caching),
        max_model_len,
    )


def make_request(rid: str, num_prompt: int, **params) -> Request:
    params.setdefault("max_tokens", 4)
    # Prompt ids never include the EOS id. Each request id gets its own sequence, so
    # requests share no prefix-cache blocks unless a test says so.
    prompt = [1000 + zlib.crc32(rid.encode()) % 10**6] + [1 + (i % 50) for i in range(num_prompt - 1)]
    return Request(rid, prompt, SamplingParams(**params), eos_token_ids=frozenset({EOS}))


TokenFn = Callable[[Request], int]


class Chunk(NamedTuple):
    request_id: str
    start: int
    end: int
    samples: bool


def check_invariants(sched: Scheduler) -> None:
    kv = sched.kv_cache
    bs = kv.block_size
    waiting_ids = [r.request_id for r in sched.waiting]
    running_ids = [r.request_id for r in sched.running]
    assert len(set(waiting_ids)) == len(waiting_ids)
    assert len(set(running_ids)) == len(running_ids)
    assert not set(waiting_ids) & set(running_ids), "a request is both waiting and running"
    assert len(sched.running) <= sched.config.max_num_seqs
    for r in sched.waiting:
        assert kv.block_table(r.request_id) == [], f"waiting {r.request_id} holds blocks"
        assert not r.is_finished
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING
        assert len(kv.block_table(r.request_id)) == math.ceil(r.num_computed_tokens / bs), r.request_id
        assert r.num_computed_tokens < r.num_tokens
    held = [b for r in sched.running for b in kv.block_table(r.request_id)]
    for block in set(held):
        # Shared only through the prefix cache, and every holder holds one reference.
        assert kv.pool.ref_count(block) == held.count(block)
        assert held.count(block) == 1 or kv.pool.block_hash(block) is not None
    assert len(set(held)) + kv.num_free_blocks == kv.pool.num_blocks


def step(sched: Scheduler, token_fn: TokenFn = lambda r: FILLER) -> tuple[SchedulerOutput, list[RequestUpdate]]:
    """One engine step: schedule, check the plan, 'run the model', feed results back."""
    before = {id(r): r.num_computed_tokens for r in sched.running}
    out = sched.schedule()
    kv = sched.kv_cache
    ids = [s.request_id for s in out.scheduled]
    assert len(ids) == len(set(ids)), "a request was scheduled twice in one step"
    assert out.total_num_tokens <= sched.config.max_num_batched_tokens
    assert len(sched.running) <= sched.config.max_num_seqs
    for s in out.scheduled:
        assert s.num_new_tokens >= 1
        assert s.start == s.request.num_computed_tokens
        assert s.end <= s.request.num_tokens
        assert s.request in sched.running
        # The chunk's tokens have slots: its block table covers position end-1.
        assert len(s.block_table) * kv.block_size >= s.end
        assert s.block_table == kv.block_table(s.request_id)
        if id(s.request) in before:
            assert s.start == before[id(s.request)]
    # `ScheduledRequest.samples` reads the live request, so snapshot the plan before the update.
    out.plan = [Chunk(s.request_id, s.start, s.end, s.samples) for s in out.scheduled]  # type: ignore[attr-defined]
    tokens = {s.request_id: token_fn(s.request) for s in out.scheduled if s.samples}
    updates = sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids=tokens))
    check_invariants(sched)
    return out, updates


def run_to_completion(
    sched: Scheduler, token_fn: TokenFn = lambda r: FILLER, max_steps: int = 10_000
) -> list[SchedulerOutput]:
    outs = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return outs
        out, _ = step(sched, token_fn)
        assert not out.is_empty, "deadlock: unfinished requests but nothing scheduled"
        outs.append(out)
    raise AssertionError("requests did not finish (livelock?)")


def chunks_of(outs: list[SchedulerOutput], rid: str) -> list[int]:
    return [s.num_new_tokens for o in outs for s in o.scheduled if s.request_id == rid]


# --------------------------------------------------------------------------- budget & chunking


def test_long_prompt_is_chunked_by_the_token_budget() -> None:
    sched = make_scheduler(num_blocks=64, block_size=4, budget=16)
    r = make_request("a", 100, max_tokens=3)
    sched.add_request(r)
    outs = run_to_completion(sched)
    chunks = chunks_of(outs, "a")
    assert chunks == [16] * 6 + [4] + [1, 1]
    assert sum(chunks[:7]) == 100
    samples = [c.samples for o in outs for c in o.plan]
    assert samples == [False] * 6 + [True] * 3
    assert r.num_output_tokens == 3
    assert r.status == RequestStatus.FINISHED_LENGTH
    assert sched.kv_cache.num_free_blocks == 64


def test_prefill_chunk_starts_where_previous_ended() -> None:
    sched = make_scheduler(num_blocks=64, block_size=4, budget=7)
    r = make_request("a", 20, max_tokens=1)
    sched.add_request(r)
    outs = run_to_completion(sched)
    starts = [(s.start, s.end) for o in outs for s in o.scheduled]
    assert starts == [(0, 7), (7, 14), (14, 20)]


def test_decodes_and_prefill_chunk_share_a_step() -> None:
    sched = make_scheduler(num_blocks=64, block_size=4, budget=16)
    a = make_request("a", 5, max_tokens=10)
    b = make_request("b", 6, max_tokens=10)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)  # both prefills in one step (5 + 6 <= 16)
    assert a.num_output_tokens == 1 and b.num_output_tokens == 1
    c = make_request("c", 40, max_tokens=2)
    sched.add_request(c)
    out, _ = step(sched)
    plan = {c.request_id: (c.end - c.start, c.samples) for c in out.plan}
    # Running requests first (one decode token each), then the new prompt fills the budget.
    assert [s.request_id for s in out.scheduled] == ["a", "b", "c"]
    assert plan == {"a": (1, True), "b": (1, True), "c": (14, False)}
    assert out.total_num_tokens == 16
    out, _ = step(sched)
    plan = {s.request_id: (s.start, s.num_new_tokens) for s in out.scheduled}
    assert plan == {"a": (6, 1), "b": (7, 1), "c": (14, 14)}


def test_token_budget_respected_every_step_under_load() -> None:
    rng = random.Random(1)
    sched = make_scheduler(num_blocks=200, block_size=8, budget=24, max_seqs=6)
    reqs = [make_request(f"r{i}", rng.randint(1, 60), max_tokens=rng.randint(1, 12)) for i in range(20)]
    for r in reqs:
        sched.add_request(r)
    outs = run_to_completion(sched)
    assert all(o.total_num_tokens <= 24 for o in outs)
    # The budget is fully used while there is enough prefill work to fill it.
    assert outs[0].total_num_tokens == 24
    for r in reqs:
        assert r.num_output_tokens == r.sampling_params.max_tokens
        # Prompt chunks sum to the prompt; then one token per decode step.
        chunks = chunks_of(outs, r.request_id)
        assert sum(chunks) == r.num_prompt_tokens + r.num_output_tokens - 1
    assert sched.kv_cache.num_free_blocks == 200


# --------------------------------------------------------------------------- admission


def test_fcfs_admission_order() -> None:
    sched = make_scheduler(num_blocks=64, block_size=4, budget=1000, max_seqs=2)
    reqs = [make_request(f"r{i}", 3, max_tokens=2 + i) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    out, _ = step(sched)
    assert [s.request_id for s in out.scheduled] == ["r0", "r1"]
    assert [r.request_id for r in sched.waiting] == ["r2", "r3"]
    admitted_at: dict[str, int] = {}
    for n in range(1, 50):
        if not sched.has_unfinished():
            break
        out, _ = step(sched)
        for s in out.scheduled:
            admitted_at.setdefault(s.request_id, n)
    assert admitted_at["r2"] <= admitted_at["r3"]
    assert all(r.num_output_tokens == r.sampling_params.max_tokens for r in reqs)


def test_head_of_line_request_blocks_later_ones_fcfs() -> None:
    """A later, smaller request is not admitted ahead of an earlier one that does not fit."""
    sched = make_scheduler(num_blocks=4, block_size=4, budget=1000)
    a = make_request("a", 8, max_tokens=2)  # 2 blocks, 3 with its first decode
    big = make_request("big", 12, max_tokens=1)  # 3 blocks
    small = make_request("small", 2, max_tokens=1)  # 1 block
    for r in (a, big, small):
        sched.add_request(r)
    out, _ = step(sched)
    assert [s.request_id for s in out.scheduled] == ["a"]
    assert [r.request_id for r in sched.waiting] == ["big", "small"]
    assert small.status == RequestStatus.WAITING


def test_max_num_seqs_respected() -> None:
    sched = make_scheduler(num_blocks=500, block_size=4, budget=10_000, max_seqs=3)
    reqs = [make_request(f"r{i}", 4, max_tokens=3) for i in range(8)]
    for r in reqs:
        sched.add_request(r)
    outs = run_to_completion(sched)
    assert max(len(o.scheduled) for o in outs) == 3
    assert all(len(o.scheduled) <= 3 for o in outs)
    assert all(r.num_output_tokens == 3 for r in reqs)


def test_continuous_batching_admits_as_soon_as_blocks_are_freed() -> None:
    sched = make_scheduler(num_blocks=3, block_size=4, budget=1000)
    a = make_request("a", 7, max_tokens=2)  # 2 blocks; its second token needs no new block
    b = make_request("b", 9, max_tokens=1)  # 3 blocks: cannot run next to a
    sched.add_request(a)
    sched.add_request(b)
    out, _ = step(sched)
    assert [s.request_id for s in out.scheduled] == ["a"]
    out, updates = step(sched)
    assert [s.request_id for s in out.scheduled] == ["a"]
    assert updates[0].finished and a.status == RequestStatus.FINISHED_LENGTH
    assert sched.kv_cache.num_free_blocks == 3
    # The very next step admits b.
    out, _ = step(sched)
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("b", 9)]
    assert b.first_scheduled_time is not None


def test_continuous_batching_joins_a_running_batch() -> None:
    sched = make_scheduler(num_blocks=100, block_size=4, budget=1000, max_seqs=2)
    long = make_request("long", 4, max_tokens=10)
    short = make_request("short", 4, max_tokens=2)
    late = make_request("late", 4, max_tokens=2)
    for r in (long, short, late):
        sched.add_request(r)
    step(sched)
    out, updates = step(sched)  # short finishes here
    assert {u.request.request_id: u.finished for u in updates} == {"long": False, "short": True}
    out, _ = step(sched)
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("long", 1), ("late", 4)]


# --------------------------------------------------------------------------- preemption


def _preemption_setup() -> tuple[Scheduler, list[Request]]:
    # 6 blocks of 4. a, b, c take 2 blocks each for 8-token prompts; each first
    # decode needs a third block, so the pool runs dry on the next step.
    sched = make_scheduler(num_blocks=6, block_size=4, budget=1000)
    reqs = [make_request(rid, 8, max_tokens=6) for rid in ("a", "b", "c")]
    reqs.append(make_request("d", 4, max_tokens=2))  # waits: no block left
    for r in reqs:
        sched.add_request(r)
    return sched, reqs


def test_youngest_running_request_is_preempted_to_front_of_waiting() -> None:
    sched, (a, b, c, d) = _preemption_setup()
    out, _ = step(sched)
    assert [s.request_id for s in out.scheduled] == ["a", "b", "c"]
    assert [r.request_id for r in sched.waiting] == ["d"]
    assert sched.kv_cache.num_free_blocks == 0
    c_output = list(c.output_token_ids)
    assert len(c_output) == 1

    out, _ = step(sched)
    assert out.num_preempted == 1
    assert [s.request_id for s in out.scheduled] == ["a", "b"]
    assert c.status == RequestStatus.PREEMPTED
    assert c.num_computed_tokens == 0
    assert c.num_preemptions == 1
    assert sched.num_preemptions_total == 1
    assert sched.stats().num_preemptions_total == 1
    assert sched.kv_cache.block_table("c") == []
    assert [r.request_id for r in sched.waiting] == ["c", "d"], "preempted request must go to the front"
    assert c not in sched.running
    # Its generated tokens are kept and recomputed with the prompt.
    assert c.output_token_ids == c_output
    assert c.num_tokens == 9
    # No admission in a step that preempted.
    assert d.status == RequestStatus.WAITING


def test_preempted_request_recomputes_prompt_and_output_then_samples() -> None:
    sched, (a, b, c, d) = _preemption_setup()
    outs = run_to_completion(sched)
    c_chunks = [(c.start, c.end, c.samples) for o in outs for c in o.plan if c.request_id == "c"]
    # First prefill, then (after preemption) a recompute from 0 that covers the output so far.
    assert c_chunks[0] == (0, 8, True)
    recompute = [ch for ch in c_chunks[1:] if ch[0] == 0]
    assert recompute, c_chunks
    assert recompute[0][1] > 8 and recompute[0][2]
    for r in (a, b, c, d):
        assert r.num_output_tokens == r.sampling_params.max_tokens
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.num_tokens == r.num_prompt_tokens + r.sampling_params.max_tokens
    assert sched.num_preemptions_total >= 1
    assert sched.kv_cache.num_free_blocks == 6
    assert not sched.waiting and not sched.running


def test_two_preemptions_in_one_step_keep_arrival_order_in_waiting() -> None:
    # 3 blocks of 4; a, b, c hold one block each and all need a second one next step.
    sched = make_scheduler(num_blocks=3, block_size=4, budget=100)
    a, b, c = (make_request(rid, 4, max_tokens=3) for rid in "abc")
    for r in (a, b, c):
        sched.add_request(r)
    out, _ = step(sched)
    assert [s.request_id for s in out.scheduled] == ["a", "b", "c"]
    assert sched.kv_cache.num_free_blocks == 0
    # a preempts c (the youngest); b then finds no block and, now the youngest, preempts itself.
    out, _ = step(sched)
    assert out.num_preempted == 2
    assert [s.request_id for s in out.scheduled] == ["a"]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert [r.status for r in (b, c)] == [RequestStatus.PREEMPTED] * 2
    assert sched.num_preemptions_total == 2
    run_to_completion(sched)
    assert [r.num_output_tokens for r in (a, b, c)] == [3, 3, 3]
    assert sched.kv_cache.num_free_blocks == 3


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_under_block_pressure_finishes(seed: int) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    num_blocks = rng.randint(6, 20)
    capacity = num_blocks * block_size
    sched = make_scheduler(
        num_blocks=num_blocks,
        block_size=block_size,
        budget=rng.randint(1, 40),
        max_seqs=rng.randint(1, 8),
        max_model_len=capacity,
    )
    reqs = []
    pending = []
    for i in range(rng.randint(5, 15)):
        prompt = rng.randint(1, capacity // 2)
        max_tokens = rng.randint(1, capacity - prompt)
        pending.append(make_request(f"r{i}", prompt, max_tokens=max_tokens))
    for n in range(20_000):
        # Requests keep arriving while others run.
        while pending and rng.random() < 0.3:
            r = pending.pop(0)
            sched.add_request(r)
            reqs.append(r)
        if not sched.has_unfinished():
            if not pending:
                break
            continue
        out, _ = step(sched)
        assert not out.is_empty, "deadlock"
    else:
        raise AssertionError("did not finish")
    for r in reqs:
        assert r.num_output_tokens == r.sampling_params.max_tokens, r.request_id
        assert r.status == RequestStatus.FINISHED_LENGTH
    assert sched.kv_cache.num_free_blocks == num_blocks
    assert sched.kv_cache.num_requests_holding_blocks() == 0


# --------------------------------------------------------------------------- abort


def test_abort_waiting_request() -> None:
    sched = make_scheduler(num_blocks=2, block_size=4, budget=100)
    a = make_request("a", 8, max_tokens=1)
    b = make_request("b", 4, max_tokens=1)
    sched.add_request(a)
    sched.add_request(b)
    step_out = sched.schedule()
    assert [s.request_id for s in step_out.scheduled] == ["a"]
    aborted = sched.abort_requests(["b", "nonexistent"])
    assert aborted == [b]
    assert b.status == RequestStatus.FINISHED_ABORTED
    assert b.status.finish_reason == "abort"
    assert b not in sched.waiting
    assert sched.kv_cache.num_free_blocks == 0  # a still holds its 2 blocks


def test_abort_running_request_frees_its_blocks() -> None:
    sched = make_scheduler(num_blocks=10, block_size=4, budget=100)
    a = make_request("a", 8, max_tokens=5)
    b = make_request("b", 5, max_tokens=5)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    assert sched.kv_cache.num_free_blocks == 10 - 2 - 2
    sched.abort_requests(["a"])
    assert a.status == RequestStatus.FINISHED_ABORTED
    assert a not in sched.running
    assert sched.kv_cache.block_table("a") == []
    assert sched.kv_cache.num_free_blocks == 10 - 2
    check_invariants(sched)
    run_to_completion(sched)
    assert b.num_output_tokens == 5
    assert sched.kv_cache.num_free_blocks == 10


def test_abort_while_step_in_flight_is_ignored_by_update() -> None:
    sched = make_scheduler(num_blocks=10, block_size=4, budget=100)
    a = make_request("a", 6, max_tokens=5)
    sched.add_request(a)
    out = sched.schedule()
    sched.abort_requests(["a"])
    assert sched.kv_cache.num_free_blocks == 10
    updates = sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"a": FILLER}))
    assert updates == []
    assert a.output_token_ids == []
    assert a.status == RequestStatus.FINISHED_ABORTED
    assert not sched.has_unfinished()


def test_abort_preempted_request() -> None:
    sched, (a, b, c, d) = _preemption_setup()
    step(sched)
    step(sched)
    assert c.status == RequestStatus.PREEMPTED
    sched.abort_requests(["c"])
    assert c not in sched.waiting
    assert c.status == RequestStatus.FINISHED_ABORTED
    run_to_completion(sched)
    assert sched.kv_cache.num_free_blocks == 6


def test_duplicate_request_id_rejected() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, budget=100)
    sched.add_request(make_request("a", 3))
    with pytest.raises(ValueError, match="'a'"):
        sched.add_request(make_request("a", 3))


# --------------------------------------------------------------------------- finishing


def _run_with_tokens(req: Request, tokens: list[int], **sched_kw) -> list[RequestUpdate]:
    sched = make_scheduler(num_blocks=sched_kw.pop("num_blocks", 32), block_size=4, budget=100, **sched_kw)
    sched.add_request(req)
    it = iter(tokens)
    updates = []
    for _ in range(len(tokens) + 5):
        if not sched.has_unfinished():
            break
        _, ups = step(sched, lambda r: next(it))
        updates.extend(ups)
    assert not sched.has_unfinished()
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.pool.num_blocks
    return updates


def test_finish_on_eos() -> None:
    r = make_request("a", 3, max_tokens=10)
    updates = _run_with_tokens(r, [5, 6, EOS, 9])
    assert r.output_token_ids == [5, 6, EOS]
    assert r.status == RequestStatus.FINISHED_STOPPED
    assert r.status.finish_reason == "stop"
    assert [u.finished for u in updates] == [False, False, True]
    assert [u.new_token_ids for u in updates] == [[5], [6], [EOS]]


def test_eos_ignored_before_min_tokens() -> None:
    r = make_request("a", 3, max_tokens=10, min_tokens=3)
    _run_with_tokens(r, [EOS, EOS, 5, EOS, 8])
    assert r.output_token_ids == [EOS, EOS, 5, EOS]
    assert r.status == RequestStatus.FINISHED_STOPPED


def test_eos_at_exactly_min_tokens_stops() -> None:
    r = make_request("a", 3, max_tokens=10, min_tokens=2)
    _run_with_tokens(r, [EOS, EOS, 5])
    assert r.output_token_ids == [EOS, EOS]
    assert r.status == RequestStatus.FINISHED_STOPPED


def test_ignore_eos() -> None:
    r = make_request("a", 3, max_tokens=4, ignore_eos=True)
    _run_with_tokens(r, [EOS] * 4)
    assert r.output_token_ids == [EOS] * 4
    assert r.status == RequestStatus.FINISHED_LENGTH


def test_finish_on_stop_token_ids() -> None:
    r = make_request("a", 3, max_tokens=10, stop_token_ids=[42, 43])
    _run_with_tokens(r, [5, 43, 9])
    assert r.output_token_ids == [5, 43]
    assert r.status == RequestStatus.FINISHED_STOPPED
    assert r.stop_reason == 43


def test_stop_token_ids_respect_min_tokens() -> None:
    r = make_request("a", 3, max_tokens=10, min_tokens=2, stop_token_ids=[42])
    _run_with_tokens(r, [42, 42, 9])
    assert r.output_token_ids == [42, 42]
    assert r.stop_reason == 42


def test_finish_on_max_tokens() -> None:
    r = make_request("a", 3, max_tokens=3)
    updates = _run_with_tokens(r, [5, 6, 7, 8])
    assert r.output_token_ids == [5, 6, 7]
    assert r.status == RequestStatus.FINISHED_LENGTH
    assert r.status.finish_reason == "length"
    assert r.stop_reason is None
    assert updates[-1].finished


def test_finish_on_max_model_len() -> None:
    r = make_request("a", 6, max_tokens=None)
    _run_with_tokens(r, [5] * 20, max_model_len=10)
    assert r.num_tokens == 10
    assert r.num_output_tokens == 4
    assert r.status == RequestStatus.FINISHED_LENGTH


def test_finish_request_from_outside_frees_blocks() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4, budget=100)
    r = make_request("a", 6, max_tokens=10)
    sched.add_request(r)
    step(sched)
    assert sched.kv_cache.num_free_blocks < 8
    sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert r.status == RequestStatus.FINISHED_STOPPED
    assert sched.kv_cache.num_free_blocks == 8
    assert not sched.has_unfinished()


def test_all_blocks_free_after_mixed_finishes() -> None:
    sched = make_scheduler(num_blocks=12, block_size=4, budget=10, max_seqs=3)
    reqs = [
        make_request("eos", 5, max_tokens=20),
        make_request("stop", 9, max_tokens=20, stop_token_ids=[99]),
        make_request("len", 3, max_tokens=4),
        make_request("long", 20, max_tokens=6),
    ]
    for r in reqs:
        sched.add_request(r)
    counts: dict[str, int] = {}

    def token_fn(r: Request) -> int:
        counts[r.request_id] = counts.get(r.request_id, 0) + 1
        n = counts[r.request_id]
        if r.request_id == "eos" and n == 3:
            return EOS
        if r.request_id == "stop" and n == 2:
            return 99
        return FILLER

    run_to_completion(sched, token_fn)
    assert [r.status for r in reqs] == [
        RequestStatus.FINISHED_STOPPED,
        RequestStatus.FINISHED_STOPPED,
        RequestStatus.FINISHED_LENGTH,
        RequestStatus.FINISHED_LENGTH,
    ]
    assert [r.num_output_tokens for r in reqs] == [3, 2, 4, 6]
    assert sched.kv_cache.num_free_blocks == 12
    assert sched.kv_cache.usage == 0.0
    assert sched.stats().num_running == 0 and sched.stats().num_waiting == 0
