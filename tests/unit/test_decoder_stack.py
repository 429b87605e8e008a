"""The compiled decoder stack (model/decoder_stack.py) against the Python modules it replaces.

Same ops, same order: tokens and logprobs must be identical, for every
architecture switch (qkv bias, q/k norms), float and packed linears, bf16 and
fp32, decodes alone and decodes mixed with small prefill chunks.
"""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.kernels import cpu_ext
from pagoda.model import decoder_stack
from pagoda.model.decoder_stack import CompiledDecoderStack, decoder_stack_disabled
from pagoda.model.quant import methods, packed
from tests.conftest import TINY_VOCAB, make_tiny_checkpoint


@pytest.fixture(scope="module", autouse=True)
def needs_ops():
    if cpu_ext.cpu_ops() is None:
        pytest.skip("compiled CPU ops are not available on this machine")


@pytest.fixture
def calls(monkeypatch):
    """Counts the steps that ran through the compiled stack."""
    count = {"n": 0}
    real = CompiledDecoderStack.__call__

    def counting(self, *args):
        count["n"] += 1
        return real(self, *args)

    monkeypatch.setattr(CompiledDecoderStack, "__call__", counting)
    return count


def _generate(llm, prompts, params):
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params)]


CASES = [
    ("llama", "bfloat16", "none"),
    ("llama", "bfloat16", "int4"),
    ("llama", "float32", "int8"),
    ("qwen2", "bfloat16", "int8"),  # qkv bias
    ("qwen3", "bfloat16", "none"),  # q/k norms
    ("qwen3", "float32", "int4"),
    ("llama", "bfloat16", "int4+q8"),  # pagoda's GEMV with int8 activations on the 4-bit layers too
]


@pytest.mark.parametrize("arch,dtype,quantization", CASES)
def test_stack_equals_python_modules(tmp_path, calls, monkeypatch, arch, dtype, quantization):
    q8 = quantization.endswith("+q8")
    if q8:
        if not packed.q8_gemv_available():
            pytest.skip("pagoda's int8-activation GEMV needs an AVX-512 BF16 + VNNI build")
        monkeypatch.setitem(packed.GEMV_Q8_ACTIVATIONS, 4, True)
        quantization = quantization.removesuffix("+q8")
    folder = make_tiny_checkpoint(tmp_path, arch)
    # 4-bit layers without W8A8 copies (with them, steps with prompt tokens leave the stack:
    # test_prompt_steps_leave_the_stack_to_w8a8_copies).
    monkeypatch.setattr(methods, "w8a8_fast", lambda: False)
    # A budget of 8 tokens: later steps mix decodes with prefill chunks, all through the stack.
    llm = LLM(str(folder), dtype=dtype, quantization=quantization, attention_backend="cpu",
              show_progress=False, kv_cache_memory=16 * 1024**2, max_num_batched_tokens=8)
    if q8:
        assert any(getattr(getattr(m, "packed", None), "gemv", None) is not None and m.packed.gemv.q8
                   for m in llm.engine.model.model.layers.modules())
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, TINY_VOCAB, (n,), generator=gen).tolist() for n in (1, 3, 20)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    compiled = _generate(llm, prompts, params)
    assert calls["n"] > 10  # the stack really ran
    with decoder_stack_disabled():
        before = calls["n"]
        plain = _generate(llm, prompts, params)
        assert calls["n"] == before
    assert compiled == plain


