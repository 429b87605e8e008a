"""What the engine hands back to users (vLLM's RequestOutput shape)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.request import TokenLogprobs


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    # One entry per generated token when logprobs were asked for: {token_id: logprob}
    # holding the top-k and the sampled token.
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that matched

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    # Tokens of the reported completions so far, all of them (whatever the output kind).
    num_output_tokens: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # prompt_logprobs[0] is None (the first token has no context); then one
    # {token_id: logprob} per prompt token, holding the top-k and the actual token.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    metrics: RequestMetrics | None = field(default=None, repr=False)
    # Prompt tokens found in the prefix cache at the (last) admission.
    num_cached_tokens: int = 0
    # Set when the engine failed this request (an exception while it was scheduled, run,
    # sampled, detokenized or reported): what went wrong. The output is then finished, each
    # completion has finish_reason "error" and holds what was generated before the failure.
    # The async front end raises it as RequestFailedError instead of yielding it.
    error: str | None = None
    # The failure is the request's own doing (e.g. a grammar this model's vocabulary cannot
    # finish): a client error (HTTP 400), not the engine's (500).
    invalid_request: bool = False


def merge_delta(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive DELTA outputs of one request as one (a reader that fell behind gets
    one output instead of a backlog). Completions are matched by index."""
    merged = {c.index: c for c in earlier.outputs}
    for c in later.outputs:
        before = merged.get(c.index)
        if before is None:
            merged[c.index] = c
            continue
        logprobs = None
        if before.logprobs is not None or c.logprobs is not None:
            logprobs = (before.logprobs or []) + (c.logprobs or [])
        merged[c.index] = CompletionOutput(
            index=c.index, text=before.text + c.text, token_ids=before.token_ids + c.token_ids,
            cumulative_logprob=c.cumulative_logprob, logprobs=logprobs,
            finish_reason=c.finish_reason, stop_reason=c.stop_reason)
    return RequestOutput(
        request_id=later.request_id, prompt=later.prompt, prompt_token_ids=later.prompt_token_ids,
        outputs=[merged[i] for i in sorted(merged)], finished=later.finished,
        prompt_logprobs=earlier.prompt_logprobs if earlier.prompt_logprobs is not None else later.prompt_logprobs,
        metrics=later.metrics, num_cached_tokens=later.num_cached_tokens, error=later.error,
        invalid_request=later.invalid_request)


def logprob_dict(entry: TokenLogprobs) -> dict[int, float]:
    return {**entry.top, entry.token_id: entry.logprob}
