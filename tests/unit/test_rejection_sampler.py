"""Unit tests for pagoda.engine.spec_decode.rejection_sampler: verification of draft tokens.

Distribution tests use a chi-squared goodness-of-fit statistic against hard-coded critical
values at p = 0.001 (scipy is not installed here). They draw from fixed seeds, so they are
deterministic: a pass is not luck that can turn into a flaky failure, and each test also checks
that the statistic would have rejected the (strongly different) draft distribution.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from pagoda.engine.spec_decode.rejection_sampler import RejectionOutput, RejectionSampler
from pagoda.request import Request
from pagoda.sampling_params import SamplingParams
from pagoda.worker.sampler import Sampler, filter_logits

EOS = 0
# Chi-squared critical values at p = 0.001, by degrees of freedom.
CHI2_CRIT_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}


def make_request(rid: str = "r", prompt: list[int] | None = None, output: list[int] | None = None,
                 **params) -> Request:
    request = Request(rid, prompt if prompt is not None else [1, 2, 3], SamplingParams(**params), frozenset({EOS}))
    for token in output or []:
        request.append_output_token(token)
    return request


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Statistic and degrees of freedom over the support of `probs`; counts outside it must be 0."""
    support = probs > 0
    assert int(counts[~support].sum()) == 0, "a token with target probability 0 was emitted"
    n = float(counts.sum())
    expected = probs[support].double() * n
    observed = counts[support].double()
    return float(((observed - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def assert_distributed_as(tokens: torch.Tensor, probs: torch.Tensor, alternative: torch.Tensor | None = None) -> None:
    counts = torch.bincount(tokens, minlength=probs.numel())
    stat, df = chi2(counts, probs)
    assert stat < CHI2_CRIT_001[df], (stat, df, counts.tolist(), probs.tolist())
    if alternative is not None:  # the test has the power to see the draft's distribution
        alt = alternative.double() * float(counts.sum())
        assert float(((counts.double() - alt) ** 2 / alt.clamp(min=1e-9)).sum()) > 10 * CHI2_CRIT_001[df]


def run(sampler: RejectionSampler, logits: torch.Tensor, drafts: list[list[int]], requests: list[Request],
        draft_probs: torch.Tensor | None = None) -> RejectionOutput:
    flat = torch.tensor([t for row in drafts for t in row], dtype=torch.long)
    return sampler(logits, flat, [len(d) for d in drafts], requests, draft_probs)


def check_invariants(out: RejectionOutput, drafts: list[list[int]]) -> None:
    for tokens, accepted, row in zip(out.token_ids, out.num_accepted, drafts):
        assert 0 <= accepted <= len(row)
        assert len(tokens) == accepted + 1
        assert tokens[:accepted] == row[:accepted]


def random_greedy_case(gen: torch.Generator, rng: random.Random, vocab: int,
                       max_rows: int) -> tuple[list[int], torch.Tensor, list[int], list[list[int]]]:
    """(ks, logits, argmax, drafts): 1..max_rows rows of 0..5 drafts each, the drafts equal to
    the target's argmax but each corrupted with probability 0.3."""
    ks = [rng.randint(0, 5) for _ in range(rng.randint(1, max_rows))]
    logits = torch.randn(sum(ks) + len(ks), vocab, generator=gen)
    argmax = logits.argmax(dim=-1).tolist()
    drafts, start = [], 0
    for k in ks:
        drafts.append([argmax[start + j] if rng.random() > 0.3 else rng.randrange(vocab) for j in range(k)])
        start += k + 1
    return ks, logits, argmax, drafts


# --------------------------------------------------------------------------- greedy


def test_greedy_accepts_longest_matching_prefix_on_random_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    vocab = 11
    for _ in range(30):
        ks, logits, argmax, drafts = random_greedy_case(gen, rng, vocab, max_rows=6)
        requests = [make_request(f"r{i}", temperature=0.0) for i in range(len(ks))]
        out = run(RejectionSampler(), logits, drafts, requests)
        check_invariants(out, drafts)
        start = 0
        for k, row, tokens, accepted in zip(ks, drafts, out.token_ids, out.num_accepted):
            expect = 0
            while expect < k and row[expect] == argmax[start + expect]:
                expect += 1
            assert accepted == expect
            assert tokens == argmax[start:start + expect + 1]  # every emitted token is the argmax
            start += k + 1
        assert out.logprobs == [None] * len(ks) and out.failed == {}


def test_greedy_rows_verify_alike_with_or_without_sampled_rows_in_the_batch() -> None:
    """An all-greedy batch takes a shortcut (lists, one argmax); greedy rows in a batch with a
    sampled row take the general path. Both give the same tokens, acceptances and logprobs."""
    gen = torch.Generator().manual_seed(4)
    rng = random.Random(4)
    vocab = 13
    for _ in range(20):
        ks, logits, _, drafts = random_greedy_case(gen, rng, vocab, max_rows=5)
        greedy = [make_request(f"g{i}", temperature=0.0, logprobs=2) for i in range(len(ks))]
        alone = run(RejectionSampler(), logits, drafts, greedy)
        sampled_logits = torch.randn(3, vocab, generator=gen)
        mixed = run(RejectionSampler(seed=1), torch.cat([logits, sampled_logits]), drafts + [[1, 2]],
                    greedy + [make_request("s", temperature=1.0)])
        assert alone.token_ids == mixed.token_ids[:-1] and alone.num_accepted == mixed.num_accepted[:-1]
        assert alone.logprobs == mixed.logprobs[:-1] and alone.failed == mixed.failed == {}


def test_greedy_all_accepted_emits_k_plus_one_tokens() -> None:
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    argmax = logits.argmax(dim=-1).tolist()
    out = run(RejectionSampler(), logits, [argmax[:3]], [make_request(temperature=0.0)])
    assert out.num_accepted == [3] and out.token_ids == [argmax]


@pytest.mark.parametrize("params", [
    {"repetition_penalty": 1.8},
    {"presence_penalty": 1.5, "frequency_penalty": 0.7},
    {"logit_bias": {4: 2.0, 5: -3.0}},
    {"min_tokens": 4},
    {"min_tokens": 2, "stop_token_ids": [6], "repetition_penalty": 1.3},
])
def test_greedy_with_processing_equals_non_speculative_decoding(params: dict) -> None:
    """Each position's processing must see the drafts before it as output (penalties, min_tokens):
    the emitted tokens equal step-by-step decoding with the normal sampler on the same logits."""
    gen = torch.Generator().manual_seed(2)
    vocab, k = 8, 5
    for trial in range(20):
        logits = torch.randn(k + 1, vocab, generator=gen) * 2
        prompt, output = [1, 4, 4], [5, 2]
        # Drafts: what sequential greedy decoding yields, corrupted now and then, and sometimes EOS.
        sequential, reference = [], make_request(prompt=prompt, output=output, temperature=0.0, **params)
        for j in range(k + 1):
            token = Sampler(vocab)(logits[j:j + 1].clone(), [reference]).token_ids[0]
            sequential.append(token)
            reference.append_output_token(token)
        drafts = list(sequential[:k])
        if trial % 3 == 1:
            drafts[trial % k] = (drafts[trial % k] + 1) % vocab
        if trial % 3 == 2:
            drafts[trial % k] = EOS
        request = make_request(prompt=prompt, output=output, temperature=0.0, **params)
        before = logits.clone()
        out = run(RejectionSampler(), logits, [drafts], [request])
        assert torch.equal(logits, before)  # the target logits are not modified
        accepted = out.num_accepted[0]
        assert out.token_ids[0] == sequential[:accepted + 1]
        expect = 0
        while expect < k and drafts[expect] == sequential[expect]:
            expect += 1
        assert accepted == expect


def test_min_tokens_rejects_an_eos_draft_even_when_it_is_the_raw_argmax() -> None:
    logits = torch.zeros(3, 5)
    logits[:, EOS] = 10.0  # the raw model wants EOS everywhere
    logits[:, 3] = 5.0
    out = run(RejectionSampler(), logits, [[3, EOS]], [make_request(temperature=0.0, min_tokens=2, output=[])])
    # Position 0 bans EOS (0 outputs < 2): 3 is the argmax, accepted; position 1 bans it too (1 < 2).
    assert out.token_ids == [[3, 3]]
    out = run(RejectionSampler(), logits, [[3, EOS]], [make_request(temperature=0.0, min_tokens=1, output=[])])
    assert out.token_ids == [[3, EOS, EOS]]  # from position 1 on (1 output), EOS is allowed


# --------------------------------------------------------------------------- distributions

VOCAB = 5
TRIALS = 20_000


def target_logits_3() -> torch.Tensor:
    """Target logits for positions 0, 1, 2 (context independent): three different distributions."""
    p = torch.tensor([
        [0.50, 0.25, 0.15, 0.07, 0.03],
        [0.05, 0.10, 0.20, 0.25, 0.40],
        [0.30, 0.05, 0.30, 0.05, 0.30],
    ])
    return p.log()


def draft_distributions() -> torch.Tensor:
    """Draft q for positions 0 and 1, chosen to disagree strongly with the target."""
    return torch.tensor([
        [0.02, 0.03, 0.05, 0.30, 0.60],
        [0.60, 0.25, 0.10, 0.04, 0.01],
    ])


def spec_trials(request: Request, logits3: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor,
                seed: int) -> RejectionOutput:
    """TRIALS rows of the same step, k = 2 each, drafts [TRIALS, 2]."""
    logits = logits3.repeat(TRIALS, 1)
    draft_probs = q.repeat(TRIALS, 1) if q is not None else None
    return RejectionSampler(seed=seed)(logits, drafts.reshape(-1), [2] * TRIALS, [request] * TRIALS, draft_probs)


def emitted(out: RejectionOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    first = torch.tensor([t[0] for t in out.token_ids])
    second = torch.tensor([t[1] for t in out.token_ids if len(t) >= 2])
    third = torch.tensor([t[2] for t in out.token_ids if len(t) == 3])
    return first, second, third


def processed_probs(logits3: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    rows = logits3.shape[0]
    filtered = filter_logits(logits3 / temperature, torch.full((rows,), top_k), torch.full((rows,), top_p),
                             torch.zeros(rows))
    return torch.softmax(filtered, dim=-1)


@pytest.mark.parametrize("settings", [
    {"temperature": 1.0},
    {"temperature": 0.7, "top_k": 4},
    {"temperature": 1.3, "top_p": 0.8},
])
def test_draft_model_sampling_preserves_the_target_distribution(settings: dict) -> None:
    logits3 = target_logits_3()
    p = processed_probs(logits3, settings["temperature"], settings.get("top_k", 0), settings.get("top_p", 1.0))
    q = draft_distributions()
    drafts = torch.stack([torch.multinomial(q[j], TRIALS, replacement=True,
                                            generator=torch.Generator().manual_seed(10 + j)) for j in range(2)], 1)
    out = spec_trials(make_request(**settings), logits3, q, drafts, seed=123)
    check_invariants(out, drafts.tolist())
    first, second, third = emitted(out)
    # The first emitted token ~ p0; given the first draft accepted, the second ~ p1; the bonus ~ p2.
    assert_distributed_as(first, p[0], alternative=q[0])
    assert_distributed_as(second, p[1], alternative=q[1])
    assert_distributed_as(third, p[2])
    assert len(second) > 1000 and len(third) > 100  # enough accepted drafts to test the later positions
    # The acceptance rate at position 0 is sum_x min(p, q) (Leviathan et al.), within 4 sigma.
    rate = sum(1 for a in out.num_accepted if a >= 1) / TRIALS
    expected = float(torch.minimum(p[0], q[0]).sum())
    assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / TRIALS)


@pytest.mark.parametrize("settings", [{"temperature": 1.0}, {"temperature": 0.8, "top_k": 3}])
def test_ngram_one_hot_drafts_preserve_the_target_distribution(settings: dict) -> None:
    """q = None (deterministic drafts): accept x with probability p(x), else sample p without x."""
    logits3 = target_logits_3()
    p = processed_probs(logits3, settings["temperature"], settings.get("top_k", 0), settings.get("top_p", 1.0))
    # Fixed drafts per row, skewed towards tokens the target dislikes (with top_k some have p = 0).
    # (Uniform drafts would not do: resampling from p instead of p without x is then unbiased.)
    q = draft_distributions()
    drafts = torch.stack([torch.multinomial(q[j], TRIALS, replacement=True,
                                            generator=torch.Generator().manual_seed(20 + j)) for j in range(2)], 1)
    out = spec_trials(make_request(**settings), logits3, None, drafts, seed=321)
    check_invariants(out, drafts.tolist())
    first, second, third = emitted(out)
    assert_distributed_as(first, p[0], alternative=q[0])
    assert_distributed_as(second, p[1])
    assert_distributed_as(third, p[2])
    # Acceptance at position 0 is p0(x0): check it draft token by draft token (4 sigma).
    for x in range(VOCAB):
        rows = (drafts[:, 0] == x).nonzero().flatten().tolist()
        rate = sum(1 for r in rows if out.num_accepted[r] >= 1) / len(rows)
        px = float(p[0, x])
        assert abs(rate - px) <= 4 * math.sqrt(max(px * (1 - px), 1e-12) / len(rows)) + 1e-12


def test_ngram_draft_that_is_the_most_likely_token() -> None:
    # A fixed draft everywhere (the mode of p0): the first emitted token is still ~ p0.
    logits3 = target_logits_3()
    p = torch.softmax(logits3, dim=-1)
    drafts = torch.zeros(TRIALS, 2, dtype=torch.long)
    out = spec_trials(make_request(temperature=1.0), logits3, None, drafts, seed=9)
    first, second, _ = emitted(out)
    assert_distributed_as(first, p[0])
    assert_distributed_as(second, p[1])


def test_token_with_zero_target_probability_is_never_accepted() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 3)
    request = make_request(temperature=1.0, top_k=1)  # p is one-hot at token 0
    drafts = [[2, 0]]
    q = torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    for seed in range(20):
        out = run(RejectionSampler(seed=seed), logits, drafts, [request], draft_probs=q)
        assert out.token_ids == [[0]] and out.num_accepted == [0]
        out = run(RejectionSampler(seed=seed), logits, drafts, [request])
        assert out.token_ids == [[0]]


def test_sampled_all_accepted_gives_k_plus_one_tokens_and_a_bonus_from_the_last_position() -> None:
    k = 4
    logits = torch.full((k + 1, 6), -1e9)
    drafts = [3, 1, 4, 1]
    for j, x in enumerate(drafts):
        logits[j, x] = 0.0  # p_j is one-hot at the draft: always accepted
    logits[k, 5] = 0.0  # the bonus position wants 5
    for q in (None, torch.softmax(torch.randn(k, 6), dim=-1)):
        out = run(RejectionSampler(seed=1), logits, [drafts], [make_request(temperature=0.9)], draft_probs=q)
        assert out.num_accepted == [k] and out.token_ids == [drafts + [5]]


# --------------------------------------------------------------------------- seeds and batches


def mixed_batch(seed_a: int, seed_b: int) -> tuple[torch.Tensor, list[list[int]], list[Request]]:
    gen = torch.Generator().manual_seed(7)
    drafts = [[1, 2, 3], [], [4, 4], [0, 1, 2, 3, 4]]
    logits = torch.randn(sum(len(d) + 1 for d in drafts), 6, generator=gen)
    requests = [make_request("a", temperature=1.0, seed=seed_a), make_request("g", temperature=0.0),
                make_request("s", temperature=0.8), make_request("b", temperature=1.2, top_p=0.9, seed=seed_b)]
    return logits, drafts, requests


def test_seeded_rows_are_reproducible_and_independent_of_the_batch() -> None:
    results = []
    for shared_seed in (0, 1):  # the shared generator's state must not matter to seeded rows
        logits, drafts, requests = mixed_batch(11, 12)
        results.append(run(RejectionSampler(seed=shared_seed), logits, drafts, requests))
    assert results[0].token_ids[0] == results[1].token_ids[0]
    assert results[0].token_ids[3] == results[1].token_ids[3]
    assert results[0].token_ids[1] == results[1].token_ids[1]  # greedy
    # Row "a" alone gives the same tokens as in the batch.
    logits, drafts, requests = mixed_batch(11, 12)
    alone = run(RejectionSampler(seed=5), logits[:4], drafts[:1], requests[:1])
    assert alone.token_ids[0] == results[0].token_ids[0]
    # Seeded rows over many steps: same seed -> same tokens, different seeds -> different ones.
    def stream(seed: int) -> list[list[int]]:
        request = make_request(temperature=1.0, seed=seed)
        gen = torch.Generator().manual_seed(3)
        out = []
        for _ in range(30):
            logits = torch.randn(4, 50, generator=gen)
            out.append(run(RejectionSampler(), logits, [[1, 2, 3]], [request]).token_ids[0])
        return out
    assert stream(42) == stream(42)
    assert stream(42) != stream(43)


def test_a_seeded_row_without_drafts_samples_what_the_sampler_samples() -> None:
    gen = torch.Generator().manual_seed(4)
    params = {"temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 77}
    spec_request, plain_request = make_request(**params), make_request(**params)
    for _ in range(20):
        logits = torch.randn(1, 64, generator=gen)
        spec = run(RejectionSampler(), logits.clone(), [[]], [spec_request])
        plain = Sampler(64)(logits.clone(), [plain_request])
        assert spec.token_ids == [plain.token_ids] and spec.num_accepted == [0]


def test_shared_generator_rows_are_reproducible_from_the_sampler_seed() -> None:
    logits, drafts, requests = mixed_batch(1, 2)
    a = run(RejectionSampler(generator=torch.Generator().manual_seed(8)), logits, drafts, requests)
    logits, drafts, requests = mixed_batch(1, 2)  # fresh requests: seeded rows advance their generators
    b = run(RejectionSampler(seed=8), logits, drafts, requests)
    assert a.token_ids == b.token_ids and a.num_accepted == b.num_accepted
    check_invariants(a, drafts)


# --------------------------------------------------------------------------- logprobs, errors


def test_logprobs_are_raw_model_logprobs_of_each_emitted_token() -> None:
    gen = torch.Generator().manual_seed(6)
    drafts = [[1, 2], [3], []]
    logits = torch.randn(6, 7, generator=gen)
    logits[0:3] += torch.nn.functional.one_hot(torch.tensor([1, 2, 0]), 7) * 8  # row 0 accepts both
    requests = [make_request("a", temperature=0.0, logprobs=2, repetition_penalty=1.5),
                make_request("b", temperature=1.0, seed=3), make_request("c", temperature=0.5, seed=4, logprobs=0)]
    out = run(RejectionSampler(), logits, drafts, requests)
    assert out.num_accepted[0] == 2
    raw = torch.log_softmax(logits, dim=-1)
    starts = [0, 3, 5]
    assert out.logprobs[1] is None
    for i in (0, 2):
        entries = out.logprobs[i]
        assert entries is not None and len(entries) == len(out.token_ids[i])
        for j, (entry, token) in enumerate(zip(entries, out.token_ids[i])):
            row = raw[starts[i] + j]
            assert entry.token_id == token
            assert entry.logprob == pytest.approx(float(row[token]))
            assert entry.rank == int((row > row[token]).sum()) + 1
            assert len(entry.top) == requests[i].sampling_params.logprobs


def test_bad_inputs_are_refused() -> None:
    sampler, request = RejectionSampler(), make_request(temperature=0.0)
    with pytest.raises(ValueError, match="target_logits"):
        sampler(torch.zeros(2, 4), torch.tensor([1, 2]), [2], [request])
    with pytest.raises(ValueError, match="draft_token_ids"):
        sampler(torch.zeros(3, 4), torch.tensor([1]), [2], [request])
    with pytest.raises(ValueError, match="num_draft_tokens"):
        sampler(torch.zeros(3, 4), torch.tensor([1, 2]), [2, 0], [request])
    with pytest.raises(ValueError, match="num_draft_tokens"):
        sampler(torch.zeros(1, 4), torch.tensor([], dtype=torch.long), [-1], [request])
    with pytest.raises(ValueError, match="draft_probs"):
        sampler(torch.zeros(3, 4), torch.tensor([1, 2]), [2], [request], torch.zeros(2, 5))
    with pytest.raises(ValueError, match="beam search"):
        sampler(torch.zeros(1, 4), torch.tensor([], dtype=torch.long), [0],
                [make_request(use_beam_search=True, n=2, temperature=0.0)])


def test_a_row_whose_processing_raises_fails_alone() -> None:
    class Broken:
        sampling_params = SamplingParams(temperature=0.0, presence_penalty=1.0)
        generator = None
        prompt_token_ids = [1]
        eos_token_ids = frozenset({EOS})
        num_output_tokens = 0

        @property
        def output_token_ids(self) -> list[int]:
            raise RuntimeError("no history")

    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    drafts = [[1, 2], [3]]
    out = run(RejectionSampler(), logits, drafts, [Broken(), make_request(temperature=0.0)])  # type: ignore[list-item]
    assert list(out.failed) == [0] and "no history" in out.failed[0]
    argmax = logits.argmax(dim=-1).tolist()
    assert out.token_ids[1][-1] == argmax[3 + out.num_accepted[1]]


def test_empty_batch() -> None:
    out = RejectionSampler()(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), [], [])
    assert out.token_ids == [] and out.num_accepted == [] and out.logprobs == []
