"""One sequence's grammar state: the compile it waits for, then its own matcher.

Lives on the engine's `Request` (`Request.structured_output`). The scheduler does not
admit a request whose grammar is still compiling (`ready` is False; vLLM's
WAITING_FOR_FSM); once the compile is done the manager gives it a `GrammarMatcher`, which
accepts every token the request is given, right after its step (scheduler
`update_from_output`). The matcher's state therefore always corresponds to the request's
output tokens: preemption (recompute or swap) keeps the output tokens, so it keeps the
matcher as it is; an undone step appended nothing, so it advanced nothing.
"""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import xgrammar as xgr


class GrammarRejectedToken(ValueError):
    """The matcher refused a sampled token: the mask was not applied (a bug), so the request fails."""


class StructuredOutputRequest:
    def __init__(self, key: tuple, compiled: Future):
        self.key = key
        self.compiled = compiled  # Future[xgr.CompiledGrammar], shared by every request of the same key
        self.matcher: xgr.GrammarMatcher | None = None

    @property
    def ready(self) -> bool:
        """The matcher exists: the request may be scheduled."""
        return self.matcher is not None

    def start_matching(self) -> None:
        """The compile is done (successfully): make this sequence's matcher."""
        self.matcher = xgr.GrammarMatcher(self.compiled.result())

    def accept_token(self, token_id: int) -> None:
        if not self.matcher.accept_token(token_id):
            raise GrammarRejectedToken(f"the grammar refused token {token_id}")

    def at_dead_end(self) -> bool:
        """No token can continue the output (the vocabulary cannot finish the grammar from here).
        Asked only after a failure: it fills a bitmask."""
        if self.matcher is None or self.matcher.is_terminated():
            return False
        vocab_size = self.compiled.result().tokenizer_info.vocab_size
        bitmask = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)
        self.matcher.fill_next_token_bitmask(bitmask, 0)
        return not bitmask.any()

    @property
    def is_terminated(self) -> bool:
        """The grammar has accepted its end (a stop token): the request is finished."""
        return self.matcher is not None and self.matcher.is_terminated()
