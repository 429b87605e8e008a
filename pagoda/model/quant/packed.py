"""Packed weight forms and their matmuls (torch's CPU kernels).

Each form computes ``x @ W.T`` for ``x[M, K]`` without materializing a float ``W``.
Kernels (measured on an AMD EPYC Zen 5, 2 threads; docs/quantization.md):

- weight-only, ``torch._weight_int4pack_mm_for_cpu`` / ``torch._weight_int8pack_mm``
  with bf16 activations: ~3x faster than a bf16 matmul at M=1 (they read 0.5 / 1 byte
  per weight instead of 2), but 1.5-2.5x *slower* than bf16 at M >= 16. Quality:
  perplexity within 0.15% of the float model.
- W8A8, int8 weights times per-row dynamically quantized int8 activations with
  ``torch._int_mm`` (VNNI; `w8a8_matmul`, csrc/cpu/w8a8.cpp): ~2x faster than bf16 at
  M >= 16, but int8 activations on every layer cost +3.2% perplexity on SmolLM2-135M. The
  ``int8`` method uses it on every layer for ``M > SMALL_M_MAX``; the 4-bit forms of small
  models on `W8A8_LAYERS` only (o_proj, gate_up_proj: +0.67% together), above
  ``W8A8_OVER_INT4_ROWS`` rows and for prompt tokens (`w8a8_for_prompt_tokens`).

Invariant: a form holds integer weights and small per-row / per-group scales, plus,
for small models only, ``dense``: a bf16 copy of the same (dequantized) weights that
serves batches of more than SMALL_M_MAX rows, where torch's packed kernels lose to a
bf16 matmul and W8A8 loses quality (`pagoda.model.quant.methods.DENSE_COPY_MAX_BYTES`
says when; a packed large-batch kernel would retire it). The weight-only kernels are fast only with bf16 activations (float32 ones take a
scalar path, ~50x slower), so activations are cast to bf16 and results back.
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
import dataclasses
from dataclasses import dataclass

import torch

from pagoda.model.quant.gguf_blocks import Int4Codes

# Rows up to which the weight-only kernels beat W8A8 (benchmarks/quant_kernels.py);
# forms that use W8A8 switch to it above this.
SMALL_M_MAX = 8


def _gemv_max_rows(form: str) -> int:
    """Rows up to which pagoda's GEMV (csrc/cpu/int4_gemv.cpp and q8_gemv.cpp, blocks of 8
    rows) serves a form that also holds a bf16 copy, instead of the copy's matmul.

    The GEMV reads 4 or 8 bits per weight once per 8 rows and is compute-bound from 8 rows
    on; the bf16 matmul reads 16 bits per weight from memory and runs at oneDNN's speed.
    Measured with weights streamed from DRAM (AVX-512 BF16 + VNNI Zen 5, 2 threads): the
    int4 GEMV wins up to ~96 rows (16 rows: 89 vs 194 us; 64: 328 vs 369); the 8-bit one
    with bf16 activations (two dot products per weight) up to ~28, with int8 activations
    (one vpdpbusd per 4 weights) past 64 (64 rows: 4.2 vs 5.8 ms on the lm_head). With
    AMX, oneDNN's bf16 matmul is several times faster at 16 rows and up: the copy takes
    over after 8."""
    from pagoda.config import cpu_flags

    if "amx_bf16" in cpu_flags():
        return SMALL_M_MAX
    return {"int4": 64, "int8": 24, "int8_q8": 64}[form]


_KERNEL_DTYPE = torch.bfloat16
_GEMV_MAX_ROWS = {form: _gemv_max_rows(form) for form in ("int4", "int8", "int8_q8")}

# Layers whose 4-bit weights get an int8 per-row copy for W8A8 (per-row int8 activations,
# `w8a8_matmul`) for prompt tokens and decode steps of more than W8A8_OVER_INT4_ROWS tokens, in small models (where
# the others keep a bf16 copy: `pagoda.model.quant.methods.DENSE_COPY_MAX_BYTES`), on CPUs
# with int8 dot products (VNNI / AMX). Measured on the default model (docs/quantization.md,
# benchmarks/quant_quality.py; AMD Zen 5, 2 threads):
# - speed: torch._int_mm runs ~2x the bf16 matmul's rate (1.9 vs 0.97 TFLOP/s at 2048 rows);
#   with the activations quantized and the products scaled in one op, 576->3072 takes 4.3 ms
#   at 2048 rows against 7.7 (bf16), and 189 us at 64 rows against 328 (the int4 GEMV);
# - quality (prefill, teacher-forced perplexity vs the float model): o_proj -0.08%, gate_up_proj
#   +0.25% (one at a time), both +0.67% (top-1 agreement 94.7%, from 97.4% with the bf16 copy);
#   down_proj (+0.83% alone) and qkv_proj (+1.03%) carry the outlier channels and stay out.
W8A8_LAYERS = frozenset({"o_proj", "gate_up_proj"})

# Which layers' GEMV takes int8-quantized activations (q8_gemv.cpp, VNNI; per row and group of 32,
# as llama.cpp's Q8 activations) instead of bf16 ones, by weight bits: True (every layer), False
# (none) or the layers' names (the last part of the module path); read when a weight is packed.
# Measured on the default model (benchmarks/quant_quality.py, decode kernels at every row count,
# perplexity against the float32 reference; docs/quantization.md):
# - the int8 lm_head: costs nothing measurable (-0.09% vs -0.05%) and halves its time;
# - 4-bit layers: +1.2% on every layer (over the 1% bar); the attention's input projection is the
#   sensitive one (+0.86% alone: its input carries the outlier channels), and int8 activations on
#   `Q8_TOLERANT_LAYERS` alone cost +0.56% for a GEMV ~1.2x faster from 4 rows on (offline mix
#   ~+3%, decode batches of 16 ~+6%), top-1 agreement with the float model 93.3% (from 96.0%).
# - 4-bit `W8A8_LAYERS` (o_proj, gate_up_proj) alone: +0.39%, top-1 94.6%; offline mix +4-10%
#   (decode steps 3.17-3.21 -> 2.83-3.01 s). Their prompt tokens already take int8 activations
#   (W8A8: +0.67%, top-1 94.7%), so decode and prefill now round these layers alike. Adopted;
#   qkv_proj and down_proj keep bf16 activations.
Q8_TOLERANT_LAYERS = frozenset({"o_proj", "gate_up_proj", "down_proj"})
GEMV_Q8_ACTIVATIONS: dict[int, bool | frozenset[str]] = {4: W8A8_LAYERS, 8: True}

# Decode rows above which an int4 form with a W8A8 copy takes it (prompt rows take it at any
# count: `w8a8_for_prompt_tokens`): where the GEMV would hand over to a bf16 copy, 64 rows (8
# with AMX). W8A8 is faster from ~16 rows (576->3072: 16 rows 73 vs 84 us, 64: 189 vs 328),
# but a decode token's numerics must not depend on how many tokens share its step: a step
# verifying speculative drafts (rows of 1 + k tokens) reproduces plain decoding bit for bit
# only while both take the same kernel. Offline mix: +9% with 64 here, +10% with 16.
W8A8_OVER_INT4_ROWS = _GEMV_MAX_ROWS["int4"]

# Set while a step that computes prompt tokens runs (`w8a8_for_prompt_tokens`): the positions,
# among the step's tokens, of those that are not prompt tokens (decodes, draft verification,
# generated tokens recomputed after a preemption). W8A8 copies serve the prompt tokens at any
# count, so a prompt's products in those layers never depend on how its prefill was cut; the
# other tokens take what a decode-only step of as many tokens would, so theirs do not depend
# on whether a prompt shared their step. Without it, a prefix-cache hit leaving a 5-token tail
# would compute that tail with the int4 GEMV next to a prefix computed with W8A8, and a greedy
# answer at a near-tie (the default model's first token for "What is the capital of France?":
# 0.08 nats between two tokens even in float32) would flip on the second identical request.
_GENERATED_TOKENS: ContextVar[torch.Tensor | None] = ContextVar("pagoda_generated_tokens", default=None)


@contextlib.contextmanager
def w8a8_for_prompt_tokens(generated: torch.Tensor | None):
    """Within the block (this thread or task), the step has prompt tokens and ``generated`` (int64
    positions) are its other tokens; None: the step has no prompt token (nothing changes)."""
    token = _GENERATED_TOKENS.set(generated)
    try:
        yield
    finally:
        _GENERATED_TOKENS.reset(token)


def step_has_prompt_tokens() -> bool:
    return _GENERATED_TOKENS.get() is not None


def has_w8a8_copies(module: torch.nn.Module) -> bool:
    """Whether some layer of ``module`` holds a W8A8 copy (the only readers of
    `w8a8_for_prompt_tokens`: without one, nobody needs to know a step's prompt tokens)."""
    return any(isinstance(getattr(m, "packed", None), Int4Weight) and m.packed.w8a8 is not None
               for m in module.modules())


def gemv_q8_activations(bits: int, layer: str | None = None) -> bool:
    """Whether the GEMV of a ``bits``-bit layer named ``layer`` (None: unnamed) takes int8
    activations, by `GEMV_Q8_ACTIVATIONS`."""
    rule = GEMV_Q8_ACTIVATIONS[bits]
    if isinstance(rule, bool):
        return rule
    return layer is not None and layer in rule


def _as_2d(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 activations: ``(xq int8 [M, K], scale float32 [M])`` with
    ``xq = round(x * (127 / amax))`` (half to even) and ``scale = amax / 127``. A row of zeros
    gets scale 0; a row holding a NaN or an infinity gets a NaN scale (so its products are NaN).
    The torch code of csrc/cpu/w8a8.cpp's quantization, op for op (equal bit for bit)."""
    xf = x.float()
    amax = xf.abs().amax(dim=1)
    amax = torch.where(torch.isfinite(xf).all(dim=1), amax, torch.full_like(amax, float("nan")))
    inv = torch.full_like(amax, 127.0).div(amax)  # 127 / amax as one division, as the C++ code
    xq = torch.round(xf * inv[:, None]).clamp_(-127, 127).nan_to_num_(0.0)
    return xq.to(torch.int8), amax / 127.0


def w8a8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``x[M, K] @ (scale[:, None] * q).T`` on per-row int8 activations (`quantize_rows_int8`):
    an exact int32 product (``torch._int_mm``, VNNI/AMX), then ``acc * x_scale[m] * scale[n]``.
    pagoda's C++ op (csrc/cpu/w8a8.cpp) fuses the three steps in chunks of rows; the torch code
    below is its fallback and gives the same bits. A row's result never depends on the others."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if _w8a8_op_available() and x.dtype in floats and out_dtype in floats:
        return torch.ops.pagoda.w8a8_linear(x, q, scale, out_dtype)
    xq, x_scale = quantize_rows_int8(x)
    acc = torch._int_mm(xq, q.t())
    return (acc.float() * x_scale[:, None] * scale[None, :]).to(out_dtype)


def w8a8_fast() -> bool:
    """Whether `W8A8_LAYERS` get their W8A8 copy: this CPU multiplies int8 natively (AVX-512
    VNNI, AVX-VNNI or AMX-INT8) and pagoda's W8A8 op is built. Elsewhere they keep bf16:
    torch._int_mm is unmeasured there, and without the op the torch code's separate scaling
    pass over the int32 products (6.9 ms for 2048 x 3072) costs more than the int8 product saves."""
    from pagoda.config import cpu_flags

    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}) and _w8a8_op_available()


