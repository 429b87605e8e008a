"""`pagoda serve --enable-lora --lora-modules NAME=PATH --lora-dir DIR` as a real subprocess
(the engine loop in its own process: the adapter crosses the process boundary as data)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import torch

from tests.entrypoints.serve_process import free_port, start_server
from tests.lora.adapters import hf_greedy, make_adapter


def test_serve_with_lora_modules_and_runtime_loading(tiny_chat_llama, tmp_path):
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    static = make_adapter(tiny_chat_llama, tmp_path / "static", ["q_proj", "up_proj"], rank=8, seed=1)
    later = make_adapter(tiny_chat_llama, lora_dir / "later", ["v_proj", "down_proj"], rank=4, seed=2)
    process, url = start_server(
        free_port(), "--model", str(tiny_chat_llama), "--dtype", "float32", "--served-model-name", "tiny",
        "--kv-cache-memory", str(32 * 1024**2), "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
        "--lora-modules", f"static={static}", "--lora-dir", str(lora_dir))
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama)
        prompt = torch.randint(10, 40000, (7,), generator=torch.Generator().manual_seed(0)).tolist()
        assert httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "later", "lora_path": "later"}
                          ).status_code == 200
        ids = {c["id"]: c.get("parent") for c in httpx.get(f"{url}/v1/models").json()["data"]}
        assert ids == {"tiny": None, "static": "tiny", "later": "tiny"}
        for model, adapter in (("static", static), ("later", later), ("tiny", None)):
            r = httpx.post(f"{url}/v1/completions", timeout=120, json={
                "model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            expected = tokenizer.decode(hf_greedy(tiny_chat_llama, adapter, prompt, 6))
            assert r.json()["choices"][0]["text"] == expected, model
    finally:
        process.terminate()
        process.wait(60)


def test_serve_refuses_lora_flags_without_enable_lora(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pagoda", "serve", "--lora-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--enable-lora" in result.stderr
