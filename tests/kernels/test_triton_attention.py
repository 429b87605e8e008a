"""The ``triton`` attention backend against the ``torch`` reference, run on CPU tensors by
Triton's interpreter (no GPU needed): random shuffled block tables, odd lengths, GQA ratios
1/3/8, fp32/bf16/fp16 caches, padded tables, mixed decode + prefill steps, the split-K
(flash-decoding) path forced on, CUDA-graph padding rows; and a tiny model end to end.

TRITON_INTERPRET is read when a kernel is decorated (at import of triton_paged), so it is set
here before that import; it stays set for the rest of the process (it only changes how
Triton kernels run, and nothing else in pagoda uses Triton). Shapes are small: the
interpreter runs each program in numpy.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton_paged (and its kernels) is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from pagoda.config import ConfigError  # noqa: E402
from pagoda.model.attention.backend import select_attention_backend  # noqa: E402
from pagoda.model.attention.metadata import StepLayout  # noqa: E402
from pagoda.model.attention.torch_paged import TorchAttentionBackend  # noqa: E402
from pagoda.model.attention.triton_paged import (  # noqa: E402
    TritonAttentionBackend,
    decode_splits,
    interpreter_active,
    write_kv_triton,
)

from tests.models.test_attention_backends import TOLERANCE, make_step, run_backend  # noqa: E402

if not interpreter_active():  # imported earlier in this process without the interpreter
    pytest.skip("triton_paged was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

CPU = torch.device("cpu")
BS = 16


def check_against_torch(rows, kv_heads, group, head_dim, dtype, num_splits=0, seed=0, block_size=BS,
                        extra_pad_blocks=2):
    step = make_step(rows, kv_heads, group, head_dim, dtype, block_size=block_size, seed=seed,
                     extra_pad_blocks=extra_pad_blocks)
    expected, ek, ev = run_backend(TorchAttentionBackend(group), *step)
    backend = TritonAttentionBackend(kv_heads * group, kv_heads, num_splits)
    got, gk, gv = run_backend(backend, *step)
    assert got.shape == expected.shape and got.dtype == dtype
    torch.testing.assert_close(gk, ek, atol=0, rtol=0)  # this step's K/V written to the same slots
    torch.testing.assert_close(gv, ev, atol=0, rtol=0)
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])
    if dtype != torch.float32:  # and as close to the fp32 truth as a rounding step of `dtype`
        step32 = tuple(x.float() if x.is_floating_point() else x for x in step[1:])
        truth, _, _ = run_backend(TorchAttentionBackend(group), step[0], *step32)
        torch.testing.assert_close(got.float(), truth, atol=2e-2, rtol=2e-2)
    return backend.build_metadata(step[0])


ODD_LENGTHS = [2, BS - 1, BS, BS + 1, 3 * BS + 5, 131]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_decodes_match_torch(dtype, group):
    check_against_torch([(1, n) for n in ODD_LENGTHS], kv_heads=2, group=group, head_dim=32, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_mixed_decodes_and_prefill_chunks_match_torch(dtype, group):
    rows = [(1, 17), (1, 2), (1, 70), (1, 33),
            (5, 5),            # a whole short prompt
            (37, 37 + 32),     # a chunk over a cached prefix ending on a block boundary
            (16, 16 + 23),     # a chunk over an odd prefix
            (1, 1),            # a one-token prompt (a prefill row with one query)
            (70, 70)]          # a whole prompt over several query tiles
    check_against_torch(rows, kv_heads=2, group=group, head_dim=32, dtype=dtype, seed=1)


@pytest.mark.parametrize("rows", [[(150, 200)], [(1, 1), (2, 2), (3, 3)], [(BS + 1, BS + 1), (BS - 1, 2 * BS)]])
def test_prefill_only_steps_match_torch(rows):
    check_against_torch(rows, kv_heads=3, group=3, head_dim=32, dtype=torch.float32, seed=2)


@pytest.mark.parametrize("num_splits", [2, 3, 7, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_decodes_merge_to_the_same_answer(num_splits, dtype):
    # Rows shorter than the number of ranges asked for leave some ranges empty.
    rows = [(1, n) for n in (2, 40, 257, 600)]
    meta = check_against_torch(rows, kv_heads=2, group=3, head_dim=32, dtype=dtype, num_splits=num_splits)
    assert meta.num_splits == num_splits


def test_split_decodes_next_to_prefill_chunks():
    rows = [(1, 300), (1, 5), (20, 50), (9, 9)]
    meta = check_against_torch(rows, kv_heads=2, group=4, head_dim=32, dtype=torch.float32, num_splits=4, seed=5)
    assert meta.num_decodes == 2 and meta.num_splits == 4


def test_head_dims_that_are_not_powers_of_two_and_other_block_sizes():
    rows = [(1, 9), (1, 50), (7, 30)]
    check_against_torch(rows, kv_heads=2, group=2, head_dim=24, dtype=torch.float16)
    for block_size in (1, 8, 32):
        check_against_torch(rows, kv_heads=2, group=4, head_dim=16, dtype=torch.float32, block_size=block_size)


def test_tables_without_padding_and_unsorted_decodes():
    rows = [(1, 3), (1, 90), (1, 20), (1, 91), (1, 89)]
    check_against_torch(rows, kv_heads=1, group=3, head_dim=32, dtype=torch.float32, seed=3, extra_pad_blocks=0)


def test_auto_split_count():
    assert decode_splits(1, 8, 4096) == 16  # batch 1: split to fill the GPU
    assert decode_splits(1, 8, 300) == 1  # short: not worth a merge
    assert decode_splits(64, 8, 4096) == 1  # 512 programs already
    assert decode_splits(4, 2, 100_000) == 32  # capped
    layout = StepLayout.build([1], [4096], 1, torch.zeros(1, 256, dtype=torch.int32), BS,
                              slot_mapping=torch.zeros(1, dtype=torch.int64))
    assert TritonAttentionBackend(32, 8).build_metadata(layout).num_splits == 16
    assert TritonAttentionBackend(32, 8, num_splits=1).build_metadata(layout).num_splits == 1


def test_padding_rows_write_nothing_and_read_safely():
    # CUDA-graph padding (worker/cuda_graphs.py): slot -1, query 1, seq_len 1 over block 0.
    rows = [(1, 20), (1, 33)]
    layout, q, k, v, k_cache, v_cache = make_step(rows, 2, 2, 16, torch.float32, seed=6)
    expected, ek, ev = run_backend(TorchAttentionBackend(2), layout, q, k, v, k_cache, v_cache)
    pad = 3
    tables = torch.cat([layout.block_tables, torch.zeros(pad, layout.block_tables.shape[1], dtype=torch.int32)])
    padded = StepLayout.build([1] * (2 + pad), layout.seq_lens + [1] * pad, 2 + pad, tables, BS,
                              slot_mapping=torch.cat([layout.slot_mapping, torch.full((pad,), -1)]))
    extra = lambda x: torch.cat([x, torch.randn(pad, *x.shape[1:])])  # noqa: E731
    for splits in (1, 3):
        got, gk, gv = run_backend(TritonAttentionBackend(4, 2, splits), padded, extra(q), extra(k), extra(v),
                                  k_cache, v_cache)
        torch.testing.assert_close(gk, ek, atol=0, rtol=0)
        torch.testing.assert_close(gv, ev, atol=0, rtol=0)
        torch.testing.assert_close(got[:2], expected, **TOLERANCE[torch.float32])
        assert torch.isfinite(got).all()


def test_kv_write_reads_strided_inputs():
    # k and v as the model produces them: views into one fused qkv projection.
    cache = torch.zeros(4, BS, 2, 16), torch.zeros(4, BS, 2, 16)
    qkv = torch.randn(5, (4 + 2 + 2) * 16)
    k = qkv[:, 64:96].view(5, 2, 16)
    v = qkv[:, 96:].view(5, 2, 16)
    slots = torch.tensor([3, 17, 40, 63, 0])
    write_kv_triton(*cache, k, v, slots)
    flat_k, flat_v = cache[0].view(-1, 2, 16), cache[1].view(-1, 2, 16)
    torch.testing.assert_close(flat_k[slots], k, atol=0, rtol=0)
    torch.testing.assert_close(flat_v[slots], v, atol=0, rtol=0)
    assert int((flat_k.abs().sum((1, 2)) > 0).sum()) == 5


# ---------------------------------------------------------------- choosing it


def test_triton_is_chosen_on_cpu_only_under_the_interpreter(monkeypatch):
    assert select_attention_backend("triton", CPU, 9, 3).name == "triton"
    assert select_attention_backend("auto", CPU, 9, 3).name in ("cpu", "torch")  # never triton on CPU
    # On CUDA the interpreter's kernels would be given device tensors: refused, auto falls back.
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1 is set"):
        select_attention_backend("triton", torch.device("cuda"), 9, 3)
    assert select_attention_backend("auto", torch.device("cuda"), 9, 3).name == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="attention_backend='triton' is invalid: runs on CUDA devices"):
        select_attention_backend("triton", CPU, 9, 3)


# ---------------------------------------------------------------- end to end


def test_tiny_model_same_tokens_as_torch(tiny_llama):
    from pagoda import LLM, SamplingParams

    prompts = [[1, 5, 9, 200, 33], list(range(3, 40)), [7] * 20]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(tiny_llama), dtype="float32", attention_backend=backend, show_progress=False,
                  max_num_batched_tokens=16)  # chunked prefill: chunks over a cached prefix
        assert llm.engine.runner.attention.name == backend
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert tokens["triton"] == tokens["torch"]
