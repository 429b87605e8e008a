"""Beam search and best_of end to end on a tiny model.

Beam search must pick exactly the sequences (and scores) transformers'
`generate(num_beams=...)` picks on the same weights, whatever the length
penalty and early-stopping mode, while its beams share KV blocks instead of
copying them, and leave nothing allocated.
"""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.sampling_params import SamplingParamsError

PROMPTS = {"a": [1, 5, 17, 33, 250, 7], "b": [1, 100, 101, 102]}


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", show_progress=False, num_blocks=256, block_size=4)


def _hf_beams(model, prompt, width, n, max_new, length_penalty, early_stopping, stop_id, min_new=0):
    out = model.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=n, max_new_tokens=max_new,
                         do_sample=False, length_penalty=length_penalty, early_stopping=early_stopping,
                         eos_token_id=[2, stop_id], pad_token_id=2, min_new_tokens=min_new,
                         output_scores=True, return_dict_in_generate=True)
    return [s[len(prompt):].tolist() for s in out.sequences], out.sequences_scores.tolist()


# (prompt, extra stop token, width, n, length_penalty, early_stopping, min_tokens): the extra stop
# tokens are ones this model emits, so beams end early and the finished-set rules are exercised.
CASES = [
    ("a", 491, 4, 2, 1.0, False, 0),  # HF's defaults; a beam ends on the stop token
    ("b", 29, 3, 3, 1.0, True, 0),  # early stopping once width sequences are finished
    ("b", 219, 4, 2, 0.5, "never", 0),
    ("b", 219, 3, 3, -1.0, False, 0),  # a negative penalty favours short sequences
    ("b", 29, 4, 2, 2.0, False, 0),  # a large penalty keeps beams running to max_tokens
    ("a", 319, 2, 1, 1.0, False, 3),  # min_tokens masks the stop tokens for three steps
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-stop{c[1]}-w{c[2]}-n{c[3]}-lp{c[4]}-es{c[5]}")
def test_beam_search_matches_transformers(llm, hf_model, case):
    name, stop_id, width, n, penalty, early, min_tokens = case
    prompt = PROMPTS[name]
    hf_tokens, hf_scores = _hf_beams(hf_model, prompt, width, n, 10, penalty, early, stop_id, min_tokens)
    params = SamplingParams(n=n, use_beam_search=True, beam_width=width, max_tokens=10, length_penalty=penalty,
                            early_stopping=early, stop_token_ids=[stop_id], min_tokens=min_tokens)
    [output] = llm.generate(prompt, params)
    assert len(output.outputs) == n
    for completion, tokens, score in zip(output.outputs, hf_tokens, hf_scores):
        ours = completion.token_ids
        assert ours == tokens[:len(ours)] and all(t == 2 for t in tokens[len(ours):])  # HF pads with EOS
        assert completion.cumulative_logprob / len(ours) ** penalty == pytest.approx(score, abs=1e-4)
        ended_on_stop = ours[-1] == stop_id
        assert completion.finish_reason == ("stop" if ended_on_stop else "length")
        assert completion.stop_reason == (stop_id if ended_on_stop else None)
    assert llm.engine.kv_cache_manager.num_requests_holding_blocks() == 0
    assert llm.engine.kv_cache_manager.usage == 0.0


def test_beams_share_blocks_and_copy_only_partly_filled_ones(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", show_progress=False, num_blocks=256, block_size=4,
              enable_prefix_caching=False)
    copies = []
    forks = []
    runner, scheduler = llm.engine.runner, llm.engine.scheduler
    copy_blocks, fork_request = runner._copy_blocks, scheduler.fork_request
    runner._copy_blocks = lambda pairs: (copies.extend(pairs), copy_blocks(pairs))
    scheduler.fork_request = lambda source, target: (forks.append(source.num_computed_tokens),
                                                     fork_request(source, target))
    prompt = list(range(3, 43))  # 40 tokens = 10 full blocks
    width, new = 4, 24
    [output] = llm.generate(prompt, SamplingParams(n=1, use_beam_search=True, beam_width=width, max_tokens=new,
                                                   ignore_eos=True))
    assert len(output.outputs[0].token_ids) == new
    assert forks, "beam search never forked a beam"
    # A fork shares every block; only a partly filled last block is ever copied, once per fork at most.
    partial_forks = sum(1 for computed in forks if computed % 4)
    assert len(copies) <= partial_forks
    peak = llm.engine.kv_cache_manager.pool.peak_blocks_in_use
    unshared = width * -(-(len(prompt) + new) // 4)
    assert peak < unshared / 2  # the prompt's 10 blocks are held once, not four times
    assert llm.engine.kv_cache_manager.usage == 0.0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_beam_search_survives_preemption_with_the_same_result(tiny_llama, llm, mode):
    # 16 blocks of 4 tokens: four beams of a 30-token prompt + 16 new tokens cannot all stay resident.
    small = LLM(str(tiny_llama), dtype="float32", show_progress=False, num_blocks=16, block_size=4,
                max_model_len=60, enable_prefix_caching=False, preemption_mode=mode, swap_space=0.001)
    prompts = [list(range(5, 35)), list(range(40, 70))]
    params = SamplingParams(n=2, use_beam_search=True, beam_width=4, max_tokens=16, ignore_eos=True)
    expected = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]
    outputs = small.generate(prompts, params)
    assert [[c.token_ids for c in o.outputs] for o in outputs] == expected
    assert small.engine.scheduler.num_preemptions_total > 0
    if mode == "swap":
        assert small.engine.scheduler.num_swapped_out_total > 0
        assert small.engine.swap_space.num_requests == 0  # no host blocks left held
    assert small.engine.kv_cache_manager.usage == 0.0
    assert small.engine.kv_cache_manager.num_requests_holding_blocks() == 0


def test_beams_beyond_max_num_seqs_wait_their_turn(tiny_llama, llm):
    prompt = list(range(5, 35))
    params = SamplingParams(n=2, use_beam_search=True, beam_width=4, max_tokens=12, ignore_eos=True)
    [expected] = llm.generate(prompt, params)
    narrow = LLM(str(tiny_llama), dtype="float32", show_progress=False, num_blocks=256, block_size=4,
                 max_num_seqs=2)
    running = []
    schedule = narrow.engine.scheduler.schedule
    narrow.engine.scheduler.schedule = lambda: (running.append(len(narrow.engine.scheduler.running)), schedule())[1]
    [output] = narrow.generate(prompt, params)
    assert [c.token_ids for c in output.outputs] == [c.token_ids for c in expected.outputs]
    assert max(running) <= 2
    assert narrow.engine.kv_cache_manager.usage == 0.0


def test_aborting_a_beam_search_frees_every_block(llm):
    engine = llm.engine
    engine.add_request([1, 5, 17, 33], SamplingParams(use_beam_search=True, beam_width=4, max_tokens=50,
                                                      ignore_eos=True), request_id="beams")
    for _ in range(5):
        assert engine.step() == []  # beam search reports only when finished
    assert engine.kv_cache_manager.num_requests_holding_blocks() > 1  # forked beams hold blocks
    engine.abort_request("beams")
    assert engine.kv_cache_manager.num_requests_holding_blocks() == 0
    assert not engine.has_unfinished_requests()


def test_best_of_returns_the_n_most_likely_samples(llm):
    prompt = [1, 100, 101, 102]
    best = SamplingParams(n=2, best_of=6, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    [output] = llm.generate(prompt, best)
    # The same six samples, all returned (n=6 with the same seeds), ranked by cumulative logprob.
    every = SamplingParams(n=6, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True, logprobs=0)
    [all_six] = llm.generate(prompt, every)
    ranked = sorted(all_six.outputs, key=lambda c: -c.cumulative_logprob)
    assert [c.token_ids for c in output.outputs] == [c.token_ids for c in ranked[:2]]
    assert [c.index for c in output.outputs] == [0, 1]
    assert output.outputs[0].cumulative_logprob == pytest.approx(ranked[0].cumulative_logprob, abs=1e-5)
    assert output.outputs[0].logprobs is None  # not asked for
    assert llm.engine.kv_cache_manager.usage == 0.0


@pytest.mark.parametrize("kwargs, field", [
    (dict(n=3, best_of=2), "best_of"),
    (dict(n=2, best_of=3, temperature=0), "best_of"),
    (dict(beam_width=4), "beam_width"),
    (dict(use_beam_search=True, n=4, beam_width=2), "beam_width"),
    (dict(use_beam_search=True, beam_width=4, top_p=0.5), "top_p"),
    (dict(use_beam_search=True, beam_width=4, stop=["x"]), "stop"),
    (dict(use_beam_search=True, beam_width=4, repetition_penalty=1.2), "repetition_penalty"),
    (dict(use_beam_search=True, early_stopping="sometimes"), "early_stopping"),
    (dict(use_beam_search=True, length_penalty=float("nan")), "length_penalty"),
])
def test_invalid_best_of_and_beam_settings_name_the_field(kwargs, field):
    with pytest.raises(SamplingParamsError) as error:
        SamplingParams(**kwargs)
    assert error.value.field_name == field and field in str(error.value)


def test_unshared_beams_give_the_same_beams_with_more_blocks(tiny_llama):
    prompt = list(range(3, 43))
    params = SamplingParams(n=2, use_beam_search=True, beam_width=4, max_tokens=12, ignore_eos=True)
    peaks, results = [], []
    for sharing in (True, False):
        llm = LLM(str(tiny_llama), dtype="float32", show_progress=False, num_blocks=256, block_size=4,
                  enable_prefix_caching=False, enable_fork_sharing=sharing)
        [output] = llm.generate(prompt, params)
        results.append([c.token_ids for c in output.outputs])
        peaks.append(llm.engine.kv_cache_manager.pool.peak_blocks_in_use)
        assert llm.engine.kv_cache_manager.usage == 0.0
    assert results[0] == results[1]
    assert peaks[1] > 3 * peaks[0] / 2  # copying forks hold each beam's prompt blocks separately
