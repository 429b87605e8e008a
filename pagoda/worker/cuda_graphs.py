"""CUDA graphs for decode-only steps: captured once at start-up, replayed on fixed buffers.

A decode step at batch size ``n`` launches the same kernels, with the same shapes, every
time; only the data changes (token ids, positions, slots, block tables, lengths). On a
GPU those launches (hundreds per step for a 16-layer model) cost more than the kernels
themselves at small batch. So the forward pass of a decode-only step is captured as a CUDA
graph for each bucketed batch size (1, 2, 4, 8, then multiples of 8 up to
``max_num_seqs``, at most 512) and replayed with the step's data copied into the static
buffers the graph was captured on:

- ``input_ids``, ``positions``, ``slot_mapping`` [max_bucket]; ``block_tables``
  [max_bucket, blocks per sequence at max_model_len] int32; ``seq_lens`` [max_bucket] int32;
  ``query_start_loc`` = 0..max_bucket (one token per row, fixed).
- A step of ``n`` rows replays the smallest bucket ``b >= n``; rows ``n..b-1`` are padding:
  slot -1 (the Triton KV-write kernel skips negative slots, so nothing real is written),
  ``seq_len`` 1 over block 0 (a valid read whose result is thrown away), token 0 at position 0.
- The attention metadata of each bucket is built once (``TritonAttentionMetadata`` over
  the static tensors), with a split-K count fixed per bucket: the kernel computes each
  range from the row's ``seq_len`` at run time, so one count serves every length (ranges
  past a short row's keys are empty and weigh nothing in the merge).
- Outputs are the graph's own static tensor: ``replay`` returns a view of its first ``n``
  rows, valid until the next replay (the runner samples from it before then).

Only the ``triton`` attention backend takes graphs (the torch backend's metadata is
Python lists whose shape follows the lengths; the cpu backend is for CPU). Prefill and mixed
steps, steps wider than the largest bucket and speculative verification (several tokens a
row) run eagerly. ``--enforce-eager`` / ``enforce_eager=True`` turns graphs off.

Everything here needs ``torch.cuda.is_available()``, except the ``dry_run`` mode tests use:
it keeps the static buffers, padding and per-bucket metadata but runs the forward pass
eagerly on them at each replay (no capture), so the plumbing is tested on CPU under Triton's
interpreter (tests/kernels/test_cuda_graph_buffers.py). The capture itself is exercised by
tests/gpu/ and benchmarks/gpu_suite.py on a GPU.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pagoda.worker.input_batch import HostDecodeStep
    from pagoda.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_MAX_CAPTURED_BATCH = 512


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Bucketed batch sizes to capture: 1, 2, 4, 8, 16, 24, ... up to max_num_seqs (at most 512)."""
    top = max(1, min(max_num_seqs, _MAX_CAPTURED_BATCH))
    sizes = [b for b in (1, 2, 4) if b < top] + list(range(8, top, 8))
    return sorted(set(sizes + [top]))


class _Graph:
    """One captured bucket: replay() re-runs it and returns its static output."""

    def __init__(self, run, graph: torch.cuda.CUDAGraph | None, output: torch.Tensor):
        self._run = run  # dry run: the eager forward over the static buffers
        self.graph = graph
        self.output = output

    def replay(self) -> torch.Tensor:
        if self.graph is None:
            self.output = self._run()
        else:
            self.graph.replay()
        return self.output


