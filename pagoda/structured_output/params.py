"""`StructuredOutputsParams`: what a request's output must match (vLLM's names).

Exactly one of `json` (a JSON schema, as a dict or its JSON text), `regex`, `choice`
(a list of strings), `grammar` (EBNF, xgrammar's GBNF dialect), `json_object=True` (any
JSON object) or `structural_tag` (xgrammar's structural tag, as JSON text or a dict) is
set. The shape is checked here, at construction, with errors that name the field; whether
the schema, regex or grammar itself is valid is checked by `structured_output.grammar`
(it needs xgrammar), once, at the edge that takes the request.

This module imports nothing heavy: `SamplingParams` holds one of these.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")

# Bounds on what one request may ask the grammar compiler to build (the body limit bounds
# the bytes; these bound the work per request).
MAX_SPEC_CHARS = 1_000_000
MAX_CHOICES = 1024


class StructuredOutputsError(ValueError):
    """Invalid structured-output parameters; names the field, the value and the problem."""

    def __init__(self, field_name: str, value: object, problem: str):
        self.field_name = field_name
        self.value = value
        self.problem = problem
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        super().__init__(f"{field_name}={shown} is invalid: {problem}.")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """The constraint on a request's output. `any_whitespace`: let JSON output put any
    whitespace between tokens (vLLM's default); pagoda's default is compact JSON, so a
    small model cannot loop on spaces and newlines until it runs out of tokens."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict | str | None = None
    any_whitespace: bool = False
    # Set once the grammar was parsed (structured_output.grammar.check): not checked again.
    _checked: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [kind for kind in KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise StructuredOutputsError(
                "structured_outputs", {k: getattr(self, k) for k in given},
                f"set exactly one of {', '.join(KINDS)} (got {len(given)}: {', '.join(given) or 'none'})")
        if not isinstance(self.any_whitespace, bool):
            raise StructuredOutputsError("structured_outputs.any_whitespace", self.any_whitespace,
                                         "must be true or false")
        kind = given[0]
        value = getattr(self, kind)
        name = f"structured_outputs.{kind}"
        if kind in ("json", "structural_tag"):
            if isinstance(value, str):
                try:
                    parsed = json.loads(value)
                except ValueError as error:
                    raise StructuredOutputsError(name, value, f"not valid JSON ({error})") from None
            elif isinstance(value, dict):
                parsed = value
            else:
                raise StructuredOutputsError(name, value, "must be a JSON object (a dict or its JSON text)")
            if kind == "json" and not isinstance(parsed, (dict, bool)):
                raise StructuredOutputsError(name, value, "a JSON schema must be an object")
            if kind == "structural_tag" and not isinstance(parsed, dict):
                raise StructuredOutputsError(name, value, "a structural tag must be a JSON object")
        elif kind in ("regex", "grammar"):
            if not isinstance(value, str) or not value:
                raise StructuredOutputsError(name, value, "must be a non-empty string")
        elif kind == "choice":
            if (not isinstance(value, (list, tuple)) or not value
                    or not all(isinstance(c, str) and c for c in value)):
                raise StructuredOutputsError(name, value, "must be a non-empty list of non-empty strings")
            if len(value) > MAX_CHOICES:
                raise StructuredOutputsError(name, f"<{len(value)} choices>", f"at most {MAX_CHOICES} choices")
            object.__setattr__(self, "choice", list(value))
        elif value is not True:
            raise StructuredOutputsError(name, value, "must be true (or left out)")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise StructuredOutputsError(name, f"<{len(self.spec)} characters>",
                                         f"at most {MAX_SPEC_CHARS} characters")

    @property
    def kind(self) -> str:
        return next(kind for kind in KINDS if getattr(self, kind) not in (None, False))

    @property
    def spec(self) -> str:
        """The constraint as text (JSON text for schemas, tags and choices)."""
        value: Any = getattr(self, self.kind)
        if self.kind in ("json", "structural_tag"):
            return value if isinstance(value, str) else json.dumps(value)
        if self.kind == "choice":
            return json.dumps(value)
        if self.kind == "json_object":
            return ""
        return value

    @property
    def key(self) -> tuple[str, str, bool]:
        """What identifies the compiled grammar: (kind, spec, any_whitespace)."""
        return (self.kind, self.spec, self.any_whitespace)
