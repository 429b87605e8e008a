"""The engine side of speculative decoding: drafts for the running requests, each step.

Before each schedule the speculator gives every running request that is decoding
(one pending token) its draft tokens (`Request.spec_token_ids`); the scheduler
asks the token budget for them, the worker verifies them (worker/spec_verify.py)
and the scheduler keeps what was accepted (core/scheduler.py). Drafts are a bet:
a wrong one costs compute, never correctness.

Who drafts: every decoding request but beam search (refused with speculation)
and structured outputs (a grammar would need a bitmask per draft position),
which decode one token at a time. Penalties, logit bias and min_tokens are applied
at every draft position by the rejection sampler. A request
whose drafts keep failing (mean acceptance below ``disable_below_acceptance``
after ``disable_after_drafts`` verified drafts) stops drafting, so free chat that
n-gram lookup cannot predict costs next to nothing. And drafts only fill a step up
to ``max_tokens_per_step`` tokens (8: the CPU's small-batch kernels, whose cost is
flat in the tokens): a lone stream drafts up to k tokens, a batch of 8 none.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pagoda.engine.spec_decode.config import SpeculativeConfig
from pagoda.engine.spec_decode.ngram import NgramConfig, NgramProposer
from pagoda.request import Request


class Speculator:
    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.proposer = NgramProposer(NgramConfig(config.num_speculative_tokens, config.prompt_lookup_max,
                                                  config.prompt_lookup_min))

    def eligible(self, request: Request) -> bool:
        params = request.sampling_params
        # Requests with a LoRA adapter are not drafted for (verification would need the adapter too).
        return (not request.spec_disabled and request.structured_output is None and request.lora_request is None
                and request.num_tokens - request.num_computed_tokens == 1 and not params.use_beam_search)

    def propose(self, requests: Iterable[Request]) -> None:
        config = self.config
        requests = list(requests)
        # Draft tokens this step may add: the running requests take one token each first.
        budget = config.max_tokens_per_step - len(requests)
        for request in requests:
            request.spec_token_ids = []
            if request.spec_num_drafts >= config.disable_after_drafts and not request.spec_disabled:
                rate = request.spec_num_accepted / max(request.spec_num_proposed, 1)
                request.spec_disabled = rate < config.disable_below_acceptance
            if not self.eligible(request):
                continue
            params = request.sampling_params
            k = config.num_speculative_tokens
            if params.max_tokens is not None:  # the step emits at most k + 1 tokens
                k = min(k, params.max_tokens - request.num_output_tokens - 1)
            k = min(k, budget)
            if k < 1:
                continue
            tokens = np.asarray(request.all_token_ids, dtype=np.int64)
            request.spec_token_ids = self.proposer.propose(tokens, k).tolist()
            budget -= len(request.spec_token_ids)
