"""POST /v1/chat/completions: the chat template, then one request (n choices), streamed or not.

Tools (pagoda/tools): the request's plan says which tools the template shows,
which grammar (if any) forces the output, and which parser reads calls out
of each choice's text; calls go out as ``message.tool_calls`` or, streamed,
as incremental ``delta.tool_calls``.

Streaming rules (OpenAI's): each choice opens with a role-only delta; its
finish_reason rides on its last content chunk (no extra empty chunk); the
concatenated deltas equal the non-streamed text.
"""

from __future__ import annotations


import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import Request
from fastapi.responses import StreamingResponse

from pagoda.engine.async_engine import prepend
from pagoda.entrypoints.http_guard import wait_or_disconnect
from pagoda.entrypoints.openai.errors import APIError
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest, message_dicts, refuse_unsupported
from pagoda.entrypoints.openai.serving_common import (
    OpenAIServing,
    ending_well,
    off_loop,
    sse,
    sse_error,
    truncate,
    usage,
)
from pagoda.entrypoints.openai.token_bytes import token_bytes
from pagoda.outputs import CompletionOutput, RequestOutput
from pagoda.sampling_params import RequestOutputKind
from pagoda.tools.choice import ToolPlan, ToolRequestError, plan_tools
from pagoda.tools.parsers import ToolCallStream
from pagoda.tools.render import render_chat


