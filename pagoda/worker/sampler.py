"""Batched sampling: one pass over the logits of every request that samples.

Order of operations (HF's, so greedy-with-penalties matches transformers):
grammar bitmask (structured outputs: forbidden tokens to -inf) -> logit_bias -> min_tokens mask -> repetition / presence / frequency penalties
-> greedy argmax, or temperature -> top-k -> top-p -> min-p -> sample.

Logprobs are always those of the raw model distribution (before any of the
above), like vLLM's default and OpenAI's.

Beam search requests are not sampled: they report their top candidates
(log_softmax(logits / temperature), EOS masked before min_tokens) for the
engine's beam group to choose from.

Randomness: a request with a seed draws from its own generator, one draw
per token, so its tokens do not depend on what else is in the batch. On the
CPU the noise comes from CPU generators (the row's, or the sampler's shared
one). On a GPU it is drawn on the device, never copied over: a seeded
request gets a device generator seeded with its seed (made at its first draw,
kept while its CPU generator lives), the rest share one device generator
seeded like the CPU one; a seed then reproduces its tokens on that device
(another device type, or the CPU, draws other noise).

Failures: the per-row work (logit processors, beam candidates, logprobs)
is guarded row by row: a row that raises is reported in `failed` and the
batch goes on. An exception in the batched part (the draw) fails the
whole call; the engine then finds the culprit (engine/llm_engine.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pagoda.core.scheduler_output import describe_error
from pagoda.kernels import cpu_ext
from pagoda.request import TokenLogprobs
from pagoda.sampling_params import SamplingType

if TYPE_CHECKING:  # the rows sampled are the worker's view of requests (worker/input_batch.py)
    from pagoda.core.worker_step import GrammarBitmask
    from pagoda.worker.input_batch import RowState as Request


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for ``x[M, N]``, equal to torch's (first index of the maximum; the
    first NaN if any): on the CPU, float32 rows go to pagoda's op (csrc/cpu/argmax.cpp, ~8x
    faster than torch's at the default model's 49,152 logits), elsewhere torch's."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] > 0 and x.stride(1) == 1:
        ops = cpu_ext.cpu_ops()
        if ops is not None and hasattr(ops, "argmax_rows"):
            return ops.argmax_rows(x)
    return x.argmax(dim=-1)


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
        self.seed = seed
        # Shared generator for requests without a seed (no global RNG state).
        self.generator = torch.Generator().manual_seed(seed)
        # Off the CPU: the shared device generator per device, and each seeded request's device
        # generator, found from its CPU generator (gone when the request's is).
        self._device_generators: dict[torch.device, torch.Generator] = {}
        self._request_device_generators = DeviceGeneratorTable()

    def __call__(self, logits: torch.Tensor, requests: list[Request],
                 plan: SamplingPlan | None = None, grammar: GrammarBitmask | None = None) -> SamplerOutput:
        """logits: [len(requests), vocab] float32 (any device). `plan`: the rows' sampling
        parameters as tensors and index lists (the worker's persistent batch builds it with
        array operations); built here, row by row, when not given. `grammar`: the step's
        structured-output bitmask; it changes `logits` in place, after the raw logprobs."""
        plan = plan if plan is not None else SamplingPlan.from_rows(requests)
        failed: dict[int, str] = {}
        if plan.plain_greedy:  # the common path: one argmax, nothing per row
            if grammar is not None:
                _apply_grammar(logits, grammar, requests, failed)
            return SamplerOutput(argmax_rows(logits).tolist(), [None] * len(requests), None, failed)
        # best_of > n ranks samples by cumulative logprob, so it needs the sampled token's.
        raw_logprobs = torch.log_softmax(logits, dim=-1) if plan.logprob_rows else None
        beam_candidates = beam_search_candidates(logits, requests, failed, plan.beam_rows) if plan.beam_rows else None
        if grammar is not None:  # beam search takes no grammar (refused by SamplingParams)
            _apply_grammar(logits, grammar, requests, failed)

        logits = apply_logit_processors(logits, requests, failed, plan.processing_rows)
        greedy = argmax_rows(logits)
        if plan.random_rows:
            rows = torch.tensor(plan.random_rows, device=logits.device)
            sampled = self._sample(logits[rows], plan, [requests[i] for i in plan.random_rows])
            greedy[rows] = sampled
        token_ids = greedy.tolist()

        logprobs: list[TokenLogprobs | None] = [None] * len(requests)
        for i in plan.logprob_rows:
            if i in failed:
                continue
            try:
                logprobs[i] = token_logprobs(raw_logprobs[i], token_ids[i], requests[i].sampling_params.logprobs or 0)
            except Exception as error:  # noqa: BLE001 - this row's logprobs failed: it fails alone
                failed[i] = describe_error(error)
        return SamplerOutput(token_ids, logprobs, beam_candidates, failed)

    def _sample(self, logits: torch.Tensor, plan: SamplingPlan, requests: list[Request]) -> torch.Tensor:
        device = logits.device
        rows = plan.random_rows
        logits = logits / plan.temperature[rows].to(device=device, dtype=logits.dtype).unsqueeze(1)
        logits = filter_logits(logits, plan.top_k[rows].to(device),
                               plan.top_p[rows].to(device=device, dtype=logits.dtype),
                               plan.min_p[rows].to(device=device, dtype=logits.dtype))
        probs = torch.softmax(logits, dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p. Rows with a seed
        # draw from their own generator, one row at a time; the others share one draw from
        # the engine's generator. On the CPU from CPU generators; elsewhere on the device.
        own = [i for i, request in enumerate(requests) if request.generator is not None]
        if device.type == "cpu":
            noise = torch.empty(probs.shape, dtype=probs.dtype)
            if len(own) < len(requests):
                noise.exponential_(generator=self.generator)
            for i in own:
                noise[i].exponential_(generator=requests[i].generator)
            return argmax_rows(probs / noise)
        noise = torch.empty(probs.shape, dtype=probs.dtype, device=device)
        if len(own) < len(requests):
            noise.exponential_(generator=self._shared_device_generator(device))
        for i in own:
            noise[i].exponential_(generator=self._request_device_generator(requests[i], device))
        return argmax_rows(probs / noise)

    def _shared_device_generator(self, device: torch.device) -> torch.Generator:
        generator = self._device_generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(self.seed)
            self._device_generators[device] = generator
        return generator

    def _request_device_generator(self, request: Request, device: torch.device) -> torch.Generator:
        """The seeded request's generator on `device`: seeded with its seed at its first draw."""
        generator = self._request_device_generators.get(request.generator)
        # Compared by type: a generator made on device("cuda") reports device("cuda", 0).
        if generator is None or generator.device.type != device.type:
            seed = request.sampling_params.seed
            if seed is None:  # a generator without a seed: continue from the CPU one's state
                seed = int(torch.randint(0, 2**63 - 1, (1,), generator=request.generator))
            generator = torch.Generator(device=device).manual_seed(seed)
            self._request_device_generators.put(request.generator, generator)
        return generator


