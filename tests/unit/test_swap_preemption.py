"""Preemption by swap (pure bookkeeping, and the worker's block moves on small tensors).

The scheduler tests run a stand-in worker whose "KV" is the token id
written in each slot: it applies every step's swap-outs, swap-ins and
copies in the real worker's order, writes the scheduled tokens, and checks
that every scheduled request then reads exactly its own tokens at every
position. Any ordering mistake (a block reused before it is read, a host
block overwritten before a swap-in reads it) shows up as a wrong token.
"""

from __future__ import annotations

import math
import random
import zlib
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pagoda.config import CacheConfig, ConfigError, SchedulerConfig
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.scheduler import Scheduler
from pagoda.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagoda.core.block_pool import HostBlockPool
from pagoda.core.swap_space import SwapSpace
from pagoda.core.worker_step import WorkerStep
from pagoda.request import Request, RequestStatus
from pagoda.sampling_params import SamplingParams
from pagoda.worker.kv_cache import allocate_host_kv_caches, move_blocks
from pagoda.worker.model_runner import ModelRunner
from tests.unit.test_prefix_cache import assert_invariants
from tests.unit.test_scheduler import make_request

# --------------------------------------------------------------------------- helpers


def _scheduler(num_blocks: int, host_blocks: int, block_size: int = 4, budget: int = 1000, max_seqs: int = 256,
               policy: str = "fcfs", mode: str = "swap", prefix_caching: bool = True,
               max_model_len: int = 100_000) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, prefix_caching)
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, policy=policy,
                             preemption_mode=mode)
    return Scheduler(config, kv, max_model_len, SwapSpace(kv, host_blocks))


def _token(request: Request) -> int:
    """The 'model': a token that depends only on the request and its length (never EOS 0)."""
    return 1 + zlib.crc32(f"{request.request_id}:{request.num_tokens}".encode()) % 50


