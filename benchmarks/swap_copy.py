"""Swap copy bandwidth between the KV cache on a GPU and the host swap space:
`worker.kv_cache.move_blocks` (gathered blocks cross in pinned memory) vs the
same gather crossing in pageable memory (what it did before), for the KV
blocks of a Llama-3-8B-shaped cache (32 layers, 8 KV heads x 128, bf16,
blocks of 16 tokens). Needs CUDA; prints a table and writes
benchmarks/results/gpu/swap_copy.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from pagoda.worker.kv_cache import move_blocks

LAYERS, BLOCK, HEADS, DIM = 32, 16, 8, 128


def pageable(source, target, pairs) -> None:
    to_device = target[0][0].device
    sources = torch.tensor([s for s, _ in pairs], device=source[0][0].device)
    targets = torch.tensor([t for _, t in pairs], device=to_device)
    for (sk, sv), (tk, tv) in zip(source, target):
        for s, t in ((sk, tk), (sv, tv)):
            t.index_copy_(0, targets, s.index_select(0, sources).to(to_device))


def timed(fn, *args) -> float:
    fn(*args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / 5


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 1
    num_blocks = 512
    shape = (num_blocks, BLOCK, HEADS, DIM)
    device = [(torch.randn(shape, dtype=torch.bfloat16, device="cuda"),) * 2 for _ in range(LAYERS)]
    host = [(torch.empty(shape, dtype=torch.bfloat16, pin_memory=True),) * 2 for _ in range(LAYERS)]
    rows = []
    for count in (8, 64, 256):
        pairs = [(i * 2 % num_blocks, i) for i in range(count)]
        megabytes = count * LAYERS * 2 * BLOCK * HEADS * DIM * 2 / 1e6
        for name, fn in (("pageable", pageable), ("pinned (move_blocks)", move_blocks)):
            out = timed(fn, device, host, pairs)
            back = timed(fn, host, device, [(t, s) for s, t in pairs])
            rows.append({"blocks": count, "MB": megabytes, "path": name, "out_s": out, "in_s": back,
                         "out_GBps": megabytes / 1e3 / out, "in_GBps": megabytes / 1e3 / back})
    print(f"{torch.cuda.get_device_name()}: swap copies of Llama-3-8B KV blocks (bf16, 16 tokens)")
    print(f"{'blocks':>6} {'MB':>7} {'path':>22} {'out GB/s':>9} {'in GB/s':>8}")
    for r in rows:
        print(f"{r['blocks']:>6} {r['MB']:>7.0f} {r['path']:>22} {r['out_GBps']:>9.1f} {r['in_GBps']:>8.1f}")
    out_dir = Path(__file__).parent / "results" / "gpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "swap_copy.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
