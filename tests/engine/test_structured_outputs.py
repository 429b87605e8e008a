"""Structured outputs end to end on the default model, offline: every kind of constraint,
n > 1 and best_of, mixed batches, preemption, prefix caching, a grammar that compiles
while others run, a compile that fails, and refusals."""

from __future__ import annotations

import json
import re
import threading

import pytest

from pagoda import LLM, SamplingParams, StructuredOutputsParams
from pagoda.sampling_params import SamplingParamsError
from pagoda.structured_output.params import StructuredOutputsError
from tests.conftest import requires_smollm2

pytestmark = requires_smollm2

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"type": "string", "enum": ["cat", "dog", "fish"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
DATE = r"\d{4}-\d{2}-\d{2}"


def _valid_person(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"name", "age", "pet"} and isinstance(value["name"], str) and len(value["name"]) <= 20
            and isinstance(value["age"], int) and 0 <= value["age"] <= 120 and value["pet"] in ("cat", "dog", "fish"))


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m-instruct", show_progress=False)


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_each_kind_of_constraint_holds(llm):
    kinds = [
        (StructuredOutputsParams(json=PERSON), _valid_person),
        (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
        (StructuredOutputsParams(regex=DATE), lambda t: re.fullmatch(DATE, t) is not None),
        (StructuredOutputsParams(choice=["yes", "no", "it depends"]), lambda t: t in ("yes", "no", "it depends")),
        (StructuredOutputsParams(grammar='root ::= "The answer is " [0-9] "."'),
         lambda t: re.fullmatch(r"The answer is [0-9]\.", t) is not None),
    ]
    outs = llm.chat([_chat("Tell me about someone, or a date, or anything.")] * len(kinds),
                    [SamplingParams(max_tokens=80, temperature=0.7, seed=i, structured_outputs=so)
                     for i, (so, _) in enumerate(kinds)])
    for (so, valid), out in zip(kinds, outs):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (so.kind, completion.text)
        assert valid(completion.text), (so.kind, completion.text)


def test_a_finished_grammar_stops_the_request_even_with_ignore_eos(llm):
    params = SamplingParams(max_tokens=30, ignore_eos=True, structured_outputs=StructuredOutputsParams(regex=DATE))
    completion = llm.chat([_chat("What is the date?")], params)[0].outputs[0]
    assert completion.finish_reason == "stop" and re.fullmatch(DATE, completion.text)
    assert len(completion.token_ids) <= 11  # the date's tokens and the end token


def test_n_samples_and_best_of_each_follow_the_grammar(llm):
    so = StructuredOutputsParams(json=PERSON)
    out = llm.chat([_chat("Describe a person.")], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=80,
                                                                structured_outputs=so))[0]
    assert len(out.outputs) == 3 and all(_valid_person(c.text) for c in out.outputs)
    assert len({c.text for c in out.outputs}) > 1  # each sample has its own matcher, its own text
    best = llm.chat([_chat("Describe a person.")], SamplingParams(n=1, best_of=3, temperature=1.0, seed=5,
                                                                  max_tokens=80, structured_outputs=so))[0]
    assert len(best.outputs) == 1 and _valid_person(best.outputs[0].text)


def test_free_requests_in_a_mixed_batch_are_untouched(llm):
    """Free rows sharing steps with constrained ones are never masked: each greedy token is the
    top token of the row's own raw distribution. (Comparing with a run of the free requests
    alone would test batch invariance instead, which bf16 does not give: a step that also
    prefills another request runs the large-batch kernels, which round differently.)"""
    free = SamplingParams(temperature=0, max_tokens=24, logprobs=1)
    constrained = SamplingParams(temperature=0, max_tokens=80, structured_outputs=StructuredOutputsParams(json=PERSON))
    mixed = llm.chat([_chat("Name a river."), _chat("Describe a person."), _chat("Count to five."),
                      _chat("Describe someone else.")], [free, constrained, free, constrained])
    for out in (mixed[0].outputs[0], mixed[2].outputs[0]):
        assert len(out.token_ids) > 3
        for token, alternatives in zip(out.token_ids, out.logprobs):
            assert alternatives[token] == max(alternatives.values())
    assert _valid_person(mixed[1].outputs[0].text) and _valid_person(mixed[3].outputs[0].text)


