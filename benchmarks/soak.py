"""Soak test of `pagoda serve`: minutes of mixed traffic, then checks that nothing
failed, nothing stayed behind and resident memory stopped growing.

Starts `pagoda serve` with the default model on a free loopback port (or uses
--url), then for --minutes keeps --concurrency clients busy. Each client picks
its next request at random from six kinds:

  chat, completion                 non-streaming; must answer 200 with usage
  chat-stream, completion-stream   streaming with include_usage; must end in [DONE]
  stream-disconnect                streaming; the client hangs up after 1-6 chunks
  nonstream-disconnect             non-streaming; the client hangs up after 0.05-1 s,
                                   before the answer (a long max_tokens)

Prompt lengths are spread over a few tokens to ~700 (most short, some long), so
the token count of engine steps keeps changing as in real traffic; half of the
chats share a system prompt, so the prefix cache takes hits. Every --sample-every
seconds it records the server's resident memory (VmRSS from /proc/<pid>/status,
summed over the server process and its children; with --url and no --pid, the
server's own process_resident_memory_bytes) and its /metrics:
pagoda:generation_tokens_total, pagoda:num_requests_running / _waiting,
pagoda:kv_cache_usage_perc.

After the load it stays idle (up to --idle seconds) until the server has
drained: no request running or waiting, KV-cache usage back to ~0.

What it reports:
- requests by kind and outcome; failures are any non-2xx, transport error or
  broken stream (no [DONE], no usage) other than the intended hang-ups, with
  examples;
- tokens: what clients received (usage of completed requests, chunks of the
  hung-up streams) next to the growth of pagoda:generation_tokens_total. The
  counter counts the tokens of requests that *finished*; a hung-up request,
  streaming or not, is aborted and its tokens (even those a stream delivered
  before the hang-up) are not in it. So the counter matches the completed
  requests' usage, give or take a request that finished in the instant its
  client hung up (counted by the server, never read);
- resident memory: at start, after the warm-up (--warmup-minutes), at the end,
  growth after the warm-up in %, and the slope after the warm-up (MB/min).

Prints tables (rich) and writes JSON (--out, default benchmarks/results/soak.json)
with every sample. Exits 1 on any failure, if the server did not drain, or if
memory grew more than --max-growth-pct after the warm-up. docs/soak.md has the
latest result and what explains the memory curve.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2-135m-instruct"
KINDS = ("chat", "completion", "chat-stream", "completion-stream", "stream-disconnect", "nonstream-disconnect")
DISCONNECT_KINDS = ("stream-disconnect", "nonstream-disconnect")
METRICS = ("pagoda:generation_tokens_total", "pagoda:num_requests_running", "pagoda:num_requests_waiting",
           "pagoda:kv_cache_usage_perc", "process_resident_memory_bytes")
IDLE_METRICS = METRICS[1:4]
SERVER_ENV = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY", "MALLOC_ARENA_MAX", "OMP_NUM_THREADS")

_SYSTEM = "You are a careful assistant. Answer briefly and plainly, in full sentences, without lists."
_TOPICS = ("the tides", "a bicycle gear", "bread rising", "a rainbow", "compound interest", "a compass",
           "why ice floats", "a lighthouse", "how bees find flowers", "a steam engine", "echoes", "autumn leaves",
           "a suspension bridge", "the moon's phases", "yeast", "a sundial", "glaciers", "a violin string")
_WORDS = ("the old harbour town woke slowly while fishermen mended nets and gulls argued over the morning "
          "catch near warm ovens in narrow streets where children ran past painted doors toward a quiet market "
          "square full of apples bread cheese rope lanterns and letters from distant cities").split()


def _text(rng: random.Random) -> str:
    """Context of any length: most short, some long (0-500 words, ~1.3 tokens each), so every
    step's token count differs, as in real traffic (a fixed set of lengths would hide shape effects)."""
    n = rng.randint(0, 40) if rng.random() < 0.6 else rng.randint(40, 500)
    return " ".join(rng.choice(_WORDS) for _ in range(n)) + ("\n\n" if n else "")


# -- the clients ---------------------------------------------------------------------------------


@dataclass
class Result:
    kind: str
    outcome: str  # "ok", "disconnected" (as intended), "finished-before-disconnect" or "failed"
    seconds: float
    tokens: int = 0  # usage.completion_tokens if completed; content chunks read if hung up
    error: str | None = None


