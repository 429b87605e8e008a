"""`speculative_config`: which proposer drafts tokens, and how many (vLLM's keys).

``{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": a, "prompt_lookup_max": b}``
proposes the k tokens that followed the longest earlier match of the sequence's last
a..b tokens (prompt lookup).

``{"method": "draft_model", "model": m, "num_speculative_tokens": k, "quantization": q}``
proposes k tokens greedily with a smaller model `m` that shares the target's tokenizer (the
same vocab_size), or with the target itself quantized (`m` omitted or the target's name, `q`
"int4" or "int8": self-speculation). The draft runs in the worker with its own paged KV
cache on the target's block ids (engine/spec_decode/draft_model.py, worker/draft_runner.py).

Errors name the key, its value and the limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pagoda.config import QUANTIZATION_CHOICES, ConfigError

METHODS = ("ngram", "draft_model")
# Tokens a step verifies per request at most (k + 1): the compiled decoder stack's batch.
MAX_SPECULATIVE_TOKENS = 7


# The step cost curve with which benchmarks/spec_decode.py (n-gram, k = 7, Zen 5, 2 threads)
# gave the best single-stream speedup on grounded prompts (1.82x) while free chat stayed
# within 5% alone and at concurrency 8; flatter curves drafted chat at a loss (0.91x at
# concurrency 8 with drafts free), steeper ones gave up grounded speed (1.68x).
DEFAULT_STEP_COST = (1.0, 1.04, 1.08, 1.14, 1.22, 1.32, 1.44, 1.58)


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5
    # A request whose drafts keep failing stops drafting: once `disable_after_drafts` drafts
    # were verified with a mean acceptance below `disable_below_acceptance` (accepted / proposed).
    disable_below_acceptance: float = 0.2
    disable_after_drafts: int = 8
    # Drafts are proposed only while a step's tokens (one per running request) plus its drafts
    # stay within this many: on a CPU pagoda's int4/int8 GEMV reads the weights once for up to
    # 8 rows (benchmarks/gemv_kernels.py, 576->3072 int4 from DRAM: 37.5 us at 1 row, 50.8 at
    # 4, 82.0 at 8; the lm_head 1.21 / 1.37 / 1.96 ms), so drafts there are cheap; beyond, a step becomes a
    # compute-bound batch where each extra row costs and drafts slow everyone.
    max_tokens_per_step: int = 8
    # Relative cost of a step of 1, 2, ... tokens (engine/spec_decode/budget.py spends drafts
    # where expected tokens per unit of cost rise). None: DEFAULT_STEP_COST, tuned on the CPU
    # by measurement (below); extended linearly past its end and cut to max_tokens_per_step.
    step_cost: tuple[float, ...] | None = None
    # method "draft_model": the draft's checkpoint (a path or an alias; None: the target's own),
    # and how its linear layers store weights (the engine's `quantization` values; None: "auto").
    model: str | None = None
    quantization: str | None = None

    def __post_init__(self) -> None:
        where = "speculative_config"
        if self.method not in METHODS:
            raise ConfigError(f"{where}.method", self.method, f"must be one of {', '.join(METHODS)}")
        if self.method != "draft_model":
            for name in ("model", "quantization"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{where}.{name}", getattr(self, name),
                                      f"is a key of method 'draft_model', not of method {self.method!r}")
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ConfigError(f"{where}.model", self.model, "must be a model path or alias")
        if self.quantization is not None and self.quantization not in QUANTIZATION_CHOICES:
            raise ConfigError(f"{where}.quantization", self.quantization,
                              f"must be one of {', '.join(QUANTIZATION_CHOICES)} (or null)")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ConfigError(f"{where}.num_speculative_tokens", k, f"must be an integer in [1, {MAX_SPECULATIVE_TOKENS}]")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        for name, value in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{where}.{name}", value, "must be an integer >= 1")
        if lo > hi:
            raise ConfigError(f"{where}.prompt_lookup_min", lo, f"must be <= prompt_lookup_max={hi}")
        if not 0 <= self.disable_below_acceptance <= 1:
            raise ConfigError(f"{where}.disable_below_acceptance", self.disable_below_acceptance, "must be in [0, 1]")
        if self.max_tokens_per_step < 2:
            raise ConfigError(f"{where}.max_tokens_per_step", self.max_tokens_per_step, "must be >= 2")
        if self.step_cost is not None:
            cost = self.step_cost
            if (not isinstance(cost, (list, tuple)) or not cost
                    or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in cost)
                    or any(b < a for a, b in zip(cost, cost[1:]))):
                raise ConfigError(f"{where}.step_cost", cost, "must be a nonempty list of positive, nondecreasing numbers")
            object.__setattr__(self, "step_cost", tuple(float(c) for c in cost))

    def step_costs(self) -> tuple[float, ...]:
        """The relative cost of a step of 1 .. max_tokens_per_step tokens."""
        cost = list(self.step_cost or DEFAULT_STEP_COST)
        slope = cost[-1] - cost[-2] if len(cost) > 1 else 0.0
        while len(cost) < self.max_tokens_per_step:
            cost.append(cost[-1] + slope)
        return tuple(cost[:self.max_tokens_per_step])
        if self.disable_after_drafts < 1:
            raise ConfigError(f"{where}.disable_after_drafts", self.disable_after_drafts, "must be >= 1")

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict | str | None) -> SpeculativeConfig | None:
        """From LLM(speculative_config=...) or --speculative-config '<json>' (None: no speculation)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ConfigError("speculative_config", value, f"is not JSON ({error.msg})") from None
        if not isinstance(value, dict):
            raise ConfigError("speculative_config", value, "must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"speculative_config.{unknown[0]}", value[unknown[0]],
                              f"is not a key; the keys are {', '.join(sorted(known))}")
        return cls(**value)
