"""Unit tests for pagoda.sampling_params: validation messages, normalization, vocab checks."""

from __future__ import annotations

import pytest

from pagoda.sampling_params import SamplingParams, SamplingParamsError, SamplingType

INVALID = [
    ("n", 0),
    ("n", -3),
    ("n", 1.5),
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("temperature", "hot"),
    ("top_p", 0),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.2),
    ("top_k", -2),
    ("top_k", 2.5),
    ("min_p", 2),
    ("min_p", -0.1),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("frequency_penalty", 3),
    ("frequency_penalty", -5.0),
    ("repetition_penalty", 0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", float("nan")),
    ("presence_penalty", float("nan")),
    ("min_p", float("nan")),
    ("seed", 1.5),
    ("seed", "42"),
    ("max_tokens", 0),
    ("max_tokens", -1),
    ("max_tokens", 2.0),
    ("min_tokens", -1),
    ("logprobs", 21),
    ("logprobs", -1),
    ("prompt_logprobs", 21),
    ("stop", 5),
    ("stop", [1]),
    ("stop", ["ok", 2]),
    ("stop", ""),
    ("stop", ["a", ""]),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", ["1"]),
    ("stop_token_ids", 3),
    ("logit_bias", [1, 2]),
    ("logit_bias", {5: 101}),
    ("logit_bias", {5: -100.5}),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"5": 1.0}),
    ("logit_bias", {5: "a"}),
]


@pytest.mark.parametrize("field, value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_raises_naming_field_and_value(field: str, value: object) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**{field: value})
    err = info.value
    assert isinstance(err, ValueError)
    assert err.field_name == field
    message = str(err)
    assert message.startswith(f"{field}=")
    assert "is invalid" in message
    if field == "logit_bias" and isinstance(value, dict):
        # The offending entry is named.
        ((tok, bias),) = value.items()
        assert repr(tok) in message and repr(bias) in message
    else:
        assert err.value == value or (value != value and err.value != err.value)  # NaN
        assert repr(value) in message


def test_min_tokens_greater_than_max_tokens() -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(min_tokens=5, max_tokens=4)
    assert info.value.field_name == "min_tokens"
    assert "min_tokens=5" in str(info.value)
    assert "max_tokens (4)" in str(info.value)
    # Equal is fine; no max_tokens means no upper bound.
    assert SamplingParams(min_tokens=4, max_tokens=4).min_tokens == 4
    assert SamplingParams(min_tokens=1000, max_tokens=None).min_tokens == 1000


def test_bool_is_not_a_number() -> None:
    with pytest.raises(SamplingParamsError, match="temperature=True"):
        SamplingParams(temperature=True)
    with pytest.raises(SamplingParamsError, match="top_p=True"):
        SamplingParams(top_p=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"n": 3},
        {"temperature": 0},
        {"temperature": 0.0},
        {"temperature": 2.5},
        {"top_p": 1},
        {"top_p": 1e-6},
        {"top_k": -1},
        {"top_k": 0},
        {"top_k": 50},
        {"min_p": 0},
        {"min_p": 1.0},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"repetition_penalty": 1.3},
        {"repetition_penalty": 0.01},
        {"seed": 0},
        {"seed": -5},
        {"max_tokens": None},
        {"max_tokens": 1},
        {"min_tokens": 0},
        {"logprobs": 0},
        {"logprobs": 20},
        {"prompt_logprobs": 0},
        {"stop": None},
        {"stop": "###"},
        {"stop": ["a", "bb"]},
        {"stop": ("x",)},
        {"stop": []},
        {"stop_token_ids": []},
        {"stop_token_ids": (1, 2)},
        {"logit_bias": {}},
        {"logit_bias": {0: -100, 7: 100, 9: 0.5}},
        {"ignore_eos": True, "skip_special_tokens": False, "include_stop_str_in_output": True},
    ],
)
def test_valid_values_pass(kwargs: dict) -> None:
    params = SamplingParams(**kwargs)
    for k, v in kwargs.items():
        if k not in ("stop_token_ids",):
            assert getattr(params, k) == v


def test_stop_normalizes_to_list() -> None:
    assert SamplingParams().stop_strings == []
    assert SamplingParams(stop="END").stop_strings == ["END"]
    assert SamplingParams(stop=["a", "b"]).stop_strings == ["a", "b"]
    assert SamplingParams(stop=("a", "b")).stop_strings == ["a", "b"]
    assert isinstance(SamplingParams(stop=("a",)).stop_strings, list)


def test_stop_token_ids_normalize_to_list() -> None:
    p = SamplingParams(stop_token_ids=(3, 4))
    assert p.stop_token_ids == [3, 4]
    assert isinstance(p.stop_token_ids, list)


def test_sampling_type_and_needs_penalties() -> None:
    assert SamplingParams(temperature=0).sampling_type == SamplingType.GREEDY
    assert SamplingParams(temperature=1e-7).sampling_type == SamplingType.GREEDY
    assert SamplingParams(temperature=0.01).sampling_type == SamplingType.RANDOM
    assert not SamplingParams().needs_penalties
    assert SamplingParams(presence_penalty=0.1).needs_penalties
    assert SamplingParams(frequency_penalty=-0.1).needs_penalties
    assert SamplingParams(repetition_penalty=1.1).needs_penalties


def test_defaults() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.min_tokens) == (1, 1.0, 1.0, 0, 0.0, 16, 0)
    assert p.logprobs is None and p.prompt_logprobs is None and p.seed is None


def test_validate_against_vocab() -> None:
    SamplingParams(stop_token_ids=[0, 99], logit_bias={99: 1.0}).validate_against_vocab(100)
    SamplingParams().validate_against_vocab(1)
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(stop_token_ids=[5, 100]).validate_against_vocab(100)
    assert info.value.field_name == "stop_token_ids"
    assert info.value.value == 100
    assert "stop_token_ids=100" in str(info.value) and "100" in str(info.value)
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(logit_bias={3: 1.0, 250: -1.0}).validate_against_vocab(200)
    assert info.value.field_name == "logit_bias"
    assert "logit_bias=250" in str(info.value)
    assert "vocab size 200" in str(info.value)
