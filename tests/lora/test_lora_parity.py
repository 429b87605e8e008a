"""Greedy tokens with LoRA adapters equal transformers + peft (float32), alone and mixed in one batch.

Adapters are made with peft on the tiny random checkpoints (tests/conftest.py), with random
nonzero A and B, on every target module combination pagoda serves (fused qkv_proj and
gate_up_proj included), different ranks, lora_alpha / r and rsLoRA scaling.
"""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM, LoRARequest, SamplingParams
from tests.conftest import TINY_VOCAB, make_tiny_checkpoint
from tests.lora.adapters import hf_greedy, make_adapter

NEW_TOKENS = 12
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMBOS = {
    "q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"], "gate": ["gate_proj"],
    "up": ["up_proj"], "down": ["down_proj"], "qv": ["q_proj", "v_proj"], "qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"], "all": ALL,
}


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY_VOCAB, (length,), generator=gen).tolist() for length in (5, 19, 40)[:n]]


def _llm(folder, **kwargs) -> LLM:
    return LLM(str(folder), dtype="float32", show_progress=False, kv_cache_memory=32 * 1024**2,
               enable_lora=True, max_lora_rank=16, **kwargs)


PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("combo", list(COMBOS))
def test_each_target_combination_matches_peft(combo, arch, tmp_path):
    base = make_tiny_checkpoint(tmp_path / "base", arch)
    adapter = make_adapter(base, tmp_path / "adapter", COMBOS[combo], rank=8, seed=3)
    llm = _llm(base, max_loras=1)
    prompt = _prompts(1)[0]
    lora = LoRARequest("a", 1, str(adapter))
    tokens = llm.generate([prompt], PARAMS, lora_request=lora)[0].outputs[0].token_ids
    assert tokens == hf_greedy(base, adapter, prompt, NEW_TOKENS), (arch, combo)
    base_tokens = llm.generate([prompt], PARAMS)[0].outputs[0].token_ids
    assert base_tokens == hf_greedy(base, None, prompt, NEW_TOKENS)
    assert tokens != base_tokens, "the adapter should change the output"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_mixed_batch_of_base_and_three_adapters_matches_solo_and_peft(arch, tmp_path):
    base = make_tiny_checkpoint(tmp_path / "base", arch)
    adapters = [
        make_adapter(base, tmp_path / "a1", ["q_proj", "v_proj"], rank=4, seed=11),
        make_adapter(base, tmp_path / "a2", ALL, rank=8, seed=12, use_rslora=True),
        make_adapter(base, tmp_path / "a3", ["k_proj", "o_proj", "gate_proj", "down_proj"], rank=16, seed=13,
                     alpha=8),
    ]
    loras = [None] + [LoRARequest(f"a{i}", i, str(path)) for i, path in enumerate(adapters, 1)]
    prompts = _prompts(3)
    cases = [(prompt, lora) for prompt in prompts for lora in loras]  # every prompt with every adapter
    llm = _llm(base, max_loras=4)
    mixed = llm.generate([p for p, _ in cases], PARAMS, lora_request=[lora for _, lora in cases])
    for (prompt, lora), output in zip(cases, mixed):
        solo = llm.generate([prompt], PARAMS, lora_request=lora)[0].outputs[0].token_ids
        reference = hf_greedy(base, None if lora is None else lora.lora_path, prompt, NEW_TOKENS)
        name = "base" if lora is None else lora.lora_name
        assert output.outputs[0].token_ids == solo, (arch, name, len(prompt))
        assert solo == reference, (arch, name, len(prompt))
    outputs_per_prompt = {}
    for (prompt, lora), output in zip(cases, mixed):
        outputs_per_prompt.setdefault(len(prompt), set()).add(tuple(output.outputs[0].token_ids))
    assert all(len(v) > 1 for v in outputs_per_prompt.values()), "adapters should change outputs"
