"""The default model (SmolLM2-135M-Instruct, GGUF) matches transformers on the same file."""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM, SamplingParams
from tests.conftest import requires_smollm2, smollm2_gguf_path

pytestmark = requires_smollm2

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "woodcutter and his three children. Every morning, before the sun rose over the hills,",
    "1, 2, 3, 4,",
]
NEW_TOKENS = 24
LOGPROB_ATOL = 1e-3  # see tests/models/test_parity.py for the reasoning


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m-instruct", dtype="float32", show_progress=False)


def test_greedy_and_logprobs_match_transformers(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    outputs = llm.generate(PROMPTS, params)
    tokenizer = llm.get_tokenizer()
    for prompt, output in zip(PROMPTS, outputs):
        ids = tokenizer.encode(prompt)
        assert output.prompt_token_ids == ids
        ref = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=2,
        )
        assert output.outputs[0].token_ids == ref.sequences[0, len(ids):].tolist(), prompt
        ref_logprobs = torch.log_softmax(torch.stack(ref.logits).squeeze(1).float(), dim=-1)
        for step, entry in enumerate(output.outputs[0].logprobs):
            top = ref_logprobs[step].topk(5)
            for token_id, value in zip(top.indices.tolist(), top.values.tolist()):
                assert abs(entry[token_id] - value) < LOGPROB_ATOL, (prompt, step, token_id)
        assert output.outputs[0].text == tokenizer.decode(output.outputs[0].token_ids, skip_special_tokens=True)


def test_prompt_logprobs_match_transformers(llm, hf_model):
    prompt = PROMPTS[2]
    output = llm.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=3))[0]
    ids = output.prompt_token_ids
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    assert output.prompt_logprobs[0] is None
    assert len(output.prompt_logprobs) == len(ids)
    for position in range(1, len(ids)):
        entry = output.prompt_logprobs[position]
        assert abs(entry[ids[position]] - ref[position - 1, ids[position]].item()) < LOGPROB_ATOL


def test_chat_answers_and_stops_at_end_of_turn(llm):
    output = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=40)
    )[0]
    completion = output.outputs[0]
    assert "Paris" in completion.text
    assert completion.finish_reason == "stop"
    assert completion.token_ids[-1] == llm.get_tokenizer().convert_tokens_to_ids("<|im_end|>")
    assert "<|im_end|>" not in completion.text
