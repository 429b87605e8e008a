"""Maps requests to block tables on top of the block pool.

Invariant: a request holding `len(blocks)` blocks can store
`len(blocks) * block_size` tokens, and `len(blocks) == ceil(n / block_size)`
for the `n` tokens it has been given slots for, so only its last block may
be partly empty.
"""

from __future__ import annotations

from pagoda.core.block_pool import BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size={block_size} is invalid: must be >= 1.")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def num_blocks_needed(self, request_id: str, num_total_tokens: int) -> int:
        """How many more blocks the request needs to hold `num_total_tokens`."""
        have = len(self._tables.get(request_id, ()))
        return max(0, cdiv(num_total_tokens, self.block_size) - have)

    def allocate_slots(self, request_id: str, num_total_tokens: int) -> bool:
        """Grows the request's table to hold `num_total_tokens` tokens.

        Returns False, allocating nothing, when the pool has too few blocks.
        """
        needed = self.num_blocks_needed(request_id, num_total_tokens)
        if needed > self.pool.num_free_blocks:
            return False
        if needed:
            self._tables.setdefault(request_id, []).extend(self.pool.allocate(needed))
        else:
            self._tables.setdefault(request_id, [])
        return True

    def free(self, request_id: str) -> None:
        blocks = self._tables.pop(request_id, None)
        if blocks:
            # Tail first: with prefix caching, the tail is the least reusable.
            self.pool.free(list(reversed(blocks)))

    def num_requests_holding_blocks(self) -> int:
        return sum(1 for blocks in self._tables.values() if blocks)
