"""The HTTP app: OpenAI routes (/v1/...), utility routes (/health, /metrics,
/version, /tokenize, /detokenize) and the Ollama routes (/, /api/...).

The endpoint logic lives in serving_chat.py and serving_completion.py; this
module wires routes, the guards in front of them (API key, body limits:
http_guard.py) and the error handlers. Every error, whichever layer raises
it, leaves in the shape of the API the path belongs to (errors.py): bad input
is a 4xx naming the field, never a 500 and never plain text.
"""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagoda import __version__
from pagoda.engine.async_engine import AsyncLLM
from pagoda.entrypoints.http_guard import ApiKeyMiddleware, BodyGuardMiddleware, ClientDisconnected
from pagoda.entrypoints.ollama.routes import add_ollama_routes
from pagoda.entrypoints.openai.errors import APIError, api_error_response, error_response
from pagoda.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
    message_dicts,
    refuse_unsupported_messages,
)
from pagoda.entrypoints.openai.responses_protocol import ResponsesRequest
from pagoda.entrypoints.openai.serving_chat import OpenAIServingChat
from pagoda.entrypoints.openai.serving_common import ServerConfig, edge_grammars, off_loop
from pagoda.entrypoints.openai.serving_responses import OpenAIServingResponses, ResponseStore
from pagoda.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagoda.metrics import EngineMetrics

__all__ = ["ServerConfig", "build_app"]

logger = logging.getLogger(__name__)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "json-or-python"}


def _field_path(loc: tuple) -> str | None:
    """pydantic's error location as the request field: `messages[0].content[1].text` (union branch
    tags such as `str` or `list[ContentPart]` dropped)."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in str(part):
            continue
        else:
            path += f".{part}" if path else str(part)
    return path or None


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    errors = error.errors()
    if not errors:
        return "invalid request", None
    if errors[0].get("type") == "json_invalid":
        return f"the request body is not valid JSON: {errors[0].get('ctx', {}).get('error', '')}", None
    # Of a union's alternatives, the deepest error is the one that says what is wrong.
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    param = _field_path(first.get("loc", ()))
    message = first.get("msg", "invalid request")
    if first.get("type") == "missing" and param is None:
        return "the request needs a JSON body", None
    return (f"{param}: {message}" if param else message), param


def build_app(engine: AsyncLLM, config: ServerConfig, metrics: EngineMetrics | None = None) -> FastAPI:
    app = FastAPI(title="pagoda", version=__version__)
    info = engine.model_info
    grammars = edge_grammars(engine)  # structured outputs: one compile cache for every route
    chat = OpenAIServingChat(engine, config, grammars)
    completion = OpenAIServingCompletion(engine, config, grammars)
    responses = OpenAIServingResponses(chat, ResponseStore(config.max_stored_responses))
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return api_error_response(error, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        message, param = _validation_message(error)
        return error_response(400, message, param, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(error.status_code,
                                                                                         str(error.detail))
        return error_response(error.status_code, message, kind="not_found_error" if error.status_code == 404
                              else "invalid_request_error", path=request.url.path, headers=error.headers)

    @app.exception_handler(ClientDisconnected)
    async def _disconnected(request: Request, _: ClientDisconnected):
        return Response(status_code=499)  # nobody reads it: the client has gone

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(500, f"internal error: {error!r}", kind="server_error", path=request.url.path)

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

    def model_card() -> dict:
        return {"id": config.served_model_name, "object": "model", "created": created, "owned_by": "pagoda",
                "root": info.model, "max_model_len": info.max_model_len}

    def adapter_card(lora) -> dict:  # vLLM's shape: the adapter's parent is the served model
        return {"id": lora.lora_name, "object": "model", "created": created, "owned_by": "pagoda",
                "root": lora.lora_path, "parent": config.served_model_name, "max_model_len": info.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()] + [adapter_card(a) for a in config.loras.adapters.values()]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str):
        if model_id in config.loras.adapters:
            return adapter_card(config.loras.adapters[model_id])
        if model_id != config.served_model_name:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves "
                                f"{config.served_model_name!r}", "model", "not_found_error", "model_not_found")
        return model_card()

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest):
        await off_loop(config.loras.load, body.lora_name, body.lora_path, info.hf_config, config.served_model_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
        engine.remove_lora(config.loras.unload(body.lora_name).lora_int_id)  # frees its slot and host copy
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await chat.create(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await completion.create(body, request)

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request):
        return await responses.create(body, request)

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str):
        return responses.retrieve(response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        return responses.delete(response_id)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if info.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", "prompt")
        if body.messages is not None:
            refuse_unsupported_messages(body.messages)
            messages = message_dicts(body.messages)
            tokens = await off_loop(chat.encode_messages, messages, body.add_generation_prompt)
        elif body.prompt is not None:
            tokens = await off_loop(info.tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens)
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
        return {"prompt": await off_loop(info.tokenizer.decode, body.tokens)}

    add_ollama_routes(app, engine, config, grammars)
    # Outermost first: the key is checked before a body is read.
    app.add_middleware(BodyGuardMiddleware, max_bytes=config.max_request_bytes, timeout=config.request_timeout)
    app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    return app
