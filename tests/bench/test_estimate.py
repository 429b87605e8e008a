"""The estimator against known worked examples, and its parts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pagoda.estimate.hardware import ACCELERATORS, lookup
from pagoda.estimate.model_shape import KNOWN_SHAPES, ModelShape
from pagoda.estimate.roofline import Workload, estimate


def test_qwen2_5_32b_parameters_and_prefill_flops():
    shape = KNOWN_SHAPES["qwen2.5-32b"]
    assert shape.simple_params / 1e9 == pytest.approx(31.98, abs=0.01)
    # 1024-token prefill at batch 1: 2 * P_layers * T + the attention term.
    assert shape.prefill_flops(1024) / 1e12 == pytest.approx(65.3, abs=0.05)
    # The full count adds the untied LM head, norms and q/k/v biases: the published 32.8B.
    assert shape.total_params() / 1e9 == pytest.approx(32.76, abs=0.01)


def test_llama_2_7b_on_an_a10():
    shape = KNOWN_SHAPES["llama-2-7b"]
    assert shape.total_params() / 1e9 == pytest.approx(6.74, abs=0.01)
    a10 = lookup("A10")
    assert (a10.peak_flops("fp16"), a10.bandwidth) == (125e12, 600e9)
    e = estimate(shape, a10, Workload(prompt_len=350, output_len=1, dtype="fp16"))
    # The worked example rounds the model to "7B" params (2 * 7e9 * 350 / 125e12 = 39.2 ms);
    # with its exact 6.74B params (6.48B in the layers) the prefill is 36.8 ms.
    assert e.ttft_s * 1000 == pytest.approx(39, rel=0.07)
    assert e.ttft_s * 1000 == pytest.approx(36.8, abs=0.1)
    assert e.ttft_bound == "compute"
    # Decode reads every weight once per token: 13.5 GB / 600 GB/s.
    assert e.tpot_s * 1000 == pytest.approx(23, rel=0.02)
    assert e.tpot_bound == "memory"
    assert e.decode_intensity < e.ridge_point < e.prefill_intensity


def test_kv_cache_and_what_fits():
    shape = KNOWN_SHAPES["llama-3.1-8b"]
    assert shape.kv_bytes_per_token(2) == 2 * 32 * 8 * 128 * 2  # 128 KiB per token in bf16
    h100 = lookup("h100_sxm")
    w = Workload(batch_size=8, prompt_len=1000, output_len=1000, dtype="bf16")
    e = estimate(shape, h100, w)
    room = 80e9 * 0.9 - shape.total_params() * 2
    assert e.max_batch_size == int(room // (2000 * shape.kv_bytes_per_token(2)))
    assert e.fits and e.kv_bytes == 8 * 2000 * 131072
    assert e.max_context_len == int(room // (8 * 131072))
    fp8_kv = estimate(shape, h100, Workload(batch_size=8, prompt_len=1000, output_len=1000, kv_cache_dtype="fp8"))
    assert fp8_kv.max_batch_size == pytest.approx(2 * e.max_batch_size, abs=1)
    too_big = estimate(KNOWN_SHAPES["llama-3.1-70b"], h100, Workload())
    assert not too_big.fits and too_big.max_batch_size == 0
    split = estimate(KNOWN_SHAPES["llama-3.1-70b"], h100, Workload(tensor_parallel_size=2))
    assert split.fits and split.tpot_s == pytest.approx(too_big.tpot_s / 2, rel=0.01)


def test_batching_moves_decode_toward_compute_bound():
    shape, gpu = KNOWN_SHAPES["llama-3.1-8b"], lookup("A100-80GB")
    single = estimate(shape, gpu, Workload(batch_size=1, prompt_len=128, output_len=128))
    big = estimate(shape, gpu, Workload(batch_size=256, prompt_len=128, output_len=128))
    assert single.tpot_bound == "memory" and big.decode_intensity > 100 * single.decode_intensity
    assert big.decode_tokens_per_s > 50 * single.decode_tokens_per_s


def test_moe_total_and_active_parameters():
    shape = KNOWN_SHAPES["mixtral-8x7b"]
    assert shape.total_params() / 1e9 == pytest.approx(46.7, abs=0.1)
    assert shape.total_params(active=True) / 1e9 == pytest.approx(12.9, abs=0.1)
    assert "mlp active" in shape.param_breakdown()


def test_shape_from_a_transformers_config_matches_the_table():
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                         intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False)
    shape = ModelShape.from_hf_config(config, name="qwen2.5-32b")
    known = KNOWN_SHAPES["qwen2.5-32b"]
    assert shape.total_params() == known.total_params()
    assert shape.prefill_flops(1024) == known.prefill_flops(1024)


def test_every_accelerator_has_a_16_bit_peak_and_bad_names_are_refused():
    for accelerator in ACCELERATORS.values():
        assert accelerator.peak_flops("bf16") > 0 and accelerator.bandwidth > 0
    with pytest.raises(ValueError, match="not in the table"):
        lookup("TPU-v9")
    with pytest.raises(ValueError, match="fp8"):
        lookup("A10").peak_flops("fp8")
    with pytest.raises(ValueError, match="batch_size"):
        Workload(batch_size=0)


def test_cli_prints_formulas_and_json():
    text = subprocess.run([sys.executable, "-m", "pagoda", "estimate", "qwen2.5-32b", "--gpu", "H100-SXM",
                           "--prompt-len", "1024", "--output-len", "1"], capture_output=True, text=True, check=True)
    assert "65.29 TFLOP" in text.stdout and "2 * L * k * a" in text.stdout and "memory-bound" in text.stdout
    out = subprocess.run([sys.executable, "-m", "pagoda", "estimate", "llama-2-7b", "--gpu", "A10", "--dtype",
                          "fp16", "--prompt-len", "350", "--output-len", "1", "--json"],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["estimate"]["ttft_s"] == pytest.approx(0.0368, abs=0.0002)
    bad = subprocess.run([sys.executable, "-m", "pagoda", "estimate", "no-such-model"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Known shapes" in bad.stderr


def test_estimate_of_a_local_checkpoint(tiny_llama):
    out = subprocess.run([sys.executable, "-m", "pagoda", "estimate", str(tiny_llama), "--gpu", "L4", "--json"],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert data["estimate"]["params"]["total"] == sum(p.numel() for p in model.parameters())