def test_prompt_steps_leave_the_stack_to_w8a8_copies(tmp_path, calls, monkeypatch):
    """With W8A8 copies (int4 layers of a small model on a VNNI CPU), a step that computes prompt
    tokens runs the Python modules, whose W8A8 copies then serve every row count: a prompt's
    products do not depend on how its prefill was cut. Decode-only steps still take the stack."""
    monkeypatch.setattr(methods, "w8a8_fast", lambda: True)
    folder = make_tiny_checkpoint(tmp_path, "llama")
    llm = LLM(str(folder), dtype="bfloat16", quantization="int4", attention_backend="cpu",
              show_progress=False, kv_cache_memory=16 * 1024**2)
    assert any(getattr(m.packed, "w8a8", None) is not None for m in llm.engine.model.modules()
               if type(m).__name__ == "Linear")
    w8a8_rows = []
    real = packed.Int8Weight.matmul_w8a8
    monkeypatch.setattr(packed.Int8Weight, "matmul_w8a8",
                        lambda self, x, dtype=torch.float32: w8a8_rows.append(x.shape[0]) or real(self, x, dtype))
    llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert w8a8_rows and set(w8a8_rows) == {3}  # the 3-token prompt step, under W8A8_OVER_INT4_ROWS rows
    assert calls["n"] == 3  # the three decode steps


def test_large_steps_and_torch_attention_take_the_python_path(tmp_path, calls):
    folder = make_tiny_checkpoint(tmp_path, "llama")
    llm = LLM(str(folder), dtype="bfloat16", attention_backend="torch", show_progress=False,
              kv_cache_memory=16 * 1024**2)
    llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert calls["n"] == 0
    llm = LLM(str(folder), dtype="bfloat16", attention_backend="cpu", show_progress=False,
              kv_cache_memory=16 * 1024**2)
    prompt = list(range(3, 3 + decoder_stack.STACK_MAX_TOKENS + 1))
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))  # one 65-token step
    assert calls["n"] == 0


@pytest.mark.parametrize("quantization", ["int4", "none"])
def test_decode_batches_up_to_the_row_limit_take_the_stack(tmp_path, monkeypatch, quantization):
    """A decode step of many requests runs in the stack while every layer's Python matmul would
    still take the stack's kernel (the int4 GEMV up to 64 rows where it is built; float: up to
    STACK_MAX_TOKENS), with the same tokens and logprobs as the modules."""
    monkeypatch.setattr(methods, "w8a8_fast", lambda: True)  # the default model's form on VNNI CPUs
    folder = make_tiny_checkpoint(tmp_path, "llama")
    llm = LLM(str(folder), dtype="bfloat16", quantization=quantization, attention_backend="cpu",
              show_progress=False, kv_cache_memory=16 * 1024**2)
    stack = llm.engine.model._decoder_stack()
    if quantization == "none":
        assert stack.max_tokens == decoder_stack.STACK_MAX_TOKENS
    else:  # o_proj / gate_up_proj hold W8A8 copies, qkv_proj / down_proj bf16 copies
        gemv = packed.int4_gemv_available()
        assert stack.max_tokens == min(packed.W8A8_OVER_INT4_ROWS,
                                       packed._GEMV_MAX_ROWS["int4"] if gemv else packed.SMALL_M_MAX)
    rows = []
    real = CompiledDecoderStack.__call__
    monkeypatch.setattr(CompiledDecoderStack, "__call__",
                        lambda self, hidden, *args: rows.append(hidden.shape[0]) or real(self, hidden, *args))
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, TINY_VOCAB, (int(n),), generator=gen).tolist()
               for n in torch.randint(2, 12, (20,), generator=gen)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    compiled = _generate(llm, prompts, params)
    assert (20 in rows) == (stack.max_tokens >= 20)  # the 20-request decode steps
    assert all(n <= stack.max_tokens for n in rows)
    with decoder_stack_disabled():
        plain = _generate(llm, prompts, params)
    assert compiled == plain


def test_without_the_extension_nothing_is_built(monkeypatch, tmp_path):
    monkeypatch.setattr(decoder_stack.cpu_ext, "cpu_ops", lambda: None)
    folder = make_tiny_checkpoint(tmp_path, "llama")
    llm = LLM(str(folder), dtype="float32", attention_backend="torch", show_progress=False,
              kv_cache_memory=16 * 1024**2)
    assert CompiledDecoderStack.build(llm.engine.runner.model.model) is None