def _w8a8_op_available() -> bool:
    from pagoda.kernels.cpu_ext import cpu_ops

    return cpu_ops() is not None and hasattr(torch.ops.pagoda, "w8a8_linear")


@dataclass
class Int8Gemv:
    """Per-row int8 weights in the layout of one of pagoda's kernels, columns in blocks of 16,
    ``scales`` fp16 [N/16, 1, 16] (one group spans K):

    - bf16 activations (csrc/cpu/int4_gemv.cpp, 8-bit form): ``packed`` int8 [N/16, K/2, 32],
      byte j: column j // 2, k = 2c + j % 2;
    - int8 activations (``q8``, csrc/cpu/q8_gemv.cpp): ``packed`` uint8 [N/16, K/4, 64],
      bytes 4j .. 4j+3: q + 128 of column j for k = 4c .. 4c+3 (what vpdpbusd takes as is).

    Like `Int4Gemv`, it reads the weights once for up to 8 rows, and a row's result never
    depends on the other rows."""

    packed: torch.Tensor
    scales: torch.Tensor
    q8: bool = False  # activations quantized to int8 per 32 (csrc/cpu/q8_gemv.cpp) instead of bf16

    @classmethod
    def from_rows(cls, q: torch.Tensor, scale: torch.Tensor, q8: bool | None = None) -> Int8Gemv | None:
        """``q`` int8 [N, K], ``scale`` [N] (fp16-exact). None where the kernel cannot take them.
        ``q8``: int8 activations (None: `gemv_q8_activations` for an unnamed layer), where that kernel runs."""
        n, k = q.shape
        if not int4_gemv_available() or n % 16 or k % 4:
            return None
        scales = scale.to(torch.float16).view(n // 16, 1, 16).contiguous()
        if (gemv_q8_activations(8) if q8 is None else q8) and k % 32 == 0 and q8_gemv_available():
            shifted = (q.to(torch.int16) + 128).to(torch.uint8)
            packed = shifted.view(n // 16, 16, k // 4, 4).permute(0, 2, 1, 3).reshape(n // 16, k // 4, 64)
            return cls(packed.contiguous(), scales, True)
        packed = q.view(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).reshape(n // 16, k // 2, 32).contiguous()
        return cls(packed, scales, False)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales.numel() * 2

    def codes(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The int8 rows [N, K] (or rows ``ids``) back in row order."""
        blocks, chunks, width = self.packed.shape
        per = width // 16  # k per column in a chunk: 2 (bf16 layout) or 4 (q8 layout)
        grid = self.packed.view(blocks, chunks, 16, per)
        rows = grid.permute(0, 2, 1, 3).reshape(blocks * 16, chunks * per) if ids is None \
            else grid[ids // 16, :, ids % 16, :].reshape(*ids.shape, chunks * per)
        return (rows.to(torch.int16) - 128).to(torch.int8) if self.q8 else rows

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for bf16 ``x[M, K]`` (any M: blocks of 8 rows); float32 with int8 activations."""
        if self.q8:
            return torch.ops.pagoda.int8_gemv_q8(x, self.packed, self.scales)
        return torch.ops.pagoda.int8_gemv(x, self.packed, self.scales, self.packed.shape[1] * 2)


@dataclass
class Int8Weight:
    """``W[n, k] ~= scale[n] * q[n, k]``, q int8 in [-127, 127] (symmetric, per output row).

    The rows live in torch's layout (``q``) or in pagoda's kernel layout (``gemv``, where
    built: AVX-512 BF16, for weight-only forms). Invariant: exactly one is set."""

    q: torch.Tensor | None  # int8 [N, K]
    scale: torch.Tensor  # float32 [N]
    scale_kernel: torch.Tensor  # the same scales in bf16, as _weight_int8pack_mm takes them
    w8a8_at_large_m: bool = False  # M > SMALL_M_MAX: W8A8 (fast, less exact) or weight-only
    dense: torch.Tensor | None = None  # bf16 [N, K] for M > SMALL_M_MAX (small models; module docstring)
    gemv: Int8Gemv | None = None
    # The lm_head: results in float32 (logits). With int8 activations the kernel leaves them
    # unrounded; rounded to bf16 they tie (a step of 1/8 at 16..32) and argmax takes the lower id.
    float_out: bool = False

    @classmethod
    def quantize(cls, weight: torch.Tensor, w8a8_at_large_m: bool = False, torch_kernel: bool = False,
                 q8: bool | None = None) -> Int8Weight:
        """``torch_kernel``: torch's layout only, even where pagoda's kernel is available.
        ``q8``: int8 activations in pagoda's kernel (`Int8Gemv.from_rows`; None: the default)."""
        w = weight.float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        # pagoda's kernel serves weight-only forms (W8A8 forms keep torch's kernels: their
        # large-M path needs torch's layout, and two copies would double the memory).
        use_gemv = not torch_kernel and not w8a8_at_large_m and int4_gemv_available()
        half = scale.to(torch.float16).float()
        if use_gemv and bool(((half - scale).abs() <= scale * 2.0 ** -10).all()):
            scale = half  # fp16-exact scales, as the kernel holds them (within 2^-11 of the exact ones)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        gemv = Int8Gemv.from_rows(q, scale, q8) if use_gemv and torch.equal(scale, half) else None
        return cls(q if gemv is None else None, scale, scale.to(_KERNEL_DTYPE), w8a8_at_large_m, gemv=gemv)

    @property
    def nbytes(self) -> int:
        dense = self.dense.numel() * 2 if self.dense is not None else 0
        q = self.q.numel() if self.q is not None else 0
        gemv = self.gemv.nbytes if self.gemv is not None else 0
        return q + gemv + self.scale.numel() * 6 + dense

    def codes(self) -> torch.Tensor:
        """q [N, K] in row order, whichever layout holds it."""
        return self.q if self.q is not None else self.gemv.codes()

    def dequantize(self) -> torch.Tensor:
        return self.codes().float() * self.scale[:, None]

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` of W in ``dtype`` (an embedding lookup on a tied lm_head)."""
        if self.dense is not None:
            return self.dense[ids].to(dtype)
        q = self.q[ids] if self.q is not None else self.gemv.codes(ids)
        return (q.float() * self.scale[ids].unsqueeze(-1)).to(dtype)

    def matmul_weight_only(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv is not None:
            return self.gemv.matmul(x.to(_KERNEL_DTYPE))
        return torch._weight_int8pack_mm(x.to(_KERNEL_DTYPE), self.q, self.scale_kernel)

    def matmul_w8a8(self, x: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``x[M, K] @ W.T`` on per-row int8 activations (`w8a8_matmul`), in ``out_dtype``."""
        q = self.q if self.q is not None else self.gemv.codes().contiguous()  # (only W8A8 forms run this hot)
        return w8a8_matmul(x, q, self.scale, out_dtype)

    def _dense_over_rows(self) -> int:
        """Rows above which a form with a bf16 copy takes it."""
        return SMALL_M_MAX if self.gemv is None else _GEMV_MAX_ROWS["int8_q8" if self.gemv.q8 else "int8"]

    def weight_only_rows(self) -> int | float:
        """Rows up to which `matmul` takes the weight-only kernel (inf: at any count). The compiled
        decoder stack runs that kernel, so it takes steps of at most this many tokens."""
        return min(self._dense_over_rows() if self.dense is not None else math.inf,
                   SMALL_M_MAX if self.w8a8_at_large_m else math.inf)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _as_2d(x)
        if self.dense is not None and x2.shape[0] > self._dense_over_rows():
            y = torch.nn.functional.linear(x2.to(self.dense.dtype), self.dense)
        elif self.w8a8_at_large_m and x2.shape[0] > SMALL_M_MAX:
            y = self.matmul_w8a8(x2, torch.float32 if self.float_out else x.dtype)
        else:
            y = self.matmul_weight_only(x2)
        return y.to(torch.float32 if self.float_out else x.dtype).reshape(*lead, -1)


@dataclass
class Int4Gemv:
    """The same 4-bit codes in the layout of pagoda's own kernel (csrc/cpu/int4_gemv.cpp):
    columns in blocks of 16, ``packed`` uint8 [N/16, K/4, 32], ``scales`` fp16
    [N/16, G, 32] (16 ``d`` then 16 ``m`` per block and group: ``w = d * q + m``).

    It reads each weight once for up to 8 rows (torch's kernel takes rows four at a time),
    and a row's result never depends on the other rows (tested)."""

    packed: torch.Tensor
    scales: torch.Tensor
    group_size: int
    q8: bool = False  # activations quantized to int8 per group (csrc/cpu/q8_gemv.cpp) instead of bf16

    @classmethod
    def from_codes(cls, codes: Int4Codes, q8: bool | None = None) -> Int4Gemv | None:
        """None where the kernel cannot take these codes (no AVX-512 BF16 build, a shape off
        its grid, or scales that fp16 cannot hold to its precision). ``q8``: int8 activations
        (None: `gemv_q8_activations` for an unnamed layer), where that kernel runs."""
        if not int4_gemv_available():
            return None
        q = codes.q
        n, k = q.shape
        g = codes.group_size
        if n % 16 or k % g or g % 4:
            return None
        scales = torch.stack([codes.scale, codes.offset])  # [2, N, G]
        half = scales.to(torch.float16)
        # fp16 holds GGUF's own scales exactly; others (quantized here) are rounded to it,
        # which must stay far below the codes' own error (a tenth of a step, tensor-wide).
        if not bool(torch.isfinite(half).all()):
            return None
        exact = Int4Codes(q, codes.scale, codes.offset, g).dequantize()
        rounded = Int4Codes(q, half[0].float(), half[1].float(), g).dequantize()
        if float((exact - rounded).abs().max()) > 0.1 * float(codes.scale.abs().max()):
            return None
        blocks = q.view(n // 16, 16, k // 4, 4).permute(0, 2, 1, 3)  # [N/16, K/4, 16 columns, 4 k]
        lo = blocks[..., 0:2].reshape(n // 16, k // 4, 32)  # byte j: column j // 2, k = 4c + j % 2
        hi = blocks[..., 2:4].reshape(n // 16, k // 4, 32)  # its high nibble: k = 4c + 2 + j % 2
        packed = (lo | (hi << 4)).contiguous()
        scales = half.view(2, n // 16, 16, k // g).permute(1, 3, 0, 2).reshape(n // 16, k // g, 32).contiguous()
        use_q8 = (gemv_q8_activations(4) if q8 is None else q8) and g % 8 == 0 and q8_gemv_available()
        return cls(packed, scales, g, use_q8)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales.numel() * 2

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for bf16 ``x[M, K]`` (any M: blocks of 8 rows)."""
        if self.q8:
            return torch.ops.pagoda.int4_gemv_q8(x, self.packed, self.scales, self.group_size)
        return torch.ops.pagoda.int4_gemv(x, self.packed, self.scales, self.group_size)


def q8_gemv_available() -> bool:
    """pagoda's int8-activation GEMV (csrc/cpu/q8_gemv.cpp) is built and runs here (AVX-512 BF16 + VNNI)."""
    from pagoda.kernels.cpu_ext import cpu_ops

    ops = cpu_ops()
    return ops is not None and hasattr(ops, "q8_gemv_available") and bool(ops.q8_gemv_available())


def int4_gemv_available() -> bool:
    """pagoda's int4 kernel is built and this CPU runs it (AVX-512 BF16)."""
    from pagoda.kernels.cpu_ext import cpu_ops

    ops = cpu_ops()
    return ops is not None and hasattr(ops, "int4_gemv_available") and bool(ops.int4_gemv_available())


@dataclass
class Int4Weight:
    """Group-wise 4-bit weights, in one of two kernels' layouts.

    - ``gemv`` (pagoda's kernel, where built: AVX-512 BF16): see `Int4Gemv`.
    - otherwise ``packed`` / ``scales_zeros`` in ``_weight_int4pack_mm_for_cpu``'s layout:
      torch's kernel computes ``W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]``
      (``g = k // group_size``; ``scales_zeros[..., 0]`` / ``[..., 1]``, in the
      activation dtype), so codes ``w = s * q + o`` (GGUF Q4_1: ``d * q + m``) map
      exactly with ``zero = o + 8 * s`` up to rounding scale and zero to bf16.
    Invariant: exactly one of ``gemv`` and ``packed`` is set.
    ``w8a8``: an int8 per-row copy of the same weights for W8A8 above ``W8A8_OVER_INT4_ROWS``
    rows (None: int4, or ``dense``, at every M). The built-in methods give one to small
    models' `W8A8_LAYERS` (`pagoda.model.quant.methods.apply_linear_method`).
    """

    packed: torch.Tensor | None  # uint8 [N, K // 2] (torch's layout)
    scales_zeros: torch.Tensor | None  # bf16 [K // group_size, N, 2]
    group_size: int
    w8a8: Int8Weight | None
    dense: torch.Tensor | None = None  # bf16 [N, K] for M > SMALL_M_MAX (small models; module docstring)
    gemv: Int4Gemv | None = None

    @classmethod
    def from_codes(cls, codes: Int4Codes, with_w8a8: bool = False, torch_kernel: bool = False,
                   q8: bool | None = None) -> Int4Weight:
        """``torch_kernel``: torch's layout even where pagoda's kernel is available. ``q8``: int8
        activations in pagoda's kernel (`Int4Gemv.from_codes`)."""
        w8a8 = Int8Weight.quantize(codes.dequantize(), w8a8_at_large_m=True) if with_w8a8 else None
        gemv = None if torch_kernel else Int4Gemv.from_codes(codes, q8)
        if gemv is not None:
            return cls(None, None, codes.group_size, w8a8, gemv=gemv)
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.q.to(torch.int32).contiguous(), 1)
        zero = codes.offset + 8.0 * codes.scale
        scales_zeros = torch.stack([codes.scale.t(), zero.t()], dim=-1).to(_KERNEL_DTYPE).contiguous()
        return cls(packed, scales_zeros, codes.group_size, w8a8)

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = 32, with_w8a8: bool = False,
                 torch_kernel: bool = False, q8: bool | None = None) -> Int4Weight:
        """Asymmetric min/max 4-bit groups of ``group_size`` along K (like GGUF Q4_1)."""
        return cls.from_codes(quantize_int4_codes(weight, group_size), with_w8a8, torch_kernel, q8)

    @property
    def nbytes(self) -> int:
        extra = self.w8a8.nbytes if self.w8a8 is not None else 0
        extra += self.dense.numel() * 2 if self.dense is not None else 0
        if self.gemv is not None:
            return self.gemv.nbytes + extra
        return self.packed.numel() + self.scales_zeros.numel() * 2 + extra

    @property
    def in_features(self) -> int:
        return self.gemv.packed.shape[1] * 4 if self.gemv is not None else self.packed.shape[1] * 2

    def dequantize_bf16(self) -> torch.Tensor:
        """W [N, K] in bf16, exactly as the int4 kernel sees it (W.T = I @ W.T through it). The
        GEMV with bf16 activations, even for a form whose GEMV takes int8 ones: those would
        round the identity's rows, and the W8A8 and bf16 copies built from this would move."""
        eye = torch.eye(self.in_features, dtype=_KERNEL_DTYPE)
        if self.gemv is not None:
            return dataclasses.replace(self.gemv, q8=False).matmul(eye).t().contiguous()
        return self.matmul_int4(eye).t().contiguous()

    def matmul_int4(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv is not None:
            return self.gemv.matmul(x.to(_KERNEL_DTYPE))
        return torch._weight_int4pack_mm_for_cpu(x.to(_KERNEL_DTYPE), self.packed, self.group_size,
                                                 self.scales_zeros)

    def _dense_over_rows(self) -> int:
        """Rows above which a form with a bf16 copy takes it."""
        return _GEMV_MAX_ROWS["int4"] if self.gemv is not None else SMALL_M_MAX

    def int4_rows(self) -> int | float:
        """Rows up to which `_matmul_by_rows` takes the 4-bit kernel (inf: at any count). The
        compiled decoder stack runs that kernel, so it takes steps of at most this many tokens."""
        return min(W8A8_OVER_INT4_ROWS if self.w8a8 is not None else math.inf,
                   self._dense_over_rows() if self.dense is not None else math.inf)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        generated = _GENERATED_TOKENS.get() if self.w8a8 is not None else None
        if generated is not None:  # prompt tokens: W8A8; the others as in a decode-only step
            x2, lead = _as_2d(x)
            y = self.w8a8.matmul_w8a8(x2, x.dtype)
            if 0 < generated.numel() <= W8A8_OVER_INT4_ROWS:
                y.index_copy_(0, generated, self._matmul_by_rows(x2.index_select(0, generated)))
            return y.reshape(*lead, -1)
        return self._matmul_by_rows(x)

    def _matmul_by_rows(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == _KERNEL_DTYPE and x.shape[0] <= SMALL_M_MAX:
            # The decode hot path (bf16 rows, few of them): one kernel call, no casts or reshapes.
            if self.gemv is not None:
                return self.gemv.matmul(x)
            return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_zeros)
        x2, lead = _as_2d(x)
        rows = x2.shape[0]
        if self.w8a8 is not None and rows > W8A8_OVER_INT4_ROWS:
            y = self.w8a8.matmul_w8a8(x2, x.dtype)
        elif self.dense is not None and rows > self._dense_over_rows():
            y = torch.nn.functional.linear(x2.to(self.dense.dtype), self.dense)
        else:
            y = self.matmul_int4(x2)
        return y.to(x.dtype).reshape(*lead, -1)


def quantize_int4_codes(weight: torch.Tensor, group_size: int) -> Int4Codes:
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features={k} is not a multiple of the int4 group size {group_size}.")
    w = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp_min(1e-12)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    return Int4Codes(q.reshape(n, k), scale, lo, group_size)
