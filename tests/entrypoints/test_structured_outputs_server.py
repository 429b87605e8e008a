"""Structured outputs through a real `pagoda serve` on the default model: the official openai
SDK (`parse` with a pydantic model, response_format, vLLM's extra body and guided_* fields,
streaming, n > 1, a mixed batch, refusals), the Ollama client, langchain-openai, and a
hypothesis fuzz of schemas, regexes and grammars (a 4xx or a valid answer, never a 5xx)."""

from __future__ import annotations

import asyncio
import enum
import json
import re

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from tests.conftest import requires_smollm2
from tests.entrypoints.serve_process import free_port, start_server

pytestmark = requires_smollm2
MODEL = "smollm2-135m-instruct"
DATE = r"\d{4}-\d{2}-\d{2}"


class Mood(str, enum.Enum):
    happy = "happy"
    calm = "calm"
    grumpy = "grumpy"


class Address(BaseModel):
    city: str = Field(max_length=24)
    country: str = Field(max_length=24)


class Profile(BaseModel):
    name: str = Field(max_length=24)
    age: int
    mood: Mood
    hobbies: list[str] = Field(max_length=3)
    address: Address
    nickname: str | None = Field(max_length=16)


PROMPTS = [
    "Describe a retired sailor.", "Make up a profile for a chess player.", "Who is your favourite painter?",
    "Invent a character for a mystery novel.", "Describe a baker from Lyon.", "Profile of a young astronaut.",
    "Tell me about a grumpy librarian.", "Describe a calm beekeeper.", "Make a profile for a jazz drummer.",
    "Describe a child who loves dinosaurs.", "Invent a famous chef.", "Describe a marathon runner from Kenya.",
    "A profile for a software engineer in Oslo.", "Describe a farmer who grows tulips.", "Who lives next door?",
    "Describe a happy dog walker.", "Make up a pirate captain.", "Describe a poet from Lisbon.",
    "Profile of a night-shift nurse.", "Describe a street musician in Berlin.",
]
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"], "additionalProperties": False,
}


def _person(text: str) -> bool:
    value = json.loads(text)
    return set(value) == {"name", "age"} and isinstance(value["name"], str) and isinstance(value["age"], int)


@pytest.fixture(scope="module")
def server():
    process, base = start_server(free_port(), "--max-num-seqs", "32")
    yield base
    process.terminate()
    assert process.wait(timeout=60) == 0


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_parse_returns_a_valid_object_for_twenty_prompts(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*[
            client.chat.completions.parse(model=MODEL, messages=_chat(prompt), response_format=Profile,
                                          max_tokens=300, temperature=0.7, seed=i)
            for i, prompt in enumerate(PROMPTS)])

    for response in asyncio.run(main()):
        choice = response.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Profile)  # the SDK validated it against the model
        assert Profile.model_validate_json(choice.message.content) == choice.message.parsed


def test_a_regex_and_a_choice_constrain_the_text_exactly(client):
    for extra in ({"guided_regex": DATE}, {"structured_outputs": {"regex": DATE}}):
        text = client.chat.completions.create(model=MODEL, messages=_chat("When were you born?"), max_tokens=20,
                                              extra_body=extra).choices[0].message.content
        assert re.fullmatch(DATE, text), text
    choices = ["red", "green", "dark blue"]
    for extra in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        response = client.completions.create(model=MODEL, prompt="My favourite colour is", max_tokens=10,
                                             temperature=1.0, n=3, extra_body=extra)
        assert all(c.text in choices and c.finish_reason == "stop" for c in response.choices)


def test_json_object_and_a_grammar(client):
    response = client.chat.completions.create(model=MODEL, messages=_chat("Give me a JSON object about cats."),
                                              max_tokens=200, response_format={"type": "json_object"})
    choice = response.choices[0]
    assert choice.finish_reason != "stop" or isinstance(json.loads(choice.message.content), dict)
    grammar = 'root ::= "Answer: " ("yes" | "no")'
    for extra in ({"guided_grammar": grammar}, {"structured_outputs": {"grammar": grammar}}):
        text = client.completions.create(model=MODEL, prompt="Is the sea salty?", max_tokens=10,
                                         extra_body=extra).choices[0].text
        assert text in ("Answer: yes", "Answer: no")


