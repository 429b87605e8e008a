"""`pagoda bench serve`: stress-test an OpenAI-compatible endpoint.

For each load level (every --concurrency, or every --request-rate), sends
the dataset's requests, stores every request and the run's summary in the
SQLite database, prints the tables, writes a JSON summary and PNG plots.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pagoda.bench.datasets import BenchRequest, jsonl_dataset, parse_length, random_dataset, sharegpt_dataset
from pagoda.bench.metrics import summarize
from pagoda.bench.report import markdown_report, print_report, save_plots
from pagoda.bench.runner import LoadShape, run_load
from pagoda.bench.store import ResultStore, StoredRun, new_id

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    api: str = "completions"
    model: str | None = None
    api_key: str | None = None
    tokenizer: str | None = None
    dataset: str = "random"
    dataset_path: str | None = None
    input_len: str = "256"
    output_len: str = "128"
    num_prompts: int = 64
    concurrency: list[int] = field(default_factory=list)
    request_rate: list[float] = field(default_factory=lambda: [math.inf])
    burstiness: float = 1.0
    duration: float | None = None
    seed: int = 0
    goodput: dict[str, float] = field(default_factory=dict)
    timeout: float = 600.0
    warmup: int = 1
    db: str = "bench_results/bench.db"
    out_dir: str = "bench_results"
    label: str | None = None
    sampling: dict = field(default_factory=dict)  # extra body fields for every request (temperature, top_p)


def normalize_base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def discover_model(base_url: str, headers: dict) -> str:
    """The first model the server lists at /v1/models."""
    try:
        response = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
        raise RuntimeError(f"could not list models at {base_url}/v1/models ({error}); pass --model") from None


def load_tokenizer_for(name: str | None, console: Console):
    """A tokenizer from a local folder, .gguf file or pagoda alias; the default model's if `name` is None."""
    from pagoda.config import DEFAULT_MODEL
    from pagoda.model.loader.loader import load_tokenizer
    from pagoda.model.loader.resolve import resolve_model

    try:
        return load_tokenizer(resolve_model(name or DEFAULT_MODEL))
    except Exception as error:  # noqa: BLE001 - any failure to find one means we fall back
        if name is None:
            raise
        console.print(f"[yellow]tokenizer {name!r} not found locally ({error}); counting with "
                      f"{DEFAULT_MODEL}'s tokenizer[/]")
        return load_tokenizer(resolve_model(DEFAULT_MODEL))


def build_dataset(config: ServeBenchConfig, tokenizer) -> list[BenchRequest]:
    output_len = parse_length(config.output_len, "output_len")
    if config.dataset == "random":
        return random_dataset(tokenizer, config.num_prompts, parse_length(config.input_len, "input_len"), output_len,
                              config.seed)
    if config.dataset_path is None:
        raise ValueError(f"dataset={config.dataset!r} needs --dataset-path")
    if config.dataset == "sharegpt":
        return sharegpt_dataset(config.dataset_path, tokenizer, config.num_prompts, None, config.seed)
    if config.dataset == "jsonl":
        return jsonl_dataset(config.dataset_path, tokenizer, config.num_prompts, None, config.seed)
    raise ValueError(f"dataset={config.dataset!r} is not one of random, sharegpt, jsonl")


def load_levels(config: ServeBenchConfig) -> list[LoadShape]:
    concurrencies = config.concurrency or [None]
    return [LoadShape(concurrency=c, request_rate=rate, burstiness=config.burstiness, num_prompts=None
                      if config.duration else config.num_prompts, duration_s=config.duration, seed=config.seed)
            for rate in config.request_rate for c in concurrencies]


def spec_decode_counters(base_url: str, headers: dict) -> tuple[float, float] | None:
    """(drafts, accepted draft tokens) from the server's /metrics (pagoda's spec_decode counters);
    None when the server does not export them (not pagoda, or no /metrics)."""
    try:
        response = httpx.get(f"{base_url}/metrics", headers=headers, timeout=10)
        if response.status_code != 200:
            return None
    except httpx.HTTPError:
        return None
    values = {}
    for line in response.text.splitlines():
        for name in ("pagoda:spec_decode_num_drafts_total", "pagoda:spec_decode_num_accepted_tokens_total"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[-1])
    if len(values) < 2:
        return None
    return values["pagoda:spec_decode_num_drafts_total"], values["pagoda:spec_decode_num_accepted_tokens_total"]


