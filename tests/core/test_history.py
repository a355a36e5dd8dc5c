"""Unit tests for wsd.core.history (per-channel history buffer and stream positions)."""

from __future__ import annotations

import dataclasses

import pytest

from wsd.core.history import HistoryBuffer, HistoryEntry, StreamPosition


def filled(n: int, size: int = 10, ttl: float = 100.0, epoch: str = "e1", now: float = 0.0) -> HistoryBuffer:
    """A buffer with payloads "m1".."mN" appended at ``now``."""
    buf = HistoryBuffer(size=size, ttl_s=ttl, epoch=epoch)
    for i in range(1, n + 1):
        buf.append(f"m{i}", now=now, wall=1_700_000_000.0 + i)
    return buf


def offsets(entries: list[HistoryEntry]) -> list[int]:
    """The offsets of a list of entries."""
    return [e.offset for e in entries]


def test_empty_buffer_position():
    """A new buffer is at offset 0 of its epoch and holds nothing."""
    buf = HistoryBuffer(size=5, ttl_s=10.0, epoch="abc")
    assert buf.position() == StreamPosition(0, "abc")
    assert buf.top_offset == 0 and len(buf) == 0


def test_stream_position_is_frozen_value():
    """StreamPosition compares by value and cannot be mutated."""
    pos = StreamPosition(3, "e")
    assert pos == StreamPosition(3, "e")
    with pytest.raises(dataclasses.FrozenInstanceError):
        pos.offset = 4  # type: ignore[misc]


def test_offsets_start_at_one_and_increase_monotonically():
    """append returns 1, 2, 3, ... and records wall, payload and expiry on the entry."""
    buf = HistoryBuffer(size=5, ttl_s=10.0, epoch="e1")
    assert [buf.append(f"p{i}", now=float(i), wall=100.0 + i) for i in range(3)] == [1, 2, 3]
    assert buf.top_offset == 3 and buf.position() == StreamPosition(3, "e1")
    entry = buf.last(1, now=2.0)[0]
    assert (entry.offset, entry.payload, entry.wall, entry.expires_at) == (3, "p2", 102.0, 12.0)


def test_offsets_are_not_reused_after_eviction():
    """Evicting entries never lowers or repeats an offset."""
    buf = HistoryBuffer(size=2, ttl_s=1.0, epoch="e1")
    buf.append("a", now=0.0, wall=0.0)
    buf.append("b", now=0.0, wall=0.0)
    buf.trim(5.0)
    assert len(buf) == 0 and buf.top_offset == 2
    assert buf.append("c", now=5.0, wall=0.0) == 3


def test_size_eviction_keeps_newest():
    """Beyond size the oldest entries are evicted."""
    buf = filled(7, size=3)
    assert len(buf) == 3
    assert offsets(buf.last(10, now=0.0)) == [5, 6, 7]


def test_size_zero_keeps_nothing_but_numbers_messages():
    """A size-0 buffer holds nothing but offsets still advance."""
    buf = filled(3, size=0)
    assert len(buf) == 0 and buf.top_offset == 3


def test_ttl_trim_drops_old_entries():
    """trim drops entries whose ttl has run out (expires_at <= now) and reports the count."""
    buf = HistoryBuffer(size=10, ttl_s=5.0, epoch="e1")
    buf.append("a", now=0.0, wall=0.0)
    buf.append("b", now=1.0, wall=0.0)
    buf.append("c", now=2.0, wall=0.0)
    assert buf.trim(4.9) == 0
    assert buf.trim(6.0) == 2
    assert offsets(buf.last(10, now=6.0)) == [3]
    assert buf.trim(7.0) == 1 and len(buf) == 0


def test_append_trims_expired_entries():
    """Appending also sheds entries past their ttl, so an idle-then-busy channel stays bounded."""
    buf = HistoryBuffer(size=10, ttl_s=1.0, epoch="e1")
    buf.append("a", now=0.0, wall=0.0)
    buf.append("b", now=5.0, wall=0.0)
    assert len(buf) == 1


def test_nonpositive_ttl_means_no_age_limit():
    """ttl_s <= 0 keeps entries until size evicts them."""
    buf = HistoryBuffer(size=3, ttl_s=0, epoch="e1")
    buf.append("a", now=0.0, wall=0.0)
    assert buf.trim(1e12) == 0 and len(buf) == 1


def test_negative_size_rejected():
    """A negative size is a programming error."""
    with pytest.raises(ValueError):
        HistoryBuffer(size=-1, ttl_s=1.0, epoch="e1")


def test_last_returns_newest_n_oldest_first():
    """last(n) is the newest n entries in publish order; n larger than held returns all."""
    buf = filled(5)
    assert offsets(buf.last(2, now=0.0)) == [4, 5]
    assert [e.payload for e in buf.last(3, now=0.0)] == ["m3", "m4", "m5"]
    assert offsets(buf.last(50, now=0.0)) == [1, 2, 3, 4, 5]
    assert buf.last(0, now=0.0) == []