@pytest.fixture(scope="module")
def reference_fp32():
    return LLM("smollm2-135m-instruct", show_progress=False, dtype="float32")


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_keeps_each_matcher_in_step_with_its_tokens(reference_fp32, mode):
    # 12 blocks of 16 tokens for 6 requests that each need ~6: preemptions are certain. float32:
    # greedy tokens do not depend on how the batch was cut (tests/models/test_batching_invariance.py).
    small = LLM("smollm2-135m-instruct", show_progress=False, num_blocks=12, max_model_len=128, dtype="float32",
                preemption_mode=mode, swap_space=0.05 if mode == "swap" else 0)
    prompts = [_chat(f"Describe person number {i}.") for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=PERSON))
    outs = small.chat(prompts, params)
    stats = small.engine.stats()
    assert stats.num_preemptions_total > 0
    if mode == "swap":
        assert stats.num_swapped_out_total > 0
    assert all(o.outputs[0].finish_reason == "stop" and _valid_person(o.outputs[0].text) for o in outs)
    expected = reference_fp32.chat(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]


def test_a_cached_prefix_and_a_cached_grammar_give_the_same_answer(reference_fp32):
    # float32: greedy tokens do not depend on how the batch was cut (a cached prefix leaves a
    # tail of a few tokens; in bf16 a step of <= 8 rows takes the packed int4 kernel and a
    # longer one the bf16 copy, which may flip a near-tie).
    llm = reference_fp32
    params = SamplingParams(temperature=0, max_tokens=80, structured_outputs=StructuredOutputsParams(json=PERSON))
    compiles = llm.engine.structured_output.num_compiles
    first = llm.chat([_chat("Describe a gardener in one JSON object, please.")], params)[0]
    second = llm.chat([_chat("Describe a gardener in one JSON object, please.")], params)[0]
    assert second.num_cached_tokens > 0
    assert second.outputs[0].token_ids == first.outputs[0].token_ids and _valid_person(first.outputs[0].text)
    assert llm.engine.structured_output.num_compiles <= compiles + 1  # the schema compiled at most once


def test_a_request_whose_grammar_is_compiling_waits_while_others_run(llm, monkeypatch):
    engine = llm.engine
    manager = engine.structured_output
    release = threading.Event()
    compile_for_real = manager._compile

    def slow_compile(params):
        release.wait(60)
        return compile_for_real(params)

    monkeypatch.setattr(manager, "_compile", slow_compile)
    constrained = engine.add_request("Say a date:", SamplingParams(max_tokens=12, structured_outputs=
                                                                    StructuredOutputsParams(regex=r"\d{2}/\d{2}/\d{4}")))
    free = engine.add_request("Once upon a time", SamplingParams(temperature=0, max_tokens=5))
    finished = {}
    while free not in finished:
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    seq = engine.scheduler.get_request(constrained)
    assert seq.waiting_for_grammar and seq.num_output_tokens == 0  # it waited while the free one ran
    release.set()
    while constrained not in finished:
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert re.fullmatch(r"\d{2}/\d{2}/\d{4}", finished[constrained].outputs[0].text)


def test_a_grammar_that_fails_to_compile_fails_only_its_request(llm, monkeypatch):
    engine = llm.engine
    manager = engine.structured_output
    compile_for_real = manager._compile

    def fussy_compile(params):
        if params.kind == "regex" and params.regex == "z+":
            raise RuntimeError("compiler says no")
        return compile_for_real(params)

    monkeypatch.setattr(manager, "_compile", fussy_compile)
    failing = engine.add_request("a", SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="z+")))
    working = engine.add_request("b", SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="y+")))
    finished = {}
    while len(finished) < 2:
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert finished[failing].error == "structured_outputs.regex could not be compiled: compiler says no"
    assert finished[failing].outputs[0].finish_reason == "error"
    assert finished[working].error is None and set(finished[working].outputs[0].text) <= {"y"}
    assert not engine.has_unfinished_requests()


def test_invalid_constraints_and_beam_search_are_refused_before_queueing(llm):
    with pytest.raises(StructuredOutputsError, match=r"structured_outputs\.regex=.*parenthesis"):
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(regex="(")))
    with pytest.raises(SamplingParamsError, match="use_beam_search"):
        SamplingParams(use_beam_search=True, n=2, structured_outputs=StructuredOutputsParams(choice=["a"]))
    assert not llm.engine.has_unfinished_requests()


def test_a_grammar_the_vocabulary_cannot_finish_fails_as_the_requests_own_fault(llm):
    # xgrammar finds no token sequence for this character after the "0" (found by the server fuzz).
    engine = llm.engine
    bad = engine.add_request("x", SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(
        regex="0\U00040000")))
    good = engine.add_request("y", SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(
        regex="[0-9]{3}")))
    finished = {}
    while len(finished) < 2:
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert finished[bad].invalid_request and "structured_outputs.regex" in finished[bad].error
    assert finished[bad].outputs[0].token_ids  # it failed after its "0"
    assert finished[good].error is None and re.fullmatch("[0-9]{3}", finished[good].outputs[0].text)
