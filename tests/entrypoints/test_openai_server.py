"""A real `pagoda serve` subprocess on loopback, driven by the official openai SDK and httpx."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.conftest import requires_smollm2
from tests.entrypoints.serve_process import free_port, start_server

pytestmark = requires_smollm2
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def server():
    port, ollama_port = free_port(), free_port()
    process, base = start_server(port, "--max-num-seqs", "32", "--ollama-port", str(ollama_port))
    base_ollama = f"http://127.0.0.1:{ollama_port}"
    yield base
    # The second listener serves the same app (Ollama clients default to port 11434).
    assert httpx.get(f"{base_ollama}/api/version").status_code == 200
    process.terminate()
    assert process.wait(timeout=60) == 0


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert httpx.get(f"{server}/health").status_code == 200


def test_chat_answers(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=30
    )
    choice = response.choices[0]
    assert "Paris" in choice.message.content and choice.finish_reason == "stop"
    assert response.usage.completion_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_chat_stream_matches_non_stream_for_same_seed(client):
    args = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a fact about owls."}],
                temperature=0.8, seed=11, max_tokens=40)
    # Different cache salts: the second request must not start from the first one's cached
    # prefix (a few-token tail runs the packed int4 kernel, a whole prompt the bf16 copy,
    # and bf16 numerics that differ in the last bits can flip a sampled token).
    full = client.chat.completions.create(**args, extra_body={"cache_salt": "a"}).choices[0].message.content
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"cache_salt": "b"}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in content_chunks if c.choices[0].finish_reason]
    assert len(finishes) == 1 and content_chunks[-1].choices[0].finish_reason is not None
    assert content_chunks[-1].choices[0].delta.content  # finish_reason rides on the last content chunk
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_completions_n_logprobs_and_stop(client):
    response = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0,
                                         n=2, logprobs=2, stop=[" 6"])
    assert len(response.choices) == 2
    for choice in response.choices:
        assert " 6" not in choice.text and choice.finish_reason == "stop"
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs)


def test_streamed_completion_logprobs_match_the_unstreamed_ones(client):
    kwargs = dict(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=10, temperature=0, logprobs=2)
    full = client.completions.create(**kwargs)
    chunks = [c for c in client.completions.create(stream=True, **kwargs) if c.choices]
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    values = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert tokens == full.choices[0].logprobs.tokens
    assert values == pytest.approx(full.choices[0].logprobs.token_logprobs, abs=1e-5)
    assert all(len(c.choices[0].logprobs.top_logprobs[0]) >= 2 for c in chunks if c.choices[0].logprobs)


def test_completions_beam_search_and_best_of(client):
    beams = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, n=2,
                                      extra_body={"use_beam_search": True, "beam_width": 3, "length_penalty": 1.0})
    assert len(beams.choices) == 2 and all(c.text for c in beams.choices)
    assert beams.choices[0].text != beams.choices[1].text  # two different beams
    assert 2 <= beams.usage.completion_tokens <= 16  # both returned beams count, at most 8 tokens each
    best = client.completions.create(model=MODEL, prompt="Name a colour:", max_tokens=6, n=1, best_of=3,
                                     temperature=1.0, seed=3)
    assert len(best.choices) == 1 and best.choices[0].index == 0
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, best_of=3, temperature=1.0, stream=True)
    assert info.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, n=3,
                                  extra_body={"use_beam_search": True, "beam_width": 2})
    assert info.value.body["param"] == "beam_width"


def test_chat_beam_search_streams_its_final_answer(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=8,
                  extra_body={"use_beam_search": True, "beam_width": 3})
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert full and streamed == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_sixteen_concurrent_streams(server):
    async def one(client, i):
        text = ""
        async for chunk in await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Say the number {i}."}], max_tokens=16,
            temperature=0, stream=True,
        ):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        return text

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused")
        return await asyncio.gather(*(one(client, i) for i in range(16)))

    texts = asyncio.run(main())
    assert len(texts) == 16 and all(texts)


def test_errors_have_openai_shape(server, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert info.value.body["param"] == "temperature" and "temperature=-1" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=100000)
    assert "8192" in info.value.body["message"] and "100000" in info.value.body["message"]
    bad = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    missing = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"


def _metric(server: str, name: str) -> float:
    for line in httpx.get(f"{server}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_move_when_requests_run(server, client):
    before = _metric(server, "pagoda:generation_tokens_total")
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert _metric(server, "pagoda:generation_tokens_total") == before + 5
    assert _metric(server, "pagoda:time_to_first_token_seconds_count") >= 1
    assert _metric(server, "pagoda:kv_cache_usage_perc") == 0.0


def test_prefix_cache_hits_show_in_metrics(client, server):
    system = "You are a meticulous assistant who answers in one short sentence. " * 6
    queries, hits = _metric(server, "pagoda:prefix_cache_queries_total"), _metric(server, "pagoda:prefix_cache_hits_total")
    answers = []
    for question in ("What is two plus two?", "What is two plus two?", "Name a colour."):
        answers.append(client.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=8, temperature=0).choices[0].message.content)
    assert answers[0] == answers[1]  # a cache hit changes nothing in the answer
    again = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}],
        max_tokens=1, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= 64
    assert _metric(server, "pagoda:prefix_cache_queries_total") > queries
    # The second and third requests reuse at least the system prompt's full blocks.
    assert _metric(server, "pagoda:prefix_cache_hits_total") - hits >= 2 * 64
    salted = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}],
        max_tokens=8, temperature=0, extra_body={"cache_salt": "another-tenant"})
    assert salted.choices[0].message.content == answers[2]
    assert 0 < _metric(server, "pagoda:kv_cache_token_efficiency") <= 1


def test_client_disconnect_aborts_and_frees_blocks(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in received)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _metric(server, "pagoda:num_requests_running") == 0 and _metric(server, "pagoda:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.2)
    assert _metric(server, "pagoda:num_requests_running") == 0
    # Running to the end would hold blocks for minutes (4000 tokens at ~15 tok/s).
    assert _metric(server, "pagoda:kv_cache_usage_perc") == 0.0


def test_completions_several_prompts_and_echo_with_prompt_logprobs(client):
    response = client.completions.create(model=MODEL, prompt=["The sky is", "Water is"], max_tokens=4,
                                         temperature=0, n=2)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.choices[0].text == response.choices[1].text  # greedy
    echoed = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3, temperature=0,
                                       echo=True, logprobs=1)
    choice = echoed.choices[0]
    assert choice.text.startswith("The sky is")
    assert choice.logprobs.token_logprobs[0] is None  # the first prompt token has no context
    assert all(lp is not None and lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    assert echoed.usage.prompt_tokens == len(choice.logprobs.tokens) - 3


def test_tokenize_counts_what_a_chat_request_uses(server, client):
    messages = [{"role": "user", "content": "How many tokens is this?"}]
    counted = httpx.post(f"{server}/tokenize", json={"model": MODEL, "messages": messages}).json()
    used = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).usage.prompt_tokens
    assert counted["count"] == used == len(counted["tokens"])
    text = httpx.post(f"{server}/detokenize", json={"model": MODEL, "tokens": counted["tokens"]}).json()["prompt"]
    assert "How many tokens is this?" in text


def test_ollama_client_chats_and_generates(server):
    import ollama

    client = ollama.Client(host=server)
    reply = client.chat(model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
                        options={"temperature": 0, "num_predict": 30})
    assert "Paris" in reply.message.content and reply.done and reply.eval_count > 0
    pieces = list(client.generate(model=MODEL, prompt="Say hello.", stream=True, options={"num_predict": 8, "seed": 1}))
    assert pieces[-1].done and sum(1 for p in pieces if p.done) == 1
    assert "".join(p.response for p in pieces)
    assert [m.model for m in client.list().models] == [f"{MODEL}:latest"]
    assert client.show(MODEL).modelinfo["context_length"] == 8192
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404
    assert httpx.get(f"{server}/api/version").json()["version"]


def test_pagoda_bench_serve_measures_this_server(server, tmp_path):
    """`pagoda bench serve` end to end: a two-level sweep, the database, JSON, plots and `report`."""
    db, out = tmp_path / "bench.db", tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "pagoda", "bench", "serve", "--base-url", f"{server}/v1", "--api", "chat",
         "--num-prompts", "4", "--concurrency", "1", "2", "--input-len", "8:24", "--output-len", "4",
         "--goodput", "ttft:60000", "--db", str(db), "--out-dir", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    [summary_file] = out.glob("*.json")
    data = json.loads(summary_file.read_text())
    assert [r["label"] for r in data["runs"]] == ["concurrency 1", "concurrency 2"]
    for run in data["runs"]:
        s = run["summary"]
        assert (s["completed"], s["failed"]) == (4, 0)
        assert s["output_tokens"] == 16  # usage from the server: 4 requests x 4 tokens (ignore_eos)
        assert s["goodput"]["good_requests"] == 4
        assert run["config"]["model"] == MODEL  # discovered from /v1/models
    assert {p.name.split("-")[-1] for p in out.glob("*.png")} == {"cdf.png", "sweep.png"}
    sweep_id = data["sweep_id"]
    report = subprocess.run([sys.executable, "-m", "pagoda", "bench", "report", sweep_id, "--db", str(db),
                             "--markdown"], capture_output=True, text=True, check=True)
    assert report.stdout.count("| concurrency ") == 2


def test_pagoda_bench_serve_exits_nonzero_when_everything_fails(tmp_path):
    closed = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "pagoda", "bench", "serve", "--base-url", f"http://127.0.0.1:{closed}",
         "--model", MODEL, "--num-prompts", "3", "--input-len", "8", "--output-len", "2", "--warmup", "0",
         "--db", str(tmp_path / "b.db"), "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "3 failed" in result.stderr + result.stdout and "ConnectError" in result.stdout
