"""One streaming request to an OpenAI-compatible endpoint, timed.

Never raises for a failed request: a refused connection, an HTTP error, a
timeout or a malformed SSE stream becomes a RequestRecord with success=False
and the reason, so a run always finishes and counts its failures.
"""

from __future__ import annotations

import json
import time

import httpx

from pagoda.bench.datasets import BenchRequest
from pagoda.bench.metrics import RequestRecord


class MalformedStream(Exception):
    pass


def _content(chunk: dict, api: str) -> str:
    """The generated text a chunk carries ('' for role-only or usage-only chunks)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise MalformedStream(f"chunk without a choices list: {json.dumps(chunk)[:200]}")
    text = ""
    for choice in choices:
        if api == "chat":
            delta = choice.get("delta") or {}
            text += (delta.get("content") or "") + (delta.get("reasoning_content") or "")
        else:
            text += choice.get("text") or ""
    return text


async def send_request(client: httpx.AsyncClient, url: str, api: str, model: str, request: BenchRequest,
                       index: int, run_start: float, headers: dict | None = None, tokenizer=None) -> RequestRecord:
    """POSTs `request` with stream=True to `url` and times its chunks (times relative to `run_start`)."""
    start = time.perf_counter()
    record = RequestRecord(index=index, success=False, start_s=start - run_start, prompt_tokens=request.prompt_len)
    text_parts: list[str] = []
    last_content: float | None = None
    usage = None
    done = False
    try:
        body = request.body(api, model)
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code >= 400:
                raw = (await response.aread()).decode(errors="replace")
                try:
                    message = json.loads(raw)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = raw[:200]
                record.error = f"HTTP {response.status_code}: {message}"
                return record
            async for line in response.aiter_lines():
                line = line.strip()
                if not line or line.startswith(":"):
                    continue
                if not line.startswith("data:"):
                    raise MalformedStream(f"line is not an SSE data line: {line[:120]!r}")
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(payload)
                except json.JSONDecodeError:
                    raise MalformedStream(f"data is not JSON: {payload[:120]!r}") from None
                if "error" in chunk and "choices" not in chunk:
                    raise MalformedStream(f"error in stream: {json.dumps(chunk['error'])[:200]}")
                now = time.perf_counter()
                if chunk.get("usage"):
                    usage = chunk["usage"]
                text = _content(chunk, api)
                if text:
                    if record.ttft_s is None:
                        record.ttft_s = now - start
                    else:
                        record.itl_s.append(now - last_content)
                    last_content = now
                    text_parts.append(text)
        if not done:
            raise MalformedStream("stream ended without data: [DONE]")
    except MalformedStream as error:
        record.error = f"malformed stream: {error}"
        return record
    except httpx.TimeoutException as error:
        record.error = f"timeout: {type(error).__name__}"
        return record
    except httpx.HTTPError as error:
        record.error = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        return record
    except Exception as error:  # noqa: BLE001 - anything else still fails this request only, with its reason
        record.error = f"{type(error).__name__}: {error}"
        return record
    record.latency_s = time.perf_counter() - start
    if record.ttft_s is None:
        record.error = "no generated content in the stream"
        return record
    if usage:
        record.output_tokens = int(usage.get("completion_tokens") or 0)
        record.prompt_tokens = int(usage.get("prompt_tokens") or record.prompt_tokens)
    if not record.output_tokens:  # no usage from the server: count with the tokenizer
        text = "".join(text_parts)
        record.output_tokens = len(tokenizer.encode(text, add_special_tokens=False)) if tokenizer else len(text_parts)
    record.success = True
    return record
