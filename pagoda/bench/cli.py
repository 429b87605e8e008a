"""`pagoda bench serve | throughput | latency | report` — argument parsing and output."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from pagoda.entrypoints.engine_args import add_engine_args, engine_kwargs

_SERVE_EPILOG = """metrics (the definitions of `vllm bench serve`):
  TTFT  request sent -> first chunk with generated content (a role-only chat chunk does not count)
  ITL   gaps between consecutive content chunks
  TPOT  (E2E latency - TTFT) / (output tokens - 1), per request
  E2E   request sent -> end of the stream
  output tokens come from the server's usage (re-counted with the tokenizer when absent)

examples:
  pagoda bench serve --concurrency 1 4 16 64 --num-prompts 64 --input-len 32:256 --output-len 64:128
  pagoda bench serve --base-url http://host:8000/v1 --api chat --request-rate 2 --burstiness 0.5 --duration 60
  pagoda bench serve --dataset sharegpt --dataset-path ShareGPT_V3.json --goodput ttft:500 tpot:50
"""


def add_bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="benchmark a server (any OpenAI-compatible one) or the offline engine",
                                description="Benchmarks: `serve` stress-tests an OpenAI-compatible endpoint; "
                                            "`throughput` and `latency` time the offline engine; `report` "
                                            "re-renders stored runs.")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND", required=True)

    serve = sub.add_parser("serve", help="stress-test an OpenAI-compatible endpoint (TTFT, TPOT, ITL, throughput)",
                           description="Send a dataset of streaming requests to an OpenAI-compatible server at "
                                       "one or more load levels, and report latency and throughput.",
                           epilog=_SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = serve.add_argument_group("target")
    target.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root or its /v1 (default: %(default)s)")
    target.add_argument("--api", choices=["completions", "chat"], default="completions",
                        help="which API to call (default: completions)")
    target.add_argument("--model", default=None, help="model name to send (default: the first in /v1/models)")
    target.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    target.add_argument("--tokenizer", default=None,
                        help="local folder, .gguf or alias, for random prompts and counting (default: --model, "
                             "else the default model's)")
    target.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: 600)")
    data = serve.add_argument_group("dataset")
    data.add_argument("--dataset", choices=["random", "sharegpt", "jsonl"], default="random")
    data.add_argument("--dataset-path", default=None, help="file for sharegpt / jsonl")
    data.add_argument("--input-len", default="256", help="random: prompt tokens, N or MIN:MAX (default: 256)")
    data.add_argument("--output-len", default="128", help="random: output tokens, N or MIN:MAX (default: 128)")
    data.add_argument("--num-prompts", type=int, default=64, help="requests per load level (default: 64)")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--temperature", type=float, default=None, help="sent with every request (default: the server's)")
    data.add_argument("--top-p", type=float, default=None, help="sent with every request (default: the server's)")
    load = serve.add_argument_group("load")
    load.add_argument("--concurrency", type=int, nargs="+", default=[],
                      help="requests in flight at most; several values run a sweep")
    load.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                      help="requests/s with gamma-distributed gaps (default: inf = all at once); several = sweep")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1.0 = Poisson")
    load.add_argument("--duration", type=float, default=None, help="send for this many seconds instead of --num-prompts")
    load.add_argument("--warmup", type=int, default=1, help="requests sent (and not counted) first (default: 1)")
    load.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                      help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000 (milliseconds)")
    out = serve.add_argument_group("output")
    out.add_argument("--db", default="bench_results/bench.db", help="SQLite database (default: %(default)s)")
    out.add_argument("--out-dir", default="bench_results", help="JSON summary and plots (default: %(default)s)")
    out.add_argument("--label", default=None, help="prefix for the runs' names")
    serve.set_defaults(handler=_serve)

    report = sub.add_parser("report", help="re-render stored runs (tables, plots), side by side",
                            description="Re-render runs from the database: RUN_ID is a run or a whole sweep.")
    report.add_argument("run_id", nargs="?", default=None, help="run or sweep id (default: list recent runs)")
    report.add_argument("--compare", nargs="+", default=[], metavar="RUN_ID", help="more runs or sweeps beside it")
    report.add_argument("--db", default="bench_results/bench.db")
    report.add_argument("--out-dir", default=None, help="also write plots here")
    report.add_argument("--markdown", action="store_true", help="print markdown tables (for a README)")
    report.set_defaults(handler=_report)

    throughput = sub.add_parser("throughput", help="offline engine throughput; continuous vs static batching vs HF",
                                description="Run the same requests through the offline engine (continuous "
                                            "batching), optionally pagoda with static batches and transformers "
                                            "generate() with static batches.")
    throughput.add_argument("--num-prompts", type=int, default=128)
    throughput.add_argument("--input-len", default="16:512", help="prompt tokens, N or MIN:MAX (default: 16:512)")
    throughput.add_argument("--output-len", default="16:256", help="output tokens, N or MIN:MAX (default: 16:256)")
    throughput.add_argument("--seed", type=int, default=0)
    throughput.add_argument("--static-batch", type=int, default=None, metavar="N",
                            help="also run pagoda in static batches of N")
    throughput.add_argument("--baseline", choices=["hf"], default=None,
                            help="also run transformers generate() in static batches")
    throughput.add_argument("--hf-batch-size", type=int, default=None,
                            help="static batch for the HF baseline (default: --static-batch, else 32)")
    throughput.add_argument("--output-json", default=None, help="write the results here")
    add_engine_args(throughput)
    throughput.set_defaults(handler=_throughput)

    latency = sub.add_parser("latency", help="offline engine latency of one batch: prefill and per-token decode",
                             description="Time one batch of fixed size and lengths: prefill, decode step, total.")
    latency.add_argument("--batch-size", type=int, default=8)
    latency.add_argument("--input-len", type=int, default=128)
    latency.add_argument("--output-len", type=int, default=64)
    latency.add_argument("--repeats", type=int, default=3)
    latency.add_argument("--warmup", type=int, default=1)
    latency.add_argument("--output-json", default=None)
    add_engine_args(latency)
    latency.set_defaults(handler=_latency)


def _serve(args: argparse.Namespace) -> int:
    from pagoda.bench.metrics import parse_goodput
    from pagoda.bench.serve import ServeBenchConfig, run_serve_benchmark

    if args.num_prompts < 1:
        raise ValueError(f"num_prompts={args.num_prompts} must be at least 1")
    config = ServeBenchConfig(
        base_url=args.base_url, api=args.api, model=args.model, api_key=args.api_key, tokenizer=args.tokenizer,
        dataset=args.dataset, dataset_path=args.dataset_path, input_len=args.input_len, output_len=args.output_len,
        num_prompts=args.num_prompts, concurrency=args.concurrency, request_rate=args.request_rate,
        burstiness=args.burstiness, duration=args.duration, seed=args.seed, goodput=parse_goodput(args.goodput),
        timeout=args.timeout, warmup=args.warmup, db=args.db, out_dir=args.out_dir, label=args.label,
        sampling={k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None})
    _, status = run_serve_benchmark(config)
    return status


def _report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pagoda.bench.report import markdown_report, print_report, save_plots
    from pagoda.bench.store import ResultStore

    if not Path(args.db).exists():
        raise ValueError(f"db={args.db!r} does not exist (run `pagoda bench serve` first)")
    store = ResultStore(args.db)
    try:
        if args.run_id is None:
            for run_id, sweep_id, created_at, label in store.list_runs():
                print(f"{run_id}  sweep {sweep_id}  {created_at}  {label}")
            return 0
        runs = []
        for run_id in [args.run_id, *args.compare]:
            try:
                runs.extend(store.load(run_id))
            except KeyError as error:
                raise ValueError(str(error.args[0])) from None
    finally:
        store.close()
    if args.markdown:
        print(markdown_report(runs))
    else:
        print_report(runs, Console())
    if args.out_dir:
        for path in save_plots(runs, args.out_dir, prefix=f"{args.run_id}-"):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _throughput(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from pagoda import LLM
    from pagoda.bench.datasets import parse_length
    from pagoda.bench.offline import load_hf_model, random_requests, run_hf, run_pagoda, warm_up

    input_len, output_len = parse_length(args.input_len, "input_len"), parse_length(args.output_len, "output_len")
    llm = LLM(args.model, **engine_kwargs(args))
    requests = random_requests(args.num_prompts, input_len, output_len, llm.engine.vocab_size, args.seed)
    warm_up(llm)
    results = []
    runs = [("pagoda (continuous batching)", None)]
    if args.static_batch:
        runs.append((f"pagoda (static batches of {args.static_batch})", args.static_batch))
    for name, static in runs:
        with tqdm(total=len(requests), desc=name, unit="req", leave=False) as bar:
            results.append(run_pagoda(llm, requests, static, bar.update))
        print(f"{name}: {results[-1].output_tokens_per_s:.1f} output tok/s", file=sys.stderr)
    dtype = str(llm.engine.dtype).replace("torch.", "")
    del llm
    if args.baseline == "hf":
        batch = args.hf_batch_size or args.static_batch or 32
        hf = load_hf_model(args.model, dtype)
        with tqdm(total=len(requests), desc=f"transformers (static batches of {batch})", unit="req", leave=False) as bar:
            results.append(run_hf(hf, requests, batch, bar.update))
        print(f"transformers: {results[-1].output_tokens_per_s:.1f} output tok/s", file=sys.stderr)
    print(f"\n{args.num_prompts} requests, prompts {args.input_len} tokens, outputs {args.output_len} tokens "
          f"(greedy, ignore_eos), {args.model}, {dtype}")
    print(throughput_table(results))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps({"args": vars(args) | {"handler": None},
                                                      "results": [r.to_dict() for r in results]}, indent=2))
    return 0


def throughput_table(results) -> str:
    from pagoda.bench.report import markdown_table

    base = results[0].output_tokens_per_s
    header = ["system", "batch", "wall s", "req/s", "output tok/s", "total tok/s", "computed / useful output",
              "KV slots used", "vs pagoda"]
    rows = [[r.system, str(r.batch_size or "continuous"), f"{r.wall_s:.1f}", f"{r.requests_per_s:.2f}",
             f"{r.output_tokens_per_s:.1f}", f"{r.total_tokens_per_s:.1f}",
             f"{r.computed_output_tokens / r.output_tokens:.2f}",
             f"{r.kv_token_efficiency:.1%}" if r.kv_token_efficiency is not None else "-",
             f"{r.output_tokens_per_s / base:.2f}x"]
            for r in results]
    return markdown_table(header, rows)


def _latency(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from pagoda import LLM
    from pagoda.bench.offline import run_latency

    for name in ("batch_size", "input_len", "output_len", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}={getattr(args, name)} must be at least 1")
    llm = LLM(args.model, **engine_kwargs(args))
    with tqdm(total=args.warmup + args.repeats, desc="latency", unit="run", leave=False) as bar:
        result = run_latency(llm, args.batch_size, args.input_len, args.output_len, args.repeats, args.warmup,
                             progress=bar.update)
    summary = result.summary()
    print(f"\nbatch {args.batch_size}, {args.input_len} prompt tokens, {args.output_len} output tokens, "
          f"{args.repeats} repeats after {args.warmup} warm-up, {args.model}")
    print(latency_table(summary))
    print(f"decode: {summary['decode_tokens_per_s']:.1f} tokens/s for the batch")
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(summary, indent=2))
    return 0


def latency_table(summary: dict) -> str:
    from pagoda.bench.report import markdown_table

    header = ["phase", "mean ms", "p50 ms", "p90 ms", "min ms", "max ms"]
    rows = []
    for key, name in (("prefill_s", "prefill (batch)"), ("decode_step_s", "decode step"), ("total_s", "total")):
        s = summary[key]
        rows.append([name, *(f"{s[k] * 1000:.1f}" for k in ("mean", "p50", "p90", "min", "max"))])
    return markdown_table(header, rows)
