"""Speculative decoding (n-gram) inside continuous batching, against the same engine without it.

Greedy tokens must be identical, alone and batched, through chunked prefill, preemption,
prefix-cache hits on generated tokens, stops inside accepted drafts and n > 1; every test
also checks that drafts were really verified and accepted (else it would prove nothing).
"""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.config import ConfigError
from pagoda.engine.spec_decode.config import SpeculativeConfig
from pagoda.engine.spec_decode.speculator import Speculator
from pagoda.request import Request
from tests.conftest import TINY_VOCAB, make_tiny_checkpoint, requires_smollm2, smollm2_gguf_path

# A step of up to 16 tokens may carry drafts, and drafts cost nothing (a flat step cost: every
# proposal is verified): the batched tests verify drafts of several rows at once.
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
         "max_tokens_per_step": 16, "step_cost": [1.0]}


def repetitive_prompts(seed: int = 0) -> list[list[int]]:
    """Prompts with repeats, so the tiny models' outputs (which copy them) give n-gram hits."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(3, TINY_VOCAB, (10,), generator=gen).tolist()
    other = torch.randint(3, TINY_VOCAB, (25,), generator=gen).tolist()
    return [base * 4, base[:4] * 5 + base, other, base[::-1] * 3]


def llm_for(folder, spec, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory", 16 * 1024**2)
    return LLM(str(folder), show_progress=False, speculative_config=spec, **kwargs)


def tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]


def spec_stats(llm: LLM):
    return llm.engine.scheduler.spec_stats


GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.mark.parametrize("arch,dtype", [("llama", "float32"), ("qwen2", "float32"), ("qwen3", "bfloat16"),
                                        ("llama", "bfloat16")])
def test_greedy_is_identical_alone_and_batched(tmp_path, arch, dtype):
    folder = make_tiny_checkpoint(tmp_path, arch)
    prompts = repetitive_prompts()
    plain = llm_for(folder, None, dtype=dtype)
    plain.engine.runner.attention.num_splits = 1  # as the speculating engine (ModelRunner split_decodes)
    expected = tokens(plain, prompts, GREEDY)
    spec = llm_for(folder, NGRAM, dtype=dtype)
    assert tokens(spec, prompts, GREEDY) == expected  # batched
    assert [tokens(spec, [p], GREEDY)[0] for p in prompts] == expected  # alone
    stats = spec_stats(spec)
    assert stats.num_drafts > 10 and stats.num_accepted_tokens >= 20  # drafts really verified and accepted


def test_chunked_prefill_preemption_and_prefix_hits_on_generated_tokens(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, "llama")
    prompts = repetitive_prompts(1)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    # 12 blocks of 16 tokens for 4 requests of up to 88 tokens: preemptions; 16-token steps: chunked prefill.
    tight = dict(dtype="float32", num_blocks=12, max_num_batched_tokens=16, max_model_len=160)
    plain = llm_for(folder, None, **tight)
    plain.engine.runner.attention.num_splits = 1
    expected = tokens(plain, prompts, params)
    spec = llm_for(folder, NGRAM, **tight)
    assert tokens(spec, prompts, params) == expected
    assert spec.engine.scheduler.num_preemptions_total > 0 and spec_stats(spec).num_accepted_tokens > 0
    # Continue each sequence from its prompt + output: prefix-cache hits reach into generated tokens,
    # whose blocks were registered by the speculating engine (rejected drafts never are).
    spec_big = llm_for(folder, NGRAM, dtype="float32")
    first = tokens(spec_big, prompts, params)
    continued = [p + out[:40] for p, out in zip(prompts, first)]
    again = tokens(spec_big, continued, GREEDY)
    assert spec_big.engine.scheduler.kv_cache.prefix_stats.hits > 0
    assert again == tokens(plain, continued, GREEDY)


def test_stops_inside_accepted_drafts_and_max_tokens(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, "llama")
    prompts = repetitive_prompts(2)
    plain = llm_for(folder, None, dtype="float32")
    plain.engine.runner.attention.num_splits = 1
    spec = llm_for(folder, NGRAM, dtype="float32")
    free = tokens(plain, prompts, GREEDY)
    stop_ids = [out[12] for out in free]  # a token each sequence emits mid-way (drafts cover it)
    for prompt, stop in zip(prompts, stop_ids):
        params = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop], logprobs=2)
        a, b = plain.generate([prompt], params)[0].outputs[0], spec.generate([prompt], params)[0].outputs[0]
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason == "stop"
        assert b.token_ids[-1] == stop and len(b.logprobs) == len(b.token_ids)
        assert [lp[t] for lp, t in zip(a.logprobs, a.token_ids)] == \
               pytest.approx([lp[t] for lp, t in zip(b.logprobs, b.token_ids)])
    for n in (1, 3, 7):  # max_tokens is never exceeded, whatever the drafts
        out = spec.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        assert [len(o.outputs[0].token_ids) for o in out] == [n] * len(prompts)


def test_seeded_sampling_is_reproducible_and_n_samples(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, "llama")
    spec = llm_for(folder, NGRAM, dtype="float32")
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=30, ignore_eos=True, n=2)
    first = [[c.token_ids for c in o.outputs] for o in spec.generate(repetitive_prompts(), params)]
    second = [[c.token_ids for c in o.outputs] for o in spec.generate(repetitive_prompts(), params)]
    assert first == second and all(len(c) == 30 for o in first for c in o)
    assert spec_stats(spec).num_drafts > 0


def test_streaming_deltas_carry_every_verified_token(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, "llama")
    spec = llm_for(folder, NGRAM, dtype="float32")
    engine = spec.engine
    engine.add_request(repetitive_prompts()[0], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                               output_kind=_delta()), request_id="s")
    seen, sizes = [], []
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen.extend(output.outputs[0].token_ids)
            sizes.append(len(output.outputs[0].token_ids))
    assert len(seen) == 40 and max(sizes) > 1  # a step emitted several tokens
    assert seen == tokens(spec, [repetitive_prompts()[0]], GREEDY)[0]


def _delta():
    from pagoda.sampling_params import RequestOutputKind

    return RequestOutputKind.DELTA


def test_beam_search_is_refused_and_config_errors_name_the_key(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, "llama")
    spec = llm_for(folder, NGRAM, dtype="float32")
    with pytest.raises(ValueError, match="use_beam_search"):
        spec.generate([[5, 6, 7]], SamplingParams(use_beam_search=True, n=2, max_tokens=4))
    for bad, key in [({"method": "medusa"}, "speculative_config.method"),
                     ({"num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
                     ({"prompt_lookup_min": 4, "prompt_lookup_max": 2}, "speculative_config.prompt_lookup_min"),
                     ({"lookahead": 3}, "speculative_config.lookahead"), ("{not json", "speculative_config")]:
        with pytest.raises(ConfigError) as error:
            SpeculativeConfig.parse(bad)
        assert error.value.field_name == key


def test_a_request_whose_drafts_keep_failing_stops_drafting():
    from pagoda.sampling_params import SamplingParams as Params

    speculator = Speculator(SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_min=1, step_cost=(1.0,),
                                              disable_after_drafts=4, disable_below_acceptance=0.25))
    request = Request("r", [1, 2, 3, 1, 2, 3, 1, 2], Params(max_tokens=50), frozenset())
    request.num_computed_tokens = request.num_tokens - 1
    speculator.propose([request])
    assert request.spec_token_ids == [3, 1, 2]
    request.spec_num_drafts, request.spec_num_proposed, request.spec_num_accepted = 4, 12, 2
    speculator.propose([request])
    assert request.spec_disabled and request.spec_token_ids == []
    # max_tokens bounds the draft: the step emits at most drafts + 1 tokens.
    near_end = Request("e", [1, 2, 3, 1, 2, 3, 1, 2], Params(max_tokens=3), frozenset())
    near_end.output_token_ids = [2, 2]
    near_end.num_computed_tokens = near_end.num_tokens - 1
    speculator.propose([near_end])
    assert near_end.spec_token_ids == []


def test_drafts_are_cut_to_what_pays():
    """A lone stream whose drafts keep matching drafts deep; a fresh one a little; a busy step
    only for the request that matches (budget.py's rule, with the config's step cost)."""
    from pagoda.sampling_params import SamplingParams as Params

    cost = (1.0, 1.03, 1.07, 1.13, 1.25, 1.38, 1.5, 1.65)
    speculator = Speculator(SpeculativeConfig(num_speculative_tokens=7, prompt_lookup_min=1, step_cost=cost))

    def decoding(name: str, accepted: int = 0, rejections: int = 0) -> Request:
        request = Request(name, [1, 2, 3, 4, 5, 6, 7, 8, 9] * 2 + [1, 2], Params(max_tokens=50), frozenset())
        request.num_computed_tokens = request.num_tokens - 1
        request.spec_num_accepted, request.spec_num_rejections = accepted, rejections
        request.spec_num_drafts = accepted + rejections
        request.spec_num_proposed = accepted + 3 * rejections
        return request

    good, fresh = decoding("good", 90, 5), decoding("fresh")
    speculator.propose([good])
    assert good.spec_token_ids == [3, 4, 5, 6, 7, 8, 9]
    speculator.propose([fresh])
    assert fresh.spec_token_ids == [3, 4, 5]  # b = 0.5: 0.5, 0.25, 0.125 pay; 0.06 does not
    busy = [decoding(f"chat{i}", 5, 15) for i in range(3)] + [decoding("grounded", 200, 4)]
    speculator.propose(busy)
    assert [len(r.spec_token_ids) for r in busy[:3]] == [0, 0, 0] and len(busy[3].spec_token_ids) == 4


@requires_smollm2
def test_default_model_greedy_identical_alone_and_batched():
    path = str(smollm2_gguf_path())
    paragraph = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
                 "How vexingly quick daft zebras jump! The five boxing wizards jump quickly.")
    chats = [[{"role": "user", "content": f"Repeat this text exactly:\n\n{paragraph}"}],
             [{"role": "user", "content": "Fix the spelling: Teh cat sat on teh mat and teh dog sat on teh rug."}],
             [{"role": "user", "content": "What is the capital of France?"}]]
    params = SamplingParams(temperature=0, max_tokens=64)
    plain = LLM(path, show_progress=False)
    plain.engine.runner.attention.num_splits = 1
    spec = LLM(path, show_progress=False, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    # bf16: a batch's prefill rounds differently from a lone one's (batch-shaped matmuls), so each
    # way of running is compared with the same way without speculation.
    batched = [o.outputs[0].token_ids for o in plain.chat(chats, params)]
    assert [o.outputs[0].token_ids for o in spec.chat(chats, params)] == batched
    alone = [plain.chat(c, params)[0].outputs[0].token_ids for c in chats]
    assert [spec.chat(c, params)[0].outputs[0].token_ids for c in chats] == alone
    assert spec_stats(spec).mean_acceptance_length > 2


def test_metrics_and_bench_read_the_acceptance(tmp_path):
    import httpx

    from pagoda.bench.serve import spec_decode_counters
    from pagoda.config import CacheConfig, EngineConfig
    from pagoda.engine.async_engine import AsyncLLM
    from pagoda.engine.llm_engine import LLMEngine
    from tests.entrypoints.tiny_server import live_server

    folder = make_tiny_checkpoint(tmp_path, "llama")
    engine = AsyncLLM(LLMEngine(EngineConfig(model=str(folder), dtype="float32", speculative_config=NGRAM,
                                             cache=CacheConfig(kv_cache_memory=16 * 1024**2)), show_progress=False))
    try:
        with live_server(engine) as base:
            assert spec_decode_counters(base, {}) == (0, 0)
            body = {"model": "tiny", "prompt": repetitive_prompts()[0], "max_tokens": 30, "temperature": 0,
                    "ignore_eos": True}
            assert httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code == 200
            drafts, accepted = spec_decode_counters(base, {})
            assert drafts > 0 and accepted > 0
            text = httpx.get(f"{base}/metrics").text
            assert 'pagoda:spec_decode_num_accepted_tokens_per_pos_total{position="0"}' in text
    finally:
        engine.shutdown()