def _held_only_here(entries: dict, alone: int) -> list:
    """Keys whose first tuple item has no reference but the entry's (refcount <= `alone`)."""
    return [key for key, (held, _) in entries.items() if sys.getrefcount(held) <= alone]


def _alone_count() -> int:
    """What sys.getrefcount reads in `_held_only_here` for an object nothing else holds (it
    counts the tuple's reference, the loop's and the call's; interpreters differ: 3.14 borrows
    the loop's), measured once with a probe."""
    probe = {0: (object(), None)}
    for threshold in range(1, 8):  # the count the loop reads for the probe
        if _held_only_here(probe, threshold):
            return threshold
    raise RuntimeError("cannot measure reference counts on this interpreter")


_ALONE = _alone_count()


class DeviceGeneratorTable:
    """Seeded requests' device generators, found from their CPU generators and dropped with them.

    torch.Generator takes weak references only from torch 2.13 on (2.11 refuses them), so the
    table keys entries by id() and holds each CPU generator itself, which keeps its id from being
    reused while the entry lives. An entry whose CPU generator nothing else holds belongs to a
    request that has ended (the worker drops its generator then); sweeps drop those entries,
    whenever the table has doubled since the last sweep and before it is counted."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[torch.Generator, torch.Generator]] = {}
        self._sweep_at = 64

    def get(self, cpu_generator: torch.Generator) -> torch.Generator | None:
        entry = self._entries.get(id(cpu_generator))
        return entry[1] if entry is not None else None

    def put(self, cpu_generator: torch.Generator, device_generator: torch.Generator) -> None:
        self._entries[id(cpu_generator)] = (cpu_generator, device_generator)
        if len(self._entries) >= self._sweep_at:
            self.sweep()
            self._sweep_at = max(64, 2 * len(self._entries))

    def sweep(self) -> None:
        for key in _held_only_here(self._entries, _ALONE):
            del self._entries[key]

    def __len__(self) -> int:
        self.sweep()
        return len(self._entries)


def _apply_grammar(logits: torch.Tensor, grammar: GrammarBitmask, requests: list[Request],
                   failed: dict[int, str]) -> None:
    """The grammar bitmask, in place; a row whose grammar allows no token fails (nothing valid can follow)."""
    from pagoda.structured_output.bitmask import apply_grammar_bitmask  # xgrammar, only when used

    for i in apply_grammar_bitmask(logits, grammar, requests):
        failed[i] = ("structured outputs: the grammar allows no token here; this model's vocabulary cannot "
                     "continue the constrained output")


@dataclass
class SamplingPlan:
    """What sampling a batch of rows takes, decided once per step: parameter tensors [rows]
    and the rows (indices into the batch) each optional stage applies to."""

    temperature: torch.Tensor  # float32
    top_k: torch.Tensor  # int64, 0 = off
    top_p: torch.Tensor  # float32
    min_p: torch.Tensor  # float32
    random_rows: list[int]  # sampled (temperature > 0, not beam search)
    beam_rows: list[int]  # beam search: report candidates
    logprob_rows: list[int]  # want the sampled token's logprob (logprobs asked for, or best_of > n)
    processing_rows: list[int]  # logit bias, penalties, or min_tokens still banning stop tokens

    @property
    def plain_greedy(self) -> bool:
        return not (self.random_rows or self.beam_rows or self.logprob_rows or self.processing_rows)

    @staticmethod
    def from_rows(requests: list[Request]) -> SamplingPlan:
        params = [r.sampling_params for r in requests]
        beams = [p.use_beam_search for p in params]
        return SamplingPlan(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
            top_k=torch.tensor([p.top_k if p.top_k > 0 else 0 for p in params], dtype=torch.int64),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
            min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32),
            random_rows=[i for i, p in enumerate(params) if p.sampling_type == SamplingType.RANDOM and not beams[i]],
            beam_rows=[i for i, beam in enumerate(beams) if beam],
            logprob_rows=[i for i, p in enumerate(params)
                          if (p.logprobs is not None or p.num_samples > p.n) and not beams[i]],
            processing_rows=[i for i, r in enumerate(requests) if _needs_processing(r)],
        )


def beam_search_candidates(logits: torch.Tensor, requests: list[Request],
                           failed: dict[int, str] | None = None, rows: list[int] | None = None) -> list | None:
    """Per row: the beam's top `num_beam_candidates` (token, logprob) for beam search requests, else None.
    A row that raises is recorded in `failed` (if given; else the error propagates). `rows`: the
    beam search rows, if the caller knows them."""
    if rows is None:
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
                           failed: dict[int, str] | None = None, rows: list[int] | None = None) -> torch.Tensor:
    """Logit bias, min_tokens and penalties; returns a new tensor when it changes anything.
    A row that raises is recorded in `failed` (if given; else the error propagates) and its
    logits are left unprocessed. `rows`: the rows that need it, if the caller knows them."""
    if rows is None:
        rows = [i for i, r in enumerate(requests) if _needs_processing(r)]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        request = requests[i]
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
