"""The engine side of speculative decoding: drafts for the running requests, each step.

Before each schedule the speculator gives every running request that is decoding
(one pending token) its draft tokens (`Request.spec_token_ids`); the scheduler
asks the token budget for them, the worker verifies them (worker/spec_verify.py)
and the scheduler keeps what was accepted (core/scheduler.py). Drafts are a bet:
a wrong one costs compute, never correctness.

Who drafts: requests with plain sampling (greedy or temperature / top-k / top-p)
and no grammar. Penalties, logit bias, min_p, an active min_tokens ban and
structured outputs decode one token at a time, as without speculation. A request
whose drafts keep failing (mean acceptance below ``disable_below_acceptance``
after ``disable_after_drafts`` verified drafts) stops drafting, so free chat that
n-gram lookup cannot predict costs next to nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pagoda.engine.spec_decode.config import SpeculativeConfig
from pagoda.request import Request


def ngram_propose(tokens: np.ndarray, k: int, lookup_min: int, lookup_max: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the sequence's
    longest suffix of lookup_max .. lookup_min tokens (prompt lookup); [] if none."""
    length = len(tokens)
    for n in range(min(lookup_max, length - 1), lookup_min - 1, -1):
        suffix = tokens[length - n:]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []


class Speculator:
    def __init__(self, config: SpeculativeConfig):
        self.config = config

    def eligible(self, request: Request) -> bool:
        params = request.sampling_params
        return (not request.spec_disabled and request.structured_output is None
                and request.num_tokens - request.num_computed_tokens == 1
                and not params.use_beam_search and not params.needs_penalties and not params.logit_bias
                and params.min_p <= 0 and request.num_output_tokens >= params.min_tokens)

    def propose(self, requests: Iterable[Request]) -> None:
        config = self.config
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
            if k < 1:
                continue
            tokens = np.asarray(request.all_token_ids, dtype=np.int64)
            request.spec_token_ids = ngram_propose(tokens, k, config.prompt_lookup_min, config.prompt_lookup_max)
