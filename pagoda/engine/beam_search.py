"""Beam search over paged KV: the choice of beams, apart from their KV.

A beam search request is `beam_width` slots (scheduler Requests). Each step
every live beam reports its best next tokens (`Request.beam_candidates`);
once all have, `BeamSearch.step` ranks every (beam, token) by cumulative
log-probability and returns a `BeamStep`: which slots become copies of
which (`forks`, done by the scheduler by sharing block tables — no KV is
copied but the partly filled last block, on first write) and which token
each live slot appends. Candidates that end a sequence (a stop token, or the
length limit) become finished hypotheses, scored with the length penalty.

The ranking, the finished set and the stopping rules follow HF transformers'
beam search (`generate(num_beams=..., length_penalty=..., early_stopping=...)`),
so the same model gives the same beams:
- the best `k = max(2, 1 + #stop tokens) * width` candidates are considered;
  the best `width` of them that do not end continue;
- a candidate that ends is kept only if it ranks among the first `width`;
  its score is cumulative logprob / generated_len ** length_penalty, and the
  best `width` finished hypotheses are kept;
- search stops when every candidate ended, when `width` hypotheses are
  finished and early_stopping is True, or when none of the running beams can
  beat the worst finished one (early_stopping False: at the current length;
  "never": at the longest possible length if length_penalty > 0).

Invariant: every live slot holds a sequence with the same number of output
tokens, and `scores[i]` is the cumulative logprob of live slot `live[i]`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pagoda.request import TokenLogprobs, num_beam_candidates_kept
from pagoda.sampling_params import SamplingParams


class BeamView(Protocol):
    """What BeamSearch reads of a slot (a `Request` has these)."""

    output_token_ids: list[int]
    output_logprobs: list[TokenLogprobs]
    beam_candidates: list[tuple[int, float]] | None


@dataclass
class BeamHypothesis:
    """A finished sequence: its output tokens and how it scores."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs]
    cumulative_logprob: float
    score: float  # cumulative_logprob / len(token_ids) ** length_penalty
    finish_reason: str  # "stop" (a stop token ended it) or "length"
    stop_reason: int | None = None  # the stop token id, if it is one of stop_token_ids


@dataclass
class BeamStep:
    """What the engine must do to the slots after one selection, in this order."""

    # (source slot, target slot): the target becomes a copy of the source (before appends).
    forks: list[tuple[int, int]] = field(default_factory=list)
    # (slot, chosen token's logprobs entry): append the token to that slot.
    appends: list[tuple[int, TokenLogprobs]] = field(default_factory=list)
    # Slots that no longer hold a live beam (their blocks can go).
    dropped: list[int] = field(default_factory=list)
    done: bool = False


@dataclass(order=True)
class _Candidate:
    total: float  # the beam's cumulative logprob + this token's
    order: int  # tie-break: earlier beam, then better rank, first (sorted descending by -order)
    slot: int = field(compare=False)
    token_id: int = field(compare=False)
    logprob: float = field(compare=False)
    rank: int = field(compare=False)


def length_normalized(total: float, length: int, penalty: float) -> float:
    """A hypothesis's score: total / length ** penalty (HF's), for any finite penalty.

    `length ** penalty` underflows to 0 for a very negative penalty (2 ** -2000) and
    overflows for a very large one (2 ** 2000 raises OverflowError); the limits are taken
    instead: +-inf and +-0. A length below 1 (no room to generate) counts as 1.
    """
    length = max(length, 1)
    try:
        divisor = length ** float(penalty)  # a float power: an int one could be too large to divide by
    except OverflowError:
        return math.copysign(0.0, total)
    if divisor == 0.0:
        return math.copysign(math.inf, total) if total else 0.0
    return total / divisor


