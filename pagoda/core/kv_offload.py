"""Host-memory and disk tiers for prefix-cache blocks.

When the device pool evicts a cached full block (its hash is known), its KV
is copied to a slot of a host-memory pool instead of being lost, and from
there written to a disk directory (one safetensors file per block, named by
its hash) when one is configured. A later request whose prefix misses on
the device but hits a tier gets the block back: a disk file is read into a
host slot, then the worker copies host -> device, and the request skips
computing those tokens.

This module is the bookkeeping and the host/disk storage; the copies between
device and host are the worker's (`SchedulerOutput.blocks_to_offload`,
`blocks_to_load`): offloads (device -> host) first of all the step's block
moves, while the evicted blocks still hold their KV; loads (host -> device)
last, into freshly taken device blocks (worker/model_runner.py says why).
Host slots filled by this step's offloads are written to disk after the
step (`after_step`); slots read or written in a step are pinned until then,
so nothing reuses them while a copy is pending.

Disk files carry the model fingerprint (weights, config, dtype, block size)
and a SHA-256 of their data. A file that does not match (another model, a
torn write, flipped bits) is ignored and deleted, never loaded. The folder
is kept under a size budget, least recently used files deleted first; a
failed write or read (disk full, I/O error) is logged and skipped.

Invariants:
- a hash is in at most one host slot; `_slot_of[h] == s` iff `_hash_of[s] == h`;
- a slot is free, or holds exactly one hash, never both;
- a pinned slot is neither evicted nor reused before `after_step`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from pagoda.core.block_pool import HostBlockPool

logger = logging.getLogger(__name__)

_FORMAT = "pagoda-kv-block-v1"


@dataclass
class OffloadStats:
    offloaded_blocks: int = 0  # device evictions saved to host memory
    host_hits: int = 0  # blocks brought back from host memory
    disk_hits: int = 0  # blocks brought back from disk
    disk_writes: int = 0
    rejected_files: int = 0  # disk files that did not match this model or were corrupt


class KVOffloadManager:
    def __init__(self, host: list[tuple[torch.Tensor, torch.Tensor]], fingerprint: str,
                 disk_dir: str | Path | None = None, disk_max_bytes: int | None = None):
        """`host`: per layer K and V of the host pool, [slots, block_size, kv_heads, head_dim]
        (worker/kv_cache.allocate_host_kv_caches, the swap space's layout; the worker copies
        into and out of it). `disk_max_bytes`: the disk folder's budget (None: unlimited)."""
        k_cache = host[0][0]
        if k_cache.shape[0] < 1:
            raise ValueError(f"num_host_blocks={k_cache.shape[0]} is invalid: must be >= 1.")
        self.host = host
        # One block as a disk file sees it: [layers, 2 (K, V), block_size, kv_heads, head_dim].
        self.block_shape = (len(host), 2, *k_cache.shape[1:])
        self.dtype = k_cache.dtype
        self.fingerprint = fingerprint
        self.pool = HostBlockPool(k_cache.shape[0])
        self._slot_of: OrderedDict[bytes, int] = OrderedDict()  # least recently used first
        self._hash_of: dict[int, bytes] = {}
        self._pinned: set[int] = set()
        self._unwritten: list[tuple[bytes, int]] = []  # filled this step, for the disk after the copies
        self.pending_offloads: list[tuple[int, int]] = []  # (device block, host slot)
        self.pending_loads: list[tuple[int, int]] = []  # (host slot, device block)
        self.stats = OffloadStats()
        self.disk_dir: Path | None = None
        self.disk_max_bytes = disk_max_bytes
        self._on_disk: OrderedDict[bytes, int] = OrderedDict()  # hash -> file size, least recently used first
        self.disk_bytes = 0
        if disk_dir is not None:
            # One subfolder per model fingerprint: models sharing a folder never collide.
            self.disk_dir = Path(disk_dir).expanduser() / fingerprint[:16]
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            files = []
            for path in self.disk_dir.glob("*.safetensors"):
                try:
                    files.append((path.stat().st_mtime, bytes.fromhex(path.stem), path.stat().st_size))
                except (ValueError, OSError):
                    continue  # not one of ours, or gone
            for _, block_hash, size in sorted(files):
                self._on_disk[block_hash] = size
                self.disk_bytes += size

    @property
    def num_host_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_disk_blocks(self) -> int:
        return len(self._on_disk)

    def on_disk(self, block_hash: bytes) -> bool:
        return block_hash in self._on_disk

    def contains(self, block_hash: bytes) -> bool:
        return block_hash in self._slot_of or block_hash in self._on_disk

    # -- device evictions ------------------------------------------------

    def offload(self, block_hash: bytes, device_block: int) -> None:
        """A cached device block is being evicted: keep its KV in host memory (copied by the
        worker before the block is reused). Dropped if every host slot is pinned this step."""
        self.cancel_load(device_block)
        if block_hash in self._slot_of:
            self._slot_of.move_to_end(block_hash)
            return
        slot = self._take_slot()
        if slot is None:
            return
        self._assign(block_hash, slot)
        self.pending_offloads.append((device_block, slot))
        self.stats.offloaded_blocks += 1
        if self.disk_dir is not None and block_hash not in self._on_disk:
            self._unwritten.append((block_hash, slot))

    def cancel_load(self, device_block: int) -> None:
        """A block a load was planned into is evicted before the load ran: skip the load."""
        if self.pending_loads:
            self.pending_loads = [(s, d) for s, d in self.pending_loads if d != device_block]

    # -- prefix hits -----------------------------------------------------

    def stage(self, block_hash: bytes) -> int | None:
        """The host slot holding `block_hash`'s KV, reading it from disk if needed; pinned for
        this step. None if it is in no tier, or its file is foreign or corrupt."""
        slot = self._slot_of.get(block_hash)
        if slot is not None:
            self._slot_of.move_to_end(block_hash)
            self._pinned.add(slot)
            self.stats.host_hits += 1
            return slot
        if block_hash not in self._on_disk:
            return None
        slot = self._take_slot()
        if slot is None:
            return None
        if not self._read(block_hash, slot):
            self.pool.free([slot])
            self._pinned.discard(slot)
            return None
        self._assign(block_hash, slot)
        self.stats.disk_hits += 1
        return slot

    def plan_load(self, slot: int, device_block: int) -> None:
        self.pending_loads.append((slot, device_block))

    def take_step_copies(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(offloads, loads) for the worker to do at the start of this step."""
        offloads, loads = self.pending_offloads, self.pending_loads
        self.pending_offloads, self.pending_loads = [], []
        return offloads, loads

    def discard(self, slots: list[int]) -> None:
        """A step failed before its copies surely ran: the host slots its offloads were to fill
        may hold anything, so they forget their hash and are freed (never written to disk).
        Call before `after_step`."""
        for slot in slots:
            block_hash = self._hash_of.pop(slot, None)
            if block_hash is None:
                continue
            del self._slot_of[block_hash]
            self.pool.free([slot])
        dropped = set(slots)
        self._unwritten = [(h, s) for h, s in self._unwritten if s not in dropped]

    def after_step(self) -> None:
        """The step's copies are done: write newly offloaded blocks to disk, unpin slots."""
        for block_hash, slot in self._unwritten:
            if self._hash_of.get(slot) == block_hash:
                self._write(block_hash, slot)
        self._unwritten.clear()
        self._pinned.clear()

    # -- host slots ------------------------------------------------------

    def _take_slot(self) -> int | None:
        """A free host slot, evicting the least recently used unpinned one if none is free."""
        if self.pool.num_free_blocks:
            [slot] = self.pool.allocate(1)
        else:
            victim = next((h for h, s in self._slot_of.items() if s not in self._pinned), None)
            if victim is None:
                return None
            slot = self._slot_of.pop(victim)
            del self._hash_of[slot]
        self._pinned.add(slot)
        return slot

    def _assign(self, block_hash: bytes, slot: int) -> None:
        self._slot_of[block_hash] = slot
        self._hash_of[slot] = block_hash

    # -- disk ------------------------------------------------------------

    def _path(self, block_hash: bytes) -> Path:
        return self.disk_dir / f"{block_hash.hex()}.safetensors"

    def _metadata(self, data: torch.Tensor) -> dict[str, str]:
        return {"format": _FORMAT, "fingerprint": self.fingerprint, "dtype": str(self.dtype),
                "shape": ",".join(map(str, self.block_shape)), "sha256": _digest(data)}

    def _write(self, block_hash: bytes, slot: int) -> None:
        from safetensors.torch import save_file

        data = self._block(slot)
        path = self._path(block_hash)
        temporary = path.with_suffix(".tmp")
        try:
            save_file({"kv": data}, str(temporary), metadata=self._metadata(data))
            os.replace(temporary, path)  # readers see a whole file or none
            size = path.stat().st_size
        except Exception as error:  # disk full, I/O error (safetensors wraps them in its own type)
            logger.warning("could not write KV block to %s: %s", path, error)
            _unlink(temporary)
            return
        self._on_disk[block_hash] = size
        self.disk_bytes += size
        self.stats.disk_writes += 1
        while self.disk_max_bytes is not None and self.disk_bytes > self.disk_max_bytes and len(self._on_disk) > 1:
            oldest, oldest_size = self._on_disk.popitem(last=False)
            self.disk_bytes -= oldest_size
            _unlink(self._path(oldest))

    def _forget_file(self, block_hash: bytes) -> None:
        self.disk_bytes -= self._on_disk.pop(block_hash, 0)
        _unlink(self._path(block_hash))

    def _read(self, block_hash: bytes, slot: int) -> bool:
        """Loads a disk block into `slot` if it is this model's and intact; else deletes the file."""
        from safetensors import safe_open

        path = self._path(block_hash)
        problem = None
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                data = f.get_tensor("kv")
        except OSError as error:  # gone, or an I/O error: not the file's fault, keep it
            logger.warning("could not read KV block file %s: %s", path, error)
            if not path.exists():
                self.disk_bytes -= self._on_disk.pop(block_hash, 0)
            return False
        except Exception as error:  # truncated, or not safetensors at all
            problem = f"unreadable ({type(error).__name__}: {error})"
        if problem is None:
            expected = self._metadata(data)
            for key in ("format", "fingerprint", "dtype", "shape"):
                if metadata.get(key) != expected[key]:
                    problem = f"{key} is {metadata.get(key)!r}, expected {expected[key]!r}"
                    break
            else:
                if tuple(data.shape) != self.block_shape or data.dtype != self.dtype:
                    problem = f"tensor {tuple(data.shape)} {data.dtype} does not match"
                elif metadata.get("sha256") != expected["sha256"]:
                    problem = "checksum mismatch"
        if problem is not None:
            logger.warning("ignoring KV block file %s: %s", path, problem)
            self.stats.rejected_files += 1
            self._forget_file(block_hash)
            return False
        for layer, (k_cache, v_cache) in enumerate(self.host):
            k_cache[slot].copy_(data[layer, 0])
            v_cache[slot].copy_(data[layer, 1])
        self._on_disk.move_to_end(block_hash)
        return True

    def _block(self, slot: int) -> torch.Tensor:
        """A host slot's KV as one tensor of `block_shape`."""
        return torch.stack([torch.stack((k_cache[slot], v_cache[slot])) for k_cache, v_cache in self.host])

    def flush_to_disk(self, slots: list[tuple[bytes, int]]) -> None:
        """Writes the given (hash, host slot) blocks to disk now (at shutdown)."""
        for block_hash, slot in slots:
            if self.disk_dir is not None and block_hash not in self._on_disk:
                self._write(block_hash, slot)


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        logger.warning("could not delete %s: %s", path, error)


def _digest(data: torch.Tensor) -> str:
    return hashlib.sha256(data.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def model_fingerprint(source_files: list[Path], config: dict, dtype: torch.dtype, block_size: int,
                      extra: dict | None = None) -> str:
    """Identifies KV contents: the weight files (names, sizes, modification times), the model
    config, the dtype and block size. Equal fingerprints mean interchangeable KV blocks."""
    digest = hashlib.sha256()
    for path in sorted(source_files):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}\n".encode())
    for key in sorted(config):
        digest.update(f"{key}={config[key]!r}\n".encode())
    digest.update(f"dtype={dtype} block_size={block_size} extra={sorted((extra or {}).items())}".encode())
    return digest.hexdigest()
