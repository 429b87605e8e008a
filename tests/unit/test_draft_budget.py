"""The draft budget: drafts where they pay (engine/spec_decode/budget.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pagoda.engine.spec_decode.budget import DraftCandidate, allocate_drafts

# Relative step cost at 1..8 tokens: nearly flat to 4, then rising (the CPU's shape).
COST = (1.0, 1.03, 1.07, 1.13, 1.25, 1.38, 1.5, 1.65)


def test_a_lone_stream_that_keeps_matching_drafts_deep():
    good = DraftCandidate(max_drafts=7, num_accepted=90, num_rejections=5)  # b ~ 0.94
    assert allocate_drafts(1, [good], COST) == [7]


def test_a_fresh_request_drafts_in_the_flat_part_and_a_poor_one_not_at_all():
    assert allocate_drafts(1, [DraftCandidate(max_drafts=7)], COST) == [3]  # b = 0.5: 0.5, 0.25, 0.125
    poor = DraftCandidate(max_drafts=7, num_accepted=0, num_rejections=60)
    assert allocate_drafts(1, [poor], COST) == [0]


def test_a_busy_step_drafts_only_for_requests_that_match():
    chat = [DraftCandidate(max_drafts=4, num_accepted=5, num_rejections=15) for _ in range(4)]  # b = 0.27
    assert allocate_drafts(4, chat, COST) == [0, 0, 0, 0]  # 4 tokens already: a draft costs ~10%
    grounded = DraftCandidate(max_drafts=4, num_accepted=200, num_rejections=4)
    counts = allocate_drafts(4, chat[:3] + [grounded], COST)
    assert counts[:3] == [0, 0, 0] and counts[3] >= 2


def test_free_drafts_fill_the_step_and_the_step_limit_holds():
    many = [DraftCandidate(max_drafts=7) for _ in range(3)]
    flat = (1.0,) * 8
    assert sum(allocate_drafts(3, many, flat)) == 5
    assert allocate_drafts(8, many, flat) == [0, 0, 0]
    assert allocate_drafts(10, many, flat) == [0, 0, 0]


@given(st.integers(0, 12), st.lists(st.tuples(st.integers(0, 7), st.integers(0, 50), st.integers(0, 50)), max_size=8),
       st.lists(st.floats(0, 1), min_size=1, max_size=12))
def test_limits_always_hold(tokens, raw, increments):
    cost = tuple(1.0 + sum(increments[:i]) for i in range(len(increments)))  # nondecreasing
    candidates = [DraftCandidate(k, a, r) for k, a, r in raw]
    counts = allocate_drafts(max(tokens, 1), candidates, cost)
    assert len(counts) == len(candidates)
    assert all(0 <= n <= c.max_drafts for n, c in zip(counts, candidates))
    assert max(tokens, 1) + sum(counts) <= max(len(cost), max(tokens, 1))
