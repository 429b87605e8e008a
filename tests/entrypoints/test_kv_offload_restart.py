"""The disk tier across a real restart: a second `pagoda serve` on the same folder gets
prefix-cache hits on its very first request."""

from __future__ import annotations

import subprocess

import httpx
import openai

from tests.conftest import requires_smollm2
from tests.entrypoints.serve_process import free_port, start_server
from tests.entrypoints.test_openai_server import MODEL

pytestmark = requires_smollm2

PROMPT = "You are a careful assistant who answers in one short sentence. " * 12 + "What is the capital of Spain?"


def _serve(folder) -> tuple[subprocess.Popen, str]:
    return start_server(free_port(), "--kv-offload-disk", str(folder), "--kv-offload-cpu-gb", "0.25")


def _complete(base: str):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)


def test_a_restarted_server_hits_the_disk_tier_on_its_first_request(tmp_path):
    process, base = _serve(tmp_path)
    try:
        first = _complete(base)
        assert first.usage.prompt_tokens_details.cached_tokens == 0  # a cold start
    finally:
        process.terminate()  # SIGTERM: drain, then save the device's cached blocks to the folder
        assert process.wait(timeout=60) == 0
    assert list(tmp_path.glob("*/*.safetensors"))

    process, base = _serve(tmp_path)
    try:
        again = _complete(base)
        blocks = (first.usage.prompt_tokens - 1) // 16
        assert again.usage.prompt_tokens_details.cached_tokens == blocks * 16
        assert again.choices[0].text == first.choices[0].text
        metrics = httpx.get(f"{base}/metrics").text
        assert f"pagoda:kv_offload_disk_hits_total {float(blocks)}" in metrics
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0
