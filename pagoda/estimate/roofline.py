"""Memory plan and roofline times for serving a model on an accelerator.

  weights        = total params * bytes per weight                 (split over tp devices)
  KV cache       = batch * (prompt + output) * KV bytes per token  (split over tp devices)
  TTFT (prefill) = max(prefill FLOPs / (tp * peak FLOP/s), weight bytes / (tp * bandwidth))
  TPOT (decode)  = max(step FLOPs / (tp * peak), step bytes / (tp * bandwidth)),
                   step bytes = weights + the batch's KV at mid-generation context
  intensity      = FLOPs / bytes; the step is compute-bound when it exceeds
                   the accelerator's ridge point peak / bandwidth, else memory-bound

Tensor parallelism divides work and memory evenly; its communication is
not modelled (so tp > 1 times are lower bounds).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pagoda.estimate.hardware import Accelerator
from pagoda.estimate.model_shape import ModelShape

BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class Workload:
    batch_size: int = 1
    prompt_len: int = 1024
    output_len: int = 256
    dtype: str = "bf16"  # weights and compute
    kv_cache_dtype: str | None = None  # default: dtype
    tensor_parallel_size: int = 1
    memory_utilization: float = 0.9

    def __post_init__(self):
        for name in ("dtype", "kv_cache_dtype"):
            value = getattr(self, name)
            if value is not None and value not in BYTES:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(BYTES)}")
        for name in ("batch_size", "prompt_len", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.output_len < 1:
            raise ValueError(f"output_len={self.output_len} must be at least 1")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"memory_utilization={self.memory_utilization} must be in (0, 1]")

    @property
    def kv_dtype(self) -> str:
        return self.kv_cache_dtype or self.dtype


@dataclass(frozen=True)
class Estimate:
    params: dict[str, int]
    weight_bytes: float  # all devices
    kv_bytes_per_token: float
    kv_bytes: float  # the whole batch at full length, all devices
    memory_per_device: float  # weights + KV per device
    usable_memory_per_device: float
    fits: bool
    max_batch_size: int  # at prompt + output tokens each
    max_context_len: int  # at the given batch size
    prefill_flops: float  # the whole batch
    decode_flops_per_token: float  # one sequence at mid-generation context
    ttft_s: float
    ttft_bound: str
    prefill_intensity: float
    tpot_s: float
    tpot_bound: str
    decode_intensity: float
    ridge_point: float
    decode_tokens_per_s: float  # the batch's output rate during decode

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(shape: ModelShape, accelerator: Accelerator, workload: Workload) -> Estimate:
    w = workload
    tp = w.tensor_parallel_size
    peak = accelerator.peak_flops(w.dtype) * tp
    bandwidth = accelerator.bandwidth * tp
    weight_bytes = shape.total_params() * BYTES[w.dtype]
    kv_per_token = shape.kv_bytes_per_token(BYTES[w.kv_dtype])
    sequence_len = w.prompt_len + w.output_len
    kv_bytes = w.batch_size * sequence_len * kv_per_token
    usable = accelerator.memory_bytes * w.memory_utilization
    room_for_kv = usable * tp - weight_bytes  # over all devices

    prefill_flops = w.batch_size * shape.prefill_flops(w.prompt_len)
    prefill_compute, prefill_memory = prefill_flops / peak, weight_bytes / bandwidth
    mid_context = w.prompt_len + w.output_len // 2
    step_flops = w.batch_size * shape.decode_flops(mid_context)
    step_bytes = weight_bytes + w.batch_size * mid_context * kv_per_token
    decode_compute, decode_memory = step_flops / peak, step_bytes / bandwidth
    tpot = max(decode_compute, decode_memory)
    return Estimate(
        params=shape.param_breakdown(),
        weight_bytes=weight_bytes,
        kv_bytes_per_token=kv_per_token,
        kv_bytes=kv_bytes,
        memory_per_device=(weight_bytes + kv_bytes) / tp,
        usable_memory_per_device=usable,
        fits=weight_bytes + kv_bytes <= usable * tp,
        max_batch_size=max(0, int(room_for_kv // (sequence_len * kv_per_token))),
        max_context_len=max(0, int(room_for_kv // (w.batch_size * kv_per_token))),
        prefill_flops=prefill_flops,
        decode_flops_per_token=shape.decode_flops(mid_context),
        ttft_s=max(prefill_compute, prefill_memory),
        ttft_bound="compute" if prefill_compute >= prefill_memory else "memory",
        prefill_intensity=prefill_flops / weight_bytes,
        tpot_s=tpot,
        tpot_bound="compute" if decode_compute >= decode_memory else "memory",
        decode_intensity=step_flops / step_bytes,
        ridge_point=peak / bandwidth,
        decode_tokens_per_s=w.batch_size / tpot,
    )
