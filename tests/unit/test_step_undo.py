"""Undoing a failed step and failing one request while scheduling (pure bookkeeping).

The property test runs random workloads (swap and recompute preemption, n > 1
siblings sharing prompt blocks, prefix caching) on the stand-in worker of
test_swap_preemption.py, whose "KV" is the token id in each slot and which
checks that every scheduled request reads exactly its own tokens. Some steps
fail part way: the worker applies the step's moves and writes in order up to
a random point, leaves garbage where it stopped, and the scheduler undoes the
step. Any bookkeeping that trusts what the failed step did shows up as a
wrong token read later; nothing may leak.
"""

from __future__ import annotations

import random
import zlib
from collections import Counter

import pytest
import torch

from pagoda.core.block_pool import BlockPool
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.kv_offload import KVOffloadManager
from pagoda.core.scheduler import Scheduler
from pagoda.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagoda.request import Request, RequestStatus
from pagoda.sampling_params import SamplingParams
from tests.unit.test_scheduler import make_request, make_scheduler
from tests.unit.test_swap_preemption import (
    FakeWorker,
    _scheduler,
    _token,
    check_invariants,
)

GARBAGE = -1


def _run_partially(worker: FakeWorker, out: SchedulerOutput, rng: random.Random) -> None:
    """The worker's operations of `out`, in its order, cut off at a random one, which is left
    half done (garbage in its destination)."""
    bs = worker.bs
    ops = []
    for device, host in out.blocks_to_swap_out:
        ops.append(("host", host, lambda d=device: list(worker.device[d])))
    for host, device in out.blocks_to_swap_in:
        ops.append(("device", device, lambda h=host: list(worker.host[h])))
    for source, target in out.blocks_to_copy:
        ops.append(("device", target, lambda s=source: list(worker.device[s])))
    for item in out.scheduled:
        for position in range(item.start, item.end):
            block = item.block_table[position // bs]
            ops.append(("slot", (block, position % bs), lambda r=item.request, p=position: r.all_token_ids[p]))
    cut = rng.randrange(len(ops) + 1)
    for index, (where, target, value) in enumerate(ops[: cut + 1]):
        data = value() if index < cut else None
        if where == "host":
            worker.host[target] = data if data is not None else [GARBAGE] * bs
        elif where == "device":
            worker.device[target] = data if data is not None else [GARBAGE] * bs
        else:
            block, slot = target
            worker.device[block][slot] = data if data is not None else GARBAGE


def _drive(sched: Scheduler, requests: list[Request], seed: int, failure_rate: float = 0.25) -> Counter:
    rng = random.Random(seed)
    worker = FakeWorker(sched)
    for request in requests:
        sched.add_request(request)
    finished: Counter[str] = Counter()
    stats: Counter[str] = Counter()
    suspects: list[Request] = []
    for _ in range(5_000):
        if not sched.has_unfinished():
            break
        alone = suspects.pop(0) if suspects and rng.random() < 0.5 else None
        out = sched.schedule_alone(alone) if alone is not None else sched.schedule()
        assert not out.failed
        if alone is not None:
            assert [item.request for item in out.scheduled] in ([alone], [])
        if out.is_empty:
            continue
        if rng.random() < failure_rate:
            _run_partially(worker, out, rng)
            stats["failed"] += 1
            stats.update(name for name in ("blocks_to_swap_out", "blocks_to_swap_in", "blocks_to_copy")
                         if getattr(out, name))
            suspects = [r for r in sched.undo_step(out) if not r.is_finished]
            check_invariants(sched)
            continue
        worker.run(out)  # asserts every scheduled request reads its own tokens
        tokens = {s.request_id: _token(s.request) for s in out.scheduled if s.samples}
        updates = sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids=tokens))
        check_invariants(sched)
        finished.update(u.request.request_id for u in updates if u.finished)
    else:
        raise AssertionError("did not finish")
    assert finished == Counter({r.request_id: 1 for r in requests})
    for r in requests:
        assert r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == r.sampling_params.max_tokens
        assert r.output_token_ids == [_token_at(r, n) for n in range(r.num_prompt_tokens, r.num_tokens)]
    kv = sched.kv_cache
    assert kv.num_free_blocks == kv.pool.num_blocks and kv.num_requests_holding_blocks() == 0
    if sched.swap_space is not None:
        swap = sched.swap_space
        assert swap.num_free_blocks == swap.num_blocks and swap.num_requests == 0 and swap.num_in_flight == 0
    return stats


