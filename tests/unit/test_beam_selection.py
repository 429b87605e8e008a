"""BeamSearch's choices on hand-made candidates (no model)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pagoda.engine.beam_search import BeamSearch
from pagoda.sampling_params import SamplingParams

EOS = 2


@dataclass
class Beam:
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)
    beam_candidates: list[tuple[int, float]] | None = None


def _search(width: int = 2, n: int = 1, **kwargs) -> BeamSearch:
    params = SamplingParams(n=n, use_beam_search=True, beam_width=width, max_tokens=kwargs.pop("max_tokens", 5),
                            **kwargs)
    return BeamSearch(params, num_prompt_tokens=3, max_model_len=100, stop_token_ids=frozenset({EOS}),
                      extra_stop_ids=frozenset())


def _ln(p: float) -> float:
    return math.log(p)


def test_first_step_forks_the_prompt_into_every_slot():
    search = _search(width=3)
    prompt = Beam(beam_candidates=[(10, _ln(0.5)), (11, _ln(0.3)), (12, _ln(0.1)), (13, _ln(0.05))])
    step = search.step({0: prompt})
    assert step.forks == [(0, 1), (0, 2)]  # slot 0 keeps the best child; 1 and 2 copy it
    assert [(slot, e.token_id) for slot, e in step.appends] == [(0, 10), (1, 11), (2, 12)]
    assert search.live == [0, 1, 2] and search.scores == [_ln(0.5), _ln(0.3), _ln(0.1)]


def test_a_beam_chosen_twice_takes_the_slot_of_a_beam_not_chosen():
    search = _search(width=2)
    search.step({0: Beam(beam_candidates=[(10, _ln(0.6)), (11, _ln(0.4)), (12, 0.0 - 9), (13, -9.0)])})
    a = Beam([10], beam_candidates=[(20, _ln(0.9)), (21, _ln(0.09)), (22, -9.0), (23, -9.5)])
    b = Beam([11], beam_candidates=[(30, _ln(0.1)), (31, _ln(0.05)), (32, -9.0), (33, -9.5)])
    step = search.step({0: a, 1: b})
    # 0.6*0.9 = 0.54 and 0.6*0.09 = 0.054 beat 0.4*0.1 = 0.04: both children descend from slot 0.
    assert step.forks == [(0, 1)]  # slot 1's beam is replaced by a copy of slot 0's
    assert [(s, e.token_id) for s, e in step.appends] == [(0, 20), (1, 21)]
    assert step.dropped == [] and search.live == [0, 1]
    assert search.scores == [_ln(0.6) + _ln(0.9), _ln(0.6) + _ln(0.09)]


def test_eos_candidate_in_the_top_width_finishes_with_length_penalty():
    search = _search(width=2, n=2, length_penalty=2.0, early_stopping=True)
    step = search.step({0: Beam(beam_candidates=[(EOS, _ln(0.5)), (10, _ln(0.3)), (11, _ln(0.1)), (12, -9.0)])})
    assert not step.done and [h.token_ids for h in search.finished] == [[EOS]]
    assert search.finished[0].score == _ln(0.5) / 1 ** 2.0 and search.finished[0].finish_reason == "stop"
    # EOS is never a running beam: 10 and 11 continue.
    assert [e.token_id for _, e in step.appends] == [10, 11]


def test_max_tokens_finishes_the_best_width_candidates():
    search = _search(width=2, n=2, max_tokens=1)
    step = search.step({0: Beam(beam_candidates=[(10, _ln(0.5)), (11, _ln(0.3)), (12, _ln(0.1)), (13, -9.0)])})
    assert step.done and step.dropped == [0]
    assert [h.token_ids for h in search.best()] == [[10], [11]]
    assert all(h.finish_reason == "length" for h in search.best())
