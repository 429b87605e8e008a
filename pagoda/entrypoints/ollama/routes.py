"""Ollama-compatible routes on the same server: /api/generate, /api/chat, /api/tags, /api/show, /api/version.

Streaming is NDJSON (one JSON object per line) and on by default, as in
Ollama. Errors are Ollama's {"error": "..."}.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from pagoda import __version__
from pagoda.engine.async_engine import AsyncLLM, EngineDeadError, prepend
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams, SamplingParamsError

# Ollama option name -> SamplingParams field.
_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "num_predict": "max_tokens",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str = ""


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    options: dict | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[OllamaMessage] = []
    stream: bool = True
    options: dict | None = None


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    name: str | None = None  # older clients


class _OllamaError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def add_ollama_routes(app: FastAPI, engine: AsyncLLM, served_model_name: str, chat_template: str | None) -> None:
    info = engine.model_info
    tokenizer, max_model_len, hf_config = info.tokenizer, info.max_model_len, info.hf_config

    @app.exception_handler(_OllamaError)
    async def _error(_, error: _OllamaError):
        return JSONResponse({"error": str(error)}, status_code=error.status)

    def check_model(name: str) -> None:
        if name not in (served_model_name, f"{served_model_name}:latest"):
            raise _OllamaError(404, f"model '{name}' not found, try pulling it first")

    def sampling_params(options: dict | None, prompt_len: int) -> SamplingParams:
        fields = {}
        for key, value in (options or {}).items():
            if key in _OPTIONS and value is not None:
                fields[_OPTIONS[key]] = value
        room = max_model_len - prompt_len
        if room < 1:
            raise _OllamaError(400, f"prompt has {prompt_len} tokens; the context is {max_model_len}")
        if fields.get("max_tokens") in (None, -1, -2):
            fields["max_tokens"] = room
        fields["max_tokens"] = min(fields["max_tokens"], room)
        try:
            return SamplingParams(**fields)
        except SamplingParamsError as error:
            raise _OllamaError(400, str(error)) from None

    def encode_chat(messages: list[dict]) -> list[int]:
        if tokenizer is None:
            raise _OllamaError(400, "this model has no tokenizer")
        text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)

    def now() -> str:
        return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")

    async def run(prompt_ids: list[int], params: SamplingParams) -> tuple[RequestOutput, AsyncIterator]:
        generator = engine.generate(prompt_ids, params, f"ollama-{uuid.uuid4().hex}")
        try:
            first = await generator.__anext__()
        except EngineDeadError as error:
            raise _OllamaError(503, str(error)) from None
        except ValueError as error:
            raise _OllamaError(400, str(error)) from None
        return first, generator

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

    async def respond(body, prompt_ids: list[int], piece) -> StreamingResponse | dict:
        """piece(text) -> the part of a line that carries text ("response" or "message")."""
        started = time.monotonic()
        first, outputs = await run(prompt_ids, sampling_params(body.options, len(prompt_ids)))
        if not body.stream:
            final = first
            async for final in outputs:
                pass
            return {"model": body.model, "created_at": now(), **piece(final.outputs[0].text),
                    **final_fields(final, started)}

        async def lines():
            sent = 0
            async for output in prepend(first, outputs):
                text = output.outputs[0].text
                if len(text) > sent:
                    yield json.dumps({"model": body.model, "created_at": now(), **piece(text[sent:]),
                                      "done": False}) + "\n"
                    sent = len(text)
                if output.finished:
                    yield json.dumps({"model": body.model, "created_at": now(), **piece(""),
                                      **final_fields(output, started)}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/api/generate")
    async def generate(body: GenerateRequest):
        check_model(body.model)
        if tokenizer is None:
            raise _OllamaError(400, "this model has no tokenizer")
        if body.raw:
            prompt_ids = tokenizer.encode(body.prompt)
        else:
            messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
                {"role": "user", "content": body.prompt}
            ]
            prompt_ids = encode_chat(messages)
        return await respond(body, prompt_ids, lambda text: {"response": text})

    @app.post("/api/chat")
    async def chat(body: ChatRequest):
        check_model(body.model)
        if not body.messages:
            raise _OllamaError(400, "messages must not be empty")
        prompt_ids = encode_chat([{"role": m.role, "content": m.content} for m in body.messages])
        return await respond(body, prompt_ids, lambda text: {"message": {"role": "assistant", "content": text}})

    def details() -> dict:
        return {"format": info.source_kind, "family": getattr(hf_config, "model_type", ""),
                "parameter_size": f"{info.num_parameters / 1e6:.0f}M", "quantization_level": info.dtype}

    @app.get("/api/tags")
    async def tags():
        path = Path(info.source_path)
        return {"models": [{
            "name": f"{served_model_name}:latest", "model": f"{served_model_name}:latest",
            "modified_at": datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(),
            "size": path.stat().st_size if path.is_file() else 0, "digest": "", "details": details(),
        }]}

    @app.post("/api/show")
    async def show(body: ShowRequest):
        check_model(body.model or body.name or "")
        return {"modelfile": "", "parameters": "", "template": getattr(tokenizer, "chat_template", "") or "",
                "details": details(),
                "model_info": {"general.architecture": getattr(hf_config, "model_type", ""),
                               "context_length": max_model_len}}

    @app.get("/api/version")
    async def version():
        return {"version": __version__}
