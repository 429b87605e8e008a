"""`pagoda estimate`: what a model needs on an accelerator, and how fast it can be at best."""

from __future__ import annotations

import argparse
import json

from pagoda.estimate.hardware import ACCELERATORS, Accelerator, custom, lookup, measure_cpu
from pagoda.estimate.model_shape import KNOWN_SHAPES, ModelShape
from pagoda.estimate.roofline import BYTES, Estimate, Workload, estimate

_EPILOG = """examples:
  pagoda estimate qwen2.5-32b --gpu H100-SXM --tp 2 --batch-size 16 --prompt-len 2048 --output-len 512
  pagoda estimate llama-2-7b --gpu A10 --dtype fp16 --prompt-len 350
  pagoda estimate path/to/model/ --gpu cpu --dtype fp32 --measure
  pagoda estimate config.json --tflops 200 --bandwidth 1000 --memory 48

known shapes (no files needed): """ + ", ".join(KNOWN_SHAPES) + """
accelerators: """ + ", ".join(ACCELERATORS) + """, cpu (measured here)"""


def add_estimate_parser(commands) -> None:
    parser = commands.add_parser(
        "estimate", help="parameters, memory, FLOPs and roofline TTFT/TPOT for a model on an accelerator",
        description="Plan a deployment: parameter count by part, weight and KV-cache memory, the largest batch "
                    "and context that fit, prefill and decode FLOPs, and the theoretical (roofline) TTFT and "
                    "TPOT. Formulas are printed with the numbers.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct",
                        help="a known shape, a pagoda alias, an HF folder, a .gguf file or a config.json "
                             "(default: smollm2-135m-instruct)")
    parser.add_argument("--gpu", default="H100-SXM", help="accelerator from the table, or cpu (default: H100-SXM)")
    parser.add_argument("--tflops", type=float, default=None, help="peak dense TFLOP/s (a custom accelerator)")
    parser.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth in GB/s (custom)")
    parser.add_argument("--memory", type=float, default=None, help="memory in GB (custom)")
    parser.add_argument("--dtype", default="bf16", choices=list(BYTES), help="weights and compute (default: bf16)")
    parser.add_argument("--kv-cache-dtype", default=None, choices=list(BYTES), help="default: --dtype")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default: 1)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--measure", action="store_true",
                        help="also run the real engine here with this shape and print measured vs theoretical")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the report")
    parser.set_defaults(handler=_estimate)


def load_shape(name: str) -> ModelShape:
    if name.lower() in KNOWN_SHAPES:
        return KNOWN_SHAPES[name.lower()]
    from pagoda.model.loader.loader import load_hf_config
    from pagoda.model.loader.resolve import ModelNotFoundError, resolve_model

    try:
        source = resolve_model(name)
    except ModelNotFoundError as error:
        raise ValueError(f"{error} Known shapes: {', '.join(KNOWN_SHAPES)}") from None
    return ModelShape.from_hf_config(load_hf_config(source), name=name)


def pick_accelerator(args: argparse.Namespace) -> Accelerator:
    custom_figures = (args.tflops, args.bandwidth, args.memory)
    if any(v is not None for v in custom_figures):
        if any(v is None for v in custom_figures):
            raise ValueError("a custom accelerator needs all of --tflops, --bandwidth and --memory")
        return custom(*custom_figures)
    if args.gpu.lower() == "cpu":
        return measure_cpu()
    return lookup(args.gpu)


def _estimate(args: argparse.Namespace) -> int:
    shape = load_shape(args.model)
    workload = Workload(batch_size=args.batch_size, prompt_len=args.prompt_len, output_len=args.output_len,
                        dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, tensor_parallel_size=args.tp,
                        memory_utilization=args.gpu_memory_utilization)
    accelerator = pick_accelerator(args)
    result = estimate(shape, accelerator, workload)
    measured = measure(args, shape, accelerator, workload, result) if args.measure else None
    if args.json:
        print(json.dumps({"model": shape.name, "accelerator": accelerator.name, "workload": workload.__dict__,
                          "estimate": result.to_dict(), "measured": measured}, indent=2))
    else:
        print(render(shape, accelerator, workload, result, measured))
    return 0


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:,.2f} {prefix}{unit}"
    return f"{value:,.2f} {unit}"