class BeamSearch:
    def __init__(self, params: SamplingParams, num_prompt_tokens: int, max_model_len: int,
                 stop_token_ids: frozenset[int], extra_stop_ids: frozenset[int]):
        self.params = params
        self.width: int = params.beam_width
        self.stop_token_ids = stop_token_ids  # EOS (unless ignore_eos) and stop_token_ids
        self.extra_stop_ids = extra_stop_ids  # the user's stop_token_ids (reported as stop_reason)
        room = max_model_len - num_prompt_tokens
        self.max_new_tokens = min(params.max_tokens, room) if params.max_tokens is not None else room
        self.keep = num_beam_candidates_kept(self.width, len(stop_token_ids))
        self.live: list[int] = [0]  # the prompt is one beam to start with
        self.scores: list[float] = [0.0]
        self.finished: list[BeamHypothesis] = []
        self._improvable = True  # False once no running beam can beat the worst finished one
        self.done = False

    def step(self, beams: Mapping[int, BeamView]) -> BeamStep:
        """One selection. `beams[slot]` gives each live slot's output tokens so far and its
        candidates (`Request` satisfies `BeamView`)."""
        p = self.params
        width = self.width
        candidates: list[_Candidate] = []
        for index, (slot, score) in enumerate(zip(self.live, self.scores)):
            for rank, (token_id, logprob) in enumerate(beams[slot].beam_candidates):
                order = index * 1_000_000 + rank
                candidates.append(_Candidate(score + logprob, -order, slot, token_id, logprob, rank + 1))
        num_generated = len(beams[self.live[0]].output_token_ids) + 1  # after this step
        top = sorted(candidates, reverse=True)[:self.keep]
        at_limit = num_generated >= self.max_new_tokens
        ends = [at_limit or c.token_id in self.stop_token_ids for c in top]

        # Finished hypotheses: only candidates among the first `width` count.
        full_and_early = len(self.finished) >= width and p.early_stopping is True
        if self._improvable and not full_and_early:
            for i, (c, ended) in enumerate(zip(top[:width], ends)):
                if ended:
                    self.finished.append(self._hypothesis(beams[c.slot], c, num_generated))
            self.finished.sort(key=lambda h: -h.score)
            del self.finished[width:]

        running = [c for c, ended in zip(top, ends) if not ended][:width]
        step = BeamStep()
        self._improvable = self._improvable and self._can_improve(running, num_generated)
        finished_early = len(self.finished) >= width and p.early_stopping is True
        if all(ends) or not running or not self._improvable or finished_early:
            step.done = self.done = True
            step.dropped = list(self.live)
            return step

        # Slots: a beam's first child stays in its slot; others take slots no child descends from.
        parents = {c.slot for c in running}
        free_slots = [s for s in range(width) if s not in parents]
        placed: set[int] = set()
        new_live = []
        for c in running:
            if c.slot not in placed:
                placed.add(c.slot)
                target = c.slot
            else:
                target = free_slots.pop(0)
                step.forks.append((c.slot, target))
            new_live.append(target)
            top_k = p.logprobs or 0
            top_logprobs = dict(beams[c.slot].beam_candidates[:top_k]) if top_k else {}
            step.appends.append((target, TokenLogprobs(c.token_id, c.logprob, c.rank, top_logprobs)))
        step.dropped = [s for s in self.live if s not in new_live]
        self.live = new_live
        self.scores = [c.total for c in running]
        return step

    def _can_improve(self, running: list[_Candidate], num_generated: int) -> bool:
        """Whether the best running beam could still beat the worst kept hypothesis."""
        if len(self.finished) < self.width or not running:
            return True
        lp = self.params.length_penalty
        length = self.max_new_tokens if self.params.early_stopping == "never" and lp > 0 else num_generated
        best_possible = length_normalized(running[0].total, length, lp)
        return best_possible > self.finished[-1].score

    def _hypothesis(self, beam: BeamView, c: _Candidate, num_generated: int) -> BeamHypothesis:
        top_k = self.params.logprobs or 0
        entry = TokenLogprobs(c.token_id, c.logprob, c.rank, dict(beam.beam_candidates[:top_k]) if top_k else {})
        is_stop = c.token_id in self.stop_token_ids
        return BeamHypothesis(
            token_ids=[*beam.output_token_ids, c.token_id],
            logprobs=[*beam.output_logprobs, entry],
            cumulative_logprob=c.total,
            score=length_normalized(c.total, num_generated, self.params.length_penalty),
            finish_reason="stop" if is_stop else "length",
            stop_reason=c.token_id if is_stop and c.token_id in self.extra_stop_ids else None,
        )

    def best(self) -> list[BeamHypothesis]:
        """The n best finished hypotheses, best first."""
        return self.finished[: self.params.n]
