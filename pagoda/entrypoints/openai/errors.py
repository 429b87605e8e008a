"""Error bodies in the shape each API's clients parse.

OpenAI routes (everything but /api/*): {"error": {"message", "type", "param", "code"}},
with `code` a string or null as in OpenAI's schema. Ollama routes (/api/*):
{"error": "..."}. Every refusal the server makes goes through `error_response`,
so the shape follows the path, whichever layer refused (middleware, validation,
route, stream).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

OLLAMA_PREFIX = "/api/"


class APIError(Exception):
    """A refusal with its HTTP status; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def is_ollama_path(path: str) -> bool:
    return path.startswith(OLLAMA_PREFIX)


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None, ollama: bool = False) -> dict:
    if ollama:
        return {"error": message}
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   code: str | None = None, path: str = "", headers: dict[str, str] | None = None) -> JSONResponse:
    """The error as a response; `path` picks the shape (Ollama's under /api/)."""
    response = JSONResponse(error_body(message, param, kind, code, is_ollama_path(path)), status_code=status,
                            headers=headers)
    if status == 503:
        response.headers["Retry-After"] = "1"
    return response


def api_error_response(error: APIError, path: str = "") -> JSONResponse:
    return error_response(error.status, error.message, error.param, error.kind, error.code, path)
