"""Per-request sampling parameters, validated at construction.

Every invalid value raises `SamplingParamsError` (a `ValueError`) that names
the field, the value given and the accepted range, so the server can hand the
message to the client as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum


class SamplingParamsError(ValueError):
    """A sampling parameter is outside its accepted range."""

    def __init__(self, field_name: str, value: object, limit: str):
        self.field_name = field_name
        self.value = value
        super().__init__(f"{field_name}={value!r} is invalid: {limit}.")


class SamplingType(Enum):
    GREEDY = 0
    RANDOM = 1


# Temperatures below this are treated as greedy (division by ~0 is unstable).
_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, in vLLM's vocabulary.

    temperature=0 means greedy. top_k=0 or -1 disables top-k. `stop` strings
    are matched on the detokenized text and are not included in the output.
    `logprobs=k` returns the top-k log-probabilities (of the raw model
    distribution) plus the sampled token's for every generated token;
    `prompt_logprobs=k` does the same for prompt tokens.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Filled by validation; stop is always a list afterwards.
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise SamplingParamsError("n", self.n, "must be an integer >= 1")
        if not _is_number(self.temperature) or self.temperature < 0 or math.isnan(self.temperature):
            raise SamplingParamsError("temperature", self.temperature, "must be >= 0")
        if not _is_number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise SamplingParamsError("top_p", self.top_p, "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise SamplingParamsError("top_k", self.top_k, "must be -1 or 0 (disabled) or a positive integer")
        if not _is_number(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            raise SamplingParamsError("min_p", self.min_p, "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not (-2.0 <= value <= 2.0):
                raise SamplingParamsError(name, value, "must be in [-2, 2]")
        if not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise SamplingParamsError("repetition_penalty", self.repetition_penalty, "must be > 0")
        if self.seed is not None and not _is_int(self.seed):
            raise SamplingParamsError("seed", self.seed, "must be an integer or None")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise SamplingParamsError("max_tokens", self.max_tokens, "must be an integer >= 1")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise SamplingParamsError("min_tokens", self.min_tokens, "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                "min_tokens", self.min_tokens, f"must be <= max_tokens ({self.max_tokens})"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0 or value > 20):
                raise SamplingParamsError(name, value, "must be an integer in [0, 20] or None")
        self._stop_list = _normalize_stop(self.stop)
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids
            ):
                raise SamplingParamsError(
                    "stop_token_ids", self.stop_token_ids, "must be a list of non-negative integers"
                )
            self.stop_token_ids = list(self.stop_token_ids)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise SamplingParamsError("logit_bias", self.logit_bias, "must be a mapping token id -> bias")
            for tok, bias in self.logit_bias.items():
                if not _is_int(tok) or tok < 0 or not _is_number(bias) or not (-100 <= bias <= 100):
                    raise SamplingParamsError(
                        "logit_bias", {tok: bias}, "keys must be token ids >= 0 and values in [-100, 100]"
                    )

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def sampling_type(self) -> SamplingType:
        return SamplingType.GREEDY if self.temperature < _GREEDY_EPS else SamplingType.RANDOM

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def validate_against_vocab(self, vocab_size: int) -> None:
        """Token ids named by the request must exist in the model's vocabulary."""
        for name, ids in (("stop_token_ids", self.stop_token_ids or []),
                          ("logit_bias", list((self.logit_bias or {}).keys()))):
            for tok in ids:
                if tok >= vocab_size:
                    raise SamplingParamsError(name, tok, f"token ids must be < vocab size {vocab_size}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _normalize_stop(stop: object) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise SamplingParamsError("stop", stop, "must be a string, a list of strings or None")
    if any(s == "" for s in stops):
        raise SamplingParamsError("stop", stop, "stop strings must be non-empty")
    return stops