class FakeWorker:
    """Token ids stand in for K/V. Applies a step like ModelRunner.execute: swap-outs, swap-ins
    (each batched: every read before any write), copies in order, then the forward pass."""

    def __init__(self, sched: Scheduler):
        bs = sched.kv_cache.block_size
        self.bs = bs
        self.device = [[None] * bs for _ in range(sched.kv_cache.pool.num_blocks)]
        self.host = [[None] * bs for _ in range(sched.swap_space.num_blocks)]

    def run(self, out: SchedulerOutput) -> None:
        host_targets = [h for _, h in out.blocks_to_swap_out]
        device_targets = [d for _, d in out.blocks_to_swap_in]
        assert len(set(host_targets)) == len(host_targets)
        assert len(set(device_targets)) == len(device_targets)
        # The host-reuse rule: no swap-out writes a host block a swap-in of the same step reads.
        assert not set(host_targets) & {h for h, _ in out.blocks_to_swap_in}
        data = [list(self.device[d]) for d, _ in out.blocks_to_swap_out]
        for h, block in zip(host_targets, data):
            self.host[h] = block
        data = [list(self.host[h]) for h, _ in out.blocks_to_swap_in]
        for d, block in zip(device_targets, data):
            self.device[d] = block
        for source, target in out.blocks_to_copy:
            self.device[target] = list(self.device[source])
        bs = self.bs
        for item in out.scheduled:
            for pos in range(item.start, item.end):
                self.device[item.block_table[pos // bs]][pos % bs] = item.request.all_token_ids[pos]
        for item in out.scheduled:  # attention reads every position up to the chunk's end
            seen = [self.device[item.block_table[pos // bs]][pos % bs] for pos in range(item.end)]
            assert seen == item.request.all_token_ids[: item.end], f"{item.request_id} reads wrong KV"


def check_invariants(sched: Scheduler) -> None:
    """Between steps: exact device ref counts, host blocks only for swapped requests, nothing lost."""
    kv, swap = sched.kv_cache, sched.swap_space
    bs = kv.block_size
    holders: Counter[int] = Counter()
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING and not swap.holds(r.request_id)
        table = kv.block_table(r.request_id)
        assert len(table) == math.ceil(r.num_computed_tokens / bs)
        holders.update(table)
    swapped = 0
    host_held: list[int] = []
    for r in sched.waiting:
        assert kv.block_table(r.request_id) == [], f"waiting {r.request_id} holds device blocks"
        if r.status == RequestStatus.SWAPPED:
            swapped += 1
            host = swap.host_table(r.request_id)
            assert len(host) == math.ceil(r.num_computed_tokens / bs) > 0
            host_held += host
        else:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert not swap.holds(r.request_id) and r.num_computed_tokens == 0
    for block in range(kv.pool.num_blocks):
        assert kv.pool.ref_count(block) == holders[block]
    assert len(holders) + kv.num_free_blocks == kv.pool.num_blocks
    assert_invariants(kv.pool)
    assert swap.num_requests == swapped
    assert len(set(host_held)) == len(host_held)
    assert swap.num_in_flight == 0  # released when the step came back
    assert len(host_held) + swap.num_free_blocks == swap.num_blocks


def step(sched: Scheduler, worker: FakeWorker) -> tuple[SchedulerOutput, list]:
    free_before = {b for b in range(sched.kv_cache.pool.num_blocks) if sched.kv_cache.pool.ref_count(b) == 0}
    out = sched.schedule()
    # No swap-in after a preemption in the step: its destinations were free when the step began.
    assert all(d in free_before for _, d in out.blocks_to_swap_in)
    assert not (out.blocks_to_swap_in and out.num_preempted and sched.config.policy == "fcfs")
    assert out.total_num_tokens <= sched.config.max_num_batched_tokens
    out.plan = [(s.request_id, s.start, s.end) for s in out.scheduled]  # type: ignore[attr-defined]
    worker.run(out)
    tokens = {s.request_id: _token(s.request) for s in out.scheduled if s.samples}
    updates = sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids=tokens))
    check_invariants(sched)
    return out, updates


def run(sched: Scheduler, requests: list[Request], arrivals: random.Random | None = None,
        max_steps: int = 20_000) -> list[SchedulerOutput]:
    """Runs requests to completion (all added at once, or arriving at random steps with `arrivals`)
    and checks that each finished exactly once and that every block, device and host, is free."""
    worker = FakeWorker(sched)
    pending = list(requests)
    outs, finished = [], Counter()
    for _ in range(max_steps):
        while pending and (arrivals is None or arrivals.random() < 0.3 or not sched.has_unfinished()):
            # A sibling arrives with the request it forks.
            sched.add_request(pending.pop(0))
            while pending and pending[0].fork_of is not None:
                sched.add_request(pending.pop(0))
        if not sched.has_unfinished():
            break
        out, updates = step(sched, worker)
        assert not out.is_empty, "deadlock"
        outs.append(out)
        finished.update(u.request.request_id for u in updates if u.finished)
    else:
        raise AssertionError("did not finish")
    assert finished == Counter({r.request_id: 1 for r in requests}), "a request finished twice or never"
    for r in requests:
        assert r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == r.sampling_params.max_tokens
    kv = sched.kv_cache
    assert kv.num_free_blocks == kv.pool.num_blocks and kv.num_requests_holding_blocks() == 0
    assert sched.swap_space.num_free_blocks == sched.swap_space.num_blocks and sched.swap_space.num_requests == 0
    return outs


def _three_then_one(sched: Scheduler) -> list[Request]:
    """6 blocks of 4: a, b, c take 2 blocks each for 8-token prompts; each first decode
    needs a third block, so the next step preempts c. d (4 tokens) waits."""
    reqs = [make_request(rid, 8, max_tokens=6) for rid in ("a", "b", "c")]
    reqs.append(make_request("d", 4, max_tokens=2))
    for r in reqs:
        sched.add_request(r)
    return reqs


# --------------------------------------------------------------------------- swap space bookkeeping


def test_swap_out_and_in_account_for_every_block():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    swap = SwapSpace(kv, num_blocks=5)
    assert kv.allocate_slots("a", 10)  # blocks 0, 1, 2
    assert kv.allocate_slots("b", 4)  # block 3
    assert swap.can_swap_out("a") and not swap.can_swap_out("nobody")
    pairs = swap.swap_out("a")
    assert pairs == [(0, 0), (1, 1), (2, 2)]  # table order
    assert kv.block_table("a") == [] and swap.host_table("a") == [0, 1, 2]
    assert kv.num_free_blocks == 8 - 1 and swap.num_free_blocks == 2 and swap.usage == pytest.approx(3 / 5)
    # Back in, with room for one more token: 11 tokens = 3 blocks.
    back = swap.swap_in("a", 11)
    assert [h for h, _ in back] == [0, 1, 2] and [d for _, d in back] == kv.block_table("a")
    assert len(set(kv.block_table("a")) & {3}) == 0 and kv.num_free_blocks == 8 - 4
    assert not swap.holds("a") and swap.num_in_flight == 3 and swap.num_free_blocks == 2  # not free yet
    swap.release([h for h, _ in back])
    assert swap.num_free_blocks == 5 and swap.num_in_flight == 0
    assert_invariants(kv.pool)


def test_swap_in_makes_room_for_new_tokens_in_fresh_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    swap = SwapSpace(kv, num_blocks=4)
    assert kv.allocate_slots("a", 8)  # two full blocks
    swap.swap_out("a")
    back = swap.swap_in("a", 9)  # the next token needs a third block, which gets no host data
    assert len(back) == 2 and len(kv.block_table("a")) == 3
    kv.free("a")
    swap.release([h for h, _ in back])
    assert kv.allocate_slots("a", 8)
    swap.swap_out("a")
    with pytest.raises(ValueError, match="num_total_tokens=4 is invalid: request 'a' holds 2 host blocks"):
        swap.swap_in("a", 4)
    with pytest.raises(ValueError, match="'nobody' is not swapped out"):
        swap.swap_in("nobody", 4)


def test_a_shared_block_is_copied_and_only_the_reference_dropped():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    swap = SwapSpace(kv, num_blocks=4)
    assert kv.allocate_slots("a", 6)  # blocks 0, 1
    assert kv.allocate_slots("b", 5, start_blocks=[0, 1], first_write=8)  # shares both
    assert [kv.pool.ref_count(b) for b in (0, 1)] == [2, 2]
    assert swap.swap_out("b") == [(0, 0), (1, 1)]
    assert [kv.pool.ref_count(b) for b in (0, 1)] == [1, 1] and kv.block_table("a") == [0, 1]
    back = swap.swap_in("b", 6)
    assert {d for _, d in back}.isdisjoint({0, 1})  # b now has its own copy
    assert [kv.pool.ref_count(d) for _, d in back] == [1, 1]
    assert_invariants(kv.pool)


def test_swap_in_without_room_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    swap = SwapSpace(kv, num_blocks=4)
    assert kv.allocate_slots("a", 12)
    swap.swap_out("a")
    assert kv.allocate_slots("b", 8)  # 2 of 4 blocks left; a needs 3
    assert swap.swap_in("a", 12) is None
    assert swap.host_table("a") == [0, 1, 2] and kv.block_table("a") == [] and kv.num_free_blocks == 2
    assert swap.num_in_flight == 0


def test_swap_out_refuses_more_blocks_than_the_pool_holds():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    swap = SwapSpace(kv, num_blocks=2)
    assert kv.allocate_slots("a", 12)
    assert not swap.can_swap_out("a")
    with pytest.raises(ValueError, match="3 device blocks, 2 host blocks are free"):
        swap.swap_out("a")
    assert kv.block_table("a") == [0, 1, 2] and swap.num_free_blocks == 2


def test_host_blocks_read_by_a_swap_in_are_not_reused_in_the_same_step():
    # The ordering hazard: in one step a swaps in and b swaps out. The worker does the
    # swap-out first, so b must not get the host blocks a's swap-in still has to read.
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    swap = SwapSpace(kv, num_blocks=3)
    assert kv.allocate_slots("a", 8)
    swap.swap_out("a")  # host 0, 1
    assert kv.allocate_slots("b", 4)
    swap_in = swap.swap_in("a", 8)
    assert swap.num_free_blocks == 1
    swap_out = swap.swap_out("b")
    assert {h for _, h in swap_out} == {2}  # not 0 or 1, though a no longer holds them
    assert kv.allocate_slots("c", 4)
    assert not swap.can_swap_out("c")  # 0 and 1 are still in flight
    swap.release([h for h, _ in swap_in])  # the step came back
    assert swap.can_swap_out("c") and {h for _, h in swap.swap_out("c")} <= {0, 1}


def test_host_pool_never_holds_more_than_its_size():
    pool = HostBlockPool(2)
    assert pool.allocate(2) == [0, 1] and pool.usage == 1.0
    with pytest.raises(ValueError, match="asked for 1 host blocks, 0 free"):
        pool.allocate(1)
    pool.free([1])
    with pytest.raises(ValueError, match="host block 1 freed but not in use"):
        pool.free([1])
    assert HostBlockPool(0).usage == 0.0


def test_prefix_registration_restarts_after_swap_in():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    swap = SwapSpace(kv, num_blocks=6)
    request = make_request("a", 9)
    assert kv.allocate_slots("a", 9)
    request.num_computed_tokens = 9
    kv.cache_full_blocks(request)  # blocks 0 and 1 registered
    assert kv.find_cached_prefix(make_request("a", 9)) == [0, 1]
    swap.swap_out("a")
    # Another request takes every block, evicting a's cached ones, then finishes.
    assert kv.allocate_slots("x", 24)
    kv.free("x")
    assert kv.find_cached_prefix(make_request("a", 9)) == []
    swap.swap_in("a", 10)
    new_blocks = kv.block_table("a")
    kv.cache_full_blocks(request)  # the fresh blocks are registered from the first one
    assert kv.find_cached_prefix(make_request("a", 9)) == new_blocks[:2]


# --------------------------------------------------------------------------- scheduler


def test_the_youngest_is_swapped_out_keeping_its_progress():
    sched = _scheduler(num_blocks=6, host_blocks=8)
    worker = FakeWorker(sched)
    *_, c, _ = _three_then_one(sched)
    step(sched, worker)
    c_blocks = sched.kv_cache.block_table("c")
    out, _ = step(sched, worker)
    assert [s.request_id for s in out.scheduled] == ["a", "b"] and out.num_preempted == 1
    assert out.blocks_to_swap_out == list(zip(c_blocks, sched.swap_space.host_table("c")))
    assert c.status == RequestStatus.SWAPPED and c.num_computed_tokens == 8 and c.num_preemptions == 1
    assert sched.kv_cache.block_table("c") == [] and len(sched.swap_space.host_table("c")) == 2
    assert [r.request_id for r in sched.waiting] == ["c", "d"]
    stats = sched.stats()
    assert (stats.num_preemptions_total, stats.num_swapped_out_total, stats.num_blocks_swapped_out_total) == (1, 1, 2)
    assert stats.num_swapped == 1 and stats.swap_space_usage == pytest.approx(2 / 8)
    assert stats.num_tokens_dropped_total == 0


def test_a_swapped_request_resumes_where_it_stopped_before_new_requests():
    sched = _scheduler(num_blocks=6, host_blocks=8)
    reqs = [make_request(rid, 8, max_tokens=6) for rid in ("a", "b", "c")] + [make_request("d", 4, max_tokens=2)]
    outs = run(sched, reqs)
    plans = [o.plan for o in outs]
    c_chunks = [(start, end) for plan in plans for rid, start, end in plan if rid == "c"]
    assert c_chunks[0] == (0, 8)
    assert all(start > 0 for start, _ in c_chunks[1:])  # never recomputed from 0
    # c (and b, swapped out later) come back through swap-ins, in the step they run again.
    resumed = next(i for i, plan in enumerate(plans) if any(rid == "c" and start > 0 for rid, start, _ in plan))
    assert len(outs[resumed].blocks_to_swap_in) == 2
    first_d = next(i for i, plan in enumerate(plans) if any(rid == "d" for rid, _, _ in plan))
    assert first_d >= resumed  # the swapped request came back before the new one was admitted
    stats = sched.stats()
    assert stats.num_swapped_in_total == stats.num_swapped_out_total >= 1
    assert stats.num_blocks_swapped_in_total == stats.num_blocks_swapped_out_total
    assert stats.num_tokens_dropped_total == 0


def test_fallback_to_recompute_when_the_host_pool_is_full():
    sched = _scheduler(num_blocks=6, host_blocks=1)  # c needs 2 host blocks
    worker = FakeWorker(sched)
    *_, c, _ = _three_then_one(sched)
    step(sched, worker)
    out, _ = step(sched, worker)
    assert out.num_preempted == 1 and out.blocks_to_swap_out == []
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    stats = sched.stats()
    assert (stats.num_preemptions_total, stats.num_swapped_out_total, stats.num_tokens_dropped_total) == (1, 0, 8)
    assert sched.swap_space.num_free_blocks == 1


@pytest.mark.parametrize("mode, host_blocks", [("swap", 0), ("recompute", 16)])
def test_no_swap_without_swap_mode_or_host_blocks(mode, host_blocks):
    sched = _scheduler(num_blocks=6, host_blocks=host_blocks, mode=mode)
    reqs = [make_request(rid, 8, max_tokens=6) for rid in ("a", "b", "c")] + [make_request("d", 4, max_tokens=2)]
    outs = run(sched, reqs)
    assert sched.num_preemptions_total >= 1 and sched.num_swapped_out_total == 0
    assert not any(o.blocks_to_swap_out or o.blocks_to_swap_in for o in outs)


def test_two_swaps_in_one_step_keep_arrival_order():
    sched = _scheduler(num_blocks=3, host_blocks=8, budget=100)
    worker = FakeWorker(sched)
    a, b, c = (make_request(rid, 4, max_tokens=3) for rid in "abc")
    for r in (a, b, c):
        sched.add_request(r)
    step(sched, worker)
    out, _ = step(sched, worker)
    # a swaps c out; b then finds no block and, now the youngest, swaps itself out.
    assert out.num_preempted == 2 and [s.request_id for s in out.scheduled] == ["a"]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert [r.status for r in (b, c)] == [RequestStatus.SWAPPED] * 2
    assert len(out.blocks_to_swap_out) == 2


def test_abort_of_a_swapped_request_frees_its_host_blocks():
    sched = _scheduler(num_blocks=6, host_blocks=8)
    worker = FakeWorker(sched)
    a, _, c, d = _three_then_one(sched)
    step(sched, worker)
    step(sched, worker)
    assert c.status == RequestStatus.SWAPPED and sched.swap_space.num_free_blocks == 6
    assert sched.abort_requests(["c"]) == [c]
    assert c.status == RequestStatus.FINISHED_ABORTED and c not in sched.waiting
    assert sched.swap_space.num_free_blocks == 8 and not sched.swap_space.holds("c")
    check_invariants(sched)
    while sched.has_unfinished():
        step(sched, worker)
    assert sched.kv_cache.num_free_blocks == 6 and a.num_output_tokens == 6 and d.num_output_tokens == 2


def test_abort_while_a_swap_in_is_in_flight_still_releases_its_host_blocks():
    sched = _scheduler(num_blocks=6, host_blocks=8)
    worker = FakeWorker(sched)
    *_, c, _ = _three_then_one(sched)
    # Drive until c is swapped out, then until the step that swaps it back in is planned.
    step(sched, worker)
    step(sched, worker)
    assert c.status == RequestStatus.SWAPPED
    while True:
        out = sched.schedule()
        if any(s.request_id == "c" for s in out.scheduled):
            break
        worker.run(out)
        sched.update_from_output(out, ModelRunnerOutput(
            sampled_token_ids={s.request_id: _token(s.request) for s in out.scheduled if s.samples}))
    assert len(out.blocks_to_swap_in) == 2
    sched.abort_requests(["c"])
    assert sched.swap_space.num_in_flight == 2  # the worker has yet to read them
    worker.run(out)
    sched.update_from_output(out, ModelRunnerOutput(
        sampled_token_ids={s.request_id: _token(s.request) for s in out.scheduled if s.samples}))
    assert sched.swap_space.num_in_flight == 0 and sched.swap_space.num_free_blocks == 8


def test_priority_keeps_a_swapped_request_ahead_of_new_ones_of_the_same_priority():
    sched = _scheduler(num_blocks=6, host_blocks=8, policy="priority")
    worker = FakeWorker(sched)
    *_, c, _ = _three_then_one(sched)
    step(sched, worker)
    step(sched, worker)
    assert c.status == RequestStatus.SWAPPED
    early = make_request("early", 4, max_tokens=2)
    early.arrival_time = c.arrival_time - 1.0  # older than c, but new
    urgent = make_request("urgent", 4, max_tokens=2)
    urgent.priority = -1
    sched.add_request(early)
    sched.add_request(urgent)
    assert [r.request_id for r in sched.waiting] == ["urgent", "c", "early", "d"]


@pytest.mark.parametrize("seed", range(40))
def test_random_workloads_read_their_own_kv_after_every_swap(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    num_blocks = rng.randint(8, 24)
    capacity = num_blocks * block_size
    policy = rng.choice(["fcfs", "priority"])
    sched = _scheduler(num_blocks=num_blocks, host_blocks=rng.choice([0, 2, num_blocks // 2, 4 * num_blocks]),
                       block_size=block_size, budget=rng.randint(4, 48), max_seqs=rng.randint(2, 8),
                       policy=policy, prefix_caching=rng.random() < 0.7, max_model_len=capacity)
    shared = [1 + rng.randrange(50) for _ in range(capacity // 4)]  # a common prefix for the prefix cache
    requests = []
    for i in range(rng.randint(6, 14)):
        prompt_len = rng.randint(1, capacity // 2)
        prompt = (shared + [1 + rng.randrange(50) for _ in range(prompt_len)])[:prompt_len] if rng.random() < 0.5 \
            else [1 + rng.randrange(50) for _ in range(prompt_len)]
        params = SamplingParams(max_tokens=rng.randint(1, capacity - prompt_len))
        first = Request(f"r{i}", prompt, params, frozenset({0}), priority=rng.randint(0, 2))
        requests.append(first)
        if rng.random() < 0.2:  # a sibling sharing the prompt (n > 1)
            requests.append(Request(f"r{i}#1", prompt, params, frozenset({0}), fork_of=first,
                                    priority=first.priority))
    run(sched, requests, arrivals=rng)


def test_random_workloads_swap_at_all():
    """The randomized test above is only meaningful if swaps happen in it."""
    swapped = 0
    for seed in range(12):
        rng = random.Random(seed)
        sched = _scheduler(num_blocks=10, host_blocks=40, block_size=2, budget=32)
        requests = [make_request(f"r{i}", rng.randint(1, 8), max_tokens=rng.randint(1, 10)) for i in range(6)]
        run(sched, requests)
        swapped += sched.num_swapped_out_total
    assert swapped > 0


# --------------------------------------------------------------------------- worker


class _NoModel(nn.Module):
    config = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2)


def _caches(num_blocks: int, fill) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((num_blocks, 2, 1, 3), fill(layer, 0)), torch.full((num_blocks, 2, 1, 3), fill(layer, 1)))
            for layer in range(2)]


def test_worker_swaps_out_then_in_then_copies():
    device = _caches(4, lambda layer, kv: 0.0)
    for layer, (k, v) in enumerate(device):
        for block in range(4):
            k[block] = 100 * layer + block
            v[block] = -(100 * layer + block)
    host = _caches(2, lambda layer, kv: 0.0)
    host[0][0][1] = 55.0
    host[0][1][1] = -55.0
    host[1][0][1] = 155.0
    host[1][1][1] = -155.0
    runner = ModelRunner(_NoModel(), device, block_size=2, sampler=None, device=torch.device("cpu"),
                         max_model_len=8, host_kv_caches=host)
    # Device block 1 is swapped out to host 0 and, in the same step, receives host block 1;
    # then block 1 (now swapped in) is copied to block 3.
    out = WorkerStep(blocks_to_swap_out=[(1, 0)], blocks_to_swap_in=[(1, 1)], blocks_to_copy=[(1, 3)])
    assert runner.execute(out).sampled_token_ids == {}
    for layer in range(2):
        for kv, sign in ((0, 1), (1, -1)):
            assert torch.all(host[layer][kv][0] == sign * (100 * layer + 1))  # read before overwritten
            assert torch.all(device[layer][kv][1] == sign * (100 * layer + 55))
            assert torch.all(device[layer][kv][3] == sign * (100 * layer + 55))
            assert torch.all(device[layer][kv][2] == sign * (100 * layer + 2))  # untouched


def test_move_blocks_batches_many_pairs():
    device = _caches(5, lambda layer, kv: 0.0)
    for k, v in device:
        for block in range(5):
            k[block] = block
            v[block] = 10 + block
    host = _caches(3, lambda layer, kv: -1.0)
    move_blocks(device, host, [(4, 0), (2, 2), (0, 1)])
    for k, v in host:
        assert [k[b, 0, 0, 0].item() for b in range(3)] == [4, 0, 2]
        assert [v[b, 0, 0, 0].item() for b in range(3)] == [14, 10, 12]


def test_host_caches_have_the_device_block_shape():
    config = SimpleNamespace(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                             head_dim=8)
    caches = allocate_host_kv_caches(config, 7, 4, torch.float32, torch.device("cpu"))
    assert len(caches) == 3 and all(k.shape == v.shape == (7, 4, 2, 8) for k, v in caches)


def test_a_swap_without_swap_space_is_refused():
    runner = ModelRunner(_NoModel(), _caches(2, lambda layer, kv: 0.0), 2, None, torch.device("cpu"), 8)
    with pytest.raises(RuntimeError, match="no swap space"):
        runner.execute(WorkerStep(blocks_to_swap_out=[(0, 0)]))


# --------------------------------------------------------------------------- config


def test_config_validates_the_mode_and_the_swap_space():
    with pytest.raises(ConfigError, match="preemption_mode='evict' is invalid: must be 'recompute' or 'swap'"):
        SchedulerConfig(preemption_mode="evict")
    with pytest.raises(ConfigError, match="swap_space=-1 is invalid"):
        CacheConfig(swap_space=-1)
    with pytest.raises(ConfigError, match="swap_space=nan is invalid"):
        CacheConfig(swap_space=float("nan"))
    assert SchedulerConfig().preemption_mode == "recompute" and CacheConfig().swap_space == 4.0
    assert CacheConfig(swap_space=0).swap_space == 0


def test_engine_flags():
    import argparse

    from pagoda.entrypoints.engine_args import add_engine_args, engine_kwargs

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    kwargs = engine_kwargs(parser.parse_args(["--preemption-mode", "swap", "--swap-space", "0.5"]))
    assert kwargs["preemption_mode"] == "swap" and kwargs["swap_space"] == 0.5
    defaults = engine_kwargs(parser.parse_args([]))
    assert defaults["preemption_mode"] == "recompute" and defaults["swap_space"] == 4.0
