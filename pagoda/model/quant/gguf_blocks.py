"""GGUF quantized blocks kept as they are in the file, and their exact decoding.

A `GGUFBlocks` is one GGUF tensor's raw bytes, ``[rows, bytes_per_row]`` uint8, in
HF row order (llama.cpp's q/k rope row permutation already undone: it moves whole
rows, and a block never spans rows). Only the types in `PACKED_GGUF_TYPES` travel
this way; the loader dequantizes every other type to float.

Block layouts (ggml-common.h), 32 weights per block:
- Q4_0: ``d: f16, qs: 16 bytes``; ``w = d * (q - 8)``
- Q4_1: ``d: f16, m: f16, qs: 16 bytes``; ``w = d * q + m``
with ``q`` in [0, 15]: element ``j < 16`` is the low nibble of ``qs[j]``, element
``j + 16`` its high nibble.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType

BLOCK = 32
PACKED_GGUF_TYPES = frozenset({GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1})
_BLOCK_BYTES = {GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20}


@dataclass(frozen=True)
class GGUFBlocks:
    """One quantized tensor's blocks; ``shape`` is the HF ``(out_features, in_features)``."""

    qtype: GGMLQuantizationType
    data: torch.Tensor  # uint8 [rows, bytes_per_row]
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        rows, cols = self.shape
        if self.qtype not in PACKED_GGUF_TYPES:
            raise ValueError(f"GGUF type {self.qtype.name} is not kept packed; supported: "
                             f"{sorted(t.name for t in PACKED_GGUF_TYPES)}.")
        if cols % BLOCK or tuple(self.data.shape) != (rows, cols // BLOCK * _BLOCK_BYTES[self.qtype]):
            raise ValueError(f"GGUF {self.qtype.name} data of shape {tuple(self.data.shape)} does not "
                             f"hold a {rows}x{cols} tensor.")


@dataclass(frozen=True)
class Int4Codes:
    """``w[n, k] = scale[n, g] * q[n, k] + offset[n, g]``, ``g = k // group_size``.

    ``q`` in [0, 15] (uint8 [N, K]); ``scale`` and ``offset`` float32 [N, K // group_size].
    """

    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    group_size: int

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        return self.q.float() * self.scale.repeat_interleave(g, 1) + self.offset.repeat_interleave(g, 1)

    @staticmethod
    def cat(parts: list[Int4Codes]) -> Int4Codes:
        """Row concatenation (a fused projection's shards)."""
        sizes = {p.group_size for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"shards have different group sizes {sorted(sizes)}.")
        return Int4Codes(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                         torch.cat([p.offset for p in parts]), sizes.pop())


def decode_blocks(blocks: GGUFBlocks) -> Int4Codes:
    """The exact codes, scales and offsets of Q4_0/Q4_1 blocks (no rounding anywhere)."""
    rows, cols = blocks.shape
    raw = blocks.data.numpy().reshape(rows, cols // BLOCK, _BLOCK_BYTES[blocks.qtype])
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if blocks.qtype == GGMLQuantizationType.Q4_1:
        offset = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = raw[..., 4:20]
    else:
        offset = -8.0 * d  # exact: a power-of-two multiple of a float16 value, held in float32
        qs = raw[..., 2:18]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)
    return Int4Codes(torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(d.copy()),
                     torch.from_numpy(np.ascontiguousarray(offset)), BLOCK)
