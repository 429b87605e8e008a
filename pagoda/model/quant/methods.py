"""Linear methods: how a model's `Linear` layers store and multiply their weights.

One method per format, chosen once at load (`resolve_quantization`):

| method | linear layers | lm_head (and a tied embedding) |
|---|---|---|
| ``none``  | float weights in the engine dtype (the reference) | float |
| ``gguf``  | Q4_0/Q4_1 blocks repacked exactly into int4 groups of 32; other GGUF types dequantized, then int8 per row; weight-only kernels (small models: W8A8 on o_proj/gate_up_proj in large batches and prompts) | int8 per row, weight-only |
| ``int8``  | float checkpoint quantized to int8 per output row: weight-only at small M, W8A8 at large M (fastest batches, +3% perplexity) | int8 per row, same dispatch |
| ``int4``  | float checkpoint quantized to asymmetric int4 groups of 32; weight-only kernels | int8 per row, weight-only |

The tied embedding of a quantized model looks its rows up in the lm_head's int8
table (`PackedEmbedding`), so no float copy of the 28M-parameter table is kept.
An untied embedding stays float (a lookup reads only a few rows per step).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from pagoda.config import QUANTIZATION_CHOICES, ConfigError, cpu_has_fast_bf16
from pagoda.model.layers.linear import Linear, PackedEmbedding
from pagoda.model.quant.gguf_blocks import PACKED_GGUF_TYPES, Int4Codes, decode_blocks
from pagoda.model.quant.packed import W8A8_LAYERS, Int4Weight, Int8Weight, gemv_q8_activations, w8a8_fast

logger = logging.getLogger(__name__)

# Models whose linear weights take at most this much in bf16 also keep a bf16 copy of
# them for large batches (packed.py): the packed weight-only kernels are slower than a bf16
# matmul there, and W8A8 on every layer costs 3% perplexity. On CPUs with int8 dot products
# the W8A8_LAYERS keep int8 rows for W8A8 instead (packed.W8A8_LAYERS). Memory is what it
# costs (the default 135M model: +~150 MiB). Larger models stay packed at every size.
DENSE_COPY_MAX_BYTES = 1 << 30

class LinearMethod:
    """Packs a loaded `Linear` (``process``); ``gguf_types``: GGUF types the loader keeps packed."""

    name = "none"
    gguf_types: frozenset = frozenset()

    def process(self, layer: Linear, role: str | None = None) -> str:
        """Packs ``layer`` in place; returns what it became (for the load summary). ``role``: the
        layer's name in its block ("qkv_proj", "down_proj", ...), which decides whether pagoda's
        GEMV quantizes its activations to int8 (`pagoda.model.quant.packed.GEMV_Q8_ACTIVATIONS`)."""
        return "float"


class FloatMethod(LinearMethod):
    name = "none"


class GGUFMethod(LinearMethod):
    """Keeps Q4_0/Q4_1 blocks packed; any other type arrives as float and becomes int8."""

    name = "gguf"
    gguf_types = PACKED_GGUF_TYPES

    def process(self, layer: Linear, role: str | None = None) -> str:
        if len(layer.gguf_shards) == len(layer.shard_sizes):
            codes = Int4Codes.cat([decode_blocks(layer.gguf_shards[i]) for i in range(len(layer.shard_sizes))])
            layer.set_packed(Int4Weight.from_codes(codes, q8=gemv_q8_activations(4, role)))
            return "int4 (GGUF blocks)"
        # Some shard arrived as float (F16/Q8_0/K-quants dequantized by the loader):
        # put the packed shards' exact values next to them and use int8 rows.
        with torch.no_grad():
            for shard, blocks in layer.gguf_shards.items():
                start, rows = layer.shard_rows(shard)
                layer.weight[start:start + rows].copy_(decode_blocks(blocks).dequantize())
        layer.set_packed(Int8Weight.quantize(layer.weight, q8=gemv_q8_activations(8, role)))
        return "int8 (from float)"


class Int8Method(LinearMethod):
    name = "int8"

    def process(self, layer: Linear, role: str | None = None) -> str:
        layer.set_packed(Int8Weight.quantize(layer.weight, w8a8_at_large_m=True))
        return "int8"


class Int4Method(LinearMethod):
    name = "int4"

    def process(self, layer: Linear, role: str | None = None) -> str:
        if layer.in_features % 32:
            layer.set_packed(Int8Weight.quantize(layer.weight, q8=gemv_q8_activations(8, role)))
            return "int8 (in_features not a multiple of 32)"
        layer.set_packed(Int4Weight.quantize(layer.weight, group_size=32, q8=gemv_q8_activations(4, role)))
        return "int4"


METHODS: dict[str, type[LinearMethod]] = {
    "none": FloatMethod, "gguf": GGUFMethod, "int8": Int8Method, "int4": Int4Method,
}


def resolve_quantization(value: str | None, *, source_kind: str, load_format: str,
                         device: torch.device, dtype: torch.dtype) -> LinearMethod:
    """The linear method for ``value`` ('auto', 'none'/None, 'gguf', 'int8', 'int4').

    'auto' is the rule measured in docs/quantization.md: a GGUF file on a CPU with
    native bf16 (AVX512-BF16 or AMX) at dtype bf16 (what dtype='auto' gives there)
    runs ``gguf`` (2-3x faster decode, perplexity within 1% of the float model);
    everything else runs float weights, as loaded.
    """
    if value is not None and value not in QUANTIZATION_CHOICES:
        raise ConfigError("quantization", value, f"must be one of {', '.join(QUANTIZATION_CHOICES)} (or None)")
    if value is None:
        value = "none"
    if value == "auto":
        packed_ok = (source_kind == "gguf" and load_format != "dummy" and device.type == "cpu"
                     and dtype == torch.bfloat16 and cpu_has_fast_bf16())
        value = "gguf" if packed_ok else "none"
    if value != "none" and device.type != "cpu":
        raise ConfigError("quantization", value, f"quantized linear layers run on the CPU only, not {device.type}")
    if value == "gguf" and (source_kind != "gguf" or load_format == "dummy"):
        raise ConfigError("quantization", value, "needs a .gguf model loaded from its file "
                          "(use int8 or int4 to quantize a float checkpoint)")
    return METHODS[value]()


@torch.no_grad()
def apply_linear_method(model: nn.Module, method: LinearMethod) -> None:
    """Packs every `Linear` of a loaded model; the lm_head becomes int8 rows under any
    quantized method, and a tied embedding then reads those rows."""
    if isinstance(method, FloatMethod):
        return
    lm_head = getattr(model, "lm_head", None)
    summary: Counter[str] = Counter()
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    dense_copy = (not isinstance(method, Int8Method)
                  and sum(m.in_features * m.out_features for m in layers) * 2 <= DENSE_COPY_MAX_BYTES)
    w8a8 = w8a8_fast()
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module is not lm_head:
            role = name.rsplit(".", 1)[-1]
            summary[method.process(module, role)] += 1
            if dense_copy and isinstance(module.packed, Int4Weight) and w8a8 and role in W8A8_LAYERS:
                # int8 rows of the kernel's own values (exact bf16 ones): W8A8 in large batches
                module.packed.w8a8 = Int8Weight.quantize(module.packed.dequantize_bf16(), w8a8_at_large_m=True)
            elif dense_copy and isinstance(module.packed, Int4Weight):
                module.packed.dense = module.packed.dequantize_bf16()
            elif dense_copy and isinstance(module.packed, Int8Weight):
                module.packed.dense = module.packed.dequantize().to(torch.bfloat16)
    if isinstance(lm_head, Linear):
        tied = getattr(model, "tie_word_embeddings", False)
        embed = model.model.embed_tokens
        dtype = embed.weight.dtype
        source = lm_head.weight if not tied else embed.weight
        lm_head.set_packed(Int8Weight.quantize(source, w8a8_at_large_m=isinstance(method, Int8Method)))
        lm_head.packed.float_out = True  # logits
        if dense_copy:  # the checkpoint's own values, not the int8 rows
            lm_head.packed.dense = source.detach().to(torch.bfloat16).contiguous()
        summary["lm_head: int8"] += 1
        if tied:
            model.model.embed_tokens = PackedEmbedding(lm_head.packed, dtype)
    nbytes = sum(m.packed.nbytes for m in model.modules() if isinstance(m, Linear) and m.packed is not None)
    logger.info("quantization=%s: %s; packed linear weights %.1f MiB%s", method.name,
                ", ".join(f"{n} {k}" for k, n in sorted(summary.items())), nbytes / 2**20,
                " (with a bf16 copy, or int8 rows for W8A8, for large batches)" if dense_copy else "")
