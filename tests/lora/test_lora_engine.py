"""LoRA at the engine: refusals with clear errors, queueing beyond max_loras, prefix-cache
separation, metrics."""

from __future__ import annotations

import json

import pytest
import torch

from pagoda import LLM, LoRARequest, SamplingParams
from pagoda.model.lora.adapter import AdapterError
from tests.conftest import TINY_VOCAB, make_tiny_checkpoint
from tests.lora.adapters import hf_greedy, make_adapter

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("lora_base"), "llama")


@pytest.fixture(scope="module")
def llm(base):
    return LLM(str(base), dtype="float32", show_progress=False, kv_cache_memory=32 * 1024**2,
               enable_lora=True, max_loras=1, max_lora_rank=8)


def _prompt(n=9, seed=0):
    return torch.randint(3, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _refused(llm, path, match):
    with pytest.raises(AdapterError, match=match):
        llm.generate([_prompt()], PARAMS, lora_request=LoRARequest("bad", 99, str(path)))


def test_bad_path_is_refused_naming_it(llm, tmp_path):
    _refused(llm, tmp_path / "nowhere", "nowhere.*is not a folder")
    (tmp_path / "empty").mkdir()
    _refused(llm, tmp_path / "empty", "adapter_config.json.*does not exist")


def test_rank_above_max_lora_rank_is_refused(llm, base, tmp_path):
    adapter = make_adapter(base, tmp_path / "r16", ["q_proj"], rank=16, seed=1)
    _refused(llm, adapter, "rank 16.*max_lora_rank=8")


def test_unknown_target_modules_are_refused(llm, base, tmp_path):
    adapter = make_adapter(base, tmp_path / "odd", ["q_proj"], rank=4, seed=1)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "rotary_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    _refused(llm, adapter, r"targets \['rotary_proj'\]")


@pytest.mark.parametrize("what,kwargs,match", [
    ("embed", dict(targets=["embed_tokens"]), "embeddings or lm_head"),
    ("lm_head", dict(targets=["q_proj", "lm_head"]), "embeddings or lm_head"),
    ("modules_to_save", dict(targets=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    ("dora", dict(targets=["q_proj"], use_dora=True), "DoRA"),
])
def test_embedding_lm_head_and_dora_adapters_are_refused(llm, base, tmp_path, what, kwargs, match):
    targets = kwargs.pop("targets")
    adapter = make_adapter(base, tmp_path / what, targets, rank=4, seed=1, **kwargs)
    _refused(llm, adapter, match)


def test_lora_off_refuses_adapters(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "a", ["q_proj"], rank=4, seed=1)
    plain = LLM(str(base), dtype="float32", show_progress=False, kv_cache_memory=16 * 1024**2)
    with pytest.raises(AdapterError, match="without LoRA"):
        plain.generate([_prompt()], PARAMS, lora_request=LoRARequest("a", 1, str(adapter)))


def test_more_adapters_than_max_loras_queue_and_all_finish_correctly(llm, base, tmp_path):
    adapters = [make_adapter(base, tmp_path / f"q{i}", ["q_proj", "down_proj"], rank=4, seed=20 + i)
                for i in range(3)]
    loras = [LoRARequest(f"q{i}", 10 + i, str(path)) for i, path in enumerate(adapters)]
    prompts = [_prompt(7 + i, seed=i) for i in range(6)]
    cases = [(prompts[i], loras[i % 3] if i % 4 != 3 else None) for i in range(6)]
    engine = llm.engine
    ids = [engine.add_request(p, PARAMS, lora_request=lora) for p, lora in cases]
    finished, saw_waiting_adapter = {}, False
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
        running = {r.lora_int_id for r in engine.scheduler.running if r.lora_int_id}
        assert len(running) <= 1  # max_loras=1: never two adapters in the running batch
        stats = engine.stats()
        saw_waiting_adapter |= bool(set(stats.waiting_lora_adapters) - set(stats.running_lora_adapters))
    assert saw_waiting_adapter
    for request_id, (prompt, lora) in zip(ids, cases):
        expected = hf_greedy(base, None if lora is None else lora.lora_path, prompt, PARAMS.max_tokens)
        assert finished[request_id] == expected


def test_adapters_never_share_prefix_cache_blocks(llm, base, tmp_path):
    a = LoRARequest("pa", 30, str(make_adapter(base, tmp_path / "pa", ["v_proj"], rank=4, seed=5)))
    b = LoRARequest("pb", 31, str(make_adapter(base, tmp_path / "pb", ["v_proj"], rank=4, seed=6)))
    prompt = _prompt(40, seed=7)
    assert llm.generate([prompt], PARAMS, lora_request=a)[0].num_cached_tokens == 0
    assert llm.generate([prompt], PARAMS, lora_request=b)[0].num_cached_tokens == 0
    assert llm.generate([prompt], PARAMS)[0].num_cached_tokens == 0
    again = llm.generate([prompt], PARAMS, lora_request=a)[0]
    assert again.num_cached_tokens == 32  # two full blocks of its own
    assert again.outputs[0].token_ids == hf_greedy(base, a.lora_path, prompt, PARAMS.max_tokens)


def test_generate_checks_lora_request_count(llm):
    with pytest.raises(ValueError, match="lora_request has 2 entries"):
        llm.generate([_prompt()], PARAMS, lora_request=[None, None])


def test_chat_takes_lora_request(tiny_chat_llama, tmp_path):
    adapter = make_adapter(tiny_chat_llama, tmp_path / "chat", ["q_proj", "down_proj"], rank=4, seed=9)
    chat_llm = LLM(str(tiny_chat_llama), dtype="float32", show_progress=False, kv_cache_memory=32 * 1024**2,
                   enable_lora=True, max_loras=1, max_lora_rank=8)
    lora = LoRARequest("chat", 1, str(adapter))
    messages = [{"role": "user", "content": "Hello there"}]
    output = chat_llm.chat(messages, PARAMS, lora_request=lora)[0]
    prompt_ids = chat_llm.apply_chat_template(messages)
    assert output.outputs[0].token_ids == hf_greedy(tiny_chat_llama, adapter, prompt_ids, PARAMS.max_tokens)
    assert chat_llm.chat(messages, PARAMS)[0].outputs[0].token_ids != output.outputs[0].token_ids


def _manager(llm):
    return llm.engine.runner.lora_manager


def test_worker_adapter_table_stays_bounded(llm, base, tmp_path):
    """Ids no row uses leave the worker's tables: only those in a slot or in host memory stay."""
    path = str(make_adapter(base, tmp_path / "many", ["q_proj"], rank=4, seed=3))
    for i in range(5):  # one id per load, as the server gives
        llm.generate([_prompt(seed=i)], PARAMS, lora_request=LoRARequest(f"m{i}", 200 + i, path))
    manager = _manager(llm)
    held = set(manager.host) | {i for i in manager.slot_ids if i is not None}
    assert set(manager.requests) <= held and len(held) <= manager.max_loras + manager.max_cpu_loras
    assert 204 in manager.requests and 200 not in manager.requests


def test_removed_adapter_leaves_its_slot_and_host_copy_once_its_requests_finish(llm, base, tmp_path):
    engine, manager = llm.engine, _manager(llm)
    lora = LoRARequest("gone", 300, str(make_adapter(base, tmp_path / "gone", ["v_proj"], rank=4, seed=4)))
    request_id = engine.add_request(_prompt(), PARAMS, lora_request=lora)
    engine.step()
    assert 300 in manager.slot_ids and 300 in manager.host
    engine.remove_lora(300)  # unloaded while it runs: it finishes with its adapter
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outputs[request_id].outputs[0].token_ids == hf_greedy(base, lora.lora_path, _prompt(), PARAMS.max_tokens)
    assert 300 not in manager.slot_ids and 300 not in manager.host and 300 not in manager.requests
    # Idle: removed at once.
    llm.generate([_prompt()], PARAMS, lora_request=LoRARequest("idle", 301, lora.lora_path))
    assert 301 in manager.slot_ids
    engine.remove_lora(301)
    assert 301 not in manager.slot_ids and 301 not in manager.host and 301 not in manager.requests
    assert all(not w.filled_bits for layer in manager.layers for w in layer.values())  # slot cleared


def test_adapter_rewritten_in_place_never_reuses_its_old_kv(llm, base, tmp_path):
    """Same name and path, new contents (unload, rewrite, load: a new id): no prefix hit."""
    folder = tmp_path / "same"
    make_adapter(base, folder, ["k_proj", "v_proj"], rank=4, seed=11)
    prompt = _prompt(40, seed=8)
    first = llm.generate([prompt], PARAMS, lora_request=LoRARequest("same", 400, str(folder)))[0]
    assert llm.generate([prompt], PARAMS, lora_request=LoRARequest("same", 400, str(folder)))[0].num_cached_tokens
    llm.engine.remove_lora(400)
    make_adapter(base, folder, ["k_proj", "v_proj"], rank=4, seed=12)
    second = llm.generate([prompt], PARAMS, lora_request=LoRARequest("same", 401, str(folder)))[0]
    assert second.num_cached_tokens == 0
    assert second.outputs[0].token_ids == hf_greedy(base, folder, prompt, PARAMS.max_tokens)
    assert second.outputs[0].token_ids != first.outputs[0].token_ids


def test_worker_refuses_contents_other_than_the_engine_checked(llm, base, tmp_path):
    manager = _manager(llm)
    path = str(make_adapter(base, tmp_path / "moved", ["q_proj"], rank=4, seed=13))
    manager.register(LoRARequest("moved", 500, path), digest="0" * 64)
    with pytest.raises(AdapterError, match="changed after the engine read them"):
        manager.slots_for([500])
    manager._forget(500)
