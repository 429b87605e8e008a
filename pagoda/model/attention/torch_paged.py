"""Paged attention in plain torch, correct on CPU and CUDA.

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagoda.model.attention.metadata import AttentionMetadata, PrefillChunk


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
    meta: AttentionMetadata,
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
        s, n = dg.start, dg.count
        qd = q[s : s + n].view(n, num_kv_heads, group, head_dim)
        kd = gather_blocks(k_cache, dg.block_tables)  # [n, KVH, L, D]
        vd = gather_blocks(v_cache, dg.block_tables)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=dg.key_mask, scale=scale)
        out[s : s + n] = od.reshape(n, num_heads * head_dim)
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
