"""LoRA through the HTTP server (a real uvicorn on loopback): adapters picked by `model`,
listed by /v1/models, loaded / unloaded / reloaded at run time under concurrent traffic,
guarded by the API key and confined to --lora-dir."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

from pagoda.config import CacheConfig, EngineConfig, LoRAConfig
from pagoda.engine.async_engine import AsyncLLM
from pagoda.engine.llm_engine import LLMEngine
from pagoda.entrypoints.openai.errors import APIError
from pagoda.entrypoints.openai.serving_lora import LoRARegistry
from tests.entrypoints.tiny_server import MODEL, live_server
from tests.lora.adapters import hf_greedy, make_adapter

KEY = "secret"
HEADERS = {"Authorization": f"Bearer {KEY}"}
NEW = 8


@pytest.fixture(scope="module")
def setup(tiny_chat_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    lora_dir = root / "allowed"
    lora_dir.mkdir()
    paths = {
        "static": make_adapter(tiny_chat_llama, root / "static", ["q_proj", "v_proj", "down_proj"], rank=8, seed=1),
        "dyn1": make_adapter(tiny_chat_llama, lora_dir / "dyn1", ["k_proj", "o_proj", "up_proj"], rank=4, seed=2),
        "dyn2": make_adapter(tiny_chat_llama, lora_dir / "dyn2", ["gate_proj", "q_proj"], rank=8, seed=3),
        "outside": make_adapter(tiny_chat_llama, root / "outside", ["q_proj"], rank=4, seed=4),
        "big": make_adapter(tiny_chat_llama, lora_dir / "big", ["q_proj"], rank=16, seed=5),
    }
    config = EngineConfig(model=str(tiny_chat_llama), dtype="float32", lora=LoRAConfig(max_loras=2, max_lora_rank=8),
                          cache=CacheConfig(kv_cache_memory=64 * 1024**2))
    engine = AsyncLLM(LLMEngine(config, show_progress=False))
    loras = LoRARegistry(True, 8, str(lora_dir), {"static": str(paths["static"])})
    with live_server(engine, api_key=KEY, loras=loras) as url:
        yield url, paths, tiny_chat_llama
    engine.shutdown()


def _prompt(seed: int) -> list[int]:
    return torch.randint(10, 40000, (6 + seed % 5,), generator=torch.Generator().manual_seed(seed)).tolist()


def _complete(client: httpx.Client, url: str, model: str, prompt: list[int]) -> httpx.Response:
    return client.post(f"{url}/v1/completions", headers=HEADERS, timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True})


def _text(tokenizer_folder, tokens: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_folder).decode(tokens)


def test_models_lists_adapters_with_parent(setup):
    url, paths, _ = setup
    data = httpx.get(f"{url}/v1/models", headers=HEADERS).json()["data"]
    cards = {card["id"]: card for card in data}
    assert cards["static"]["parent"] == MODEL and MODEL in cards
    assert httpx.get(f"{url}/v1/models/static", headers=HEADERS).json()["parent"] == MODEL


def test_adapter_by_model_field_matches_peft(setup):
    url, paths, base = setup
    prompt = _prompt(1)
    with httpx.Client() as client:
        for model, adapter in ((MODEL, None), ("static", paths["static"])):
            response = _complete(client, url, model, prompt)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == _text(base, hf_greedy(base, adapter, prompt, NEW))
        assert _complete(client, url, "nope", prompt).status_code == 404


def test_load_use_unload_reload_under_concurrent_traffic(setup):
    url, paths, base = setup
    with httpx.Client() as client:
        response = client.post(f"{url}/v1/load_lora_adapter", headers=HEADERS,
                               json={"lora_name": "dyn1", "lora_path": str(paths["dyn1"])})
        assert response.status_code == 200, response.text
        prompts = [_prompt(10 + i) for i in range(8)]
        models = [MODEL, "static", "dyn1", MODEL, "dyn1", "static", MODEL, "dyn1"]
        expected = [_text(base, hf_greedy(base, {MODEL: None, "static": paths["static"], "dyn1": paths["dyn1"]}[m],
                                          p, NEW)) for m, p in zip(models, prompts)]
        results: list = [None] * 8

        def one(i: int) -> None:
            with httpx.Client() as own:
                results[i] = _complete(own, url, models[i], prompts[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        # Meanwhile: load, unload and reload another adapter.
        for _ in range(2):
            r = client.post(f"{url}/v1/load_lora_adapter", headers=HEADERS,
                            json={"lora_name": "dyn2", "lora_path": str(paths["dyn2"])})
            assert r.status_code == 200, r.text
            r = client.post(f"{url}/v1/unload_lora_adapter", headers=HEADERS, json={"lora_name": "dyn2"})
            assert r.status_code == 200, r.text
        r = client.post(f"{url}/v1/load_lora_adapter", headers=HEADERS,
                        json={"lora_name": "dyn2", "lora_path": "dyn2"})  # relative to --lora-dir
        assert r.status_code == 200, r.text
        for thread in threads:
            thread.join(300)
        for i, response in enumerate(results):
            assert response is not None and response.status_code == 200, (i, response and response.text)
            assert response.json()["choices"][0]["text"] == expected[i], (i, models[i])
        prompt = _prompt(30)
        response = _complete(client, url, "dyn2", prompt)
        assert response.json()["choices"][0]["text"] == _text(base, hf_greedy(base, paths["dyn2"], prompt, NEW))
        # Ollama picks the adapter by `model` too.
        r = client.post(f"{url}/api/generate", headers=HEADERS, timeout=120, json={
            "model": "dyn2", "prompt": "hi", "stream": False, "options": {"temperature": 0, "num_predict": 4}})
        assert r.status_code == 200, r.text
        assert client.post(f"{url}/v1/unload_lora_adapter", headers=HEADERS,
                           json={"lora_name": "dyn1"}).status_code == 200
        assert _complete(client, url, "dyn1", prompt).status_code == 404
        assert "dyn1" not in {c["id"] for c in client.get(f"{url}/v1/models", headers=HEADERS).json()["data"]}
        assert client.post(f"{url}/v1/unload_lora_adapter", headers=HEADERS,
                           json={"lora_name": "dyn1"}).status_code == 404
        metrics = client.get(f"{url}/metrics", headers=HEADERS).text
        assert 'pagoda:lora_requests_info{max_lora="2"' in metrics


def test_runtime_loading_refusals(setup):
    url, paths, _ = setup
    with httpx.Client() as client:
        def load(name, path, headers=HEADERS):
            return client.post(f"{url}/v1/load_lora_adapter", headers=headers,
                               json={"lora_name": name, "lora_path": str(path)})

        assert load("x", paths["dyn1"], headers={}).status_code == 401  # the API key guards it
        r = load("x", paths["outside"])
        assert r.status_code == 403 and str(paths["outside"]) in r.text
        r = load("x", "../outside")
        assert r.status_code == 403 and "../outside" in r.text
        r = load("x", "missing")
        assert r.status_code == 400 and "missing" in r.text
        r = load("x", paths["big"])
        assert r.status_code == 400 and "max_lora_rank=8" in r.text
        assert load("static", paths["dyn1"]).status_code == 400  # name in use
        assert load(MODEL, paths["dyn1"]).status_code == 400


def test_without_lora_dir_runtime_loading_is_refused(tmp_path):
    registry = LoRARegistry(True, 8, None)
    with pytest.raises(APIError) as error:
        registry.load("x", str(tmp_path), None, MODEL)
    assert error.value.status == 400 and "--lora-dir" in error.value.message


def test_unload_frees_the_worker_slot_and_a_folder_rewritten_in_place_serves_its_new_contents(
        tiny_chat_llama, tmp_path):
    import time

    from tests.entrypoints.tiny_server import client_for

    folder = tmp_path / "allowed" / "x"
    make_adapter(tiny_chat_llama, folder, ["k_proj", "v_proj"], rank=4, seed=21)
    config = EngineConfig(model=str(tiny_chat_llama), dtype="float32", lora=LoRAConfig(max_loras=1, max_lora_rank=8),
                          cache=CacheConfig(kv_cache_memory=32 * 1024**2))
    llm_engine = LLMEngine(config, show_progress=False)
    engine = AsyncLLM(llm_engine)
    registry = LoRARegistry(True, 8, str(folder.parent))
    manager = llm_engine.runner.lora_manager
    prompt = _prompt(40) * 6  # several full KV blocks

    def complete_x():
        response = client.post("/v1/completions", json={
            "model": "x", "prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True})
        assert response.status_code == 200, response.text
        return response.json()

    try:
        client = client_for(engine, loras=registry)
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "x"}).status_code == 200
        old_id = registry.adapters["x"].lora_int_id
        first = complete_x()
        assert first["choices"][0]["text"] == _text(tiny_chat_llama, hf_greedy(tiny_chat_llama, folder, prompt, NEW))
        assert complete_x()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert old_id in manager.slot_ids and old_id in manager.host
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 200
        deadline = time.monotonic() + 30  # the engine loop applies the removal (host, slot, then path: wait for all)
        while (old_id in manager.slot_ids or old_id in manager.host or old_id in manager.requests) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert old_id not in manager.slot_ids and old_id not in manager.host and old_id not in manager.requests
        make_adapter(tiny_chat_llama, folder, ["k_proj", "v_proj"], rank=4, seed=22)  # same folder, new weights
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "x"}).status_code == 200
        second = complete_x()
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # no stale KV of the old contents
        assert second["choices"][0]["text"] == _text(tiny_chat_llama, hf_greedy(tiny_chat_llama, folder, prompt, NEW))
    finally:
        engine.shutdown()
