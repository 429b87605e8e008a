"""Engine configuration: a few dataclasses, validated in one place.

User-facing errors are `ConfigError` (a `ValueError`) naming the field, the
value and the limit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
# Kept in step with pagoda/model/attention/backend.py (which imports this module).
ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")
# On CPU the KV cache lives in RAM next to everything else; 2 GiB holds
# ~90k tokens of SmolLM2 in bf16 and leaves room on small machines.
DEFAULT_CPU_KV_CACHE_BYTES = 2 * 1024**3


# EngineConfig.quantization values (pagoda/model/quant/methods.py).
QUANTIZATION_CHOICES = ("auto", "none", "gguf", "int8", "int4")


class ConfigError(ValueError):
    def __init__(self, field_name: str, value: object, limit: str):
        self.field_name = field_name
        self.value = value
        super().__init__(f"{field_name}={value!r} is invalid: {limit}.")


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices natively (AMX or AVX512-BF16).

    Without them torch emulates bf16 matmuls, ~10x slower than float32
    (measured on an AVX2-only EPYC; see README).
    """
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto': bfloat16 on CUDA and on CPUs with native bf16 matmuls, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" or cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ConfigError("dtype", dtype, f"must be 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", str(device), "CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError("device", str(device), "must be 'cpu', 'cuda' or 'auto'")
    return dev


@dataclass
class SchedulerConfig:
    # Tokens processed per step across all requests (prefill chunks + decodes).
    max_num_batched_tokens: int = 2048
    # Requests running at once.
    max_num_seqs: int = 256
    # "fcfs": first come, first served. "priority": a request's `priority` (lower value
    # first, as in vLLM) orders admission, and under pressure the lowest-priority
    # running request is preempted, also to admit a higher-priority one.
    policy: str = "fcfs"
    # When blocks run out, a preempted request either drops its KV and computes it again
    # later ("recompute"), or has its blocks copied to the host swap space and back
    # ("swap", falling back to recompute when the swap space has no room).
    preemption_mode: str = "recompute"

    def __post_init__(self) -> None:
        if self.policy not in ("fcfs", "priority"):
            raise ConfigError("policy", self.policy, "must be 'fcfs' or 'priority'")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ConfigError("preemption_mode", self.preemption_mode, "must be 'recompute' or 'swap'")
        if self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens", self.max_num_batched_tokens, "must be >= 1")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs", self.max_num_seqs, "must be >= 1")


@dataclass
class CacheConfig:
    block_size: int = 16
    # Bytes for K and V of all layers. None: DEFAULT_CPU_KV_CACHE_BYTES on CPU,
    # `gpu_memory_utilization` of the free GPU memory on CUDA.
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    # Overrides the memory budget with an exact block count (tests).
    num_blocks: int | None = None
    # Reuse the KV of full blocks whose tokens (and everything before them) match.
    enable_prefix_caching: bool = True
    # n > 1: siblings share the prompt's blocks (ref counts, copy on write) instead of copies.
    enable_fork_sharing: bool = True
    # Offload tiers for prefix-cache blocks the device evicts: GiB of host memory, and a
    # folder on disk (kept across restarts). A disk folder alone gets 1 GiB of host memory.
    kv_offload_cpu_gb: float | None = None
    kv_offload_disk: str | None = None
    # The disk folder's budget; least recently used block files are deleted beyond it.
    kv_offload_disk_gb: float = 16.0
    # GiB of host memory for the blocks of requests preempted by swapping (preemption_mode
    # "swap" only; allocated only then). 0: no swap space, every preemption recomputes.
    swap_space: float = 4.0

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size > 1024:
            raise ConfigError("block_size", self.block_size, "must be in [1, 1024]")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError("kv_cache_memory", self.kv_cache_memory, "must be > 0 bytes")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("gpu_memory_utilization", self.gpu_memory_utilization, "must be in (0, 1]")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError("num_blocks", self.num_blocks, "must be >= 1")
        if not self.swap_space >= 0 or self.swap_space == float("inf"):
            raise ConfigError("swap_space", self.swap_space, "must be a finite number of GiB >= 0")
        if self.kv_offload_cpu_gb is not None and (not self.kv_offload_cpu_gb >= 0
                                                   or self.kv_offload_cpu_gb == float("inf")):
            raise ConfigError("kv_offload_cpu_gb", self.kv_offload_cpu_gb, "must be a finite number of GiB >= 0")
        if not self.kv_offload_disk_gb > 0 or self.kv_offload_disk_gb == float("inf"):
            raise ConfigError("kv_offload_disk_gb", self.kv_offload_disk_gb, "must be a finite number of GiB > 0")
        if self.kv_offload_disk is not None and self.kv_offload_cpu_gb == 0:
            raise ConfigError("kv_offload_cpu_gb", 0, "must be > 0 with kv_offload_disk "
                              "(blocks reach the disk through host memory)")
        if self.offload_host_bytes and not self.enable_prefix_caching:
            raise ConfigError("kv_offload_cpu_gb", self.kv_offload_cpu_gb,
                              "offload tiers keep prefix-cache blocks: prefix caching must be on")

    @property
    def offload_host_bytes(self) -> int:
        """Host memory for the offload tier (0 = no tiers)."""
        gb = self.kv_offload_cpu_gb
        if gb is None:
            gb = 1.0 if self.kv_offload_disk is not None else 0.0
        return int(gb * 1024**3)


