"""Unit tests for pagoda.core.block_pool and pagoda.core.kv_cache_manager (pure bookkeeping)."""

from __future__ import annotations

import math
import random

import pytest

from pagoda.core.block_pool import BlockPool, BlockPoolExhausted
from pagoda.core.kv_cache_manager import KVCacheManager, cdiv

# --------------------------------------------------------------------------- helpers


def free_list(pool: BlockPool) -> list[int]:
    return list(pool._free)


def assert_pool_invariant(pool: BlockPool) -> None:
    """Free list and referenced blocks partition 0..num_blocks-1; free iff ref count 0."""
    free = free_list(pool)
    assert len(free) == len(set(free)), f"duplicate ids in free list: {free}"
    referenced = {b for b in range(pool.num_blocks) if pool.ref_count(b) > 0}
    assert set(free).isdisjoint(referenced)
    assert set(free) | referenced == set(range(pool.num_blocks))
    for b in range(pool.num_blocks):
        assert pool.ref_count(b) >= 0
        assert (pool.ref_count(b) == 0) == (b in set(free))
    assert pool.num_free_blocks == len(free)


# --------------------------------------------------------------------------- BlockPool


def test_pool_rejects_empty() -> None:
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockPool(0)


def test_fresh_pool_is_all_free_in_order() -> None:
    pool = BlockPool(5)
    assert pool.num_free_blocks == 5
    assert pool.usage == 0.0
    assert free_list(pool) == [0, 1, 2, 3, 4]
    assert all(pool.ref_count(b) == 0 for b in range(5))


def test_allocate_pops_from_left_and_sets_ref_count_one() -> None:
    pool = BlockPool(6)
    first = pool.allocate(2)
    assert first == [0, 1]
    second = pool.allocate(3)
    assert second == [2, 3, 4]
    assert [pool.ref_count(b) for b in range(6)] == [1, 1, 1, 1, 1, 0]
    assert free_list(pool) == [5]
    assert pool.num_free_blocks == 1
    assert_pool_invariant(pool)


def test_allocate_zero_is_a_noop() -> None:
    pool = BlockPool(3)
    assert pool.allocate(0) == []
    assert pool.num_free_blocks == 3


def test_freed_blocks_go_to_the_right_in_free_order() -> None:
    pool = BlockPool(5)
    pool.allocate(5)
    pool.free([3, 0])
    assert free_list(pool) == [3, 0]
    pool.free([4])
    assert free_list(pool) == [3, 0, 4]
    # The next allocation takes from the left: the block freed first is reused first.
    assert pool.allocate(2) == [3, 0]
    assert free_list(pool) == [4]
    assert_pool_invariant(pool)


def test_most_recently_freed_block_is_reused_last() -> None:
    pool = BlockPool(4)
    a = pool.allocate(1)
    pool.free(a)  # block 0 goes behind 1, 2, 3
    assert pool.allocate(3) == [1, 2, 3]
    assert pool.allocate(1) == [0]


def test_incref_and_shared_free() -> None:
    pool = BlockPool(3)
    [b] = pool.allocate(1)
    pool.incref(b)
    pool.incref(b)
    assert pool.ref_count(b) == 3
    pool.free([b])
    assert pool.ref_count(b) == 2
    assert b not in free_list(pool)
    pool.free([b])
    assert pool.ref_count(b) == 1
    assert b not in free_list(pool)
    pool.free([b])
    assert pool.ref_count(b) == 0
    assert free_list(pool)[-1] == b
    assert_pool_invariant(pool)


def test_incref_on_free_block_raises() -> None:
    pool = BlockPool(3)
    with pytest.raises(ValueError, match="block 1 is free"):
        pool.incref(1)
    assert pool.ref_count(1) == 0
    # Also after having been allocated and freed.
    [b] = pool.allocate(1)
    pool.free([b])
    with pytest.raises(ValueError):
        pool.incref(b)
    assert_pool_invariant(pool)


