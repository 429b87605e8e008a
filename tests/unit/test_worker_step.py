"""The narrow worker boundary: the worker's persistent batch, fed only WorkerSteps (new
requests whole, then deltas), always mirrors the engine's token ids and block tables; every
request it was sent is dropped exactly once, when it ends. Driven with the scheduler and no
model (like test_scheduler), through preemption by recompute, aborts and a forced resync."""

from __future__ import annotations

import pickle
import random

import pytest
import torch

from pagoda.config import SchedulerConfig
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.scheduler import Scheduler
from pagoda.core.worker_step import WorkerStepBuilder
from pagoda.worker.input_batch import InputBatch
from tests.unit.test_scheduler import make_request

BLOCK_SIZE = 4


def _mirror_matches(batch: InputBatch, out) -> None:
    for item in out.scheduled:
        state = batch.states[item.request_id]
        r = state.row
        assert batch.token_ids[r, :batch.num_tokens[r]].tolist() == item.request.all_token_ids
        assert batch.block_table[r, :batch.num_blocks[r]].tolist() == list(item.block_table)
        assert not batch.block_table[r, batch.num_blocks[r]:].any()  # zero padding after the table


@pytest.mark.parametrize("seed", range(4))
def test_the_worker_mirrors_the_engine_through_preemption_and_aborts(seed):
    rng = random.Random(seed)
    # 14 blocks of 4 tokens for 12 requests of up to 36 tokens: preemption by recompute happens.
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=48, max_num_seqs=6),
                      KVCacheManager(14, BLOCK_SIZE), max_model_len=256)
    requests = [make_request(f"r{i}", rng.randint(3, 20), max_tokens=rng.randint(8, 16), seed=i)
                for i in range(12)]
    for request in requests:
        sched.add_request(request)
    builder, batch = WorkerStepBuilder(), InputBatch(BLOCK_SIZE, 256, initial_rows=2)
    sent, dropped = set(), []
    for number in range(500):
        if not sched.has_unfinished():
            break
        if number == 7:  # an abort mid-flight
            sched.abort_requests(["r3"])
        out = sched.schedule()
        worker_step = builder.build(out)
        pickle.dumps(worker_step)  # plain data only: could go to another process
        assert all(not hasattr(row, "request") for row in worker_step.rows)
        sent.update(data.request_id for data in worker_step.new_requests)
        dropped += worker_step.finished_request_ids
        batch.apply(worker_step)
        _mirror_matches(batch, out)
        if number == 10:  # as after a failed step: the next schedule sends these whole again
            builder.forget(item.request_id for item in out.scheduled)
        # "Run the model": what test_scheduler's step does after planning.
        from pagoda.core.scheduler_output import ModelRunnerOutput
        result = ModelRunnerOutput(sampled_token_ids={s.request_id: 7 for s in out.scheduled if s.samples})
        sched.update_from_output(out, result)
    assert not sched.has_unfinished()
    assert sched.num_preemptions_total > 0
    last = builder.build(sched.schedule())
    dropped += last.finished_request_ids
    batch.apply(last)
    assert sorted(dropped) == sorted(sent) and len(dropped) == len(set(dropped))  # each exactly once
    assert len(batch) == 0 and builder.num_known == 0


def test_deltas_carry_only_what_changed():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4),
                      KVCacheManager(32, BLOCK_SIZE), max_model_len=256)
    sched.add_request(make_request("a", 6, max_tokens=8))
    builder = WorkerStepBuilder()
    from pagoda.core.scheduler_output import ModelRunnerOutput

    def run(out):
        sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"a": 9}))

    out = sched.schedule()
    [new] = builder.build(out).new_requests  # the whole prompt, once
    assert new.request_id == "a" and new.token_ids == out.scheduled[0].request.prompt_token_ids
    run(out)
    for _ in range(5):
        out = sched.schedule()
        worker_step = builder.build(out)
        assert not worker_step.new_requests
        [row] = worker_step.rows
        assert row.new_token_ids == [9]  # only the token sampled last step
        assert row.block_ids is None  # the table only grew
        run(out)


def test_a_resynced_request_keeps_its_generator():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4),
                      KVCacheManager(32, BLOCK_SIZE), max_model_len=256)
    sched.add_request(make_request("s", 5, max_tokens=8, seed=3))
    builder, batch = WorkerStepBuilder(), InputBatch(BLOCK_SIZE, 256)
    batch.apply(builder.build(sched.schedule()))
    generator = batch.states["s"].generator
    torch.rand(3, generator=generator)  # it has drawn: its state is no longer the seed's
    state_before = generator.get_state()
    builder.forget(["s"])
    resent = builder.build(sched.schedule())
    assert [d.request_id for d in resent.new_requests] == ["s"]
    batch.apply(resent)
    assert batch.states["s"].generator is generator
    assert bool((generator.get_state() == state_before).all())


def test_the_batch_sampling_plan_equals_the_row_by_row_one():
    from pagoda.core.worker_step import NewRequestData
    from pagoda.sampling_params import SamplingParams
    from pagoda.worker.sampler import SamplingPlan

    kinds = [dict(temperature=0), dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=1),
             dict(temperature=0, logprobs=2), dict(temperature=1.0, n=2, best_of=3),
             dict(temperature=0, repetition_penalty=1.2), dict(temperature=0, logit_bias={3: 1.0}),
             dict(temperature=0, min_tokens=3), dict(temperature=0, min_tokens=1, ignore_eos=True),
             dict(use_beam_search=True, beam_width=2, temperature=0)]
    batch = InputBatch(BLOCK_SIZE, 64, initial_rows=2)  # grows on the way
    states = []
    for i, params in enumerate(kinds):
        prompt = [5, 6, 7]
        tokens = prompt + ([9] * (i % 3))  # some rows have output tokens already
        states.append(batch.add(NewRequestData(f"q{i}", tokens, len(prompt), SamplingParams(**params),
                                               frozenset({0}), [i])))
    order = states[::-1]
    planned, expected = batch.sampling_plan(order), SamplingPlan.from_rows(order)
    for name in ("random_rows", "beam_rows", "logprob_rows", "processing_rows"):
        assert getattr(planned, name) == getattr(expected, name), name
    for name in ("temperature", "top_k", "top_p", "min_p"):
        assert torch.equal(getattr(planned, name), getattr(expected, name)), name