@dataclass
class LoRAConfig:
    """Multi-LoRA serving (docs/lora.md): `max_loras` adapters at once in a batch (device
    slots), each of rank <= `max_lora_rank`; `max_cpu_loras` read adapters kept in host memory
    (default: max_loras)."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ConfigError("max_loras", self.max_loras, "must be >= 1")
        if self.max_lora_rank < 1:
            raise ConfigError("max_lora_rank", self.max_lora_rank, "must be >= 1")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ConfigError("max_cpu_loras", self.max_cpu_loras, f"must be >= max_loras={self.max_loras}")


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    device: str | torch.device | None = None
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    max_model_len: int | None = None
    seed: int = 0
    num_threads: int | None = None
    # auto: the compiled CPU kernel on a CPU device where it loads, the Triton kernels on CUDA where
    # triton imports, else torch (model/attention/backend.py).
    attention_backend: str = "auto"
    # CUDA only: True turns off CUDA graphs for decode-only steps (worker/cuda_graphs.py); every
    # step then runs eagerly. Meaningless (and harmless) on CPU.
    enforce_eager: bool = False
    # How linear layers store weights (docs/quantization.md): "auto" (GGUF blocks kept
    # packed where that measured faster at equal quality, else float), None/"none",
    # "gguf", "int8", "int4".
    quantization: str | None = "auto"
    # Speculative decoding (engine/spec_decode): vLLM's dict, e.g. {"method": "ngram",
    # "num_speculative_tokens": 4}, a JSON string of it, or a SpeculativeConfig; None: off.
    speculative_config: object = None
    # Multi-LoRA serving (model/lora/); None: off (requests with an adapter are refused).
    lora: LoRAConfig | None = None
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ConfigError("load_format", self.load_format, "must be auto, safetensors, gguf or dummy")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("max_model_len", self.max_model_len, "must be >= 1")
        if self.quantization is not None and self.quantization not in QUANTIZATION_CHOICES:
            raise ConfigError("quantization", self.quantization,
                              f"must be one of {', '.join(QUANTIZATION_CHOICES)} (or None)")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError("num_threads", self.num_threads, f"must be in [1, {os.cpu_count()}]")
        from pagoda.engine.spec_decode.config import SpeculativeConfig  # imports this module

        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if self.speculative_config is not None and self.speculative_config.method == "draft_model" \
                and self.cache.offload_host_bytes:
            # The tiers keep the target's KV only (in host memory and on disk, keyed by the target).
            raise ConfigError("kv_offload_cpu_gb" if self.cache.kv_offload_cpu_gb else "kv_offload_disk",
                              self.cache.kv_offload_cpu_gb or self.cache.kv_offload_disk,
                              "KV offload tiers do not carry a draft model's KV cache: turn them off with "
                              "speculative_config.method='draft_model'")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError("attention_backend", self.attention_backend,
                              f"must be one of {', '.join(ATTENTION_BACKENDS)}")


def engine_config_from_kwargs(model: str, **kwargs) -> EngineConfig:
    """One flat set of keyword arguments (as `LLM(...)` and the CLI take them)
    sorted into EngineConfig, SchedulerConfig and CacheConfig fields."""
    scheduler_keys = SchedulerConfig.__dataclass_fields__.keys()
    cache_keys = CacheConfig.__dataclass_fields__.keys()
    scheduler = SchedulerConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in scheduler_keys})
    cache = CacheConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in cache_keys})
    lora_keys = LoRAConfig.__dataclass_fields__.keys()
    lora_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in lora_keys}
    if kwargs.pop("enable_lora", False):
        kwargs["lora"] = LoRAConfig(**lora_kwargs)
    elif any(v is not None for v in lora_kwargs.values()) and "lora" not in kwargs:
        raise ConfigError("enable_lora", False, f"must be True to use {sorted(lora_kwargs)}")
    return EngineConfig(model=model, scheduler=scheduler, cache=cache, **kwargs)
