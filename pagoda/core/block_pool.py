"""The pool of physical KV-cache blocks: ids, reference counts, a free queue,
and the prefix cache's index of full blocks by content hash.

Pure bookkeeping: a block is an integer id into the worker's KV tensors.

A freed block keeps its contents and its hash: it stays findable by
`cached_block(hash)` until a new allocation evicts it. The free queue is in
eviction order (least recently freed first); allocation takes from its
front, `free` appends to its back, and a cache hit on a free block takes it
out of the middle, all in O(1) (an OrderedDict).

Invariants:
- a block is in the free queue iff its ref count is 0;
- ids are 0..num_blocks-1, each exactly once in (free queue ∪ referenced);
- `_cached[h] == b` iff `_hashes[b] == h` (one block per hash, one hash per block).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable


class BlockPoolExhausted(RuntimeError):
    """Asked for more blocks than are free; callers check first."""


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} is invalid: must be >= 1.")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hashes: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self.num_evictions = 0  # cached blocks whose contents were dropped for a new allocation
        # Called with (block id, hash) when a cached block is evicted, before it is reused:
        # the offload tiers keep its KV (core/kv_offload.py).
        self.on_evict: Callable[[int, bytes], None] | None = None
        self.peak_blocks_in_use = 0  # the most blocks referenced at once

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0.0 to 1.0 (free cached blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> bytes | None:
        return self._hashes[block_id]

    def allocate(self, count: int) -> list[int]:
        """`count` blocks with ref count 1, taken least recently freed first (evicting their cached contents)."""
        if count > len(self._free):
            raise BlockPoolExhausted(f"asked for {count} blocks, {len(self._free)} free")
        blocks = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self._ref_counts[block_id] = 1
            blocks.append(block_id)
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.num_blocks - len(self._free))
        return blocks

    def _evict(self, block_id: int) -> None:
        block_hash = self._hashes[block_id]
        if block_hash is not None:
            del self._cached[block_hash]
            self._hashes[block_id] = None
            self.num_evictions += 1
            if self.on_evict is not None:
                self.on_evict(block_id, block_hash)

    def incref(self, block_id: int) -> None:
        """One more reference: a cache hit on a free block takes it out of the free queue."""
        if self._ref_counts[block_id] == 0:
            if self._hashes[block_id] is None:
                raise ValueError(f"block {block_id} is free and not cached; cannot share it")
            del self._free[block_id]
            self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.num_blocks - len(self._free))
        self._ref_counts[block_id] += 1

    def free(self, blocks: list[int]) -> None:
        """Drops one reference to each block; blocks reaching 0 join the back of the free queue
        (in the order given), keeping their contents and hash."""
        for block_id in blocks:
            count = self._ref_counts[block_id]
            if count <= 0:
                raise ValueError(f"block {block_id} freed more times than allocated")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._free[block_id] = None

    # -- prefix cache ------------------------------------------------------

    def cached_blocks(self) -> list[tuple[bytes, int]]:
        """Every (hash, block id) the prefix cache holds."""
        return list(self._cached.items())

    def cached_block(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash)

    def cache_block(self, block_id: int, block_hash: bytes) -> bool:
        """Registers a full, referenced block under its content hash.

        Returns False (registering nothing) if another block already holds
        that content: the first one stays the one that is found.
        """
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"block {block_id} is free; only blocks in use are cached")
        if self._hashes[block_id] is not None or block_hash in self._cached:
            return False
        self._hashes[block_id] = block_hash
        self._cached[block_hash] = block_id
        return True

    def uncache(self, block_id: int) -> None:
        """Forgets the block's hash, if it has one (its contents can no longer be trusted:
        a step that was to write them failed). The block stays where it is, in use or free."""
        block_hash = self._hashes[block_id]
        if block_hash is not None:
            del self._cached[block_hash]
            self._hashes[block_id] = None

    def reset_cache(self) -> int:
        """Forgets every cached hash (e.g. after the weights change); returns how many."""
        count = len(self._cached)
        for block_id in self._cached.values():
            self._hashes[block_id] = None
        self._cached.clear()
        return count


class HostBlockPool:
    """Ids 0..num_blocks-1 and a free list: no ref counts (a host block has one owner) and no prefix cache."""

    def __init__(self, num_blocks: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks={num_blocks} is invalid: must be >= 0.")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._in_use = [False] * num_blocks
        self.peak_blocks_in_use = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of host blocks in use, 0.0 to 1.0 (0.0 for an empty pool)."""
        return 1.0 - len(self._free) / self.num_blocks if self.num_blocks else 0.0

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise ValueError(f"asked for {count} host blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        for block_id in blocks:
            self._in_use[block_id] = True
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.num_blocks - len(self._free))
        return blocks

    def free(self, blocks: list[int]) -> None:
        for block_id in blocks:
            if not self._in_use[block_id]:
                raise ValueError(f"host block {block_id} freed but not in use")
            self._in_use[block_id] = False
            self._free.append(block_id)
