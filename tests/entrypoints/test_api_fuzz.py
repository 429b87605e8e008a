"""Property-based fuzzing of both APIs (hypothesis): bodies built from a valid request
with fields replaced by hostile values (±inf, NaN, huge and negative ints, wrong types,
lone surrogates, deep nesting, long lists), and arbitrary JSON. Every answer must be a
2xx, or a 4xx in the shape of the route's API; a stream must end properly; afterwards
the same server still answers a normal request and /health is 200."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.entrypoints.tiny_server import MODEL, client_for, make_engine

ROUTES = {
    "/v1/completions": {"model": MODEL, "prompt": "Hello", "max_tokens": 2},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2},
    "/api/generate": {"model": MODEL, "prompt": "Hello", "stream": False, "options": {"num_predict": 2}},
    "/api/chat": {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "stream": False,
                  "options": {"num_predict": 2}},
    "/v1/responses": {"model": MODEL, "input": "Hello", "max_output_tokens": 2},
}
RESPONSES_FIELDS = ["model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools",
                    "tool_choice", "parallel_tool_calls", "text", "stream", "previous_response_id", "store",
                    "metadata", "reasoning", "include", "truncation", "seed", "unknown_field"]
OPENAI_FIELDS = ["model", "prompt", "messages", "n", "best_of", "temperature", "top_p", "top_k", "min_p",
                 "presence_penalty", "frequency_penalty", "repetition_penalty", "seed", "stop", "stop_token_ids",
                 "ignore_eos", "min_tokens", "logit_bias", "stream", "stream_options", "truncate_prompt_tokens",
                 "cache_salt", "priority", "use_beam_search", "beam_width", "length_penalty", "early_stopping",
                 "logprobs", "top_logprobs", "echo", "user", "tools", "response_format", "suffix", "unknown_field"]
OLLAMA_FIELDS = ["model", "prompt", "messages", "system", "raw", "stream", "context", "format", "options",
                 "keep_alive", "images", "tools", "think", "unknown_field"]
OLLAMA_OPTIONS = ["temperature", "top_p", "top_k", "min_p", "seed", "stop", "num_predict", "repeat_penalty",
                  "presence_penalty", "frequency_penalty", "num_ctx", "mirostat", "typical_p", "wobble"]
# Fields whose valid values make work: kept small so a lucky valid draw stays quick.
BUDGET_FIELDS = {"max_tokens", "num_predict", "min_tokens", "n", "best_of", "beam_width"}

huge_ints = st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63) - 1, -1, 0, -(10**20)])
floats = st.one_of(st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e308, -1e308, 1e-300, -0.0]),
                   st.floats(allow_nan=True, allow_infinity=True))
strings = st.one_of(st.sampled_from(["", "a\ud800b", "\udfff", "\x00", "10", "yes", "true", "null", "x" * 5000]),
                    st.text(max_size=20))
scalars = st.one_of(st.none(), st.booleans(), huge_ints, st.integers(-5, 300), floats, strings)


def deep(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


structures = st.one_of(
    st.lists(scalars, max_size=5),
    st.dictionaries(strings, scalars, max_size=4),
    st.sampled_from([deep(70), deep(3), list(range(5000)), ["s"] * 100, [[1, 2], [3]], [{"type": "text"}],
                     [{"role": "user"}], [{"role": "user", "content": [{"type": "image_url"}]}],
                     {"type": "json_object"}, {"num_predict": "3"}, {"top_k": 1e30}]),
)
hostile = st.one_of(scalars, structures)
small_budget = st.one_of(st.integers(-3, 4), st.sampled_from([2**63, 1e30, "2", None, True, float("nan")]))


def mutations(fields: list[str]) -> st.SearchStrategy[dict]:
    field = st.sampled_from(fields + sorted(BUDGET_FIELDS))
    return st.dictionaries(field, hostile, min_size=1, max_size=3).flatmap(
        lambda changes: st.fixed_dictionaries(
            {name: (small_budget if name in BUDGET_FIELDS else st.just(value)) for name, value in changes.items()}))


def ollama_body(base: dict) -> st.SearchStrategy[dict]:
    options = st.dictionaries(st.sampled_from(OLLAMA_OPTIONS), st.one_of(hostile, small_budget), max_size=3)
    return st.tuples(mutations(OLLAMA_FIELDS), options).map(
        lambda pair: {**base, **pair[0], **({"options": {"num_predict": 2, **pair[1]}} if pair[1] else {})})


@pytest.fixture(scope="module")
def client(tiny_chat_llama):
    engine = make_engine(tiny_chat_llama)
    yield client_for(engine, max_request_bytes=256 * 1024)
    engine.shutdown()


def check_answer(route: str, response) -> None:
    assert response.status_code < 500, (route, response.status_code, response.text[:500])
    ollama = route.startswith("/api/")
    if response.status_code >= 400:
        body = response.json()
        if ollama:
            assert set(body) == {"error"} and isinstance(body["error"], str), body
        else:
            error = body["error"]
            assert set(error) == {"message", "type", "param", "code"}, body
            assert isinstance(error["message"], str)
            assert error["code"] is None or isinstance(error["code"], str)
            assert error["param"] is None or isinstance(error["param"], str)
        return
    assert 200 <= response.status_code < 300
    text = response.text
    if response.headers["content-type"].startswith("text/event-stream") and route == "/v1/responses":
        events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1]["type"] in ("response.completed", "response.incomplete"), events[-1]
        assert all(event["type"] != "error" for event in events)
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert all("error" not in json.loads(event) for event in events[:-1])
    elif ollama and "ndjson" in response.headers["content-type"]:
        lines = [json.loads(line) for line in text.splitlines() if line]
        assert lines[-1]["done"] is True and "error" not in lines[-1]
    else:
        json.loads(text)


def post(client, route: str, body: object):
    return client.post(route, content=json.dumps(body, allow_nan=True))


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])


def still_serving(client) -> None:
    assert client.get("/health").status_code == 200
    response = client.post("/v1/chat/completions", json=ROUTES["/v1/chat/completions"])
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_openai_routes_answer_hostile_bodies_with_2xx_or_a_shaped_4xx(client, route):
    @FUZZ
    @given(changes=mutations(OPENAI_FIELDS + (["max_tokens", "max_completion_tokens"]
                                              if "chat" in route else ["max_tokens"])))
    def fuzz(changes):
        check_answer(route, post(client, route, {**ROUTES[route], **changes}))

    fuzz()
    still_serving(client)


def test_responses_route_answers_hostile_bodies_with_2xx_or_a_shaped_4xx(client):
    route = "/v1/responses"

    @FUZZ
    @given(changes=mutations(RESPONSES_FIELDS))
    def fuzz(changes):
        if "max_output_tokens" not in changes:
            changes["max_output_tokens"] = 2
        check_answer(route, post(client, route, {**ROUTES[route], **changes}))

    fuzz()
    still_serving(client)


names = st.one_of(strings, st.sampled_from(["get_weather", "a" * 65, "a b", "ok.name-1"]))
schemas = st.one_of(hostile, st.sampled_from([
    {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
    {"type": "object", "properties": {"x": {"type": "bogus"}}}, {"type": "array"}, {"$ref": "#/nope"},
    {"type": "object", "properties": {"s": {"type": "string", "pattern": "[unclosed"}}}, {}]))
tool_lists = st.lists(st.one_of(hostile, st.fixed_dictionaries({
    "type": st.sampled_from(["function", "retrieval", None]),
    "function": st.one_of(hostile, st.fixed_dictionaries({"name": names, "parameters": schemas}))})), max_size=3)
tool_choices = st.one_of(hostile, st.sampled_from(["none", "auto", "required"]),
                         st.fixed_dictionaries({"type": st.just("function"),
                                                "function": st.fixed_dictionaries({"name": names})}))


@pytest.mark.parametrize("stream", [False, True])
def test_tools_and_tool_choice_fuzz(client, stream):
    """Tool lists and choices with hostile names and schemas: a 4xx naming the problem, or an answer
    (forced choices compile the schemas into a grammar: a bad one is a 400, never a 500)."""
    route = "/v1/chat/completions"

    @FUZZ
    @given(tools=tool_lists, choice=tool_choices, parallel=st.one_of(st.none(), st.booleans(), hostile))
    def fuzz(tools, choice, parallel):
        body = {**ROUTES[route], "tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel,
                "max_tokens": 4, "stream": stream}
        check_answer(route, post(client, route, body))

    fuzz()
    still_serving(client)


@pytest.mark.parametrize("route", ["/api/generate", "/api/chat"])
def test_ollama_routes_answer_hostile_bodies_with_2xx_or_a_shaped_4xx(client, route):
    @FUZZ
    @given(body=ollama_body(ROUTES[route]))
    def fuzz(body):
        check_answer(route, post(client, route, body))

    fuzz()
    still_serving(client)


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
                           lambda children: st.one_of(st.lists(children, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), children, max_size=4)),
                           max_leaves=20)


@pytest.mark.parametrize("route", [*ROUTES, "/tokenize", "/detokenize", "/api/show"])
def test_arbitrary_json_bodies(client, route):
    @FUZZ
    @given(body=json_values)
    def fuzz(body):
        check_answer(route, post(client, route, body))

    fuzz()
    still_serving(client)
