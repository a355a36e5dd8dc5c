"""Unit tests for wsd.core.sessions (the bounded store of disconnected sessions), with a hand-moved clock."""

from __future__ import annotations

import pytest

from wsd.core.sessions import SessionStore, SessionTooLarge


def test_expired_sessions_are_freed_by_the_sweep_not_only_on_load():
    """sweep frees every expired session (counted) and keeps live ones."""
    s = SessionStore(max_total=100, max_per_owner=100, max_bytes=1000)
    for i in range(5):
        s.save(f"s{i}", "acme/alice", b"x" * 10, expires_at=10.0 + i)
    assert s.sweep(9.9) == 0 and len(s) == 5
    assert s.sweep(12.0) == 3  # s0, s1, s2 expired at 10, 11, 12
    assert len(s) == 2 and s.expired == 3 and s.bytes == 20
    assert s.load("s3", 12.5) == b"x" * 10
    assert s.load("s3", 13.0) is None and s.expired == 4  # expired on load: freed too
    assert "s3" not in s


def test_per_owner_limit_evicts_that_owners_oldest_only():
    """Beyond max_per_owner, the owner's oldest session goes; other owners keep theirs."""
    s = SessionStore(max_total=100, max_per_owner=2, max_bytes=1000)
    s.save("b1", "acme/bob", b"b", 100.0)
    s.save("a1", "acme/alice", b"a", 100.0)
    s.save("a2", "acme/alice", b"a", 100.0)
    assert s.save("a3", "acme/alice", b"a", 100.0) == 1
    assert "a1" not in s and {"a2", "a3", "b1"} <= {k for k in ("a1", "a2", "a3", "b1") if k in s}
    assert s.evicted == 1 and len(s) == 3


def test_total_limit_evicts_the_oldest_overall():
    """Beyond max_total, the oldest session of anyone goes first."""
    s = SessionStore(max_total=3, max_per_owner=10, max_bytes=1000)
    for i in range(3):
        s.save(f"s{i}", f"acme/u{i}", b"x", 100.0)
    assert s.save("s3", "acme/u3", b"x", 100.0) == 1
    assert "s0" not in s and len(s) == 3 and s.owners() == 3 and s.evicted == 1


def test_resaving_an_id_replaces_it_without_eviction():
    """Saving the same id again replaces it (it becomes the newest) and evicts nothing."""
    s = SessionStore(max_total=2, max_per_owner=2, max_bytes=1000)
    s.save("a", "o", b"1", 100.0)
    s.save("b", "o", b"2", 100.0)
    assert s.save("a", "o", b"333", 100.0) == 0
    assert s.load("a", 0.0) == b"333" and s.bytes == 4
    s.save("c", "o", b"4", 100.0)  # now "b" is the oldest
    assert "b" not in s and "a" in s


def test_too_large_session_is_refused_and_nothing_is_kept():
    """A blob over max_bytes raises, is counted, and leaves no session (an older one under that id is gone)."""
    s = SessionStore(max_total=10, max_per_owner=10, max_bytes=8)
    s.save("a", "o", b"small", 100.0)
    with pytest.raises(SessionTooLarge):
        s.save("a", "o", b"x" * 9, 100.0)
    assert "a" not in s and len(s) == 0 and s.refused == 1 and s.bytes == 0 and s.owners() == 0


def test_churn_of_distinct_owners_stays_flat():
    """Thousands of owners each leaving a session: the store never holds more than max_total."""
    s = SessionStore(max_total=50, max_per_owner=5, max_bytes=100)
    for i in range(5000):
        s.save(f"s{i}", f"acme/u{i}", b"x", float(i) + 10.0)
        assert len(s) <= 50
    assert s.evicted == 4950 and s.owners() == 50
    assert s.sweep(1e9) == 50 and len(s) == 0 and s.owners() == 0 and s.bytes == 0


def test_total_bytes_limit_evicts_the_oldest_until_the_new_one_fits():
    """The sessions together stay within max_total_bytes: the oldest go first, as many as needed."""
    s = SessionStore(max_total=100, max_per_owner=100, max_bytes=100, max_total_bytes=100)
    for i in range(4):
        s.save(f"s{i}", f"acme/u{i}", b"x" * 25, 100.0)
    assert s.bytes == 100 and s.evicted == 0
    assert s.save("big", "acme/v", b"y" * 60, 100.0) == 3  # s0, s1, s2 make room for 60
    assert [k for k in ("s0", "s1", "s2", "s3", "big") if k in s] == ["s3", "big"]
    assert s.bytes == 85 and s.evicted == 3
    for i in range(200):
        s.save(f"t{i}", f"acme/w{i}", b"z" * 30, 100.0)
        assert s.bytes <= 100
    with pytest.raises(SessionTooLarge):  # larger than the whole budget: refused, nothing evicted for it
        s.save("huge", "acme/h", b"h" * 101, 100.0)
    assert s.refused == 1 and s.bytes == 90
