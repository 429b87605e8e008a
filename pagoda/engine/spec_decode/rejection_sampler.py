"""Verification of draft tokens against the target model: one batched call per step.

Layout of a step (rows = requests that verify drafts; row i proposed k_i >= 0 drafts):
  target_logits  [sum(k_i + 1), V]  row i's positions are contiguous, in row order: position j
                 (0 <= j <= k_i) holds the target's logits for the token after the row's
                 history + drafts[:j]; position k_i is the bonus position.
  draft_token_ids [sum(k_i)]        row i's drafts, contiguous, in row order.
  draft_probs    [sum(k_i), V] or None: the draft distribution q each draft was sampled from
                 (after the same temperature/top-k/top-p processing); None = deterministic
                 drafts (n-gram), i.e. q is one-hot at the draft token.

The target distribution p at each position is the one the normal sampler (worker/sampler.py)
would sample from there, built from its own functions: logit bias, min_tokens and penalties
(`apply_logit_processors`, with the row's output extended by the drafts before the position,
so penalties and min_tokens see exactly what a non-speculative run would have seen), then for
sampled rows temperature -> `filter_logits` (top-k, top-p, min-p) -> softmax.

Rules (per row, the row's emitted tokens are drafts[:a] + [t], 0 <= a <= k_i, so 1..k_i+1 tokens):
  greedy rows  : a = the longest prefix of drafts equal to argmax(p_j); t = argmax(p_a).
                 Same tokens as non-speculative greedy decoding (up to the numerics of the
                 verification forward pass).
  sampled rows : draft j is accepted iff u_j * q_j(x_j) < p_j(x_j), u_j ~ U[0, 1), which has
                 probability min(1, p_j(x_j) / q_j(x_j)) (never accepts a token with p = 0);
                 on the first rejection t ~ normalize(max(0, p_a - q_a)) (with one-hot q: p_a
                 without the draft token, renormalized); if all are accepted t ~ p_{k_i}.
                 Every emitted token is then distributed as the target would sample it
                 (Leviathan et al. 2023, Chen et al. 2023).

Randomness: as in the sampler, noise is drawn on the CPU from CPU generators. A row with its
own generator (a seeded request) draws, in this fixed order, k_i uniforms then V exponentials
(the final token is argmax(dist / E), the sampler's exponential race), whatever happens;
so its tokens depend only on its seed, its drafts and its logits. With k_i = 0 that is exactly
the sampler's draw: a row without drafts gets the token the sampler would give it. Rows
without a generator share one draw of the uniforms and one of the exponentials.

Logprobs, like the sampler's: of the raw model distribution (log_softmax of target_logits,
before any processing), for each emitted token at the position it was emitted from, for the
rows that ask for them (logprobs set, or best_of > n).

Not handled here (refused or left to the caller): beam search rows (ValueError), grammar
bitmasks (structured outputs: the caller must not speculate for those rows), stop tokens
among the emitted tokens (the engine truncates after a stop token / max_tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence

import torch

from pagoda.core.scheduler_output import describe_error
from pagoda.request import TokenLogprobs
from pagoda.worker.sampler import SamplingPlan, apply_logit_processors, argmax_rows, filter_logits, token_logprobs

if TYPE_CHECKING:
    from pagoda.sampling_params import SamplingParams


class SpecRow(Protocol):
    """What is read of a row: the fields of `Request` / worker `RowState` the sampler reads."""

    sampling_params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    eos_token_ids: frozenset[int]

    @property
    def num_output_tokens(self) -> int: ...

    @property
    def output_token_ids(self) -> list[int]: ...


@dataclass
class RejectionOutput:
    """Per row. Invariants: len(token_ids[i]) == num_accepted[i] + 1 and
    token_ids[i][:num_accepted[i]] == row i's first num_accepted[i] drafts."""

    token_ids: list[list[int]]
    num_accepted: list[int]
    # One TokenLogprobs per emitted token (raw model logprobs, top `params.logprobs`) for rows
    # that want logprobs; None for the others.
    logprobs: list[list[TokenLogprobs] | None]
    # Rows whose own processing (logit bias, penalties, logprobs) raised: row -> the error as
    # text; their other entries are meaningless.
    failed: dict[int, str] = field(default_factory=dict)


