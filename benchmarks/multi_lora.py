"""Multi-LoRA serving: output tok/s of the base model alone vs 4 LoRA adapters mixed round-robin.

One engine (the default model, `enable_lora=True, max_loras=4`) serves two workloads of
`--concurrency` requests submitted at once (offline `LLM.generate`, one batch), each
greedy with `--max-tokens` tokens (ignore_eos, so both produce the same token count):
- base: no request has an adapter (the LoRA path is skipped entirely);
- mixed: request i uses adapter i % 4 (all four in every step).
Adapters are PEFT-format folders with random weights (rank `--rank` on every target
module), written by this script. Prompts differ per request (no prefix-cache sharing).
Rounds alternate between the workloads; the best round of each is kept (the machine is
shared), and each round's own mixed / base is printed too (a round's two runs are
neighbours in time, so their ratio is the least disturbed by other load). Target: mixed
>= 80% of base.

    python benchmarks/multi_lora.py [--rounds 2] [--concurrency 32] [--max-tokens 64] [--rank 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from soak import cpu_model  # the benchmarks' one CPU-name helper

from pagoda import LLM, LoRARequest, SamplingParams
from pagoda.model.lora.adapter import ModelShape

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(folder: Path, shape: ModelShape, rank: int, targets: list[str], seed: int) -> Path:
    """A PEFT LoRA adapter folder with random weights (what peft's save_pretrained writes)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape.num_layers):
        for module in targets:
            in_f, out_f = shape.features[module]
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.02
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": targets, "bias": "none",
        "use_rslora": False, "use_dora": False, "modules_to_save": None}))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--num-adapters", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "multi_lora.json")
    args = parser.parse_args()

    load_at_start = os.getloadavg()  # `uptime`'s 1 / 5 / 15-minute load averages: the machine is shared
    llm = LLM(args.model, show_progress=False, enable_lora=True, max_loras=args.num_adapters,
              max_lora_rank=args.rank, num_threads=args.threads)
    shape = ModelShape.from_hf_config(llm.engine.hf_config)
    tmp = Path(tempfile.mkdtemp(prefix="pagoda-multi-lora-"))
    loras = [LoRARequest(f"adapter{i}", i + 1, str(write_adapter(tmp / f"a{i}", shape, args.rank, TARGETS, i)))
             for i in range(args.num_adapters)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    topics = ["the sea", "a red fox", "mountains", "old clocks", "rain", "a library", "bread", "trains"]

    def prompts(round_index: int) -> list[str]:  # distinct per request and round: no prefix-cache hits
        return [f"Round {round_index}, request {i}: write a short story about {topics[i % len(topics)]}."
                for i in range(args.concurrency)]

    workloads = {"base": [None] * args.concurrency,
                 "mixed": [loras[i % len(loras)] for i in range(args.concurrency)]}
    llm.generate(prompts(-1)[:4], SamplingParams(max_tokens=4), lora_request=loras[:1] * 4)  # warm-up
    best: dict[str, float] = {}
    paired: list[float] = []  # mixed / base within each round (neighbours in time: the fairest pairs)
    for round_index in range(args.rounds):
        rates = {}
        for name, lora_requests in workloads.items():
            t0 = time.perf_counter()
            outputs = llm.generate(prompts(round_index * 10 + len(name)), params, lora_request=lora_requests)
            wall = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            rate = tokens / wall
            rates[name] = rate
            best[name] = max(best.get(name, 0.0), rate)
            print(f"round {round_index} {name:5s}: {tokens} tokens in {wall:.2f}s = {rate:.1f} tok/s", flush=True)
        paired.append(rates["mixed"] / rates["base"])
    ratio = best["mixed"] / best["base"]
    median_paired = statistics.median(paired)
    print()
    print(f"| workload ({args.concurrency} requests, {args.max_tokens} tokens each) | output tok/s |")
    print("|---|---|")
    print(f"| base model only | {best['base']:.1f} |")
    print(f"| {args.num_adapters} adapters (rank {args.rank}, all 7 projections) round-robin | {best['mixed']:.1f} |")
    print(f"| mixed / base | {ratio:.1%} (target >= 80%) |")
    print(f"round by round: {', '.join(f'{p:.1%}' for p in paired)} (median {median_paired:.1%})")
    load = os.getloadavg()
    result = {
        "benchmark": "multi_lora", "model": args.model, "concurrency": args.concurrency,
        "max_tokens": args.max_tokens, "rank": args.rank, "num_adapters": args.num_adapters,
        "target_modules": TARGETS, "rounds": args.rounds, "base_tok_s": round(best["base"], 2),
        "mixed_tok_s": round(best["mixed"], 2), "mixed_over_base": round(ratio, 4),
        "mixed_over_base_per_round": [round(p, 4) for p in paired], "median_per_round": round(median_paired, 4),
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "load_average_at_start": load_at_start,
        "load_average_at_end": load,
        "quantization": llm.engine.config.quantization, "dtype": str(llm.engine.dtype),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
