"""Unit tests for pagoda.worker.sampler: filters, penalties, seeding, logprobs, distribution."""

from __future__ import annotations

import math
import random

import pytest
import torch

from pagoda.request import Request
from pagoda.sampling_params import SamplingParams
from pagoda.worker.sampler import (
    Sampler,
    apply_logit_processors,
    apply_penalties,
    filter_logits,
    token_logprobs,
)

NEG_INF = float("-inf")


def make_request(rid: str = "r", prompt: list[int] | None = None, eos: int = 0, **params) -> Request:
    return Request(rid, prompt if prompt is not None else [1, 2, 3], SamplingParams(**params), frozenset({eos}))


def kept(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


def filt(logits: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float]) -> torch.Tensor:
    return filter_logits(
        logits,
        torch.tensor(top_k),
        torch.tensor(top_p, dtype=logits.dtype),
        torch.tensor(min_p, dtype=logits.dtype),
    )


# Probabilities 0.5, 0.25, 0.15, 0.1 placed at shuffled token ids.
PROBS = {3: 0.5, 0: 0.25, 4: 0.15, 1: 0.1}
ORDER = [3, 0, 4, 1]  # most to least likely


def prob_logits(probs: dict[int, float] = PROBS, vocab: int = 5, floor: float = 1e-9) -> torch.Tensor:
    p = torch.full((vocab,), floor, dtype=torch.float64)
    for tok, v in probs.items():
        p[tok] = v
    return torch.log(p).to(torch.float32)


# --------------------------------------------------------------------------- filter_logits


