"""Attention backends: the compiled `cpu` kernel against the `torch` reference, and how
a backend is chosen (config, CLI flag, fallback when the kernel cannot load)."""

from __future__ import annotations

import argparse
import logging
import random

import pytest
import torch

from pagoda.config import ConfigError, EngineConfig
from pagoda.entrypoints.engine_args import add_engine_args, engine_kwargs
from pagoda.kernels import cpu_ext
from pagoda.model.attention.backend import select_attention_backend
from pagoda.model.attention.cpu_paged import CpuAttentionBackend, load_cpu_attention_op
from pagoda.model.attention.metadata import StepLayout
from pagoda.model.attention.torch_paged import TorchAttentionBackend

from tests.conftest import requires_smollm2

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cpu_op():
    op = load_cpu_attention_op()
    if op is None:
        pytest.skip("the compiled CPU kernels cannot be built on this machine")
    return op


# ---------------------------------------------------------------- a random paged step


def make_step(rows: list[tuple[int, int]], kv_heads: int, group: int, head_dim: int, dtype: torch.dtype,
              block_size: int = 16, seed: int = 0, extra_pad_blocks: int = 2):
    """A step over `rows` = [(query_len, seq_len)] (decodes first) with shuffled, non-contiguous
    blocks, tables padded with 0 past each row's last block, and a cache full of stale data.

    Returns (layout, q, k, v, k_cache, v_cache) with the prefix of every row already cached."""
    gen = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    blocks_per_row = [-(-seq_len // block_size) for _, seq_len in rows]
    num_blocks = sum(blocks_per_row) + 7  # spare blocks that no row owns
    ids = list(range(1, num_blocks))  # block 0 only ever appears as padding (it still holds data)
    rnd.shuffle(ids)
    max_blocks = max(blocks_per_row) + extra_pad_blocks
    tables = torch.zeros(len(rows), max_blocks, dtype=torch.int32)
    for r, n in enumerate(blocks_per_row):
        tables[r, :n] = torch.tensor([ids.pop() for _ in range(n)], dtype=torch.int32)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    query_lens = [q for q, _ in rows]
    seq_lens = [s for _, s in rows]
    num_tokens = sum(query_lens)
    heads = kv_heads * group
    q = torch.randn(num_tokens, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(dtype)
    num_decodes = sum(1 for q_len, seq_len in rows if q_len == 1 and seq_len > 1)
    layout = StepLayout.build(query_lens, seq_lens, num_decodes, tables, block_size)
    return layout, q, k, v, k_cache, v_cache


def run_backend(backend, layout, q, k, v, k_cache, v_cache):
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    meta = backend.build_metadata(layout)
    out = backend.forward(q, k, v, k_cache, v_cache, meta, q.shape[-1] ** -0.5)
    return out, k_cache, v_cache


TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
             torch.float16: dict(atol=3e-3, rtol=3e-3)}


def check_against_torch(op, rows, kv_heads, group, head_dim, dtype, num_splits=0, seed=0, block_size=16):
    step = make_step(rows, kv_heads, group, head_dim, dtype, block_size=block_size, seed=seed)
    expected, ek, ev = run_backend(TorchAttentionBackend(group), *step)
    got, gk, gv = run_backend(CpuAttentionBackend(op, num_splits), *step)
    assert got.shape == expected.shape and got.dtype == dtype
    torch.testing.assert_close(gk, ek, atol=0, rtol=0)  # this step's K/V written to the same slots
    torch.testing.assert_close(gv, ev, atol=0, rtol=0)
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])
    if dtype != torch.float32:  # and closer to the fp32 truth than a rounding step of `dtype`
        step32 = tuple(x.float() if x.is_floating_point() else x for x in step[1:])
        truth, _, _ = run_backend(TorchAttentionBackend(group), step[0], *step32)
        torch.testing.assert_close(got.float(), truth, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- parity with torch

BS = 16
ODD_LENGTHS = [2, BS - 1, BS, BS + 1, 3 * BS + 5, 300, 1000]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_decodes_match_torch(cpu_op, dtype, head_dim, group):
    rows = [(1, n) for n in ODD_LENGTHS]
    check_against_torch(cpu_op, rows, kv_heads=2, group=group, head_dim=head_dim, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_mixed_decodes_and_prefill_chunks_match_torch(cpu_op, dtype, group):
    rows = [(1, 17), (1, 2), (1, 700), (1, 33),
            (5, 5),            # a whole short prompt
            (37, 37 + 64),     # a chunk over a cached prefix ending on a block boundary
            (16, 16 + 23),     # a chunk over an odd prefix
            (1, 1),            # a one-token prompt (a prefill row with one query)
            (100, 100)]        # a whole prompt over several query tiles
    check_against_torch(cpu_op, rows, kv_heads=3, group=group, head_dim=64, dtype=dtype, seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [[(512, 1024)], [(1, 1), (2, 2), (3, 3)], [(BS + 1, BS + 1), (BS - 1, 2 * BS)],
                                  [(1, 1100), (600, 1100)]])  # bf16: keys in chunks of 512
def test_prefill_only_steps_match_torch(cpu_op, rows, dtype):
    check_against_torch(cpu_op, rows, kv_heads=3, group=3, head_dim=64, dtype=dtype, seed=2)


@pytest.mark.parametrize("num_splits", [2, 3, 7, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_decodes_merge_to_the_same_answer(cpu_op, num_splits, dtype):
    # Flash-decoding ranges (forced here; chosen from the thread count otherwise), with
    # rows shorter than the number of ranges asked for.
    rows = [(1, n) for n in (2, 40, 257, 2048)]
    check_against_torch(cpu_op, rows, kv_heads=3, group=3, head_dim=64, dtype=dtype, num_splits=num_splits)


def test_float16_and_other_block_sizes(cpu_op):
    rows = [(1, 9), (1, 50), (7, 30)]
    check_against_torch(cpu_op, rows, kv_heads=2, group=2, head_dim=64, dtype=torch.float16)
    for block_size in (1, 8, 32):
        check_against_torch(cpu_op, rows, kv_heads=2, group=4, head_dim=64, dtype=torch.float32,
                            block_size=block_size)


def test_rows_in_any_order_and_unsorted_decodes(cpu_op):
    # Decodes shortest first: the torch builder sorts them itself (index groups, not slices).
    rows = [(1, 3), (1, 90), (1, 20), (1, 91), (1, 89)]
    check_against_torch(cpu_op, rows, kv_heads=3, group=3, head_dim=64, dtype=torch.float32, seed=3)


def test_uses_every_thread_for_one_long_decode(cpu_op):
    # Batch 1, 3 KV heads: with 2+ threads the kernel splits the sequence; the answer must
    # not depend on the thread count.
    step = make_step([(1, 2000)], kv_heads=3, group=3, head_dim=64, dtype=torch.float32, seed=4)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            outs.append(run_backend(CpuAttentionBackend(cpu_op), *step)[0])
    finally:
        torch.set_num_threads(threads)
    expected = run_backend(TorchAttentionBackend(3), *step)[0]
    for out in outs:
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("q_len", [2, 5, 8])
def test_a_verifying_row_scores_each_token_as_a_decode_would(cpu_op, q_len, head_dim):
    """A row of up to 8 tokens (a decode verifying drafts) gives, bit for bit, what each of its
    tokens gives as a one-token decode over the same keys, at 1, 2 and 4 threads (the kernel
    cuts short rows into one tile per thread; speculation relies on the bits)."""
    seq_len = 300
    layout, q, k, v, k_cache, v_cache = make_step([(q_len, seq_len)], kv_heads=3, group=3, head_dim=head_dim,
                                                  dtype=torch.bfloat16, seed=q_len)
    backend = CpuAttentionBackend(cpu_op, num_splits=1)  # decodes unsplit, as speculation runs them
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            out, k_after, v_after = run_backend(backend, layout, q, k, v, k_cache, v_cache)
            for i in range(q_len):  # token i alone: a decode at position seq_len - q_len + i
                one = StepLayout.build([1], [seq_len - q_len + i + 1], 1, layout.block_tables, 16)
                alone, _, _ = run_backend(backend, one, q[i:i + 1], k[i:i + 1], v[i:i + 1], k_after, v_after)
                assert torch.equal(alone[0], out[i]), (n, i)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stale_slots_holding_nan_never_reach_the_output(cpu_op, dtype):
    """Slots past a row's last key (a block's unwritten tail) may hold anything, NaN and inf
    included: the kernel never lets them into a score or a weighted value."""
    rows = [(1, 37), (1, 16 * 3 + 1), (5, 70), (20, 45)]
    layout, q, k, v, k_cache, v_cache = make_step(rows, kv_heads=3, group=3, head_dim=64, dtype=dtype, seed=7)
    backend = CpuAttentionBackend(cpu_op)
    clean, _, _ = run_backend(backend, layout, q, k, v, k_cache, v_cache)
    dirty_k, dirty_v = k_cache.clone(), v_cache.clone()
    for r, (_, seq_len) in enumerate(rows):
        last = int(layout.block_tables[r, (seq_len - 1) // 16])
        dirty_k[last, seq_len % 16 or 16:] = float("nan")
        dirty_v[last, seq_len % 16 or 16:] = float("inf")
    dirty, _, _ = run_backend(backend, layout, q, k, v, dirty_k, dirty_v)
    assert torch.isfinite(dirty).all()
    assert torch.equal(dirty, clean)


def test_write_kv_equals_index_copy_and_refuses_slots_outside_the_cache(cpu_op):
    gen = torch.Generator().manual_seed(11)
    k_cache, v_cache = torch.randn(4, 16, 3, 64, generator=gen), torch.randn(4, 16, 3, 64, generator=gen)
    qkv = torch.randn(5, 9 * 64 + 2 * 3 * 64, generator=gen)  # k and v as views of a fused row
    k = qkv[:, 9 * 64:12 * 64].view(5, 3, 64)
    v = qkv[:, 12 * 64:].view(5, 3, 64)
    slots = torch.tensor([63, 0, 17, 40, 5])
    ek, ev = k_cache.clone(), v_cache.clone()
    ek.view(-1, 3, 64).index_copy_(0, slots, k)
    ev.view(-1, 3, 64).index_copy_(0, slots, v)
    torch.ops.pagoda.write_kv(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache, ek) and torch.equal(v_cache, ev)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.pagoda.write_kv(k_cache, v_cache, k, v, torch.tensor([0, 1, 2, 3, 64]))


def test_the_kernel_refuses_a_table_too_short(cpu_op):
    layout, q, k, v, k_cache, v_cache = make_step([(1, 40)], 1, 1, 64, torch.float32, extra_pad_blocks=0)
    layout.seq_lens_tensor[0] = 40 + 3 * BS  # would read past the table
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        run_backend(CpuAttentionBackend(cpu_op), layout, q, k, v, k_cache, v_cache)


# ---------------------------------------------------------------- choosing a backend


def test_auto_picks_cpu_where_the_kernel_loads(cpu_op):
    assert select_attention_backend("auto", CPU, 9, 3).name == "cpu"
    assert select_attention_backend("cpu", CPU, 9, 3).name == "cpu"
    assert select_attention_backend("torch", CPU, 9, 3).name == "torch"


def test_forced_fallback_gives_torch_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setenv(cpu_ext.DISABLE_ENV, "1")
    cpu_ext.reset_for_tests()
    try:
        with caplog.at_level(logging.INFO):
            assert select_attention_backend("auto", CPU, 9, 3).name == "torch"
            assert select_attention_backend("auto", CPU, 9, 3).name == "torch"  # tried once, logged once
        lines = [r for r in caplog.records if r.name.startswith("pagoda")]
        assert len(lines) == 1 and cpu_ext.DISABLE_ENV in lines[0].getMessage()
        with pytest.raises(ConfigError, match="attention_backend='cpu' is invalid: its compiled kernel could not"):
            select_attention_backend("cpu", CPU, 9, 3)
    finally:
        monkeypatch.delenv(cpu_ext.DISABLE_ENV)
        cpu_ext.reset_for_tests()


def test_an_extension_without_the_op_falls_back(monkeypatch):
    monkeypatch.setattr(cpu_ext, "cpu_ops", lambda: object())  # loaded, but no paged_attention
    assert load_cpu_attention_op() is None
    assert select_attention_backend("auto", CPU, 9, 3).name == "torch"


def test_cpu_backend_refuses_other_devices():
    with pytest.raises(ConfigError, match="runs on device='cpu' only"):
        select_attention_backend("cpu", torch.device("cuda"), 9, 3)
    # auto on CUDA: triton where it imports (and no interpreter is on), else torch
    # (tests/kernels/test_triton_attention.py checks which).
    assert select_attention_backend("auto", torch.device("cuda"), 9, 3).name in ("triton", "torch")


def test_config_and_cli_name_the_allowed_backends():
    with pytest.raises(ConfigError, match="attention_backend='flash' is invalid: must be one of auto, torch, cpu, triton"):
        EngineConfig(attention_backend="flash")
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_kwargs(parser.parse_args([]))["attention_backend"] == "auto"
    assert engine_kwargs(parser.parse_args(["--attention-backend", "torch"]))["attention_backend"] == "torch"
    assert engine_kwargs(parser.parse_args(["--attention-backend", "triton"]))["attention_backend"] == "triton"
    assert engine_kwargs(parser.parse_args([]))["enforce_eager"] is False
    assert engine_kwargs(parser.parse_args(["--enforce-eager"]))["enforce_eager"] is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--attention-backend", "flash"])


# ---------------------------------------------------------------- end to end


def test_tiny_model_same_tokens_with_either_backend(cpu_op, tiny_llama):
    from pagoda import LLM, SamplingParams

    prompts = [[1, 5, 9, 200, 33], list(range(3, 60)), [7] * 20]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "cpu"):
        llm = LLM(str(tiny_llama), dtype="float32", attention_backend=backend, show_progress=False,
                  max_num_batched_tokens=32)  # chunked prefill: chunks over a cached prefix
        assert llm.engine.runner.attention.name == backend
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert tokens["cpu"] == tokens["torch"]


@requires_smollm2
def test_default_model_same_greedy_tokens_with_either_backend(cpu_op):
    from pagoda import LLM, SamplingParams

    prompts = ["The capital of France is", "Write a haiku about paging memory.", "1, 2, 3, 4,"]
    params = SamplingParams(temperature=0.0, max_tokens=32)
    tokens = {}
    for backend in ("torch", "cpu"):
        llm = LLM(dtype="float32", attention_backend=backend, show_progress=False)
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert tokens["cpu"] == tokens["torch"]


def test_step_layout_derives_the_slots_of_each_query_token():
    tables = torch.tensor([[7, 3, 0], [5, 9, 2]], dtype=torch.int32)
    layout = StepLayout.build([1, 3], [6, 10], 1, tables, 4)
    # Row 0: position 5 -> block 3, offset 1. Row 1: positions 7, 8, 9 -> block 9 offset 3, block 2 offsets 0, 1.
    assert layout.slot_mapping.tolist() == [3 * 4 + 1, 9 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1]
    assert layout.query_start_loc.tolist() == [0, 1, 4] and layout.seq_lens_tensor.tolist() == [6, 10]
