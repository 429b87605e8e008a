"""Load test of `pagoda serve`: TTFT, TPOT and throughput at several concurrencies.

Starts `pagoda serve` with the default model on a free loopback port (or uses
--url), sends the same 64 streaming completion requests at each concurrency
(token-id prompts of 32-256 tokens, 64-128 output tokens, ignore_eos), and,
for comparison, runs the same requests through the offline engine with
max_num_seqs equal to the largest concurrency. Prints a table and writes
benchmarks/results/serve_load.json.

Definitions: TTFT = request sent -> first chunk with text; TPOT = (E2E - TTFT)
/ (output tokens - 1); output tok/s = all output tokens / wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2-135m-instruct"


def _requests(n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(100, 49000) for _ in range(rng.randint(32, 256))], rng.randint(64, 128)) for _ in range(n)]


async def _one(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = None
    tokens = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and ttft is None:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    e2e = time.perf_counter() - start
    return {"ttft": ttft, "e2e": e2e, "tokens": tokens, "tpot": (e2e - ttft) / max(1, tokens - 1)}


async def _run_level(url: str, requests, concurrency: int) -> dict:
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def limited(prompt, max_tokens):
            async with semaphore:
                return await _one(client, url, prompt, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p, m) for p, m in requests))
        wall = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results)
    tpots = sorted(r["tpot"] for r in results)

    def pct(values, q):
        return values[min(len(values) - 1, int(q * len(values)))]

    return {
        "concurrency": concurrency, "wall_s": wall, "output_tok_s": sum(r["tokens"] for r in results) / wall,
        "ttft_mean_s": statistics.mean(ttfts), "ttft_p50_s": pct(ttfts, 0.5), "ttft_p99_s": pct(ttfts, 0.99),
        "tpot_mean_s": statistics.mean(tpots), "tpot_p50_s": pct(tpots, 0.5), "tpot_p99_s": pct(tpots, 0.99),
    }


def _offline(requests, max_num_seqs: int) -> dict:
    from pagoda import LLM, SamplingParams

    llm = LLM(MODEL, show_progress=False, max_num_seqs=max_num_seqs)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in requests]
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], params)
    wall = time.perf_counter() - start
    return {"max_num_seqs": max_num_seqs, "wall_s": wall,
            "output_tok_s": sum(len(o.outputs[0].token_ids) for o in outputs) / wall}


def _start_server(*extra_args: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "pagoda", "serve", "--port", str(port), *extra_args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(360):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("server did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-offline", action="store_true")
    args = parser.parse_args()

    requests = _requests(args.num_requests, args.seed)
    process, url = (None, args.url) if args.url else _start_server()
    try:
        levels = []
        for concurrency in args.concurrency:
            level = asyncio.run(_run_level(url, requests, concurrency))
            levels.append(level)
            print(f"concurrency {concurrency}: {level['output_tok_s']:.1f} tok/s, TTFT p50 {level['ttft_p50_s']:.2f} s",
                  file=sys.stderr, flush=True)
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    offline = None if args.skip_offline else _offline(requests, max(args.concurrency))

    print(f"\n{args.num_requests} requests, prompts 32-256 tokens, outputs 64-128 (ignore_eos), {platform.processor() or platform.machine()}")
    print(f"{'conc':>5} {'tok/s':>8} {'TTFT mean':>10} {'p50':>7} {'p99':>7} {'TPOT mean':>10} {'p50':>7} {'p99':>7}")
    for lv in levels:
        print(f"{lv['concurrency']:>5} {lv['output_tok_s']:>8.1f} {lv['ttft_mean_s']:>10.3f} {lv['ttft_p50_s']:>7.3f} "
              f"{lv['ttft_p99_s']:>7.3f} {lv['tpot_mean_s']:>10.3f} {lv['tpot_p50_s']:>7.3f} {lv['tpot_p99_s']:>7.3f}")
    if offline:
        top = levels[-1]
        print(f"offline engine, max_num_seqs={offline['max_num_seqs']}: {offline['output_tok_s']:.1f} tok/s; "
              f"server at concurrency {top['concurrency']} = {top['output_tok_s'] / offline['output_tok_s']:.0%} of it")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps({"levels": levels, "offline": offline,
                                                         "num_requests": args.num_requests}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
