"""The engine's record of one sequence being generated.

A `Request` has no prefill or decode phase: the scheduler only looks at
`num_computed_tokens` (how many of `all_token_ids` have their K/V in the
cache) and lets it catch up to `num_tokens`. Chunked prefill, decoding and
recompute after preemption are all that one number moving.
"""

from __future__ import annotations

import enum
import functools
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from pagoda.model.lora.request import LoRARequest
from pagoda.sampling_params import SamplingParams


def num_beam_candidates_kept(beam_width: int, num_stop_tokens: int) -> int:
    """(beam, token) candidates a beam search step ranks (HF's count): enough that
    `beam_width` of them continue even if every stop token of every beam ranks high."""
    return max(2, 1 + num_stop_tokens) * beam_width


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # by recompute: waits holding no blocks, computes its KV again
    SWAPPED = 3  # by swap: waits holding host blocks only, keeps num_computed_tokens
    # Everything from here on is finished.
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6
    FINISHED_ERROR = 7  # the engine failed while serving it (an exception in its step)

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
            RequestStatus.FINISHED_ERROR: "error",
        }.get(self)


@dataclass
class TokenLogprobs:
    """Log-probabilities at one position: the chosen token's and the top k."""

    token_id: int
    logprob: float
    rank: int
    top: dict[int, float]


class GrammarState(Protocol):
    """A sequence's structured-output state (structured_output/request.StructuredOutputRequest)."""

    @property
    def ready(self) -> bool:
        """Its grammar is compiled and its matcher made: it may be scheduled."""
        ...

    def accept_token(self, token_id: int) -> None:
        """Advances the matcher; raises if the grammar refuses the token."""
        ...

    @property
    def is_terminated(self) -> bool:
        """The grammar has accepted its end."""
        ...

    def at_dead_end(self) -> bool:
        """No token can continue it (the vocabulary cannot finish the constraint)."""
        ...


