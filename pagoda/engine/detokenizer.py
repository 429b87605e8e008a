"""Incremental detokenization with stop strings.

Decoding one token at a time is wrong for byte-level BPE (a character can
span tokens) and for SentencePiece (spaces depend on the previous token).
So, like vLLM, we decode a short window: `ids[prefix_offset:read_offset]`
is text already emitted, `ids[prefix_offset:]` the same plus the new
tokens; the difference is the new text. While the new text ends in an
incomplete UTF-8 sequence ("\ufffd") we wait for more tokens. The window
starts with a few prompt tokens so the first output token is decoded in
context.

Stop strings: the text is cut right before the first stop string found
(kept if `include_stop_str_in_output`). While a request runs, the last
`max_stop_len - 1` characters are held back from streamed text, since they
could be the start of a stop string. Whether a match ends the request, and
when stop strings are looked for at all (not before `min_tokens`), is
decided by `Request.check_stop`, the one home of stop conditions.
"""

from __future__ import annotations

from pagoda.sampling_params import SamplingParams

_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""
        self.stop_reason: str | None = None
        self._stops = params.stop_strings
        self._holdback = 0 if params.include_stop_str_in_output else max((len(s) for s in self._stops), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens)

    def add_tokens(self, token_ids: list[int], match_stops: bool = True) -> bool:
        """Appends new tokens; returns True if a stop string matched. With `match_stops` False
        the text grows but no stop string is looked for in it (before `min_tokens`)."""
        if self.tokenizer is None:
            return False
        for token_id in token_ids:
            self._ids.append(token_id)
            prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
            new_text = self._decode(self._ids[self._prefix_offset :])
            if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
                continue  # incomplete character: wait for the next token
            delta = new_text[len(prefix_text) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            if self._append(delta, match_stops):
                return True
        return False

    def flush(self) -> None:
        """At the end: emit whatever the remaining tokens decode to, even if incomplete.
        The request has already ended: no stop string is looked for in this last piece."""
        if self.tokenizer is None or self.stop_reason is not None:
            return
        if self._read_offset < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
            new_text = self._decode(self._ids[self._prefix_offset :])
            self._append(new_text[len(prefix_text) :], match_stops=False)
            self._prefix_offset = self._read_offset = len(self._ids)

    def _append(self, delta: str, match_stops: bool) -> bool:
        start = max(0, len(self.text) - max((len(s) for s in self._stops), default=0) + 1)
        self.text += delta
        if not match_stops:
            return False
        matches = [(self.text.find(stop, start), stop) for stop in self._stops]
        matches = [(index, stop) for index, stop in matches if index != -1]
        if not matches:
            return False
        index, stop = min(matches)  # the earliest stop string in the text wins
        end = index + len(stop) if self.params.include_stop_str_in_output else index
        self.text = self.text[:end]
        self.stop_reason = stop
        return True

    def visible_text(self, finished: bool) -> str:
        """Text safe to show so far (holds back a possible stop-string start)."""
        if finished or not self._holdback:
            return self.text
        return self.text[: max(0, len(self.text) - self._holdback)]