def test_double_free_raises_and_never_duplicates_free_list() -> None:
    pool = BlockPool(3)
    [b] = pool.allocate(1)
    pool.free([b])
    with pytest.raises(ValueError, match=f"block {b} freed more times"):
        pool.free([b])
    assert free_list(pool).count(b) == 1
    assert_pool_invariant(pool)


def test_free_of_never_allocated_block_raises() -> None:
    pool = BlockPool(3)
    with pytest.raises(ValueError):
        pool.free([2])
    assert free_list(pool) == [0, 1, 2]


def test_exhaustion_raises_and_allocates_nothing() -> None:
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(BlockPoolExhausted, match="asked for 2 blocks, 1 free"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    assert free_list(pool) == [3]
    assert pool.ref_count(3) == 0
    assert pool.allocate(1) == [3]
    with pytest.raises(BlockPoolExhausted):
        pool.allocate(1)
    assert issubclass(BlockPoolExhausted, RuntimeError)


def test_usage_fraction() -> None:
    pool = BlockPool(8)
    assert pool.usage == 0.0
    blocks = pool.allocate(2)
    assert pool.usage == pytest.approx(0.25)
    more = pool.allocate(6)
    assert pool.usage == pytest.approx(1.0)
    pool.incref(more[0])  # sharing does not change usage
    assert pool.usage == pytest.approx(1.0)
    pool.free(blocks)
    assert pool.usage == pytest.approx(0.75)
    pool.free(more)
    # more[0] still has one reference.
    assert pool.usage == pytest.approx(1 / 8)
    pool.free([more[0]])
    assert pool.usage == 0.0


# --------------------------------------------------------------------------- KVCacheManager


def test_cdiv() -> None:
    assert [cdiv(n, 4) for n in range(0, 10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]


def test_manager_rejects_bad_block_size() -> None:
    with pytest.raises(ValueError, match="block_size=0"):
        KVCacheManager(4, 0)


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
def test_allocate_slots_grows_table_to_ceil(block_size: int) -> None:
    kv = KVCacheManager(64, block_size)
    previous: list[int] = []
    for n in sorted({0, 1, 2, block_size, block_size + 1, 2 * block_size, 5 * block_size - 1, 5 * block_size}):
        assert kv.allocate_slots("r", n)
        table = kv.block_table("r")
        assert len(table) == math.ceil(n / block_size)
        # Growth only appends: the blocks already held keep their positions.
        assert table[: len(previous)] == previous
        previous = list(table)
        assert kv.num_free_blocks == 64 - len(table)
    # Asking for fewer tokens never shrinks the table.
    assert kv.allocate_slots("r", 1)
    assert kv.block_table("r") == previous


def test_allocate_slots_takes_blocks_in_pool_order() -> None:
    kv = KVCacheManager(10, 4)
    assert kv.allocate_slots("a", 5)  # 2 blocks
    assert kv.allocate_slots("b", 4)  # 1 block
    assert kv.allocate_slots("a", 9)  # +1 block
    assert kv.block_table("a") == [0, 1, 3]
    assert kv.block_table("b") == [2]
    assert kv.num_blocks_needed("a", 12) == 0
    assert kv.num_blocks_needed("a", 13) == 1
    assert kv.num_blocks_needed("new", 13) == 4


def test_allocate_slots_returns_false_and_allocates_nothing_when_short() -> None:
    kv = KVCacheManager(4, 4)
    assert kv.allocate_slots("a", 8)  # 2 blocks
    assert kv.allocate_slots("b", 4)  # 1 block, 1 left
    before_free = free_list(kv.pool)
    before_a = list(kv.block_table("a"))
    assert not kv.allocate_slots("a", 16)  # needs 2 more, only 1 free
    assert kv.block_table("a") == before_a
    assert free_list(kv.pool) == before_free
    assert kv.num_free_blocks == 1
    assert not kv.allocate_slots("c", 5)  # needs 2
    assert kv.block_table("c") == []
    assert kv.num_free_blocks == 1
    assert "c" not in kv._tables or kv._tables["c"] == []
    # Exactly enough still works.
    assert kv.allocate_slots("a", 12)
    assert kv.num_free_blocks == 0
    assert_pool_invariant(kv.pool)


def test_free_returns_all_blocks_tail_first() -> None:
    kv = KVCacheManager(8, 2)
    assert kv.allocate_slots("a", 5)  # [0, 1, 2]
    assert kv.allocate_slots("b", 2)  # [3]
    assert kv.block_table("a") == [0, 1, 2]
    kv.free("a")
    assert kv.block_table("a") == []
    assert kv.num_free_blocks == 7
    # Remaining free blocks first, then a's blocks appended tail first.
    assert free_list(kv.pool) == [4, 5, 6, 7, 2, 1, 0]
    assert all(kv.pool.ref_count(b) == 0 for b in (0, 1, 2))
    assert kv.pool.ref_count(3) == 1
    # Freeing an unknown or already freed request is a no-op.
    kv.free("a")
    kv.free("never")
    assert kv.num_free_blocks == 7
    assert_pool_invariant(kv.pool)


def test_num_requests_holding_blocks_and_usage() -> None:
    kv = KVCacheManager(10, 4)
    assert kv.allocate_slots("empty", 0)
    assert kv.allocate_slots("a", 4)
    assert kv.allocate_slots("b", 9)
    assert kv.num_requests_holding_blocks() == 2
    assert kv.usage == pytest.approx(0.4)
    kv.free("b")
    assert kv.num_requests_holding_blocks() == 1
    assert kv.usage == pytest.approx(0.1)


@pytest.mark.parametrize("seed", range(8))
def test_random_operations_preserve_invariants(seed: int) -> None:
    """Seeded random allocate/grow/free sequences against a simple model of the manager."""
    rng = random.Random(seed)
    num_blocks = rng.randint(1, 24)
    block_size = rng.randint(1, 6)
    kv = KVCacheManager(num_blocks, block_size)
    tokens: dict[str, int] = {}  # model: tokens each live request holds slots for
    for step in range(300):
        op = rng.random()
        if op < 0.6 or not tokens:
            rid = rng.choice(list(tokens)) if tokens and rng.random() < 0.7 else f"r{rng.randint(0, 15)}"
            want = tokens.get(rid, 0) + rng.randint(0, 3 * block_size)
            have_blocks = len(kv.block_table(rid))
            needed = max(0, math.ceil(want / block_size) - have_blocks)
            free_before = kv.num_free_blocks
            ok = kv.allocate_slots(rid, want)
            assert ok == (needed <= free_before), (step, rid, want, needed, free_before)
            if ok:
                tokens[rid] = max(tokens.get(rid, 0), want)
                assert kv.num_free_blocks == free_before - needed
            else:
                assert kv.num_free_blocks == free_before
                assert len(kv.block_table(rid)) == have_blocks
        else:
            rid = rng.choice(list(tokens))
            held = list(kv.block_table(rid))
            free_before = free_list(kv.pool)
            kv.free(rid)
            del tokens[rid]
            assert free_list(kv.pool) == free_before + held[::-1]

        # free + referenced = all blocks, each exactly once.
        assert_pool_invariant(kv.pool)
        held_blocks = [b for rid in tokens for b in kv.block_table(rid)]
        assert len(held_blocks) == len(set(held_blocks)), "a block is in two tables"
        assert len(held_blocks) + kv.num_free_blocks == num_blocks
        assert all(kv.pool.ref_count(b) == 1 for b in held_blocks)
        # Only the last block of a table can be partly empty: exactly ceil(n / block_size) blocks.
        for rid, n in tokens.items():
            assert len(kv.block_table(rid)) == math.ceil(n / block_size)
        assert kv.usage == pytest.approx(len(held_blocks) / num_blocks)

    for rid in list(tokens):
        kv.free(rid)
    assert kv.num_free_blocks == num_blocks
    assert kv.usage == 0.0
    assert_pool_invariant(kv.pool)
