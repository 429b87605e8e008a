"""The ``torch`` attention backend: paged attention in plain torch, correct on CPU and CUDA.

The reference every other backend is tested against.

The KV cache of one layer is two tensors of shape
[num_blocks, block_size, num_kv_heads, head_dim]: a block is one contiguous
piece of memory, and a token's slot is block_id * block_size + offset.
Keys are gathered whole blocks at a time (a plain row copy, measured ~2x
faster than gathering per token or per head), then seen as
[batch, heads, keys, head_dim] through a transpose.

Grouped-query attention never repeats K/V: the query heads that share a KV
head are folded into the query-length axis, so SDPA sees `num_kv_heads`
heads on both sides. For decodes the `group` query heads of one KV head
become `group` query rows; for a prefill chunk of `q` tokens they become
`group * q` rows with the causal mask tiled `group` times.

Decodes of similar length are batched into one SDPA call (`DecodeGroup`);
the metadata builder sorts decode rows by length to form the groups, so the
runner may hand them over in any order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pagoda.model.attention.backend import AttentionBackend
from pagoda.model.attention.metadata import AttentionMetadata, StepLayout

# A decode group may pad its keys to at most this much more than it holds.
_MAX_PADDING_RATIO = 1.25


@dataclass
class PrefillChunk:
    query_start: int  # index of the chunk's first token in the step's token list
    query_len: int
    context_len: int  # tokens of this request already in the cache before the chunk
    # The request's block table; None when context_len == 0 (keys and
    # values come straight from this step's tokens).
    key_blocks: torch.Tensor | None
    # [group * query_len, context_len + query_len] bool, True where attention
    # is allowed: the causal mask tiled once per query head sharing a KV head.
    causal_mask: torch.Tensor

    @property
    def seq_len(self) -> int:
        return self.context_len + self.query_len


@dataclass
class DecodeGroup:
    """Decodes of similar sequence length, attended to in one batched call.

    Keys are gathered whole blocks at a time and padded to the longest
    sequence of the group; grouping by length keeps that padding small.
    """

    # The group's decode tokens in the step's token list (a decode's token index is its
    # row): a slice when they are consecutive in the group's order, else an index tensor.
    tokens: slice | torch.Tensor
    count: int
    # [count, num_blocks] block tables; shorter ones padded with block 0.
    block_tables: torch.Tensor
    # [count, 1, 1, num_blocks * block_size] bool, True for real keys; None if none is padding.
    key_mask: torch.Tensor | None


@dataclass
class TorchAttentionMetadata(AttentionMetadata):
    backend: AttentionBackend
    # [num_tokens] cache slot (block * block_size + offset) each token's K/V is written to.
    slot_mapping: torch.Tensor
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self, query_group: int):
        # Query heads per KV head: prefill masks are tiled this many times.
        self.query_group = query_group

    def build_metadata(self, layout: StepLayout) -> TorchAttentionMetadata:
        meta = TorchAttentionMetadata(backend=self, slot_mapping=layout.slot_mapping)
        meta.decode_groups = _decode_groups(layout)
        meta.prefills = _prefill_chunks(layout, self.query_group)
        return meta

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        return paged_attention(q, k, v, k_cache, v_cache, meta, scale)


def _decode_groups(layout: StepLayout) -> list[DecodeGroup]:
    """Decode rows sorted longest first, cut into groups of similar length."""
    device = layout.block_tables.device
    bs = layout.block_size
    order = sorted(range(layout.num_decodes), key=lambda r: -layout.seq_lens[r])
    groups = []
    start = 0
    for count in _group_by_length([layout.seq_lens[r] for r in order]):
        rows = order[start : start + count]
        start += count
        seq_lens = [layout.seq_lens[r] for r in rows]
        num_blocks = -(-seq_lens[0] // bs)  # longest first
        if rows == list(range(rows[0], rows[0] + count)):
            tokens: slice | torch.Tensor = slice(rows[0], rows[0] + count)
            tables = layout.block_tables[tokens, :num_blocks]
        else:
            tokens = torch.tensor(rows, dtype=torch.long, device=device)
            tables = layout.block_tables.index_select(0, tokens)[:, :num_blocks]
        key_mask = None
        if any(n != num_blocks * bs for n in seq_lens):
            key_positions = torch.arange(num_blocks * bs, device=device).unsqueeze(0)
            lens = torch.tensor(seq_lens, device=device).unsqueeze(1)
            key_mask = (key_positions < lens).view(count, 1, 1, num_blocks * bs)
        groups.append(DecodeGroup(tokens, count, tables, key_mask))
    return groups


def _prefill_chunks(layout: StepLayout, query_group: int) -> list[PrefillChunk]:
    device = layout.block_tables.device
    chunks = []
    query_start = sum(layout.query_lens[: layout.num_decodes])
    for row in range(layout.num_decodes, layout.num_rows):
        query_len, seq_len = layout.query_lens[row], layout.seq_lens[row]
        context_len = seq_len - query_len
        seq = torch.arange(seq_len, device=device)
        mask = seq.unsqueeze(0) <= seq[context_len:].unsqueeze(1)
        if query_group > 1:
            mask = mask.repeat(query_group, 1)
        num_blocks = -(-seq_len // layout.block_size)
        key_blocks = layout.block_tables[row, :num_blocks] if context_len > 0 else None
        chunks.append(PrefillChunk(query_start, query_len, context_len, key_blocks, mask))
        query_start += query_len
    return chunks


def _group_by_length(seq_lens: list[int]) -> list[int]:
    """Splits lengths sorted longest-first into runs whose padded size
    (count x longest) stays within _MAX_PADDING_RATIO of their real size."""
    counts: list[int] = []
    i = 0
    while i < len(seq_lens):
        longest, total, j = seq_lens[i], 0, i
        while j < len(seq_lens) and longest * (j - i + 1) <= _MAX_PADDING_RATIO * (total + seq_lens[j]):
            total += seq_lens[j]
            j += 1
        counts.append(j - i)
        i = j
    return counts


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """k, v: [N, KVH, D] written at `slots` of caches [blocks, block_size, KVH, D]."""
    _, _, kv_heads, head_dim = k_cache.shape
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, v)


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[blocks, bs, KVH, D] x [B, nb] block ids -> [B, KVH, nb * bs, D] (a view of one copy)."""
    _, block_size, kv_heads, head_dim = cache.shape
    batch, num_blocks = block_tables.shape
    gathered = cache.index_select(0, block_tables.reshape(-1))  # [B*nb, bs, KVH, D]
    return gathered.view(batch, num_blocks * block_size, kv_heads, head_dim).transpose(1, 2)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: TorchAttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [N, H, D]; k, v: [N, KVH, D] for this step's tokens. Returns [N, H * D].

    Writes this step's K/V into the cache first, so every request then finds
    its whole sequence there.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)

    out = torch.empty(num_tokens, num_heads * head_dim, dtype=q.dtype, device=q.device)
    for dg in meta.decode_groups:
        n = dg.count
        qd = q[dg.tokens].view(n, num_kv_heads, group, head_dim)
        kd = gather_blocks(k_cache, dg.block_tables)  # [n, KVH, L, D]
        vd = gather_blocks(v_cache, dg.block_tables)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=dg.key_mask, scale=scale)
        out[dg.tokens] = od.reshape(n, num_heads * head_dim)
    for chunk in meta.prefills:
        out[chunk.query_start : chunk.query_start + chunk.query_len] = _prefill_chunk(
            q, k, v, k_cache, v_cache, chunk, num_kv_heads, group, scale
        )
    return out


def _prefill_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    chunk: PrefillChunk,
    num_kv_heads: int,
    group: int,
    scale: float,
) -> torch.Tensor:
    s, n = chunk.query_start, chunk.query_len
    head_dim = q.shape[-1]
    if chunk.key_blocks is None:
        keys = k[s : s + n].transpose(0, 1).unsqueeze(0)  # [1, KVH, n, D]
        values = v[s : s + n].transpose(0, 1).unsqueeze(0)
    else:
        tables = chunk.key_blocks.unsqueeze(0)
        keys = gather_blocks(k_cache, tables)[:, :, : chunk.seq_len]
        values = gather_blocks(v_cache, tables)[:, :, : chunk.seq_len]
    # [n, KVH*G, D] -> [1, KVH, G*n, D]: row g*n + i is query head (kvh, g) at token i.
    qc = q[s : s + n].view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(
        1, num_kv_heads, group * n, head_dim
    )
    o = F.scaled_dot_product_attention(qc, keys, values, attn_mask=chunk.causal_mask, scale=scale)
    # [1, KVH, G*n, D] -> [n, KVH*G*D]
    return o.view(num_kv_heads, group, n, head_dim).permute(2, 0, 1, 3).reshape(n, -1)
