"""How many draft tokens each request gets in a step: drafts only where they pay.

A draft token costs a row of the step whether or not it is accepted; it pays with the
probability that it and every draft before it are accepted. On a CPU a step's cost grows
with its tokens (pagoda's int4 GEMV from DRAM, relative to one row: 1.19x at 4 rows, 1.36x
at 5, 1.93x at 8), so a lone stream gains from several drafts while a step that already
carries many requests gains from few or none: the same drafts that speed up one stream
slowed a batch of 8 chat requests by a quarter when given blindly.

Model (deliberately simple): a step of M tokens costs ``step_cost[M - 1]`` (relative to a
one-token step; `SpeculativeConfig.step_cost`, measured end to end); the
j-th draft of a request adds ``b ** j`` expected tokens, ``b`` the chance that a draft
token is accepted once the ones before it were (drafts come in runs: prompt lookup that
matched keeps matching). ``b`` is estimated per request from its verified drafts as
``(accepted + 1) / (accepted + rejections + 2)``: every accepted token continued a run,
every draft with a rejected token ended one (drafts cut short by the step's room bias it
down by nothing); a request that has not drafted yet gets 0.5. Draft tokens are taken
best first while they raise the expected tokens per unit of cost, within
``max_tokens_per_step`` and each request's own limit.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(frozen=True)
class DraftCandidate:
    """A decoding request that may draft: up to ``max_drafts`` tokens, its history so far."""

    max_drafts: int
    num_accepted: int = 0  # draft tokens accepted so far
    num_rejections: int = 0  # verified drafts that had a token rejected

    @property
    def continuation(self) -> float:
        """b: the chance a draft token is accepted when the ones before it were."""
        return (self.num_accepted + 1) / (self.num_accepted + self.num_rejections + 2)


def allocate_drafts(num_step_tokens: int, candidates: list[DraftCandidate], step_cost: tuple[float, ...]) -> list[int]:
    """Draft tokens for each candidate (same order), given the step's other tokens.

    ``num_step_tokens``: tokens the step carries without drafts (one per running request);
    ``step_cost[M - 1]``: the cost of a step of M tokens, nondecreasing; steps never grow
    past ``len(step_cost)`` tokens with drafts.
    Invariant: ``num_step_tokens + sum(result) <= max(len(step_cost), num_step_tokens)``
    and ``result[i] <= candidates[i].max_drafts``.
    """
    counts = [0] * len(candidates)
    room = len(step_cost) - num_step_tokens
    if room <= 0 or not candidates:
        return counts
    # Best next draft of each candidate: (-value, index); a candidate's values only fall.
    heap = [(-c.continuation, i) for i, c in enumerate(candidates) if c.max_drafts > 0]
    heapq.heapify(heap)
    expected = float(num_step_tokens)  # tokens the step is expected to emit
    tokens = num_step_tokens
    while heap and room > 0:
        negative_value, i = heap[0]
        value = -negative_value
        # Adding it raises expected tokens per unit of cost iff (expected + value) / next > expected / now.
        now, after = step_cost[tokens - 1], step_cost[tokens]
        if (expected + value) * now <= expected * after:
            break  # the best remaining draft does not pay here (nor, on a convex cost, later)
        heapq.heappop(heap)
        counts[i] += 1
        expected += value
        tokens += 1
        room -= 1
        if counts[i] < candidates[i].max_drafts:
            heapq.heappush(heap, (-(value * candidates[i].continuation), i))
    return counts
