"""Tool-call parsers, the streamed deltas they produce, the tool prompt and tool_choice plans."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.tools.calls import parse_call, scan_call
from pagoda.tools.choice import ToolRequestError, plan_tools, required_schema
from pagoda.tools.parsers import (
    HermesToolParser,
    JsonArrayToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    NamedToolParser,
    ToolCallStream,
)
from pagoda.tools.render import fallback_messages

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}

CASES = [
    (HermesToolParser(), 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                         '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
     "Let me check.", [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]),
    (HermesToolParser(), '<tool_call>[\n{"name": "add", "arguments": {"a": 1, "b": 2}},\n'
                         '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n]</tool_call>',
     None, [("add", '{"a": 1, "b": 2}'), ("get_weather", '{"city": "Oslo"}')]),
    (Llama3JsonToolParser(), '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo, \\"NO\\""}}; '
                             '{"name": "f", "parameters": {"a": [1, {"b": "}"}]}}',
     None, [("get_weather", '{"city": "Oslo, \\"NO\\""}'), ("f", '{"a": [1, {"b": "}"}]}')]),
    (MistralToolParser(), 'Sure [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}]',
     "Sure", [("get_weather", '{"city": "Rome"}')]),
    (JsonArrayToolParser(), '[{"name": "get_weather", "parameters": {"city": "Lima"}}, '
                            '{"name": "get_weather", "parameters": {"city": "Quito"}}]',
     None, [("get_weather", '{"city": "Lima"}'), ("get_weather", '{"city": "Quito"}')]),
    (NamedToolParser("get_weather"), '{"city": "Kyiv"}', None, [("get_weather", '{"city": "Kyiv"}')]),
]


@pytest.mark.parametrize("parser,text,content,calls", CASES, ids=[f"{c[0].name}-{i}" for i, c in enumerate(CASES)])
def test_extract(parser, text, content, calls):
    got_content, got_calls = parser.extract(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    assert all(c.id.startswith("call_") for c in got_calls)


def _stream(parser, text, cuts):
    stream = ToolCallStream(parser)
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    content, calls = "", {}
    for k, piece in enumerate(pieces):
        c, deltas = stream.feed(piece, final=k == len(pieces) - 1)
        content += c
        for d in deltas:
            call = calls.setdefault(d["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in d:
                assert call["id"] is None and call["arguments"] == ""  # id and name come first, once
                call["id"], call["name"] = d["id"], d["function"]["name"]
            call["arguments"] += d["function"]["arguments"]
    return content, [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]


@pytest.mark.parametrize("parser,text,content,calls", CASES, ids=[f"{c[0].name}-{i}" for i, c in enumerate(CASES)])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_streamed_deltas_join_to_the_same_calls(parser, text, content, calls, data):
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(text) - 1), max_size=12))))
    streamed_content, streamed_calls = _stream(parser, text, cuts)
    assert streamed_calls == calls
    assert streamed_content.strip() == (content or "")


def test_plain_text_is_content_and_markers_are_held_back():
    stream = ToolCallStream(HermesToolParser())
    assert stream.feed("Hello <tool") == ("Hello ", [])
    assert stream.feed(" box", final=True) == ("<tool box", [])
    assert HermesToolParser().extract("no calls here") == ("no calls here", [])


def test_broken_calls_are_content():
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>'  # the object never closes
    assert HermesToolParser().extract(text) == (text, [])
    content, calls = _stream(HermesToolParser(), text, [5, 20])
    assert calls == [] and content == text


def test_scan_reports_partial_arguments():
    scan = scan_call('{"name": "f", "arguments": {"x": [1, 2')
    assert scan.name == "f" and scan.arguments == '{"x": [1, 2' and not scan.complete
    assert parse_call('{"arguments": {}, "name": "g"}').name == "g"
    assert parse_call('{"name": "g"} trailing') is None
    assert not scan_call("[1]").valid


def test_plans():
    assert plan_tools(None, None, None, "hermes").mode == "none"
    auto = plan_tools([WEATHER], None, None, "hermes")
    assert auto.mode == "auto" and auto.constraint is None and auto.parser.name == "hermes"
    required = plan_tools([WEATHER], "required", False, "llama3_json")
    assert required.constraint == ("json", required_schema(required.tools, parallel=False))
    assert required.constraint[1]["maxItems"] == 1 and required.parser.name == "json_array"
    hermes = plan_tools([WEATHER], "required", True, "hermes")
    kind, tag = hermes.constraint
    assert kind == "structural_tag" and hermes.parser.name == "hermes"
    assert tag["format"]["tags"][0]["begin"].startswith('<tool_call>\n{"name": "get_weather"')
    assert not tag["format"]["stop_after_first"]
    named = plan_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None, None)
    assert named.constraint == ("json", WEATHER["function"]["parameters"]) and named.finish_reason_for_calls == "stop"
    for tools, choice, field in [
        ([WEATHER], "sometimes", "tool_choice"),
        ([], "required", "tool_choice"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
        ([{"type": "retrieval"}], None, "tools[0].type"),
        ([{"type": "function", "function": {"name": "bad name!"}}], None, "tools[0].function.name"),
        ([WEATHER, WEATHER], None, "tools"),
        ([WEATHER], "auto", "tool_choice"),  # auto is off (no parser)
    ]:
        with pytest.raises(ToolRequestError) as error:
            plan_tools(tools, choice, None, None if choice == "auto" else "hermes")
        assert error.value.field == field


def test_fallback_messages_render_calls_and_results():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "24C"},
    ]
    out = fallback_messages(messages, [WEATHER])
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.") and json.dumps(WEATHER) in out[0]["content"]
    assert out[2]["content"].count("<tool_call>") == 2 and '"city": "Rome"' in out[2]["content"]
    assert "18C" in out[3]["content"] and "24C" in out[3]["content"]
