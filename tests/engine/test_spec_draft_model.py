"""Draft-model speculative decoding against the same engine without speculation.

Greedy tokens must be identical, alone and batched, through chunked prefill, preemption
(recompute and swap), prefix-cache hits, n > 1 and streaming. A draft that is the target
itself proposes what the target would emit, so every draft must be accepted: any hole in
the draft's KV cache (a block it did not mirror, a move it missed) shows as a rejection.
A different random model with the same vocabulary gives (near) zero acceptance, and must
still give the same tokens.
"""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from pagoda.config import ConfigError
from pagoda.engine.spec_decode.config import SpeculativeConfig
from pagoda.sampling_params import RequestOutputKind
from tests.conftest import make_tiny_checkpoint, requires_smollm2, smollm2_gguf_path
from tests.engine.test_spec_decode import GREEDY, llm_for, repetitive_prompts, spec_stats, tokens


def draft_spec(model=None, k=4, **extra) -> dict:
    # A step of up to 16 tokens may carry drafts, and drafts cost nothing (every proposal is
    # verified): the batched tests verify drafts of several rows at once.
    return {"method": "draft_model", "model": model, "num_speculative_tokens": k, "max_tokens_per_step": 16,
            "step_cost": [1.0], **extra}


def plain_tokens(folder, prompts, params, **kwargs) -> list[list[int]]:
    plain = llm_for(folder, None, **kwargs)
    plain.engine.runner.attention.num_splits = 1  # as the speculating engine (ModelRunner split_decodes)
    return tokens(plain, prompts, params)


def assert_all_accepted(llm: LLM) -> None:
    stats = spec_stats(llm)
    assert stats.num_drafts > 5 and stats.num_accepted_tokens == stats.num_draft_tokens, stats


@pytest.fixture
def other_draft(tmp_path):
    """A different random model (1 layer, narrower) with the tiny models' vocabulary."""
    return make_tiny_checkpoint(tmp_path / "draft", "llama", num_hidden_layers=1, hidden_size=32,
                                intermediate_size=64, head_dim=8, num_attention_heads=4, num_key_value_heads=1)


@pytest.mark.parametrize("arch,dtype", [("llama", "float32"), ("qwen3", "float32"), ("qwen2", "bfloat16")])
def test_self_draft_is_identical_and_fully_accepted(tmp_path, arch, dtype):
    folder = make_tiny_checkpoint(tmp_path, arch)
    prompts = repetitive_prompts()
    expected = plain_tokens(folder, prompts, GREEDY, dtype=dtype)
    spec = llm_for(folder, draft_spec(quantization="none"), dtype=dtype)
    assert tokens(spec, prompts, GREEDY) == expected  # batched
    assert [tokens(spec, [p], GREEDY)[0] for p in prompts] == expected  # alone
    if dtype == "float32":  # bf16: the draft's batch shapes may round a near tie the other way
        assert_all_accepted(spec)
    assert spec_stats(spec).mean_acceptance_length > 3.5


@pytest.mark.parametrize("draft_arch", ["llama", "qwen3"])
def test_other_draft_model_low_acceptance_same_tokens(tmp_path, other_draft, draft_arch):
    folder = make_tiny_checkpoint(tmp_path / "target", "llama")
    if draft_arch != "llama":  # another architecture with the same vocabulary drafts as well
        other_draft = make_tiny_checkpoint(tmp_path / "draft_qwen3", draft_arch, num_hidden_layers=1,
                                           hidden_size=48, head_dim=12, num_key_value_heads=4)
    prompts = repetitive_prompts()
    expected = plain_tokens(folder, prompts, GREEDY, dtype="float32")
    spec = llm_for(folder, draft_spec(str(other_draft), disable_after_drafts=1000), dtype="float32")
    assert tokens(spec, prompts, GREEDY) == expected
    assert [tokens(spec, [p], GREEDY)[0] for p in prompts] == expected
    stats = spec_stats(spec)
    assert stats.num_draft_tokens > 100 and stats.num_accepted_tokens < 0.2 * stats.num_draft_tokens
    # And its KV cache is counted: the same budget holds fewer blocks than without a draft.
    assert spec.engine.kv_cache_manager.pool.num_blocks < llm_for(folder, None, dtype="float32") \
        .engine.kv_cache_manager.pool.num_blocks


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_chunked_prefill_and_preemption_keep_the_draft_kv(tmp_path, mode):
    folder = make_tiny_checkpoint(tmp_path, "llama")
    prompts = repetitive_prompts(1)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    # 12 blocks of 16 tokens for 4 requests of up to 88 tokens: preemptions; 16-token steps: chunked prefill.
    tight = dict(dtype="float32", num_blocks=12, max_num_batched_tokens=16, max_model_len=160,
                 preemption_mode=mode)
    expected = plain_tokens(folder, prompts, params, **tight)
    spec = llm_for(folder, draft_spec(quantization="none"), **tight)
    assert tokens(spec, prompts, params) == expected
    scheduler = spec.engine.scheduler
    assert scheduler.num_preemptions_total > 0
    if mode == "swap":  # the draft's blocks went to host memory and back with the target's
        assert scheduler.num_swapped_in_total > 0
    assert_all_accepted(spec)


