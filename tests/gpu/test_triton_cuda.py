"""The Triton attention backend and CUDA graphs on a real GPU. Skips without CUDA, and where
this process runs Triton's interpreter (tests/kernels/ sets TRITON_INTERPRET=1: run tests/gpu
in a process of its own, as benchmarks/gpu_suite.py does)."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.compiled_triton import require_compiled_triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
require_compiled_triton()

from tests.models.test_attention_backends import TOLERANCE, make_step  # noqa: E402

CUDA = torch.device("cuda")


def _run(backend, layout, q, k, v, k_cache, v_cache):
    from pagoda.model.attention.metadata import StepLayout

    moved = StepLayout.build(layout.query_lens, layout.seq_lens, layout.num_decodes, layout.block_tables.to(CUDA),
                             layout.block_size, slot_mapping=layout.slot_mapping.to(CUDA))
    k_cache, v_cache = k_cache.to(CUDA), v_cache.to(CUDA)
    meta = backend.build_metadata(moved)
    out = backend.forward(q.to(CUDA), k.to(CUDA), v.to(CUDA), k_cache, v_cache, meta, q.shape[-1] ** -0.5)
    return out.cpu(), k_cache.cpu(), v_cache.cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("num_splits", [0, 1, 5])
def test_kernels_match_torch_on_the_gpu(dtype, group, num_splits):
    from pagoda.model.attention.torch_paged import TorchAttentionBackend
    from pagoda.model.attention.triton_paged import TritonAttentionBackend

    rows = [(1, 4000), (1, 17), (1, 700), (37, 37 + 64), (100, 100), (1, 1)]
    step = make_step(rows, kv_heads=2, group=group, head_dim=128, dtype=dtype, seed=7)
    expected, ek, ev = _run(TorchAttentionBackend(group), *step)
    got, gk, gv = _run(TritonAttentionBackend(2 * group, 2, num_splits), *step)
    torch.testing.assert_close(gk, ek, atol=0, rtol=0)
    torch.testing.assert_close(gv, ev, atol=0, rtol=0)
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])


def test_cuda_graphs_give_the_eager_tokens(tiny_llama):
    from pagoda import LLM, SamplingParams

    prompts = [[1, 5, 9, 200, 33], list(range(3, 60)), [7] * 20, [4, 4, 8]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (24, 17, 9, 30)]
    tokens = {}
    for name, kwargs in {"torch": dict(attention_backend="torch", enforce_eager=True),
                         "eager": dict(attention_backend="triton", enforce_eager=True),
                         "graphs": dict(attention_backend="triton", max_num_seqs=16)}.items():
        llm = LLM(str(tiny_llama), dtype="float32", device="cuda", show_progress=False, **kwargs)
        graphs = llm.engine.runner.cuda_graphs
        assert (graphs is not None) == (name == "graphs")
        tokens[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        if graphs is not None:
            assert graphs.num_replays > 0 and sorted(graphs.graphs) == [1, 2, 4, 8, 16]
        del llm
        torch.cuda.empty_cache()
    assert tokens["eager"] == tokens["torch"]
    assert tokens["graphs"] == tokens["torch"]


def test_auto_picks_triton_on_cuda():
    from pagoda.model.attention.backend import select_attention_backend

    assert select_attention_backend("auto", CUDA, 8, 2).name == "triton"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_layer_kernels_match_the_torch_code_on_the_gpu(dtype):
    # model/layers/triton_fused.py compiled, against the layers' torch code on the same GPU.
    from pagoda.model.layers import triton_fused
    from pagoda.model.layers.activation import silu_and_mul_torch
    from pagoda.model.layers.norm import rms_norm_torch
    from pagoda.model.layers.rotary import RopeSpec, RotaryEmbedding

    gen = torch.Generator(device=CUDA).manual_seed(0)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    x = torch.randn(33, 2048, device=CUDA, generator=gen).to(dtype)
    residual = torch.randn(33, 2048, device=CUDA, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(2048, device=CUDA, generator=gen)).to(dtype)
    torch.testing.assert_close(triton_fused.rms_norm(x, weight, 1e-5), rms_norm_torch(x, weight, 1e-5), **tol)
    want_sum = x + residual
    want = rms_norm_torch(want_sum, weight, 1e-5)
    triton_fused.fused_add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(residual, want_sum)
    torch.testing.assert_close(x, want, **tol)

    rope = RotaryEmbedding(RopeSpec(head_dim=128, theta=1e6), 4096)
    rope.build(CUDA)
    qkv = torch.randn(33, (16 + 2 * 8) * 128, device=CUDA, generator=gen).to(dtype)
    q, k = qkv[:, :2048].view(33, 16, 128), qkv[:, 2048:3072].view(33, 8, 128)
    positions = torch.randint(0, 4096, (33,), device=CUDA, generator=gen)
    want_q, want_k = rope.forward_torch(positions, q, k)
    triton_fused.rotary_embedding(positions, q, k, rope.cos_cache, rope.sin_cache)
    torch.testing.assert_close(q, want_q, **tol)
    torch.testing.assert_close(k, want_k, **tol)

    gate_up = (3 * torch.randn(33, 2 * 3072, device=CUDA, generator=gen)).to(dtype)
    torch.testing.assert_close(triton_fused.silu_and_mul(gate_up), silu_and_mul_torch(gate_up), **tol)
    nan = torch.full((1, 8), float("nan"), device=CUDA, dtype=torch.float32).to(dtype)
    assert torch.isnan(triton_fused.rms_norm(nan, weight[:8], 1e-5)).all()  # NaN stays NaN


def test_bf16_models_give_the_same_tokens_with_the_fused_kernels(tiny_llama):
    # The whole model in bf16 on CUDA, with the fused kernels and with the torch code.
    from pagoda import LLM, SamplingParams
    from pagoda.model.layers.fused import fused_ops_disabled

    # Eager: graphs captured with the kernels would replay them inside fused_ops_disabled() too.
    llm = LLM(str(tiny_llama), dtype="bfloat16", device="cuda", show_progress=False, enforce_eager=True)
    prompts = [[1, 5, 9, 200, 33], list(range(3, 60))]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    fused = llm.generate(prompts, params)
    with fused_ops_disabled():
        plain = llm.generate(prompts, params)
    for a, b in zip(fused, plain):
        # tokens may part where two logits tie within bf16 noise; until then they agree
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        same = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
        assert same >= 4, (ta, tb)


def test_the_kv_cache_is_sized_after_the_largest_steps_peak(tiny_llama):
    # engine/memory_profile.py: the largest prefill ran once before the cache took the rest.
    from pagoda import LLM, SamplingParams

    llm = LLM(str(tiny_llama), dtype="float32", device="cuda", show_progress=False, max_num_batched_tokens=4096,
              max_num_seqs=8, gpu_memory_utilization=0.5)
    engine = llm.engine
    assert engine.profiled_step_bytes is not None and engine.profiled_step_bytes > 0
    free, total = torch.cuda.mem_get_info()
    kv_bytes = sum(2 * k.numel() * k.element_size() for k, _ in engine.kv_caches)
    assert kv_bytes < 0.5 * total  # within the utilisation asked for
    prompts = [[5 + (i * 7 + j) % 400 for j in range(1000)] for i in range(4)]  # one 4,000-token step
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
