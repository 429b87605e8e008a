#!/usr/bin/env python
"""The GPU suite: one prepared script for a lent GPU (an H200), under 8 minutes in all.

(a) Bandwidth. Device-to-device copy bandwidth (a 1 GiB ``copy_``: bytes read + written
    per second), then one decode attention call of the Triton kernel at batch 64 over
    4096-token contexts in bf16 (Llama-3-8B's attention: 32 heads, 8 KV heads, head_dim 128,
    block 16, blocks shuffled): K/V bytes read per second as a fraction of the copy
    bandwidth (target >= 70%). Beside it the torch backend (gathers blocks, then SDPA) on
    the same step, and batch 4 at 16k tokens with split-K on (auto) and forced off.
(b) Batch-1 decode of a Llama-3.2-1B-shaped model (dummy bf16 weights, an HF config folder
    written with transformers' LlamaConfig): time per output token with CUDA graphs and
    eager, against the roofline (every weight byte read once per token at the copy
    bandwidth of (a); target within 1.4x); and with graphs but the layers' torch code in
    place of the fused Triton kernels (what those are worth).
(c) Throughput, Qwen3-0.6B shape (dummy bf16): 512 requests of 512 random prompt tokens and
    256 output tokens (greedy, EOS ignored, prefix caching off): pagoda's output tok/s with
    CUDA graphs and eager, and transformers' ``generate`` over static batches of 128 (bf16,
    SDPA; measured on the first 256 requests: every request has the same lengths, so the
    rate is the same) (target >= 15x).
(d) Correctness: pytest on tests/gpu (the parity and batching checks of tests/models on CUDA
    with the triton backend and CUDA graphs; Triton kernels vs the torch backend on CUDA, tiny
    model greedy tokens with graphs == eager == torch, on-device sampling) in a process of
    its own (no TRITON_INTERPRET), plus the sampler's unit tests.

Prints a table and writes JSON (benchmarks/results/gpu/gpu_suite.json by default).

    python benchmarks/gpu_suite.py                 # on the GPU
    python benchmarks/gpu_suite.py --sections a,b  # some sections only
    python benchmarks/gpu_suite.py --smoke         # CPU, tiny shapes, Triton's interpreter:
                                                   # checks the plumbing only, numbers mean nothing

``--smoke`` sets TRITON_INTERPRET=1 (before Triton is imported), runs every section with
tiny shapes on CPU tensors, and stands CUDA graphs in with the dry-run graph runner
(worker/cuda_graphs.py: static buffers and padding, replayed eagerly).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

RESULTS = REPO_ROOT / "benchmarks" / "results" / "gpu" / "gpu_suite.json"
SMOKE_RESULTS = Path(tempfile.gettempdir()) / "gpu_suite_smoke.json"
SUITE_BUDGET_S = 8 * 60

# Shapes: the real ones, and the tiny --smoke ones. KV cache sizes are explicit (GiB for (b),
# (c)): (c) needs 256 sequences x 768 tokens x 112 KiB = 21 GiB, so nothing is preempted.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                rope_scaling=dict(rope_type="llama3", factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                                  original_max_position_embeddings=8192))
QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=1024,
                  tie_word_embeddings=True)

FULL = dict(copy_bytes=1 << 30, copy_iters=20, attn=dict(batch=64, ctx=4096, heads=32, kv_heads=8, head_dim=128),
            split=dict(batch=4, ctx=16384, splits=0), attn_iters=20, kv_cache_gib=(2, 24),
            decode_prompt=128, decode_tokens=256, model_len=1024,
            requests=512, prompt_len=512, output_len=256, max_num_seqs=256, batched_tokens=8192,
            hf_batch=128, hf_requests=256, pytest_timeout=240)
SMOKE = dict(copy_bytes=1 << 22, copy_iters=2, attn=dict(batch=2, ctx=64, heads=4, kv_heads=2, head_dim=32),
             split=dict(batch=1, ctx=96, splits=3), attn_iters=1, kv_cache_gib=(1 / 16, 1 / 16),
             decode_prompt=8, decode_tokens=4, model_len=128,
             requests=6, prompt_len=16, output_len=6, max_num_seqs=4, batched_tokens=64,
             hf_batch=3, hf_requests=3, pytest_timeout=300)
BLOCK_SIZE = 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton's interpreter (plumbing only)")
    parser.add_argument("--sections", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    return parser.parse_args()


ARGS = parse_args()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton (and the kernels) are imported
else:
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from pagoda.model.attention.metadata import StepLayout  # noqa: E402
from pagoda.model.attention.torch_paged import TorchAttentionBackend  # noqa: E402
from pagoda.model.attention.triton_paged import TritonAttentionBackend  # noqa: E402

SHAPES = SMOKE if ARGS.smoke else FULL
DEVICE = torch.device("cpu" if ARGS.smoke else "cuda")
START = time.perf_counter()


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(fn, iters: int) -> float:
    """Best seconds per call over `iters` calls (after one warm-up call)."""
    fn()
    sync()
    best = float("inf")
    for _ in range(max(iters, 1)):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def left_s() -> float:
    return SUITE_BUDGET_S - (time.perf_counter() - START)


# ---------------------------------------------------------------- (a) bandwidth


def copy_bandwidth() -> float:
    """Bytes read + written per second by one device-to-device copy."""
    n = SHAPES["copy_bytes"]
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE).random_(0, 255)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), SHAPES["copy_iters"])
    del src, dst
    return 2 * n / seconds


def decode_step(batch: int, ctx: int, heads: int, kv_heads: int, head_dim: int, dtype=torch.bfloat16, seed=0):
    """A decode-only step over shuffled blocks; returns (layout, q, k_cache, v_cache)."""
    rnd = random.Random(seed)
    per_row = -(-ctx // BLOCK_SIZE)
    num_blocks = batch * per_row + 1
    ids = list(range(1, num_blocks))
    rnd.shuffle(ids)
    tables = torch.tensor(ids, dtype=torch.int32).view(batch, per_row)
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device=DEVICE)
    v_cache = torch.randn(shape, dtype=dtype, device=DEVICE)
    q = torch.randn(batch, heads, head_dim, dtype=dtype, device=DEVICE)
    layout = StepLayout.build([1] * batch, [ctx] * batch, batch, tables.to(DEVICE), BLOCK_SIZE)
    return layout, q, k_cache, v_cache


def attention_seconds(backend, layout, q, k_cache, v_cache, iters: int) -> float:
    from pagoda.model.attention.torch_paged import paged_attention
    from pagoda.model.attention.triton_paged import paged_attention_triton

    meta = backend.build_metadata(layout)
    scale = q.shape[-1] ** -0.5
    if isinstance(backend, TritonAttentionBackend):
        return timed(lambda: paged_attention_triton(q, k_cache, v_cache, meta, scale), iters)
    # The torch backend writes the step's K/V first; write this step's (zero-cost here) K/V rows.
    kv = torch.zeros(q.shape[0], k_cache.shape[2], q.shape[2], dtype=q.dtype, device=DEVICE)
    return timed(lambda: paged_attention(q, kv, kv, k_cache, v_cache, meta, scale), iters)


def section_a(results: dict) -> list[tuple]:
    rows = []
    bw = copy_bandwidth()
    results["copy_bandwidth_gbs"] = bw / 1e9
    rows.append(("a", "device copy bandwidth (read+write)", f"{bw / 1e9:.0f} GB/s", ""))
    shape = SHAPES["attn"]
    layout, q, k_cache, v_cache = decode_step(**shape)
    kv_bytes = 2 * shape["batch"] * shape["ctx"] * shape["kv_heads"] * shape["head_dim"] * q.element_size()
    group = shape["heads"] // shape["kv_heads"]
    iters = SHAPES["attn_iters"]
    t_triton = attention_seconds(TritonAttentionBackend(shape["heads"], shape["kv_heads"]), layout, q, k_cache,
                                 v_cache, iters)
    frac = kv_bytes / t_triton / bw
    t_torch = attention_seconds(TorchAttentionBackend(group), layout, q, k_cache, v_cache, iters)
    results["decode_attention"] = dict(**shape, dtype="bfloat16", kv_bytes=kv_bytes, triton_us=t_triton * 1e6,
                                       torch_us=t_torch * 1e6, triton_gbs=kv_bytes / t_triton / 1e9,
                                       fraction_of_copy=frac, target=0.70, met=frac >= 0.70)
    label = f"decode attention b={shape['batch']} ctx={shape['ctx']} bf16"
    rows.append(("a", f"{label}: triton", f"{t_triton * 1e6:.1f} us, {kv_bytes / t_triton / 1e9:.0f} GB/s",
                 f"{frac:.0%} of copy (target >= 70%)"))
    rows.append(("a", f"{label}: torch (gather + SDPA)", f"{t_torch * 1e6:.1f} us", f"{t_torch / t_triton:.1f}x triton"))
    del layout, q, k_cache, v_cache
    split = SHAPES["split"]
    layout, q, k_cache, v_cache = decode_step(split["batch"], split["ctx"], shape["heads"], shape["kv_heads"],
                                              shape["head_dim"])
    # auto on the GPU; forced under --smoke (the short context would not split)
    auto = TritonAttentionBackend(shape["heads"], shape["kv_heads"], num_splits=split["splits"])
    splits = auto.build_metadata(layout).num_splits
    t_split = attention_seconds(auto, layout, q, k_cache, v_cache, iters)
    t_one = attention_seconds(TritonAttentionBackend(shape["heads"], shape["kv_heads"], num_splits=1), layout, q,
                              k_cache, v_cache, iters)
    results["split_k"] = dict(batch=split["batch"], ctx=split["ctx"], splits=splits, split_us=t_split * 1e6,
                              unsplit_us=t_one * 1e6)
    rows.append(("a", f"decode attention b={split['batch']} ctx={split['ctx']}: split-K ({splits}) vs 1",
                 f"{t_split * 1e6:.1f} vs {t_one * 1e6:.1f} us", f"{t_one / t_split:.1f}x"))
    del layout, q, k_cache, v_cache
    return rows


# ---------------------------------------------------------------- model helpers


def config_folder(arch: str, fields: dict, root: Path) -> Path:
    from transformers import LlamaConfig, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen3": Qwen3Config}[arch]
    folder = root / arch
    cls(**fields, bos_token_id=1, eos_token_id=2).save_pretrained(folder)
    return folder


def make_llm(folder: Path, **kwargs):
    from pagoda import LLM

    return LLM(str(folder), load_format="dummy", dtype="float32" if ARGS.smoke else "bfloat16",
               device=DEVICE.type, attention_backend="triton", show_progress=False,
               max_model_len=SHAPES["model_len"] if "max_model_len" not in kwargs else kwargs.pop("max_model_len"),
               **kwargs)


def graphs_of(llm, max_num_seqs: int):
    """The engine's CUDA graph runner; under --smoke a dry-run one (static buffers, eager replay)."""
    runner = llm.engine.runner
    if ARGS.smoke and runner.cuda_graphs is None:
        from pagoda.worker.cuda_graphs import CudaGraphRunner

        runner.cuda_graphs = CudaGraphRunner(runner, max_num_seqs, llm.engine.max_model_len, dry_run=True).capture()
    return runner.cuda_graphs


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen or not tensor.is_floating_point():
            continue
        seen.add(tensor.data_ptr())
        if tensor.dim() >= 2:  # weights; rotary tables and norms are noise
            total += tensor.numel() * tensor.element_size()
    return total


