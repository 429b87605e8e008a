#!/usr/bin/env python
"""Decode attention of the compiled CPU kernel against the memory it reads.

One layer's decode step of the default model's shape (9 query heads, 3 KV heads, head_dim 64,
bf16 KV, blocks of 16, shuffled across the cache): `--rows` sequences of `--ctx` keys. The K/V
come from DRAM: the call cycles through `--copies` copies of the cache (1 copy of a small step
stays in L3, which shows the kernel's arithmetic alone). Beside it, a plain streaming read
(`torch.sum`) of the same bytes times the copies: the bandwidth the kernel could reach.

Compare builds by running this on each, alternately (the kernel is built from the source in
the tree at first use):

    .venv/bin/python benchmarks/attention_decode.py                      # 64 x 384, 8 copies
    .venv/bin/python benchmarks/attention_decode.py --ctx 192 512 --copies 1 8

Prints a table and writes benchmarks/results/attention_decode.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pagoda.model.attention.cpu_paged import CpuAttentionBackend, load_cpu_attention_op  # noqa: E402
from pagoda.model.attention.metadata import StepLayout  # noqa: E402
from soak import cpu_model  # noqa: E402  (the benchmarks' one CPU-name helper)

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16


def measure(rows: int, ctx: int, copies: int, rounds: int) -> dict:
    per_row = -(-ctx // BLOCK)
    num_blocks = rows * per_row + 1
    ids = list(range(1, num_blocks))
    random.Random(0).shuffle(ids)
    tables = torch.tensor(ids, dtype=torch.int32).view(rows, per_row)
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    caches = [(torch.randn(shape).bfloat16(), torch.randn(shape).bfloat16()) for _ in range(copies)]
    q = torch.randn(rows, HEADS, HEAD_DIM).bfloat16()
    k = torch.randn(rows, KV_HEADS, HEAD_DIM).bfloat16()
    v = torch.randn(rows, KV_HEADS, HEAD_DIM).bfloat16()
    last = ctx - 1
    slots = (tables[:, last // BLOCK].long() * BLOCK + last % BLOCK).contiguous()
    layout = StepLayout.build([1] * rows, [ctx] * rows, rows, tables, BLOCK, slot_mapping=slots)
    backend = CpuAttentionBackend(load_cpu_attention_op())
    meta = backend.build_metadata(layout)
    scale = HEAD_DIM ** -0.5
    for k_cache, v_cache in caches:  # warm-up (and the kernel's first-use build)
        backend.forward(q, k, v, k_cache, v_cache, meta, scale)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for k_cache, v_cache in caches:
            backend.forward(q, k, v, k_cache, v_cache, meta, scale)
        best = min(best, (time.perf_counter() - start) / copies)
    kv_bytes = 2 * rows * ctx * KV_HEADS * HEAD_DIM * 2
    stream = torch.empty(copies * kv_bytes // 2, dtype=torch.bfloat16).normal_()
    stream_best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        stream.sum()
        stream_best = min(stream_best, time.perf_counter() - start)
    return dict(rows=rows, ctx=ctx, copies=copies, us_per_call=best * 1e6, kv_bytes=kv_bytes,
                kernel_gbs=kv_bytes / best / 1e9, stream_gbs=stream.numel() * 2 / stream_best / 1e9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[64])
    parser.add_argument("--ctx", type=int, nargs="+", default=[384])
    parser.add_argument("--copies", type=int, nargs="+", default=[8], help="cache copies cycled (8: from DRAM)")
    parser.add_argument("--rounds", type=int, default=5, help="best of this many rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "attention_decode.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [measure(r, c, n, args.rounds) for r in args.rows for c in args.ctx for n in args.copies]
    print(f"{'rows':>5} {'ctx':>5} {'copies':>6} {'us/layer':>9} {'kernel GB/s':>12} {'stream GB/s':>12}")
    for r in results:
        print(f"{r['rows']:>5} {r['ctx']:>5} {r['copies']:>6} {r['us_per_call']:>9.0f} {r['kernel_gbs']:>12.1f} "
              f"{r['stream_gbs']:>12.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(cpu=cpu_model(), threads=args.threads, torch=torch.__version__,
                                         results=results), indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
