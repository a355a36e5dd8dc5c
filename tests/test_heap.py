"""The heap trimmer: malloc_trim at most once per interval of the clock it is given."""

from __future__ import annotations

import pytest

from wsd.runtime import heap


@pytest.mark.skipif(heap._malloc_trim is None, reason="this C library has no malloc_trim (not glibc)")
def test_trims_at_most_once_per_interval():
    t = heap.HeapTrimmer(interval_s=30.0)
    assert t.maybe_trim(100.0) is True
    assert t.maybe_trim(100.5) is False and t.maybe_trim(129.9) is False
    assert t.maybe_trim(130.0) is True
    assert t.trims == 2


def test_without_malloc_trim_nothing_is_done(monkeypatch):
    monkeypatch.setattr(heap, "_malloc_trim", None)
    t = heap.HeapTrimmer()
    assert t.maybe_trim(1e9) is False and t.trims == 0
