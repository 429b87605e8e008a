"""Sharing blocks between siblings (n > 1) with copy on write (pure bookkeeping, no model)."""

from __future__ import annotations

from pagoda.config import SchedulerConfig
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.scheduler import Scheduler
from pagoda.core.scheduler_output import ModelRunnerOutput
from pagoda.request import Request, RequestStatus
from pagoda.sampling_params import SamplingParams
from tests.unit.test_prefix_cache import assert_invariants


def test_writing_into_a_shared_block_copies_it_first():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    assert kv.allocate_slots("a", 6)  # blocks 0, 1 (block 1 holds positions 4, 5)
    # b shares a's blocks and writes position 5 (its own last prompt token): block 1 is copied.
    assert kv.allocate_slots("b", 6, start_blocks=[0, 1], first_write=5)
    assert kv.block_table("b") == [0, 2]
    assert kv.take_pending_copies() == [(1, 2)]
    assert [kv.pool.ref_count(b) for b in (0, 1, 2)] == [2, 1, 1]
    # a writes position 6 into its own, now unshared, block 1: no copy.
    assert kv.allocate_slots("a", 7, first_write=6)
    assert kv.take_pending_copies() == []
    assert_invariants(kv.pool)


def test_the_original_holder_copies_when_it_writes_first():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    assert kv.allocate_slots("a", 6)
    assert kv.allocate_slots("b", 5, start_blocks=[0, 1], first_write=8)  # shares both, writes nothing yet
    assert kv.pool.ref_count(1) == 2 and kv.take_pending_copies() == []
    assert kv.allocate_slots("a", 7, first_write=6)  # a writes into the shared block 1
    assert kv.block_table("a") == [0, 2] and kv.block_table("b") == [0, 1]
    assert kv.take_pending_copies() == [(1, 2)]
    kv.free("a")
    kv.free("b")
    assert kv.num_free_blocks == 8
    assert_invariants(kv.pool)


def test_a_copy_needs_a_free_block():
    kv = KVCacheManager(num_blocks=2, block_size=4, enable_prefix_caching=False)
    assert kv.allocate_slots("a", 6)
    assert not kv.allocate_slots("b", 6, start_blocks=[0, 1], first_write=5)  # the copy has no room
    assert kv.block_table("b") == [] and [kv.pool.ref_count(b) for b in (0, 1)] == [1, 1]
    assert kv.take_pending_copies() == []


def _siblings(n: int, prompt_len: int, max_tokens: int) -> list[Request]:
    params = SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True)
    prompt = [3 + i % 40 for i in range(prompt_len)]
    first = Request("p#0", prompt, params, frozenset({0}))
    return [first] + [Request(f"p#{i}", prompt, params, frozenset({0}), fork_of=first) for i in range(1, n)]


def _run(sched: Scheduler) -> list:
    outs = []
    while sched.has_unfinished():
        out = sched.schedule()
        assert not out.is_empty
        outs.append(out)
        sampled = {s.request_id: 5 for s in out.scheduled if s.samples}
        sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids=sampled))
    return outs


def _peak(n: int, sharing: bool) -> tuple[int, list]:
    kv = KVCacheManager(num_blocks=200, block_size=4, enable_prefix_caching=False, enable_fork_sharing=sharing)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=256), kv, max_model_len=1000)
    requests = _siblings(n, prompt_len=30, max_tokens=6)
    for request in requests:
        sched.add_request(request)
    outs = _run(sched)
    assert all(r.num_output_tokens == 6 and r.status == RequestStatus.FINISHED_LENGTH for r in requests)
    assert kv.num_free_blocks == 200 and kv.num_requests_holding_blocks() == 0
    return kv.pool.peak_blocks_in_use, outs


def test_siblings_share_the_prompt_and_compute_only_its_last_token():
    peak, outs = _peak(4, sharing=True)
    first_step = {s.request_id: (s.start, s.num_new_tokens) for s in outs[0].scheduled}
    assert first_step == {"p#0": (0, 30)}  # the siblings wait for the prompt's KV
    second_step = {s.request_id: (s.start, s.num_new_tokens) for s in outs[1].scheduled}
    assert second_step == {"p#0": (30, 1), "p#1": (29, 1), "p#2": (29, 1), "p#3": (29, 1)}
    # Position 29 lies in the partly filled block 7 (positions 28-31): each sibling copies it.
    assert len(outs[1].blocks_to_copy) == 3 and len({src for src, _ in outs[1].blocks_to_copy}) == 1
    unshared, _ = _peak(4, sharing=False)
    # 30 + 6 tokens = 9 blocks each: unshared 4 x 9 = 36; shared 7 prompt blocks once + 2 own each.
    assert unshared == 36
    assert peak == 7 + 4 * 2