def generate_seconds(llm, prompts, max_tokens: int) -> float:
    from pagoda import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    sync()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync()
    seconds = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    return seconds


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


# ---------------------------------------------------------------- profiles


def decode_profile(llm, prompts: list[list[int]], steps: int, name: str) -> dict:
    """Where a decode step's time goes, beside the suite's numbers: the requests are added and
    stepped until every one is decoding; then `steps` decode steps are timed plain, under
    torch.profiler (ops by self CPU and self device time) and under cProfile (Python by own time),
    and the captured graph of their bucket is replayed alone (its device time). The tables go to
    a text file beside the JSON; the numbers come back as a dict."""
    import cProfile
    import io
    import pstats

    from pagoda import SamplingParams
    from pagoda.sampling_params import RequestOutputKind

    engine = llm.engine
    # FINAL_ONLY, as LLM.generate asks: no per-step outputs are built.
    params = SamplingParams(temperature=0.0, max_tokens=3 * steps + 8, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    for prompt in prompts:
        engine.add_request(prompt, params)
    scheduler = engine.scheduler
    while scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running):
        engine.step()
    engine.step()

    def run_steps() -> float:
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync()
        return (time.perf_counter() - start) / steps

    plain = run_steps()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if DEVICE.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run_steps()
    profiler = cProfile.Profile()
    profiler.enable()
    run_steps()
    profiler.disable()
    graphs = llm.engine.runner.cuda_graphs
    replay_s = None
    if graphs is not None and graphs.num_replays:
        graph = graphs.graphs[graphs.bucket(len(prompts))]
        replay_s = timed(graph.replay, 20)
    engine.abort_all_requests()
    while engine.has_unfinished_requests():
        engine.step()
    text = io.StringIO()
    text.write(f"{name}: {len(prompts)} rows, {steps} decode steps, {plain * 1e3:.3f} ms per step"
               + (f", graph replay alone {replay_s * 1e3:.3f} ms" if replay_s else "") + "\n\n")
    averages = prof.key_averages()
    text.write(averages.table(sort_by="self_cpu_time_total", row_limit=30) + "\n")
    if DEVICE.type == "cuda":
        text.write(averages.table(sort_by="self_device_time_total", row_limit=20) + "\n")
    stats = io.StringIO()
    pstats.Stats(profiler, stream=stats).sort_stats("tottime").print_stats(35)
    text.write(stats.getvalue())
    out = (ARGS.out or RESULTS).with_name(f"profile_{name}.txt") if not ARGS.smoke else \
        SMOKE_RESULTS.with_name(f"gpu_suite_smoke_profile_{name}.txt")
    out.write_text(text.getvalue())
    print(f"wrote {out}")
    return dict(rows=len(prompts), step_ms=plain * 1e3, graph_replay_ms=replay_s * 1e3 if replay_s else None,
                file=out.name)