def test_last_trims_first():
    """last() never returns entries past their ttl."""
    buf = HistoryBuffer(size=10, ttl_s=5.0, epoch="e1")
    buf.append("old", now=0.0, wall=0.0)
    buf.append("new", now=3.0, wall=0.0)
    assert [e.payload for e in buf.last(10, now=6.0)] == ["new"]


def test_since_exact_recovery():
    """since(offset) in the same epoch returns everything after it and recovered=True."""
    buf = filled(5)
    entries, recovered = buf.since(2, "e1", now=0.0)
    assert offsets(entries) == [3, 4, 5] and recovered


def test_since_zero_with_full_history_recovers():
    """A client at offset 0 recovers the whole stream while nothing has been evicted."""
    entries, recovered = filled(3).since(0, "e1", now=0.0)
    assert offsets(entries) == [1, 2, 3] and recovered


def test_since_at_top_is_recovered_and_empty():
    """A client already at top_offset has missed nothing."""
    assert filled(4).since(4, "e1", now=0.0) == ([], True)
    assert HistoryBuffer(size=5, ttl_s=1.0, epoch="e1").since(0, "e1", now=0.0) == ([], True)


def test_since_gap_after_size_eviction():
    """If the entry after offset was evicted by size, recovered=False and what is held is returned."""
    buf = filled(10, size=4)  # holds 7..10
    entries, recovered = buf.since(5, "e1", now=0.0)
    assert offsets(entries) == [7, 8, 9, 10] and not recovered
    entries, recovered = buf.since(6, "e1", now=0.0)
    assert offsets(entries) == [7, 8, 9, 10] and recovered


def test_since_gap_after_ttl_expiry():
    """If the entry after offset expired, recovered=False with the surviving entries."""
    buf = HistoryBuffer(size=10, ttl_s=5.0, epoch="e1")
    for i in range(4):
        buf.append(i, now=float(i), wall=0.0)  # offsets 1..4 expire at 5, 6, 7, 8
    entries, recovered = buf.since(1, "e1", now=6.0)
    assert offsets(entries) == [3, 4] and not recovered


def test_since_gap_with_everything_expired():
    """A client behind top whose missed entries all expired gets ([], False)."""
    buf = filled(3, ttl=1.0)
    assert buf.since(1, "e1", now=10.0) == ([], False)
    assert buf.since(3, "e1", now=10.0) == ([], True)


def test_since_epoch_change_returns_everything_unrecovered():
    """A different epoch means the stream restarted: recovered=False and the whole buffer comes back."""
    buf = filled(3, epoch="e2")
    entries, recovered = buf.since(2, "e1", now=0.0)
    assert offsets(entries) == [1, 2, 3] and not recovered
    entries, recovered = buf.since(99, "e1", now=0.0)
    assert offsets(entries) == [1, 2, 3] and not recovered


def test_since_offset_beyond_top_is_not_recovered():
    """An offset this epoch never reached is an invalid position: nothing returned, recovered=False."""
    assert filled(3).since(7, "e1", now=0.0) == ([], False)


def test_since_negative_offset_treated_as_zero():
    """A negative offset behaves like 0."""
    entries, recovered = filled(2).since(-5, "e1", now=0.0)
    assert offsets(entries) == [1, 2] and recovered


def test_since_limit_pages_oldest_first():
    """limit returns the oldest entries after offset and does not change recovered."""
    buf = filled(10, size=6)  # holds 5..10
    entries, recovered = buf.since(6, "e1", now=0.0, limit=2)
    assert offsets(entries) == [7, 8] and recovered
    entries, recovered = buf.since(1, "e1", now=0.0, limit=3)
    assert offsets(entries) == [5, 6, 7] and not recovered
    entries, recovered = buf.since(0, "other", now=0.0, limit=1)
    assert offsets(entries) == [5] and not recovered
    assert buf.since(6, "e1", now=0.0, limit=0) == ([], True)
    entries, _ = buf.since(8, "e1", now=0.0, limit=50)
    assert offsets(entries) == [9, 10]


# ------------------------------------------------------------------------------ HistoryStore
from wsd.core.history import HistoryStore  # noqa: E402


def test_store_frees_unused_instance_once_its_history_expired():
    """An instance without subscribers is freed by sweep once its newest message outlived the ttl."""
    used: set[str] = set()
    st = HistoryStore("e", max_instances=100, in_use=used.__contains__)
    st.append("a", "m", size=10, ttl_s=5.0, now=0.0, wall=0.0)
    st.append("b", "m", size=10, ttl_s=5.0, now=3.0, wall=0.0)
    used.add("c")
    st.append("c", "m", size=10, ttl_s=5.0, now=0.0, wall=0.0)
    assert st.sweep(4.9) == 0 and len(st) == 3
    assert st.sweep(5.0) == 1  # "a" expired; "c" expired too but has a subscriber
    assert "a" not in st and "b" in st and "c" in st and st.expired == 1
    assert st.sweep(8.0) == 1 and "b" not in st and len(st) == 1


