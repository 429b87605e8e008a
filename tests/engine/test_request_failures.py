"""One request that raises inside the engine step fails alone (sync engine, tiny model).

Request "A" is made to fail in each phase of a step; a concurrent request "B"
must finish with the same tokens as a clean run, a later request "C" must
work, and nothing may be left behind: every KV block free, no request in the
scheduler or the engine's tables.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import pagoda.worker.sampler as sampler_module
from pagoda.config import CacheConfig, EngineConfig
from pagoda.engine.llm_engine import EngineStepError, LLMEngine
from pagoda.outputs import RequestOutput
from pagoda.request import RequestStatus
from pagoda.sampling_params import SamplingParams
from tests.conftest import TINY_VOCAB


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPT_A, PROMPT_B, PROMPT_C = _tokens(40, 1), _tokens(23, 2), _tokens(9, 3)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _engine(tiny_llama) -> LLMEngine:
    config = EngineConfig(model=str(tiny_llama), dtype="float32", cache=CacheConfig(kv_cache_memory=16 * 1024**2))
    return LLMEngine(config, show_progress=False)


def _drain(engine: LLMEngine) -> dict[str, RequestOutput]:
    """Steps until idle; every request must finish exactly once."""
    finals: dict[str, RequestOutput] = {}
    count: Counter[str] = Counter()
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                count[output.request_id] += 1
                finals[output.request_id] = output
    assert all(n == 1 for n in count.values()), count
    return finals


def _assert_clean(engine: LLMEngine) -> None:
    kv = engine.kv_cache_manager
    assert kv.num_free_blocks == kv.pool.num_blocks and kv.num_requests_holding_blocks() == 0
    assert not kv.pending_copies
    assert not engine.scheduler.has_unfinished() and not engine.scheduler._requests
    assert not engine._parents and not engine._seq_to_parent and not engine._suspects


@pytest.fixture(scope="module")
def reference(tiny_llama) -> dict[str, list[int]]:
    engine = _engine(tiny_llama)
    tokens = {}
    for rid, prompt in (("B", PROMPT_B), ("C", PROMPT_C)):
        engine.add_request(prompt, GREEDY, rid)
        tokens[rid] = _drain(engine)[rid].outputs[0].token_ids
    return tokens


# -- faults: each makes request "A" raise in one phase; returns A's params and add_request kwargs --


def _in_scheduling(engine, monkeypatch):
    # A cache salt that cannot be hashed (a lone surrogate): raises while A's prefix is looked up.
    return GREEDY, {"cache_salt": "\ud800"}, "schedule"


def _in_its_input_row(engine, monkeypatch):
    execute = engine.executor.execute_model

    def corrupting(step):
        for row in step.rows:
            if row.request_id == "A" and engine.scheduler.get_request("A").num_output_tokens == 2:
                row.new_token_ids[-1] = TINY_VOCAB + 7  # a token id the model cannot embed
        return execute(step)

    monkeypatch.setattr(engine.executor, "execute_model", corrupting)
    return GREEDY, {}, f"token id {TINY_VOCAB + 7}"


def _in_its_sampler_row(engine, monkeypatch):
    penalties = sampler_module.apply_penalties

    def failing(logits, prompt_ids, output_ids, *args):
        if len(output_ids) == 3:
            raise RuntimeError("injected sampler failure")
        return penalties(logits, prompt_ids, output_ids, *args)

    monkeypatch.setattr(sampler_module, "apply_penalties", failing)  # only A has a penalty
    return SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.3), {}, \
        "injected sampler failure"


def _in_its_text(engine, monkeypatch):
    def install():
        detokenizer = engine._parents["A"].sequences[0].detokenizer
        add_tokens, calls = detokenizer.add_tokens, []

        def failing(token_ids, match_stops=True):
            calls.append(token_ids)
            if len(calls) == 3:
                raise RuntimeError("injected detokenizer failure")
            return add_tokens(token_ids, match_stops)

        detokenizer.add_tokens = failing

    return GREEDY, {"after_add": install}, "injected detokenizer failure"


def _in_its_beam_search(engine, monkeypatch):
    def install():
        beam = engine._parents["A"].beam
        step, calls = beam.step, []

        def failing(beams):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected beam failure")
            return step(beams)

        beam.step = failing

    params = SamplingParams(use_beam_search=True, beam_width=2, max_tokens=8, ignore_eos=True)
    return params, {"after_add": install}, "injected beam failure"


def _in_its_output(engine, monkeypatch):
    make_output, calls = engine._make_output, []

    def failing(parent):
        if parent.request_id == "A":
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected output failure")
        return make_output(parent)

    monkeypatch.setattr(engine, "_make_output", failing)
    return GREEDY, {}, "injected output failure"


def _in_the_batched_forward(engine, monkeypatch):
    execute = engine.executor.execute_model

    def failing(step):
        # Whenever A runs once it has 2 tokens: batched with B at first, then alone.
        if any(row.request_id == "A" and engine.scheduler.get_request("A").num_output_tokens >= 2
               for row in step.rows):
            raise RuntimeError("injected device failure")
        return execute(step)

    monkeypatch.setattr(engine.executor, "execute_model", failing)
    return GREEDY, {}, "injected device failure"


FAULTS = [_in_scheduling, _in_its_input_row, _in_its_sampler_row, _in_its_text, _in_its_beam_search,
          _in_its_output, _in_the_batched_forward]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__.removeprefix("_in_"))
def test_a_request_that_raises_fails_alone(tiny_llama, reference, monkeypatch, fault):
    engine = _engine(tiny_llama)
    params, kwargs, expected = fault(engine, monkeypatch)
    after_add = kwargs.pop("after_add", None)
    engine.add_request(PROMPT_A, params, "A", **kwargs)
    if after_add is not None:
        after_add()
    engine.add_request(PROMPT_B, GREEDY, "B")
    finals = _drain(engine)

    failed = finals["A"]
    assert failed.finished and failed.error is not None and expected in failed.error
    assert [c.finish_reason for c in failed.outputs] == ["error"] * params.n
    assert finals["B"].error is None and finals["B"].outputs[0].token_ids == reference["B"]
    assert finals["B"].outputs[0].finish_reason == "length"
    _assert_clean(engine)

    engine.add_request(PROMPT_C, GREEDY, "C")  # the engine still works
    assert _drain(engine)["C"].outputs[0].token_ids == reference["C"]
    _assert_clean(engine)


def test_the_offline_api_returns_a_failed_request_with_its_error(tiny_llama, reference, monkeypatch):
    from pagoda import LLM

    llm = LLM(str(tiny_llama), dtype="float32", show_progress=False, kv_cache_memory=16 * 1024**2)
    # Request ids are given in order: the first prompt is "0"; it makes every step that runs it fail.
    execute = llm.engine.executor.execute_model

    def failing(step):
        if any(row.request_id == "0" for row in step.rows):
            raise RuntimeError("injected device failure")
        return execute(step)

    monkeypatch.setattr(llm.engine.executor, "execute_model", failing)
    outputs = llm.generate([PROMPT_A, PROMPT_B], GREEDY)
    assert outputs[0].error is not None and "injected device failure" in outputs[0].error
    assert outputs[0].outputs[0].finish_reason == "error" and outputs[0].outputs[0].token_ids == []
    assert outputs[1].error is None and outputs[1].outputs[0].token_ids == reference["B"]
    _assert_clean(llm.engine)


def test_a_device_that_keeps_failing_ends_the_engine(tiny_llama, monkeypatch):
    engine = _engine(tiny_llama)

    def broken(_):
        raise RuntimeError("injected device failure")

    monkeypatch.setattr(engine.executor, "execute_model", broken)
    assert engine.max_consecutive_failed_steps == 5
    for index in range(5):
        engine.add_request(_tokens(5 + index, 20 + index), GREEDY, f"r{index}")
    errors = []
    with pytest.raises(EngineStepError, match="5 engine steps in a row failed"):
        for _ in range(20):
            errors += [o.request_id for o in engine.step() if o.error is not None]
    # The batch failed, then r0, r1, r2 alone (each blamed), then r3 alone: the fifth failure.
    assert errors == ["r0", "r1", "r2"]
    # r3 and r4 are the caller's to abort (the serving loop ends; LLM.generate aborts them).
    assert sorted(engine._parents) == ["r3", "r4"]
    assert engine.kv_cache_manager.num_requests_holding_blocks() <= 2
    engine.abort_all_requests()
    _assert_clean(engine)


def test_a_half_added_request_leaves_nothing_behind(tiny_llama, monkeypatch):
    engine = _engine(tiny_llama)
    add, calls = engine.scheduler.add_request, []

    def failing(request):
        calls.append(request.request_id)
        if len(calls) == 2:
            raise RuntimeError("injected add failure")
        add(request)

    monkeypatch.setattr(engine.scheduler, "add_request", failing)
    with pytest.raises(RuntimeError, match="injected add failure"):
        engine.add_request(PROMPT_A, SamplingParams(n=3, max_tokens=4), "A")
    assert calls == ["A#0", "A#1"]
    _assert_clean(engine)
    monkeypatch.undo()
    engine.add_request(PROMPT_A, SamplingParams(n=3, max_tokens=4, ignore_eos=True), "A")  # the id is free again
    assert [len(c.token_ids) for c in _drain(engine)["A"].outputs] == [4, 4, 4]


def test_a_sequence_id_of_another_request_is_refused(tiny_llama):
    engine = _engine(tiny_llama)
    engine.add_request(PROMPT_A, SamplingParams(n=2, max_tokens=3, ignore_eos=True), "a")
    with pytest.raises(ValueError, match="'a#1' belongs to request 'a'"):
        engine.add_request(PROMPT_B, GREEDY, "a#1")
    finals = _drain(engine)
    assert list(finals) == ["a"] and all(len(c.token_ids) == 3 for c in finals["a"].outputs)
    _assert_clean(engine)


def test_a_failed_request_status_is_error(tiny_llama):
    engine = _engine(tiny_llama)
    engine.add_request(PROMPT_A, GREEDY, "A", cache_salt="\ud800")
    request = engine._parents["A"].sequences[0].request
    [output] = engine.step()
    assert output.error is not None and request.status == RequestStatus.FINISHED_ERROR
    assert request.status.finish_reason == "error"
