"""Regression tests for the front-door defects of issue 10, one (at least) per defect,
in process on the tiny chat model (the default model's tokenizer and template)."""

from __future__ import annotations

import json
import logging
import threading

import openai
import pytest

from tests.entrypoints.tiny_server import MODEL, client_for, make_engine

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 3}
GENERATE = {"model": MODEL, "prompt": "Hello", "stream": False, "options": {"num_predict": 3}}
OLLAMA_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "stream": False,
               "options": {"num_predict": 3}}


@pytest.fixture(scope="module")
def engine(tiny_chat_llama):
    engine = make_engine(tiny_chat_llama)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def client(engine):
    return client_for(engine)


def openai_error(response, status: int, param: str | None = "unset") -> dict:
    """Checks OpenAI's error shape (code a string or null) and returns the error object."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] is None or isinstance(error["code"], str)
    if param != "unset":
        assert error["param"] == param, error
    return error


def ollama_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    return body["error"]


def still_serving(client) -> None:
    assert client.get("/health").status_code == 200
    response = client.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3


# -- critical: one request must not stop the server -----------------------------------------


@pytest.mark.parametrize("route,body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_huge_top_k_is_refused_and_the_engine_lives(client, route, body):
    error = openai_error(client.post(route, json={**body, "top_k": 2**63}), 400, "top_k")
    assert "49152" in error["message"]  # the limit: the vocabulary size
    still_serving(client)


def test_ollama_huge_top_k_is_refused(client):
    message = ollama_error(client.post("/api/generate", json={**GENERATE, "options": {"top_k": 1e30}}), 400)
    assert "top_k" in message
    message = ollama_error(client.post("/api/generate", json={**GENERATE, "options": {"top_k": 10**20}}), 400)
    assert "top_k" in message and "49152" in message
    still_serving(client)


def test_beam_search_with_infinite_length_penalty_is_refused(client):
    body = json.dumps({**COMPLETION, "use_beam_search": True, "n": 2, "temperature": 0}).replace(
        "}", ', "length_penalty": -Infinity}')
    openai_error(client.post("/v1/completions", content=body), 400, "length_penalty")
    still_serving(client)


@pytest.mark.parametrize("field", ["n", "best_of"])
@pytest.mark.parametrize("value", [1e30, 10000, 129])
def test_n_and_best_of_have_a_documented_maximum(client, engine, field, value):
    body = {**COMPLETION, field: value, "temperature": 1.0}
    error = openai_error(client.post("/v1/completions", json=body), 400, field)
    if isinstance(value, int):
        assert "128" in error["message"]
    assert engine.num_unfinished == 0 and engine.stats.num_waiting == 0
    still_serving(client)


def test_many_prompts_times_n_is_bounded(client):
    body = {**COMPLETION, "prompt": ["a"] * 16, "n": 128, "temperature": 1.0}
    error = openai_error(client.post("/v1/completions", json=body), 400, "n")
    assert "2048 sequences" in error["message"]


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1])
def test_out_of_range_seed_names_the_field(client, seed):
    openai_error(client.post("/v1/completions", json={**COMPLETION, "seed": seed}), 400, "seed")
    openai_error(client.post("/v1/chat/completions", json={**CHAT, "seed": seed}), 400, "seed")


def test_int64_seeds_work(client):
    for seed in (2**63 - 1, -(2**63)):
        response = client.post("/v1/completions", json={**COMPLETION, "seed": seed, "n": 2, "temperature": 1})
        assert response.status_code == 200, response.text


# -- high: plain-text 500s ------------------------------------------------------------------


@pytest.mark.parametrize("route,body,param", [
    ("/v1/completions", '{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfffb"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", '{"model": "ti\\ud800ny", "messages": [{"role": "user", "content": "a"}]}', "model"),
])
def test_lone_surrogates_are_a_400(client, route, body, param):
    error = openai_error(client.post(route, content=body), 400, param)
    assert "surrogate" in error["message"]


def test_lone_surrogate_on_ollama_is_an_ollama_400(client):
    body = '{"model": "tiny", "prompt": "a\\ud800b", "stream": false}'
    assert "surrogate" in ollama_error(client.post("/api/generate", content=body), 400)


@pytest.mark.parametrize("text", [5, None, ["x"]])
def test_chat_content_part_text_must_be_a_string(client, text):
    body = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}
    openai_error(client.post("/v1/chat/completions", json=body), 400, "messages[0].content[0].text")


@pytest.mark.parametrize("value", ["10", [10], {"n": 10}, 1.5, True])
def test_ollama_num_predict_must_be_an_integer(client, value):
    body = {**GENERATE, "options": {"num_predict": value}}
    assert "num_predict" in ollama_error(client.post("/api/generate", json=body), 400)


# -- medium: strict types and meaningful values ---------------------------------------------


@pytest.mark.parametrize("field,raw", [
    ("temperature", "Infinity"), ("temperature", "1e308"), ("temperature", "NaN"),
    ("repetition_penalty", "Infinity"), ("repetition_penalty", "1e-300"),
    ("length_penalty", "Infinity"), ("top_p", "NaN"), ("frequency_penalty", "-Infinity"),
    ("max_tokens", '"10"'), ("stream", '"yes"'), ("n", '"2"'), ("temperature", '"0.5"'), ("ignore_eos", "1"),
])
def test_meaningless_values_and_coerced_types_are_refused(client, field, raw):
    body = json.dumps(COMPLETION)[:-1] + f', "{field}": {raw}}}'
    openai_error(client.post("/v1/completions", content=body), 400, field)


def test_top_logprobs_needs_logprobs_and_names_itself(client):
    openai_error(client.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 2}), 400, "top_logprobs")
    error = openai_error(client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 21}),
                         400, "top_logprobs")
    assert "20" in error["message"]
    ok = client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2})
    assert ok.status_code == 200
    assert len(ok.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2


def test_stop_strings_have_limits(client):
    openai_error(client.post("/v1/completions", json={**COMPLETION, "stop": ["x"] * 65}), 400, "stop")
    openai_error(client.post("/v1/completions", json={**COMPLETION, "stop": "y" * 1025}), 400, "stop")


def test_tokenizing_runs_off_the_event_loop(client, engine, monkeypatch):
    """A long prompt is tokenized on a worker thread, so the event loop keeps serving."""
    tokenizer = engine.model_info.tokenizer
    threads = []
    original = type(tokenizer).encode

    def recording(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "encode", recording)
    assert client.post("/v1/completions", json=COMPLETION).status_code == 200
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert client.post("/api/generate", json=GENERATE).status_code == 200
    assert client.post("/tokenize", json={"prompt": "hello"}).status_code == 200
    assert len(threads) >= 4
    loop_thread = threading.main_thread().name
    assert all(name != loop_thread and "asyncio" in name for name in threads), threads


def test_request_body_size_limit_is_413(engine):
    client = client_for(engine, max_request_bytes=1000)
    big = {**COMPLETION, "prompt": "x" * 2000}
    error = openai_error(client.post("/v1/completions", json=big), 413)
    assert "1000" in error["message"]
    assert "1000" in ollama_error(client.post("/api/generate", json={**GENERATE, "prompt": "x" * 2000}), 413)
    assert client.post("/v1/completions", json=COMPLETION).status_code == 200


def test_ollama_routes_honour_max_queued_requests(engine):
    client = client_for(engine, max_queued_requests=0)
    assert "max_queued_requests=0" in ollama_error(client.post("/api/generate", json=GENERATE), 503)
    assert "max_queued_requests=0" in ollama_error(client.post("/api/chat", json=OLLAMA_CHAT), 503)


# -- high: every route guarded --------------------------------------------------------------


def test_api_key_guards_every_route_but_health(engine):
    client = client_for(engine, api_key="sesame")
    gets = ["/v1/models", "/v1/models/tiny", "/metrics", "/version", "/docs", "/openapi.json", "/api/tags",
            "/api/version", "/api/ps", "/"]
    posts = [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT), ("/tokenize", {"prompt": "a"}),
             ("/detokenize", {"tokens": [1]}), ("/api/generate", GENERATE), ("/api/chat", OLLAMA_CHAT),
             ("/api/show", {"model": MODEL})]
    for path in gets:
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
    for path, body in posts:
        response = client.post(path, json=body)
        if path.startswith("/api/"):
            ollama_error(response, 401)
        else:
            openai_error(response, 401)
    assert client.get("/health").status_code == 200
    for header in ("Bearer sesame", "bearer sesame", "BEARER  sesame "):
        assert client.post("/v1/completions", json=COMPLETION, headers={"Authorization": header}).status_code == 200
        assert client.get("/metrics", headers={"Authorization": header}).status_code == 200
    for header in ("Bearer wrong", "Basic sesame", "sesame", "Bearer"):
        assert client.get("/api/tags", headers={"Authorization": header}).status_code == 401


# -- compatibility: refused, not ignored ----------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("functions", [{"name": "f"}]), ("function_call", {"name": "f"}),
    ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy"}),
    ("prediction", {"type": "content", "content": "x"}), ("reasoning_effort", "low"),
    ("web_search_options", {}),
])
def test_unsupported_chat_fields_are_refused_by_name(client, field, value):
    error = openai_error(client.post("/v1/chat/completions", json={**CHAT, field: value}), 400, field)
    assert field in error["message"]


def test_neutral_values_of_unsupported_fields_are_accepted(client):
    body = {**CHAT, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "modalities": ["text"]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                                  {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])
def test_image_and_audio_parts_are_refused(client, part):
    body = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "see"}, part]}]}
    openai_error(client.post("/v1/chat/completions", json=body), 400, "messages[0].content[1].type")


def test_malformed_tool_calls_in_history_are_refused(client):
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}]
    openai_error(client.post("/v1/chat/completions", json={**CHAT, "messages": messages}), 400,
                 "messages[1].tool_calls[0]")


@pytest.mark.parametrize("field,value,param", [
    ("tool_choice", "required", "tool_choice"),  # no tools
    ("tools", [{"type": "retrieval"}], "tools[0].type"),
    ("tools", [{"type": "function", "function": {"name": "two words"}}], "tools[0].function.name"),
])
def test_bad_tool_requests_name_the_field(client, field, value, param):
    openai_error(client.post("/v1/chat/completions", json={**CHAT, field: value}), 400, param)


@pytest.mark.parametrize("field,value", [("reasoning", {"effort": "high"}), ("background", True),
                                         ("include", ["reasoning.encrypted_content"]), ("truncation", "auto"),
                                         ("max_tool_calls", 3)])
def test_unsupported_responses_fields_are_refused_by_name(client, field, value):
    body = {"model": MODEL, "input": "Hello", "max_output_tokens": 3, field: value}
    assert field in openai_error(client.post("/v1/responses", json=body), 400, field)["message"]


def test_completion_suffix_is_refused(client):
    openai_error(client.post("/v1/completions", json={**COMPLETION, "suffix": "end"}), 400, "suffix")


@pytest.mark.parametrize("route,field,value", [
    ("/api/generate", "format", "yaml"), ("/api/chat", "format", ["not", "a", "schema"]),
    ("/api/chat", "tools", [{"type": "retrieval"}]),  # only function tools
    ("/api/generate", "images", ["aGk="]), ("/api/generate", "template", "{{ .Prompt }}"),
    ("/api/generate", "think", True),
])
def test_unsupported_ollama_fields_are_refused_by_name(client, route, field, value):
    body = GENERATE if route == "/api/generate" else OLLAMA_CHAT
    assert field in ollama_error(client.post(route, json={**body, field: value}), 400)


@pytest.mark.parametrize("option,value", [("mirostat", 2), ("typical_p", 0.5), ("tfs_z", 0.9)])
def test_unsupported_ollama_sampling_options_are_refused(client, option, value):
    body = {**GENERATE, "options": {"num_predict": 3, option: value}}
    assert option in ollama_error(client.post("/api/generate", json=body), 400)


def test_unknown_fields_are_ignored_with_a_warning(client, caplog):
    with caplog.at_level(logging.WARNING):
        response = client.post("/v1/completions", json={**COMPLETION, "frobnicate": 3})
        ollama = client.post("/api/generate", json={**GENERATE, "options": {"num_predict": 2, "wobble": 1},
                                                    "num_ctx": 4096})
    assert response.status_code == 200 and ollama.status_code == 200
    assert "frobnicate" in caplog.text and "wobble" in caplog.text


# -- compatibility: error shapes, routes, bodies --------------------------------------------


def test_error_shapes_for_malformed_bodies_and_unknown_routes(client):
    error = openai_error(client.post("/v1/completions", content=b'{"model": "tiny", "prompt": "\xff"}'), 400)
    assert "UTF-8" in error["message"]
    assert "nested" in openai_error(client.post("/v1/completions", content="[" * 100000 + "]" * 100000), 400)[
        "message"]
    assert "JSON" in openai_error(client.post("/v1/completions", content="{not json"), 400)["message"]
    openai_error(client.post("/v1/completions", content=""), 400)
    openai_error(client.get("/v1/nope"), 404)
    openai_error(client.get("/v1/completions"), 405)
    ollama_error(client.post("/api/generate", content="{not json"), 400)
    ollama_error(client.post("/api/generate", content=b'{"prompt": "\xff"}'), 400)
    ollama_error(client.get("/api/nope"), 404)
    ollama_error(client.post("/api/generate", json={"prompt": "no model"}), 400)
    ollama_error(client.post("/api/generate", json={**GENERATE, "model": "other"}), 404)


def test_bodies_without_a_json_content_type_are_accepted(client):
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {"content-type": content_type} if content_type else {}
        response = client.post("/v1/completions", content=json.dumps(COMPLETION), headers=headers)
        assert response.status_code == 200, response.text
    response = client.post("/api/generate", content=json.dumps(GENERATE),
                           headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200


def test_models_retrieve_with_the_openai_sdk(client):
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)
    assert sdk.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-4")


def test_ollama_root_ps_embeddings_pull(client):
    root = client.get("/")
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert client.head("/").status_code == 200
    models = client.get("/api/ps").json()["models"]
    assert [m["name"] for m in models] == [f"{MODEL}:latest"]
    assert "embeddings" in ollama_error(client.post("/api/embed", json={"model": MODEL, "input": "x"}), 501)
    assert "embeddings" in ollama_error(client.post("/api/embeddings", json={"model": MODEL, "prompt": "x"}), 501)
    assert client.post("/api/pull", json={"model": MODEL}).json() == {"status": "success"}
    ollama_error(client.post("/api/pull", json={"model": "llama3"}), 404)


def test_ollama_generate_returns_a_context_that_continues_the_conversation(client, engine):
    first = client.post("/api/generate", json=GENERATE).json()
    context = first["context"]
    assert len(context) == first["prompt_eval_count"] + first["eval_count"]
    follow = client.post("/api/generate", json={**GENERATE, "context": context}).json()
    assert follow["prompt_eval_count"] > len(context)  # the old conversation, then the new prompt
    ollama_error(client.post("/api/generate", json={**GENERATE, "context": [10**9]}), 400)


def test_logprob_bytes_are_each_tokens_own_bytes(client, engine):
    body = {**CHAT, "max_tokens": 12, "logprobs": True, "top_logprobs": 1, "temperature": 1.0, "seed": 3,
            "logit_bias": {str(t): -100 for t in engine.model_info.tokenizer.all_special_ids}}
    response = client.post("/v1/chat/completions", json=body).json()
    entries = response["choices"][0]["logprobs"]["content"]
    joined = b"".join(bytes(e["bytes"]) for e in entries)
    assert joined.decode("utf-8", errors="replace") == response["choices"][0]["message"]["content"]


def test_logprob_bytes_rebuild_multibyte_characters(engine):
    from pagoda.entrypoints.openai.token_bytes import token_bytes

    tokenizer = engine.model_info.tokenizer
    text = "héllo → 日本 world"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [token_bytes(tokenizer, i) for i in ids]
    assert any(b"\xef\xbf\xbd" != p and p and not _is_utf8(p) for p in pieces)  # some token is part of a char
    assert b"".join(pieces).decode() == text


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_refusal_is_null_in_messages_and_logprobs(client):
    response = client.post("/v1/chat/completions", json={**CHAT, "logprobs": True}).json()
    choice = response["choices"][0]
    assert choice["message"]["refusal"] is None and "refusal" in choice["message"]
    assert "refusal" in choice["logprobs"] and choice["logprobs"]["refusal"] is None
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "logprobs": True, "stream": True}) as stream:
        chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    with_logprobs = [c for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert with_logprobs and all(c["choices"][0]["logprobs"]["refusal"] is None for c in with_logprobs)


def test_priority_without_the_priority_policy_is_refused(client):
    error = openai_error(client.post("/v1/completions", json={**COMPLETION, "priority": 5}), 400, "priority")
    assert "--scheduling-policy priority" in error["message"]
    assert client.post("/v1/completions", json={**COMPLETION, "priority": 0}).status_code == 200


def test_tokenize_refuses_image_parts(client):
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    openai_error(client.post("/tokenize", json=body), 400, "messages[0].content[0].type")