def profiled(results: dict, key: str, fn) -> None:
    """A profile that fails is noted, never fails its section."""
    try:
        results[key] = fn()
    except Exception as error:  # noqa: BLE001
        results[key] = dict(error=f"{type(error).__name__}: {error}")
        print(f"profile {key} failed: {type(error).__name__}: {error}")


# ---------------------------------------------------------------- (b) batch-1 decode


def section_b(results: dict, root: Path, bandwidth: float) -> list[tuple]:
    fields = TINY_MODEL if ARGS.smoke else LLAMA_1B
    llm = make_llm(config_folder("llama", fields, root), max_num_seqs=4,
                   kv_cache_memory=int(SHAPES["kv_cache_gib"][0] * 2**30))
    graphs = graphs_of(llm, 4)
    prompt = random_prompts(1, SHAPES["decode_prompt"], fields["vocab_size"], seed=1)
    n = SHAPES["decode_tokens"]
    nbytes = weight_bytes(llm.engine.model)
    roofline = nbytes / bandwidth
    rows, per_mode = [], {}
    shape = "tiny (smoke)" if ARGS.smoke else "Llama-3.2-1B"

    def measure(llm, mode: str) -> None:
        prefill = min(generate_seconds(llm, prompt, 1) for _ in range(2))
        total = min(generate_seconds(llm, prompt, n + 1) for _ in range(2))
        per_token = (total - prefill) / n
        per_mode[mode] = dict(seconds_per_token=per_token, tokens_per_s=1 / per_token, vs_roofline=per_token / roofline)
        rows.append(("b", f"{shape} shape, batch-1 decode, {mode}",
                     f"{per_token * 1e3:.3f} ms/token ({1 / per_token:.0f} tok/s)",
                     f"{per_token / roofline:.2f}x roofline {roofline * 1e3:.3f} ms (target <= 1.4x)"))

    generate_seconds(llm, prompt, 4)  # warm-up (kernels compiled for prefill and decode)
    for mode in ("graphs", "eager"):
        llm.engine.runner.cuda_graphs = graphs if mode == "graphs" else None
        measure(llm, mode)
    llm.engine.runner.cuda_graphs = graphs
    results["batch1_decode"] = dict(weight_bytes=nbytes, roofline_s=roofline, target=1.4,
                                    met=per_mode["graphs"]["vs_roofline"] <= 1.4, **per_mode)
    profiled(results["batch1_decode"], "profile", lambda: decode_profile(llm, prompt, 32, "batch1"))
    del llm
    free_memory()
    # The same with the layers' torch code instead of the fused Triton kernels (model/layers/
    # triton_fused.py), graphs captured that way: what the kernels are worth.
    from pagoda.model.layers.fused import fused_ops_disabled

    try:
        with fused_ops_disabled():
            plain = make_llm(config_folder("llama", fields, root), max_num_seqs=4,
                             kv_cache_memory=int(SHAPES["kv_cache_gib"][0] * 2**30))
            graphs_of(plain, 4)
            generate_seconds(plain, prompt, 4)
            measure(plain, "graphs, torch-code layers")
        results["batch1_decode"]["graphs_torch_layers"] = per_mode["graphs, torch-code layers"]
        del plain
    except Exception as error:  # noqa: BLE001 - the comparison failing must not lose the section
        results["batch1_decode"]["graphs_torch_layers"] = dict(error=f"{type(error).__name__}: {error}")
    free_memory()
    return rows