def test_filter_noop_returns_input_unchanged() -> None:
    logits = torch.randn(3, 10)
    out = filt(logits, [0, 0, 0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    assert torch.equal(out, logits)


@pytest.mark.parametrize("k, expected", [(1, ORDER[:1]), (2, ORDER[:2]), (3, ORDER[:3]), (4, ORDER[:4]), (50, range(5))])
def test_top_k(k: int, expected) -> None:
    logits = prob_logits().unsqueeze(0)
    out = filt(logits, [k], [1.0], [0.0])
    assert kept(out[0]) == set(expected)
    # Kept entries keep their values exactly.
    idx = torch.tensor(sorted(expected))
    assert torch.equal(out[0, idx], logits[0, idx])


@pytest.mark.parametrize(
    "top_p, n_kept",
    [
        (0.3, 1),  # 0.5 alone crosses 0.3
        (0.6, 2),  # 0.5 < 0.6, adding 0.25 crosses it: that token is kept
        (0.74, 2),
        (0.8, 3),  # 0.75 < 0.8 -> third token (0.15) kept
        (0.95, 4),
        (0.999, 4),  # 0.5+.25+.15+.1 = 1.0 >= 0.999: the 1e-9 tail is cut
    ],
)
def test_top_p_keeps_the_token_crossing_the_threshold(top_p: float, n_kept: int) -> None:
    logits = prob_logits().unsqueeze(0)
    out = filt(logits, [0], [top_p], [0.0])
    assert kept(out[0]) == set(ORDER[:n_kept])


def test_top_p_one_keeps_all_in_a_batch_that_filters() -> None:
    """top_p=1 (and top_k=0, min_p=0) must keep every token of its row, whatever the other rows ask."""
    logits = torch.tensor([[30.0, 0.0, 0.0, 0.0, -5.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    out = filt(logits, [0, 2], [1.0, 1.0], [0.0, 0.0])
    assert kept(out[1]) == {3, 4}
    assert torch.equal(out[0], logits[0]), f"row with no filtering was changed: {out[0]}"


def test_top_p_one_with_realistic_vocab_keeps_all() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 32000) * 3
    out = filt(logits, [0, 5], [1.0, 1.0], [0.0, 0.0])
    assert len(kept(out[1])) == 5
    assert int(torch.isinf(out[0]).sum()) == 0, "top_p=1 removed tokens"


def test_top_k_with_top_p_one_keeps_exactly_k() -> None:
    logits = torch.tensor([[30.0, 0.0, -1.0, -2.0]])
    out = filt(logits, [2], [1.0], [0.0])
    assert kept(out[0]) == {0, 1}


@pytest.mark.parametrize(
    "min_p, n_kept",
    [
        (0.0, 5),
        (0.1, 4),  # threshold 0.05 -> 0.5, 0.25, 0.15, 0.1
        (0.25, 3),  # threshold 0.125
        (0.4, 2),  # threshold 0.2
        (0.6, 1),  # threshold 0.3
        (1.0, 1),
    ],
)
def test_min_p(min_p: float, n_kept: int) -> None:
    logits = prob_logits().unsqueeze(0)
    # min_p=0 alone is a no-op; force the filtering path with a second row.
    both = torch.cat([logits, logits])
    out = filt(both, [0, 1], [1.0, 1.0], [min_p, 0.0])
    expected = set(ORDER[:n_kept]) if n_kept < 5 else set(range(5))
    assert kept(out[0]) == expected
    assert kept(out[1]) == {ORDER[0]}


def test_combined_filters_apply_in_sequence() -> None:
    logits = prob_logits().unsqueeze(0)
    # top_k=3 then top_p on the renormalized top 3 (0.556, 0.278, 0.167): 0.8 needs only two.
    assert kept(filt(logits, [3], [0.8], [0.0])[0]) == set(ORDER[:2])
    # top_k=3 and min_p=0.25 (threshold 0.125 of the top prob): 0.15 survives, 0.1 was cut by top_k anyway.
    assert kept(filt(logits, [3], [1.0], [0.25])[0]) == set(ORDER[:3])
    # top_p=0.95 keeps four, min_p=0.4 cuts to two.
    assert kept(filt(logits, [0], [0.95], [0.4])[0]) == set(ORDER[:2])
    # top_k=4, top_p=0.95, min_p=0.25 -> 3.
    assert kept(filt(logits, [4], [0.95], [0.25])[0]) == set(ORDER[:3])


def test_filters_per_row_in_one_batch() -> None:
    base = prob_logits()
    perm = torch.tensor([2, 4, 0, 1, 3])  # row 1 has the same probabilities at other ids
    logits = torch.stack([base, base[perm], base, base])
    out = filt(logits, [1, 3, 0, 0], [1.0, 1.0, 0.6, 1.0], [0.0, 0.0, 0.0, 0.25])
    assert kept(out[0]) == {3}
    inv = {int(perm[i]): i for i in range(5)}  # token t in base is at index inv[t] in row 1
    assert kept(out[1]) == {inv[t] for t in ORDER[:3]}
    assert kept(out[2]) == set(ORDER[:2])
    assert kept(out[3]) == set(ORDER[:3])


def test_most_likely_token_always_survives() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]])  # ties
    out = filt(logits, [0], [0.01], [1.0])
    assert len(kept(out[0])) >= 1


# --------------------------------------------------------------------------- penalties


LOGITS6 = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0, 0.0])


def test_repetition_penalty_divides_positive_multiplies_negative() -> None:
    out = apply_penalties(LOGITS6, prompt_ids=[0, 1], output_ids=[2, 2, 4], repetition=2.0, presence=0.0, frequency=0.0)
    # Seen: 0, 1 (prompt) and 2, 4 (output); 3 and 5 untouched.
    assert out.tolist() == [1.0, -2.0, 0.25, -3.0, 0.5, 0.0]
    # The input is not modified in place.
    assert LOGITS6.tolist() == [2.0, -1.0, 0.5, -3.0, 1.0, 0.0]


def test_repetition_penalty_below_one_boosts_seen_tokens() -> None:
    out = apply_penalties(LOGITS6, prompt_ids=[3], output_ids=[0], repetition=0.5, presence=0.0, frequency=0.0)
    assert out.tolist() == [4.0, -1.0, 0.5, -1.5, 1.0, 0.0]


def test_presence_and_frequency_over_output_only() -> None:
    # OpenAI: logit[j] -= c[j] * frequency + (c[j] > 0) * presence, c = counts in the output.
    out = apply_penalties(LOGITS6, prompt_ids=[0, 1, 5], output_ids=[2, 2, 4], repetition=1.0, presence=0.5, frequency=0.25)
    expected = [2.0, -1.0, 0.5 - 2 * 0.25 - 0.5, -3.0, 1.0 - 0.25 - 0.5, 0.0]
    assert out.tolist() == pytest.approx(expected, abs=1e-6)


