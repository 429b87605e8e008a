"""AsyncLLM with the engine loop on a thread and in a child process: same outputs,
same refusals, aborts free KV blocks, and a dead loop is reported."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from pagoda.config import CacheConfig, EngineConfig
from pagoda.engine.async_engine import AsyncLLM, EngineDeadError
from pagoda.engine.llm_engine import LLMEngine
from pagoda.sampling_params import SamplingParams


def _config(path) -> EngineConfig:
    return EngineConfig(model=str(path), dtype="float32", cache=CacheConfig(kv_cache_memory=16 * 1024**2))


@pytest.fixture(params=["thread", "process"])
def async_engine(request, tiny_llama):
    if request.param == "thread":
        engine = AsyncLLM(LLMEngine(_config(tiny_llama), show_progress=False))
    else:
        engine = AsyncLLM.in_child_process(_config(tiny_llama))
    assert engine.placement == request.param
    yield engine
    engine.shutdown()


def _wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


async def _final(engine: AsyncLLM, prompt, params: SamplingParams, request_id: str):
    final = None
    async for final in engine.generate(prompt, params, request_id):
        pass
    return final


def test_both_placements_give_the_offline_engine_tokens(async_engine, tiny_llama):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [3] * 20]
    offline = LLMEngine(_config(tiny_llama), show_progress=False)
    expected = []
    for prompt in prompts:
        request_id = offline.add_request(prompt, params)
        while offline.has_unfinished_requests():
            for output in offline.step():
                if output.request_id == request_id and output.finished:
                    expected.append(output.outputs[0].token_ids)

    async def run_all():
        return await asyncio.gather(*(_final(async_engine, p, params, f"r{i}") for i, p in enumerate(prompts)))

    finals = asyncio.run(run_all())
    assert [f.outputs[0].token_ids for f in finals] == expected
    assert all(f.finished for f in finals)
    assert async_engine.model_info.vocab_size == offline.vocab_size
    assert _wait_until(lambda: async_engine.stats.num_running == 0)
    assert async_engine.num_steps > 0 and async_engine.busy_seconds > 0


def test_refusal_is_a_value_error_naming_the_problem(async_engine):
    async def run():
        await _final(async_engine, [5, 10**6], SamplingParams(max_tokens=2), "bad")

    with pytest.raises(ValueError, match="token id 1000000"):
        asyncio.run(run())
    assert async_engine.num_unfinished == 0


def test_stopping_early_aborts_and_frees_kv_blocks(async_engine):
    async def run():
        params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
        outputs = async_engine.generate([5] * 40, params, "long")
        async for output in outputs:
            if len(output.outputs[0].token_ids) >= 3:
                break
        await outputs.aclose()
        assert async_engine.stats.kv_cache_usage > 0

    asyncio.run(run())
    assert _wait_until(lambda: async_engine.stats.kv_cache_usage == 0 and async_engine.stats.num_running == 0)
    assert async_engine.num_unfinished == 0


def test_a_killed_engine_process_is_reported(tiny_llama):
    engine = AsyncLLM.in_child_process(_config(tiny_llama))
    try:
        assert engine.is_healthy
        os.kill(engine._loop._process.pid, signal.SIGKILL)
        assert _wait_until(lambda: not engine.is_healthy)

        async def run():
            await _final(engine, [5, 6], SamplingParams(max_tokens=2), "after")

        with pytest.raises(EngineDeadError):
            asyncio.run(run())
    finally:
        engine.shutdown()


def test_a_model_that_fails_to_load_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="failed to load"):
        AsyncLLM.in_child_process(EngineConfig(model=str(tmp_path / "missing")))
