"""Scheduler lookahead slots (draft-model speculation): a chunk that samples gets k slots past
its tokens for the draft's proposals, in the same allocation, never by preempting anyone;
after the step only the next token's slot is kept. And the speculator's use of proposals."""

from __future__ import annotations

from pagoda.core.scheduler_output import ModelRunnerOutput
from pagoda.engine.spec_decode.config import SpeculativeConfig
from pagoda.engine.spec_decode.speculator import Speculator
from tests.unit.test_scheduler import make_request, make_scheduler


def decode_until(scheduler, request, num_tokens: int) -> None:
    """Runs `request` alone, sampling token 7 each step, until it holds `num_tokens` tokens."""
    while request.num_tokens < num_tokens:
        out = scheduler.schedule()
        scheduler.update_from_output(out, ModelRunnerOutput(sampled_token_ids={request.request_id: 7}))


def test_lookahead_slots_are_allocated_then_released():
    scheduler = make_scheduler(num_blocks=8, block_size=4, budget=64)
    request = make_request("a", 6, max_tokens=50)
    scheduler.add_request(request)
    decode_until(scheduler, request, 8)  # 8 tokens, 7 computed: 2 blocks
    kv = scheduler.kv_cache
    assert len(kv.block_table("a")) == 2
    request.spec_lookahead = 3
    request.spec_token_ids = [5, 6]
    out = scheduler.schedule()
    [item] = out.scheduled
    # Positions 7..9 (pending + 2 drafts), then 3 lookahead slots: 13 tokens' worth of blocks.
    assert (item.start, item.num_new_tokens, item.num_lookahead_tokens) == (7, 3, 3)
    assert len(item.block_table) == 4 == len(kv.block_table("a"))
    # One draft accepted, then the target's own token: 10 tokens, 9 computed; room for the 10th only.
    scheduler.update_from_output(out, ModelRunnerOutput(spec_token_ids={"a": [5, 9]}))
    assert (request.num_tokens, request.num_computed_tokens) == (10, 9)
    assert len(kv.block_table("a")) == 3
    # A decode without drafts keeps the slot of its next token only, too.
    request.spec_lookahead, request.spec_token_ids = 3, []
    out = scheduler.schedule()
    assert out.scheduled[0].num_lookahead_tokens == 3 and len(kv.block_table("a")) == 4
    scheduler.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"a": 7}))
    assert request.num_computed_tokens == 10 and len(kv.block_table("a")) == 3


def test_lookahead_never_preempts_and_stops_at_max_model_len():
    scheduler = make_scheduler(num_blocks=4, block_size=4, budget=64, max_model_len=14)
    old, young = make_request("old", 7, max_tokens=50), make_request("young", 7, max_tokens=50)
    scheduler.add_request(old)
    scheduler.add_request(young)
    out = scheduler.schedule()  # both prefill: 2 blocks each, the pool is full
    scheduler.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"old": 7, "young": 7}))
    old.spec_lookahead, old.spec_token_ids = 4, [1, 2]
    out = scheduler.schedule()
    by_id = {item.request_id: item for item in out.scheduled}
    # No free block for old's drafts and lookahead: it runs without them, and young still runs.
    assert by_id["old"].spec_token_ids == [] and by_id["old"].num_lookahead_tokens == 0
    assert set(by_id) == {"old", "young"} and out.num_preempted == 0
    scheduler.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"old": 7, "young": 7}))
    scheduler.abort_requests(["young"])
    old.spec_lookahead = 7
    out = scheduler.schedule()  # 9 tokens + 2 drafts: writes positions 8..10; lookahead up to max_model_len 14
    assert out.scheduled[0].spec_token_ids == [1, 2] and out.scheduled[0].num_lookahead_tokens == 14 - 11


def test_speculator_uses_a_proposal_only_for_the_length_it_was_made_for():
    speculator = Speculator(SpeculativeConfig(method="draft_model", num_speculative_tokens=3,
                                              max_tokens_per_step=8, step_cost=(1.0,)))  # drafts free: all used
    request = make_request("r", 6, max_tokens=50)
    request.num_computed_tokens = request.num_tokens - 1
    request.spec_proposal, request.spec_proposal_at = [4, 5, 6], request.num_tokens
    speculator.propose([request])
    assert request.spec_token_ids == [4, 5, 6] and request.spec_lookahead == 3
    request.spec_proposal_at = request.num_tokens - 1  # made before the last token: stale
    speculator.propose([request])
    assert request.spec_token_ids == [] and request.spec_lookahead == 3
    # max_tokens bounds both: 2 more tokens at most, so 1 draft now and none proposed for later.
    near_end = make_request("e", 6, max_tokens=3)
    near_end.append_output_token(7)
    near_end.num_computed_tokens = near_end.num_tokens - 1
    near_end.spec_proposal, near_end.spec_proposal_at = [4, 5, 6], near_end.num_tokens
    speculator.propose([near_end])
    assert near_end.spec_token_ids == [4] and near_end.spec_lookahead == 0
    # LoRA, structured outputs, disabled requests: no lookahead, no drafts.
    request.spec_disabled = True
    request.spec_proposal_at = request.num_tokens
    speculator.propose([request])
    assert request.spec_token_ids == [] and request.spec_lookahead == 0