def test_prefix_cache_hits_find_the_draft_kv(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, "llama")
    prompts = repetitive_prompts(3)
    spec = llm_for(folder, draft_spec(quantization="none"), dtype="float32")
    first = tokens(spec, prompts, GREEDY)
    # Continue each sequence from its prompt + output: prefix hits reach into generated tokens,
    # whose draft KV the speculating engine wrote while generating them.
    continued = [p + out[:36] for p, out in zip(prompts, first)]
    before = spec.engine.scheduler.kv_cache.prefix_stats.hits
    again = tokens(spec, continued, GREEDY)
    assert spec.engine.scheduler.kv_cache.prefix_stats.hits - before >= 4 * 2 * 16
    assert again == plain_tokens(folder, continued, GREEDY, dtype="float32")
    assert_all_accepted(spec)


def test_n_samples_share_forked_blocks_and_streaming(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, "llama")
    prompts = repetitive_prompts()
    spec = llm_for(folder, draft_spec(quantization="none"), dtype="float32")
    # Greedy n=2: the second sample forks the first one's prompt blocks (copy on write: the
    # draft's block copied too), so both samples emit the greedy tokens with every draft accepted.
    outs = spec.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, n=2))
    expected = plain_tokens(folder, prompts, GREEDY, dtype="float32")
    assert [[list(c.token_ids) for c in o.outputs] for o in outs] == [[e, e] for e in expected]
    assert_all_accepted(spec)
    # Seeded sampling with drafts is reproducible.
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=30, ignore_eos=True, n=2)
    first = [[c.token_ids for c in o.outputs] for o in spec.generate(prompts, params)]
    assert first == [[c.token_ids for c in o.outputs] for o in spec.generate(prompts, params)]
    # Streaming deltas carry every verified token.
    engine = spec.engine
    engine.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                  output_kind=RequestOutputKind.DELTA), request_id="s")
    seen, sizes = [], []
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen.extend(output.outputs[0].token_ids)
            sizes.append(len(output.outputs[0].token_ids))
    assert seen == expected[0] and max(sizes) > 1


def test_rows_with_and_without_drafts_share_a_batch(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, "llama")
    prompts = repetitive_prompts()
    spec = llm_for(folder, draft_spec(quantization="none"), dtype="float32")
    expected = plain_tokens(folder, prompts, GREEDY, dtype="float32")
    # Structured-output-free rows draft; a request near its max_tokens and one with a stop id do too;
    # a row with prompt logprobs and a sampled row share the steps.
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=1),
              SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)]
    outs = spec.generate(prompts, params)
    assert list(outs[0].outputs[0].token_ids) == expected[0]
    assert list(outs[1].outputs[0].token_ids) == expected[1][:3]
    assert list(outs[2].outputs[0].token_ids) == expected[2]
    assert len(outs[3].outputs[0].token_ids) == 40
    assert spec_stats(spec).num_accepted_tokens > 20


