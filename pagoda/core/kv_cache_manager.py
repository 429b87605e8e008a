"""Maps requests to block tables on top of the block pool, with automatic
prefix caching.

Prefix caching: every full block of a request is identified by a hash
chained over (parent block's hash, the block's token ids, extra keys such as
a per-request cache salt), so equal hashes mean equal KV contents. When a
request is admitted, the longest run of its leading full blocks already in
the pool is reused instead of recomputed — never its very last token, whose
logits must be computed. Blocks are registered once their tokens' KV is
written (`cache_full_blocks`), and freed blocks stay findable until evicted.

Invariant: a request holding `len(blocks)` blocks can store
`len(blocks) * block_size` tokens, and `len(blocks) == ceil(n / block_size)`
for the `n` tokens it has been given slots for, so only its last block may
be partly empty.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

from pagoda.core.block_pool import BlockPool
from pagoda.core.kv_offload import KVOffloadManager
from pagoda.request import Request

_ROOT = b"pagoda-prefix-v1"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_hash(parent: bytes | None, token_ids: list[int], extra_keys: tuple = ()) -> bytes:
    """Content hash of one full block; stable across processes (the disk tier keys on it)."""
    digest = hashlib.sha256(parent or _ROOT)
    digest.update(array("q", token_ids).tobytes())
    for key in extra_keys:
        digest.update(b"\x00" + str(key).encode())
    return digest.digest()


def request_block_hashes(token_ids: list[int], block_size: int, extra_keys: tuple = (),
                         known: list[bytes] | None = None) -> list[bytes]:
    """Hashes of every full block of `token_ids`, extending `known` (the first blocks' hashes)."""
    hashes = list(known or [])
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[i - 1] if i else None
        hashes.append(block_hash(parent, token_ids[i * block_size:(i + 1) * block_size], extra_keys))
    return hashes


@dataclass
class PrefixCacheStats:
    queries: int = 0  # tokens of admitted requests looked up
    hits: int = 0  # of those, tokens found cached

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 enable_fork_sharing: bool = True, offload: KVOffloadManager | None = None):
        if block_size < 1:
            raise ValueError(f"block_size={block_size} is invalid: must be >= 1.")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.enable_fork_sharing = enable_fork_sharing
        self.pool = BlockPool(num_blocks)
        # Host-memory/disk tiers: evicted cached blocks go there, and prefix lookups continue there.
        self.offload = offload if enable_prefix_caching else None
        if self.offload is not None:
            self.pool.on_evict = lambda block_id, block_hash: self.offload.offload(block_hash, block_id)
        self.prefix_stats = PrefixCacheStats()
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # per request: its full blocks' hashes so far
        self._num_registered: dict[str, int] = {}  # per request: leading table blocks already cached
        # Copy-on-write: (source, destination) block copies the worker must do before the
        # next forward pass. The scheduler moves them into its SchedulerOutput each step.
        self.pending_copies: list[tuple[int, int]] = []

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

    # -- prefix cache ------------------------------------------------------

    def _block_hashes(self, request: Request) -> list[bytes]:
        hashes = request_block_hashes(request.all_token_ids, self.block_size, request.cache_keys,
                                      self._hashes.get(request.request_id))
        self._hashes[request.request_id] = hashes
        return hashes

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Cached blocks holding the request's leading full blocks (none if caching is off,
        or the request needs every prompt position's logits). Changes no ref counts."""
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size  # the last token is always computed
        hashes = self._block_hashes(request)[:max_blocks]
        blocks = []
        for h in hashes:
            block_id = self.pool.cached_block(h)
            if block_id is None:
                break
            blocks.append(block_id)
        if self.offload is not None and len(blocks) < len(hashes):
            blocks += self._load_from_tiers(hashes[len(blocks):], blocks)
        return blocks

    def _load_from_tiers(self, hashes: list[bytes], device_hits: list[int]) -> list[int]:
        """Brings back, in order, the blocks of `hashes` the device evicted but host memory or
        disk kept: each gets a free device block registered under its hash and a host -> device
        copy planned for this step. The blocks are left free (cached), like any other prefix
        hit, so admission takes them as usual. While loading, the device hits and the loaded
        blocks hold a reference, so taking a block for the next load cannot evict them; one
        free block is always left."""
        peak = self.pool.peak_blocks_in_use  # the references below are bookkeeping, not use
        protected = list(device_hits)
        for block_id in protected:
            self.pool.incref(block_id)
        found = []
        for block_hash in hashes:
            block_id = self.pool.cached_block(block_hash)  # a later block may still be on the device
            if block_id is not None:
                self.pool.incref(block_id)
            else:
                if not self.offload.contains(block_hash) or self.pool.num_free_blocks < 2:
                    break
                slot = self.offload.stage(block_hash)
                if slot is None:
                    break
                [block_id] = self.pool.allocate(1)
                if not self.pool.cache_block(block_id, block_hash):  # cannot happen: checked above
                    self.pool.free([block_id])
                    break
                self.offload.plan_load(slot, block_id)
            found.append(block_id)
        self.pool.free(list(reversed(protected + found)))  # tail first: evicted first
        self.pool.peak_blocks_in_use = peak
        return found

    def count_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        if self.enable_prefix_caching:
            self.prefix_stats.queries += num_tokens
            self.prefix_stats.hits += num_hit_tokens

    def cache_full_blocks(self, request: Request) -> None:
        """Registers the request's blocks whose every token's KV is now written."""
        if not self.enable_prefix_caching:
            return
        table = self._tables.get(request.request_id)
        if not table:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(table))
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request)
        for i in range(start, num_full):
            self.pool.cache_block(table[i], hashes[i])
        self._num_registered[request.request_id] = num_full

    # -- allocation --------------------------------------------------------

    def allocate_slots(self, request_id: str, num_total_tokens: int, start_blocks: list[int] = (),
                       first_write: int | None = None) -> bool:
        """Grows the request's table to hold `num_total_tokens` tokens.

        A new request's table starts with `start_blocks`, shared with whoever
        holds them (prefix-cache hits, or a sibling's prompt blocks for a fork).
        `first_write` is the first position this step writes: any block from
        there on that is shared (ref count > 1) is copied first — copy on
        write — so a request never writes into another's KV.

        Returns False, changing nothing, when the pool has too few blocks.
        """
        bs = self.block_size
        table = self._tables.get(request_id)
        new_table = table is None
        current = list(start_blocks) if new_table else table
        # References the table will hold beyond everyone else's: +1 for blocks it is about to share.
        extra_ref = 1 if new_table else 0
        write_from = len(current) if first_write is None else first_write // bs
        cow = [i for i in range(write_from, len(current)) if self.pool.ref_count(current[i]) + extra_ref > 1]
        # Hits on free blocks take them out of the free queue: they count against it.
        revived = sum(1 for b in current if self.pool.ref_count(b) == 0) if new_table else 0
        needed = self.num_blocks_needed(request_id, num_total_tokens) if not new_table else \
            max(0, cdiv(num_total_tokens, bs) - len(current))
        if needed + len(cow) + revived > self.pool.num_free_blocks:
            return False
        if new_table:
            for i, block_id in enumerate(current):
                if i not in cow:
                    self.pool.incref(block_id)
            self._tables[request_id] = current
            self._num_registered[request_id] = min(write_from, len(current))
        for i in cow:
            [copy] = self.pool.allocate(1)
            self.pending_copies.append((current[i], copy))
            if not new_table:
                self.pool.free([current[i]])  # drop this request's reference to the shared original
            current[i] = copy
        if needed:
            current.extend(self.pool.allocate(needed))
        return True

    def fork(self, source_id: str, target_id: str) -> bool:
        """`target_id`'s table becomes a copy of `source_id`'s, sharing every block (one more
        reference each); whatever `target_id` held is freed first. No KV is copied here: a
        shared block is copied only when one of its holders writes into it (allocate_slots).

        With fork sharing off (a baseline for measurements) every block is copied into a new
        one instead; returns False, leaving `target_id` with no blocks, if too few are free.
        """
        self.free(target_id)
        blocks = self._tables.get(source_id)
        if not blocks:
            return True
        if not self.enable_fork_sharing:
            if len(blocks) > self.pool.num_free_blocks:
                return False
            copies = self.pool.allocate(len(blocks))
            self.pending_copies.extend(zip(blocks, copies))
            self._tables[target_id] = copies
            return True
        for block_id in blocks:
            self.pool.incref(block_id)
        self._tables[target_id] = list(blocks)
        if source_id in self._hashes:
            self._hashes[target_id] = list(self._hashes[source_id])
        self._num_registered[target_id] = self._num_registered.get(source_id, 0)
        return True

    def has_pending_copy_into(self, request_id: str) -> bool:
        """Whether a copy still to be done this step writes into one of the request's blocks."""
        if not self.pending_copies:
            return False
        targets = {target for _, target in self.pending_copies}
        return any(block_id in targets for block_id in self._tables.get(request_id, ()))

    def drop_copies_into_free_blocks(self) -> None:
        """Drops pending copies whose destination nobody holds any more (its request failed
        while being scheduled): left in the plan, such a copy could land on top of a block the
        same step gives to someone else. A destination that a kept copy reads is kept."""
        while True:
            sources = {source for source, _ in self.pending_copies}
            kept = [(s, d) for s, d in self.pending_copies if self.pool.ref_count(d) > 0 or d in sources]
            if len(kept) == len(self.pending_copies):
                return
            self.pending_copies = kept

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def truncate(self, request_id: str, num_tokens: int) -> None:
        """Frees the request's blocks beyond those holding its first `num_tokens` tokens (a step
        that was to fill them failed; none of them is registered yet)."""
        table = self._tables.get(request_id)
        keep = cdiv(num_tokens, self.block_size)
        if not table or len(table) <= keep:
            return
        tail = table[keep:]
        del table[keep:]
        self._num_registered[request_id] = min(self._num_registered.get(request_id, 0), keep)
        self.pool.free(list(reversed(tail)))

    def free(self, request_id: str) -> None:
        blocks = self._tables.pop(request_id, None)
        self._num_registered.pop(request_id, None)
        self._hashes.pop(request_id, None)
        if blocks:
            # Tail first: the tail is the least reusable, so it is evicted first.
            self.pool.free(list(reversed(blocks)))

    def num_requests_holding_blocks(self) -> int:
        return sum(1 for blocks in self._tables.values() if blocks)
