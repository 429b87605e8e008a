"""AsyncLLM when things go wrong: a request the engine fails raises RequestFailedError from its
own generate() while the others go on; a request id still in use is refused without touching
its first owner; shutdown() ends every open generate() with EngineDeadError."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from pagoda.config import CacheConfig, EngineConfig
from pagoda.engine.async_engine import AsyncLLM, EngineDeadError, RequestFailedError
from pagoda.engine.llm_engine import LLMEngine
from pagoda.sampling_params import SamplingParams
from tests.conftest import TINY_VOCAB

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPT = _tokens(40, 1)


def _config(path) -> EngineConfig:
    return EngineConfig(model=str(path), dtype="float32", cache=CacheConfig(kv_cache_memory=16 * 1024**2))


@pytest.fixture(params=["thread", "process"])
def async_engine(request, tiny_llama):
    if request.param == "thread":
        engine = AsyncLLM(LLMEngine(_config(tiny_llama), show_progress=False))
    else:
        engine = AsyncLLM.in_child_process(_config(tiny_llama))
    yield engine
    engine.shutdown()


@pytest.fixture
def thread_engine(tiny_llama):
    engine = AsyncLLM(LLMEngine(_config(tiny_llama), show_progress=False))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def expected(tiny_llama) -> list[int]:
    engine = LLMEngine(_config(tiny_llama), show_progress=False)
    engine.add_request(PROMPT, GREEDY, "x")
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                return output.outputs[0].token_ids
    raise AssertionError("no output")


def _wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


async def _final(engine: AsyncLLM, prompt, params: SamplingParams, request_id: str, **options):
    final = None
    async for final in engine.generate(prompt, params, request_id, **options):
        pass
    return final


def test_a_failing_request_raises_from_its_own_stream_and_the_engine_goes_on(async_engine, expected):
    async def run():
        # A cache salt that cannot be hashed fails the request while it is scheduled, in either placement.
        bad = asyncio.ensure_future(_final(async_engine, PROMPT, GREEDY, "bad", cache_salt="\ud800"))
        good = asyncio.ensure_future(_final(async_engine, PROMPT, GREEDY, "good"))
        with pytest.raises(RequestFailedError) as info:
            await bad
        assert info.value.request_id == "bad" and "UnicodeEncodeError" in info.value.message
        assert "request 'bad' failed" in str(info.value)
        assert not isinstance(info.value, ValueError)  # the engine's fault, not a refusal (not a 400)
        first = await good
        again = await _final(async_engine, PROMPT, GREEDY, "bad")  # the id is free again, the engine works
        return first, again

    first, again = asyncio.run(run())
    assert first.outputs[0].token_ids == expected and again.outputs[0].token_ids == expected
    assert async_engine.is_healthy and async_engine.num_unfinished == 0
    assert _wait_until(lambda: async_engine.stats.kv_cache_usage == 0 and async_engine.stats.num_running == 0)


def test_a_request_failed_inside_the_step_frees_everything(thread_engine, expected, monkeypatch):
    engine = thread_engine.engine
    execute = engine.executor.execute_model

    def failing(step):
        # Every step that runs "bad" once it has 2 tokens fails: batched with "good", then alone.
        if any(row.request_id == "bad" and engine.scheduler.get_request("bad").num_output_tokens >= 2
               for row in step.rows):
            raise RuntimeError("injected device failure")
        return execute(step)

    monkeypatch.setattr(engine.executor, "execute_model", failing)

    async def run():
        bad = asyncio.ensure_future(_final(thread_engine, _tokens(30, 2), LONG, "bad"))
        good = asyncio.ensure_future(_final(thread_engine, PROMPT, GREEDY, "good"))
        with pytest.raises(RequestFailedError, match="injected device failure"):
            await bad
        return await good

    assert asyncio.run(run()).outputs[0].token_ids == expected
    assert thread_engine.is_healthy
    assert _wait_until(lambda: not engine.has_unfinished_requests())
    kv = engine.kv_cache_manager
    assert _wait_until(lambda: kv.num_free_blocks == kv.pool.num_blocks)
    assert not engine._parents and not engine._seq_to_parent and not engine._suspects


def test_an_unexpected_error_while_adding_is_a_request_failure_not_a_refusal(thread_engine, monkeypatch):
    engine = thread_engine.engine
    add = engine.add_request

    def failing(prompt, params, request_id, *args):
        if request_id == "boom":
            raise RuntimeError("injected add failure")
        return add(prompt, params, request_id, *args)

    monkeypatch.setattr(engine, "add_request", failing)
    with pytest.raises(RequestFailedError, match="injected add failure"):
        asyncio.run(_final(thread_engine, PROMPT, GREEDY, "boom"))
    assert asyncio.run(_final(thread_engine, PROMPT, GREEDY, "fine")).finished
    assert thread_engine.is_healthy and thread_engine.num_unfinished == 0


def test_a_request_id_in_use_is_refused_without_touching_the_first(thread_engine):
    async def run():
        first = thread_engine.generate(PROMPT, LONG, "dup")
        output = await first.__anext__()
        assert not output.finished
        with pytest.raises(ValueError, match="request_id='dup' is already in use"):
            await _final(thread_engine, PROMPT, GREEDY, "dup")
        final = output
        async for final in first:  # the first caller's stream is intact and finishes
            pass
        return final

    final = asyncio.run(asyncio.wait_for(run(), timeout=120))  # a guard: the old behaviour hung forever
    assert final.finished and len(final.outputs[0].token_ids) == LONG.max_tokens
    assert final.outputs[0].finish_reason == "length"
    assert thread_engine.num_unfinished == 0


def test_shutdown_ends_every_open_generate_and_refuses_new_ones(async_engine):
    async def run():
        streams = [async_engine.generate(_tokens(10, seed), LONG, f"r{seed}") for seed in range(3)]
        for stream in streams:
            await stream.__anext__()  # all three are running
        waiter = asyncio.ensure_future(_final(async_engine, PROMPT, LONG, "waiting"))
        await asyncio.sleep(0)
        await asyncio.get_running_loop().run_in_executor(None, async_engine.shutdown)
        for stream in streams:
            with pytest.raises(EngineDeadError, match="the engine shut down"):
                async for _ in stream:
                    pass
        with pytest.raises(EngineDeadError, match="the engine shut down"):
            await waiter
        with pytest.raises(EngineDeadError, match="the engine shut down"):
            await _final(async_engine, PROMPT, GREEDY, "late")

    asyncio.run(asyncio.wait_for(run(), timeout=60))
    assert not async_engine.is_healthy and async_engine.num_unfinished == 0
    async_engine.shutdown()  # twice is fine
    if async_engine.engine is not None:  # thread placement: the loop aborted every request on its way out
        engine = async_engine.engine
        assert not engine.has_unfinished_requests() and not engine.scheduler.has_unfinished()
        assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.pool.num_blocks
