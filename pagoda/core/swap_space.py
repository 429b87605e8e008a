"""Swap space: host-memory blocks holding the KV of requests preempted by swapping.

Pure bookkeeping, like the block pool: a host block is an integer id into
the worker's host KV tensors, which have the device ones' block shape.

`swap_out` moves a request's whole device block table to as many fresh host
blocks and drops its device references. A block it shares with another
request (ref count > 1: a prefix-cache hit, a sibling's prompt) is copied
all the same; the request just lets go of its reference, and after
`swap_in` it holds a fresh, unshared copy. `swap_in` allocates fresh device
blocks for the table plus room for the tokens the request computes next,
and gives the host blocks back.

Ordering: the worker applies a step's block operations in a fixed order
(`ModelRunner.apply_block_copies`): device reads (offload-tier saves,
swap-outs) before device writes (swap-ins, copy-on-write copies, offload-tier
loads), all before the forward pass. Hence:
- a device block freed by a swap-out may be allocated again in the same
  step (to a swap-in, a copy, new tokens): it is read before it is written;
- a host block read by a swap-in must not be written by a swap-out of the
  same step, which the worker runs first. So `swap_in` does not free the
  host blocks it reads: they stay in flight until `release` (the scheduler
  calls it with the step's `blocks_to_swap_in` in `update_from_output`,
  once the worker has run the step). Host blocks of a swapped request that
  is aborted are freed at once: nothing will read them, and a swap-out that
  reuses them belongs to a later step than the swap-out that wrote them.
The scheduler keeps two more rules (see its module docstring): a request
already planned in the step is preempted by recompute, and no swap-in
follows a preemption in the same step.

Invariants:
- host ids 0..num_blocks-1 are each in exactly one of: the free list, one
  swapped request's host table, the in-flight set (read by a swap-in whose
  step has not come back yet);
- a request holds device blocks (in the KV cache manager) or host blocks
  (here), never both; a swapped request's host table has one block per
  device block it held, in table order.
"""

from __future__ import annotations

from pagoda.core.block_pool import HostBlockPool
from pagoda.core.kv_cache_manager import KVCacheManager


class SwapSpace:
    def __init__(self, kv_cache: KVCacheManager, num_blocks: int):
        self.kv_cache = kv_cache
        self.pool = HostBlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}  # per swapped request: its host blocks, in table order
        self._in_flight: set[int] = set()  # host blocks read by swap-ins whose step has not come back

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_requests(self) -> int:
        """Swapped-out requests (holding host blocks)."""
        return len(self._tables)

    def host_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def holds(self, request_id: str) -> bool:
        return request_id in self._tables

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def release(self, host_blocks: list[int]) -> None:
        """Frees host blocks a swap-in read, once the worker has run that step's swap-ins."""
        for block_id in host_blocks:
            if block_id not in self._in_flight:
                raise ValueError(f"host block {block_id} released but not read by a swap-in")
            self._in_flight.remove(block_id)
        self.pool.free(host_blocks)

    def can_swap_out(self, request_id: str) -> bool:
        """True when the request holds device blocks and the free host blocks can take them all."""
        num = len(self.kv_cache.block_table(request_id))
        return 0 < num <= self.pool.num_free_blocks

    def swap_out(self, request_id: str) -> list[tuple[int, int]]:
        """Moves the request's device blocks to fresh host blocks; returns the (device, host)
        copies for the worker, in table order. Its device references are dropped at once."""
        if not self.can_swap_out(request_id):
            raise ValueError(f"request {request_id!r} cannot be swapped out: it holds "
                             f"{len(self.kv_cache.block_table(request_id))} device blocks, "
                             f"{self.pool.num_free_blocks} host blocks are free")
        if request_id in self._tables:
            raise ValueError(f"request {request_id!r} is already swapped out")
        device = list(self.kv_cache.block_table(request_id))
        host = self.pool.allocate(len(device))
        self.kv_cache.free(request_id)  # also restarts its prefix-cache registration
        self._tables[request_id] = host
        return list(zip(device, host))

    def swap_in(self, request_id: str, num_total_tokens: int) -> list[tuple[int, int]] | None:
        """Gives a swapped request fresh device blocks for `num_total_tokens` tokens (at least
        what it held); returns the (host, device) copies for the worker, in table order, or
        None, changing nothing, when too few device blocks are free."""
        host = self._tables.get(request_id)
        if host is None:
            raise ValueError(f"request {request_id!r} is not swapped out")
        if -(-num_total_tokens // self.kv_cache.block_size) < len(host):
            raise ValueError(f"num_total_tokens={num_total_tokens} is invalid: request {request_id!r} "
                             f"holds {len(host)} host blocks of {self.kv_cache.block_size} tokens")
        if self.kv_cache.block_table(request_id):
            raise ValueError(f"request {request_id!r} holds device blocks and host blocks")
        # A new table of fresh blocks (no start blocks: nothing shared, no copy on write);
        # its prefix-cache registration starts from its first block.
        if not self.kv_cache.allocate_slots(request_id, num_total_tokens):
            return None
        device = self.kv_cache.block_table(request_id)
        del self._tables[request_id]
        self._in_flight.update(host)  # freed by `release`, after the worker read them
        return list(zip(host, device))

    def free(self, request_id: str) -> None:
        """Drops a swapped request's host blocks (abort): freed at once, see the module docstring."""
        host = self._tables.pop(request_id, None)
        if host:
            self.pool.free(host)
