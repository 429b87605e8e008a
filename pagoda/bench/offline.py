"""Offline engine benchmarks: `pagoda bench throughput` and `pagoda bench latency`.

throughput: the same requests (token-id prompts, exact output lengths with
ignore_eos, greedy) through
  - pagoda with continuous batching (one generate over all requests),
  - pagoda with static batches (`--static-batch N`: N requests at a time in
    arrival order; finished requests leave, but nobody joins until the whole
    batch is done),
  - transformers `generate()` with static batches (`--baseline hf`): left
    padded, each batch runs to its longest output; only each request's own
    output counts as useful.
latency: one batch of fixed size and lengths; prefill time (generate with
max_tokens=1) and the full generation, over repeats after warm-up; decode
time per step = (full - prefill) / (output_len - 1).
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from dataclasses import asdict, dataclass

MIN_TOKEN_ID = 20  # ids below are special tokens in the default model's vocabulary


@dataclass
class OfflineRequest:
    prompt: list[int]
    output_len: int


@dataclass
class ThroughputResult:
    system: str  # "pagoda", "pagoda static", "hf static"
    wall_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int  # useful output: each request's own length
    computed_output_tokens: int  # with static-batch padding
    batch_size: int | None = None
    kv_token_efficiency: float | None = None

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.wall_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall_s

    def to_dict(self) -> dict:
        return {**asdict(self), "requests_per_s": self.requests_per_s,
                "output_tokens_per_s": self.output_tokens_per_s, "total_tokens_per_s": self.total_tokens_per_s}


def random_requests(num: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int,
                    seed: int = 0) -> list[OfflineRequest]:
    rng = random.Random(seed)
    return [OfflineRequest([rng.randrange(MIN_TOKEN_ID, vocab_size) for _ in range(rng.randint(*input_len))],
                           rng.randint(*output_len)) for _ in range(num)]


def _greedy(output_len: int):
    from pagoda.sampling_params import SamplingParams

    return SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)


def warm_up(llm) -> None:
    llm.generate([[MIN_TOKEN_ID + i for i in range(16)]] * 2, _greedy(4))


def run_pagoda(llm, requests: list[OfflineRequest], static_batch: int | None = None,
               progress=None) -> ThroughputResult:
    """Continuous batching over all requests, or static batches of `static_batch`."""
    groups = [requests] if not static_batch else [requests[i:i + static_batch]
                                                  for i in range(0, len(requests), static_batch)]
    before = llm.engine.stats()
    start = time.perf_counter()
    generated = 0
    for group in groups:
        outputs = llm.generate([r.prompt for r in group], [_greedy(r.output_len) for r in group])
        generated += sum(len(o.outputs[0].token_ids) for o in outputs)
        if progress is not None:
            progress(len(group))
    wall = time.perf_counter() - start
    useful = sum(r.output_len for r in requests)
    if generated != useful:
        raise RuntimeError(f"pagoda generated {generated} tokens, expected {useful}")
    after = llm.engine.stats()
    slots = after.kv_token_slots_total - before.kv_token_slots_total
    efficiency = (after.kv_tokens_stored_total - before.kv_tokens_stored_total) / slots if slots else None
    return ThroughputResult("pagoda static" if static_batch else "pagoda", wall, len(requests),
                            sum(len(r.prompt) for r in requests), useful, generated, static_batch, efficiency)


def load_hf_model(model: str, dtype: str = "float32"):
    """transformers' model for the same weights pagoda serves (an HF folder or a GGUF file)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from pagoda.model.loader.resolve import resolve_model

    transformers.logging.set_verbosity_error()
    source = resolve_model(model)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if source.kind == "gguf":
        hf = AutoModelForCausalLM.from_pretrained(str(source.path.parent), gguf_file=source.path.name,
                                                  dtype=torch.float32).to(torch_dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(str(source.folder), dtype=torch_dtype)
    return hf.eval()


def run_hf(hf_model, requests: list[OfflineRequest], batch_size: int, progress=None) -> ThroughputResult:
    import torch

    eos = hf_model.generation_config.eos_token_id
    pad_id = (eos[0] if isinstance(eos, (list, tuple)) else eos) or 0
    wall = 0.0
    computed = 0
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        new_tokens = max(r.output_len for r in batch)
        width = max(len(r.prompt) for r in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):
            input_ids[row, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[row, width - len(r.prompt):] = 1
        began = time.perf_counter()
        with torch.inference_mode():
            out = hf_model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
        wall += time.perf_counter() - began
        if out.shape[1] - width != new_tokens:
            raise RuntimeError(f"transformers generated {out.shape[1] - width} tokens, expected {new_tokens}")
        computed += len(batch) * new_tokens
        if progress is not None:
            progress(len(batch))
    return ThroughputResult("hf static", wall, len(requests), sum(len(r.prompt) for r in requests),
                            sum(r.output_len for r in requests), computed, batch_size)


@dataclass
class LatencyResult:
    batch_size: int
    input_len: int
    output_len: int
    prefill_s: list[float]
    total_s: list[float]

    @property
    def decode_step_s(self) -> list[float]:
        steps = max(1, self.output_len - 1)
        return [(t - p) / steps for t, p in zip(self.total_s, self.prefill_s)]

    def summary(self) -> dict:
        def stats(values: list[float]) -> dict:
            ordered = sorted(values)
            return {"mean": statistics.mean(values), "p50": statistics.median(values),
                    "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "min": ordered[0],
                    "max": ordered[-1]}

        return {"batch_size": self.batch_size, "input_len": self.input_len, "output_len": self.output_len,
                "repeats": len(self.total_s), "prefill_s": stats(self.prefill_s),
                "decode_step_s": stats(self.decode_step_s), "total_s": stats(self.total_s),
                "decode_tokens_per_s": self.batch_size / statistics.median(self.decode_step_s)}


def run_latency(llm, batch_size: int, input_len: int, output_len: int, repeats: int = 3, warmup: int = 1,
                seed: int = 0, progress=None) -> LatencyResult:
    vocab = llm.engine.vocab_size
    rng = random.Random(seed)

    def draw() -> list[list[int]]:
        # Fresh prompts for every run: a repeated prompt would hit the prefix cache, and the
        # run after it would not pay its prefill (decode time = total - prefill < 0).
        return [[rng.randrange(MIN_TOKEN_ID, vocab) for _ in range(input_len)] for _ in range(batch_size)]

    prefill, total = [], []
    for i in range(warmup + repeats):
        first, second = draw(), draw()
        began = time.perf_counter()
        llm.generate(first, _greedy(1))
        middle = time.perf_counter()
        outputs = llm.generate(second, _greedy(output_len))
        end = time.perf_counter()
        if any(len(o.outputs[0].token_ids) != output_len for o in outputs):
            raise RuntimeError("a request did not generate output_len tokens")
        if i >= warmup:
            prefill.append(middle - began)
            total.append(end - middle)
        if progress is not None:
            progress(1)
    gc.collect()
    return LatencyResult(batch_size, input_len, output_len, prefill, total)