def _chat_body(rng: random.Random, stream: bool, max_tokens: int, model: str) -> tuple[str, dict]:
    topic = rng.choice(_TOPICS)
    question = rng.choice((f"Explain {topic} to a child.", f"Write two sentences about {topic}.",
                           f"What is the most surprising thing about {topic}?"))
    question = _text(rng) + question
    messages = ([{"role": "system", "content": _SYSTEM}] if rng.random() < 0.5 else []) + [
        {"role": "user", "content": question}]
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.8,
            "seed": rng.randrange(1 << 30)}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return "/v1/chat/completions", body


def _completion_body(rng: random.Random, stream: bool, max_tokens: int, model: str) -> tuple[str, dict]:
    prompt = _text(rng) + f"A short note on {rng.choice(_TOPICS)}:"
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8,
            "seed": rng.randrange(1 << 30)}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return "/v1/completions", body


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


async def _non_streaming(client: httpx.AsyncClient, path: str, body: dict) -> tuple[int, str | None]:
    response = await client.post(path, json=body)
    if response.status_code != 200:
        return 0, f"HTTP {response.status_code}: {response.text[:200]}"
    data = response.json()
    usage = data.get("usage") or {}
    if "completion_tokens" not in usage or not data.get("choices"):
        return 0, f"answer without usage or choices: {response.text[:200]}"
    return usage["completion_tokens"], None


async def _streaming(client: httpx.AsyncClient, path: str, body: dict,
                     hang_up_after: int | None) -> tuple[int, bool, str | None]:
    """(content chunks read or usage tokens, hung up, error)."""
    chunks = 0
    usage = None
    done = False
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return 0, False, f"HTTP {response.status_code}: {response.text[:200]}"
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return chunks, False, f"error event: {line[:200]}"
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if chunk.get("choices"):
                chunks += 1
                if hang_up_after is not None and chunks >= hang_up_after:
                    return chunks, True, None  # leaving the block closes the connection mid-stream
    if not done:
        return chunks, False, "stream ended without [DONE]"
    if usage is None:
        return chunks, False, "stream without a usage chunk"
    return usage, False, None


OUTPUT_TOKENS = (8, 96)  # max_tokens of the requests that run to their end
DISCONNECT_OUTPUT_TOKENS = (192, 320)  # and of those the client hangs up on: long enough to hang up first


async def one_request(client: httpx.AsyncClient, kind: str, rng: random.Random,
                      output_tokens: tuple[int, int] = OUTPUT_TOKENS,
                      disconnect_output_tokens: tuple[int, int] = DISCONNECT_OUTPUT_TOKENS,
                      model: str = MODEL) -> Result:
    """One request of `kind` (see KINDS); never raises for what the server does."""
    start = time.perf_counter()
    stream = kind.endswith("stream") or kind == "stream-disconnect"
    max_tokens = rng.randint(*disconnect_output_tokens) if kind in DISCONNECT_KINDS else rng.randint(*output_tokens)
    chat = kind.startswith("chat") or (kind in DISCONNECT_KINDS and rng.random() < 0.5)
    make = _chat_body if chat else _completion_body
    path, body = make(rng, stream, max_tokens, model)
    try:
        if kind == "nonstream-disconnect":
            try:
                tokens, error = await asyncio.wait_for(_non_streaming(client, path, body), rng.uniform(0.05, 1.0))
            except TimeoutError:  # wait_for cancelled the request: httpx drops the connection
                return Result(kind, "disconnected", time.perf_counter() - start)
            outcome = "failed" if error else "finished-before-disconnect"
            return Result(kind, outcome, time.perf_counter() - start, tokens, error)
        if stream:
            hang_up_after = rng.randint(1, 6) if kind == "stream-disconnect" else None
            tokens, hung_up, error = await _streaming(client, path, body, hang_up_after)
            if hung_up:
                return Result(kind, "disconnected", time.perf_counter() - start, tokens)
            outcome = "failed" if error else ("finished-before-disconnect" if kind in DISCONNECT_KINDS else "ok")
            return Result(kind, outcome, time.perf_counter() - start, tokens, error)
        tokens, error = await _non_streaming(client, path, body)
        return Result(kind, "failed" if error else "ok", time.perf_counter() - start, tokens, error)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError) as error:
        return Result(kind, "failed", time.perf_counter() - start, 0, _describe(error))