def test_lora_rows_run_undrafted_next_to_drafted_rows(tmp_path):
    from pagoda import LoRARequest
    from tests.lora.adapters import make_adapter

    folder = make_tiny_checkpoint(tmp_path / "base", "llama")
    adapter = make_adapter(folder, tmp_path / "adapter", ["q_proj", "v_proj"], rank=4, seed=1)
    prompts = repetitive_prompts()
    loras = [None, LoRARequest("a", 1, str(adapter)), None, LoRARequest("a", 1, str(adapter))]
    lora = dict(dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=8)
    plain = llm_for(folder, None, **lora)
    plain.engine.runner.attention.num_splits = 1
    expected = [list(o.outputs[0].token_ids) for o in plain.generate(prompts, GREEDY, lora_request=loras)]
    spec = llm_for(folder, draft_spec(quantization="none"), **lora)
    outs = spec.generate(prompts, GREEDY, lora_request=loras)
    assert [list(o.outputs[0].token_ids) for o in outs] == expected
    assert expected[1] != tokens(plain, [prompts[1]], GREEDY)[0]  # the adapter changes the output
    assert_all_accepted(spec)  # base rows only: the LoRA rows were never drafted for


def test_config_errors_name_the_key(tmp_path, other_draft):
    folder = make_tiny_checkpoint(tmp_path / "target", "llama")
    wrong_vocab = make_tiny_checkpoint(tmp_path / "wrong", "llama", vocab_size=300)
    with pytest.raises(ConfigError, match="vocab_size=300") as error:
        llm_for(folder, draft_spec(str(wrong_vocab)), dtype="float32")
    assert error.value.field_name == "speculative_config.model"
    with pytest.raises(ConfigError) as error:
        llm_for(folder, draft_spec(str(tmp_path / "nowhere")), dtype="float32")
    assert error.value.field_name == "speculative_config.model"
    for bad, key in [({"method": "draft_model", "quantization": "fp3"}, "speculative_config.quantization"),
                     ({"method": "ngram", "model": "x"}, "speculative_config.model"),
                     ({"method": "ngram", "quantization": "int4"}, "speculative_config.quantization")]:
        with pytest.raises(ConfigError) as error:
            SpeculativeConfig.parse(bad)
        assert error.value.field_name == key
    with pytest.raises(ConfigError) as error:  # gguf needs a .gguf file
        llm_for(folder, draft_spec(quantization="gguf"), dtype="float32")
    assert error.value.field_name == "speculative_config.quantization"
    with pytest.raises(ConfigError) as error:  # the offload tiers hold the target's KV only
        llm_for(folder, draft_spec(str(other_draft)), dtype="float32", kv_offload_cpu_gb=0.01)
    assert error.value.field_name == "kv_offload_cpu_gb"
    spec = llm_for(folder, draft_spec(str(other_draft)), dtype="float32")
    with pytest.raises(ValueError, match="use_beam_search"):
        spec.generate([[5, 6, 7]], SamplingParams(use_beam_search=True, n=2, max_tokens=4))


def test_stats_count_draft_model_drafts(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, "llama")
    spec = llm_for(folder, draft_spec(quantization="none"), dtype="float32")
    tokens(spec, repetitive_prompts()[:1], GREEDY)
    stats = spec.engine.stats()  # what /metrics and pagoda bench read
    assert stats.spec_decode_num_drafts_total > 3
    assert stats.spec_decode_num_accepted_tokens_total == stats.spec_decode_num_draft_tokens_total > 10
    assert stats.spec_decode_accepted_per_position[0] == stats.spec_decode_num_drafts_total


def test_server_metrics_and_bench_read_draft_model_acceptance(tmp_path):
    import httpx

    from pagoda.bench.serve import spec_decode_counters
    from pagoda.config import CacheConfig, EngineConfig
    from pagoda.engine.async_engine import AsyncLLM
    from pagoda.engine.llm_engine import LLMEngine
    from tests.entrypoints.tiny_server import live_server

    folder = make_tiny_checkpoint(tmp_path, "llama")
    config = EngineConfig(model=str(folder), dtype="float32", cache=CacheConfig(kv_cache_memory=16 * 1024**2),
                          speculative_config='{"method": "draft_model", "quantization": "none", '
                                             '"num_speculative_tokens": 3}')  # as --speculative-config gives it
    engine = AsyncLLM(LLMEngine(config, show_progress=False))
    try:
        with live_server(engine) as base:
            body = {"model": "tiny", "prompt": repetitive_prompts()[0], "max_tokens": 30, "temperature": 0,
                    "ignore_eos": True}
            assert httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code == 200
            drafts, accepted = spec_decode_counters(base, {})
            assert drafts > 3 and accepted > 2 * drafts  # acceptance length > 3 with k = 3: the self-draft
    finally:
        engine.shutdown()


