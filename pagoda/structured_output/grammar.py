"""From `StructuredOutputsParams` to an xgrammar `Grammar` (no tokenizer needed).

`build_grammar` turns a constraint into a grammar: the edges call `check` (it builds the
grammar once and throws it away, so a bad schema, regex or grammar is a
`StructuredOutputsError` naming the field before the request is queued). `compile_grammar`
is the engine's compile, for the tokenizer, from the same inputs: it hands xgrammar the
texts (schema, regex, EBNF), not a `Grammar` object, because compiling a `Grammar` object
goes through its printed form, which misreads some escapes (a choice "\x1f0" printed as
"\x1f0" reads back as "\u01f0").
"""

from __future__ import annotations

import json

import xgrammar as xgr

from pagoda.structured_output.params import StructuredOutputsError, StructuredOutputsParams


def choice_ebnf(choices: list[str]) -> str:
    """`root ::= "a" | "b"`, each choice a quoted EBNF string literal (JSON's escapes, which
    xgrammar's EBNF reads)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def regex_for_xgrammar(regex: str) -> str:
    """``regex`` with each unescaped ``.`` outside a character class written ``[^\\n]``.

    xgrammar reads ``.`` as any character, newline included; Python's ``re``, JavaScript
    and the JSON-schema ``pattern`` dialect (what OpenAI and vLLM clients write against) do
    not match a newline with it. Without this, ``0..0`` let the model answer ``"0)\\n0"``
    (found by the fuzzed-regex server test). Everything else passes through unchanged, and
    xgrammar still rejects what it cannot parse."""
    out, i, in_class = [], 0, False
    while i < len(regex):
        c = regex[i]
        if c == "\\":  # an escape: keep it and the escaped character as they are
            out.append(regex[i:i + 2])
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
        elif c == "[":
            in_class = True
            out.append(c)
            i += 1
            if regex[i:i + 1] == "^":  # "[^]...]" / "[]...]": a leading "]" is a literal
                out.append("^")
                i += 1
            if regex[i:i + 1] == "]":
                out.append("]")
                i += 1
            continue
        elif c == ".":
            out.append("[^\\n]")
            i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def build_grammar(params: StructuredOutputsParams) -> xgr.Grammar:
    """The grammar of the constraint; raises xgrammar's errors (RuntimeError, ValueError...)."""
    kind, spec = params.kind, params.spec
    if kind == "json":
        return xgr.Grammar.from_json_schema(spec, any_whitespace=params.any_whitespace)
    if kind == "json_object":
        # Any JSON object: the schema {"type": "object"} without strict mode (which would
        # forbid every property), so the whitespace rule applies as for schemas.
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=params.any_whitespace,
                                            strict_mode=False)
    if kind == "regex":
        return xgr.Grammar.from_regex(regex_for_xgrammar(spec))
    if kind == "choice":
        return xgr.Grammar.from_ebnf(choice_ebnf(params.choice))
    if kind == "grammar":
        return xgr.Grammar.from_ebnf(spec)
    if kind == "structural_tag":
        return xgr.Grammar.from_structural_tag(spec)
    raise ValueError(f"unknown structured output kind {kind!r}")


def compile_grammar(compiler: xgr.GrammarCompiler, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
    """The constraint compiled for `compiler`'s tokenizer (the same grammar as `build_grammar`'s)."""
    kind, spec = params.kind, params.spec
    if kind == "json":
        return compiler.compile_json_schema(spec, any_whitespace=params.any_whitespace)
    if kind == "json_object":
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=params.any_whitespace,
                                            strict_mode=False)
    if kind == "regex":
        return compiler.compile_regex(regex_for_xgrammar(spec))
    if kind == "choice":
        return compiler.compile_grammar(choice_ebnf(params.choice))
    if kind == "grammar":
        return compiler.compile_grammar(spec)
    if kind == "structural_tag":
        return compiler.compile_structural_tag(spec)
    raise ValueError(f"unknown structured output kind {kind!r}")


def describe_grammar_error(error: BaseException) -> str:
    """xgrammar's message without its C++ source location prefix ("[time] file.cc:123: ")."""
    text = str(error).strip()
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
        head, sep, rest = text.partition(": ")
        if sep and (".cc:" in head or ".h:" in head):
            text = rest
    return " ".join(text.split()).rstrip(".") or type(error).__name__


def check(params: StructuredOutputsParams) -> None:
    """Raises `StructuredOutputsError` naming `structured_outputs.<kind>` if the schema,
    regex or grammar cannot be built. Checks each params object once (the result is
    remembered on it, and travels with it to the engine process)."""
    if params._checked:
        return
    try:
        build_grammar(params)
    except Exception as error:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError/TypeError
        raise StructuredOutputsError(f"structured_outputs.{params.kind}", getattr(params, params.kind),
                                     describe_grammar_error(error)) from None
    object.__setattr__(params, "_checked", True)
