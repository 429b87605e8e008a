"""The typed contract between the scheduler (CPU bookkeeping) and the worker.

The scheduler says who runs and with how many tokens (`SchedulerOutput`);
the worker answers with what it sampled (`ModelRunnerOutput`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.request import Request, TokenLogprobs


def describe_error(error: BaseException) -> str:
    """An exception as the one line a failed request reports: "TypeName: message"."""
    return f"{type(error).__name__}: {error}"


@dataclass
class ScheduledRequest:
    """One request's share of a step.

    The worker computes K/V for tokens `request.all_token_ids[start:start+num_new_tokens]`
    at positions `start..start+num_new_tokens-1`, attending to every earlier
    position of the request through `block_table`. It must treat `request`
    as read-only apart from its RNG.
    """

    request: Request
    start: int
    num_new_tokens: int
    block_table: list[int]
    # Speculative decoding: draft tokens verified in this step, after the pending token; they
    # are the last len(spec_token_ids) of the num_new_tokens (and not in request.all_token_ids).
    spec_token_ids: list[int] = field(default_factory=list)
    # Draft-model speculation: tokens the worker's draft model proposes after this step, from
    # the token the step emits last. The block table has slots for them past `end` (lookahead
    # slots, only scratch for the draft's KV within the step). 0 unless the chunk samples.
    num_lookahead_tokens: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence: sample a token."""
        return self.end - len(self.spec_token_ids) == self.request.num_tokens

    @property
    def prompt_logprob_positions(self) -> range:
        """Positions of this chunk whose logits give new prompt logprobs.

        Position p's logits score prompt token p+1, so positions
        0..num_prompt-2 count, each only once even if the request is
        recomputed after preemption.
        """
        request = self.request
        if request.sampling_params.prompt_logprobs is None:
            return range(0)
        first = max(self.start, len(request.prompt_logprobs))
        last = min(self.end, request.num_prompt_tokens - 1)
        return range(first, max(first, last))


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_preempted: int = 0
    # Copy-on-write: (source, destination) KV blocks to copy, in order, before the forward pass.
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    # Offload tiers (core/kv_offload.py): (device block, host slot) copies of evicted cached
    # blocks, done first of all moves; (host slot, device block) loads of prefix hits, done last.
    blocks_to_offload: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_load: list[tuple[int, int]] = field(default_factory=list)
    # Swap preemption: (device, host) blocks to copy to host memory and (host, device) blocks to
    # copy back. Destinations are distinct within each list. The order of all these moves is
    # ModelRunner.apply_block_copies's: offloads, swap-outs, swap-ins, copies, loads.
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    # Requests that raised while being scheduled: request id -> the error, as text. They are
    # already out of the scheduler (status FINISHED_ERROR, blocks freed) and not in `scheduled`.
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def total_num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        """Nothing to run and no block to move."""
        return not (self.scheduled or self.has_block_moves)

    @property
    def has_block_moves(self) -> bool:
        return bool(self.blocks_to_copy or self.blocks_to_offload or self.blocks_to_load
                    or self.blocks_to_swap_out or self.blocks_to_swap_in)


@dataclass
class ModelRunnerOutput:
    """Per request id: the sampled token (only for chunks that sample), or a beam's candidates."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # New prompt logprobs computed in this step, in position order.
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # Beam search requests sample nothing: their (token id, logprob) candidates, best first.
    beam_candidates: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    # Speculative decoding: for rows that verified drafts, every token the step emitted (the
    # accepted drafts, then the target's own next token) and their logprobs if asked for.
    # Such rows have no entry in sampled_token_ids.
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    spec_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # Draft-model speculation: for rows with lookahead tokens, the draft model's greedy proposal
    # for the next step, made from the last token this step emitted (at most
    # num_lookahead_tokens tokens; fewer or none where it could not draft).
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Rows that failed on their own (their input, their sampling): request id -> the error, as
    # text. The rest of the batch ran; nothing else of a failed row's output is to be used.
    failed: dict[str, str] = field(default_factory=dict)
