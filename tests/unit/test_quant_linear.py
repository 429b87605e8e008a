"""Packed weight forms and linear methods against float references of the same weights.

- GGUF Q4_0/Q4_1 blocks decode exactly to gguf-py's dequantization;
- each kernel (int4 groups, int8 weight-only, W8A8) against a float matmul of the
  weights it holds, at batch rows on both sides of the dispatch threshold;
- a tiny GGUF model loaded with quantization='gguf' keeps every linear layer packed
  (no float weights) and multiplies like the dequantized float model.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QType

from pagoda.config import ConfigError, EngineConfig
from pagoda.model.layers.linear import Linear, PackedEmbedding
from pagoda.model.loader.gguf_loader import iter_gguf_weights, read_gguf_config
from pagoda.model.loader.loader import build_model, load_hf_config
from pagoda.model.loader.resolve import resolve_model
from pagoda.model.quant import packed
from pagoda.model.quant.gguf_blocks import PACKED_GGUF_TYPES, GGUFBlocks, decode_blocks
from pagoda.model.quant.methods import FloatMethod, GGUFMethod, resolve_quantization
from pagoda.model.quant.packed import Int4Weight, Int8Weight

BF16 = torch.bfloat16


def _blocks(weight: torch.Tensor, qtype: QType) -> GGUFBlocks:
    raw = gguf.quants.quantize(weight.numpy(), qtype)
    return GGUFBlocks(qtype, torch.from_numpy(raw), tuple(weight.shape))


@pytest.mark.parametrize("qtype", sorted(PACKED_GGUF_TYPES), ids=lambda t: t.name)
def test_gguf_blocks_decode_exactly(qtype: QType) -> None:
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    blocks = _blocks(weight, qtype)
    expected = torch.from_numpy(gguf.quants.dequantize(blocks.data.numpy(), qtype))
    assert torch.equal(decode_blocks(blocks).dequantize(), expected)


def _int4_reference(codes) -> torch.Tensor:
    """What torch's int4 kernel multiplies by: (q - 8) * scale + zero, both rounded to bf16."""
    g = codes.group_size
    scale = codes.scale.to(BF16).float()
    zero = (codes.offset + 8 * codes.scale).to(BF16).float()
    return (codes.q.float() - 8) * scale.repeat_interleave(g, 1) + zero.repeat_interleave(g, 1)


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    err = (actual.float() - expected).abs().max().item()
    assert err <= rel * expected.abs().max().item(), (err, expected.abs().max().item())


@pytest.mark.parametrize("m", [1, 3, packed.SMALL_M_MAX, packed.SMALL_M_MAX + 1, packed.W8A8_OVER_INT4_ROWS,
                               packed.W8A8_OVER_INT4_ROWS + 1, 40])
@pytest.mark.parametrize("qtype", sorted(PACKED_GGUF_TYPES), ids=lambda t: t.name)
def test_int4_matmul_matches_dequantized_gguf(qtype: QType, m: int) -> None:
    gen = torch.Generator().manual_seed(m)
    weight = torch.randn(80, 128, generator=gen) * 0.05
    codes = decode_blocks(_blocks(weight, qtype))
    form = Int4Weight.from_codes(codes, with_w8a8=True)
    x = torch.randn(m, 128, generator=gen).to(BF16)
    _close(Int4Weight.from_codes(codes).matmul(x), x.float() @ _int4_reference(codes).t(), 1e-2)
    if m <= packed.W8A8_OVER_INT4_ROWS:
        # int4 kernel: exact up to bf16 rounding of the scales and of the output.
        _close(form.matmul(x), x.float() @ _int4_reference(codes).t(), 1e-2)
    else:
        # W8A8: int8 weights and activations, errors of ~1/127 of a row's range each.
        _close(form.matmul(x), x.float() @ codes.dequantize().t(), 3e-2)


