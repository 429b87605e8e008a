"""Unit tests for pagoda.engine.spec_decode.ngram: the n-gram prompt-lookup proposer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.config import ConfigError
from pagoda.engine.spec_decode.ngram import NgramConfig, NgramProposer, find_ngram_match, propose


def reference(history: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Plain Python: longest n from max_n down to min_n, latest earlier start s < L - n, then k
    tokens copied from s + n on, the copy reading what it has already copied past the end."""
    length = len(history)
    for n in range(max_n, min_n - 1, -1):
        if n >= length:
            continue
        suffix = history[length - n:]
        for s in range(length - n - 1, -1, -1):
            if history[s:s + n] == suffix:
                extended = list(history)
                for j in range(k):
                    extended.append(extended[s + n + j])
                return extended[length:]
    return []


def proposer(k: int = 3, lo: int = 1, hi: int = 3) -> NgramProposer:
    return NgramProposer(NgramConfig(num_speculative_tokens=k, prompt_lookup_min=lo, prompt_lookup_max=hi))


# --------------------------------------------------------------------------- against the reference


@settings(max_examples=400, deadline=None)
@given(
    history=st.lists(st.integers(0, 4), min_size=0, max_size=60),
    k=st.integers(1, 8),
    lo=st.integers(1, 5),
    extra=st.integers(0, 4),
)
def test_matches_reference_small_vocab(history: list[int], k: int, lo: int, extra: int) -> None:
    hi = lo + extra
    got = propose(np.array(history, dtype=np.int64), k, lo, hi)
    assert got.dtype == np.int64
    assert got.tolist() == reference(history, k, lo, hi)


@settings(max_examples=150, deadline=None)
@given(
    history=st.lists(st.integers(0, 50_000), min_size=1, max_size=200),
    k=st.integers(1, 10),
    lo=st.integers(1, 3),
    extra=st.integers(0, 3),
    repeat=st.integers(0, 120),
)
def test_matches_reference_large_vocab_with_copied_span(history: list[int], k: int, lo: int,
                                                        extra: int, repeat: int) -> None:
    # Large ids rarely repeat by chance: append a copy of an earlier span so matches exist.
    start = repeat % len(history)
    history = history + history[start:start + 1 + repeat % 7]
    got = propose(np.array(history, dtype=np.int32), k, lo, lo + extra)
    assert got.tolist() == reference(history, k, lo, lo + extra)


def test_matches_reference_on_long_random_histories() -> None:
    rng = np.random.default_rng(0)
    p = proposer(k=5, lo=2, hi=4)
    for _ in range(50):
        h = rng.integers(0, 20, size=int(rng.integers(1, 2000)))
        assert p.propose(h).tolist() == reference(h.tolist(), 5, 2, 4)


# --------------------------------------------------------------------------- edge cases


def test_vllm_docstring_example() -> None:
    # [1,2,3,4,2,3], n=2, k=4: [2,3] occurs at 1, followed by [4,2,3], where vLLM stops (the
    # history ends); the overlapping copy goes on with what follows its own [2,3]: 4.
    assert propose([1, 2, 3, 4, 2, 3], 4, 2, 2).tolist() == [4, 2, 3, 4]


def test_empty_and_single_token_histories_propose_nothing() -> None:
    p = proposer()
    assert p.propose([]).tolist() == []
    assert p.propose([7]).tolist() == []
    assert p.propose(np.array([], dtype=np.int64)).size == 0


def test_history_too_short_for_min_n() -> None:
    # min 3 needs 4 tokens at least; [5,5,5] has a 2-gram match only.
    assert propose([5, 5, 5], 3, 3, 4).tolist() == []
    assert propose([5, 5, 5, 5], 3, 3, 4).tolist() == [5, 5, 5]  # one token follows; the copy repeats it


def test_no_match() -> None:
    assert proposer().propose(np.arange(100)).tolist() == []


def test_match_below_min_is_ignored() -> None:
    # Only the 1-gram [9] recurs; with min 2 nothing is proposed.
    h = [9, 1, 2, 3, 4, 9]
    assert propose(h, 3, 2, 3).tolist() == []
    assert propose(h, 3, 1, 3).tolist() == [1, 2, 3]


def test_longest_ngram_wins_over_shorter_more_recent_one() -> None:
    # Suffix [1,2]: the 2-gram [1,2] occurs at 0 (followed by 7); the 1-gram [2] also at 4 (by 8).
    h = [1, 2, 7, 5, 2, 8, 1, 2]
    assert propose(h, 1, 1, 3).tolist() == [7]
    # With max 1 only the last token counts: the latest [2] is at 4, followed by 8.
    assert propose(h, 1, 1, 1).tolist() == [8]


