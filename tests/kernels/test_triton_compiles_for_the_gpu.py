"""The Triton kernels compile for a real GPU target (sm_90, Hopper: H100/H200) without one:
Triton's compiler lowers them through TTGIR, LLVM and PTX to a cubin (ptxas ships with
triton), which catches what the interpreter cannot (tl.dot shape rules, types, shared
memory). Run in a subprocess: the interpreter tests set TRITON_INTERPRET=1 in this one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import inspect, os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pagoda.model.attention import triton_paged as tp

    def build(fn, types, consts):
        names = inspect.signature(fn.fn).parameters
        signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                                target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
        assert kernel.asm.get("cubin"), "no cubin"
        assert kernel.metadata.shared <= 227 * 1024, kernel.metadata.shared

    for dt, group, head_dim, splits, decode in [
            ("bf16", 4, 128, 1, True),      # decodes, Llama-3-8B / 1B-style GQA 4
            ("bf16", 2, 128, 1, False),     # prefill tiles, Qwen3-0.6B GQA 2
            ("fp16", 8, 64, 4, True),       # split-K decodes
            ("fp32", 3, 64, 1, False),      # fp32 (IEEE dots), group not a power of two
            ("fp32", 4, 128, 1, False),     # fp32 prefill at head_dim 128 (the most shared memory)
            ("bf16", 16, 128, 8, True)]:    # group wider than a 16-row tile
        block_q, tile_n = tp._tile_shape(group, head_dim, decode)
        consts = dict(NUM_HEADS=8 * group, GROUP=group, GROUP_P2=triton.next_power_of_2(group),
                      HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim, BLOCK_SIZE=16, BLOCK_Q=block_q, TILE_N=tile_n,
                      NUM_SPLITS=splits, IEEE_DOT=dt == "fp32", WIDEN_DOT=False, TILE_MAP=not decode)
        ptrs = {n: "*" + dt for n in ("out_ptr", "q_ptr", "k_cache_ptr", "v_cache_ptr")}
        ptrs.update({n: "*i32" for n in ("block_tables_ptr", "query_start_loc_ptr", "seq_lens_ptr",
                                         "tile_map_ptr")})
        ptrs.update({n: "*fp32" for n in ("part_acc_ptr", "part_max_ptr", "part_sum_ptr")}, scale="fp32")
        build(tp._paged_attention_kernel, ptrs, consts)
    build(tp._write_kv_kernel, dict(k_ptr="*bf16", v_ptr="*bf16", k_cache_ptr="*bf16", v_cache_ptr="*bf16",
                                    slot_ptr="*i64"),
          dict(NUM_KV_HEADS=3, KV_HEADS_P2=4, HEAD_DIM=64, HEAD_DIM_P2=64, BLOCK_SIZE=16))
    build(tp._merge_splits_kernel, dict(out_ptr="*bf16", part_acc_ptr="*fp32", part_max_ptr="*fp32",
                                        part_sum_ptr="*fp32"),
          dict(NUM_HEADS=32, HEAD_DIM=128, HEAD_DIM_P2=128, NUM_SPLITS=5, SPLITS_P2=8))
    from pagoda.model.layers import triton_fused as tf

    for dt in ("bf16", "fp16", "fp32"):
        build(tf._rms_norm_kernel, dict(x_ptr="*" + dt, residual_ptr="*" + dt, out_ptr="*" + dt, w_ptr="*" + dt,
                                        eps="fp32"),
              dict(HAS_RESIDUAL=True, BLOCK=2048))
        build(tf._rms_norm_kernel, dict(x_ptr="*" + dt, residual_ptr="*" + dt, out_ptr="*" + dt, w_ptr="*" + dt,
                                        eps="fp32"),
              dict(HAS_RESIDUAL=False, BLOCK=128))
        build(tf._rotary_kernel, dict(pos_ptr="*i64", q_ptr="*" + dt, k_ptr="*" + dt, cos_ptr="*fp32",
                                      sin_ptr="*fp32"),
              dict(HALF=32, HALF_P2=32, HEADS_P2=32))
        build(tf._silu_and_mul_kernel, dict(x_ptr="*" + dt, out_ptr="*" + dt), dict(BLOCK=1024))
    print("compiled")
''')


def test_kernels_compile_to_sm90_cubins():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("this triton install has no ptxas")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