@pytest.mark.parametrize("m", [1, 5, packed.SMALL_M_MAX + 1, 64])
def test_int8_matmul_matches_its_dequantized_weights(m: int) -> None:
    gen = torch.Generator().manual_seed(m)
    weight = torch.randn(96, 64, generator=gen) * 0.05
    form = Int8Weight.quantize(weight)
    assert (form.dequantize() - weight).abs().max() <= form.scale.max() / 2 + 1e-7
    x = torch.randn(m, 64, generator=gen).to(BF16)
    expected = x.float() @ form.dequantize().t()
    _close(form.matmul_weight_only(x), expected, 1e-2)
    # W8A8: the activation rounding error is at most half a step per element.
    x_step = x.float().abs().amax(dim=1, keepdim=True) / 127
    bound = (x_step / 2) * form.dequantize().abs().sum(dim=1) + 1e-3 * expected.abs().max()
    assert ((form.matmul_w8a8(x) - expected).abs() <= bound).all()
    assert form.matmul(x).dtype == BF16 and form.matmul(x.float()).dtype == torch.float32


def test_int4_quantize_is_within_half_a_step() -> None:
    weight = torch.randn(64, 96) * 0.05
    codes = packed.quantize_int4_codes(weight, 32)
    step = codes.scale.repeat_interleave(32, 1)
    assert ((codes.dequantize() - weight).abs() <= step / 2 + 1e-6).all()


def test_int4_forms_without_a_w8a8_copy_stay_weight_only() -> None:
    # (the dispatch to a W8A8 copy: tests/unit/test_w8a8.py)
    int4_only = Int4Weight.quantize(torch.randn(64, 64) * 0.05)
    assert int4_only.w8a8 is None


def test_fused_shards_are_row_concatenations() -> None:
    gen = torch.Generator().manual_seed(3)
    shards = [torch.randn(rows, 64, generator=gen) * 0.05 for rows in (64, 32, 32)]
    layer = Linear(64, 128, shard_sizes=[64, 32, 32])
    for i, shard in enumerate(shards):
        layer.load_gguf_shard(i, _blocks(shard, QType.Q4_1), f"shard{i}")
    GGUFMethod().process(layer)
    assert layer.weight is None and isinstance(layer.packed, Int4Weight)
    reference = torch.cat([_int4_reference(decode_blocks(_blocks(s, QType.Q4_1))) for s in shards])
    x = torch.randn(1, 64, generator=gen).to(BF16)
    _close(layer(x), x.float() @ reference.t(), 1e-2)