def test_latest_occurrence_is_used() -> None:
    h = [4, 5, 10, 4, 5, 20, 4, 5]
    assert propose(h, 1, 2, 2).tolist() == [20]
    assert find_ngram_match(np.array(h), 2, 2) == (2, 3)


def test_match_at_the_very_end_overlapping_the_suffix() -> None:
    # The only earlier occurrence of [3,3] ends right before the last token: one token follows,
    # and the copy goes on over what it copied.
    assert propose([1, 2, 3, 3, 3], 5, 2, 2).tolist() == [3, 3, 3, 3, 3]
    # Repetition loop: the latest occurrence is one period back; the copy repeats the period.
    assert propose([6, 6, 6, 6, 6], 3, 2, 2).tolist() == [6, 6, 6]
    assert propose([1, 7, 8, 1, 7, 8, 1, 7], 5, 2, 2).tolist() == [8, 1, 7, 8, 1]


def test_k_larger_than_what_follows() -> None:
    h = [1, 2, 3, 9, 1, 2]
    assert propose(h, 6, 2, 2).tolist() == [3, 9, 1, 2, 3, 9]


def test_ngram_longer_than_max_is_capped() -> None:
    # The whole prefix repeats, but only max_n tokens are matched; the latest start of the 2-gram.
    h = [1, 2, 3, 1, 2, 3, 1, 2, 3]
    assert find_ngram_match(np.array(h), 1, 2) == (2, 4)
    assert propose(h, 2, 1, 2).tolist() == [1, 2]


def test_k_zero_and_non_1d_input() -> None:
    assert propose([1, 1, 1], 0, 1, 2).tolist() == []
    with pytest.raises(ValueError, match="1-D"):
        propose(np.zeros((2, 3), dtype=np.int64), 2, 1, 2)


def test_result_is_a_copy() -> None:
    h = np.array([1, 2, 3, 1, 2])
    out = propose(h, 2, 1, 2)
    out[:] = -1
    assert h.tolist() == [1, 2, 3, 1, 2]


# --------------------------------------------------------------------------- batch


def test_propose_batch_per_row_k() -> None:
    p = proposer(k=3, lo=1, hi=2)
    hs = [np.array([1, 2, 3, 4, 1, 2]), [7, 8], np.array([5, 5, 5, 5, 5, 5]), [1, 2, 3, 1, 2]]
    out = p.propose_batch(hs, [2, 3, 0, 10])
    assert [o.tolist() for o in out] == [[3, 4], [], [], [3, 1, 2, 3, 1, 2, 3, 1, 2, 3]]
    assert [o.tolist() for o in p.propose_batch(hs)] == [[3, 4, 1], [], [5, 5, 5], [3, 1, 2]]
    assert [o.tolist() for o in p.propose_batch(hs, 1)] == [[3], [], [5], [3]]
    assert p.propose_batch([], None) == []
    with pytest.raises(ValueError, match="k_per_row"):
        p.propose_batch(hs, [1, 2])


def test_propose_batch_equals_single_proposals() -> None:
    rng = np.random.default_rng(1)
    p = proposer(k=4, lo=1, hi=3)
    hs = [rng.integers(0, 8, size=int(rng.integers(0, 300))) for _ in range(40)]
    ks = rng.integers(0, 6, size=40).tolist()
    batch = p.propose_batch(hs, ks)
    assert [b.tolist() for b in batch] == [p.propose(h, k).tolist() for h, k in zip(hs, ks)]


# --------------------------------------------------------------------------- config


def test_config_defaults_min_to_max() -> None:
    c = NgramConfig(num_speculative_tokens=4, prompt_lookup_max=3)
    assert c.prompt_lookup_min == 3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_speculative_tokens": 0, "prompt_lookup_max": 3}, "num_speculative_tokens"),
        ({"num_speculative_tokens": 2.0, "prompt_lookup_max": 3}, "num_speculative_tokens"),
        ({"num_speculative_tokens": True, "prompt_lookup_max": 3}, "num_speculative_tokens"),
        ({"num_speculative_tokens": 2, "prompt_lookup_max": 0}, "prompt_lookup_max"),
        ({"num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 0}, "prompt_lookup_min"),
        ({"num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 4}, "prompt_lookup_min"),
        ({"num_speculative_tokens": 2, "prompt_lookup_max": "3"}, "prompt_lookup_max"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        NgramConfig(**kwargs)
    assert info.value.field_name == field