class CudaGraphRunner:
    def __init__(self, runner: ModelRunner, max_num_seqs: int, max_model_len: int, dry_run: bool = False):
        from pagoda.model.attention.triton_paged import TritonAttentionBackend, decode_splits

        backend = runner.attention
        if not isinstance(backend, TritonAttentionBackend):
            raise ValueError(f"CUDA graphs need the triton attention backend, not {backend.name!r}")
        self.runner = runner
        self.dry_run = dry_run
        self.device = runner.device
        self.block_size = runner.block_size
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        self.max_batch = self.batch_sizes[-1]
        self.max_blocks = -(-max_model_len // self.block_size)
        device, top = self.device, self.max_batch
        # The static inputs are views of one byte buffer, filled from a pinned host twin with one
        # copy per step: int64 input ids, positions and slots, int32 seq_lens, then the int32
        # block tables [top, max_blocks] last, so a bucket of b rows needs the buffer's first
        # `_tables_at + b * max_blocks * 4` bytes only (entries past a row's blocks are never read).
        self._tables_at = 28 * top
        nbytes = self._tables_at + 4 * top * self.max_blocks
        self._device_bytes = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self._host_bytes = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self.input_ids, self.positions, self.slot_mapping, self.seq_lens, self.block_tables = self._views(
            self._device_bytes)
        self._host = tuple(view.numpy() for view in self._views(self._host_bytes))
        self._host[2][:] = -1  # padding: no slot, one key (of block 0)
        self._host[3][:] = 1
        self._device_bytes.copy_(self._host_bytes)
        # The event after the last copy: the host twin is free again once it has passed.
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self._copy_pending = False
        self.query_start_loc = torch.arange(top + 1, dtype=torch.int32, device=device)
        self._backend = backend
        # Speculative decoding forces one range (verification must round like decoding).
        self._forced_splits = backend.num_splits
        self._decode_splits = decode_splits
        self._max_model_len = max_model_len
        self.graphs: dict[int, _Graph] = {}
        self.num_replays = 0

    def _views(self, buffer: torch.Tensor) -> tuple[torch.Tensor, ...]:
        top = self.max_batch
        int64 = [buffer[8 * top * i:8 * top * (i + 1)].view(torch.int64) for i in range(3)]
        seq_lens = buffer[24 * top:self._tables_at].view(torch.int32)
        tables = buffer[self._tables_at:].view(torch.int32).view(top, self.max_blocks)
        return (*int64, seq_lens, tables)

    # -- capture -------------------------------------------------------------

    def _metadata(self, batch: int):
        from pagoda.model.attention.triton_paged import TritonAttentionMetadata

        kv_heads = self._backend.num_kv_heads
        splits = self._forced_splits or self._decode_splits(batch, kv_heads, self._max_model_len)
        return TritonAttentionMetadata(
            backend=self._backend, slot_mapping=self.slot_mapping[:batch], block_tables=self.block_tables[:batch],
            query_start_loc=self.query_start_loc[:batch + 1], seq_lens=self.seq_lens[:batch], num_rows=batch,
            num_decodes=batch, num_splits=splits, prefill_tiles=None)

    @torch.inference_mode()
    def capture(self) -> CudaGraphRunner:
        """Captures every bucket, largest first (smaller ones reuse its memory pool)."""
        start = time.perf_counter()
        model, kv_caches = self.runner.model, self.runner.kv_caches
        pool = None if self.dry_run else torch.cuda.graph_pool_handle()
        for batch in reversed(self.batch_sizes):
            meta = self._metadata(batch)
            ids, positions = self.input_ids[:batch], self.positions[:batch]

            def run(ids=ids, positions=positions, meta=meta):
                return model(ids, positions, kv_caches, meta)

            if self.dry_run:
                self.graphs[batch] = _Graph(run, None, run())
                continue
            for _ in range(2):  # compile the Triton kernels and settle the allocator before capturing
                run()
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                output = run()
            torch.cuda.synchronize(self.device)
            self.graphs[batch] = _Graph(run, graph, output)
        if not self.dry_run:
            logger.info("captured CUDA graphs for decode batches %s in %.1f s", self.batch_sizes,
                        time.perf_counter() - start)
        return self

    # -- replay --------------------------------------------------------------

    def covers(self, num_rows: int, num_decodes: int) -> bool:
        """Whether a step may replay a graph: decode rows only, within the largest bucket (and
        block tables within the captured width: `replay` checks that)."""
        return 0 < num_rows <= self.max_batch and num_decodes == num_rows

    def bucket(self, num_rows: int) -> int:
        for size in self.batch_sizes:
            if size >= num_rows:
                return size
        raise ValueError(f"{num_rows} rows is more than the largest captured batch ({self.max_batch})")

    def replay(self, step: HostDecodeStep) -> torch.Tensor:
        """The step's hidden states [n, hidden] (a view of the graph's output, valid until the next
        replay): its arrays written into the pinned host twin (padding rows reset), one copy to
        the static buffers, the graph replayed."""
        n = len(step.rows)
        size = self.bucket(n)
        width = step.block_tables.shape[1]
        if width > self.max_blocks:
            raise ValueError(f"a row needs {width} blocks; the graphs were captured for {self.max_blocks}")
        if self._copy_pending:  # the last step's copy has read the host twin (long since, as a rule)
            self._copied.synchronize()
        ids, positions, slots, seq_lens, tables = self._host
        ids[:n] = step.input_ids
        positions[:n] = step.positions
        slots[:n] = step.slot_mapping
        seq_lens[:n] = step.seq_lens
        tables[:n, :width] = step.block_tables
        if size > n:  # padding rows: token 0 at position 0, no slot, one key of block 0
            ids[n:size] = 0
            positions[n:size] = 0
            slots[n:size] = -1
            seq_lens[n:size] = 1
            tables[n:size, 0] = 0
        nbytes = self._tables_at + 4 * size * self.max_blocks
        self._device_bytes[:nbytes].copy_(self._host_bytes[:nbytes], non_blocking=True)
        if self._copied is not None:
            self._copied.record(torch.cuda.current_stream(self.device))
            self._copy_pending = True
        self.num_replays += 1
        return self.graphs[size].replay()[:n]


def capture_decode_graphs(runner: ModelRunner, max_num_seqs: int, max_model_len: int,
                          enforce_eager: bool) -> CudaGraphRunner | None:
    """The engine's start-up hook: graphs for decode steps where they apply (a CUDA device, the
    triton attention backend, not enforce_eager), else None (every step eager). A capture that
    fails is logged as a warning and leaves every step eager (tests/gpu asserts graphs exist)."""
    if enforce_eager or runner.device.type != "cuda" or not torch.cuda.is_available():
        return None
    if runner.attention.name != "triton":
        logger.info("CUDA graphs are off: they need the triton attention backend (this engine runs %r)",
                    runner.attention.name)
        return None
    try:
        return CudaGraphRunner(runner, max_num_seqs, max_model_len).capture()
    except (RuntimeError, torch.cuda.OutOfMemoryError) as error:  # the engine still serves, eagerly
        torch.cuda.synchronize(runner.device)
        logger.warning("CUDA graph capture failed, every step runs eagerly (%s: %s)", type(error).__name__, error)
        return None
