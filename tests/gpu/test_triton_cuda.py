"""The Triton attention backend and CUDA graphs on a real GPU. Skips without CUDA, and where
this process runs Triton's interpreter (tests/kernels/ sets TRITON_INTERPRET=1: run tests/gpu
in a process of its own, as benchmarks/gpu_suite.py does)."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

if torch.cuda.is_available():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process", allow_module_level=True)

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
