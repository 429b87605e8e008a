"""Benchmark datasets: what each request sends.

- random:   prompts of exact token lengths (or lengths drawn from a range),
            built from random token ids with the tokenizer so the server sees
            the intended length; fixed output lengths with ignore_eos.
- sharegpt: a local JSON file in ShareGPT's format (a list of
            {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]});
            the first human turn is the prompt, the reply's token count the
            output length (unless --output-len fixes it).
- jsonl:    one request per line: a string (the prompt), or an object with
            "prompt" or "messages"; any other fields (max_tokens, temperature,
            ...) are sent as they are, so a line can be a full request body.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path


class DatasetError(ValueError):
    pass


@dataclass
class BenchRequest:
    prompt: str | list[dict]  # text (completions) or chat messages
    prompt_len: int  # tokens, as counted by the tokenizer (0 when unknown)
    output_len: int | None  # max_tokens; None leaves it to the server
    ignore_eos: bool = False
    extra_body: dict = field(default_factory=dict)

    def body(self, api: str, model: str) -> dict:
        """The request body for `api` ("chat" or "completions")."""
        body: dict = {"model": model}
        if api == "chat":
            messages = self.prompt if isinstance(self.prompt, list) else [{"role": "user", "content": self.prompt}]
            body["messages"] = messages
        else:
            if isinstance(self.prompt, list):
                raise DatasetError("a chat-messages request cannot go to the completions API; use --api chat")
            body["prompt"] = self.prompt
        if self.output_len is not None:
            body["max_tokens"] = self.output_len
        if self.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.extra_body)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        return body


def parse_length(text: str | int, name: str) -> tuple[int, int]:
    """`256` -> (256, 256); `32:256` -> (32, 256)."""
    low, sep, high = str(text).partition(":")
    try:
        bounds = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise DatasetError(f"{name}={text!r}: expected N or MIN:MAX token counts") from None
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise DatasetError(f"{name}={text!r}: need 1 <= MIN <= MAX")
    return bounds


def _special_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def exact_length_text(tokenizer, length: int, rng: random.Random) -> tuple[str, int]:
    """Text that the tokenizer encodes to `length` tokens (or as near as a tokenizer allows)."""
    special = _special_ids(tokenizer)
    vocab = len(tokenizer)
    candidates = [t for t in range(min(vocab, 100_000)) if t not in special]
    ids = [rng.choice(candidates) for _ in range(length)]
    text = tokenizer.decode(ids)
    for _ in range(10):  # decode/encode does not round-trip exactly; trim or pad until it does
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == length:
            break
        if len(encoded) > length:
            encoded = encoded[:length]
        else:
            encoded = encoded + [rng.choice(candidates) for _ in range(length - len(encoded))]
        text = tokenizer.decode(encoded)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def random_dataset(tokenizer, num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int],
                   seed: int = 0) -> list[BenchRequest]:
    if tokenizer is None:
        raise DatasetError("the random dataset needs a tokenizer (--tokenizer)")
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        text, length = exact_length_text(tokenizer, rng.randint(*input_len), rng)
        requests.append(BenchRequest(text, length, rng.randint(*output_len), ignore_eos=True))
    return requests


def sharegpt_dataset(path: str | Path, tokenizer, num_prompts: int, output_len: tuple[int, int] | None = None,
                     seed: int = 0, max_prompt_len: int = 1024, max_total_len: int = 2048) -> list[BenchRequest]:
    """Conversations whose prompt has >= 4 tokens, prompt <= max_prompt_len and prompt + reply <= max_total_len."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DatasetError(f"dataset_path={str(path)!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise DatasetError(f"dataset_path={str(path)!r} is not JSON: {error}") from None
    if not isinstance(data, list):
        raise DatasetError(f"dataset_path={str(path)!r}: expected a list of conversations")
    rng = random.Random(seed)
    order = list(range(len(data)))
    rng.shuffle(order)
    requests = []
    for index in order:
        turns = data[index].get("conversations") or data[index].get("conversation") or []
        if len(turns) < 2 or not isinstance(turns[0], dict):
            continue
        prompt, reply = turns[0].get("value", ""), turns[1].get("value", "")
        prompt_len = len(tokenizer.encode(prompt)) if tokenizer is not None else 0
        reply_len = len(tokenizer.encode(reply)) if tokenizer is not None else max(1, len(reply) // 4)
        out = rng.randint(*output_len) if output_len else reply_len
        if tokenizer is not None and (prompt_len < 4 or prompt_len > max_prompt_len
                                      or prompt_len + out > max_total_len):
            continue
        if out < 1:
            continue
        requests.append(BenchRequest(prompt, prompt_len, out, ignore_eos=output_len is not None))
        if len(requests) == num_prompts:
            break
    if not requests:
        raise DatasetError(f"dataset_path={str(path)!r}: no usable conversation (prompt >= 4 tokens, "
                           f"<= {max_prompt_len}, prompt + reply <= {max_total_len})")
    return requests


def jsonl_dataset(path: str | Path, tokenizer, num_prompts: int | None = None,
                  output_len: tuple[int, int] | None = None, seed: int = 0) -> list[BenchRequest]:
    rng = random.Random(seed)
    requests = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise DatasetError(f"dataset_path={str(path)!r} does not exist") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}:{number}: not JSON: {error}") from None
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or not ("prompt" in item or "messages" in item):
            raise DatasetError(f"{path}:{number}: expected a string or an object with 'prompt' or 'messages'")
        extra = {k: v for k, v in item.items() if k not in ("prompt", "messages", "model", "stream",
                                                             "stream_options", "max_tokens")}
        prompt = item.get("messages", item.get("prompt"))
        if isinstance(prompt, list):
            text = " ".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
        else:
            text = str(prompt)
        prompt_len = len(tokenizer.encode(text)) if tokenizer is not None else 0
        out = item.get("max_tokens")
        if output_len is not None:
            out = rng.randint(*output_len)
        requests.append(BenchRequest(prompt, prompt_len, out, ignore_eos=bool(extra.pop("ignore_eos", False)),
                                     extra_body=extra))
        if num_prompts is not None and len(requests) == num_prompts:
            break
    if not requests:
        raise DatasetError(f"dataset_path={str(path)!r} has no requests")
    return requests
