"""Quality and speed of each linear method on the default model (SmolLM2-135M Q4_1 GGUF).

Quality, teacher-forced through pagoda's own forward (``prompt_logprobs=1``) over a
fixed public-domain text (benchmarks/data/opticks_excerpt.txt, ~5.3k tokens) cut into
windows of ``--window`` tokens:
- perplexity over every predicted token,
- top-1 agreement: how often the method's most likely next token equals the
  reference's. The reference is the float model: the GGUF dequantized, in float32.

A prefill runs the large-M kernels, decode the small-M ones, and they differ. In a
small model's 4-bit forms, prompt tokens take W8A8 on the W8A8_LAYERS (o_proj,
gate_up_proj; on CPUs with int8 dot products) and a bf16 copy of the other layers'
weights above 64 rows; generated tokens take pagoda's packed GEMV on every layer up to
64 of them in a step (decode; int8 activations on the W8A8_LAYERS and the lm_head). ``int8`` runs W8A8 on every layer above SMALL_M_MAX rows.
The plain rows measure the prefill kernels (teacher forcing runs 512-token windows);
``@small-M`` forces the decode kernels at every row count, prompt tokens included.

Speed (``--speed``): every configuration is loaded once, then rounds run round-robin
(single stream: 128 greedy tokens; batch: 64 requests x 64 tokens at once), and the
best round is kept: the machine is shared, and a configuration's best round is the
one least disturbed.

    python benchmarks/quant_quality.py [--speed] [--rounds 3] [--out benchmarks/results/quant_quality.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pagoda import LLM
from pagoda.model.quant import packed
from pagoda.worker import model_runner
from pagoda.sampling_params import SamplingParams

TEXT = Path(__file__).resolve().parent / "data" / "opticks_excerpt.txt"


@dataclass(frozen=True)
class Config:
    label: str
    dtype: str
    quantization: str
    kernels: str = "prefill"  # "prefill" (as the tokens and row counts decide) or "small-M" (decode's everywhere)
    # (4-bit, 8-bit) int8 activations in pagoda's GEMV: True / False for every layer, or a set of
    # layer names (packed.GEMV_Q8_ACTIVATIONS); None: the defaults (4-bit: W8A8_LAYERS; 8-bit: all).
    gemv_q8: tuple[bool | frozenset[str], bool | frozenset[str]] | None = None


CONFIGS = [
    Config("reference (float32)", "float32", "none"),
    Config("none (bf16)", "bfloat16", "none"),
    Config("gguf", "bfloat16", "gguf"),
    Config("gguf@small-M", "bfloat16", "gguf", "small-M"),
    Config("gguf@small-M, bf16 activations", "bfloat16", "gguf", "small-M", (False, False)),
    Config("gguf@small-M, int8 activations but qkv_proj", "bfloat16", "gguf", "small-M",
           (packed.Q8_TOLERANT_LAYERS, True)),
    Config("gguf@small-M, int8 activations", "bfloat16", "gguf", "small-M", (True, True)),
    Config("int8", "bfloat16", "int8"),
    Config("int8@small-M", "bfloat16", "int8", "small-M"),
    Config("int4", "bfloat16", "int4"),
]
SPEED_CONFIGS = ["none (bf16)", "gguf", "int8", "int4"]


@contextlib.contextmanager
def forced_kernels(kernels: str):
    """Within the block, with ``kernels="small-M"``, every row count takes the decode kernels:
    the GEMV, not a bf16 copy or W8A8, and prompt tokens are not told apart."""
    saved = packed.SMALL_M_MAX, packed.W8A8_OVER_INT4_ROWS, dict(packed._GEMV_MAX_ROWS)
    saved_marker = model_runner.w8a8_for_prompt_tokens
    if kernels == "small-M":
        packed._GEMV_MAX_ROWS.update({form: 1 << 30 for form in saved[2]})
        packed.SMALL_M_MAX = packed.W8A8_OVER_INT4_ROWS = 1 << 30
        model_runner.w8a8_for_prompt_tokens = lambda generated: contextlib.nullcontext()
    try:
        yield
    finally:
        packed.SMALL_M_MAX, packed.W8A8_OVER_INT4_ROWS = saved[:2]
        packed._GEMV_MAX_ROWS.update(saved[2])
        model_runner.w8a8_for_prompt_tokens = saved_marker


def read_text() -> str:
    text = TEXT.read_text()
    header, _, body = text.partition("\n\n")
    assert all(line.startswith("#") for line in header.splitlines()), "header lines start with '#'"
    return body


def windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids) - 1, size) if len(ids[i:i + size]) > 1]


def teacher_forced(llm: LLM, prompts: list[list[int]]) -> tuple[list[float], list[int]]:
    """Per predicted token: the logprob of the actual token and the most likely token."""
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0))
    logprobs, top1 = [], []
    for prompt, out in zip(prompts, outs):
        for token, entry in zip(prompt[1:], out.prompt_logprobs[1:]):
            logprobs.append(entry[token])
            top1.append(max(entry, key=entry.get))
    return logprobs, top1


def make_llm(config: Config, **kwargs) -> LLM:
    saved = dict(packed.GEMV_Q8_ACTIVATIONS)
    if config.gemv_q8 is not None:  # read as the weights are packed, at load
        packed.GEMV_Q8_ACTIVATIONS.update({4: config.gemv_q8[0], 8: config.gemv_q8[1]})
    try:
        return LLM(dtype=config.dtype, quantization=config.quantization, show_progress=False,
                   kv_cache_memory=512 * 2**20, **kwargs)
    finally:
        packed.GEMV_Q8_ACTIVATIONS.update(saved)


def measure_quality(window: int, only: list[str] | None = None) -> list[dict]:
    rows, reference_top1 = [], None
    for config in CONFIGS:
        if only and config.label not in only and config is not CONFIGS[0]:
            continue
        llm = make_llm(config, max_num_batched_tokens=max(2048, window))
        ids = llm.get_tokenizer()(read_text()).input_ids
        with forced_kernels(config.kernels):
            start = time.perf_counter()
            logprobs, top1 = teacher_forced(llm, windows(ids, window))
            seconds = time.perf_counter() - start
        if reference_top1 is None:
            reference_top1 = top1
        ppl = math.exp(-sum(logprobs) / len(logprobs))
        agree = sum(a == b for a, b in zip(top1, reference_top1)) / len(top1)
        row = {"method": config.label, "dtype": config.dtype, "quantization": config.quantization,
               "tokens": len(logprobs), "perplexity": round(ppl, 4), "top1_agreement": round(agree, 4),
               "seconds": round(seconds, 1)}
        rows.append(row)
        print(row, flush=True)
        del llm
        gc.collect()
    base = rows[0]["perplexity"]
    for row in rows:
        row["ppl_vs_reference_pct"] = round(100 * (row["perplexity"] / base - 1), 2)
    return rows


def measure_speed(rounds: int, single_tokens: int = 128, batch_tokens: int = 64) -> list[dict]:
    configs = [c for c in CONFIGS if c.label in SPEED_CONFIGS]
    llms = {c.label: make_llm(c, enable_prefix_caching=False) for c in configs}
    prompt = "The history of optics begins with"
    tok = next(iter(llms.values())).get_tokenizer()
    body_ids = tok(read_text()).input_ids
    batch_prompts = [body_ids[i * 32:(i + 1) * 32] for i in range(64)]
    single = SamplingParams(max_tokens=single_tokens, temperature=0.0, ignore_eos=True)
    batch = SamplingParams(max_tokens=batch_tokens, temperature=0.0, ignore_eos=True)
    best = {label: {"single_tok_s": 0.0, "batch64_tok_s": 0.0} for label in llms}
    for label, llm in llms.items():  # warm-up: first-use costs (oneDNN kernels, allocations)
        llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))
        llm.generate(batch_prompts[:8], SamplingParams(max_tokens=4, temperature=0.0))
    for r in range(rounds):
        for label, llm in llms.items():
            start = time.perf_counter()
            out = llm.generate([prompt], single)
            rate = len(out[0].outputs[0].token_ids) / (time.perf_counter() - start)
            best[label]["single_tok_s"] = max(best[label]["single_tok_s"], rate)
            start = time.perf_counter()
            outs = llm.generate(batch_prompts, batch)
            rate = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)
            best[label]["batch64_tok_s"] = max(best[label]["batch64_tok_s"], rate)
            print(f"round {r}: {label}: {best[label]}", flush=True)
    rows = []
    for label, llm in llms.items():
        nbytes = sum(m.packed.nbytes if m.packed is not None else m.weight.numel() * m.weight.element_size()
                     for m in llm.engine.model.modules() if type(m).__name__ == "Linear")
        rows.append({"method": label, **{k: round(v, 1) for k, v in best[label].items()},
                     "linear_weight_mib": round(nbytes / 2**20, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--speed", action="store_true", help="also measure decode speed per method")
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--single-tokens", type=int, default=128)
    parser.add_argument("--batch-tokens", type=int, default=64, help="tokens per request of the 64-request batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--only", nargs="+", metavar="METHOD",
                        help="quality of these methods only (labels as printed; the reference always runs)")
    parser.add_argument("--out", default="benchmarks/results/quant_quality.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "text": TEXT.name, "window": args.window}
    if not args.no_quality:
        result["quality"] = measure_quality(args.window, args.only)
        print(f"\n{'method':32s} {'ppl':>9s} {'vs ref':>8s} {'top-1 agree':>12s}")
        for row in result["quality"]:
            print(f"{row['method']:32s} {row['perplexity']:9.3f} {row['ppl_vs_reference_pct']:7.2f}% "
                  f"{100 * row['top1_agreement']:11.2f}%")
    if args.speed:
        result["speed"] = measure_speed(args.rounds, args.single_tokens, args.batch_tokens)
        result["speed_tokens"] = {"single": args.single_tokens, "batch64_per_request": args.batch_tokens}
        print(f"\n{'method':22s} {'1 stream tok/s':>15s} {'64 reqs tok/s':>14s} {'linear MiB':>11s}")
        for row in result["speed"]:
            print(f"{row['method']:22s} {row['single_tok_s']:15.1f} {row['batch64_tok_s']:14.1f} "
                  f"{row['linear_weight_mib']:11.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