@pytest.mark.skipif(not packed.q8_gemv_available(), reason="pagoda's int8-activation GEMV needs AVX-512 BF16 + VNNI")
def test_int8_activations_follow_the_layer_name(monkeypatch) -> None:
    """GEMV_Q8_ACTIVATIONS by layer name: the named 4-bit layers take int8 activations, others
    bf16; True / False hold for every layer; the default keeps 4-bit layers on bf16."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(64, 64, generator=gen) * 0.05

    def q8_of(role: str | None) -> bool:
        layer = Linear(64, 64)
        layer.load_gguf_shard(0, _blocks(weight, QType.Q4_1), "w")
        GGUFMethod().process(layer, role)
        return layer.packed.gemv.q8

    assert not q8_of("down_proj") and not q8_of(None)  # the default: 4-bit layers on bf16 activations
    monkeypatch.setitem(packed.GEMV_Q8_ACTIVATIONS, 4, packed.Q8_TOLERANT_LAYERS)
    assert q8_of("down_proj") and q8_of("gate_up_proj") and not q8_of("qkv_proj") and not q8_of(None)
    monkeypatch.setitem(packed.GEMV_Q8_ACTIVATIONS, 4, True)
    assert q8_of("qkv_proj") and q8_of(None)


# --------------------------------------------------------------------------- whole models


@pytest.fixture(scope="module")
def tiny_q4_gguf(tmp_path_factory) -> Path:
    from tests.unit.test_gguf_loader import ROUND_TRIP_CASES, _random_model, _write_gguf

    arch, hf_config, metadata = ROUND_TRIP_CASES["llama"]  # q/k rows permuted in the file
    state = {name: t * 0.05 for name, t in _random_model(hf_config).items()}
    path = tmp_path_factory.mktemp("tiny_q4") / "tiny.gguf"
    _write_gguf(path, arch, hf_config, state, metadata, QType.Q4_1)
    return path


def test_gguf_blocks_come_in_hf_row_order(tiny_q4_gguf: Path) -> None:
    floats = dict(iter_gguf_weights(tiny_q4_gguf))
    packed_weights = dict(iter_gguf_weights(tiny_q4_gguf, packed_types=PACKED_GGUF_TYPES))
    kept = {name: blocks for name, blocks in packed_weights.items() if isinstance(blocks, GGUFBlocks)}
    assert len(kept) == 7 * 2  # every linear weight of both layers; norms, embedding, lm_head float
    for name, blocks in kept.items():
        assert torch.equal(decode_blocks(blocks).dequantize(), floats[name]), name


def _build(path: Path, method, dtype=BF16):
    source = resolve_model(str(path))
    return build_model(load_hf_config(source), source, load_format="auto", dtype=dtype,
                       device=torch.device("cpu"), max_position=256, show_progress=False,
                       linear_method=method)


def test_gguf_model_keeps_only_packed_weights(tiny_q4_gguf: Path) -> None:
    float_model = _build(tiny_q4_gguf, FloatMethod(), torch.float32)
    model = _build(tiny_q4_gguf, GGUFMethod())
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    assert len(linears) == 4 * 2 + 1
    assert all(m.weight is None and m.packed is not None for m in linears.values())
    assert {n for n, p in model.named_parameters() if p.dim() == 2} == {"model.embed_tokens.weight"}  # untied
    float_linears = dict(float_model.named_modules())
    x = torch.randn(1, 64).to(BF16)
    for name, layer in linears.items():
        if name == "lm_head":
            continue
        reference = float_linears[name]
        k = reference.in_features
        xk = torch.randn(1, k).to(BF16) if k != 64 else x
        _close(layer(xk), F.linear(xk.float(), reference.weight), 2e-2)


def test_tied_embedding_reads_the_int8_lm_head(tmp_path: Path) -> None:
    from tests.unit.test_gguf_loader import ROUND_TRIP_CASES, _random_model, _write_gguf

    arch, hf_config, metadata = ROUND_TRIP_CASES["qwen2"]  # tied, q/k/v biases
    path = tmp_path / "tied.gguf"
    _write_gguf(path, arch, hf_config, _random_model(hf_config), metadata, QType.Q4_1)
    model = _build(path, GGUFMethod())
    assert isinstance(model.model.embed_tokens, PackedEmbedding)
    assert model.model.embed_tokens.table is model.lm_head.packed
    assert not [n for n, p in model.named_parameters() if p.dim() == 2]
    ids = torch.tensor([0, 5, 299])
    rows = model.model.embed_tokens(ids)
    assert rows.dtype == BF16
    _close(rows, model.lm_head.packed.dequantize()[ids], 1e-2)


# --------------------------------------------------------------------------- configuration


def test_bad_quantization_names_the_field() -> None:
    with pytest.raises(ConfigError, match="quantization='fp8'") as info:
        EngineConfig(quantization="fp8")
    assert info.value.field_name == "quantization"


def test_gguf_method_needs_a_gguf_file() -> None:
    with pytest.raises(ConfigError, match="quantization='gguf'.*needs a .gguf model"):
        resolve_quantization("gguf", source_kind="hf", load_format="auto", device=torch.device("cpu"), dtype=BF16)
    with pytest.raises(ConfigError, match="quantization='int8'.*CPU only"):
        resolve_quantization("int8", source_kind="hf", load_format="auto", device=torch.device("cuda"), dtype=BF16)


def test_auto_is_float_except_gguf_at_bf16() -> None:
    cpu = torch.device("cpu")
    assert resolve_quantization("auto", source_kind="hf", load_format="auto", device=cpu, dtype=BF16).name == "none"
    assert resolve_quantization("auto", source_kind="gguf", load_format="auto", device=cpu,
                                dtype=torch.float32).name == "none"
    assert resolve_quantization(None, source_kind="gguf", load_format="auto", device=cpu, dtype=BF16).name == "none"