class _DraftPrefixView:
    """A row as it would be after its first j drafts were appended: what
    `apply_logit_processors` reads (penalties and min_tokens count the drafts)."""

    __slots__ = ("_request", "_drafts", "sampling_params", "prompt_token_ids", "eos_token_ids",
                 "num_output_tokens")

    def __init__(self, request: SpecRow, drafts: list[int]):
        self._request = request
        self._drafts = drafts
        self.sampling_params = request.sampling_params
        self.prompt_token_ids = request.prompt_token_ids
        self.eos_token_ids = request.eos_token_ids
        self.num_output_tokens = request.num_output_tokens + len(drafts)

    @property
    def output_token_ids(self) -> list[int]:
        return list(self._request.output_token_ids) + self._drafts


def _segments(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenation of arange(starts[r], starts[r] + lengths[r]) over r (int64, CPU)."""
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long)
    offsets = torch.cumsum(lengths, 0) - lengths
    return torch.repeat_interleave(starts - offsets, lengths) + torch.arange(total)


class RejectionSampler:
    def __init__(self, generator: torch.Generator | None = None, seed: int = 0):
        """`generator`: the shared generator for rows without their own (pass the Sampler's,
        `Sampler.generator`, to keep one stream); a new one seeded with `seed` if None."""
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)

    def __call__(self, target_logits: torch.Tensor, draft_token_ids: torch.Tensor,
                 num_draft_tokens: Sequence[int], requests: Sequence[SpecRow],
                 draft_probs: torch.Tensor | None = None,
                 plan: SamplingPlan | None = None) -> RejectionOutput:
        """See the module docstring for the layout and the rules. `plan`: the rows' SamplingPlan
        (one entry per row, not per position), built here when not given. `target_logits` is
        not modified."""
        ks = [int(k) for k in num_draft_tokens]
        num_rows = len(requests)
        _check_inputs(target_logits, draft_token_ids, ks, num_rows, draft_probs)
        plan = plan if plan is not None else SamplingPlan.from_rows(list(requests))
        if plan.beam_rows:
            raise ValueError(f"beam search rows cannot verify drafts (rows {plan.beam_rows})")
        device = target_logits.device
        vocab = target_logits.shape[1]
        drafts = draft_token_ids.reshape(-1).to(device=device, dtype=torch.long)
        draft_list = drafts.tolist()
        ds, ts = [], []  # row i's first draft index, and its first position in target_logits
        start = 0
        for i, k in enumerate(ks):
            ds.append(start)
            ts.append(start + i)
            start += k

        failed: dict[int, str] = {}
        logits = self._process(target_logits, requests, plan.processing_rows, ks, ds, ts, draft_list, failed)
        if not plan.random_rows:
            return self._greedy(target_logits, logits, requests, plan, ks, ds, ts, draft_list, failed)
        k_t = torch.tensor(ks, dtype=torch.long)
        draft_start = torch.tensor(ds, dtype=torch.long)
        target_start = torch.tensor(ts, dtype=torch.long)

        # Acceptance of every draft, greedy and sampled rows alike; [num_drafts] bool.
        accept = torch.zeros(len(draft_list), dtype=torch.bool, device=device)
        target_argmax = argmax_rows(logits)
        random_set = set(plan.random_rows)
        greedy_rows = [i for i in range(num_rows) if i not in random_set]
        if greedy_rows:
            rows = torch.tensor(greedy_rows, dtype=torch.long)
            d_idx = _segments(draft_start[rows], k_t[rows]).to(device)
            t_idx = _segments(target_start[rows], k_t[rows]).to(device)
            accept[d_idx] = drafts[d_idx] == target_argmax[t_idx]

        random_rows = plan.random_rows
        if random_rows:
            rows = torch.tensor(random_rows, dtype=torch.long)
            r_k = k_t[rows]
            probs = self._target_probs(logits, plan, rows, target_start[rows], r_k + 1)
            uniforms, noise = self._draws(requests, random_rows, ks, vocab)
            # Draft j of random row r sits at probs row prob_start[r] + j.
            prob_start = torch.cumsum(r_k + 1, 0) - (r_k + 1)
            d_idx = _segments(draft_start[rows], r_k).to(device)
            p_idx = _segments(prob_start, r_k).to(device)
            x = drafts[d_idx]
            p_x = probs[p_idx, x]
            q_x = draft_probs[d_idx, x].to(p_x.dtype) if draft_probs is not None else torch.ones_like(p_x)
            accept[d_idx] = uniforms.to(device=device, dtype=p_x.dtype) * q_x < p_x

        # Accepted prefix length per row: cumprod over a [rows, max k] matrix padded with False.
        max_k = max(ks, default=0)
        num_accepted = torch.zeros(num_rows, dtype=torch.long, device=device)
        if max_k:
            row_of = torch.repeat_interleave(torch.arange(num_rows), k_t).to(device)
            col = (torch.arange(len(draft_list)) - torch.repeat_interleave(draft_start, k_t)).to(device)
            grid = torch.zeros(num_rows, max_k, dtype=torch.long, device=device)
            grid[row_of, col] = accept.long()
            num_accepted = grid.cumprod(dim=1).sum(dim=1)

        # The token at the first rejection (or the bonus): argmax for greedy rows, a draw for others.
        final = target_argmax[target_start.to(device) + num_accepted]
        if random_rows:
            rows_d = rows.to(device)
            acc = num_accepted[rows_d]
            dist = probs[prob_start.to(device) + acc]
            rejected = acc < r_k.to(device)
            if bool(rejected.any()):
                # Draft index of the rejected draft (clamped for rows that accepted all; unused there).
                at = (draft_start.to(device)[rows_d] + acc).clamp(max=max(len(draft_list) - 1, 0))
                if draft_probs is not None:
                    q = draft_probs[at].to(dist.dtype)
                else:
                    q = torch.zeros_like(dist).scatter_(1, drafts[at].unsqueeze(1), 1.0)
                residual = (dist - q).clamp(min=0.0)
                # p <= q everywhere means p == q: rejection then only comes from rounding; keep p.
                use = rejected & (residual.sum(dim=1) > 0)
                dist = torch.where(use.unsqueeze(1), residual, dist)
            final[rows_d] = (dist / noise.to(device=device, dtype=dist.dtype)).argmax(dim=-1)

        accepted_list = num_accepted.tolist()
        final_list = final.tolist()
        token_ids = [draft_list[ds[i]:ds[i] + accepted_list[i]] + [final_list[i]] for i in range(num_rows)]
        logprobs = self._logprobs(target_logits, requests, plan.logprob_rows, ts, token_ids, failed)
        return RejectionOutput(token_ids, accepted_list, logprobs, failed)

    def _greedy(self, target_logits: torch.Tensor, logits: torch.Tensor, requests: Sequence[SpecRow],
                plan: SamplingPlan, ks: list[int], ds: list[int], ts: list[int], draft_list: list[int],
                failed: dict[int, str]) -> RejectionOutput:
        """Every row greedy (the common case): the same rule as the general path (a draft is
        accepted while it equals the target's argmax; then the argmax at the first rejection,
        or the bonus), on one argmax call and Python lists instead of ~30 small tensor ops."""
        target = argmax_rows(logits).tolist()
        token_ids, accepted = [], []
        for i, k in enumerate(ks):
            n = 0
            while n < k and draft_list[ds[i] + n] == target[ts[i] + n]:
                n += 1
            accepted.append(n)
            token_ids.append(draft_list[ds[i]:ds[i] + n] + [target[ts[i] + n]])
        logprobs = self._logprobs(target_logits, requests, plan.logprob_rows, ts, token_ids, failed)
        return RejectionOutput(token_ids, accepted, logprobs, failed)

    @staticmethod
    def _process(target_logits: torch.Tensor, requests: Sequence[SpecRow], rows: list[int], ks: list[int],
                 ds: list[int], ts: list[int], draft_list: list[int], failed: dict[int, str]) -> torch.Tensor:
        """Logit bias, min_tokens and penalties at every position of the rows that need them,
        each position seeing the row's output extended by the drafts before it."""
        if not rows:
            return target_logits
        views: list[_DraftPrefixView | None] = [None] * target_logits.shape[0]
        positions: list[int] = []
        row_of: dict[int, int] = {}
        for i in rows:
            for j in range(ks[i] + 1):
                views[ts[i] + j] = _DraftPrefixView(requests[i], draft_list[ds[i]:ds[i] + j])
                positions.append(ts[i] + j)
                row_of[ts[i] + j] = i
        failed_positions: dict[int, str] = {}
        logits = apply_logit_processors(target_logits, views, failed_positions, positions)  # type: ignore[arg-type]
        for position, error in sorted(failed_positions.items()):
            failed.setdefault(row_of[position], error)
        return logits

    @staticmethod
    def _target_probs(logits: torch.Tensor, plan: SamplingPlan, rows: torch.Tensor,
                      starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """p at every position of the sampled rows, as the sampler's `_sample` computes it:
        temperature -> top-k / top-p / min-p -> softmax. [sum(counts), V]."""
        device = logits.device
        positions = _segments(starts, counts).to(device)
        per_position = torch.repeat_interleave(rows, counts)
        sub = logits[positions]
        sub = sub / plan.temperature[per_position].to(device=device, dtype=sub.dtype).unsqueeze(1)
        sub = filter_logits(sub, plan.top_k[per_position].to(device),
                            plan.top_p[per_position].to(device=device, dtype=sub.dtype),
                            plan.min_p[per_position].to(device=device, dtype=sub.dtype))
        return torch.softmax(sub, dim=-1)

    def _draws(self, requests: Sequence[SpecRow], random_rows: list[int], ks: list[int],
               vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """CPU float32 uniforms [sum of the rows' k] (row order) and exponentials [rows, V].
        A row with its own generator draws its k uniforms then its V exponentials from it."""
        offsets = [0]
        for i in random_rows:
            offsets.append(offsets[-1] + ks[i])
        uniforms = torch.empty(offsets[-1], dtype=torch.float32)
        noise = torch.empty(len(random_rows), vocab, dtype=torch.float32)
        shared = [r for r, i in enumerate(random_rows) if requests[i].generator is None]
        if shared:
            drawn = torch.rand(sum(ks[random_rows[r]] for r in shared), generator=self.generator)
            at = 0
            for r in shared:
                k = ks[random_rows[r]]
                uniforms[offsets[r]:offsets[r] + k] = drawn[at:at + k]
                at += k
            noise[shared] = torch.empty(len(shared), vocab).exponential_(generator=self.generator)
        for r, i in enumerate(random_rows):
            generator = requests[i].generator
            if generator is not None:
                uniforms[offsets[r]:offsets[r + 1]] = torch.rand(ks[i], generator=generator)
                noise[r].exponential_(generator=generator)
        return uniforms, noise

    @staticmethod
    def _logprobs(target_logits: torch.Tensor, requests: Sequence[SpecRow], rows: list[int], ts: list[int],
                  token_ids: list[list[int]], failed: dict[int, str]) -> list[list[TokenLogprobs] | None]:
        out: list[list[TokenLogprobs] | None] = [None] * len(requests)
        for i in rows:
            if i in failed:
                continue
            try:
                k = requests[i].sampling_params.logprobs or 0
                raw = torch.log_softmax(target_logits[ts[i]:ts[i] + len(token_ids[i])], dim=-1)
                out[i] = [token_logprobs(raw[j], token, k) for j, token in enumerate(token_ids[i])]
            except Exception as error:  # noqa: BLE001 - this row's logprobs failed: it fails alone
                failed[i] = describe_error(error)
        return out


def _check_inputs(target_logits: torch.Tensor, draft_token_ids: torch.Tensor, ks: list[int],
                  num_rows: int, draft_probs: torch.Tensor | None) -> None:
    if len(ks) != num_rows:
        raise ValueError(f"num_draft_tokens has {len(ks)} entries for {num_rows} rows")
    if any(k < 0 for k in ks):
        raise ValueError(f"num_draft_tokens must be >= 0, got {ks}")
    num_drafts = sum(ks)
    if target_logits.dim() != 2 or target_logits.shape[0] != num_drafts + num_rows:
        raise ValueError(f"target_logits must be [sum(k_i + 1) = {num_drafts + num_rows}, vocab], "
                         f"got {tuple(target_logits.shape)}")
    if draft_token_ids.numel() != num_drafts:
        raise ValueError(f"draft_token_ids must hold sum(k_i) = {num_drafts} ids, got {draft_token_ids.numel()}")
    if draft_probs is not None and tuple(draft_probs.shape) != (num_drafts, target_logits.shape[1]):
        raise ValueError(f"draft_probs must be [{num_drafts}, {target_logits.shape[1]}], "
                         f"got {tuple(draft_probs.shape)}")
