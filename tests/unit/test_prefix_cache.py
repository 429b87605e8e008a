"""Prefix caching in the block pool and the KV-cache manager: exact block ids,
ref counts and eviction order (pure bookkeeping, no model)."""

from __future__ import annotations

import pytest

from pagoda.config import SchedulerConfig
from pagoda.core.block_pool import BlockPool
from pagoda.core.kv_cache_manager import KVCacheManager, block_hash, request_block_hashes
from pagoda.core.scheduler import Scheduler
from pagoda.core.scheduler_output import ModelRunnerOutput
from pagoda.request import Request
from pagoda.sampling_params import SamplingParams


def assert_invariants(pool: BlockPool) -> None:
    free = list(pool._free)
    assert len(free) == len(set(free))
    for b in range(pool.num_blocks):
        assert (pool.ref_count(b) == 0) == (b in pool._free)
        h = pool.block_hash(b)
        if h is not None:
            assert pool.cached_block(h) == b
    assert len(pool._cached) == sum(pool.block_hash(b) is not None for b in range(pool.num_blocks))


def _request(rid: str, tokens: list[int], salt: str | None = None, **params) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4, **params), frozenset({0}), cache_salt=salt)


def _computed(kv: KVCacheManager, request: Request, num_tokens: int) -> None:
    """As the scheduler does after a step: `num_tokens` now have their KV written."""
    assert kv.allocate_slots(request.request_id, num_tokens)
    request.num_computed_tokens = num_tokens
    kv.cache_full_blocks(request)


# --------------------------------------------------------------------------- hashes


def test_hashes_chain_over_the_prefix_and_extra_keys():
    a = request_block_hashes(list(range(1, 10)), 4)
    assert len(a) == 2  # two full blocks of 4; the 9th token is in a partial block
    assert a[0] == block_hash(None, [1, 2, 3, 4])
    assert a[1] == block_hash(a[0], [5, 6, 7, 8])
    # Same block contents after a different prefix: a different hash.
    assert request_block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)[1] != a[1]
    assert request_block_hashes(list(range(1, 10)), 4, ("salt",))[0] != a[0]
    assert request_block_hashes(list(range(1, 13)), 4, known=a)[:2] == a


# --------------------------------------------------------------------------- block pool


def test_freed_cached_block_stays_findable_until_evicted():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, b"A")
    pool.free([a, b])
    assert pool.cached_block(b"A") == a and pool.num_free_blocks == 3
    assert_invariants(pool)
    # Allocation takes the never-used block first, then the least recently freed: a, evicting it.
    assert pool.allocate(1) == [2]
    assert pool.allocate(1) == [a]
    assert pool.cached_block(b"A") is None and pool.block_hash(a) is None and pool.num_evictions == 1
    assert_invariants(pool)


def test_a_hit_on_a_free_block_takes_it_out_of_the_free_queue():
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    pool.cache_block(blocks[1], b"B")
    pool.free(blocks)
    pool.incref(blocks[1])
    assert pool.ref_count(blocks[1]) == 1 and blocks[1] not in pool._free
    assert list(pool._free) == [blocks[0], blocks[2], blocks[3]]
    assert pool.allocate(3) == [blocks[0], blocks[2], blocks[3]]  # the hit block is not handed out
    assert_invariants(pool)
    pool.free([blocks[0]])
    with pytest.raises(ValueError, match="not cached"):
        pool.incref(blocks[0])


def test_one_block_per_hash():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, b"X")
    assert not pool.cache_block(b, b"X")  # same contents elsewhere: the first stays the one found
    assert not pool.cache_block(a, b"Y")  # a block is registered once
    assert pool.cached_block(b"X") == a and pool.block_hash(b) is None
    with pytest.raises(ValueError, match="free"):
        pool.cache_block(2, b"Z")
    assert pool.reset_cache() == 1 and pool.cached_block(b"X") is None
    assert_invariants(pool)


# --------------------------------------------------------------------------- KV-cache manager


