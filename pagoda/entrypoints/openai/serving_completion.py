"""POST /v1/completions: one engine request per prompt (n choices each), streamed or not.

`echo` with `logprobs` returns the prompt's own logprobs (the first token's
is None), which is what log-likelihood evaluation harnesses read.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import Request
from fastapi.responses import StreamingResponse

from pagoda.engine.async_engine import prepend
from pagoda.entrypoints.http_guard import wait_or_disconnect
from pagoda.entrypoints.openai.errors import APIError
from pagoda.entrypoints.openai.protocol import CompletionRequest, refuse_unsupported
from pagoda.entrypoints.openai.serving_common import (
    OpenAIServing,
    ending_well,
    off_loop,
    sse,
    sse_error,
    truncate,
    usage,
)
from pagoda.outputs import CompletionOutput, RequestOutput
from pagoda.sampling_params import RequestOutputKind


MAX_PROMPTS = 1024  # prompts in one /v1/completions request (each becomes an engine request)
MAX_SEQUENCES = 1024  # prompts x (n, best_of or beam width): what one request may put in the queue


def _prompt_list(prompt) -> list[str | list[int]]:
    """OpenAI's four prompt forms (str, [str], [int], [[int]]) as a list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return list(prompt)


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, body: CompletionRequest, request: Request):
        self.check_model(body.model)
        refuse_unsupported(body)
        prompts = _prompt_list(body.prompt)
        if not prompts:
            raise APIError(400, "prompt must not be empty", "prompt")
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"prompt has {len(prompts)} prompts; at most {MAX_PROMPTS} per request", "prompt")
        if body.stream and len(prompts) != 1:
            raise APIError(400, "prompt: streaming takes one prompt per request", "prompt")
        encoded = [truncate(ids, body.truncate_prompt_tokens)
                   for ids in await off_loop(lambda: [self._encode(prompt) for prompt in prompts])]
        constraint = await self.constraint(body)  # checked once, shared by every prompt's request
        params = [self.sampling_params(body, body.max_tokens, len(ids), body.logprobs, constraint) for ids in encoded]
        sequences = len(encoded) * max(params[0].num_samples, params[0].beam_width or 1)
        if sequences > MAX_SEQUENCES:
            raise APIError(400, f"the request asks for {sequences} sequences ({len(encoded)} prompts x "
                                f"{sequences // len(encoded)} each); at most {MAX_SEQUENCES} per request", "n")
        if body.echo and body.logprobs is not None:
            params = [replace(p, prompt_logprobs=body.logprobs) for p in params]
        # Streams get what is new each step; whole answers come once, at the end.
        kind = RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY
        params = [replace(p, output_kind=kind) for p in params]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            first, outputs = await wait_or_disconnect(request, self.start(encoded[0], params[0], request_id,
                                                                          self.request_options(body)))
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            echo = self.decode(encoded[0]) if body.echo else None
            events = self._stream(first, outputs, request_id, body.model, include_usage, echo)
            return StreamingResponse(ending_well(events, sse_error, sse("[DONE]")), media_type="text/event-stream")

        async def final_output(index: int) -> RequestOutput:
            final = None
            async for final in self.run(encoded[index], params[index], f"{request_id}-{index}",
                                        self.request_options(body)):
                pass
            return final

        async def all_outputs() -> list[RequestOutput]:
            try:
                async with asyncio.TaskGroup() as group:  # one refusal cancels (and aborts) the rest
                    tasks = [group.create_task(final_output(i)) for i in range(len(encoded))]
            except ExceptionGroup as errors:
                raise errors.exceptions[0] from None
            return [task.result() for task in tasks]

        finals = await wait_or_disconnect(request, all_outputs())
        choices = []
        for prompt_index, final in enumerate(finals):
            for c in final.outputs:
                choices.append({
                    "index": prompt_index * body.n + c.index,
                    "text": (self.decode(final.prompt_token_ids) + c.text) if body.echo else c.text,
                    "logprobs": (self._logprobs(c, final if body.echo else None)
                                 if body.logprobs is not None else None),
                    "finish_reason": c.finish_reason,
                })
        total = {key: sum(usage(f)[key] for f in finals) for key in ("prompt_tokens", "completion_tokens",
                                                                     "total_tokens")}
        total["prompt_tokens_details"] = {"cached_tokens": sum(f.num_cached_tokens for f in finals)}
        return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": body.model,
                "choices": choices, "usage": total}

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send token ids", "prompt")
        return self.tokenizer.encode(prompt)

    def _logprobs(self, c: CompletionOutput, echoed: RequestOutput | None = None) -> dict:
        """OpenAI's completion logprobs; with echo, the prompt's tokens come first (the very first has None)."""
        token_ids = list(c.token_ids)
        entries: list[dict[int, float] | None] = list(c.logprobs or [])
        if echoed is not None:
            token_ids = list(echoed.prompt_token_ids) + token_ids
            entries = list(echoed.prompt_logprobs or [None] * len(echoed.prompt_token_ids)) + entries
        return self._logprobs_of(token_ids, entries, 0)

    def _logprobs_of(self, token_ids: list[int], entries: list[dict[int, float] | None], offset: int) -> dict:
        """The logprobs object for these tokens; `offset`: text position of the first one."""
        def name(token_id: int) -> str:
            return self.decode([token_id]) if self.tokenizer is not None else str(token_id)

        tokens = [name(t) for t in token_ids]
        offsets, position = [], offset
        for token in tokens:
            offsets.append(position)
            position += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [entry[t] if entry else None for t, entry in zip(token_ids, entries)],
            "top_logprobs": [{name(t): lp for t, lp in entry.items()} if entry else None for entry in entries],
            "text_offset": offsets,
        }

    async def _stream(self, first: RequestOutput, outputs: AsyncIterator[RequestOutput], request_id: str,
                      model: str, include_usage: bool, echo: str | None) -> AsyncIterator[str]:
        created_at = int(time.time())

        def chunk(choices: list[dict], **extra) -> str:
            return sse({"id": request_id, "object": "text_completion", "created": created_at, "model": model,
                        "choices": choices, **extra})

        n = len(first.outputs)
        if echo:
            yield chunk([{"index": i, "text": echo, "logprobs": None, "finish_reason": None} for i in range(n)])
        # Outputs are DELTAs (text and tokens new since the last one); tokens whose text has
        # not appeared yet wait with their logprobs for the chunk that shows it.
        sent = [0] * n  # characters sent, for logprobs' text_offset
        pending_ids: list[list[int]] = [[] for _ in range(n)]
        pending_logprobs: list[list[dict[int, float]]] = [[] for _ in range(n)]
        num_tokens = 0
        done = [False] * n
        final = first
        async for output in prepend(first, outputs):
            final = output
            for c in output.outputs:
                i = c.index
                if done[i]:
                    continue
                num_tokens += len(c.token_ids)
                pending_ids[i].extend(c.token_ids)
                if c.logprobs is not None:
                    pending_logprobs[i].extend(c.logprobs)
                delta = c.text
                if not delta and not c.finished:
                    continue
                logprobs = None
                if c.logprobs is not None:
                    logprobs = self._logprobs_of(pending_ids[i], pending_logprobs[i], len(echo or "") + sent[i])
                pending_ids[i], pending_logprobs[i] = [], []
                sent[i] += len(delta)
                done[i] = c.finished
                yield chunk([{"index": i, "text": delta, "logprobs": logprobs, "finish_reason": c.finish_reason}])
        if include_usage:
            yield chunk([], usage=usage(final, num_tokens))