def test_presence_only_and_frequency_only() -> None:
    out = apply_penalties(LOGITS6, [], [1, 1, 1, 3], 1.0, presence=1.0, frequency=0.0)
    assert out.tolist() == pytest.approx([2.0, -2.0, 0.5, -4.0, 1.0, 0.0])
    out = apply_penalties(LOGITS6, [], [1, 1, 1, 3], 1.0, presence=0.0, frequency=1.5)
    assert out.tolist() == pytest.approx([2.0, -5.5, 0.5, -4.5, 1.0, 0.0])
    # Negative values encourage repetition.
    out = apply_penalties(LOGITS6, [], [0, 0], 1.0, presence=-1.0, frequency=-0.5)
    assert out.tolist() == pytest.approx([4.0, -1.0, 0.5, -3.0, 1.0, 0.0])


def test_presence_frequency_without_output_change_nothing() -> None:
    out = apply_penalties(LOGITS6, [0, 1, 2], [], 1.0, presence=2.0, frequency=2.0)
    assert out.tolist() == LOGITS6.tolist()


def test_all_penalties_together() -> None:
    out = apply_penalties(LOGITS6, [0], [2, 2, 3], repetition=2.0, presence=0.5, frequency=0.25)
    expected = [1.0, -1.0, 0.25 - 0.5 - 0.5, -6.0 - 0.25 - 0.5, 1.0, 0.0]
    assert out.tolist() == pytest.approx(expected, abs=1e-6)


