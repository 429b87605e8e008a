"""The decoder layers run in one compiled call for steps of a few tokens (CPU).

At batch 1 a 135M model's step is ~400 small ops; from Python each costs a
module call and a dispatch, a third of the step. `CompiledDecoderStack` hands
the layers' tensors once to ``torch.classes.pagoda.DecoderStack``
(pagoda/csrc/cpu/decoder_stack.cpp), which runs the same ops in the same
order as `DecoderModel.forward`: results are bitwise equal (tests check it).

It applies when attention runs on the compiled ``cpu`` backend, the fused CPU
ops are on, every linear layer is float or one of the packed forms the C++ side
knows (int4, int8 weight-only), and the step has at most `max_tokens` tokens:
as many as every packed layer's Python matmul would still give its small-batch
kernel (the GEMV up to 64 rows on AVX-512 BF16 CPUs, 8 elsewhere; see
`Int4Weight.int4_rows`), capped at ``STACK_MAX_TOKENS``. Decode batches of 9-64
requests used to run the modules: ~4 ms of a 14 ms 16-row step was module and
dispatch overhead (benchmarks/offline_phases.py). Anything else runs the Python
modules.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from pagoda.kernels import cpu_ext
from pagoda.model.attention.cpu_paged import CpuAttentionMetadata
from pagoda.model.attention.metadata import AttentionMetadata
from pagoda.model.layers import fused
from pagoda.model.layers.linear import Linear
from pagoda.model.quant.packed import Int4Weight, Int8Weight, has_w8a8_copies, step_has_prompt_tokens

logger = logging.getLogger(__name__)

_switch = {"enabled": True}

# Steps above this many tokens run the modules whatever the layers: there the matmuls dominate
# and the modules' per-op overhead is noise.
STACK_MAX_TOKENS = 64


def decoder_stack_disabled():
    """Within the block, decoder layers run as Python modules (tests and side-by-side benchmarks)."""
    return fused.switched_off(_switch)


# Linear kinds of decoder_stack.cpp.
_FLOAT, _INT4, _INT8, _INT4_GEMV, _INT8_GEMV, _INT4_GEMV_Q8, _INT8_GEMV_Q8 = 0, 1, 2, 3, 4, 5, 6


def _linear_args(layer: Linear) -> tuple | None:
    """(kind, a, b, group_size, bias) for DecoderStack.add_linear, or None if it has no C++ form."""
    packed = layer.packed
    if packed is None:
        return _FLOAT, layer.weight.detach(), None, 0, _detach(layer.bias)
    if isinstance(packed, Int4Weight) and packed.gemv is not None:
        gemv = packed.gemv
        return (_INT4_GEMV_Q8 if gemv.q8 else _INT4_GEMV), gemv.packed, gemv.scales, gemv.group_size, \
            _detach(layer.bias)
    if isinstance(packed, Int4Weight):
        return _INT4, packed.packed, packed.scales_zeros, packed.group_size, _detach(layer.bias)
    if isinstance(packed, Int8Weight) and packed.gemv is not None:  # within weight_only_rows(): weight-only
        gemv = packed.gemv
        return (_INT8_GEMV_Q8 if gemv.q8 else _INT8_GEMV), gemv.packed, gemv.scales, gemv.packed.shape[1] * 2, \
            _detach(layer.bias)
    if isinstance(packed, Int8Weight):  # within weight_only_rows(): weight-only
        return _INT8, packed.q, packed.scale_kernel, 0, _detach(layer.bias)
    return None


def _stack_rows(layer: Linear) -> int | float:
    """Rows up to which ``layer``'s Python matmul takes the kernel the stack runs for it."""
    packed = layer.packed
    if isinstance(packed, Int4Weight):
        return packed.int4_rows()
    if isinstance(packed, Int8Weight):
        return packed.weight_only_rows()
    return math.inf  # float: at::linear at any count


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


class CompiledDecoderStack:
    """A `DecoderModel`'s layers and final norm as one C++ object (see the module docstring)."""

    def __init__(self, stack, has_w8a8: bool, max_tokens: int):
        self._stack = stack
        self.has_w8a8 = has_w8a8  # some layer holds a W8A8 copy (the stack itself runs int4)
        # Steps of at most this many tokens: every layer's Python matmul would take the kernel the
        # stack runs, so results are bitwise those of the modules.
        self.max_tokens = max_tokens
        self._kv_caches: list | None = None  # the list last handed to the C++ side

    @classmethod
    def build(cls, decoder: nn.Module) -> CompiledDecoderStack | None:
        """The compiled stack of ``decoder`` (a llama.py `DecoderModel`), or None where it cannot run."""
        if cpu_ext.cpu_ops() is None or not hasattr(torch.classes.pagoda, "DecoderStack"):
            return None
        layers = list(decoder.layers)
        if not layers:
            return None
        attn = layers[0].self_attn
        rotary = attn.rotary
        if not rotary.cos_cache.is_cpu:
            return None
        specs = []
        max_tokens: int | float = STACK_MAX_TOKENS
        for layer in layers:
            a = layer.self_attn
            modules = (a.qkv_proj, a.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            linears = [_linear_args(m) for m in modules]
            max_tokens = min([max_tokens, *(_stack_rows(m) for m in modules)])
            if any(spec is None for spec in linears) or a.rotary is not rotary:
                return None
            q_norm = a.q_norm.weight.detach() if a.q_norm is not None else None
            k_norm = a.k_norm.weight.detach() if a.k_norm is not None else None
            norms = (layer.input_layernorm, layer.post_attention_layernorm, a.q_norm, a.k_norm)
            if any(n is not None and n.eps != decoder.norm.eps for n in norms):
                return None
            specs.append((layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                          q_norm, k_norm, linears))
        stack = torch.classes.pagoda.DecoderStack(attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                                  float(decoder.norm.eps), float(attn.scale),
                                                  rotary.cos_cache, rotary.sin_cache, decoder.norm.weight.detach())
        for input_norm, post_norm, q_norm, k_norm, linears in specs:
            stack.add_layer(input_norm, post_norm, q_norm, k_norm)
            for kind, a, b, group_size, bias in linears:
                stack.add_linear(kind, a, b, group_size, bias)
        logger.debug("compiled decoder stack: %d layers, steps of up to %d tokens", len(specs), int(max_tokens))
        return cls(stack, has_w8a8_copies(decoder), int(max_tokens))

    @staticmethod
    def applies(input_ids: torch.Tensor, hidden_dtype: torch.dtype, meta: AttentionMetadata) -> bool:
        """Whether this step may take the stack (else the Python modules run)."""
        return (_switch["enabled"] and input_ids.shape[0] <= STACK_MAX_TOKENS and isinstance(meta, CpuAttentionMetadata)
                and fused.fused_enabled() and hidden_dtype in fused.FUSED_DTYPES)

    def takes_step(self, num_tokens: int) -> bool:
        """False for a step of more than `max_tokens` tokens, and for a step with prompt tokens
        (`w8a8_for_prompt_tokens`) where some layer has a W8A8 copy: those tokens take it, and the
        C++ stack runs the int4 GEMV."""
        return num_tokens <= self.max_tokens and not (self.has_w8a8 and step_has_prompt_tokens())

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: CpuAttentionMetadata) -> torch.Tensor:
        if kv_caches is not self._kv_caches:
            self._stack.set_kv_caches([k for k, _ in kv_caches], [v for _, v in kv_caches])
            self._kv_caches = kv_caches
        return self._stack.forward(hidden, positions, meta.slot_mapping, meta.block_tables,
                                   meta.query_start_loc, meta.seq_lens, meta.num_splits)