def test_completions_take_response_format_and_guided_json(client):
    for extra in ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON_SCHEMA}}},
                  {"guided_json": PERSON_SCHEMA}, {"guided_json": json.dumps(PERSON_SCHEMA)}):
        choice = client.completions.create(model=MODEL, prompt="A person as JSON:", max_tokens=60,
                                           extra_body=extra).choices[0]
        assert choice.finish_reason == "stop" and _person(choice.text)


def test_a_streamed_schema_answer_assembles_to_valid_json(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=_chat("Describe someone."), max_tokens=80, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA,
                                                                "strict": True}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop" and _person(text)


def test_n_samples_are_each_valid(client):
    response = client.chat.completions.create(
        model=MODEL, messages=_chat("Describe someone."), max_tokens=80, n=2, temperature=1.0, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}})
    assert len(response.choices) == 2
    assert all(c.finish_reason == "stop" and _person(c.message.content) for c in response.choices)


def test_a_mixed_batch_of_constrained_and_free_requests(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
        free = [client.chat.completions.create(model=MODEL, messages=_chat(f"Tell me a fact about the number {i}."),
                                               max_tokens=40, temperature=0) for i in range(6)]
        constrained = [client.chat.completions.create(
            model=MODEL, messages=_chat(f"Describe person {i}."), max_tokens=80, seed=i,  # sampled, reproducibly
            extra_body={"guided_json": PERSON_SCHEMA}) for i in range(6)]
        return await asyncio.gather(*free), await asyncio.gather(*constrained)

    free, constrained = asyncio.run(main())
    assert all(r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content for r in free)
    assert not any(r.choices[0].message.content.lstrip().startswith('{"name"') for r in free)
    assert all(r.choices[0].finish_reason == "stop" and _person(r.choices[0].message.content) for r in constrained)


@pytest.mark.parametrize("route,extra,param", [
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
     "response_format.json_schema.schema"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ("chat", {"response_format": {"type": "bogus"}}, "response_format.type"),
    ("chat", {"guided_regex": "([a-z]"}, "guided_regex"),
    ("completions", {"guided_grammar": "root ::= nothing"}, "guided_grammar"),
    ("completions", {"structured_outputs": {"json": {"type": "object", "properties": {"a": {"$ref": "#/x"}}}}},
     "structured_outputs.json"),
    ("completions", {"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ("completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ("completions", {"structured_outputs": {"regx": "a"}}, "structured_outputs.regx"),
    ("chat", {"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
    ("chat", {"response_format": {"type": "json_object"}, "use_beam_search": True, "n": 2}, "response_format"),
])
def test_invalid_constraints_are_a_400_naming_the_field(client, route, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        if route == "chat":
            client.chat.completions.create(model=MODEL, messages=_chat("hi"), max_tokens=5, extra_body=extra)
        else:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=5, extra_body=extra)
    error = info.value.body
    assert error["param"] == param and param.split(".")[0] in error["message"], error


def test_a_forced_tool_choice_and_a_response_format_are_refused_together(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(openai.BadRequestError, match="response_format") as error:
        client.chat.completions.create(model=MODEL, messages=_chat("hi"), max_tokens=5, tools=tools,
                                       tool_choice="required", response_format={"type": "json_object"})
    assert error.value.body["param"] == "response_format"


def test_the_ollama_client_with_a_schema_and_with_json(server):
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=server)
    response = client.chat(model=MODEL, messages=_chat("Describe a person."), format=PERSON_SCHEMA,
                           options={"num_predict": 80, "seed": 1})  # sampled, reproducibly
    assert response.done_reason == "stop" and _person(response.message.content)
    response = client.generate(model=MODEL, prompt="A JSON object about dogs:", format="json",
                               options={"num_predict": 120, "temperature": 0})
    assert response.done_reason != "stop" or isinstance(json.loads(response.response), dict)
    stream = client.chat(model=MODEL, messages=_chat("Describe a person."), format=PERSON_SCHEMA, stream=True,
                         options={"num_predict": 80, "seed": 1})
    assert _person("".join(part.message.content for part in stream))
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model=MODEL, messages=_chat("hi"), format={"type": "objec"})
    assert info.value.status_code == 400 and "format" in info.value.error


def test_langchain_with_structured_output(server):
    langchain_openai = pytest.importorskip("langchain_openai")

    class City(BaseModel):
        name: str = Field(max_length=24)
        country: str = Field(max_length=24)

    llm = langchain_openai.ChatOpenAI(base_url=f"{server}/v1", api_key="unused", model=MODEL, max_tokens=80,
                                      temperature=0, max_retries=0)
    city = llm.with_structured_output(City).invoke("Name a city in Japan.")
    assert isinstance(city, City) and city.name


# -- fuzz: schemas, regexes and grammars -----------------------------------------------------

leaf_schemas = st.one_of(
    st.fixed_dictionaries({"type": st.just("string"), "maxLength": st.integers(0, 12)}),
    st.fixed_dictionaries({"type": st.just("integer"), "minimum": st.integers(-50, 0), "maximum": st.integers(0, 50)}),
    st.fixed_dictionaries({"type": st.just("boolean")}),
    st.fixed_dictionaries({"enum": st.lists(st.text(max_size=6), min_size=1, max_size=3, unique=True)}),
)
schemas = st.recursive(leaf_schemas, lambda inner: st.one_of(
    st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), inner, min_size=1, max_size=3).map(
        lambda props: {"type": "object", "properties": props, "required": sorted(props),
                       "additionalProperties": False}),
    st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, inner, st.integers(0, 2)),
), max_leaves=4)
hostile_schemas = st.one_of(
    st.dictionaries(st.sampled_from(["type", "properties", "items", "enum", "$ref", "anyOf", "required",
                                     "minimum", "pattern", "format", "maxLength"]),
                    st.one_of(st.text(max_size=8), st.integers(-5, 5), st.lists(st.text(max_size=3), max_size=2),
                              st.dictionaries(st.text(max_size=3), st.just({}), max_size=2), st.none()),
                    max_size=3),
    st.sampled_from([{"type": "string", "pattern": "[a-"}, {"$ref": "#/$defs/x"}, {"type": ["string", 3]},
                     {"anyOf": []}, {"type": "array", "minItems": 5, "maxItems": 1}, {"enum": []}]),
)


def conforms(value, schema) -> bool:
    """Whether `value` matches one of the generated `schemas` (their keywords only)."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema["type"]
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema["maxLength"]
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool) and schema["minimum"] <= value <= schema["maximum"]
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array":
        return isinstance(value, list) and len(value) <= schema["maxItems"] and all(
            conforms(v, schema["items"]) for v in value)
    return isinstance(value, dict) and set(value) == set(schema["properties"]) and all(
        conforms(value[k], s) for k, s in schema["properties"].items())


def _post(server: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "JSON:", "max_tokens": 48,
                                                        **body}, timeout=120)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(schemas, hostile_schemas))
def test_fuzzed_schemas_get_a_4xx_or_a_valid_answer(server, schema):
    response = _post(server, {"guided_json": schema})
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        choice = response.json()["choices"][0]
        if choice["finish_reason"] == "stop" and "type" in schema and schema in schemas_seen(schema):
            assert conforms(json.loads(choice["text"]), schema), (schema, choice["text"])
    else:
        error = response.json()["error"]
        assert error["param"] == "guided_json" or "structured_outputs.json" in error["message"]


def schemas_seen(schema) -> list:
    """[schema] if it is one of the well-formed generated schemas (their keywords are checked), else []."""
    try:
        conforms(None, schema)
    except (KeyError, TypeError):
        return []
    return [schema]


regex_atoms = st.sampled_from(["a", "b", "[0-9]", "[a-z]", r"\d", "x?", "(ab|cd)", "[A-F]{2}", "-", r"\.", "z+"])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.lists(regex_atoms, min_size=1, max_size=5).map("".join), st.text(max_size=8)))
def test_fuzzed_regexes_get_a_4xx_or_a_matching_answer(server, regex):
    response = _post(server, {"structured_outputs": {"regex": regex}, "max_tokens": 16})
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        choice = response.json()["choices"][0]
        if choice["finish_reason"] == "stop":
            try:
                pattern = re.compile(regex)
            except re.error:
                return  # not a Python regex: nothing to compare with
            assert pattern.fullmatch(choice["text"]), (regex, choice["text"])
    else:  # refused at the edge (param), or found in the engine to be unfinishable (named in the message)
        error = response.json()["error"]
        assert error["param"] == "structured_outputs.regex" or "structured_outputs.regex" in error["message"]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=30), st.builds(lambda a, b: f'root ::= "{a}" | "{b}"',
                                                  st.text("abc \\\"", max_size=4), st.text("xyz", max_size=4))))
def test_fuzzed_grammars_get_a_4xx_or_an_answer_and_the_server_lives(server, grammar):
    response = _post(server, {"guided_grammar": grammar, "max_tokens": 8})
    assert response.status_code < 500, response.text
    assert httpx.get(f"{server}/health").status_code == 200
