"""The engine side of speculative decoding: drafts for the running requests, each step.

Before each schedule the speculator gives every running request that is decoding
(one pending token) its draft tokens (`Request.spec_token_ids`); the scheduler
asks the token budget for them, the worker verifies them (worker/spec_verify.py)
and the scheduler keeps what was accepted (core/scheduler.py). Drafts are a bet:
a wrong one costs compute, never correctness.

Where drafts come from (`SpeculativeConfig.method`):
- "ngram": prompt lookup over the request's tokens, here, before the schedule;
- "draft_model": the worker's draft model proposed them in the previous step, from the
  token that step emitted last (`ModelRunnerOutput.draft_token_ids`, taken in by
  `receive`); a proposal is used only while the sequence still has the length it was made
  for. To let the worker propose, the speculator also sets `Request.spec_lookahead`: how
  many tokens the draft proposes after this step (the scheduler gives the step lookahead
  KV slots for them, or none and then no proposal).

Who drafts: every decoding request but beam search (refused with speculation)
and structured outputs (a grammar would need a bitmask per draft position),
which decode one token at a time, and requests with a LoRA adapter (the draft
would need it too). Penalties, logit bias and min_tokens are applied
at every draft position by the rejection sampler. A request
whose drafts keep failing (mean acceptance below ``disable_below_acceptance``
after ``disable_after_drafts`` verified drafts) stops drafting, so free chat that
the proposer cannot predict costs next to nothing. And drafts only fill a step up
to ``max_tokens_per_step`` tokens (the CPU's small-batch kernels, whose cost is
flat in the tokens): a lone stream drafts up to k tokens, a batch of 8 none.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pagoda.core.scheduler_output import SchedulerOutput
from pagoda.engine.spec_decode.budget import DraftCandidate, allocate_drafts
from pagoda.engine.spec_decode.config import SpeculativeConfig
from pagoda.engine.spec_decode.ngram import NgramConfig, NgramProposer
from pagoda.request import Request


class Speculator:
    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.step_cost = config.step_costs()
        self.proposer = None  # "draft_model": the worker proposes (receive)
        if config.method == "ngram":
            self.proposer = NgramProposer(NgramConfig(config.num_speculative_tokens, config.prompt_lookup_max,
                                                      config.prompt_lookup_min))

    @staticmethod
    def may_draft(request: Request) -> bool:
        """Whether this request's steps may carry drafts at all."""
        # Requests with a LoRA adapter are not drafted for (verification would need the adapter too).
        return (not request.spec_disabled and request.structured_output is None and request.lora_request is None
                and not request.sampling_params.use_beam_search)

    def eligible(self, request: Request) -> bool:
        """Whether this request verifies drafts in this step: it may draft and is decoding."""
        return self.may_draft(request) and request.num_tokens - request.num_computed_tokens == 1

    def propose(self, requests: Iterable[Request]) -> None:
        config = self.config
        requests = list(requests)
        # Draft tokens this step may add: the running requests take one token each first.
        budget = config.max_tokens_per_step - len(requests)
        lookahead_budget = budget  # the same rule for the next step's drafts (draft model)
        drafting: list[tuple[Request, list[int]]] = []  # eligible requests and their proposals
        for request in requests:
            request.spec_token_ids = []
            request.spec_lookahead = 0
            if request.spec_num_drafts >= config.disable_after_drafts and not request.spec_disabled:
                rate = request.spec_num_accepted / max(request.spec_num_proposed, 1)
                request.spec_disabled = rate < config.disable_below_acceptance
            if self.proposer is None and self.may_draft(request):
                # This step emits at least one token, and the next emits at most drafts + 1.
                lookahead = min(self._room(request, 2), lookahead_budget)
                if lookahead > 0:
                    request.spec_lookahead = lookahead
                    lookahead_budget -= lookahead
            if self.eligible(request):
                k = min(self._room(request, 1), budget)
                if k >= 1:
                    drafting.append((request, self._drafts(request, k)))
        # Proposals are cut to the drafts that pay (budget.py): deep for a lone stream whose
        # drafts keep matching, few or none in a busy step.
        counts = allocate_drafts(len(requests), [
            DraftCandidate(len(drafts), request.spec_num_accepted, request.spec_num_rejections)
            for request, drafts in drafting], self.step_cost)
        for (request, drafts), count in zip(drafting, counts):
            request.spec_token_ids = drafts[:count]

    def _room(self, request: Request, reserved: int) -> int:
        """Drafts allowed by num_speculative_tokens and by max_tokens, `reserved` tokens kept."""
        k = self.config.num_speculative_tokens
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            k = min(k, max_tokens - request.num_output_tokens - reserved)
        return k

    def _drafts(self, request: Request, k: int) -> list[int]:
        if self.proposer is not None:
            tokens = np.asarray(request.all_token_ids, dtype=np.int64)
            return self.proposer.propose(tokens, k).tolist()
        if request.spec_proposal_at != request.num_tokens:  # made for another length: stale
            return []
        return request.spec_proposal[:k]

    def receive(self, scheduler_output: SchedulerOutput, draft_token_ids: dict[str, list[int]]) -> None:
        """Draft model: keeps each scheduled request's proposal for its next step (after the
        scheduler appended the step's tokens: the proposal continues the sequence as it is now)."""
        for item in scheduler_output.scheduled:
            request = item.request
            tokens = draft_token_ids.get(request.request_id)
            if tokens and not request.is_finished:
                request.spec_proposal, request.spec_proposal_at = list(tokens), request.num_tokens
            else:
                request.spec_proposal, request.spec_proposal_at = [], -1
