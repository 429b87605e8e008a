"""Batched sampling: one pass over the logits of every request that samples.

Order of operations (HF's, so greedy-with-penalties matches transformers):
logit_bias -> min_tokens mask -> repetition / presence / frequency penalties
-> greedy argmax, or temperature -> top-k -> top-p -> min-p -> sample.

Logprobs are always those of the raw model distribution (before any of the
above), like vLLM's default and OpenAI's.

Beam search requests are not sampled: they report their top candidates
(log_softmax(logits / temperature), EOS masked before min_tokens) for the
engine's beam group to choose from.

Randomness: a request with a seed draws from its own generator, one draw
per token, so its tokens do not depend on what else is in the batch.

Failures: the per-row work (logit processors, beam candidates, logprobs)
is guarded row by row: a row that raises is reported in `failed` and the
batch goes on. An exception in the batched part (the draw) fails the
whole call; the engine then finds the culprit (engine/llm_engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pagoda.core.scheduler_output import describe_error
from pagoda.request import TokenLogprobs
from pagoda.sampling_params import SamplingType

if TYPE_CHECKING:  # the rows sampled are the worker's view of requests (worker/input_batch.py)
    from pagoda.worker.input_batch import RowState as Request


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    # Beam search rows: (token id, logprob) best first; None for sampled rows (and their
    # token_ids entry is meaningless).
    beam_candidates: list[list[tuple[int, float]] | None] | None = None
    # Rows whose own processing raised: row -> the error, as text (their other entries are meaningless).
    failed: dict[int, str] = field(default_factory=dict)


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0):
        self.vocab_size = vocab_size
        # Shared generator for requests without a seed (no global RNG state).
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits: [len(requests), vocab] float32 (any device)."""
        # best_of > n ranks samples by cumulative logprob, so it needs the sampled token's.
        want_logprobs = [r.sampling_params.logprobs is not None or r.sampling_params.num_samples > r.sampling_params.n
                         for r in requests]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        failed: dict[int, str] = {}
        beam_candidates = beam_search_candidates(logits, requests, failed)

        logits = apply_logit_processors(logits, requests, failed)
        greedy = logits.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(requests) if r.sampling_params.sampling_type == SamplingType.RANDOM
                       and not r.sampling_params.use_beam_search]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            sampled = self._sample(logits[rows], [requests[i] for i in random_rows])
            greedy[rows] = sampled
        token_ids = greedy.tolist()

        logprobs: list[TokenLogprobs | None] = [None] * len(requests)
        if raw_logprobs is not None:
            for i, request in enumerate(requests):
                if want_logprobs[i] and not request.sampling_params.use_beam_search and i not in failed:
                    try:
                        logprobs[i] = token_logprobs(raw_logprobs[i], token_ids[i],
                                                     request.sampling_params.logprobs or 0)
                    except Exception as error:  # noqa: BLE001 - this row's logprobs failed: it fails alone
                        failed[i] = describe_error(error)
        return SamplerOutput(token_ids, logprobs, beam_candidates, failed)

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        params = [r.sampling_params for r in requests]
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=device, dtype=logits.dtype)
        logits = logits / temperature.unsqueeze(1)
        top_k = torch.tensor([p.top_k if p.top_k > 0 else 0 for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device, dtype=logits.dtype)
        min_p = torch.tensor([p.min_p for p in params], device=device, dtype=logits.dtype)
        logits = filter_logits(logits, top_k, top_p, min_p)
        probs = torch.softmax(logits, dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p. The noise is drawn
        # on the CPU, from CPU generators, so a seed gives the same tokens on every device.
        noise = torch.empty(probs.shape, dtype=probs.dtype)
        for i, request in enumerate(requests):
            noise[i].exponential_(generator=request.generator or self.generator)
        return (probs / noise.to(device)).argmax(dim=-1)


def beam_search_candidates(logits: torch.Tensor, requests: list[Request],
                           failed: dict[int, str] | None = None) -> list | None:
    """Per row: the beam's top `num_beam_candidates` (token, logprob) for beam search requests, else None.
    A row that raises is recorded in `failed` (if given; else the error propagates)."""
    rows = [i for i, r in enumerate(requests) if r.sampling_params.use_beam_search]
    if not rows:
        return None
    candidates: list[list[tuple[int, float]] | None] = [None] * len(requests)
    for i in rows:
        request = requests[i]
        try:
            params = request.sampling_params
            scores = torch.log_softmax(logits[i] / params.beam_temperature, dim=-1)
            if request.num_output_tokens < params.min_tokens and request.stop_token_set:
                scores[torch.tensor(sorted(request.stop_token_set), device=scores.device)] = float("-inf")
            values, ids = scores.topk(min(request.num_beam_candidates, scores.shape[-1]))
            candidates[i] = list(zip(ids.tolist(), values.tolist()))
        except Exception as error:
            if failed is None:
                raise
            failed[i] = describe_error(error)
    return candidates


def apply_logit_processors(logits: torch.Tensor, requests: list[Request],
                           failed: dict[int, str] | None = None) -> torch.Tensor:
    """Logit bias, min_tokens and penalties; returns a new tensor when it changes anything.
    A row that raises is recorded in `failed` (if given; else the error propagates) and its
    logits are left unprocessed."""
    if not any(_needs_processing(r) for r in requests):
        return logits
    logits = logits.clone()
    for i, request in enumerate(requests):
        if not _needs_processing(request):
            continue
        try:
            logits[i] = _processed_row(logits[i], request)  # written back whole, or not at all
        except Exception as error:
            if failed is None:
                raise
            failed[i] = describe_error(error)
    return logits


def _processed_row(row: torch.Tensor, request: Request) -> torch.Tensor:
    row = row.clone()
    p = request.sampling_params
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias.keys()), device=row.device)
        row[ids] += torch.tensor(list(p.logit_bias.values()), device=row.device, dtype=row.dtype)
    if request.num_output_tokens < p.min_tokens:
        banned = set(p.stop_token_ids or ())
        if not p.ignore_eos:
            banned |= request.eos_token_ids
        if banned:
            row[torch.tensor(sorted(banned), device=row.device)] = float("-inf")
    if p.needs_penalties:
        row = apply_penalties(
            row, request.prompt_token_ids, request.output_token_ids,
            p.repetition_penalty, p.presence_penalty, p.frequency_penalty,
        )
    return row


