"""The HTTP app: OpenAI routes (/v1/...), utility routes (/health, /metrics,
/version, /tokenize, /detokenize) and the Ollama routes (/api/...).

The endpoint logic lives in serving_chat.py and serving_completion.py; this
module wires routes, the API key check and the error handlers. Errors use
OpenAI's shape; bad input is a 4xx naming the field, never a 500.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pagoda import __version__
from pagoda.engine.async_engine import AsyncLLM
from pagoda.entrypoints.ollama.routes import add_ollama_routes
from pagoda.entrypoints.openai.errors import APIError, error_response
from pagoda.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from pagoda.entrypoints.openai.serving_chat import OpenAIServingChat
from pagoda.entrypoints.openai.serving_common import ServerConfig
from pagoda.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagoda.metrics import EngineMetrics

__all__ = ["ServerConfig", "build_app"]


def build_app(engine: AsyncLLM, config: ServerConfig, metrics: EngineMetrics | None = None) -> FastAPI:
    app = FastAPI(title="pagoda", version=__version__)
    info = engine.model_info
    chat = OpenAIServingChat(engine, config)
    completion = OpenAIServingCompletion(engine, config)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError):
        return error_response(error.status, error.message, error.param, error.kind)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
        message = first.get("msg", "invalid request")
        return error_response(400, f"{param}: {message}" if param else message, param)

    @app.middleware("http")
    async def _check_api_key(request: Request, call_next):
        if config.api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization") != f"Bearer {config.api_key}":
                return error_response(401, "invalid or missing API key", kind="authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        if engine.is_healthy:
            return JSONResponse({"status": "ok"})
        return error_response(503, "the engine loop is not running", kind="server_error")

    @app.get("/metrics")
    async def prometheus_metrics():
        if metrics is None:
            return error_response(404, "metrics are not enabled", kind="not_found_error")
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        card = {"id": config.served_model_name, "object": "model", "created": created, "owned_by": "pagoda",
                "root": info.model, "max_model_len": info.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        return await chat.create(body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await completion.create(body)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if info.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", "prompt")
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            tokens = chat.encode_messages(messages, body.add_generation_prompt)
        elif body.prompt is not None:
            tokens = info.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            raise APIError(400, "give either prompt or messages", "prompt")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": info.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if info.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", "tokens")
        bad = next((t for t in body.tokens if not 0 <= t < info.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is invalid: must be in [0, {info.vocab_size})", "tokens")
        return {"prompt": info.tokenizer.decode(body.tokens)}

    add_ollama_routes(app, engine, config.served_model_name, config.chat_template)
    return app
