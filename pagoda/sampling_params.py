"""Per-request sampling parameters, validated at construction.

Every invalid value raises `SamplingParamsError` (a `ValueError`) that names
the field, the value given and the accepted range, so the server can hand the
message to the client as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from pagoda.structured_output.params import StructuredOutputsParams


class SamplingParamsError(ValueError):
    """A sampling parameter is outside its accepted range."""

    def __init__(self, field_name: str, value: object, limit: str):
        self.field_name = field_name
        self.value = value
        super().__init__(f"{field_name}={value!r} is invalid: {limit}.")


class SamplingType(Enum):
    GREEDY = 0
    RANDOM = 1


class RequestOutputKind(Enum):
    """What each `RequestOutput` of a request carries (vLLM's names).

    CUMULATIVE: everything so far (text, token ids, logprobs), every step.
    DELTA: only what is new since the request's previous output (the first output also
      carries the prompt logprobs); streaming servers use this, so nothing rebuilds a
      request's whole token list or logprobs every step.
    FINAL_ONLY: one output, when the request finishes, with everything (offline `LLM`).
    """

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


# Temperatures below this are treated as greedy (division by ~0 is unstable).
_GREEDY_EPS = 1e-5

# Documented limits (README, docs/limits.md). They bound what one request can ask
# of the engine: n and best_of become that many sequences in the batch.
MAX_N = 128  # OpenAI's own limit on n
MAX_BEST_OF = 128
MAX_TEMPERATURE = 100.0  # beyond this the distribution is uniform to float precision
MAX_REPETITION_PENALTY = 100.0
MIN_REPETITION_PENALTY = 0.01
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_LENGTH = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS_ENTRIES = 1024
# torch's generators take seeds in [-2**63, 2**64); the public range is int64 and
# siblings of an n > 1 request use seed + index, which stays inside torch's.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
_TORCH_SEED_MAX = 2**64 - 1


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, in vLLM's vocabulary.

    temperature=0 means greedy. top_k=0 or -1 disables top-k. `stop` strings
    are matched on the detokenized text and are not included in the output.
    `logprobs=k` returns the top-k log-probabilities (of the raw model
    distribution) plus the sampled token's for every generated token;
    `prompt_logprobs=k` does the same for prompt tokens.

    `best_of`: generate this many samples and return the `n` with the highest
    cumulative log-probability (OpenAI's legacy completions field).

    Beam search (`use_beam_search=True`): keeps the `beam_width` (default:
    `best_of`, else `n`) most likely partial sequences and returns the `n`
    best finished ones, scored as cumulative logprob / generated_len **
    `length_penalty`. `early_stopping`: True stops once `beam_width` finished
    sequences exist; False (HF's default) stops when no running beam can
    beat the worst of them at its current length; "never" bounds with the
    longest possible length when length_penalty > 0. Scores are
    log_softmax(logits / temperature) (temperature 0 counts as 1); top-k/p,
    min-p, penalties, logit_bias and stop strings do not apply to it.

    `structured_outputs`: a `StructuredOutputsParams` (JSON schema, regex, choice, EBNF
    grammar, any JSON object, structural tag) the output must match; each sample is
    constrained by its own matcher, and the request stops when the grammar has ended.
    Not with beam search.
    """

    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    beam_width: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool | str = False
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
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None
    # Filled by validation; stop is always a list afterwards.
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise SamplingParamsError("n", self.n, f"must be an integer in [1, {MAX_N}]")
        _check_range("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        if not _is_finite(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise SamplingParamsError("top_p", self.top_p, "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise SamplingParamsError("top_k", self.top_k, "must be -1 or 0 (disabled) or a positive integer")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_range("repetition_penalty", self.repetition_penalty, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
        if self.seed is not None and (not _is_int(self.seed) or not SEED_MIN <= self.seed <= _TORCH_SEED_MAX):
            raise SamplingParamsError("seed", self.seed, f"must be an integer in [{SEED_MIN}, {SEED_MAX}] or None")
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
        if not isinstance(self.output_kind, RequestOutputKind):
            raise SamplingParamsError("output_kind", self.output_kind,
                                      f"must be one of {[k.name for k in RequestOutputKind]}")
        self._stop_list = _normalize_stop(self.stop)
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids
            ):
                raise SamplingParamsError(
                    "stop_token_ids", self.stop_token_ids, "must be a list of non-negative integers"
                )
            if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
                raise SamplingParamsError("stop_token_ids", f"<{len(self.stop_token_ids)} ids>",
                                          f"at most {MAX_STOP_TOKEN_IDS} ids")
            self.stop_token_ids = list(self.stop_token_ids)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise SamplingParamsError("logit_bias", self.logit_bias, "must be a mapping token id -> bias")
            if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
                raise SamplingParamsError("logit_bias", f"<{len(self.logit_bias)} entries>",
                                          f"at most {MAX_LOGIT_BIAS_ENTRIES} entries")
            for tok, bias in self.logit_bias.items():
                if not _is_int(tok) or tok < 0 or not _is_finite(bias) or not (-100 <= bias <= 100):
                    raise SamplingParamsError(
                        "logit_bias", {tok: bias}, "keys must be token ids >= 0 and values in [-100, 100]"
                    )
        if not isinstance(self.ignore_eos, bool):
            raise SamplingParamsError("ignore_eos", self.ignore_eos, "must be true or false")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise SamplingParamsError("structured_outputs", self.structured_outputs,
                                          "must be a StructuredOutputsParams (json=, regex=, choice=, grammar=, "
                                          "json_object=True or structural_tag=) or None")
            if self.min_tokens:  # banning the end token would leave nothing the grammar allows
                raise SamplingParamsError("min_tokens", self.min_tokens,
                                          "must be 0 with structured_outputs: the grammar decides where the "
                                          "output ends")
        self._validate_best_of_and_beams()

    def _validate_best_of_and_beams(self) -> None:
        if self.best_of is not None:
            if not _is_int(self.best_of) or not self.n <= self.best_of <= MAX_BEST_OF:
                raise SamplingParamsError("best_of", self.best_of,
                                          f"must be an integer in [n ({self.n}), {MAX_BEST_OF}]")
        if not isinstance(self.use_beam_search, bool):
            raise SamplingParamsError("use_beam_search", self.use_beam_search, "must be true or false")
        _check_range("length_penalty", self.length_penalty, -math.inf, math.inf)
        if self.early_stopping not in (True, False, "never"):
            raise SamplingParamsError("early_stopping", self.early_stopping, 'must be true, false or "never"')
        if not self.use_beam_search:
            if self.beam_width is not None:
                raise SamplingParamsError("beam_width", self.beam_width, "needs use_beam_search=true")
            if (self.best_of or 1) > self.n and _is_number(self.temperature) and self.temperature < _GREEDY_EPS:
                raise SamplingParamsError(
                    "best_of", self.best_of,
                    "must equal n with greedy sampling (temperature 0): every sample would be the same; "
                    "use use_beam_search for the n most likely sequences")
            return
        width = self.beam_width if self.beam_width is not None else (self.best_of or self.n)
        if not _is_int(width) or width < self.n:
            raise SamplingParamsError("beam_width", width, f"must be an integer >= n ({self.n})")
        if width > 64:
            raise SamplingParamsError("beam_width", width, "must be <= 64")
        self.beam_width = width
        unsupported = {"top_p": self.top_p != 1.0, "top_k": self.top_k not in (0, -1), "min_p": self.min_p != 0.0,
                       "presence_penalty": self.presence_penalty != 0.0,
                       "frequency_penalty": self.frequency_penalty != 0.0,
                       "repetition_penalty": self.repetition_penalty != 1.0,
                       "logit_bias": bool(self.logit_bias), "stop": bool(self.stop),
                       "structured_outputs": self.structured_outputs is not None}
        for name, is_set in unsupported.items():
            if is_set:
                raise SamplingParamsError(name, getattr(self, name), "is not supported with use_beam_search")

    @property
    def num_samples(self) -> int:
        """Sequences the engine generates for this request (before keeping the best n)."""
        return self.best_of if self.best_of is not None and not self.use_beam_search else self.n

    @property
    def beam_temperature(self) -> float:
        """Beam search divides logits by this before log_softmax (0 counts as 1)."""
        return self.temperature if self.temperature >= _GREEDY_EPS else 1.0

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
        """Token ids named by the request must exist in the model's vocabulary; top_k is at most its size."""
        if self.top_k > vocab_size:
            raise SamplingParamsError("top_k", self.top_k, f"must be <= the vocabulary size {vocab_size}")
        for name, ids in (("stop_token_ids", self.stop_token_ids or []),
                          ("logit_bias", list((self.logit_bias or {}).keys()))):
            for tok in ids:
                if tok >= vocab_size:
                    raise SamplingParamsError(name, tok, f"token ids must be < vocab size {vocab_size}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    """A real number that is not NaN or infinite (huge ints that overflow a float are not finite)."""
    if not _is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_range(name: str, value: object, low: float, high: float) -> None:
    if not _is_finite(value) or not low <= value <= high:
        limit = "a finite number" + (f" in [{low:g}, {high:g}]" if math.isfinite(low) or math.isfinite(high) else "")
        raise SamplingParamsError(name, value, f"must be {limit}")


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
    if len(stops) > MAX_STOP_STRINGS:
        raise SamplingParamsError("stop", f"<{len(stops)} strings>", f"at most {MAX_STOP_STRINGS} stop strings")
    if any(len(s) > MAX_STOP_STRING_LENGTH for s in stops):
        raise SamplingParamsError("stop", f"<a string of {max(map(len, stops))} characters>",
                                  f"each stop string has at most {MAX_STOP_STRING_LENGTH} characters")
    return stops