def _token_at(request: Request, length: int) -> int:
    """What `_token` gave when the request had `length` tokens."""
    return 1 + zlib.crc32(f"{request.request_id}:{length}".encode()) % 50


def _workload(rng: random.Random) -> list[Request]:
    requests = []
    for index in range(8):
        rid = f"r{index}"
        prompt = rng.randrange(3, 20)
        if index % 3 == 2:  # a request with n = 2: two siblings, the second forks the first's prompt
            first = make_request(f"{rid}#0", prompt, max_tokens=rng.randrange(2, 9))
            second = Request(f"{rid}#1", first.prompt_token_ids, first.sampling_params, first.eos_token_ids,
                             fork_of=first)
            requests += [first, second]
        else:
            requests.append(make_request(rid, prompt, max_tokens=rng.randrange(2, 12)))
    return requests


@pytest.mark.parametrize("mode", ["swap", "recompute"])
@pytest.mark.parametrize("seed", range(6))
def test_half_done_failed_steps_leave_no_wrong_kv_and_no_leak(mode, seed):
    rng = random.Random(seed)
    sched = _scheduler(num_blocks=10, host_blocks=10, budget=rng.choice([6, 16, 64]), max_seqs=rng.choice([3, 8]),
                       mode=mode, policy=rng.choice(["fcfs", "priority"]))
    stats = _drive(sched, _workload(rng), seed)
    assert stats["failed"] > 0


def test_the_property_test_sees_each_kind_of_move_fail():
    totals: Counter[str] = Counter()
    for seed in range(6):
        rng = random.Random(seed)
        sched = _scheduler(num_blocks=10, host_blocks=10, budget=64, max_seqs=8, mode="swap")
        totals += _drive(sched, _workload(rng), seed)
    assert totals["blocks_to_swap_out"] and totals["blocks_to_swap_in"] and totals["blocks_to_copy"], totals


# --------------------------------------------------------------------------- pieces


def test_uncache_forgets_the_hash_and_keeps_the_block_where_it_is():
    pool = BlockPool(4)
    [block] = pool.allocate(1)
    assert pool.cache_block(block, b"h")
    pool.uncache(block)
    assert pool.cached_block(b"h") is None and pool.block_hash(block) is None and pool.ref_count(block) == 1
    pool.free([block])
    assert pool.num_free_blocks == 4
    pool.uncache(block)  # no hash: nothing to do


def test_discarded_offload_slots_forget_their_hash_and_never_reach_disk(tmp_path):
    host = [(torch.zeros(2, 4, 1, 2), torch.zeros(2, 4, 1, 2))]
    offload = KVOffloadManager(host, "fp", disk_dir=tmp_path)
    offload.offload(b"a" * 32, device_block=5)
    offload.offload(b"b" * 32, device_block=6)
    copies, _ = offload.take_step_copies()
    assert [d for d, _ in copies] == [5, 6]
    offload.discard([slot for device, slot in copies if device == 5])  # the step failed before copying
    offload.after_step()
    assert not offload.contains(b"a" * 32) and offload.contains(b"b" * 32)
    assert offload.pool.num_free_blocks == 1
    assert sorted(p.stem for p in tmp_path.rglob("*.safetensors")) == [(b"b" * 32).hex()]


def test_stale_copies_into_a_failed_request_blocks_are_dropped_unless_chained():
    kv = KVCacheManager(8, 4)
    a, b, c = kv.pool.allocate(3)
    kv.pending_copies = [(a, b), (b, c)]
    kv.pool.free([b])  # b's holder is gone, but c is copied from b: keep a -> b
    kv.drop_copies_into_free_blocks()
    assert kv.pending_copies == [(a, b), (b, c)]
    kv.pool.free([c])
    kv.drop_copies_into_free_blocks()
    assert kv.pending_copies == []  # c is free and read by nobody, so b is read by nobody either
    d, e = kv.pool.allocate(2)
    kv.pending_copies = [(a, d), (a, e)]
    kv.pool.free([e])
    kv.drop_copies_into_free_blocks()
    assert kv.pending_copies == [(a, d)]


def test_a_request_that_raises_while_scheduled_fails_alone():
    sched = make_scheduler(num_blocks=16, block_size=4, budget=100)
    good = make_request("good", 9)
    bad = Request("bad", [5] * 9, SamplingParams(max_tokens=4), frozenset({0}), cache_salt="\ud800")
    sched.add_request(bad)
    sched.add_request(good)
    out = sched.schedule()
    assert list(out.failed) == ["bad"] and "UnicodeEncodeError" in out.failed["bad"]
    assert [item.request_id for item in out.scheduled] == ["good"]
    assert bad.status == RequestStatus.FINISHED_ERROR and bad.status.finish_reason == "error"
    assert bad not in sched.waiting and sched.kv_cache.block_table("bad") == []
    assert sched.kv_cache.num_free_blocks == 16 - len(sched.kv_cache.block_table("good"))