def test_penalties_through_logit_processors_use_request_tokens() -> None:
    r = make_request(prompt=[0], presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    for t in (2, 2, 3):
        r.append_output_token(t)
    plain = make_request("plain")
    logits = torch.stack([LOGITS6, LOGITS6])
    out = apply_logit_processors(logits, [r, plain])
    assert out[0].tolist() == pytest.approx([1.0, -1.0, -0.75, -6.75, 1.0, 0.0], abs=1e-6)
    assert out[1].tolist() == LOGITS6.tolist()
    assert logits[0].tolist() == LOGITS6.tolist(), "input logits modified in place"


# --------------------------------------------------------------------------- greedy, bias, min_tokens


def test_greedy_picks_argmax() -> None:
    torch.manual_seed(1)
    logits = torch.randn(16, 100)
    reqs = [make_request(f"g{i}", temperature=0.0) for i in range(16)]
    out = Sampler(100)(logits, reqs)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 16


def test_greedy_rows_unaffected_by_random_rows() -> None:
    torch.manual_seed(2)
    logits = torch.randn(6, 50)
    reqs = [make_request(f"r{i}", temperature=0.0 if i % 2 == 0 else 1.5, top_k=3) for i in range(6)]
    out = Sampler(50)(logits, reqs)
    for i in range(0, 6, 2):
        assert out.token_ids[i] == int(logits[i].argmax())
    for i in range(1, 6, 2):
        assert out.token_ids[i] in set(logits[i].topk(3).indices.tolist())


def test_logit_bias_shifts() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    assert Sampler(4)(logits, [make_request(temperature=0.0, logit_bias={3: 3.5})]).token_ids == [3]
    assert Sampler(4)(logits, [make_request(temperature=0.0, logit_bias={3: 2.5})]).token_ids == [2]
    assert Sampler(4)(logits, [make_request(temperature=0.0, logit_bias={2: -100})]).token_ids == [3]
    processed = apply_logit_processors(logits, [make_request(logit_bias={0: -1.5, 3: 0.25})])
    assert processed[0].tolist() == [-1.5, 1.0, 5.0, 2.25]


def test_min_tokens_masks_eos_and_stop_token_ids() -> None:
    # EOS (0) is the most likely, stop token 1 next, then 2.
    logits = torch.tensor([[9.0, 8.0, 7.0, 1.0]])
    r = make_request(eos=0, temperature=0.0, min_tokens=2, stop_token_ids=[1])
    processed = apply_logit_processors(logits, [r])
    assert processed[0, 0] == NEG_INF and processed[0, 1] == NEG_INF
    assert processed[0, 2:].tolist() == [7.0, 1.0]
    sampler = Sampler(4)
    assert sampler(logits, [r]).token_ids == [2]
    r.append_output_token(2)
    assert sampler(logits, [r]).token_ids == [2]
    r.append_output_token(2)  # output length reaches min_tokens: nothing is masked
    assert sampler(logits, [r]).token_ids == [0]
    assert torch.equal(apply_logit_processors(logits, [r]), logits)


def test_min_tokens_with_ignore_eos_masks_only_stop_tokens() -> None:
    logits = torch.tensor([[9.0, 8.0, 7.0, 1.0]])
    r = make_request(eos=0, temperature=0.0, min_tokens=1, stop_token_ids=[1], ignore_eos=True)
    processed = apply_logit_processors(logits, [r])
    assert processed[0].tolist() == [9.0, NEG_INF, 7.0, 1.0]


def test_min_tokens_masks_random_sampling_too() -> None:
    logits = torch.zeros(200, 5)  # uniform
    reqs = [make_request(f"r{i}", eos=4, min_tokens=1, stop_token_ids=[3]) for i in range(200)]
    toks = Sampler(5, seed=3)(logits, reqs).token_ids
    assert set(toks) <= {0, 1, 2}
    assert set(toks) == {0, 1, 2}


# --------------------------------------------------------------------------- seeding


def _random_other(rng: random.Random, i: int) -> Request:
    kind = rng.random()
    params: dict = {"temperature": rng.choice([0.0, 0.7, 1.0, 1.3])}
    if kind < 0.3:
        params["seed"] = rng.randint(0, 10_000)
    if kind > 0.5:
        params["top_k"] = rng.randint(1, 10)
    if rng.random() < 0.5:
        params["top_p"] = rng.uniform(0.3, 1.0)
    if rng.random() < 0.3:
        params["min_p"] = rng.uniform(0.0, 0.3)
    if rng.random() < 0.3:
        params["logprobs"] = 2
    return make_request(f"o{i}", **params)


def test_seeded_request_is_batch_invariant() -> None:
    vocab, steps = 64, 8
    torch.manual_seed(4)
    target_logits = [torch.randn(vocab) for _ in range(steps)]

    def run(batch_rng: random.Random | None) -> list[int]:
        target = make_request("t", seed=1234, temperature=1.0, top_p=0.9)
        sampler = Sampler(vocab, seed=99 if batch_rng is None else batch_rng.randint(0, 1000))
        others: list[Request] = []
        if batch_rng is not None:
            others = [_random_other(batch_rng, i) for i in range(batch_rng.randint(1, 7))]
        tokens = []
        for s in range(steps):
            pos = 0 if batch_rng is None else batch_rng.randint(0, len(others))
            rows = others[:pos] + [target] + others[pos:]
            logits = torch.randn(len(rows), vocab) * 2
            logits[pos] = target_logits[s]
            out = sampler(logits, rows)
            for r, tok in zip(rows, out.token_ids):
                r.append_output_token(tok)
            tokens.append(out.token_ids[pos])
        return tokens

    alone = run(None)
    assert len(set(alone)) > 1, "test is too weak: the seeded request always picks the same token"
    for trial in range(6):
        assert run(random.Random(trial)) == alone, f"trial {trial}"


def test_different_seeds_differ_same_seed_repeats() -> None:
    vocab = 1000
    logits = torch.zeros(1, vocab)

    def draws(seed: int) -> list[int]:
        r = make_request(seed=seed)
        s = Sampler(vocab)
        return [s(logits, [r]).token_ids[0] for _ in range(5)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_unseeded_requests_use_the_sampler_generator() -> None:
    logits = torch.zeros(1, 1000)
    a = [Sampler(1000, seed=5)(logits, [make_request()]).token_ids[0] for _ in range(1)]
    b = [Sampler(1000, seed=5)(logits, [make_request()]).token_ids[0] for _ in range(1)]
    assert a == b
    s = Sampler(1000, seed=5)
    seq = [s(logits, [make_request()]).token_ids[0] for _ in range(5)]
    assert len(set(seq)) > 1


# --------------------------------------------------------------------------- logprobs


def test_logprobs_match_log_softmax_and_rank() -> None:
    torch.manual_seed(5)
    vocab = 40
    logits = torch.randn(5, vocab) * 2
    reqs = [
        make_request("a", logprobs=5, temperature=1.0, seed=1),
        make_request("b", logprobs=0, temperature=0.0),
        make_request("c", logprobs=20, temperature=0.8, top_k=10, presence_penalty=1.0, logit_bias={3: 5.0}, seed=2),
        make_request("d"),  # no logprobs
        make_request("e", logprobs=1, temperature=2.0, seed=3),
    ]
    reqs[2].append_output_token(7)
    out = Sampler(vocab)(logits, reqs)
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert out.logprobs[3] is None
    for i, r in enumerate(reqs):
        k = r.sampling_params.logprobs
        if k is None:
            continue
        lp = out.logprobs[i]
        tok = out.token_ids[i]
        assert lp.token_id == tok
        # Logprobs are those of the raw distribution, not of the processed one.
        assert lp.logprob == pytest.approx(float(ref[i, tok]), abs=1e-5)
        order = torch.argsort(ref[i], descending=True).tolist()
        assert lp.rank == order.index(tok) + 1
        assert len(lp.top) == k
        assert list(lp.top) == order[:k]
        for t, v in lp.top.items():
            assert v == pytest.approx(float(ref[i, t]), abs=1e-5)
    assert out.logprobs[1].rank == 1  # greedy on raw logits
    assert out.logprobs[1].top == {}


def test_token_logprobs_rank_counts_strictly_greater() -> None:
    row = torch.log_softmax(torch.tensor([1.0, 3.0, 2.0, 3.0, 0.0]), dim=-1)
    lp = token_logprobs(row, 2, 2)
    assert lp.rank == 3
    assert set(lp.top) == {1, 3}
    assert token_logprobs(row, 4, 0).rank == 5
    assert token_logprobs(row, 1, 1).rank == 1


# --------------------------------------------------------------------------- distribution


def _frequencies(tokens: list[int], vocab: int) -> list[float]:
    return [tokens.count(t) / len(tokens) for t in range(vocab)]


@pytest.mark.parametrize(
    "params, expected",
    [
        ({}, [0.2, 0.3, 0.5]),
        ({"temperature": 2.0}, [math.sqrt(p) / sum(math.sqrt(q) for q in (0.2, 0.3, 0.5)) for p in (0.2, 0.3, 0.5)]),
        ({"temperature": 0.5}, [p * p / sum(q * q for q in (0.2, 0.3, 0.5)) for p in (0.2, 0.3, 0.5)]),
        ({"top_k": 2}, [0.0, 0.375, 0.625]),
        ({"top_k": -1}, [0.2, 0.3, 0.5]),
        ({"top_p": 0.6}, [0.0, 0.375, 0.625]),
        ({"min_p": 0.5}, [0.0, 0.375, 0.625]),
    ],
)
def test_sampling_distribution(params: dict, expected: list[float]) -> None:
    n = 4000
    logits = torch.log(torch.tensor([0.2, 0.3, 0.5])).expand(n, 3).contiguous()
    reqs = [make_request(f"r{i}", **params) for i in range(n)]
    tokens = Sampler(3, seed=11)(logits, reqs).token_ids
    freqs = _frequencies(tokens, 3)
    for f, e in zip(freqs, expected):
        assert f == pytest.approx(e, abs=0.03), (freqs, expected)
    for f, e in zip(freqs, expected):
        if e == 0.0:
            assert f == 0.0


def test_seeded_sampling_distribution_over_steps() -> None:
    """One seeded request drawn 4000 times (its generator advancing each step)."""
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
    r = make_request(seed=2024)
    sampler = Sampler(3)
    tokens = [sampler(logits, [r]).token_ids[0] for _ in range(4000)]
    freqs = _frequencies(tokens, 3)
    assert freqs == pytest.approx([0.2, 0.3, 0.5], abs=0.03)
