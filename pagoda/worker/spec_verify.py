"""Verifying draft tokens in the worker (speculative decoding).

A row that verifies k drafts computed logits at k + 1 positions: position j scores
what follows draft j - 1 (the pending token for j = 0). The row emits the accepted
drafts and then one token of the target's own:

- greedy rows accept the longest prefix of drafts equal to the target's argmax and
  then emit the argmax at the first mismatch (or after the last draft): the tokens
  are exactly those of decoding without drafts;
- sampled rows use the rejection rule of speculative sampling with the drafts'
  distribution q one-hot (n-gram drafts): draft x is accepted with probability
  p(x); on a rejection the token is drawn from p with x removed and renormalized;
  after k acceptances the bonus token is drawn from p. Each emitted token is thus
  distributed exactly as p (the target's distribution after temperature, top-k,
  top-p and min-p, as the sampler processes it). A seeded row draws from its own
  generator, in a fixed order, so it stays reproducible.

Logprobs reported are the target's raw ones (log_softmax of the logits), as the
sampler reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.request import TokenLogprobs
from pagoda.worker.sampler import filter_logits, token_logprobs


@dataclass
class VerifiedRow:
    token_ids: list[int]  # accepted drafts, then the target's token
    logprobs: list[TokenLogprobs] | None  # per emitted token, when the row asked for logprobs


def verify_drafts(logits: torch.Tensor, drafts: list[list[int]], states: list, shared: torch.Generator
                  ) -> list[VerifiedRow]:
    """logits: [sum(len(d) + 1), vocab] float32, rows in `states` order. ``shared``: the
    generator of rows without a seed (the sampler's)."""
    results = []
    offset = 0
    for draft, state in zip(drafts, states):
        rows = logits[offset:offset + len(draft) + 1]
        offset += len(draft) + 1
        params = state.sampling_params
        if params.temperature == 0:
            emitted = _greedy(rows, draft)
        else:
            emitted = _sampled(rows, draft, params, state.generator or shared)
        lp = None
        if params.logprobs is not None:
            raw = torch.log_softmax(rows[:len(emitted)], dim=-1)
            lp = [token_logprobs(raw[j], token, params.logprobs) for j, token in enumerate(emitted)]
        results.append(VerifiedRow(emitted, lp))
    return results


def _greedy(rows: torch.Tensor, draft: list[int]) -> list[int]:
    target = rows.argmax(dim=-1).tolist()
    emitted = []
    for j, token in enumerate(draft):
        if target[j] != token:
            break
        emitted.append(token)
    emitted.append(target[len(emitted)])
    return emitted


def _sampled(rows: torch.Tensor, draft: list[int], params, generator: torch.Generator) -> list[int]:
    n = rows.shape[0]
    scaled = rows / params.temperature
    top_k = torch.full((n,), params.top_k if params.top_k > 0 else 0, dtype=torch.int64)
    probs = torch.softmax(filter_logits(scaled, top_k, torch.full((n,), params.top_p, dtype=rows.dtype),
                                        torch.full((n,), params.min_p, dtype=rows.dtype)), dim=-1)
    emitted = []
    for j, token in enumerate(draft):
        u = torch.rand((), generator=generator).item()
        if u < probs[j, token].item():
            emitted.append(token)
            continue
        residual = probs[j].clone()
        residual[token] = 0
        emitted.append(_draw(residual, generator))
        return emitted
    emitted.append(_draw(probs[len(draft)], generator))
    return emitted


def _draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """One draw from unnormalized non-negative weights (never a zero-weight token)."""
    total = weights.sum()
    if not total > 0:  # p was all on the rejected token: cannot happen for a real rejection
        return int(weights.argmax())
    return int(torch.multinomial(weights / total, 1, generator=generator))
