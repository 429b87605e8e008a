"""The request fields that constrain the output, read into one `StructuredOutputsParams`.

OpenAI's `response_format` (`text`, `json_object`, `json_schema`, and vLLM's
`structural_tag`), vLLM's extra body `structured_outputs: {json|regex|choice|grammar|
json_object|structural_tag, ...}` and its legacy `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar`. At most one of them may constrain a request. The
constraint is checked here, at the edge (the schema, regex or grammar is built once with
xgrammar): a bad one is a 400 that names the field as the client sent it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pagoda.entrypoints.openai.errors import APIError
from pagoda.structured_output.params import KINDS, StructuredOutputsError, StructuredOutputsParams

logger = logging.getLogger(__name__)

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
# vLLM's `structured_outputs` keys that pagoda reads besides the constraint itself.
_OPTION_KEYS = {"disable_any_whitespace", "disable_fallback", "disable_additional_properties", "backend",
                "whitespace_pattern"}
_BACKENDS = (None, "auto", "xgrammar")


@dataclass
class Constraint:
    params: StructuredOutputsParams
    field: str  # the request field it came from, for errors
    spec_field: str  # the field holding the schema, regex or grammar itself


def check_compiles(manager, constraint: Constraint) -> None:
    """The full check against the served tokenizer (compiles, can start): 400 naming the field.
    Blocks for the compile: run it off the event loop."""
    try:
        manager.check_compiles(constraint.params)
    except StructuredOutputsError as error:
        raise _invalid(constraint.spec_field, error.value, error.problem) from None


def _invalid(field: str, value: object, problem: str) -> APIError:
    shown = repr(value)
    if len(shown) > 120:
        shown = shown[:117] + "..."
    return APIError(400, f"{field}={shown} is invalid: {problem}", field)


def _build(field: str, kind: str, value: object, spec_field: str, any_whitespace: bool = False) -> Constraint:
    """StructuredOutputsParams(kind=value), checked; errors name `spec_field`."""
    try:
        params = StructuredOutputsParams(**{kind: value}, any_whitespace=any_whitespace)
        from pagoda.structured_output import grammar  # xgrammar: only for constrained requests

        grammar.check(params)
    except StructuredOutputsError as error:
        raise _invalid(spec_field, value, error.problem) from None
    return Constraint(params, field, spec_field)


def _from_response_format(value: dict) -> Constraint | None:
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _build("response_format", "json_object", True, "response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise _invalid("response_format.json_schema", spec,
                           'must be an object {"name": ..., "schema": {...}, "strict": ...}')
        if "schema" not in spec:
            raise _invalid("response_format.json_schema.schema", None, "the JSON schema is missing")
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            raise _invalid("response_format.json_schema.name", name, "must be a string")
        return _build("response_format", "json", spec["schema"], "response_format.json_schema.schema")
    if kind == "structural_tag":
        tag = {k: v for k, v in value.items()}
        if "format" not in tag:  # vLLM's legacy form: {"type": "structural_tag", "structures", "triggers"}
            tag.pop("type")
            tag = _legacy_structural_tag(tag)
        return _build("response_format", "structural_tag", tag, "response_format")
    raise _invalid("response_format.type", kind, 'must be "text", "json_object", "json_schema" or "structural_tag"')


def _legacy_structural_tag(tag: dict) -> dict:
    """vLLM's {"structures": [{"begin", "schema", "end"}], "triggers": [...]} as xgrammar's structural tag."""
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not isinstance(structures, list) or not isinstance(triggers, list):
        raise _invalid("response_format", tag, 'a structural tag needs "format", or "structures" and "triggers"')
    tags = []
    for i, item in enumerate(structures):
        if not isinstance(item, dict) or not {"begin", "end"} <= set(item):
            raise _invalid(f"response_format.structures[{i}]", item, 'must have "begin", "schema" and "end"')
        tags.append({"type": "tag", "begin": item["begin"], "end": item["end"],
                     "content": {"type": "json_schema", "json_schema": item.get("schema", {})}})
    return {"type": "structural_tag",
            "format": {"type": "triggered_tags", "triggers": triggers, "tags": tags}}


def _from_structured_outputs(value: dict) -> Constraint:
    unknown = sorted(set(value) - set(KINDS) - _OPTION_KEYS)
    if unknown:
        raise _invalid(f"structured_outputs.{unknown[0]}", value[unknown[0]],
                       f"unknown key; the keys are {', '.join(KINDS + tuple(sorted(_OPTION_KEYS)))}")
    if value.get("whitespace_pattern") is not None:
        raise APIError(400, "structured_outputs.whitespace_pattern is not supported by this server; use "
                            "disable_any_whitespace", "structured_outputs.whitespace_pattern",
                       code="unsupported_parameter")
    if value.get("backend") not in _BACKENDS:
        raise _invalid("structured_outputs.backend", value.get("backend"), 'must be "auto" or "xgrammar"')
    given = [kind for kind in KINDS if value.get(kind) not in (None, False)]
    if len(given) != 1:
        raise _invalid("structured_outputs", value, f"set exactly one of {', '.join(KINDS)}")
    disable = value.get("disable_any_whitespace")
    if disable is not None and not isinstance(disable, bool):
        raise _invalid("structured_outputs.disable_any_whitespace", disable, "must be true or false")
    kind = given[0]
    # pagoda's default is compact JSON; an explicit false asks for any whitespace (vLLM's default).
    return _build("structured_outputs", kind, value[kind], f"structured_outputs.{kind}",
                  any_whitespace=disable is False)


def constraint_from_body(body) -> Constraint | None:
    """The one constraint the body asks for (None: free text); 400 when it asks for more than one."""
    found: list[tuple[str, object]] = []
    response_format = getattr(body, "response_format", None)
    if response_format is not None and response_format.get("type") != "text":
        found.append(("response_format", response_format))
    if body.structured_outputs is not None:
        found.append(("structured_outputs", body.structured_outputs))
    for name in GUIDED_FIELDS:
        if getattr(body, name) is not None:
            found.append((name, getattr(body, name)))
    if response_format is not None and response_format.get("type") == "text" and len(response_format) > 1:
        raise _invalid("response_format", response_format, 'type "text" takes no other keys')
    if body.guided_decoding_backend not in _BACKENDS:
        raise _invalid("guided_decoding_backend", body.guided_decoding_backend, 'must be "auto" or "xgrammar"')
    if body.guided_whitespace_pattern is not None:
        raise APIError(400, "guided_whitespace_pattern is not supported by this server",
                       "guided_whitespace_pattern", code="unsupported_parameter")
    if not found:
        return None
    if len(found) > 1:
        names = [name for name, _ in found]
        raise APIError(400, f"{' and '.join(names)} both constrain the output; send only one of them", names[1])
    name, value = found[0]
    if name == "response_format":
        return _from_response_format(value)
    if name == "structured_outputs":
        return _from_structured_outputs(value)
    return _build(name, GUIDED_FIELDS[name], value, name)


def tool_call_constraint(kind: str, value: dict) -> Constraint:
    """The grammar of a forced tool choice (pagoda/tools/choice.py: a JSON schema or a structural tag
    built from the functions' parameters); one xgrammar cannot take is a 400 naming ``tools``."""
    return _build("tool_choice", kind, value, "tools")