def _time(seconds: float) -> str:
    return f"{seconds * 1000:,.2f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def render(shape: ModelShape, accelerator: Accelerator, w: Workload, e: Estimate, measured: dict | None) -> str:
    lines = [f"{shape.name} on {w.tensor_parallel_size} x {accelerator.name} "
             f"({accelerator.peak_flops(w.dtype) / 1e12:,.1f} TFLOP/s {w.dtype}, {accelerator.bandwidth_gbs:,.0f} GB/s, "
             f"{accelerator.memory_gb:,.0f} GB{'; ' + accelerator.notes if accelerator.notes else ''})",
             f"workload: batch {w.batch_size}, prompt {w.prompt_len}, output {w.output_len}, weights {w.dtype}, "
             f"KV cache {w.kv_dtype}", "",
             f"shape: d={shape.hidden_size} L={shape.num_layers} h={shape.num_heads} k={shape.num_kv_heads} "
             f"a={shape.head_dim} f={shape.intermediate_size} V={shape.vocab_size}"
             + (f" experts={shape.num_experts} top-{shape.experts_per_token}" if shape.num_experts else ""), "",
             "parameters"]
    for part, count in e.params.items():
        lines.append(f"  {part:<18} {count / 1e9:>10.3f} B")
    lines.append(f"  {'simple count':<18} {shape.simple_params / 1e9:>10.3f} B   (L*(attention+MLP) + V*d)")
    lines += ["", "memory (per device)",
              f"  weights            {_si(e.weight_bytes / w.tensor_parallel_size, 'B'):>12}   params * "
              f"{BYTES[w.dtype]:g} bytes / tp",
              f"  KV per token       {_si(e.kv_bytes_per_token, 'B'):>12}   2 * L * k * a * {BYTES[w.kv_dtype]:g} bytes",
              f"  KV for the batch   {_si(e.kv_bytes / w.tensor_parallel_size, 'B'):>12}   batch * (prompt + output) "
              "* KV per token / tp",
              f"  total              {_si(e.memory_per_device, 'B'):>12}   of {_si(e.usable_memory_per_device, 'B')} "
              f"usable -> {'fits' if e.fits else 'DOES NOT FIT'}",
              f"  largest batch at {w.prompt_len + w.output_len} tokens each: {e.max_batch_size}; "
              f"largest context at batch {w.batch_size}: {e.max_context_len:,} tokens",
              "", "compute",
              f"  prefill FLOPs      {_si(e.prefill_flops, 'FLOP'):>12}   batch * (2 * P_layers * T + 4 * L * T^2 * h*a "
              "+ 2 * V*d)",
              f"  decode FLOPs/token {_si(e.decode_flops_per_token, 'FLOP'):>12}   2 * P_layers + 4 * L * C * h*a + "
              f"2 * V*d at C = {w.prompt_len + w.output_len // 2}",
              f"  ridge point        {e.ridge_point:>9.1f} FLOP/B   peak / bandwidth", "",
              "roofline (lower bounds: no overheads, no tensor-parallel communication)",
              f"  TTFT   {_time(e.ttft_s):>12}  {e.ttft_bound}-bound (intensity {e.prefill_intensity:,.1f} FLOP/B)   "
              "max(prefill FLOPs / peak, weight bytes / bandwidth)",
              f"  TPOT   {_time(e.tpot_s):>12}  {e.tpot_bound}-bound (intensity {e.decode_intensity:,.1f} FLOP/B)   "
              "max(step FLOPs / peak, (weights + batch KV) / bandwidth)",
              f"  decode {e.decode_tokens_per_s:>9,.1f} tokens/s for the batch   batch / TPOT"]
    if measured:
        lines += ["", f"measured here ({measured['device']}, {measured['dtype']}, same shape)",
                  f"  TTFT   {_time(measured['prefill_s']):>12}  vs {_time(e.ttft_s)} theoretical -> model FLOPs "
                  f"utilization {measured['mfu']:.1%}",
                  f"  TPOT   {_time(measured['decode_step_s']):>12}  vs {_time(e.tpot_s)} theoretical -> memory "
                  f"bandwidth utilization {measured['mbu']:.1%}"]
    return "\n".join(lines)


def measure(args: argparse.Namespace, shape: ModelShape, accelerator: Accelerator, w: Workload,
            e: Estimate) -> dict:
    """Runs the real engine on this machine (dummy weights for a bare config) with the workload's shape."""
    from pagoda import LLM
    from pagoda.bench.offline import run_latency

    if args.model.lower() in KNOWN_SHAPES:
        raise ValueError("--measure needs a model pagoda can load (alias, folder, .gguf or config.json), "
                         "not a known shape")
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(w.dtype)
    if dtype is None:
        raise ValueError(f"--measure runs unquantized weights: use --dtype fp32, bf16 or fp16, not {w.dtype}")
    from pagoda.model.loader.resolve import resolve_model

    source = resolve_model(args.model)
    has_weights = source.kind == "gguf" or any(source.folder.glob("*.safetensors"))
    llm = LLM(args.model, dtype=dtype, load_format="auto" if has_weights else "dummy",
              max_model_len=w.prompt_len + w.output_len, max_num_seqs=w.batch_size,
              max_num_batched_tokens=max(2048, w.batch_size * w.prompt_len), show_progress=False)
    result = run_latency(llm, w.batch_size, w.prompt_len, w.output_len, repeats=2, warmup=1)
    summary = result.summary()
    prefill_s, step_s = summary["prefill_s"]["p50"], summary["decode_step_s"]["p50"]
    step_bytes = e.weight_bytes + w.batch_size * (w.prompt_len + w.output_len // 2) * e.kv_bytes_per_token
    return {"device": str(llm.engine.device), "dtype": dtype, "prefill_s": prefill_s, "decode_step_s": step_s,
            "mfu": e.prefill_flops / prefill_s / (accelerator.peak_flops(w.dtype) * w.tensor_parallel_size),
            "mbu": step_bytes / step_s / (accelerator.bandwidth * w.tensor_parallel_size)}
