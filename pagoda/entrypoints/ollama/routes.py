"""Ollama-compatible routes on the same server: / (liveness), /api/generate,
/api/chat, /api/tags, /api/show, /api/ps, /api/version, /api/pull; the model
management and embedding routes answer in Ollama's error shape.

Streaming is NDJSON (one JSON object per line) and on by default, as in
Ollama; a stream that breaks ends with an `{"error": ...}` line and a `done`
line. Errors are Ollama's {"error": "..."} (errors.py picks the shape by path,
so APIError raised here, by validation or by the guards comes out right).
Requests share the OpenAI side's queue limit, disconnect handling and
off-loop tokenization (serving_common.py).
"""

from __future__ import annotations


import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from pagoda import __version__
from pagoda.engine.async_engine import AsyncLLM, prepend
from pagoda.entrypoints.http_guard import wait_or_disconnect
from pagoda.entrypoints.ollama.protocol import (
    SAMPLING_OPTIONS,
    ChatRequest,
    GenerateRequest,
    OllamaOptions,
    PullRequest,
    ShowRequest,
    constraint,
    ollama_messages,
    refuse_unsupported,
)
from pagoda.entrypoints.openai.errors import APIError
from pagoda.entrypoints.openai.serving_common import (
    ServerConfig,
    edge_grammars,
    ending_well,
    off_loop,
    run_request,
)
from pagoda.structured_output.params import StructuredOutputsError
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import RequestOutputKind, SamplingParams, SamplingParamsError
from pagoda.tools.choice import ToolPlan, ToolRequestError, plan_tools
from pagoda.tools.parsers import ToolCallStream
from pagoda.tools.render import render_chat


