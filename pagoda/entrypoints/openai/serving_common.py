"""What the OpenAI (and Ollama) endpoints share: model check, sampling
parameters from a request body, starting a request on the engine (within the
queue limit), tokenizing off the event loop, streams that always end well,
usage counts."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from pagoda.engine.async_engine import AsyncLLM, EngineDeadError, RequestFailedError
from pagoda.entrypoints.openai.errors import APIError
from pagoda.entrypoints.openai.serving_lora import LoRARegistry
from pagoda.entrypoints.openai.structured_outputs import (
    Constraint,
    check_compiles,
    constraint_from_body,
    tool_call_constraint,
)
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams, SamplingParamsError

logger = logging.getLogger(__name__)

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty")


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    # Beyond this many requests waiting for the engine, answer 503 + Retry-After.
    max_queued_requests: int = 1024
    chat_template: str | None = None
    # Reads tool calls out of the model's text for tool_choice "auto" (pagoda/tools/parsers.py);
    # None: "auto" is refused (--disable-auto-tool-choice).
    tool_call_parser: str | None = "hermes"
    # Finished Responses-API responses kept in memory for previous_response_id (oldest dropped first).
    max_stored_responses: int = 1000
    # Request bodies larger than this are refused with 413.
    max_request_bytes: int = 16 * 1024 * 1024
    # Seconds a client has to send a request's head, and then its body (408 / closed after).
    request_timeout: float = 30.0
    # The engine's scheduling policy: a request's `priority` means something only with "priority".
    scheduling_policy: str = "fcfs"
    # LoRA adapters clients may name in `model` (--enable-lora, --lora-modules, --lora-dir).
    loras: LoRARegistry = field(default_factory=LoRARegistry)


def edge_grammars(engine: AsyncLLM):
    """The front end's StructuredOutputManager: checks constraints against the served tokenizer
    (compiled and cached here too, so a bad one is a 400 before it is queued)."""
    from pagoda.structured_output.manager import StructuredOutputManager

    info = engine.model_info
    return StructuredOutputManager(info.tokenizer, info.vocab_size, info.eos_token_ids)


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, config: ServerConfig, grammars=None):
        """`grammars`: the StructuredOutputManager the routes share (`edge_grammars`); made here if None."""
        self.engine = engine
        self.config = config
        self.tokenizer = engine.model_info.tokenizer
        self.max_model_len = engine.model_info.max_model_len
        self.grammars = grammars if grammars is not None else edge_grammars(engine)

    async def constraint(self, body, tools=None) -> Constraint | None:
        """The body's structured-output constraint, fully checked (structured_outputs.py). `tools`: the
        request's ToolPlan (pagoda/tools/choice.py), whose forced choices are grammars too."""
        constraint = constraint_from_body(body)
        if tools is not None and tools.constraint is not None:  # tool_choice "required" or a named function
            if constraint is not None:
                raise APIError(400, f"tool_choice={body.tool_choice!r} forces tool calls and {constraint.field} "
                                    "constrains the text: send only one of them", constraint.field)
            constraint = tool_call_constraint(*tools.constraint)
        if constraint is not None:
            await off_loop(check_compiles, self.grammars, constraint)
        return constraint

    def check_model(self, name: str) -> None:
        if name != self.config.served_model_name and self.config.loras.lookup(name) is None:
            raise APIError(404, f"model {name!r} does not exist; this server serves "
                                f"{self.config.served_model_name!r}", "model", "not_found_error")

    def sampling_params(self, body, max_tokens: int | None, prompt_len: int, logprobs: int | None,
                        constraint: Constraint | None = None) -> SamplingParams:
        """The request's SamplingParams; refuses a prompt + max_tokens beyond the context, naming both counts.
        `constraint`: the body's structured-output constraint (structured_outputs.py), already checked."""
        room = self.max_model_len - prompt_len
        if prompt_len > self.max_model_len or (max_tokens is not None and max_tokens > room):
            raise APIError(
                400,
                f"this model's maximum context length is {self.max_model_len} tokens; the request has "
                f"{prompt_len} prompt tokens and asks for {max_tokens} completion tokens",
                "max_tokens" if prompt_len <= self.max_model_len else "prompt",
            )
        if body.stream and body.best_of is not None and body.best_of > body.n and not body.use_beam_search:
            raise APIError(400, f"best_of={body.best_of} > n={body.n} cannot be streamed: the best samples are "
                                "known only at the end", "best_of")
        fields = {name: getattr(body, name) for name in _SAMPLING_FIELDS if getattr(body, name) is not None}
        try:
            logit_bias = {int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids", "logit_bias") from None
        try:
            params = SamplingParams(
                n=body.n, seed=body.seed, stop=body.stop, stop_token_ids=body.stop_token_ids,
                ignore_eos=body.ignore_eos, min_tokens=body.min_tokens, logit_bias=logit_bias,
                best_of=body.best_of, use_beam_search=body.use_beam_search, beam_width=body.beam_width,
                length_penalty=body.length_penalty, early_stopping=body.early_stopping,
                max_tokens=max_tokens if max_tokens is not None else max(1, room), logprobs=logprobs, **fields,
                structured_outputs=constraint.params if constraint is not None else None,
            )
            params.validate_against_vocab(self.engine.model_info.vocab_size)
        except SamplingParamsError as error:
            if error.field_name == "structured_outputs":  # e.g. with beam search: name the field sent
                raise APIError(400, f"{constraint.field} {error.args[0].split(' is invalid: ', 1)[-1]}",
                               constraint.field) from None
            raise APIError(400, str(error), error.field_name) from None
        return params

    async def run(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                  options: dict | None = None) -> AsyncIterator[RequestOutput]:
        async for output in run_request(self.engine, self.config, prompt_ids, params, request_id, options):
            yield output

    def request_options(self, body) -> dict:
        """Per-request engine options from the body's pagoda extensions (not sampling parameters)."""
        if body.priority != 0 and self.config.scheduling_policy != "priority":
            raise APIError(400, f"priority={body.priority} needs the server started with --scheduling-policy "
                                "priority", "priority")
        options = {"cache_salt": body.cache_salt, "priority": body.priority}
        model = getattr(body, "model", None)
        lora = self.config.loras.lookup(model)
        if lora is not None:  # `model` names a LoRA adapter of the served model
            options["lora_request"] = lora
        elif model is not None:  # checked again: the adapter may have been unloaded since check_model
            self.check_model(model)
        return options

    async def start(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                    options: dict | None = None) -> tuple[RequestOutput, AsyncIterator[RequestOutput]]:
        """Starts a request and waits for its first output, so a refusal surfaces before any byte is sent."""
        outputs = self.run(prompt_ids, params, request_id, options)
        first = await outputs.__anext__()
        return first, outputs

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""


async def run_request(engine: AsyncLLM, config: ServerConfig, prompt_ids: list[int], params: SamplingParams,
                      request_id: str, options: dict | None = None) -> AsyncIterator[RequestOutput]:
    """A request's outputs, as APIErrors when it cannot be served: a full queue or a dead
    engine is 503, an engine refusal 400, a failure of this request inside the engine 500."""
    waiting = engine.num_waiting
    if waiting >= config.max_queued_requests:
        raise APIError(503, f"server is busy: {waiting} requests are waiting "
                            f"(max_queued_requests={config.max_queued_requests}); retry shortly",
                       kind="server_busy")
    try:
        async for output in engine.generate(prompt_ids, params, request_id, **(options or {})):
            yield output
    except EngineDeadError as error:
        raise APIError(503, str(error), kind="server_error") from None
    except RequestFailedError as error:  # the engine failed this request alone and goes on
        if error.invalid_request:  # e.g. a grammar the vocabulary cannot finish: the request's fault
            raise APIError(400, f"the request cannot be served: {error.message}") from None
        raise APIError(500, f"the request failed in the engine: {error.message}", kind="server_error") from None
    except ValueError as error:
        raise APIError(400, str(error)) from None
    except APIError:
        raise
    except Exception as error:  # unexpected: still this request's error, in the API's shape
        logger.warning("request %s failed: %r", request_id, error)
        raise APIError(500, f"the request failed in the engine: {error}", kind="server_error") from None


async def off_loop(function: Callable, *args, **kwargs):
    """Runs slow CPU work (tokenizing, chat templates) on a worker thread, so the event
    loop keeps serving other clients meanwhile."""
    return await asyncio.to_thread(function, *args, **kwargs)


async def ending_well(events: AsyncIterator[str], error_event: Callable[[APIError], str],
                      end_event: str | None) -> AsyncIterator[str]:
    """`events`, then: if they stopped on an error, one error event; and `end_event` in
    every case (`data: [DONE]`), so no client is left waiting for an end that never comes."""
    try:
        async for event in events:
            yield event
    except APIError as error:
        yield error_event(error)
    except Exception as error:  # a bug while rendering: still end the stream properly
        logger.exception("stream failed")
        yield error_event(APIError(500, f"the stream failed: {error!r}", kind="server_error"))
    if end_event is not None:
        yield end_event


def truncate(prompt_ids: list[int], keep_last: int | None) -> list[int]:
    return prompt_ids[-keep_last:] if keep_last is not None else prompt_ids


def usage(output: RequestOutput, completion_tokens: int | None = None) -> dict:
    """Token counts of a finished request; `completion_tokens` for streams of DELTA outputs
    (whose last output holds only the last tokens)."""
    completion = completion_tokens if completion_tokens is not None else sum(len(c.token_ids) for c in output.outputs)
    prompt = len(output.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": output.num_cached_tokens}}


def sse(data: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def sse_error(error: APIError) -> str:
    """The error event that ends a broken OpenAI stream (vLLM's shape: an `error` object)."""
    return sse({"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}})