def free_memory() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- (c) throughput


def hf_tokens_per_s(folder: Path, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    dtype = torch.float32 if ARGS.smoke else torch.bfloat16
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    batch = SHAPES["hf_batch"]
    measured = prompts[: SHAPES["hf_requests"]]
    tokens, seconds = 0, 0.0
    with torch.inference_mode():
        warm = torch.tensor(measured[:1], device=DEVICE)
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, min_new_tokens=2,
                       do_sample=False, pad_token_id=0)
        for i in range(0, len(measured), batch):
            ids = torch.tensor(measured[i:i + batch], device=DEVICE)  # equal lengths: no padding
            sync()
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                                 min_new_tokens=output_len, do_sample=False, pad_token_id=0)
            sync()
            seconds += time.perf_counter() - start
            tokens += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    del model
    free_memory()
    return tokens / seconds, len(measured)


def section_c(results: dict, root: Path) -> list[tuple]:
    fields = TINY_MODEL if ARGS.smoke else QWEN3_06B
    folder = config_folder("qwen3", fields, root)
    n, prompt_len, output_len = SHAPES["requests"], SHAPES["prompt_len"], SHAPES["output_len"]
    max_seqs = SHAPES["max_num_seqs"]
    llm = make_llm(folder, max_num_seqs=max_seqs, max_num_batched_tokens=SHAPES["batched_tokens"],
                   enable_prefix_caching=False, kv_cache_memory=int(SHAPES["kv_cache_gib"][1] * 2**30))
    graphs = graphs_of(llm, max_seqs)
    generate_seconds(llm, random_prompts(min(n, max_seqs), 8, fields["vocab_size"], seed=2), 4)  # warm-up
    rows, tok_s = [], {}
    for seed, mode in enumerate(("graphs", "eager"), start=3):
        llm.engine.runner.cuda_graphs = graphs if mode == "graphs" else None
        prompts = random_prompts(n, prompt_len, fields["vocab_size"], seed=seed)
        seconds = generate_seconds(llm, prompts, output_len)
        tok_s[mode] = n * output_len / seconds
        rows.append(("c", f"{'tiny (smoke)' if ARGS.smoke else 'Qwen3-0.6B'} shape, {n} x ({prompt_len} in, "
                          f"{output_len} out), pagoda {mode}",
                     f"{tok_s[mode]:.0f} out tok/s", f"{seconds:.1f} s"))
    llm.engine.runner.cuda_graphs = graphs
    profile: dict = {}
    profiled(profile, "profile", lambda: decode_profile(
        llm, random_prompts(max_seqs, prompt_len, fields["vocab_size"], seed=8), 8, f"decode{max_seqs}"))
    del llm
    free_memory()
    hf, measured = hf_tokens_per_s(folder, random_prompts(n, prompt_len, fields["vocab_size"], seed=9), output_len)
    speedup = tok_s["graphs"] / hf
    rows.append(("c", f"transformers generate, static batches of {SHAPES['hf_batch']} ({measured} requests)",
                 f"{hf:.0f} out tok/s", f"pagoda {speedup:.1f}x (target >= 15x)"))
    results["throughput"] = dict(requests=n, prompt_len=prompt_len, output_len=output_len, max_num_seqs=max_seqs,
                                 pagoda_graphs_tok_s=tok_s["graphs"], pagoda_eager_tok_s=tok_s["eager"],
                                 graphs_speedup=tok_s["graphs"] / tok_s["eager"], hf_tok_s=hf,
                                 hf_batch=SHAPES["hf_batch"], hf_requests_measured=measured,
                                 vs_hf=speedup, target=15.0, met=speedup >= 15.0, **profile)
    return rows


