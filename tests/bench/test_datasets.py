"""Dataset loaders: random prompts of exact length, ShareGPT files, JSONL files."""

from __future__ import annotations

import json

import pytest

from pagoda.bench.datasets import (
    BenchRequest,
    DatasetError,
    jsonl_dataset,
    parse_length,
    random_dataset,
    sharegpt_dataset,
)
from tests.conftest import requires_smollm2


@pytest.fixture(scope="module")
def tokenizer():
    from pagoda.model.loader.loader import load_tokenizer
    from pagoda.model.loader.resolve import resolve_model

    return load_tokenizer(resolve_model("smollm2-135m-instruct"))


def test_parse_length():
    assert parse_length("256", "input_len") == (256, 256)
    assert parse_length("32:256", "input_len") == (32, 256)
    for bad in ("0", "9:3", "a:b", ""):
        with pytest.raises(DatasetError, match="input_len"):
            parse_length(bad, "input_len")


@requires_smollm2
def test_random_prompts_have_the_exact_token_length(tokenizer):
    requests = random_dataset(tokenizer, 12, (5, 300), (7, 9), seed=3)
    assert len(requests) == 12
    for r in requests:
        assert 5 <= r.prompt_len <= 300
        assert len(tokenizer.encode(r.prompt, add_special_tokens=False)) == r.prompt_len
        assert 7 <= r.output_len <= 9 and r.ignore_eos
    assert [r.prompt for r in random_dataset(tokenizer, 3, (20, 20), (4, 4), seed=1)] == \
           [r.prompt for r in random_dataset(tokenizer, 3, (20, 20), (4, 4), seed=1)]


@requires_smollm2
def test_sharegpt_takes_the_first_human_turn_and_filters(tokenizer, tmp_path):
    data = [
        {"conversations": [{"from": "human", "value": "Tell me about the moon and its phases please."},
                           {"from": "gpt", "value": "The moon has phases because of sunlight."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},  # too short
        {"conversations": [{"from": "human", "value": "Only one turn here, so it is skipped."}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    requests = sharegpt_dataset(path, tokenizer, num_prompts=10)
    assert len(requests) == 1
    assert requests[0].prompt.startswith("Tell me about the moon")
    assert requests[0].output_len == len(tokenizer.encode("The moon has phases because of sunlight."))
    fixed = sharegpt_dataset(path, tokenizer, num_prompts=10, output_len=(5, 5))
    assert fixed[0].output_len == 5 and fixed[0].ignore_eos
    with pytest.raises(DatasetError, match="does not exist"):
        sharegpt_dataset(tmp_path / "missing.json", tokenizer, 1)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not JSON"):
        sharegpt_dataset(tmp_path / "bad.json", tokenizer, 1)


def test_jsonl_accepts_strings_prompts_messages_and_full_bodies(tmp_path):
    lines = [
        json.dumps("just a prompt"),
        json.dumps({"prompt": "with fields", "max_tokens": 7, "temperature": 0.5}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True}),
        "",
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines))
    requests = jsonl_dataset(path, tokenizer=None)
    assert [r.output_len for r in requests] == [None, 7, 3]
    assert requests[1].extra_body == {"temperature": 0.5}
    assert requests[2].ignore_eos and isinstance(requests[2].prompt, list)

    body = requests[1].body("completions", "m")
    assert body["prompt"] == "with fields" and body["max_tokens"] == 7 and body["temperature"] == 0.5
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    chat = requests[2].body("chat", "m")
    assert chat["messages"] == [{"role": "user", "content": "hi"}] and chat["ignore_eos"] is True
    with pytest.raises(DatasetError, match="--api chat"):
        requests[2].body("completions", "m")
    assert BenchRequest("q", 1, 4).body("chat", "m")["messages"] == [{"role": "user", "content": "q"}]


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2"):
        jsonl_dataset(path, None)
    path.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: not JSON"):
        jsonl_dataset(path, None)
