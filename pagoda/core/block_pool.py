"""The pool of physical KV-cache blocks: ids, reference counts, a free list.

Pure bookkeeping: a block is an integer id into the worker's KV tensors.

Invariants:
- a block is in the free list iff its ref count is 0;
- ids are 0..num_blocks-1, each exactly once in (free list ∪ referenced).
"""

from __future__ import annotations

from collections import deque


class BlockPoolExhausted(RuntimeError):
    """Asked for more blocks than are free; callers check first."""


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} is invalid: must be >= 1.")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        # Allocation pops from the left; freed blocks go to the right, so the
        # most recently freed block is reused last.
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0.0 to 1.0."""
        return 1.0 - len(self._free) / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise BlockPoolExhausted(f"asked for {count} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        for block_id in blocks:
            self._ref_counts[block_id] = 1
        return blocks

    def incref(self, block_id: int) -> None:
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"block {block_id} is free; cannot share it")
        self._ref_counts[block_id] += 1

    def free(self, blocks: list[int]) -> None:
        """Drops one reference to each block; blocks reaching 0 become free."""
        for block_id in blocks:
            count = self._ref_counts[block_id]
            if count <= 0:
                raise ValueError(f"block {block_id} freed more times than allocated")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._free.append(block_id)