def test_a_row_the_worker_failed_is_reported_not_advanced():
    sched = make_scheduler(num_blocks=16, block_size=4, budget=100)
    a, b = make_request("a", 5), make_request("b", 6)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    updates = sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"b": 7}, failed={"a": "Boom: x"}))
    by_id = {u.request.request_id: u for u in updates}
    assert by_id["a"].error == "Boom: x" and by_id["a"].new_token_ids == [] and a.num_computed_tokens == 0
    assert by_id["b"].error is None and by_id["b"].new_token_ids == [7]
    assert sched.kv_cache.pool.num_cached_blocks == 1  # b's one full block; none of a's
    sched.abort_requests(["a"], RequestStatus.FINISHED_ERROR)
    assert a.status == RequestStatus.FINISHED_ERROR and sched.kv_cache.block_table("a") == []


def test_an_update_that_raises_is_reported_as_that_request_error():
    sched = make_scheduler(num_blocks=16, block_size=4, budget=100)
    a, b = make_request("a", 5), make_request("b", 6)

    class Exploding:
        stop_reason = None

        def add_tokens(self, token_ids, match_stops=True):
            raise RuntimeError("no text today")

    a.text = Exploding()
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    updates = sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"a": 7, "b": 8}))
    assert [(u.request.request_id, u.error) for u in updates] == [("a", "RuntimeError: no text today"), ("b", None)]


def test_schedule_alone_runs_one_request_and_preempts_others_for_it():
    sched = _scheduler(num_blocks=6, host_blocks=0, mode="recompute", budget=100)
    a, b, c = (make_request(rid, 8, max_tokens=4) for rid in ("a", "b", "c"))
    for r in (a, b, c):
        sched.add_request(r)
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["a", "b", "c"] and sched.kv_cache.num_free_blocks == 0
    suspects = sched.undo_step(out)  # no moves: everyone keeps its state and redoes its chunk
    assert suspects == [a, b, c] and all(r.status == RequestStatus.RUNNING for r in suspects)
    assert sched.kv_cache.num_free_blocks == 6  # the blocks allocated for the failed chunks
    check_invariants(sched)

    alone = sched.schedule_alone(b)
    assert [s.request for s in alone.scheduled] == [b] and alone.num_preempted == 0
    sched.update_from_output(alone, ModelRunnerOutput(sampled_token_ids={"b": 3}))
    out = sched.schedule()  # a and c catch up; b needs a third block: c, the youngest, is preempted
    assert [s.request_id for s in out.scheduled] == ["a", "b"] and out.num_preempted == 1
    sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"a": 3, "b": 4}))
    check_invariants(sched)
    # Alone, c takes what it needs from the youngest others; nobody else runs.
    alone = sched.schedule_alone(c)
    assert [s.request for s in alone.scheduled] == [c] and alone.num_preempted == 1
    assert c.status == RequestStatus.RUNNING and b.status == RequestStatus.PREEMPTED
    sched.update_from_output(alone, ModelRunnerOutput(sampled_token_ids={"c": 5}))
    check_invariants(sched)


def test_schedule_alone_recomputes_a_swapped_request_and_skips_an_idle_one():
    sched = _scheduler(num_blocks=6, host_blocks=8, mode="swap", budget=100)
    a, b, c = (make_request(rid, 8, max_tokens=4) for rid in ("a", "b", "c"))
    for r in (a, b, c):
        sched.add_request(r)
    out = sched.schedule()
    sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"a": 3, "b": 4, "c": 5}))
    out = sched.schedule()  # a needs a third block: c is swapped out
    assert c.status == RequestStatus.SWAPPED and out.blocks_to_swap_out
    sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"a": 3, "b": 4}))
    alone = sched.schedule_alone(c)
    assert [s.request for s in alone.scheduled] == [c] and not alone.blocks_to_swap_in
    assert c.status == RequestStatus.RUNNING and alone.scheduled[0].start == 0  # recomputed
    assert not sched.swap_space.holds("c")
    sched.update_from_output(alone, ModelRunnerOutput(sampled_token_ids={"c": 5}))
    check_invariants(sched)
    sched.abort_requests(["c"])
    assert sched.schedule_alone(c).scheduled == []  # finished: nothing to run