# -- sampling the server -------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """The METRICS values from a Prometheus text exposition (unlabelled samples)."""
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in METRICS:
            values[name] = float(value)
    return values


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def rss_bytes(pid: int) -> int | None:
    """VmRSS of `pid` and all its descendants (the engine loop may run in a child process)."""
    total, seen, todo = 0, set(), [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                match = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)
        except OSError:
            if p == pid:
                return None
            continue
        if match:
            total += int(match.group(1)) * 1024
        todo += _children(p)
    return total


@dataclass
class Sample:
    t: float  # seconds since the load started (negative: before)
    rss_bytes: int | None
    metrics: dict[str, float]


async def sample(client: httpx.AsyncClient, pid: int | None, t0: float) -> Sample:
    try:
        metrics = parse_metrics((await client.get("/metrics", timeout=10)).text)
    except httpx.HTTPError:
        metrics = {}
    rss = rss_bytes(pid) if pid else metrics.get("process_resident_memory_bytes")
    return Sample(round(time.perf_counter() - t0, 2), None if rss is None else int(rss), metrics)


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class SoakRun:
    results: list[Result] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    drained: Sample | None = None
    load_seconds: float = 0.0


async def soak(url: str, seconds: float, concurrency: int, *, pid: int | None = None, sample_every: float = 5.0,
               idle: float = 10.0, seed: int = 0, weights: dict[str, float] | None = None,
               output_tokens: tuple[int, int] = OUTPUT_TOKENS,
               disconnect_output_tokens: tuple[int, int] = DISCONNECT_OUTPUT_TOKENS, model: str = MODEL,
               progress=None) -> SoakRun:
    """Drives `concurrency` clients for `seconds`, sampling RSS and /metrics, then idles
    up to `idle` seconds until the server reports nothing running or waiting."""
    weights = weights or {kind: 1.0 for kind in KINDS}
    kinds, kind_weights = list(weights), list(weights.values())
    run = SoakRun()
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        run.samples.append(await sample(client, pid, t0))
        deadline = t0 + seconds

        async def worker(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            first = True
            while time.perf_counter() < deadline:
                # Worker i starts with the i-th kind, so every kind runs at least once with concurrency >= 6.
                kind = kinds[index % len(kinds)] if first else rng.choices(kinds, kind_weights)[0]
                first = False
                result = await one_request(client, kind, rng, output_tokens, disconnect_output_tokens, model)
                run.results.append(result)
                if progress is not None:
                    progress(run)

        async def sampler() -> None:
            while time.perf_counter() < deadline:
                await asyncio.sleep(min(sample_every, max(0.0, deadline - time.perf_counter())))
                run.samples.append(await sample(client, pid, t0))

        await asyncio.gather(sampler(), *(worker(i) for i in range(concurrency)))
        run.load_seconds = time.perf_counter() - t0
        # Idle: aborts of hung-up requests land within a step; then nothing may remain.
        idle_end = time.perf_counter() + idle
        while True:
            await asyncio.sleep(1.0)
            last = await sample(client, pid, t0)
            m = last.metrics
            drained = (m.get("pagoda:num_requests_running") == 0 and m.get("pagoda:num_requests_waiting") == 0
                       and m.get("pagoda:kv_cache_usage_perc", 1.0) < 0.01)
            if drained or time.perf_counter() > idle_end:
                break
        run.samples.append(last)
        run.drained = last
    return run


def _at(samples: list[Sample], t: float) -> Sample:
    """The first sample at or after t (the last one if none)."""
    return next((s for s in samples if s.t >= t), samples[-1])


def _slope_mb_per_min(samples: list[Sample]) -> float | None:
    points = [(s.t / 60, s.rss_bytes / 1e6) for s in samples if s.rss_bytes is not None]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else None


def summarize(run: SoakRun, warmup_seconds: float) -> dict:
    by_kind: dict[str, Counter] = defaultdict(Counter)
    tokens: Counter = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    for r in run.results:
        by_kind[r.kind][r.outcome] += 1
        if r.outcome == "failed":
            if len(examples[r.kind]) < 3:
                examples[r.kind].append(r.error or "")
        elif r.outcome == "disconnected":
            tokens["hung_up_stream_chunks" if r.kind == "stream-disconnect" else "hung_up_nonstream"] += r.tokens
        else:
            tokens["completed"] += r.tokens
    failures = sum(c["failed"] for c in by_kind.values())
    load = [s for s in run.samples if s is not run.drained]
    first_metrics, last_metrics = run.samples[0].metrics, run.drained.metrics if run.drained else {}
    generated = (last_metrics.get("pagoda:generation_tokens_total", 0.0)
                 - first_metrics.get("pagoda:generation_tokens_total", 0.0))
    memory = None
    rss = [s for s in load if s.rss_bytes is not None]
    if rss:
        start, end = rss[0], rss[-1]
        warm = _at(rss, min(warmup_seconds, end.t))
        after = [s for s in rss if s.t >= warm.t]
        memory = {
            "start_bytes": start.rss_bytes, "warm_bytes": warm.rss_bytes, "warm_at_s": warm.t,
            "end_bytes": end.rss_bytes, "peak_bytes": max(s.rss_bytes for s in rss),
            "growth_after_warmup_pct": 100.0 * (end.rss_bytes - warm.rss_bytes) / warm.rss_bytes,
            "slope_after_warmup_mb_per_min": _slope_mb_per_min(after),
            "drained_bytes": run.drained.rss_bytes if run.drained else None,
        }
    return {
        "load_seconds": run.load_seconds,
        "requests": {k: dict(by_kind[k]) for k in KINDS if k in by_kind},
        "num_requests": len(run.results),
        "failures": failures,
        "failure_examples": dict(examples),
        "tokens": {
            "clients_completed": tokens["completed"],
            "clients_hung_up_stream_chunks": tokens["hung_up_stream_chunks"],
            "clients_total": tokens["completed"] + tokens["hung_up_stream_chunks"],
            "metrics_generation_tokens": generated,
            "metrics_minus_clients_completed": generated - tokens["completed"],
        },
        "after_idle": {name.removeprefix("pagoda:"): last_metrics.get(name) for name in IDLE_METRICS},
        "drained": bool(last_metrics) and last_metrics.get("pagoda:num_requests_running") == 0
                   and last_metrics.get("pagoda:num_requests_waiting") == 0
                   and last_metrics.get("pagoda:kv_cache_usage_perc", 1.0) < 0.01,
        "memory": memory,
    }


# -- the server --------------------------------------------------------------------------------------


def start_server(extra_args: list[str], env: dict | None = None, log=None) -> tuple[subprocess.Popen, str, float]:
    """`pagoda serve` on a free loopback port; (process, base URL, seconds until /health answered)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "pagoda", "serve", "--port", str(port), *extra_args],
                               stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url, time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("server did not start")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if match:
            return f"{match.group(1).strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.3f} GB"


def print_report(summary: dict, run: SoakRun, header: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=110)
    console.print(header)
    table = Table(title="requests by kind")
    outcomes = ("ok", "disconnected", "finished-before-disconnect", "failed")
    table.add_column("kind")
    for o in outcomes:
        table.add_column(o, justify="right")
    for kind, counts in summary["requests"].items():
        table.add_row(kind, *(str(counts.get(o, 0)) for o in outcomes))
    table.add_row("all", *(str(sum(c.get(o, 0) for c in summary["requests"].values())) for o in outcomes))
    console.print(table)
    if summary["failures"]:
        console.print(f"[red]{summary['failures']} failures[/red], e.g.:")
        for kind, errors in summary["failure_examples"].items():
            for e in errors:
                console.print(f"  {kind}: {e}")
    else:
        console.print("failures: 0")

    tk = summary["tokens"]
    table = Table(title="generated tokens")
    table.add_column("what")
    table.add_column("tokens", justify="right")
    table.add_row("clients: usage of completed requests", str(tk["clients_completed"]))
    table.add_row("clients: chunks of hung-up streams (not in the counter)", str(tk["clients_hung_up_stream_chunks"]))
    table.add_row("clients: total received", str(tk["clients_total"]))
    table.add_row("/metrics: generation_tokens_total growth", f"{tk['metrics_generation_tokens']:.0f}")
    table.add_row("/metrics minus clients' completed (requests that ended as their client hung up)",
                  f"{tk['metrics_minus_clients_completed']:.0f}")
    console.print(table)

    idle = summary["after_idle"]
    def num(v):
        return "?" if v is None else f"{v:g}"

    console.print(f"after idle: running {num(idle['num_requests_running'])}, waiting "
                  f"{num(idle['num_requests_waiting'])}, kv usage {num(idle['kv_cache_usage_perc'])} -> "
                  f"{'drained' if summary['drained'] else 'NOT DRAINED'}")

    mem = summary["memory"]
    if mem:
        table = Table(title="server resident memory (VmRSS)")
        for col in ("start", f"warm (t={mem['warm_at_s']:.0f} s)", "end", "peak", "growth after warm-up",
                    "slope after warm-up", "after idle"):
            table.add_column(col, justify="right")
        slope = mem["slope_after_warmup_mb_per_min"]
        table.add_row(_gb(mem["start_bytes"]), _gb(mem["warm_bytes"]), _gb(mem["end_bytes"]), _gb(mem["peak_bytes"]),
                      f"{mem['growth_after_warmup_pct']:+.2f} %", "-" if slope is None else f"{slope:+.1f} MB/min",
                      _gb(mem["drained_bytes"]))
        console.print(table)
        curve = Table(title="RSS over time (every ~minute)")
        curve.add_column("t (s)", justify="right")
        curve.add_column("RSS", justify="right")
        curve.add_column("running", justify="right")
        curve.add_column("waiting", justify="right")
        curve.add_column("kv usage", justify="right")
        shown, next_t = [], 0.0
        for s in run.samples:
            if s.t >= next_t or s is run.samples[-1]:
                shown.append(s)
                next_t = s.t + 60
        for s in shown:
            m = s.metrics
            curve.add_row(f"{s.t:.0f}", _gb(s.rss_bytes), f"{m.get('pagoda:num_requests_running', float('nan')):.0f}",
                          f"{m.get('pagoda:num_requests_waiting', float('nan')):.0f}",
                          f"{m.get('pagoda:kv_cache_usage_perc', float('nan')):.3f}")
        console.print(curve)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server (default: start `pagoda serve`)")
    parser.add_argument("--pid", type=int, default=None,
                        help="with --url: the server's process id, to sample its memory (default: none)")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to drive load (default: 10)")
    parser.add_argument("--concurrency", type=int, default=16, help="clients busy at once (default: 16)")
    parser.add_argument("--model", default=MODEL, help="model name in the requests (default: %(default)s)")
    parser.add_argument("--warmup-minutes", type=float, default=2.0,
                        help="memory growth is measured from this point on (default: 2, at most half the run)")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples (default: 5)")
    parser.add_argument("--idle", type=float, default=15.0,
                        help="seconds to wait, after the load, for the server to drain (default: 15)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the clients' choices (default: 0)")
    parser.add_argument("--max-growth-pct", type=float, default=5.0,
                        help="exit 1 if memory grows more than this after the warm-up (default: 5)")
    parser.add_argument("--server-args", default="",
                        help="extra `pagoda serve` flags when starting one, e.g. \"--max-num-seqs 16\"")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json", help="JSON results (default: %(default)s)")
    args = parser.parse_args()

    process, pid, startup_s = None, args.pid, None
    url = args.url
    if url is None:
        process, url, startup_s = start_server(args.server_args.split())
        pid = process.pid
        print(f"server up in {startup_s:.1f} s (pid {pid})", file=sys.stderr, flush=True)
    url = url.rstrip("/")

    def progress(run: SoakRun) -> None:
        n = len(run.results)
        if n % 100 == 0:
            failed = sum(r.outcome == "failed" for r in run.results)
            print(f"  {n} requests, {failed} failed", file=sys.stderr, flush=True)

    try:
        run = asyncio.run(soak(url, args.minutes * 60, args.concurrency, pid=pid, sample_every=args.sample_every,
                               idle=args.idle, seed=args.seed, model=args.model, progress=progress))
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)

    warmup = min(args.warmup_minutes * 60, args.minutes * 30)
    summary = summarize(run, warmup)
    info = {"cpu": cpu_model(), "python": platform.python_version(), "minutes": args.minutes,
            "concurrency": args.concurrency, "warmup_seconds": warmup, "server_args": args.server_args,
            "url": args.url, "server_startup_s": startup_s, "command": " ".join(sys.argv),
            # Settings the started server inherits that change its memory behaviour (docs/soak.md).
            "server_env": {k: os.environ[k] for k in SERVER_ENV if k in os.environ}}
    header = (f"soak: {args.minutes:g} min at concurrency {args.concurrency}, {summary['num_requests']} requests, "
              f"{info['cpu']}")
    print_report(summary, run, header)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"info": info, "summary": summary,
                                    "samples": [asdict(s) for s in run.samples]}, indent=2))
    mem = summary["memory"]
    ok = (summary["failures"] == 0 and summary["drained"]
          and (mem is None or mem["growth_after_warmup_pct"] <= args.max_growth_pct))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
