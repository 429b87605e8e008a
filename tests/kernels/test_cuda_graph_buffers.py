"""CUDA-graph plumbing (worker/cuda_graphs.py) without a GPU: the static buffers, bucket
padding (slot -1, seq_len 1) and per-bucket metadata, run in `dry_run` mode (the forward pass
runs eagerly over the static buffers at each replay instead of a captured graph) with the
Triton kernels under the interpreter; the tiny model must give the torch backend's tokens.
The capture itself needs CUDA (tests/gpu/test_cuda_graphs.py)."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton_paged (and its kernels) is imported

import pytest  # noqa: E402

pytest.importorskip("triton")

from pagoda.model.attention.triton_paged import interpreter_active  # noqa: E402
from pagoda.worker.cuda_graphs import CudaGraphRunner, capture_decode_graphs, graph_batch_sizes  # noqa: E402

if not interpreter_active():
    pytest.skip("triton_paged was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)


def test_bucket_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(30) == [1, 2, 4, 8, 16, 24, 30]
    assert graph_batch_sizes(10_000)[-3:] == [496, 504, 512]


def test_padded_static_buffers_give_the_same_tokens_as_torch(tiny_llama):
    from pagoda import LLM, SamplingParams

    prompts = [[1, 5, 9, 200, 33], list(range(3, 40)), [7] * 20]
    # Different lengths: the decode batch shrinks 3 -> 2 -> 1 (buckets 4, 2, 1, with padding at 3).
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (9, 6, 3)]
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(tiny_llama), dtype="float32", attention_backend=backend, show_progress=False,
                  max_num_seqs=8)
        runner = llm.engine.runner
        assert runner.cuda_graphs is None  # CPU: no graphs at start-up
        assert capture_decode_graphs(runner, 8, 1024, enforce_eager=False) is None
        if backend == "triton":
            runner.cuda_graphs = CudaGraphRunner(runner, 8, llm.engine.max_model_len, dry_run=True).capture()
            assert sorted(runner.cuda_graphs.graphs) == [1, 2, 4, 8]
            assert runner.cuda_graphs._metadata(1).num_splits > 1  # batch 1: split-K baked into the bucket
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        if backend == "triton":
            assert runner.cuda_graphs.num_replays == 8  # every decode step (prefills ran eagerly)
    assert tokens["triton"] == tokens["torch"]


def test_only_the_triton_backend_takes_graphs(tiny_llama):
    from pagoda import LLM

    llm = LLM(str(tiny_llama), dtype="float32", attention_backend="torch", show_progress=False)
    with pytest.raises(ValueError, match="need the triton attention backend"):
        CudaGraphRunner(llm.engine.runner, 4, 64, dry_run=True)