def run_serve_benchmark(config: ServeBenchConfig, console: Console | None = None) -> tuple[list[StoredRun], int]:
    """Runs every load level; returns the stored runs and the exit status (1 if every request failed)."""
    console = console or Console(stderr=True)
    base_url = normalize_base_url(config.base_url)
    if config.api not in ENDPOINTS:
        raise ValueError(f"api={config.api!r} is not one of {', '.join(ENDPOINTS)}")
    url = base_url + ENDPOINTS[config.api]
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    model = config.model or discover_model(base_url, headers)
    tokenizer = load_tokenizer_for(config.tokenizer or model, console)
    requests = build_dataset(config, tokenizer)
    for request in requests:
        request.extra_body = {**config.sampling, **request.extra_body}
    levels = load_levels(config)
    store = ResultStore(config.db)
    sweep_id = new_id()
    runs = []
    try:
        if config.warmup:
            warm = asyncio.run(run_load(url, config.api, model, requests[:config.warmup],
                                        LoadShape(concurrency=1, num_prompts=config.warmup), headers, tokenizer,
                                        config.timeout))[0]
            for record in warm:
                if not record.success:
                    console.print(f"[yellow]warm-up request failed: {record.error}[/]")
        for shape in levels:
            label = (f"{config.label} " if config.label else "") + shape.label()
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TextColumn("{task.fields[failed]} failed"), console=console, transient=True) as progress:
                task = progress.add_task(label, total=shape.num_prompts, failed=0)
                failures = 0

                def done(record, task=task):
                    nonlocal failures
                    failures += not record.success
                    progress.update(task, advance=1, failed=failures)

                before = spec_decode_counters(base_url, headers)
                records, wall = asyncio.run(run_load(url, config.api, model, requests, shape, headers, tokenizer,
                                                     config.timeout, done))
                after = spec_decode_counters(base_url, headers)
            summary = summarize(records, wall, config.goodput)
            if before is not None and after is not None and after[0] > before[0]:
                # Speculative decoding on the server: tokens a verifying step emitted on average.
                summary["spec_decode_mean_acceptance_length"] = 1 + (after[1] - before[1]) / (after[0] - before[0])
            run_config = {"base_url": base_url, "api": config.api, "model": model, "dataset": config.dataset,
                          "dataset_path": config.dataset_path, "input_len": config.input_len,
                          "output_len": config.output_len, "load": asdict(shape), "bench": asdict(config)}
            run_id = store.save(sweep_id, label, run_config, summary, records)
            runs.extend(store.load(run_id))
            acceptance = summary.get("spec_decode_mean_acceptance_length")
            console.print(f"{label}: {summary['completed']} ok, {summary['failed']} failed, "
                          f"{summary['output_throughput']:.1f} output tok/s"
                          + (f", speculative decoding: mean acceptance length {acceptance:.2f}" if acceptance else "")
                          + f" (run {run_id})")
    finally:
        store.close()
    write_outputs(runs, config.out_dir, sweep_id)
    print_report(runs, Console())
    console.print(f"sweep {sweep_id}: database {config.db}, JSON and plots in {config.out_dir}/")
    all_failed = all(r.summary["completed"] == 0 for r in runs)
    return runs, 1 if all_failed else 0


def write_outputs(runs: list[StoredRun], out_dir: str | Path, sweep_id: str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / f"{sweep_id}.json"
    summary_path.write_text(json.dumps({"sweep_id": sweep_id, "runs": [
        {"run_id": r.run_id, "label": r.label, "config": r.config, "summary": r.summary} for r in runs]}, indent=2))
    (out_dir / f"{sweep_id}.md").write_text(markdown_report(runs))
    return [summary_path, *save_plots(runs, out_dir, prefix=f"{sweep_id}-")]
