"""Command-line flags for the engine, shared by `pagoda generate/chat/serve` and `pagoda bench`."""

from __future__ import annotations

import argparse

from pagoda.config import ATTENTION_BACKENDS, DEFAULT_MODEL


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and engine")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"alias, HF folder (config.json + safetensors) or .gguf file (default: {DEFAULT_MODEL})")
    group.add_argument("--tokenizer", default=None, help="tokenizer folder, if not the model's own")
    group.add_argument("--dtype", default="auto", help="auto (bfloat16 where the hardware multiplies it natively, else float32), float32, bfloat16 or float16")
    group.add_argument("--quantization", default="auto", choices=["auto", "none", "gguf", "int8", "int4"],
                       help="how linear layers hold weights: gguf (a .gguf file's Q4_0/Q4_1 blocks kept packed), "
                            "int8 or int4 (quantize at load), none (float); auto = gguf for a .gguf file on a CPU "
                            "with native bf16 at --dtype auto, else none (default: auto; docs/quantization.md)")
    group.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"],
                       help="dummy = random weights at the real size (for benchmarks)")
    group.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    group.add_argument("--kv-cache-memory", type=int, default=None, metavar="BYTES",
                       help="bytes for the KV cache (default: 2 GiB on CPU)")
    group.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                       help="do not reuse the KV cache of shared prompt prefixes (on by default)")
    group.add_argument("--kv-offload-cpu-gb", type=float, default=None, metavar="GIB",
                       help="host memory that keeps prefix-cache blocks evicted from the KV cache, to bring "
                            "back instead of recomputing (default: off; 1 with --kv-offload-disk)")
    group.add_argument("--kv-offload-disk", default=None, metavar="DIR",
                       help="folder that also keeps them on disk, across restarts (default: off)")
    group.add_argument("--kv-offload-disk-gb", type=float, default=16.0, metavar="GIB",
                       help="size budget of that folder; least recently used blocks go first (default: 16)")
    group.add_argument("--scheduling-policy", dest="policy", choices=["fcfs", "priority"], default="fcfs",
                       help="fcfs, or priority: requests' `priority` (lower first) orders admission and "
                            "preemption (default: fcfs)")
    group.add_argument("--preemption-mode", choices=["recompute", "swap"], default="recompute",
                       help="when KV blocks run out: recompute (drop a request's KV, compute it again later) or "
                            "swap (copy its blocks to host memory and back; recompute if the swap space is full) "
                            "(default: recompute)")
    group.add_argument("--swap-space", type=float, default=4.0, metavar="GiB",
                       help="host memory for swapped-out KV blocks with --preemption-mode swap (default: 4)")
    group.add_argument("--max-num-seqs", type=int, default=256, help="requests running at once")
    group.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per engine step")
    group.add_argument("--attention-backend", choices=list(ATTENTION_BACKENDS), default="auto",
                       help="attention kernels: cpu (compiled C++ that reads the paged KV cache in place; "
                            "built on first use), triton (GPU kernels that read the paged KV cache in place), "
                            "torch (portable, gathers blocks then calls SDPA), or auto (cpu on a CPU device "
                            "where it builds, triton on CUDA where triton imports, else torch) (default: auto)")
    group.add_argument("--enforce-eager", action="store_true",
                       help="CUDA: run every step eagerly (no CUDA graphs for decode-only steps; docs/gpu.md)")
    group.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    group.add_argument("--speculative-config", default=None, metavar="JSON",
                       help="speculative decoding, as in vLLM: '{\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
                            "\"prompt_lookup_min\": 2, \"prompt_lookup_max\": 5}', or a draft model: "
                            "'{\"method\": \"draft_model\", \"quantization\": \"int4\", \"num_speculative_tokens\": 3}' "
                            "(default: off; docs/spec_decode.md)")
    group.add_argument("--enable-lora", action="store_true",
                       help="serve LoRA adapters (PEFT format) mixed in one batch (docs/lora.md)")
    group.add_argument("--max-loras", type=int, default=1,
                       help="LoRA adapters a batch may hold at once; requests for more wait (default: 1)")
    group.add_argument("--max-lora-rank", type=int, default=16, help="largest LoRA rank accepted (default: 16)")
    group.add_argument("--max-cpu-loras", type=int, default=None,
                       help="adapters kept read in host memory (default: --max-loras)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        load_format=args.load_format,
        quantization=args.quantization,
        max_model_len=args.max_model_len,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_threads=args.threads,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        enable_prefix_caching=args.enable_prefix_caching,
        policy=args.policy,
        kv_offload_cpu_gb=args.kv_offload_cpu_gb,
        kv_offload_disk=args.kv_offload_disk,
        kv_offload_disk_gb=args.kv_offload_disk_gb,
        preemption_mode=args.preemption_mode,
        swap_space=args.swap_space,
        speculative_config=args.speculative_config,
        **lora_kwargs(args),
    )


def lora_kwargs(args: argparse.Namespace) -> dict:
    if not getattr(args, "enable_lora", False):
        return {}
    return dict(enable_lora=True, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                max_cpu_loras=args.max_cpu_loras)
