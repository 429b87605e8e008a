"""Paged attention in plain torch, correct on CPU and CUDA.

The KV cache of one layer is two tensors of shape
[num_blocks * block_size, num_kv_heads, head_dim], indexed by slot.

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
    k_cache.index_copy_(0, slots, k)
    v_cache.index_copy_(0, slots, v)


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
        kd = k_cache[dg.key_slots].transpose(1, 2)  # [n, KVH, L, D]
        vd = v_cache[dg.key_slots].transpose(1, 2)
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
    if chunk.key_slots is None:
        keys, values = k[s : s + n], v[s : s + n]
    else:
        keys, values = k_cache[chunk.key_slots], v_cache[chunk.key_slots]
    # [n, KVH*G, D] -> [KVH, G*n, D]: row g*n + i is query head (kvh, g) at token i.
    qc = q[s : s + n].view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(
        1, num_kv_heads, group * n, head_dim
    )
    mask = chunk.causal_mask if group == 1 else chunk.causal_mask.repeat(group, 1)
    o = F.scaled_dot_product_attention(
        qc, keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0), attn_mask=mask, scale=scale
    )
    # [1, KVH, G*n, D] -> [n, KVH*G*D]
    return o.view(num_kv_heads, group, n, head_dim).permute(2, 0, 1, 3).reshape(n, -1)