def test_second_request_reuses_the_first_ones_full_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = _request("a", list(range(1, 11)))  # 10 tokens: blocks [1-4] [5-8] [9-10 partial]
    _computed(kv, a, 10)
    table_a = kv.block_table("a")
    assert table_a == [0, 1, 2]
    b = _request("b", list(range(1, 11)) + [42])
    hits = kv.find_cached_prefix(b)
    assert hits == [0, 1]  # full blocks only
    assert kv.allocate_slots("b", 11, hits)
    assert kv.block_table("b") == [0, 1, 3]
    assert [kv.pool.ref_count(x) for x in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert_invariants(kv.pool)


def test_the_last_prompt_token_is_never_a_hit():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    _computed(kv, _request("a", list(range(1, 9))), 8)  # exactly two full blocks
    same = _request("b", list(range(1, 9)))
    assert kv.find_cached_prefix(same) == [0]  # block 2 holds the last token, whose logits we need


def test_salt_and_prompt_logprobs_disable_sharing():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    _computed(kv, _request("a", list(range(1, 10))), 9)
    assert kv.find_cached_prefix(_request("b", list(range(1, 10)))) == [0, 1]
    assert kv.find_cached_prefix(_request("c", list(range(1, 10)), salt="tenant-2")) == []
    assert kv.find_cached_prefix(_request("d", list(range(1, 10)), prompt_logprobs=1)) == []
    off = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    _computed(off, _request("a", list(range(1, 10))), 9)
    assert off.pool.num_cached_blocks == 0
    assert off.find_cached_prefix(_request("b", list(range(1, 10)))) == []


def test_only_blocks_with_written_kv_are_registered():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = _request("a", list(range(1, 14)))
    _computed(kv, a, 6)  # a prefill chunk of 6: one full block written
    assert kv.pool.num_cached_blocks == 1
    _computed(kv, a, 13)
    assert kv.pool.num_cached_blocks == 3


def test_freed_requests_are_evicted_tail_first_and_lru():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    a = _request("a", [1, 2, 3, 4, 5, 6, 7])  # 3 full blocks + 1 partial
    _computed(kv, a, 7)
    assert kv.block_table("a") == [0, 1, 2, 3]
    kv.free("a")
    # Tail first into the free queue: the partial block 3, then 2, 1, 0; 4 and 5 were never used.
    assert list(kv.pool._free) == [4, 5, 3, 2, 1, 0]
    b = _request("b", [9, 9, 9, 9, 9])
    assert kv.find_cached_prefix(b) == []
    assert kv.allocate_slots("b", 5)
    assert kv.block_table("b") == [4, 5, 3]  # block 3 held no full block: nothing evicted yet
    assert kv.pool.num_evictions == 0
    c = _request("c", [8, 8, 8, 8])
    assert kv.allocate_slots("c", 4)
    assert kv.block_table("c") == [2, 1]  # the prefix's tail goes before its head
    assert kv.pool.num_evictions == 2
    assert kv.find_cached_prefix(_request("a2", [1, 2, 3, 4, 5, 6, 7])) == [0]
    assert_invariants(kv.pool)


def test_a_hit_needs_room_for_the_blocks_it_revives():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    _computed(kv, _request("a", [1, 2, 3, 4, 5]), 5)  # blocks 0, 1 cached; 2 partial
    kv.free("a")
    assert kv.allocate_slots("x", 2)  # takes block 3, the never-used one
    b = _request("b", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    hits = kv.find_cached_prefix(b)
    assert hits == [0, 1]
    # 9 tokens = 5 blocks: 2 hits (both free, so they count against the 3 free) + 3 new > 3 free.
    assert not kv.allocate_slots("b", 9, hits)
    assert kv.block_table("b") == [] and kv.pool.ref_count(0) == 0
    assert kv.allocate_slots("b", 6, hits)  # 2 hits + 1 new fit
    assert kv.block_table("b")[:2] == [0, 1]
    assert_invariants(kv.pool)


# --------------------------------------------------------------------------- scheduler


def _run_prefill(sched: Scheduler) -> dict[str, tuple[int, int]]:
    out = sched.schedule()
    sampled = {s.request_id: 5 for s in out.scheduled if s.samples}
    sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids=sampled))
    return {s.request_id: (s.start, s.num_new_tokens) for s in out.scheduled}


def test_scheduler_starts_a_request_after_its_cached_prefix_and_counts_hits():
    kv = KVCacheManager(num_blocks=32, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv, max_model_len=1000)
    system = list(range(100, 120))  # a 20-token shared prefix: 5 full blocks
    sched.add_request(_request("a", system + [1, 2, 3]))
    assert _run_prefill(sched) == {"a": (0, 23)}
    sched.add_request(_request("b", system + [7, 8]))
    plan = _run_prefill(sched)
    assert plan["b"] == (20, 2)  # 5 blocks from the cache, only the question is computed
    b = next(r for r in sched.running if r.request_id == "b")
    assert b.num_cached_tokens == 20
    assert kv.block_table("b")[:5] == kv.block_table("a")[:5]
    stats = sched.stats()
    assert (stats.prefix_cache_queries_total, stats.prefix_cache_hits_total) == (23 + 22, 20)