def _needs_processing(request: Request) -> bool:
    p = request.sampling_params
    return bool(p.logit_bias) or p.needs_penalties or request.num_output_tokens < p.min_tokens


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids: list[int],
    output_ids: list[int],
    repetition: float,
    presence: float,
    frequency: float,
) -> torch.Tensor:
    """One row. Repetition (HF/CTRL): over prompt+output, logit/p if > 0 else logit*p.
    Presence/frequency (OpenAI): over output only, logit -= presence*[count>0] + frequency*count.
    """
    logits = logits.clone()
    if repetition != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), device=logits.device, dtype=torch.long)
        if seen.numel():
            score = logits[seen]
            logits[seen] = torch.where(score < 0, score * repetition, score / repetition)
    if (presence or frequency) and output_ids:
        counts = torch.zeros_like(logits)
        ids = torch.tensor(output_ids, device=logits.device, dtype=torch.long)
        counts.scatter_add_(0, ids, torch.ones_like(ids, dtype=logits.dtype))
        logits -= frequency * counts + presence * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Sets filtered-out entries to -inf. Per row: top_k (0 = off), top_p (1 = off), min_p (0 = off).

    top-p keeps the smallest set of most likely tokens whose probability sums
    to at least top_p (the token that crosses the threshold is kept).
    """
    if bool((top_k == 0).all()) and bool((top_p >= 1.0).all()) and bool((min_p <= 0.0).all()):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    remove = ranks >= k
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    remove |= probs < (min_p.unsqueeze(1) * probs[:, :1])
    remove[:, 0] = False  # the most likely token always survives
    mask = torch.zeros_like(remove).scatter_(1, order, remove)
    return logits.masked_fill(mask, float("-inf"))


def token_logprobs(row_logprobs: torch.Tensor, token_id: int, k: int) -> TokenLogprobs:
    """The chosen token's logprob and rank (1 = most likely) plus the top k."""
    chosen = row_logprobs[token_id]
    rank = int((row_logprobs > chosen).sum()) + 1
    top: dict[int, float] = {}
    if k > 0:
        values, ids = row_logprobs.topk(k)
        top = dict(zip(ids.tolist(), values.tolist()))
    return TokenLogprobs(token_id=token_id, logprob=float(chosen), rank=rank, top=top)
