"""POST /v1/responses (and GET / DELETE /v1/responses/{id}): OpenAI's Responses API.

The request is translated into a chat request (responses_protocol.py) and run
by the chat endpoint's machinery (templates, tools, structured outputs,
sampling); the answer is dressed as a Response: a ``message`` item with the
text and one ``function_call`` item per tool call. Streamed, it is the typed
event sequence the OpenAI SDK reads: ``response.created``,
``response.in_progress``, then per item ``response.output_item.added`` ...
``response.output_text.delta`` / ``response.function_call_arguments.delta``
... ``response.output_item.done``, and ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` cut it).

Finished responses are kept in memory (`ResponseStore`, bounded: the oldest
go first) with their whole conversation, so ``previous_response_id`` can
continue one; ``store: false`` keeps nothing.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from pagoda.engine.async_engine import prepend
from pagoda.entrypoints.http_guard import wait_or_disconnect
from pagoda.entrypoints.openai.errors import APIError
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.entrypoints.openai.responses_protocol import (
    ResponsesRequest,
    chat_body,
    input_messages,
    refuse_unsupported,
)
from pagoda.entrypoints.openai.serving_chat import OpenAIServingChat
from pagoda.entrypoints.openai.serving_common import ending_well
from pagoda.outputs import CompletionOutput, RequestOutput
from pagoda.tools.choice import ToolPlan
from pagoda.tools.parsers import ToolCallStream


@dataclass
class StoredResponse:
    response: dict
    conversation: list[dict]  # the messages so far, this response's answer included (no instructions)


class ResponseStore:
    """Finished responses by id, at most ``capacity`` of them (the oldest are dropped first)."""

    def __init__(self, capacity: int = 1000):
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, response: dict, conversation: list[dict]) -> None:
        self._items[response["id"]] = StoredResponse(response, conversation)
        self._items.move_to_end(response["id"])
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None

    def __len__(self) -> int:
        return len(self._items)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def _answer_message(items: list[dict]) -> dict:
    """The output items as one assistant chat message (for the stored conversation)."""
    text = "".join(part["text"] for item in items if item["type"] == "message" for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in items if item["type"] == "function_call"]
    message: dict = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = calls
    return message


class OpenAIServingResponses:
    def __init__(self, chat: OpenAIServingChat, store: ResponseStore):
        self.chat = chat
        self.store = store

    def retrieve(self, response_id: str) -> dict:
        stored = self.store.get(response_id)
        if stored is None:
            raise APIError(404, f"response {response_id!r} not found (this server keeps the last "
                                f"{self.store.capacity} stored responses, in memory)", "response_id",
                           "not_found_error")
        return stored.response

    def delete(self, response_id: str) -> dict:
        if not self.store.delete(response_id):
            raise APIError(404, f"response {response_id!r} not found", "response_id", "not_found_error")
        return {"id": response_id, "object": "response", "deleted": True}

    async def create(self, body: ResponsesRequest, request: Request):
        self.chat.check_model(body.model)
        refuse_unsupported(body)
        history: list[dict] = []
        if body.previous_response_id is not None:
            stored = self.store.get(body.previous_response_id)
            if stored is None:
                raise APIError(404, f"previous_response_id={body.previous_response_id!r} was not found (this "
                                    f"server keeps the last {self.store.capacity} stored responses, in memory)",
                               "previous_response_id", "not_found_error")
            history = stored.conversation
        conversation = history + input_messages(body)
        messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + conversation
        try:
            chat = ChatCompletionRequest.model_validate(chat_body(body))
        except ValidationError as error:
            first = error.errors()[0]
            raise APIError(400, f"invalid request: {first['msg']}", ".".join(map(str, first["loc"]))) from None
        response_id = _new_id("resp")
        created_at = int(time.time())
        plan, first, outputs = await self.chat.begin(chat, request, response_id, messages)

        def response(status: str, output: list[dict], final: RequestOutput | None,
                     num_output_tokens: int | None = None) -> dict:
            return self._response(body, response_id, created_at, status, output, final, num_output_tokens)

        def keep(done: dict) -> None:
            if body.store is not False:
                self.store.put(done, conversation + [_answer_message(done["output"])])

        if body.stream:
            events = self._stream(first, outputs, plan, response, keep)
            return StreamingResponse(ending_well(events, self._error_event, None), media_type="text/event-stream")

        async def last(final: RequestOutput) -> RequestOutput:
            async for final in outputs:
                pass
            return final

        final = await wait_or_disconnect(request, last(first))
        c = final.outputs[0]
        done = response(self._status(c), self._items(c, plan), final)
        keep(done)
        return done

    @staticmethod
    def _status(c: CompletionOutput) -> str:
        return "incomplete" if c.finish_reason == "length" else "completed"

    @staticmethod
    def _items(c: CompletionOutput, plan: ToolPlan) -> list[dict]:
        content, calls = plan.parser.extract(c.text) if plan.parser is not None else (c.text, [])
        items = [_message_item(_new_id("msg"), content)] if content or not calls else []
        items += [_call_item(_new_id("fc"), call.id, call.name, call.arguments) for call in calls]
        return items

    def _response(self, body: ResponsesRequest, response_id: str, created_at: int, status: str,
                  output: list[dict], final: RequestOutput | None, num_output_tokens: int | None) -> dict:
        usage = None
        if final is not None:
            produced = num_output_tokens if num_output_tokens is not None else len(final.outputs[0].token_ids)
            prompt = len(final.prompt_token_ids)
            usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": final.num_cached_tokens},
                     "output_tokens": produced, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": prompt + produced}
        return {
            "id": response_id, "object": "response", "created_at": created_at, "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": body.model,
            "output": output, "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id, "reasoning": None,
            "store": body.store is not False, "temperature": body.temperature,
            "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
            "tools": body.tools or [], "top_p": body.top_p, "truncation": "disabled", "usage": usage,
            "user": body.user, "metadata": body.metadata or {},
        }

    def _error_event(self, error: APIError) -> str:
        return _event("error", None, code=error.code or error.kind, message=error.message, param=error.param)

    async def _stream(self, first: RequestOutput, outputs: AsyncIterator[RequestOutput], plan: ToolPlan,
                      response, keep) -> AsyncIterator[str]:
        seq = itertools.count()
        yield _event("response.created", seq, response=response("in_progress", [], None))
        yield _event("response.in_progress", seq, response=response("in_progress", [], None))
        tool_stream = ToolCallStream(plan.parser) if plan.parser is not None else None
        items: list[dict] = []
        message: dict | None = None  # the open message item
        call: dict | None = None  # the open function_call item
        num_tokens = 0
        final = first

        def close_message():
            nonlocal message
            index, text = len(items), message["content"][0]["text"]
            base = {"item_id": message["id"], "output_index": index, "content_index": 0}
            done = _message_item(message["id"], text)
            items.append(done)
            message = None
            return [_event("response.output_text.done", seq, **base, text=text, logprobs=[]),
                    _event("response.content_part.done", seq, **base, part=done["content"][0]),
                    _event("response.output_item.done", seq, output_index=index, item=done)]

        def close_call():
            nonlocal call
            index = len(items)
            done = {**call, "status": "completed"}
            items.append(done)
            call = None
            return [_event("response.function_call_arguments.done", seq, item_id=done["id"], output_index=index,
                           name=done["name"], arguments=done["arguments"]),
                    _event("response.output_item.done", seq, output_index=index, item=done)]

        def open_message():
            nonlocal message
            message = _message_item(_new_id("msg"), "", "in_progress")
            index = len(items)
            return [_event("response.output_item.added", seq, output_index=index, item=message),
                    _event("response.content_part.added", seq, item_id=message["id"], output_index=index,
                           content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                  "logprobs": []})]

        async for output in prepend(first, outputs):
            final = output
            c = output.outputs[0]
            num_tokens += len(c.token_ids)
            text, deltas = tool_stream.feed(c.text, final=c.finished) if tool_stream else (c.text, [])
            if text and call is None:
                if message is None:
                    for e in open_message():
                        yield e
                message["content"][0]["text"] += text
                yield _event("response.output_text.delta", seq, item_id=message["id"], output_index=len(items),
                             content_index=0, delta=text, logprobs=[])
            for delta in deltas:
                if "id" in delta:  # a new call: close what is open, open its item
                    closing = close_message() if message is not None else []
                    closing += close_call() if call is not None else []
                    for e in closing:
                        yield e
                    call = _call_item(_new_id("fc"), delta["id"], delta["function"]["name"], "", "in_progress")
                    yield _event("response.output_item.added", seq, output_index=len(items), item=call)
                fragment = delta["function"].get("arguments")
                if fragment and call is not None:
                    call["arguments"] += fragment
                    yield _event("response.function_call_arguments.delta", seq, item_id=call["id"],
                                 output_index=len(items), delta=fragment)
        if call is None and message is None and not items:
            for e in open_message():  # an empty answer is still one (empty) message
                yield e
        closing = close_message() if message is not None else []
        closing += close_call() if call is not None else []
        for e in closing:
            yield e
        c = final.outputs[0]
        status = self._status(c)
        done = response(status, items, final, num_tokens)
        keep(done)
        yield _event("response.completed" if status == "completed" else "response.incomplete", seq, response=done)


def _event(kind: str, seq, **fields) -> str:
    data = {"type": kind, "sequence_number": next(seq) if seq is not None else 0, **fields}
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