def add_ollama_routes(app: FastAPI, engine: AsyncLLM, config: ServerConfig, grammars=None) -> None:
    """`grammars`: the StructuredOutputManager that checks `format` constraints (made here if None)."""
    info = engine.model_info
    grammars = grammars if grammars is not None else edge_grammars(engine)
    tokenizer, max_model_len, hf_config = info.tokenizer, info.max_model_len, info.hf_config
    served_model_name, chat_template = config.served_model_name, config.chat_template

    def check_model(name: str) -> None:
        if name not in (served_model_name, f"{served_model_name}:latest") and config.loras.lookup(name) is None:
            raise APIError(404, f"model '{name}' not found, try pulling it first", "model")

    def sampling_params(options: OllamaOptions | None, prompt_len: int, structured=None) -> SamplingParams:
        fields = {"structured_outputs": structured} if structured is not None else {}
        for key, field in SAMPLING_OPTIONS.items():
            value = getattr(options, key) if options is not None else None
            if value is not None:
                fields[field] = value
        if fields.get("seed") == -1:  # llama.cpp's "random seed"
            del fields["seed"]
        room = max_model_len - prompt_len
        if room < 1:
            raise APIError(400, f"prompt has {prompt_len} tokens; the context is {max_model_len}", "prompt")
        max_tokens = fields.get("max_tokens")
        if max_tokens in (None, -1, -2):
            max_tokens = room
        elif max_tokens < 1:
            raise APIError(400, f"options.num_predict={max_tokens} is invalid: must be -1, -2 or >= 1",
                           "options.num_predict")
        fields["max_tokens"] = min(max_tokens, room)
        try:
            params = SamplingParams(**fields)
            params.validate_against_vocab(info.vocab_size)
        except SamplingParamsError as error:
            option = next((k for k, v in SAMPLING_OPTIONS.items() if v == error.field_name), error.field_name)
            raise APIError(400, f"options.{option}: {error}", f"options.{option}") from None
        return params

    def encode_chat(messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        try:
            text = render_chat(tokenizer, messages, tools, chat_template, add_generation_prompt=True)
        except Exception as error:  # a template that rejects the conversation
            raise APIError(400, f"chat template failed: {error}", "messages") from None
        return tokenizer.encode(text, add_special_tokens=False)

    def now() -> str:
        return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")

    async def start(request: Request, prompt_ids: list[int], params: SamplingParams, model: str | None = None
                    ) -> tuple[RequestOutput, AsyncIterator[RequestOutput]]:
        lora = config.loras.lookup(model)  # `model` may name a LoRA adapter of the served model
        outputs = run_request(engine, config, prompt_ids, params, f"ollama-{uuid.uuid4().hex}",
                              {"lora_request": lora} if lora is not None else None)
        first = await wait_or_disconnect(request, outputs.__anext__())
        return first, outputs

    def final_fields(output: RequestOutput, started: float) -> dict:
        completion = output.outputs[0]
        m = output.metrics
        total = time.monotonic() - started
        prompt_eval = (m.first_token_time - m.arrival_time) if m and m.first_token_time else 0.0
        return {
            "done": True,
            "done_reason": completion.finish_reason,
            "total_duration": int(total * 1e9),
            "load_duration": 0,
            "prompt_eval_count": len(output.prompt_token_ids),
            "prompt_eval_duration": int(prompt_eval * 1e9),
            "eval_count": len(completion.token_ids),
            "eval_duration": int(max(0.0, total - prompt_eval) * 1e9),
        }

    async def respond(request: Request, body, prompt_ids: list[int], piece, with_context: bool,
                      plan: ToolPlan | None = None):
        """piece(text, calls) -> the part of a line that carries text ("response" or "message") and,
        for /api/chat with tools, the tool calls read out of it (`plan`'s parser)."""
        started = time.monotonic()
        structured = constraint(body)
        if structured is not None:  # compiled for the served tokenizer: a bad format is a 400 here
            try:
                await off_loop(grammars.check_compiles, structured)
            except StructuredOutputsError as error:
                raise APIError(400, f"format={body.format!r:.120} is invalid: {error.problem}", "format") from None
        params = sampling_params(body.options, len(prompt_ids), structured)
        # Streams get what is new each step; whole answers come once, at the end.
        params = replace(params, output_kind=RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY)
        first, outputs = await start(request, prompt_ids, params, body.model)

        def final_line(output: RequestOutput, output_ids: list[int] | None = None) -> dict:
            """`output_ids`: every generated token, for streams (their outputs are DELTAs)."""
            output_ids = output.outputs[0].token_ids if output_ids is None else output_ids
            extra = {"context": list(output.prompt_token_ids) + list(output_ids)} if with_context else {}
            fields = final_fields(output, started)
            fields["eval_count"] = len(output_ids)
            return {**fields, **extra}

        if not body.stream:
            async def last(final: RequestOutput) -> RequestOutput:
                async for final in outputs:
                    pass
                return final

            final = await wait_or_disconnect(request, last(first))
            text, calls = final.outputs[0].text, []
            if plan is not None and plan.parser is not None:
                content, calls = plan.parser.extract(text)
                text = content or ""
            return {"model": body.model, "created_at": now(), **piece(text, calls), **final_line(final)}

        async def lines():
            output_ids: list[int] = []
            # Tools: text that may be a call is held back; the calls go out in one line once the
            # answer is complete (as Ollama sends a call when it has parsed it whole).
            stream = ToolCallStream(plan.parser) if plan is not None and plan.parser is not None else None
            async for output in prepend(first, outputs):
                text = output.outputs[0].text  # new since the last output (DELTA)
                output_ids.extend(output.outputs[0].token_ids)
                if stream is not None:
                    text, _ = stream.feed(text, final=output.finished)
                if text:
                    yield json.dumps({"model": body.model, "created_at": now(), **piece(text, []),
                                      "done": False}) + "\n"
                if output.finished:
                    if stream is not None and stream.called:
                        _, calls = plan.parser.extract(stream.text)
                        yield json.dumps({"model": body.model, "created_at": now(), **piece("", calls),
                                          "done": False}) + "\n"
                    yield json.dumps({"model": body.model, "created_at": now(), **piece("", []),
                                      **final_line(output, output_ids)}) + "\n"

        def error_lines(error: APIError) -> str:
            return (json.dumps({"error": error.message}) + "\n"
                    + json.dumps({"model": body.model, "created_at": now(), **piece("", []), "done": True,
                                  "done_reason": "error"}) + "\n")

        return StreamingResponse(ending_well(lines(), error_lines, None), media_type="application/x-ndjson")

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root():
        return PlainTextResponse("Ollama is running")

    @app.post("/api/generate")
    async def generate(body: GenerateRequest, request: Request):
        check_model(body.model)
        refuse_unsupported(body)
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        if body.raw:
            prompt_ids = await off_loop(tokenizer.encode, body.prompt)
        else:
            messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
                {"role": "user", "content": body.prompt}
            ]
            prompt_ids = await off_loop(encode_chat, messages)
        if body.context:
            bad = next((t for t in body.context if not 0 <= t < info.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"context: token id {bad} is invalid: must be in [0, {info.vocab_size})",
                               "context")
            prompt_ids = list(body.context) + prompt_ids
        return await respond(request, body, prompt_ids, lambda text, calls: {"response": text}, with_context=True)

    @app.post("/api/chat")
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model)
        refuse_unsupported(body)
        if not body.messages:
            raise APIError(400, "messages must not be empty", "messages")
        plan = None
        if body.tools:  # Ollama has no tool_choice: the model decides ("auto")
            try:
                plan = plan_tools(body.tools, "auto", None, config.tool_call_parser)
            except ToolRequestError as error:
                raise APIError(400, str(error), error.field) from None
        messages = ollama_messages(body.messages)
        prompt_ids = await off_loop(encode_chat, messages, plan.tools if plan is not None else None)

        def message(text: str, calls: list) -> dict:
            out = {"role": "assistant", "content": text}
            if calls:
                out["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments_dict()}} for c in calls]
            return {"message": out}

        return await respond(request, body, prompt_ids, message, with_context=False, plan=plan)

    def details() -> dict:
        return {"format": info.source_kind, "family": getattr(hf_config, "model_type", ""),
                "parameter_size": f"{info.num_parameters / 1e6:.0f}M", "quantization_level": info.dtype}

    def model_entry() -> dict:
        path = Path(info.source_path)
        return {"name": f"{served_model_name}:latest", "model": f"{served_model_name}:latest",
                "size": path.stat().st_size if path.is_file() else 0, "digest": "", "details": details()}

    @app.get("/api/tags")
    async def tags():
        modified = datetime.fromtimestamp(Path(info.source_path).stat().st_mtime, timezone.utc).isoformat()
        return {"models": [{**model_entry(), "modified_at": modified}]}

    @app.get("/api/ps")
    async def running():
        # The model stays loaded while the server runs.
        expires = (datetime.now(timezone.utc) + timedelta(days=365)).isoformat()
        return {"models": [{**model_entry(), "expires_at": expires, "size_vram": 0}]}

    @app.post("/api/show")
    async def show(body: ShowRequest):
        check_model(body.model or body.name or "")
        return {"modelfile": "", "parameters": "", "template": getattr(tokenizer, "chat_template", "") or "",
                "details": details(),
                "model_info": {"general.architecture": getattr(hf_config, "model_type", ""),
                               "context_length": max_model_len}}

    @app.post("/api/pull")
    async def pull(body: PullRequest):
        check_model(body.model or body.name or "")
        return {"status": "success"}  # the served model is already here

    @app.post("/api/embed")
    @app.post("/api/embeddings")
    async def embeddings():
        raise APIError(501, "embeddings are not supported by this server: it serves a generative model")

    @app.post("/api/create")
    @app.post("/api/copy")
    @app.post("/api/push")
    @app.delete("/api/delete")
    async def manage_models():
        raise APIError(501, f"model management is not supported by this server: it serves {served_model_name!r}, "
                            "chosen when it starts")

    @app.get("/api/version")
    async def version():
        return {"version": __version__}