def test_store_never_frees_an_instance_without_ttl_by_age():
    """history_ttl_s 0 (no age limit): only the cap can free it."""
    st = HistoryStore("e", max_instances=10)
    st.append("a", "m", size=10, ttl_s=0, now=0.0, wall=0.0)
    assert st.sweep(1e9) == 0 and "a" in st


def test_store_cap_evicts_least_recently_used_instance_without_subscribers():
    """At the cap, creating an instance frees the least recently used one that has no subscriber."""
    used = {"a"}
    st = HistoryStore("e", max_instances=3, in_use=used.__contains__)
    for ch in ("a", "b", "c"):
        st.append(ch, "m", size=10, ttl_s=100.0, now=0.0, wall=0.0)
    st.get("b", touch=True)  # b was read: c is now the least recently used without subscribers
    st.append("d", "m", size=10, ttl_s=100.0, now=1.0, wall=0.0)
    assert len(st) == 3 and "c" not in st and {"a", "b", "d"} == {n for n, _ in st.items()}
    assert st.evicted == 1


def test_store_exceeds_cap_rather_than_dropping_subscribed_instances():
    """When every instance has subscribers, none is freed."""
    st = HistoryStore("e", max_instances=2, in_use=lambda ch: True)
    for ch in ("a", "b", "c"):
        st.append(ch, "m", size=10, ttl_s=100.0, now=0.0, wall=0.0)
    assert len(st) == 3 and st.evicted == 0


def test_recreated_instance_never_reuses_offsets_under_the_same_epoch():
    """After an instance is freed, its re-creation counts from 1 in a new epoch: an old position is not
    recovered, and never yields a message under an offset the client already had."""
    st = HistoryStore("e", max_instances=1)
    buf = st.append("a", "old1", size=10, ttl_s=100.0, now=0.0, wall=0.0)
    st.append("a", "old2", size=10, ttl_s=100.0, now=0.0, wall=0.0)
    old = buf.position()
    assert old == StreamPosition(2, "e")
    st.append("b", "x", size=10, ttl_s=100.0, now=0.0, wall=0.0)  # cap 1: "a" is freed
    assert "a" not in st
    new = st.append("a", "new1", size=10, ttl_s=100.0, now=1.0, wall=0.0)
    assert new.top_offset == 1 and new.epoch != old.epoch
    st.append("a", "new2", size=10, ttl_s=100.0, now=1.0, wall=0.0)
    st.append("a", "new3", size=10, ttl_s=100.0, now=1.0, wall=0.0)
    entries, recovered = new.since(old.offset, old.epoch, now=1.0)
    assert recovered is False
    assert [e.payload for e in entries] == ["new1", "new2", "new3"]  # everything held, flagged as a break


def test_store_churn_of_distinct_names_stays_flat():
    """Ten thousand distinct channel names through a store capped at 100 never hold more than 100."""
    st = HistoryStore("e", max_instances=100)
    for i in range(10_000):
        st.append(f"ch{i}", "m", size=5, ttl_s=10.0, now=i * 0.001, wall=0.0)
        assert len(st) <= 100
    assert st.evicted == 9_900
    assert st.sweep(100.0) == 100 and len(st) == 0


def test_store_at_the_cap_with_every_instance_subscribed_does_not_rescan_them_per_creation():
    """With more subscribed instances than the cap, creating instance after instance must not look at every
    subscribed one each time (that cost 44 ms per creation at 10,000): each is set aside once, and only the
    unsubscribed ones are candidates for eviction."""
    used: set[str] = set()
    calls = 0

    def in_use(ch: str) -> bool:
        nonlocal calls
        calls += 1
        return ch in used

    st = HistoryStore("e", max_instances=1000, in_use=in_use)
    for i in range(1000):
        st.append(f"sub{i}", "m", size=1, ttl_s=100.0, now=0.0, wall=0.0)
        used.add(f"sub{i}")
    for i in range(2000):
        st.append(f"new{i}", "m", size=1, ttl_s=100.0, now=0.0, wall=0.0)
    assert calls < 1000 + 2 * 2000, calls
    assert len(st) == 1001 and st.evicted == 1999 and all(f"sub{i}" in st for i in range(1000))
    # once unsubscribed, a set-aside instance is a candidate again: least recently used first
    used.clear()
    st.sweep(now=0.0)  # nothing expired: nothing freed, but nothing is pinned any more
    assert len(st) == 1001
    st.append("last", "m", size=1, ttl_s=100.0, now=0.0, wall=0.0)
    assert len(st) == 1000 and "new1999" not in st and "sub0" not in st and "sub1" in st  # in use until now
    # and an instance nobody uses, whose history has expired, is freed by the sweep whether set aside or not
    assert st.sweep(now=200.0) == 1000 and len(st) == 0
