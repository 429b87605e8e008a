"""Greedy tokens and logprobs match HuggingFace transformers on the same weights.

Tolerance for top-5 logprobs: 1e-3 (absolute, in nats), both sides in float32.
The two implementations differ only in the order of float additions (fused
q/k/v and gate/up matmuls, paged attention vs HF's attention), which moves
logprobs by at most 3e-5 (measured on SmolLM2-135M); any real error (mask, rope, GQA mapping, norm)
moves them by 1e-1 or more, far above the tolerance.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagoda import LLM, SamplingParams
from tests.conftest import TINY_VOCAB, make_tiny_checkpoint

LOGPROB_ATOL = 1e-3
PROMPT_LENGTHS = (1, 7, 16, 33, 70)
NEW_TOKENS = 24


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def _hf_generate(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and their log-softmax (on the CPU) from transformers, on the model's device."""
    out = model.generate(
        torch.tensor([prompt], device=model.device),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = torch.log_softmax(torch.stack(out.logits).squeeze(1).float(), dim=-1).cpu()
    return tokens, logprobs


def assert_matches_transformers(case: str, prompts: list[list[int]], outputs, hf_model) -> None:
    """pagoda's greedy tokens equal transformers', and its top-5 logprobs are within LOGPROB_ATOL."""
    for prompt, output in zip(prompts, outputs):
        ref_tokens, ref_logprobs = _hf_generate(hf_model, prompt)
        completion = output.outputs[0]
        assert completion.token_ids == ref_tokens, f"{case}, prompt of {len(prompt)} tokens"
        for step, entry in enumerate(completion.logprobs):
            top5 = ref_logprobs[step].topk(5)
            for token_id, ref in zip(top5.indices.tolist(), top5.values.tolist()):
                assert token_id in entry, f"{case}: step {step} top-5 differs"
                assert abs(entry[token_id] - ref) < LOGPROB_ATOL, (case, step, token_id, entry[token_id], ref)


CASES = {
    "llama-mha": ("llama", dict(num_key_value_heads=4)),
    "llama-gqa": ("llama", dict(num_key_value_heads=2)),
    "llama-mqa": ("llama", dict(num_key_value_heads=1)),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-rope-linear": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-rope-dynamic": ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "llama-rope-llama3": ("llama", dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "qwen2": ("qwen2", dict()),
    "qwen3": ("qwen3", dict()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_and_logprobs_match_transformers(case, tmp_path):
    arch, overrides = CASES[case]
    folder = make_tiny_checkpoint(tmp_path, arch, **overrides)
    prompts = _prompts(TINY_VOCAB)
    llm = LLM(str(folder), dtype="float32", show_progress=False, kv_cache_memory=64 * 1024**2)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    outputs = llm.generate(prompts, params)  # all prompts in one batch
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert_matches_transformers(case, prompts, outputs, hf_model)


def test_unknown_rope_type_is_a_clear_error(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, "llama")
    import json

    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "warp-drive", "factor": 2.0}
    config.pop("rope_parameters", None)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="warp-drive"):
        LLM(str(folder), dtype="float32", show_progress=False)