# ---------------------------------------------------------------- (d) correctness


def section_d(results: dict) -> list[tuple]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if ARGS.smoke:  # the interpreter tests stand in for the CUDA ones
        runs = {"triton interpreter parity": ["tests/kernels/test_triton_attention.py", "-k",
                                              "tiny_model or padding or split_decodes_next"],
                "graph buffers (dry run)": ["tests/kernels/test_cuda_graph_buffers.py"]}
    else:
        env.pop("TRITON_INTERPRET", None)
        runs = {"tests/gpu (parity + batching with triton and graphs, kernels, sampling on CUDA)": ["tests/gpu"],
                "sampler unit tests": ["tests/unit/test_sampler.py", "tests/unit/test_sampler_device_generators.py"]}
    rows, out = [], {}
    for name, args in runs.items():
        budget = max(30, min(SHAPES["pytest_timeout"], int(left_s()) - 10))
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                                  cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=budget)
            summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
            passed = proc.returncode == 0
            log = (proc.stdout + proc.stderr)[-6000:]  # the failures' tracebacks, for the JSON
        except subprocess.TimeoutExpired as error:
            summary, passed = f"timed out after {budget} s", False
            log = str(error.stdout or "")[-6000:]
        out[name] = dict(passed=passed, summary=summary, seconds=time.perf_counter() - start,
                         log=None if passed else log)
        rows.append(("d", name, "PASS" if passed else "FAIL", summary))
    results["correctness"] = out
    return rows


