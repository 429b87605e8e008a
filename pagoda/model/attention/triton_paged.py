"""The ``triton`` attention backend: Triton kernels that read K/V blocks in place (GPU).

Three kernels, all reading the cache layout every backend shares,
``[num_blocks, block_size, num_kv_heads, head_dim]``:

- ``_write_kv_kernel``: one program per new token copies its K and V rows (every KV head)
  into its slot. A negative slot is skipped: CUDA-graph padding rows use slot -1
  (worker/cuda_graphs.py), so a padded batch never writes over a real block.
- ``_paged_attention_kernel``: decodes and prefill chunks over a cached prefix alike (the
  shape of vLLM's unified Triton attention), launched at most twice a step: over the
  decode rows (rows [0, num_decodes), a program per row, key range and KV head), and over
  the prefill rows (a program per entry of a flat (row, query tile) list and KV head). A
  program's ``BLOCK_M`` query rows are every query head of its KV head for every token of
  its tile (GQA without repeating K/V), and it walks the row's keys ``TILE_N`` at a time,
  finding each key's block in the row's block table (so any block size works), with an
  online softmax in fp32. Query token ``i`` of a row sees keys
  ``0 .. seq_len - query_len + i`` (causal within the chunk).
- Split-K (flash-decoding) for decode rows: with few decode rows and long contexts the
  decode launch has too few programs for the GPU, so each decode row's keys are cut into
  ``num_splits`` ranges, each writing an unnormalised partial result (acc, max, sum) in
  fp32, and ``_merge_splits_kernel`` combines them. The ranges are computed in the kernel
  from the row's ``seq_len``, so a fixed split count serves any length (CUDA graphs).

Accumulation is fp32 for every cache dtype (fp32, bf16, fp16); probabilities are rounded
to the value dtype for the P.V product (as SDPA's flash kernels do). fp32 caches use
IEEE fp32 dot products (no TF32), so fp32 results match the torch reference tightly.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, read when this module is imported: the kernels are decorated
then), which is how it is tested without a GPU (tests/kernels/test_triton_attention.py).
The interpreter's ``tl.dot`` multiplies bfloat16 operands as their raw 16-bit patterns
(Triton 3.9), so under the interpreter bf16 operands are widened to fp32 (exactly: the
products are the same) before each dot; compiled kernels use bf16 dots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagoda.model.attention.backend import AttentionBackend
from pagoda.model.attention.metadata import AttentionMetadata, StepLayout

# Programs the decode launch should have before splitting is not worth it: a couple of
# waves on a large GPU (an H100/H200 has 132 SMs).
_TARGET_PROGRAMS = 256
# A split covers at least this many keys (below that the merge costs more than it saves).
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 32


def interpreter_active() -> bool:
    """Whether these kernels were built for Triton's interpreter (they then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and _INTERPRETED


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_KV_HEADS: tl.constexpr, KV_HEADS_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:  # -1: a padding row (CUDA graphs) that owns no slot
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        h = tl.arange(0, KV_HEADS_P2)
        d = tl.arange(0, HEAD_DIM_P2)
        mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)
        k = tl.load(k_ptr + token * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
        v = tl.load(v_ptr + token * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
        k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + h[:, None] * stride_kch + d[None, :]
        v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + h[:, None] * stride_vch + d[None, :]
        tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
    tile_map_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    scale,
    stride_qt, stride_qh, stride_ot,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_bt,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE_DOT: tl.constexpr,
    WIDEN_DOT: tl.constexpr, TILE_MAP: tl.constexpr,
):
    if TILE_MAP:  # prefill launch: program 0-axis i is query tile tile_map[i] = (row, tile)
        row = tl.load(tile_map_ptr + 2 * tl.program_id(0))
        q_tile = tl.load(tile_map_ptr + 2 * tl.program_id(0) + 1)
    else:  # decode launch: program 0-axis is the row, 1-axis the key range
        row = tl.program_id(0)
        q_tile = 0
    split = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + row)
    query_len = tl.load(query_start_loc_ptr + row + 1) - q_start
    if q_tile * BLOCK_Q < query_len:  # else a tile past this row's queries: nothing to do
        seq_len = tl.load(seq_lens_ptr + row)
        context_len = seq_len - query_len

        BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P2
        offs_m = tl.arange(0, BLOCK_M)
        q_index = q_tile * BLOCK_Q + offs_m // GROUP_P2  # query token within the row
        g = offs_m % GROUP_P2
        head = kv_head * GROUP + g
        m_valid = (q_index < query_len) & (g < GROUP)
        offs_d = tl.arange(0, HEAD_DIM_P2)
        d_valid = offs_d < HEAD_DIM
        token = (q_start + q_index).to(tl.int64)
        q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=m_valid[:, None] & d_valid[None, :], other=0.0)
        query_pos = context_len + q_index
        if WIDEN_DOT:  # the interpreter's tl.dot multiplies bf16's raw bits: widen (exactly) first
            q = q.to(tl.float32)

        # Keys this tile needs: up to its last query's position.
        num_keys = context_len + tl.minimum((q_tile + 1) * BLOCK_Q, query_len)
        if NUM_SPLITS == 1:
            key_start = 0
            key_end = num_keys
        else:
            tiles_per_split = tl.cdiv(tl.cdiv(num_keys, TILE_N), NUM_SPLITS)
            key_start = split * tiles_per_split * TILE_N
            key_end = tl.minimum(key_start + tiles_per_split * TILE_N, num_keys)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], dtype=tl.float32)
        offs_n = tl.arange(0, TILE_N)
        table = block_tables_ptr + row.to(tl.int64) * stride_bt
        for start in range(key_start, key_end, TILE_N):
            key_pos = start + offs_n
            n_valid = key_pos < key_end
            block = tl.load(table + key_pos // BLOCK_SIZE, mask=n_valid, other=0).to(tl.int64)
            within = key_pos % BLOCK_SIZE
            kv_mask = n_valid[:, None] & d_valid[None, :]
            k = tl.load(k_cache_ptr + block[:, None] * stride_kcb + within[:, None] * stride_kcs
                        + kv_head * stride_kch + offs_d[None, :], mask=kv_mask, other=0.0)
            if WIDEN_DOT:
                k = k.to(tl.float32)
            if IEEE_DOT:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale
            allowed = n_valid[None, :] & (key_pos[None, :] <= query_pos[:, None])
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A query row with no allowed key yet (padding rows) keeps -inf: shift by 0 instead.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_shift[:, None])
            alpha = tl.exp(m_i - m_shift)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + block[:, None] * stride_vcb + within[:, None] * stride_vcs
                        + kv_head * stride_vch + offs_d[None, :], mask=kv_mask, other=0.0)
            if WIDEN_DOT:  # p rounded to bf16 as on the GPU, then both widened
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
            elif IEEE_DOT:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        store_mask = m_valid[:, None] & d_valid[None, :]
        if NUM_SPLITS == 1:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * HEAD_DIM + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=store_mask)
        else:
            # Partials are [tokens, heads, splits] (x head_dim for acc), contiguous fp32.
            part = (token * NUM_HEADS + head) * NUM_SPLITS + split
            tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=store_mask)
            tl.store(part_max_ptr + part, m_i, mask=m_valid)
            tl.store(part_sum_ptr + part, l_i, mask=m_valid)


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, stride_ot,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    s_valid = offs_s < NUM_SPLITS
    d_valid = offs_d < HEAD_DIM
    part = (token * NUM_HEADS + head) * NUM_SPLITS + offs_s
    m = tl.load(part_max_ptr + part, mask=s_valid, other=float("-inf"))
    l_s = tl.load(part_sum_ptr + part, mask=s_valid, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=s_valid[:, None] & d_valid[None, :], other=0.0)
    m_all = tl.max(m, 0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all))  # empty splits weigh nothing
    total = tl.sum(l_s * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + token * stride_ot + head * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=d_valid)


