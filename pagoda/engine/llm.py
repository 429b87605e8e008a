"""The offline API users know from vLLM: LLM(model=...).generate(prompts, params)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from tqdm.auto import tqdm

from pagoda.config import DEFAULT_MODEL, engine_config_from_kwargs
from pagoda.engine.llm_engine import LLMEngine, PromptInput
from pagoda.model.lora.request import LoRARequest
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import RequestOutputKind, SamplingParams
from pagoda.tools.choice import validate_tools
from pagoda.tools.render import render_chat

Message = dict[str, str]


class LLM:
    """An engine for offline batched generation.

    Keyword arguments map onto `EngineConfig`, `SchedulerConfig` and
    `CacheConfig` fields (e.g. `dtype`, `max_model_len`, `max_num_seqs`,
    `max_num_batched_tokens`, `block_size`, `kv_cache_memory`, `num_blocks`,
    `attention_backend`: "auto", "torch", "cpu" or "triton"; `enforce_eager`: no CUDA graphs;
    multi-LoRA: `enable_lora`, `max_loras`, `max_lora_rank`, `max_cpu_loras`).
    """

    def __init__(self, model: str = DEFAULT_MODEL, show_progress: bool = True, **kwargs):
        self.engine = LLMEngine(engine_config_from_kwargs(model, **kwargs), show_progress=show_progress)

    def close(self) -> None:
        """Saves what must outlive the process (the offload disk tier's blocks)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Runs all prompts to completion; outputs come back in prompt order.

        `lora_request`: one LoRA adapter for every prompt, or one per prompt (None: the base model);
        needs `LLM(..., enable_lora=True)`.
        `priority`: one per prompt, for the "priority" scheduling policy (lower first).
        A request the engine failed (an exception while serving it; the others go on) comes
        back finished with `output.error` set and finish_reason "error" on its completions.
        Raises EngineStepError if the engine's steps keep failing whatever they run.
        """
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"sampling_params has {len(params_list)} entries but there are {len(prompts)} prompts; "
                    "give one per prompt or a single one."
                )
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"priority has {len(priority)} entries but there are {len(prompts)} prompts")
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"lora_request has {len(loras)} entries but there are {len(prompts)} prompts; "
                                 "give one per prompt or a single one.")
        # Only finished outputs are returned: the engine builds nothing before the end.
        final_only = {id(p): replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params_list}
        params_list = [final_only[id(p)] for p in params_list]
        request_ids = []
        try:
            for prompt, params, urgency, lora in zip(prompts, params_list, priorities, loras):
                request_ids.append(self.engine.add_request(prompt, params, priority=urgency, lora_request=lora))
        except Exception:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Applies the tokenizer's chat template to each conversation, then generates
        (`lora_request` as in `generate`).

        ``tools``: OpenAI function tools shown to the model (pagoda/tools/render.py); read the
        calls out of a reply with ``pagoda.tools.parsers.get_tool_parser(name).extract(text)``.
        Messages may hold assistant ``tool_calls`` and ``tool`` results, as in the OpenAI API.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.apply_chat_template(conv, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                                     tools=tools)
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def apply_chat_template(
        self, messages: list[Message], chat_template: str | None = None, add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> list[int]:
        tokenizer = self.engine.tokenizer
        tools = validate_tools(tools) if tools else None
        text = render_chat(tokenizer, messages, tools, chat_template, add_generation_prompt)
        # The template already holds every special token the model expects.
        return tokenizer.encode(text, add_special_tokens=False)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        bar = tqdm(total=len(request_ids), desc="Generating", unit=" req", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests() and len(finished) < len(wanted):
                for output in self.engine.step():
                    if output.finished and output.request_id in wanted:
                        finished[output.request_id] = output
                        bar.update(1)
        except BaseException:
            # Interrupted (Ctrl-C, an error): free every block these requests hold.
            for request_id in wanted - finished.keys():
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [finished[request_id] for request_id in request_ids]
