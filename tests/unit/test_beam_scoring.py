"""Beam search scores for any finite length_penalty: no ZeroDivisionError or OverflowError."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from pagoda.engine.beam_search import BeamSearch, length_normalized
from pagoda.sampling_params import SamplingParams

EOS = 2


@dataclass
class Beam:
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)
    beam_candidates: list[tuple[int, float]] | None = None


def test_ordinary_penalties_keep_hf_formula():
    assert length_normalized(-3.0, 4, 1.0) == -3.0 / 4
    assert length_normalized(-3.0, 4, 2.0) == -3.0 / 16
    assert length_normalized(-3.0, 4, -0.5) == -3.0 / 4 ** -0.5
    assert length_normalized(-3.0, 1, 1e300) == -3.0  # 1 ** anything is 1


@pytest.mark.parametrize("penalty", [-2000.0, -2000, 2000.0, 2000, 1e308, -1e308])
def test_extreme_finite_penalties_give_the_limit(penalty):
    score = length_normalized(-3.0, 2, penalty)
    if penalty > 0:  # divided by an overflowing power: towards -0
        assert score == 0.0 and math.copysign(1.0, score) == -1.0
    else:  # divided by a power that underflows to 0: towards -inf
        assert score == -math.inf
    assert length_normalized(0.0, 2, penalty) == 0.0


def test_a_length_below_one_counts_as_one():
    assert length_normalized(-3.0, 0, 1.0) == -3.0
    assert length_normalized(-3.0, 0, -1.0) == -3.0


@pytest.mark.parametrize("penalty", [-2000.0, 2000.0])
@pytest.mark.parametrize("early_stopping", [False, "never"])
def test_a_search_with_an_extreme_penalty_runs_to_the_end(penalty, early_stopping):
    params = SamplingParams(n=2, use_beam_search=True, beam_width=2, max_tokens=4, length_penalty=penalty,
                            early_stopping=early_stopping)
    search = BeamSearch(params, num_prompt_tokens=3, max_model_len=100, stop_token_ids=frozenset({EOS}),
                        extra_stop_ids=frozenset())
    beams = {0: Beam()}
    steps = 0
    while not search.done:
        steps += 1
        # EOS ranks first every step, so hypotheses finish (and are scored) at every length.
        for slot in search.live:
            beams.setdefault(slot, Beam()).beam_candidates = [(EOS, -0.1), (10, -1.0), (11, -1.5), (12, -9.0)]
        step = search.step({slot: beams[slot] for slot in search.live})
        for source, target in step.forks:
            beams[target] = Beam(list(beams[source].output_token_ids))
        for slot, entry in step.appends:
            beams[slot].output_token_ids.append(entry.token_id)
        assert steps <= 4
    best = search.best()
    assert len(best) == 2 and all(h.token_ids[-1] == EOS or len(h.token_ids) == 4 for h in best)
    assert all(not math.isnan(h.score) for h in best)
