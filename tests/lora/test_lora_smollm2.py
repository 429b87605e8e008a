"""The default model (SmolLM2-135M GGUF, float32, unquantized) with peft adapters: greedy tokens
equal transformers + peft on the same GGUF, alone and mixed with the base model in one batch."""

from __future__ import annotations

import copy

import pytest
import torch

from pagoda import LLM, LoRARequest, SamplingParams
from tests.conftest import requires_smollm2, smollm2_gguf_path
from tests.lora.adapters import greedy_loop

pytestmark = requires_smollm2
NEW_TOKENS = 16
PROMPTS = ["The capital of France is", "def add(a, b):\n", "Once upon a time, in a small village,"]
ADAPTERS = {"attn": (["q_proj", "k_proj", "v_proj", "o_proj"], 8), "all": (
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 16)}


@pytest.fixture(scope="module")
def hf_base():
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()  # converted once; each use takes a copy
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, hf_base):
    from peft import LoraConfig, get_peft_model

    folders = {}
    for seed, (name, (targets, rank)) in enumerate(ADAPTERS.items()):
        model = get_peft_model(copy.deepcopy(hf_base), LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                                                      init_lora_weights=False))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_" in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        folders[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(folders[name])
    return folders


def _hf_greedy(hf_base, adapter, prompt_ids):
    from peft import PeftModel

    model = hf_base
    if adapter is not None:
        model = PeftModel.from_pretrained(copy.deepcopy(hf_base), adapter).eval()
    return greedy_loop(model, prompt_ids, NEW_TOKENS)


def test_default_model_adapters_match_peft_alone_and_mixed(adapters, hf_base):
    llm = LLM("smollm2-135m-instruct", dtype="float32", quantization="none", show_progress=False,
              enable_lora=True, max_loras=2, max_lora_rank=16)
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    loras = [None] + [LoRARequest(name, i, str(path)) for i, (name, path) in enumerate(adapters.items(), 1)]
    cases = [(p, lora) for p in PROMPTS for lora in loras]
    mixed = llm.generate([p for p, _ in cases], params, lora_request=[lora for _, lora in cases])
    for (prompt, lora), output in zip(cases, mixed):
        prompt_ids = tokenizer.encode(prompt)
        reference = _hf_greedy(hf_base, None if lora is None else lora.lora_path, prompt_ids)
        name = "base" if lora is None else lora.lora_name
        assert output.outputs[0].token_ids == reference, (name, prompt)
    for prompt in PROMPTS:
        texts = {tuple(o.outputs[0].token_ids) for (p, _), o in zip(cases, mixed) if p == prompt}
        assert len(texts) > 1, "the adapters should change the output"
    solo = llm.generate([PROMPTS[0]], params, lora_request=loras[2])[0]
    assert solo.outputs[0].token_ids == mixed[2].outputs[0].token_ids