class OpenAIServingChat(OpenAIServing):
    def encode_messages(self, messages: list[dict], add_generation_prompt: bool = True,
                        tools: list[dict] | None = None) -> list[int]:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: chat needs one", "messages")
        try:
            text = render_chat(self.tokenizer, messages, tools, self.config.chat_template, add_generation_prompt)
        except Exception as error:  # a template that rejects the conversation
            raise APIError(400, f"chat template failed: {error}", "messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def begin(self, body: ChatCompletionRequest, request: Request, request_id: str,
                    messages: list[dict] | None = None
                    ) -> tuple[ToolPlan, RequestOutput, AsyncIterator[RequestOutput]]:
        """Checks the request, renders it and starts it: its tool plan, first output and the rest.
        ``messages``: the conversation as template dicts, if the caller has it (the Responses API)."""
        refuse_unsupported(body)
        plan = self.tool_plan(body)
        if messages is None:
            messages = message_dicts(body.messages)
        prompt_ids = truncate(await off_loop(self.encode_messages, messages, True, plan.tools),
                              body.truncate_prompt_tokens)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling_params(body, max_tokens, len(prompt_ids), top, await self.constraint(body, plan))
        # Streams get what is new each step; whole answers come once, at the end.
        params = replace(params, output_kind=RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY)
        first, outputs = await wait_or_disconnect(request, self.start(prompt_ids, params, request_id,
                                                                      self.request_options(body)))
        return plan, first, outputs

    async def create(self, body: ChatCompletionRequest, request: Request):
        self.check_model(body.model)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        plan, first, outputs = await self.begin(body, request, request_id)
        top = (body.top_logprobs or 0) if body.logprobs else None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._stream(first, outputs, request_id, body.model, include_usage, top, plan)
            return StreamingResponse(ending_well(events, sse_error, sse("[DONE]")), media_type="text/event-stream")

        async def last(final: RequestOutput) -> RequestOutput:
            async for final in outputs:
                pass
            return final

        final = await wait_or_disconnect(request, last(first))
        choices = [
            {
                "index": c.index,
                **self.message(c, plan),
                "logprobs": ({"content": self._logprobs(c.token_ids, c.logprobs, top), "refusal": None}
                             if top is not None else None),
            }
            for c in final.outputs
        ]
        return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": body.model,
                "choices": choices, "usage": usage(final)}

    def tool_plan(self, body: ChatCompletionRequest) -> ToolPlan:
        try:
            return plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, self.config.tool_call_parser)
        except ToolRequestError as error:
            raise APIError(400, str(error), error.field) from None

    @staticmethod
    def message(c: CompletionOutput, plan: ToolPlan) -> dict:
        """A finished choice's message and finish_reason, its tool calls read out of its text."""
        content, calls = plan.parser.extract(c.text) if plan.parser is not None else (c.text, [])
        message: dict = {"role": "assistant", "content": content, "refusal": None}
        finish_reason = c.finish_reason
        if calls:
            message["tool_calls"] = [call.to_openai() for call in calls]
            if finish_reason == "stop":
                finish_reason = plan.finish_reason_for_calls
        return {"message": message, "finish_reason": finish_reason}

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None, k: int,
                  start: int = 0) -> list[dict]:
        """OpenAI's chat logprobs: each token's logprob and its top-k alternatives."""
        def entry(token_id: int, logprob: float) -> dict:
            return {"token": self.decode([token_id]), "logprob": logprob,
                    "bytes": list(token_bytes(self.tokenizer, token_id))}

        entries = []
        for token_id, alternatives in zip(token_ids[start:], (logprobs or [])[start:]):
            top = sorted(alternatives.items(), key=lambda kv: -kv[1])[:k]
            entries.append({**entry(token_id, alternatives[token_id]),
                            "top_logprobs": [entry(t, lp) for t, lp in top]})
        return entries

    async def _stream(self, first: RequestOutput, outputs: AsyncIterator[RequestOutput], request_id: str,
                      model: str, include_usage: bool, top_logprobs: int | None,
                      plan: ToolPlan) -> AsyncIterator[str]:
        created_at = int(time.time())

        def chunk(choices: list[dict], usage_counts: dict | None = None) -> str:
            data = {"id": request_id, "object": "chat.completion.chunk", "created": created_at,
                    "model": model, "choices": choices}
            if include_usage:
                data["usage"] = usage_counts
            return sse(data)

        n = len(first.outputs)
        for index in range(n):
            yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        # Outputs are DELTAs: each holds the text and tokens new since the last one. Tokens
        # whose text has not appeared yet (a character split across tokens, a possible stop
        # string held back) wait here with their logprobs for the chunk that shows the text.
        pending_ids: list[list[int]] = [[] for _ in range(n)]
        pending_logprobs: list[list[dict[int, float]]] = [[] for _ in range(n)]
        num_tokens = 0
        held: list[dict | None] = [None] * n  # last content chunk, sent when the next one (or the end) comes
        done = [False] * n
        final = first
        # Tool calls: each choice's text goes through the plan's parser, which holds back what may
        # be a call and turns calls into delta.tool_calls.
        tool_streams = [ToolCallStream(plan.parser) for _ in range(n)] if plan.parser is not None else None

        async for output in prepend(first, outputs):
            final = output
            for c in output.outputs:
                i = c.index
                if done[i]:
                    continue
                delta, calls = c.text, []
                if tool_streams is not None:
                    delta, calls = tool_streams[i].feed(c.text, final=c.finished)
                num_tokens += len(c.token_ids)
                pending_ids[i].extend(c.token_ids)
                pending_logprobs[i].extend(c.logprobs or ())
                entry = None
                if delta or calls or c.finished:
                    logprobs = None
                    if top_logprobs is not None and pending_ids[i]:
                        logprobs = {"content": self._logprobs(pending_ids[i], pending_logprobs[i], top_logprobs),
                                    "refusal": None}
                    body = {"content": delta} if delta else {}
                    if calls:
                        body["tool_calls"] = calls
                    entry = {"index": i, "delta": body, "logprobs": logprobs, "finish_reason": None}
                    pending_ids[i], pending_logprobs[i] = [], []
                if c.finished:
                    done[i] = True
                    finish_reason = c.finish_reason
                    if finish_reason == "stop" and tool_streams is not None and tool_streams[i].called:
                        finish_reason = plan.finish_reason_for_calls
                    last = held[i]
                    if last is not None and not entry["delta"]:
                        entry = {**last, "finish_reason": finish_reason}  # ride on the last content chunk
                    else:
                        if last is not None:
                            yield chunk([last])
                        entry["finish_reason"] = finish_reason
                    held[i] = None
                    yield chunk([entry])
                elif entry is not None:
                    if held[i] is not None:
                        yield chunk([held[i]])
                    held[i] = entry
        if include_usage:
            yield chunk([], usage(final, num_tokens))