class SequenceText(Protocol):
    """The text of a sequence as it grows (engine/detokenizer.IncrementalDetokenizer)."""

    stop_reason: str | None  # the stop string that matched, if one did

    def add_tokens(self, token_ids: list[int], match_stops: bool = True) -> bool:
        """Appends the tokens' text; True if a stop string matched (only looked for if `match_stops`)."""
        ...


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    arrival_time: float = field(default_factory=time.monotonic)
    # Ids of the sequence so far: prompt then output. Grows by one per decode.
    all_token_ids: list[int] = field(init=False)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # Per-request RNG so a seeded request samples the same tokens whatever
    # else is in the batch. None means the shared default generator.
    generator: torch.Generator | None = None
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # prompt_logprobs[i] is for prompt token i+1 (token 0 has no logprob).
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # For n > 1: the sibling whose prompt KV this request shares (copy on write) instead
    # of computing it again. None for the first sibling and for single requests.
    fork_of: Request | None = field(default=None, repr=False)
    # With the "priority" scheduling policy: lower values are served first.
    priority: int = 0
    # Mixed into the prefix-cache hashes: requests with different salts never share blocks.
    cache_salt: str | None = None
    # Multi-LoRA: the adapter this request runs with (None: the base model), and the digest of
    # the adapter's contents the engine read (model/lora/adapter.py). Both join cache_keys.
    lora_request: LoRARequest | None = None
    lora_digest: str | None = None
    # Prompt tokens found in the prefix cache when the request was (last) admitted.
    num_cached_tokens: int = 0
    # Beam search: this beam's most likely next tokens, (token id, log-probability) best
    # first, computed for its current tokens and waiting for the beam group to choose.
    # A beam with candidates has nothing to compute until the group appends a token.
    beam_candidates: list[tuple[int, float]] | None = field(default=None, repr=False)
    # The engine's incremental text of this sequence: `check_stop` appends each new token's
    # text to it and matches stop strings there. None: token-level stops only (no tokenizer,
    # scheduler unit tests, beam slots).
    text: SequenceText | None = field(default=None, repr=False)
    # Structured outputs: this sequence's grammar matcher (set by the engine's
    # StructuredOutputManager); it accepts every output token the scheduler appends.
    structured_output: GrammarState | None = field(default=None, repr=False)
    # Speculative decoding (engine/spec_decode): draft tokens proposed for the next step (the
    # scheduler verifies them with the pending token; they are never part of all_token_ids
    # until accepted), and this sequence's record of drafts verified / tokens proposed /
    # accepted, from which the speculator decides to stop drafting for it.
    spec_token_ids: list[int] = field(default_factory=list, repr=False)
    spec_num_drafts: int = 0
    spec_num_proposed: int = 0
    spec_num_accepted: int = 0
    spec_num_rejections: int = 0  # verified drafts in which a token was rejected
    spec_disabled: bool = False
    # Draft-model speculation: the tokens the worker's draft model proposed after the step that
    # made this sequence `spec_proposal_at` tokens long (stale once it is any other length), and
    # how many tokens the draft should propose after this step (0: none; the scheduler gives the
    # step that many lookahead KV slots for them, or none at all).
    spec_proposal: list[int] = field(default_factory=list, repr=False)
    spec_proposal_at: int = -1
    spec_lookahead: int = 0

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        if self.sampling_params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.sampling_params.seed)

    @property
    def cache_keys(self) -> tuple:
        """Extra keys of this request's prefix-cache hashes: its salt and its LoRA adapter
        (two adapters, or an adapter and the base model, never share KV blocks). The adapter is
        keyed by its contents' digest when the engine set one (an adapter folder rewritten in
        place never reuses the KV of its old contents), else by its name and path."""
        keys = () if self.cache_salt is None else (self.cache_salt,)
        if self.lora_request is None:
            return keys
        return keys + (("lora-sha256", self.lora_digest) if self.lora_digest else self.lora_request.cache_key)

    @property
    def lora_int_id(self) -> int:
        """The adapter's id, 0 for the base model."""
        return 0 if self.lora_request is None else self.lora_request.lora_int_id

    @functools.cached_property
    def stop_token_set(self) -> frozenset[int]:
        """Token ids that end this request when sampled (EOS unless ignore_eos, plus stop_token_ids)."""
        params = self.sampling_params
        ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            ids |= self.eos_token_ids
        return frozenset(ids)

    @functools.cached_property
    def num_beam_candidates(self) -> int:
        """Candidates a beam reports: all a beam search step considers, and enough for logprobs."""
        kept = num_beam_candidates_kept(self.sampling_params.beam_width, len(self.stop_token_set))
        return max(kept, self.sampling_params.logprobs or 0)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def waiting_for_grammar(self) -> bool:
        """Its grammar is still compiling: the scheduler leaves it waiting (vLLM's WAITING_FOR_FSM)."""
        return self.structured_output is not None and not self.structured_output.ready

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> bool:
        """Decides whether the newest output token ends the request; sets the finished status
        and `stop_reason`. The one home of the stop conditions of sampled sequences (beam search
        keeps its own rules, engine/beam_search.py), checked in this order:

        1. a stop token (EOS unless ignore_eos, then stop_token_ids), once the request has
           `min_tokens` output tokens: "stop", stop_reason = the id if one of stop_token_ids.
           Its text is not added unless include_stop_str_in_output;
        2. a stop string completed by the token's text, once the request has `min_tokens`
           output tokens (vLLM's rule; the text is cut before it, or after it with
           include_stop_str_in_output): "stop", stop_reason = the string. A stop string that
           the last allowed token completes is a stop, not a length finish (OpenAI, vLLM);
        3. `max_tokens` output tokens, or `max_model_len` tokens in all: "length".

        Appends the token's text to `self.text` (if any) on the way.
        """
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if self.structured_output is not None and self.structured_output.is_terminated:
            self.status = RequestStatus.FINISHED_STOPPED
            return True
        allowed = self.num_output_tokens >= params.min_tokens
        if allowed and last in self.stop_token_set:
            if params.ignore_eos or last not in self.eos_token_ids:
                self.stop_reason = last  # one of stop_token_ids (EOS reports no stop_reason)
            if self.text is not None and params.include_stop_str_in_output:
                self.text.add_tokens([last], match_stops=False)
            self.status = RequestStatus.FINISHED_STOPPED
            return True
        if self.text is not None and self.text.add_tokens([last], match_stops=allowed):
            self.status = RequestStatus.FINISHED_STOPPED
            self.stop_reason = self.text.stop_reason
            return True
        if (params.max_tokens is not None and self.num_output_tokens >= params.max_tokens) or (
            self.num_tokens >= max_model_len
        ):
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False
