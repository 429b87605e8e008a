"""The bounds on oneDNN's kernel caches (pagoda/worker/onednn_caches.py)."""

from __future__ import annotations

import pytest

from pagoda.worker.onednn_caches import CACHE_CAPACITY, bound_onednn_caches


def test_sets_both_capacities_but_keeps_a_users_value(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    assert bound_onednn_caches() == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(CACHE_CAPACITY),
                                     "LRU_CACHE_CAPACITY": "7"}


def test_refuses_capacities_that_break_torch(monkeypatch):
    with pytest.raises(ValueError, match="capacity=0"):
        bound_onednn_caches(0)
