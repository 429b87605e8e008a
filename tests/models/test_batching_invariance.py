"""The same requests give the same greedy tokens however the engine batches them."""

from __future__ import annotations

import torch

from pagoda import LLM, SamplingParams
from tests.conftest import TINY_VOCAB

LENGTHS = [(5, 30), (40, 12), (17, 25), (64, 8), (3, 40), (33, 33)]  # (prompt, output)


def _requests():
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, TINY_VOCAB, (p,), generator=gen).tolist() for p, _ in LENGTHS]
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in LENGTHS]
    return prompts, params


def _run(folder, **engine_kwargs):
    engine_kwargs.setdefault("kv_cache_memory", 64 * 1024**2)
    llm = LLM(str(folder), dtype="float32", show_progress=False, **engine_kwargs)
    prompts, params = _requests()
    return llm, [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_outputs_identical_across_batching_modes(tiny_llama):
    _, together = _run(tiny_llama)

    llm_single = LLM(str(tiny_llama), dtype="float32", show_progress=False, kv_cache_memory=64 * 1024**2)
    prompts, params = _requests()
    one_at_a_time = [llm_single.generate([p], [sp])[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    assert one_at_a_time == together

    # A budget of 8 tokens per step forces every prompt through chunked prefill.
    _, chunked = _run(tiny_llama, max_num_batched_tokens=8)
    assert chunked == together

    # 20 blocks of 4 tokens (80 slots) cannot hold the six requests (310 tokens) at once.
    llm, preempted = _run(tiny_llama, block_size=4, num_blocks=20, max_model_len=80)
    assert llm.engine.scheduler.num_preemptions_total > 0
    assert preempted == together
    assert llm.engine.kv_cache_manager.num_free_blocks == 20

    for tokens, (_, out_len) in zip(together, LENGTHS):
        assert len(tokens) == out_len
