"""The "priority" scheduling policy: admission order, preemption of less urgent
requests, and nothing lost (driven like test_scheduler, no model)."""

from __future__ import annotations

import pytest

from pagoda.config import ConfigError, SchedulerConfig
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.scheduler import Scheduler
from pagoda.request import RequestStatus
from tests.unit.test_scheduler import make_request, run_to_completion, step


def _scheduler(policy: str = "priority", num_blocks: int = 64, block_size: int = 4, budget: int = 64,
               max_seqs: int = 8) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, policy=policy),
                     KVCacheManager(num_blocks, block_size), max_model_len=10_000)


def _first_scheduled(outs, rid: str) -> int:
    return next(i for i, o in enumerate(outs) if any(s.request_id == rid for s in o.scheduled))


def test_lower_value_is_admitted_first():
    sched = _scheduler(max_seqs=1)
    for rid, priority in (("a", 5), ("b", 1), ("c", 3), ("d", 1)):
        request = make_request(rid, 6, max_tokens=2)
        request.priority = priority
        sched.add_request(request)
    assert [r.request_id for r in sched.waiting] == ["b", "d", "c", "a"]  # ties keep arrival order
    outs = run_to_completion(sched)
    order = sorted("abcd", key=lambda rid: _first_scheduled(outs, rid))
    assert order == ["b", "d", "c", "a"]


def test_fcfs_ignores_priority():
    sched = _scheduler(policy="fcfs", max_seqs=1)
    for rid, priority in (("a", 5), ("b", 1)):
        request = make_request(rid, 6, max_tokens=2)
        request.priority = priority
        sched.add_request(request)
    outs = run_to_completion(sched)
    assert _first_scheduled(outs, "a") < _first_scheduled(outs, "b")


def test_an_urgent_request_preempts_a_less_urgent_one_for_blocks():
    # 8 blocks of 4 tokens. `low` takes 6 blocks; `high` needs 4: only by preempting `low`.
    sched = _scheduler(num_blocks=8, budget=100)
    low = make_request("low", 20, max_tokens=6)
    low.priority = 10
    sched.add_request(low)
    step(sched)
    assert low.status == RequestStatus.RUNNING
    high = make_request("high", 14, max_tokens=3)
    high.priority = 0
    sched.add_request(high)
    out, _ = step(sched)
    assert [s.request_id for s in out.scheduled] == ["high"]  # low's planned decode was taken back
    assert low.status == RequestStatus.PREEMPTED and low.num_preemptions == 1
    assert sched.kv_cache.block_table("low") == []
    run_to_completion(sched)
    assert high.num_output_tokens == 3 and low.num_output_tokens == 6
    assert sched.kv_cache.num_free_blocks == 8


def test_an_urgent_request_preempts_for_a_sequence_slot():
    sched = _scheduler(max_seqs=2)
    lows = []
    for i in range(2):
        low = make_request(f"low{i}", 5, max_tokens=8)
        low.priority = 5
        sched.add_request(low)
        lows.append(low)
    step(sched)
    high = make_request("high", 5, max_tokens=2)
    high.priority = -1
    sched.add_request(high)
    out, _ = step(sched)
    assert "high" in [s.request_id for s in out.scheduled]
    assert lows[1].status == RequestStatus.PREEMPTED and lows[0].status == RequestStatus.RUNNING  # youngest goes
    run_to_completion(sched)
    assert all(r.num_output_tokens == 8 for r in lows)


def test_equal_priorities_never_preempt_each_other_to_get_in():
    sched = _scheduler(num_blocks=8, budget=100)
    first = make_request("first", 20, max_tokens=6)
    sched.add_request(first)
    step(sched)
    second = make_request("second", 14, max_tokens=3)
    sched.add_request(second)
    out, _ = step(sched)
    assert [s.request_id for s in out.scheduled] == ["first"]
    assert first.num_preemptions == 0 and second.status == RequestStatus.WAITING
    run_to_completion(sched)
    assert first.num_output_tokens == 6 and second.num_output_tokens == 3


def test_policy_is_validated():
    with pytest.raises(ConfigError, match="policy"):
        SchedulerConfig(policy="lifo")
