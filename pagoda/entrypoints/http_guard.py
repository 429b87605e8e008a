"""What stands between the network and the routes, for both APIs.

- `ApiKeyMiddleware`: with an API key set, every route but /health needs
  `Authorization: Bearer KEY` (the scheme is case-insensitive).
- `BodyGuardMiddleware`: a request body is read once, here, within a size
  limit (413) and a time limit (408); it must be UTF-8 JSON without lone
  surrogates and at most `MAX_JSON_DEPTH` deep (400, naming the place). It is
  then handed on as JSON whatever its declared content type (`curl -d` sends
  form-encoded; OpenAI and Ollama accept it as JSON).
- `GuardedH11Protocol`: uvicorn's HTTP/1.1 protocol plus a deadline for the
  request head, so idle and half-sent connections are closed.
- `wait_or_disconnect`: waits for a result unless the client leaves first,
  in which case the work is cancelled (and its engine request aborted).

These are plain ASGI middlewares, not BaseHTTPMiddleware: the latter wraps
`receive`, and routes then cannot see a client's disconnect.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import Awaitable
from typing import TypeVar

import h11
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from pagoda.entrypoints.openai.errors import error_response

MAX_JSON_DEPTH = 64
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
DEFAULT_REQUEST_TIMEOUT = 30.0  # seconds to send the request head, and then its body

_SURROGATE = re.compile("[\ud800-\udfff]")
_OPEN_PATHS = ("/health",)
_T = TypeVar("_T")


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.expected):
            response = error_response(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                                      kind="authentication_error", path=scope["path"],
                                      headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyGuardMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 timeout: float = DEFAULT_REQUEST_TIMEOUT):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(413, self._too_large(int(declared)), scope, receive, send)
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout)
        except TimeoutError:
            return await self._refuse(408, f"the request body was not received within {self.timeout:g} s",
                                      scope, receive, send, close=True)
        except _TooLarge as error:
            return await self._refuse(413, self._too_large(error.size), scope, receive, send)
        except ClientDisconnected:
            return None
        if body:
            problem = check_json_body(body)
            if problem is not None:
                message, param = problem
                return await self._refuse(400, message, scope, receive, send, param=param)
        # Routes parse the body as JSON whatever content type the client declared.
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + [
            (b"content-type", b"application/json")]
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls see the client's disconnect

        return await self.app(scope, replay, send)

    def _too_large(self, size: int) -> str:
        return f"the request body has {size} bytes, more than the limit of {self.max_bytes} (--max-request-bytes)"

    async def _read(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _refuse(status: int, message: str, scope: Scope, receive: Receive, send: Send,
                      param: str | None = None, close: bool = False) -> None:
        response = error_response(status, message, param, path=scope["path"],
                                  headers={"Connection": "close"} if close or status == 413 else None)
        await response(scope, receive, send)


class _TooLarge(Exception):
    def __init__(self, size: int):
        self.size = size


def check_json_body(body: bytes) -> tuple[str, str | None] | None:
    """(message, param) if the body is not acceptable JSON, else None."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"the request body is not valid UTF-8 (byte {error.start})", None
    try:
        value = json.loads(text)
    except RecursionError:
        return f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)", None
    except ValueError as error:
        return f"the request body is not valid JSON: {error}", None
    return _check_value(value)


def _check_value(root: object) -> tuple[str, str | None] | None:
    """Depth and lone surrogates, walked without recursion."""
    stack: list[tuple[object, str, int]] = [(root, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)", where or None
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return (f"{where or 'the body'}: the string contains a lone UTF-16 surrogate, which is not "
                        "valid Unicode", where or None)
        elif isinstance(value, dict):
            for key, item in value.items():
                place = f"{where}.{key}" if where else str(key)
                if _SURROGATE.search(key):
                    return f"{where or 'the body'}: a key contains a lone UTF-16 surrogate", where or None
                stack.append((item, place, depth + 1))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, (str, dict, list)):
                    stack.append((item, f"{where}[{index}]", depth + 1))
    return None


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head: a connection
    that stays silent, or sends a head slowly, is closed when it passes.
    (After a response, uvicorn's own keep-alive timeout closes idle connections.)"""

    header_timeout: float = DEFAULT_REQUEST_TIMEOUT

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_deadline_passed)

    def _head_deadline_passed(self) -> None:
        waiting_for_head = self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head has arrived
            self._head_deadline.cancel()

    def on_response_complete(self) -> None:
        self._head_deadline.cancel()
        self._arm_head_deadline()  # for the next request on this connection
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._head_deadline.cancel()
        super().connection_lost(exc)


def guarded_protocol(header_timeout: float) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": header_timeout})


async def wait_or_disconnect(request: Request, work: Awaitable[_T]) -> _T:
    """`work`'s result, unless the client disconnects first: then `work` is cancelled
    (an engine request it awaits is aborted) and ClientDisconnected is raised."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task.cancelled() or not task.done():
        try:
            await task
        except asyncio.CancelledError:
            pass
        raise ClientDisconnected
    return task.result()
