"""OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models.

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}};
bad input is a 4xx naming the field, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pagoda import __version__
from pagoda.engine.async_engine import AsyncLLM, EngineDeadError, prepend
from pagoda.entrypoints.ollama.routes import add_ollama_routes
from pagoda.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from pagoda.metrics import EngineMetrics
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams, SamplingParamsError


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    # Beyond this many requests waiting for the engine, answer 503 + Retry-After.
    max_queued_requests: int = 1024
    chat_template: str | None = None


def build_app(engine: AsyncLLM, config: ServerConfig, metrics: EngineMetrics | None = None) -> FastAPI:
    app = FastAPI(title="pagoda", version=__version__)
    tokenizer = engine.engine.tokenizer
    max_model_len = engine.engine.max_model_len
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError):
        response = _error_response(error.status, error.message, error.param, error.kind)
        if error.status == 503:
            response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        if first.get("type") == "json_invalid":
            return _error_response(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        message = f"{param}: {first.get('msg', 'invalid request')}" if param else first.get("msg", "invalid request")
        return _error_response(400, message, param)

    @app.middleware("http")
    async def _check_api_key(request: Request, call_next):
        if config.api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization") != f"Bearer {config.api_key}":
                return _error_response(401, "invalid or missing API key", kind="authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        if engine.is_healthy:
            return JSONResponse({"status": "ok"})
        return _error_response(503, "the engine loop is not running", kind="server_error")

    @app.get("/metrics")
    async def prometheus_metrics():
        if metrics is None:
            return _error_response(404, "metrics are not enabled", kind="not_found_error")
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        card = {
            "id": config.served_model_name,
            "object": "model",
            "created": created,
            "owned_by": "pagoda",
            "root": engine.engine.config.model,
            "max_model_len": max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer", "prompt")
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            text = tokenizer.apply_chat_template(messages, chat_template=config.chat_template, tokenize=False,
                                                 add_generation_prompt=body.add_generation_prompt)
            tokens = tokenizer.encode(text, add_special_tokens=False)
        elif body.prompt is not None:
            tokens = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            raise APIError(400, "give either prompt or messages", "prompt")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer", "tokens")
        bad = next((t for t in body.tokens if not 0 <= t < engine.engine.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is invalid: must be in [0, {engine.engine.vocab_size})", "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    def _check_model(name: str) -> None:
        if name != config.served_model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {config.served_model_name!r}",
                           "model", "not_found_error")

    def _sampling_params(body, max_tokens: int | None, prompt_len: int, logprobs: int | None) -> SamplingParams:
        room = max_model_len - prompt_len
        if prompt_len > max_model_len or (max_tokens is not None and max_tokens > room):
            raise APIError(
                400,
                f"this model's maximum context length is {max_model_len} tokens; the request has "
                f"{prompt_len} prompt tokens and asks for {max_tokens} completion tokens",
                "max_tokens" if prompt_len <= max_model_len else "prompt",
            )
        fields = {
            name: getattr(body, name)
            for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                         "frequency_penalty", "repetition_penalty")
            if getattr(body, name) is not None
        }
        try:
            logit_bias = {int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids", "logit_bias") from None
        try:
            return SamplingParams(
                n=body.n, seed=body.seed, stop=body.stop, stop_token_ids=body.stop_token_ids,
                ignore_eos=body.ignore_eos, min_tokens=body.min_tokens, logit_bias=logit_bias,
                max_tokens=max_tokens if max_tokens is not None else max(1, room), logprobs=logprobs, **fields,
            )
        except SamplingParamsError as error:
            raise APIError(400, str(error), error.field_name) from None

    async def _run(prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        if engine.num_waiting >= config.max_queued_requests:
            raise APIError(503, f"server is busy: {engine.num_waiting} requests are waiting "
                                f"(max_queued_requests={config.max_queued_requests}); retry shortly",
                           kind="server_busy")
        try:
            async for output in engine.generate(prompt_ids, params, request_id):
                yield output
        except EngineDeadError as error:
            raise APIError(503, str(error), kind="server_error") from None
        except ValueError as error:
            raise APIError(400, str(error)) from None

    async def _first(generator: AsyncIterator[RequestOutput]):
        """Starts a request so that refusals surface before any byte is sent."""
        first = await generator.__anext__()
        return first, generator

    # -- chat ---------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        _check_model(body.model)
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer: chat needs one", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, chat_template=config.chat_template, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as error:  # a template that rejects the conversation
            raise APIError(400, f"chat template failed: {error}", "messages") from None
        prompt_ids = _truncate(tokenizer.encode(text, add_special_tokens=False), body.truncate_prompt_tokens)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = body.top_logprobs if body.logprobs else None
        if body.logprobs and top is None:
            top = 0
        params = _sampling_params(body, max_tokens, len(prompt_ids), top)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        first, outputs = await _first(_run(prompt_ids, params, request_id))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _chat_stream(first, outputs, request_id, body.model, include_usage, top),
                media_type="text/event-stream",
            )
        final = first
        async for final in outputs:
            pass
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": {"content": _chat_logprobs(c.token_ids, c.logprobs, top)} if body.logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for c in final.outputs
        ]
        return {
            "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": body.model,
            "choices": choices, "usage": _usage(final),
        }

    def _chat_logprobs(token_ids: list[int], logprobs: list[dict[int, float]] | None, k: int,
                       start: int = 0) -> list[dict]:
        """OpenAI's chat logprobs: each token's logprob and its top-k alternatives."""
        entries = []
        for token_id, entry in zip(token_ids[start:], (logprobs or [])[start:]):
            top = sorted(entry.items(), key=lambda kv: -kv[1])
            entries.append({
                "token": tokenizer.decode([token_id]),
                "logprob": entry[token_id],
                "bytes": list(tokenizer.decode([token_id]).encode()),
                "top_logprobs": [
                    {"token": tokenizer.decode([t]), "logprob": lp, "bytes": list(tokenizer.decode([t]).encode())}
                    for t, lp in top[:k]
                ],
            })
        return entries

    async def _chat_stream(first, outputs, request_id, model, include_usage, top_logprobs: int | None):
        created_at = int(time.time())

        def chunk(choices, usage=None):
            data = {"id": request_id, "object": "chat.completion.chunk", "created": created_at,
                    "model": model, "choices": choices}
            if include_usage:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        n = len(first.outputs)
        for index in range(n):
            yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        sent_text = [0] * n
        sent_tokens = [0] * n
        held: list[dict | None] = [None] * n  # last content chunk, sent when the next one (or the end) comes
        done = [False] * n
        final = first

        async for output in prepend(first, outputs):
            final = output
            for c in output.outputs:
                i = c.index
                if done[i]:
                    continue
                delta = c.text[sent_text[i]:]
                new_tokens = len(c.token_ids) - sent_tokens[i]
                entry = None
                if delta or c.finished:
                    entry = {"index": i, "delta": {"content": delta} if delta else {},
                             "logprobs": ({"content": _chat_logprobs(c.token_ids, c.logprobs, top_logprobs,
                                                                     sent_tokens[i])}
                                          if top_logprobs is not None and new_tokens else None),
                             "finish_reason": None}
                    sent_text[i] = len(c.text)
                    sent_tokens[i] = len(c.token_ids)
                if c.finished:
                    done[i] = True
                    last = held[i]
                    if last is not None and entry is not None and not entry["delta"]:
                        entry = {**last, "finish_reason": c.finish_reason}  # ride on the last content chunk
                    else:
                        if last is not None:
                            yield chunk([last])
                        entry["finish_reason"] = c.finish_reason
                    held[i] = None
                    yield chunk([entry])
                elif entry is not None:
                    if held[i] is not None:
                        yield chunk([held[i]])
                    held[i] = entry
        if include_usage:
            yield chunk([], _usage(final))
        yield "data: [DONE]\n\n"

    # -- completions --------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        _check_model(body.model)
        prompts = _prompt_list(body.prompt)
        if not prompts:
            raise APIError(400, "prompt must not be empty", "prompt")
        if body.stream and len(prompts) != 1:
            raise APIError(400, "prompt: streaming takes one prompt per request", "prompt")
        encoded = []
        for prompt in prompts:
            if isinstance(prompt, str):
                if tokenizer is None:
                    raise APIError(400, "this model has no tokenizer: send token ids", "prompt")
                encoded.append(tokenizer.encode(prompt))
            else:
                encoded.append(list(prompt))
        logprobs = body.logprobs
        encoded = [_truncate(ids, body.truncate_prompt_tokens) for ids in encoded]
        params = [_sampling_params(body, body.max_tokens, len(ids), logprobs) for ids in encoded]
        if body.echo and logprobs is not None:
            params = [replace(p, prompt_logprobs=logprobs) for p in params]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            first, outputs = await _first(_run(encoded[0], params[0], request_id))
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            echo = _prompt_text(encoded[0]) if body.echo else None
            return StreamingResponse(
                _completion_stream(first, outputs, request_id, body.model, include_usage, echo),
                media_type="text/event-stream",
            )

        async def final_output(index: int) -> RequestOutput:
            final = None
            async for final in _run(encoded[index], params[index], f"{request_id}-{index}"):
                pass
            return final

        try:
            async with asyncio.TaskGroup() as group:  # one refusal cancels (and aborts) the rest
                tasks = [group.create_task(final_output(i)) for i in range(len(encoded))]
        except ExceptionGroup as errors:
            raise errors.exceptions[0] from None
        finals = [task.result() for task in tasks]
        choices = []
        for prompt_index, final in enumerate(finals):
            for c in final.outputs:
                text = (_prompt_text(final.prompt_token_ids) + c.text) if body.echo else c.text
                choices.append({
                    "index": prompt_index * body.n + c.index,
                    "text": text,
                    "logprobs": _completion_logprobs(c, final if body.echo else None) if logprobs is not None else None,
                    "finish_reason": c.finish_reason,
                })
        usage = {key: sum(_usage(f)[key] for f in finals) for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
        return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": body.model,
                "choices": choices, "usage": usage}

    def _prompt_text(ids: list[int]) -> str:
        return tokenizer.decode(ids) if tokenizer is not None else ""

    def _completion_logprobs(c, echoed: RequestOutput | None = None) -> dict:
        """OpenAI's completion logprobs; with echo, the prompt's tokens come first (the very first has None)."""
        def name(token_id: int) -> str:
            return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)

        token_ids = list(c.token_ids)
        entries: list[dict[int, float] | None] = list(c.logprobs or [])
        if echoed is not None:
            token_ids = list(echoed.prompt_token_ids) + token_ids
            entries = list(echoed.prompt_logprobs or [None] * len(echoed.prompt_token_ids)) + entries
        tokens = [name(t) for t in token_ids]
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [entry[t] if entry else None for t, entry in zip(token_ids, entries)],
            "top_logprobs": [{name(t): lp for t, lp in entry.items()} if entry else None for entry in entries],
            "text_offset": offsets,
        }

    async def _completion_stream(first, outputs, request_id, model, include_usage, echo: str | None):
        created_at = int(time.time())
        if echo:
            data = {"id": request_id, "object": "text_completion", "created": created_at, "model": model,
                    "choices": [{"index": i, "text": echo, "logprobs": None, "finish_reason": None}
                                for i in range(len(first.outputs))]}
            yield f"data: {json.dumps(data)}\n\n"
        n = len(first.outputs)
        sent = [0] * n
        done = [False] * n
        final = first

        async for output in prepend(first, outputs):
            final = output
            for c in output.outputs:
                if done[c.index]:
                    continue
                delta = c.text[sent[c.index]:]
                if not delta and not c.finished:
                    continue
                sent[c.index] = len(c.text)
                done[c.index] = c.finished
                data = {"id": request_id, "object": "text_completion", "created": created_at, "model": model,
                        "choices": [{"index": c.index, "text": delta, "logprobs": None,
                                     "finish_reason": c.finish_reason}]}
                yield f"data: {json.dumps(data)}\n\n"
        if include_usage:
            data = {"id": request_id, "object": "text_completion", "created": created_at, "model": model,
                    "choices": [], "usage": _usage(final)}
            yield f"data: {json.dumps(data)}\n\n"
        yield "data: [DONE]\n\n"

    add_ollama_routes(app, engine, config.served_model_name, config.chat_template)
    return app


def _truncate(prompt_ids: list[int], keep_last: int | None) -> list[int]:
    return prompt_ids[-keep_last:] if keep_last is not None else prompt_ids


def _prompt_list(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return list(prompt)


def _usage(output: RequestOutput) -> dict:
    completion = sum(len(c.token_ids) for c in output.outputs)
    prompt = len(output.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
