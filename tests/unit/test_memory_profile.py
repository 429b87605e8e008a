"""The KV-cache sizing on CUDA (engine/memory_profile.py): the largest step's rows, the budget
arithmetic, and the profile step itself run on the CPU (its measurement needs CUDA:
tests/gpu/test_triton_cuda.py)."""

from __future__ import annotations

import pytest
import torch

from pagoda.engine.memory_profile import kv_budget_bytes, largest_step_lengths, run_largest_step


def test_the_largest_step_is_cut_into_rows_the_scheduler_could_plan():
    assert largest_step_lengths(2048, 4096, 256) == [2048]
    assert largest_step_lengths(8192, 3000, 256) == [3000, 3000, 2192]
    assert largest_step_lengths(100, 10, 4) == [10, 10, 10, 10]  # max_num_seqs rows at most
    assert largest_step_lengths(1, 1, 1) == [1]


def test_the_budget_leaves_the_weights_and_the_largest_step_out():
    gib = 2**30
    # 80 GiB GPU, 90%: 72 GiB; 10 GiB in use (weights, context); a 3 GiB step peak.
    assert kv_budget_bytes(80 * gib, 70 * gib, 0.9, 3 * gib) == 59 * gib
    assert kv_budget_bytes(80 * gib, 70 * gib, 0.9, 0) == 62 * gib  # the rule before profiling
    assert kv_budget_bytes(8 * gib, 1 * gib, 0.9, 2 * gib) < 0  # nothing left: the engine refuses


@pytest.mark.parametrize("lengths", [[40], [24, 24, 9]])
def test_the_profile_step_runs_over_its_temporary_cache(tiny_llama, lengths):
    from pagoda import LLM

    llm = LLM(str(tiny_llama), dtype="float32", show_progress=False, kv_cache_memory=16 * 1024**2)
    engine = llm.engine
    assert engine.profiled_step_bytes is None  # CPU: no profile
    logits = run_largest_step(engine.model, engine.hf_config, engine.dtype, engine.device, lengths, 2, 16, "auto")
    assert logits.shape == (2, engine.vocab_size) and torch.isfinite(logits).all()
    # The engine's own cache was not touched by the profile step.
    assert all(not k.any() and not v.any() for k, v in engine.kv_caches)
