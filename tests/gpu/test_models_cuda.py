"""The parity and batching checks of tests/models, on CUDA with the Triton attention backend and
CUDA graphs on (the engine's defaults there). Skips without CUDA and under Triton's interpreter
(run tests/gpu in a process of its own, as benchmarks/gpu_suite.py does).

Both sides run in float32 on the same GPU; cuBLAS may sum in another order than the CPU, which
moves logprobs by far less than the 1e-3 tolerance test_parity.py uses (a real error moves them
by 1e-1 or more)."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.compiled_triton import require_compiled_triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
require_compiled_triton()

from pagoda import LLM, SamplingParams  # noqa: E402
from tests.conftest import TINY_VOCAB, make_tiny_checkpoint  # noqa: E402
from tests.models.test_batching_invariance import LENGTHS, _requests  # noqa: E402
from tests.models.test_parity import CASES, NEW_TOKENS, _prompts, assert_matches_transformers  # noqa: E402

CUDA = torch.device("cuda")


def _llm(folder, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory", 64 * 1024**2)
    kwargs.setdefault("max_num_seqs", 8)  # graphs captured for 1, 2, 4, 8 rows: a quick start-up
    return LLM(str(folder), dtype="float32", device="cuda", show_progress=False, **kwargs)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_and_logprobs_match_transformers_on_cuda(case, tmp_path):
    from transformers import AutoModelForCausalLM

    arch, overrides = CASES[case]
    folder = make_tiny_checkpoint(tmp_path, arch, **overrides)
    prompts = _prompts(TINY_VOCAB)
    llm = _llm(folder)
    assert llm.engine.runner.cuda_graphs is not None
    assert llm.engine.runner.attention.name == "triton"
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    outputs = llm.generate(prompts, params)
    assert llm.engine.runner.cuda_graphs.num_replays > 0
    del llm
    torch.cuda.empty_cache()
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(CUDA).eval()
    assert_matches_transformers(case, prompts, outputs, hf_model)  # transformers on the same GPU


def _tokens(llm: LLM, one_at_a_time: bool = False) -> list[list[int]]:
    prompts, params = _requests()
    if one_at_a_time:
        return [llm.generate([p], [sp])[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_outputs_identical_across_batching_modes_on_cuda(tiny_llama):
    llm = _llm(tiny_llama)
    together = _tokens(llm)
    assert _tokens(llm, one_at_a_time=True) == together
    assert llm.engine.runner.cuda_graphs.num_replays > 0
    del llm

    # A budget of 8 tokens per step forces every prompt through chunked prefill.
    assert _tokens(_llm(tiny_llama, max_num_batched_tokens=8)) == together

    # 6 blocks of 16 tokens (96 slots) cannot hold the six requests (310 tokens) at once.
    llm = _llm(tiny_llama, block_size=16, num_blocks=6, max_model_len=80)
    assert _tokens(llm) == together
    assert llm.engine.scheduler.num_preemptions_total > 0
    assert llm.engine.kv_cache_manager.num_free_blocks == 6

    # The same tokens with graphs off and with the torch backend.
    assert _tokens(_llm(tiny_llama, enforce_eager=True)) == together
    assert _tokens(_llm(tiny_llama, attention_backend="torch", enforce_eager=True)) == together
    for tokens, (_, out_len) in zip(together, LENGTHS):
        assert len(tokens) == out_len
