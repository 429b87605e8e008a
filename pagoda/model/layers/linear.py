"""Linear layers whose weight storage and matmul come from a linear method.

A `Linear` is built like ``nn.Linear`` with a float ``weight`` parameter, which is
what float checkpoints load into (fused projections take their shards as row
ranges, ``shard_sizes``). A GGUF method may instead hand it the file's quantized
blocks per shard (`load_gguf_shard`). After loading, the model's linear method
(`pagoda.model.quant.methods`) calls `set_packed` on each layer.

Invariant: after `set_packed`, ``weight`` is None: the layer keeps only its packed
form (integers and scales), never a float copy of the weights.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.model.quant.gguf_blocks import GGUFBlocks


class PackedWeight(Protocol):
    """A packed weight form (`pagoda.model.quant.packed`): ``matmul(x) = x @ W.T``."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor: ...

    @property
    def nbytes(self) -> int: ...


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 shard_sizes: list[int] | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.shard_sizes = tuple(shard_sizes or [out_features])
        if sum(self.shard_sizes) != out_features:
            raise ValueError(f"shard_sizes {self.shard_sizes} do not add up to out_features={out_features}.")
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed: PackedWeight | None = None
        # shard index -> the checkpoint's quantized blocks, until the method packs them.
        self.gguf_shards: dict[int, GGUFBlocks] = {}
        # Multi-LoRA (model/lora/layers.py): this layer's adapter slots, or None. The delta is
        # added only while the step's LoRA context is active (some token of the step has an adapter).
        self.lora = None

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """(first row, number of rows) of shard ``shard`` in the fused weight."""
        return sum(self.shard_sizes[:shard]), self.shard_sizes[shard]

    def load_gguf_shard(self, shard: int, blocks: GGUFBlocks, name: str) -> None:
        expected = (self.shard_sizes[shard], self.in_features)
        if tuple(blocks.shape) != expected:
            raise ValueError(f"checkpoint tensor {name!r} has shape {blocks.shape}, expected {expected}.")
        self.gguf_shards[shard] = blocks

    def set_packed(self, packed: PackedWeight) -> None:
        self.packed = packed
        self.weight = None
        self.gguf_shards = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            y = F.linear(x, self.weight, self.bias)
        else:
            y = self.packed.matmul(x)
            y = y if self.bias is None else y + self.bias
        lora = self.lora
        if lora is not None and lora.context.active:
            y = lora.apply(x, y)
        return y

    def extra_repr(self) -> str:
        kind = type(self.packed).__name__ if self.packed is not None else "float"
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, weight={kind}"


class PackedEmbedding(nn.Module):
    """An embedding lookup on a tied lm_head's int8 rows (no float table kept).

    ``rows(ids, dtype)`` dequantizes only the looked-up rows: a few KB per step.
    """

    def __init__(self, table, dtype: torch.dtype):
        super().__init__()
        self.table = table  # an Int8Weight shared with the lm_head
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids, self.dtype)