# ---------------------------------------------------------------- main


def main() -> int:
    sections = [s.strip() for s in ARGS.sections.split(",") if s.strip()]
    results: dict = dict(smoke=ARGS.smoke, device=torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu",
                         torch=torch.__version__, python=platform.python_version(), shapes=SHAPES,
                         started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        results["triton"] = None
    rows: list[tuple] = []
    bandwidth = None
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for section in sections:
            if left_s() < 20:
                failures.append(f"{section}: skipped, the suite's {SUITE_BUDGET_S} s budget is spent")
                continue
            start = time.perf_counter()
            try:
                if section == "a":
                    rows += section_a(results)
                    bandwidth = results["copy_bandwidth_gbs"] * 1e9
                elif section == "b":
                    rows += section_b(results, root, bandwidth or copy_bandwidth())
                elif section == "c":
                    rows += section_c(results, root)
                elif section == "d":
                    rows += section_d(results)
                else:
                    raise ValueError(f"unknown section {section!r}")
            except Exception as error:  # noqa: BLE001 - one section failing must not lose the others
                failures.append(f"{section}: {type(error).__name__}: {error}")
                free_memory()
            results.setdefault("section_seconds", {})[section] = time.perf_counter() - start
    results["failures"] = failures
    results["total_seconds"] = time.perf_counter() - START
    width = max((len(r[1]) for r in rows), default=10)
    print(f"\n{'':2} {'case':<{width}}  {'result':<34}  note")
    for section, case, value, note in rows:
        print(f"{section:2} {case:<{width}}  {value:<34}  {note}")
    for failure in failures:
        print("FAILED", failure)
    print(f"total {results['total_seconds']:.1f} s" + ("  (--smoke: plumbing only, numbers mean nothing)"
                                                       if ARGS.smoke else ""))
    out = ARGS.out or (SMOKE_RESULTS if ARGS.smoke else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