CHATS = [
    [{"role": "user", "content": "Repeat this text exactly:\n\nThe quick brown fox jumps over the lazy dog. "
                                 "Pack my box with five dozen liquor jugs."}],
    [{"role": "user", "content": "Fix the spelling: Teh cat sat on teh mat and teh dog sat on teh rug."}],
    [{"role": "user", "content": "What is the capital of France?"}],
]


@requires_smollm2
@pytest.mark.parametrize("draft_quantization", ["int8", "int4"])
def test_default_model_self_speculation(draft_quantization):
    """The default model (GGUF blocks kept packed: row-independent kernels, so verification
    reproduces decoding) drafted for by its own weights quantized again to int8 / int4: greedy
    tokens identical, alone and batched, and most drafts accepted."""
    path = str(smollm2_gguf_path())
    params = SamplingParams(temperature=0, max_tokens=32)
    kwargs = dict(show_progress=False, quantization="gguf", kv_cache_memory=256 * 1024**2, max_model_len=1024)
    plain = LLM(path, **kwargs)
    plain.engine.runner.attention.num_splits = 1
    spec = LLM(path, speculative_config={"method": "draft_model", "quantization": draft_quantization,
                                         "num_speculative_tokens": 3, "max_tokens_per_step": 8,
                                         "step_cost": [1.0]}, **kwargs)
    # bf16: a batch's prefill rounds differently from a lone one's (batch-shaped matmuls), so each
    # way of running is compared with the same way without speculation.
    batched = [o.outputs[0].token_ids for o in plain.chat(CHATS, params)]
    assert [o.outputs[0].token_ids for o in spec.chat(CHATS, params)] == batched
    alone = [plain.chat(c, params)[0].outputs[0].token_ids for c in CHATS[:2]]
    assert [spec.chat(c, params)[0].outputs[0].token_ids for c in CHATS[:2]] == alone
    assert spec_stats(spec).mean_acceptance_length > 2


@requires_smollm2
def test_default_model_preemption_and_prefix_hit():
    path = str(smollm2_gguf_path())
    params = SamplingParams(temperature=0, max_tokens=32)
    # 8 blocks of 16 tokens for 3 chats of 37-57 prompt tokens: someone is preempted (recompute), at
    # another step than without drafts. Steps of at most 8 tokens (chunked prefill) all run the
    # row-independent packed kernels, so a token's arithmetic does not depend on who shares its step.
    tight = dict(show_progress=False, quantization="gguf", num_blocks=8, max_model_len=128,
                 max_num_batched_tokens=8)
    plain = LLM(path, **tight)
    plain.engine.runner.attention.num_splits = 1
    spec = LLM(path, speculative_config={"method": "draft_model", "quantization": "int8",
                                         "num_speculative_tokens": 3, "max_tokens_per_step": 8,
                                         "step_cost": [1.0]}, **tight)
    # Alone: each chat once (prefill, then decode), and again (its prompt blocks are prefix hits).
    for chat in CHATS[:2]:
        for _ in range(2):
            hits = spec.engine.scheduler.kv_cache.prefix_stats.hits
            assert spec.chat(chat, params)[0].outputs[0].token_ids == plain.chat(chat, params)[0].outputs[0].token_ids
        assert spec.engine.scheduler.kv_cache.prefix_stats.hits > hits
    batched = [o.outputs[0].token_ids for o in plain.chat(CHATS, params)]
    preempted = spec.engine.scheduler.num_preemptions_total
    assert [o.outputs[0].token_ids for o in spec.chat(CHATS, params)] == batched
    assert spec.engine.scheduler.num_preemptions_total > preempted
    assert spec_stats(spec).mean_acceptance_length > 2
