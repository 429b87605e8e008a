"""Where does a serving process's resident memory go? The soak's traffic, in process.

Runs the engine the way `pagoda serve` does (AsyncLLM: the step loop on its own
thread) with --concurrency asyncio clients, no HTTP: random prompt lengths, random
output lengths, a seed per request, and a share of requests abandoned after a few
outputs (the stream is closed, so the request is aborted). After every --round
requests it records:

- resident memory (VmRSS), and glibc's malloc statistics (mallinfo2, summed over
  all arenas): bytes in use by malloc'ed chunks, free bytes malloc keeps in its
  arenas, and bytes in mmapped chunks;
- Python: live objects tracked by the gc, the most common types, and (with
  --tracemalloc) memory allocated by Python code;
- the engine's per-request tables (scheduler, KV-cache manager, front end),
  which must be empty between rounds.

With --trim it calls malloc_trim(0) after each round and records RSS again: what
glibc gives back is memory it was caching, not memory anything still holds.

Prints one line per round and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import random
import re
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def rss() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def malloc_figures() -> dict:
    m = _libc.mallinfo2()
    return {"heap_bytes": m.arena, "in_use_bytes": m.uordblks, "free_in_arenas_bytes": m.fordblks,
            "mmapped_bytes": m.hblkhd, "mmapped_chunks": m.hblks}


def engine_tables(llm) -> dict:
    engine = llm.engine
    kv = engine.kv_cache_manager
    return {"parents": len(engine._parents), "seq_to_parent": len(engine._seq_to_parent),
            "scheduler_requests": len(engine.scheduler._requests), "running": len(engine.scheduler.running),
            "kv_tables": len(kv._tables), "kv_hashes": len(kv._hashes), "kv_registered": len(kv._num_registered),
            "cached_blocks": kv.pool.num_cached_blocks, "streams": len(llm._streams),
            "accepting": len(llm._accepting)}


async def drive(llm, n: int, concurrency: int, rng: random.Random, abandon: float) -> int:
    from pagoda.sampling_params import SamplingParams

    todo = iter(range(n))
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        for i in todo:
            prompt = [rng.randrange(100, 49000) for _ in range(rng.choice((rng.randint(5, 60), rng.randint(60, 600))))]
            params = SamplingParams(max_tokens=rng.randint(8, 96), temperature=0.8, seed=rng.randrange(1 << 30))
            stop_after = rng.randint(1, 6) if rng.random() < abandon else None
            outputs = llm.generate(prompt, params, f"probe-{time.monotonic_ns()}-{i}")
            seen = 0
            async for output in outputs:
                seen += 1
                if stop_after is not None and seen >= stop_after:
                    break
            await outputs.aclose()  # abandoning the stream aborts the request
            tokens += len(output.outputs[0].token_ids)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--round", type=int, default=100, help="requests per round (default: 100)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--abandon", type=float, default=0.3, help="share of requests abandoned (default: 0.3)")
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) after each round")
    parser.add_argument("--tracemalloc", action="store_true", help="trace Python allocations (slower)")
    parser.add_argument("--kv-cache-memory", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from pagoda.config import engine_config_from_kwargs
    from pagoda.engine.async_engine import AsyncLLM
    from pagoda.engine.llm_engine import LLMEngine

    rows = [{"round": "before load", "rss_bytes": rss(), **malloc_figures()}]
    t0 = time.perf_counter()
    kwargs = {"kv_cache_memory": args.kv_cache_memory} if args.kv_cache_memory else {}
    llm = AsyncLLM(LLMEngine(engine_config_from_kwargs("smollm2-135m-instruct", **kwargs), show_progress=False))
    rows.append({"round": "engine built", "seconds": time.perf_counter() - t0, "rss_bytes": rss(), **malloc_figures()})
    print(json.dumps(rows[-1]), flush=True)
    if args.tracemalloc:
        tracemalloc.start(10)
    rng = random.Random(0)
    first_snapshot = None
    baseline_types = None
    for r in range(args.rounds):
        start = time.perf_counter()
        tokens = asyncio.run(drive(llm, args.round, args.concurrency, rng, args.abandon))
        time.sleep(0.5)  # aborts land within a step
        gc.collect()
        objects = gc.get_objects()
        types = Counter(type(o).__name__ for o in objects)
        if baseline_types is None:
            baseline_types = types
        row = {"round": r + 1, "seconds": round(time.perf_counter() - start, 1), "tokens": tokens,
               "rss_bytes": rss(), **malloc_figures(), "gc_objects": len(objects),
               "types_grown_since_round_1": dict((types - baseline_types).most_common(8)),
               "tables": engine_tables(llm)}
        del objects
        if args.tracemalloc:
            current, peak = tracemalloc.get_traced_memory()
            row["python_traced_bytes"] = current
            snapshot = tracemalloc.take_snapshot()
            if first_snapshot is None:
                first_snapshot = snapshot
            else:
                row["python_top_growth"] = [str(s) for s in snapshot.compare_to(first_snapshot, "lineno")[:5]]
        if args.trim:
            _libc.malloc_trim(0)
            row["rss_after_trim_bytes"] = rss()
            row.update({f"after_trim_{k}": v for k, v in malloc_figures().items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
    _libc.malloc_trim(0)
    rows.append({"round": "final malloc_trim(0)", "rss_bytes": rss(), **malloc_figures(), "tables": engine_tables(llm)})
    print(json.dumps(rows[-1]), flush=True)
    llm.shutdown()
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