_INTERPRETED = not isinstance(_write_kv_kernel, triton.runtime.JITFunction)


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def decode_splits(num_decodes: int, num_kv_heads: int, max_seq_len: int) -> int:
    """Ranges to cut each decode row's keys into: enough programs to fill the GPU when the
    decode batch alone is small, never fewer than _MIN_KEYS_PER_SPLIT keys per range."""
    programs = max(num_decodes * num_kv_heads, 1)
    if programs >= _TARGET_PROGRAMS:
        return 1
    by_length = max_seq_len // _MIN_KEYS_PER_SPLIT
    return max(1, min(_MAX_SPLITS, -(-_TARGET_PROGRAMS // programs), by_length))


@dataclass
class TritonAttentionMetadata(AttentionMetadata):
    backend: AttentionBackend
    slot_mapping: torch.Tensor  # [num_tokens] int64; -1 = write nothing (padding)
    block_tables: torch.Tensor  # [rows, max_blocks] int32
    query_start_loc: torch.Tensor  # [rows + 1] int32
    seq_lens: torch.Tensor  # [rows] int32
    num_rows: int
    num_decodes: int  # rows [0, num_decodes) have one query token each
    num_splits: int  # split-K ranges for the decode rows (1: no split)
    # Prefill rows' query tiles, [tiles, 2] int32 (row, tile index) on the device: the prefill
    # launch has one program per tile (x KV head), however unequal the chunks.
    prefill_tiles: torch.Tensor | None = None


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self, num_heads: int, num_kv_heads: int, num_splits: int = 0):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        # 0: decided per step from the decode batch (decode_splits); > 0 forces it (tests, graphs).
        self.num_splits = num_splits

    def build_metadata(self, layout: StepLayout) -> TritonAttentionMetadata:
        decodes = layout.num_decodes
        if self.num_splits > 0:
            splits = self.num_splits
        else:
            longest = max(layout.seq_lens[:decodes], default=0)
            splits = decode_splits(decodes, self.num_kv_heads, longest) if decodes else 1
        return TritonAttentionMetadata(
            backend=self,
            slot_mapping=layout.slot_mapping,
            block_tables=layout.block_tables.to(torch.int32).contiguous(),
            query_start_loc=layout.query_start_loc.to(torch.int32).contiguous(),
            seq_lens=layout.seq_lens_tensor.to(torch.int32).contiguous(),
            num_rows=layout.num_rows,
            num_decodes=decodes,
            num_splits=splits,
            prefill_tiles=self._prefill_tiles(layout) if decodes < layout.num_rows else None,
        )

    def _prefill_tiles(self, layout: StepLayout) -> torch.Tensor:
        block_q, _ = _tile_shape(self.num_heads // self.num_kv_heads, 0, decode=False)
        counts = [-(-n // block_q) for n in layout.query_lens[layout.num_decodes:]]
        tiles = torch.empty(sum(counts), 2, dtype=torch.int32)
        tiles[:, 0] = torch.repeat_interleave(torch.arange(layout.num_decodes, layout.num_rows, dtype=torch.int32),
                                              torch.tensor(counts))
        tiles[:, 1] = torch.cat([torch.arange(c, dtype=torch.int32) for c in counts])
        return tiles.to(layout.block_tables.device, non_blocking=True)

    def forward(self, q, k, v, k_cache, v_cache, meta: TritonAttentionMetadata, scale):
        write_kv_triton(k_cache, v_cache, k, v, meta.slot_mapping)
        return paged_attention_triton(q, k_cache, v_cache, meta, scale)


def write_kv_triton(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    slots: torch.Tensor) -> None:
    """k, v: [N, KVH, D] (last dim contiguous) written at `slots` of caches [blocks, bs, KVH, D];
    a negative slot writes nothing."""
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    if k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(2) != 1:
        v = v.contiguous()
    _, block_size, kv_heads, head_dim = k_cache.shape
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=kv_heads, KV_HEADS_P2=_p2(kv_heads), HEAD_DIM=head_dim, HEAD_DIM_P2=_p2(head_dim),
        BLOCK_SIZE=block_size,
    )


def _tile_shape(group: int, head_dim: int, decode: bool) -> tuple[int, int]:
    """(query tokens a program takes, keys a loop step takes) for a launch.

    A program's query rows are `block_q` tokens x every query head of its KV head (GQA group,
    padded to a power of two): 16 rows for decodes (the smallest tensor-core tile; one token,
    the rest masked), 64 for prefill tiles. Keys per loop step: bigger loads for decodes
    (memory-bound), smaller for prefill tiles (registers: 64 x head_dim fp32 accumulators)."""
    group_p2 = _p2(group)
    block_m = max(16 if decode else 64, group_p2)
    tile_n = 64 if decode and head_dim <= 128 else 32
    return block_m // group_p2, tile_n


def _launch(out, q, k_cache, v_cache, meta, scale, grid, decode, splits, tile_map, parts):
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = num_heads // kv_heads
    block_q, tile_n = _tile_shape(group, head_dim, decode)
    part_acc, part_max, part_sum = parts
    _paged_attention_kernel[grid](
        out, q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
        tile_map, part_acc, part_max, part_sum,
        float(scale),
        q.stride(0), q.stride(1), out.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        meta.block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, GROUP_P2=_p2(group), HEAD_DIM=head_dim, HEAD_DIM_P2=_p2(head_dim),
        BLOCK_SIZE=block_size, BLOCK_Q=block_q, TILE_N=tile_n, NUM_SPLITS=splits,
        IEEE_DOT=q.dtype == torch.float32, WIDEN_DOT=_INTERPRETED and q.dtype == torch.bfloat16,
        TILE_MAP=tile_map.numel() > 0,
    )


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: TritonAttentionMetadata, scale: float) -> torch.Tensor:
    """q: [N, H, D] (last dim contiguous). Returns [N, H * D] in q's dtype. The step's K/V must
    already be in the cache.

    Two launches of the one kernel at most: the decode rows (tokens [0, num_decodes)), one
    program per (row, key range, KV head), merged afterwards when split; then the prefill
    rows, one program per (query tile, KV head)."""
    if q.stride(2) != 1:
        q = q.contiguous()
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    out = torch.empty(num_tokens, num_heads * head_dim, dtype=q.dtype, device=q.device)
    if meta.num_rows == 0 or num_tokens == 0:
        return out
    none = q.new_empty(0, dtype=torch.float32)
    no_map = meta.seq_lens.new_empty(0)
    decodes, splits = meta.num_decodes, max(meta.num_splits, 1)
    if decodes and splits == 1:
        _launch(out, q, k_cache, v_cache, meta, scale, (decodes, 1, kv_heads), True, 1, no_map, (none, none, none))
    elif decodes:  # split-K: partial results per key range, then merged
        part_acc = torch.empty(decodes, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        part_max = torch.empty(decodes, num_heads, splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty(decodes, num_heads, splits, dtype=torch.float32, device=q.device)
        _launch(out, q, k_cache, v_cache, meta, scale, (decodes, splits, kv_heads), True, splits, no_map,
                (part_acc, part_max, part_sum))
        _merge_splits_kernel[(decodes, num_heads)](
            out, part_acc, part_max, part_sum, out.stride(0),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_DIM_P2=_p2(head_dim), NUM_SPLITS=splits,
            SPLITS_P2=_p2(splits),
        )
    tiles = meta.prefill_tiles
    if tiles is not None and tiles.shape[0]:
        _launch(out, q, k_cache, v_cache, meta, scale, (tiles.shape[0], 1, kv_heads), False, 1, tiles,
                (none, none, none))
    return out
