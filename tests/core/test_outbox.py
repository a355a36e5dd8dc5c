"""Unit and property tests for wsd.core.outbox (priority queue, expiry, overflow)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsd.core.outbox import Outbox, Priority

C, H, N, L = Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW


def drain(box: Outbox, now: float = 0.0) -> list[object]:
    """Pop everything and return the items in pop order."""
    out = []
    while (got := box.pop(now)) is not None:
        out.append(got[0])
    return out


# --- Priority.parse -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [("critical", C), ("HIGH", H), ("Normal", N), ("low", L), (0, C), (3, L), (Priority.HIGH, H)],
)
def test_priority_parse_accepts_names_and_ints(value, expected):
    """Names in any case and ints 0..3 parse to the matching Priority."""
    assert Priority.parse(value) is expected


@pytest.mark.parametrize("value", ["urgent", "", " high", 4, -1, True, 1.0, None, "2"])
def test_priority_parse_rejects_everything_else(value):
    """Unknown names, out-of-range ints, bools, floats and None raise ValueError."""
    with pytest.raises(ValueError):
        Priority.parse(value)


def test_priority_order_is_critical_first():
    """A lower number is a more important priority."""
    assert C < H < N < L


# --- ordering --------------------------------------------------------------------------------------


def test_pop_returns_highest_priority_first():
    """Items come out critical, high, normal, low regardless of push order."""
    box = Outbox(10)
    for item, prio in [("l", L), ("n", N), ("c", C), ("h", H)]:
        assert box.push(item, prio) is None
    assert [box.pop(0.0) for _ in range(4)] == [("c", C), ("h", H), ("n", N), ("l", L)]
    assert box.pop(0.0) is None


def test_fifo_within_a_priority():
    """Items of one priority come out in push order, interleaved pushes notwithstanding."""
    box = Outbox(10)
    box.push("n1", N)
    box.push("h1", H)
    box.push("n2", N)
    box.push("h2", H)
    box.push("n3", N)
    assert drain(box) == ["h1", "h2", "n1", "n2", "n3"]


def test_pop_returns_priority_enum_member():
    """The priority half of a popped pair is a Priority member equal to the pushed int."""
    box = Outbox(2)
    box.push("x", 1)
    item, prio = box.pop(0.0)
    assert prio is Priority.HIGH and prio == 1


def test_push_rejects_out_of_range_priority():
    """A priority outside 0..3 is refused rather than silently filed."""
    box = Outbox(2)
    with pytest.raises(ValueError):
        box.push("x", 4)
    with pytest.raises(ValueError):
        box.push("x", -1)
    assert len(box) == 0


def test_capacity_must_be_positive():
    """An Outbox needs room for at least one item."""
    with pytest.raises(ValueError):
        Outbox(0)


def test_len_bool_and_depth_by_priority():
    """len, truthiness and per-priority depth follow pushes and pops."""
    box = Outbox(10)
    assert not box and len(box) == 0 and box.depth_by_priority() == (0, 0, 0, 0)
    box.push("a", C)
    box.push("b", N)
    box.push("c", N)
    assert box and len(box) == 3 and box.depth_by_priority() == (1, 0, 2, 0)
    box.pop(0.0)
    assert box.depth_by_priority() == (0, 0, 2, 0)


def test_peek_priority():
    """peek_priority names the most important non-empty class, or None when empty."""
    box = Outbox(10)
    assert box.peek_priority() is None
    box.push("l", L)
    assert box.peek_priority() == L
    box.push("h", H)
    assert box.peek_priority() == H
    box.pop(0.0)
    assert box.peek_priority() == L


# --- expiry ----------------------------------------------------------------------------------------


def test_pop_skips_and_counts_expired_items():
    """pop drops items whose expires_at <= now, counts them and returns the next live one."""
    box = Outbox(10)
    box.push("old", H, expires_at=5.0)
    box.push("edge", H, expires_at=6.0)
    box.push("live", H, expires_at=100.0)
    box.push("forever", N)
    assert box.pop(6.0) == ("live", H)
    assert box.dropped_expired == 2
    assert box.pop(1e9) == ("forever", N)
    assert box.dropped_expired == 2 and len(box) == 0


def test_pop_of_only_expired_items_returns_none():
    """When everything left has expired, pop empties the queue and returns None."""
    box = Outbox(10)
    box.push("a", C, expires_at=1.0)
    box.push("b", L, expires_at=1.0)
    assert box.pop(1.0) is None
    assert box.dropped_expired == 2 and len(box) == 0


def test_item_not_yet_expired_is_delivered():
    """An item is live while now < expires_at."""
    box = Outbox(10)
    box.push("a", N, expires_at=2.0)
    assert box.pop(1.999) == ("a", N)
    assert box.dropped_expired == 0


def test_overflow_drops_oldest_of_lowest_priority():
    """When full, the oldest item of the least important class present is dropped and counted."""
    box = Outbox(4)
    box.push("n1", N)
    box.push("l1", L)
    box.push("l2", L)
    box.push("h1", H)
    assert box.push("c1", C) == "l1"
    assert box.push("c2", C) == "l2"
    assert box.push("c3", C) == "n1"
    assert box.dropped_overflow == 3 and len(box) == 4
    assert drain(box) == ["c1", "c2", "c3", "h1"]


def test_overflow_with_equal_priority_drops_oldest_of_that_priority():
    """A full queue of one class makes room by dropping its oldest member."""
    box = Outbox(2)
    box.push("n1", N)
    box.push("n2", N)
    assert box.push("n3", N) == "n1"
    assert box.dropped_overflow == 1
    assert drain(box) == ["n2", "n3"]


def test_overflow_when_all_queued_are_more_important_drops_the_new_item():
    """If every queued item outranks the newcomer, the newcomer itself is dropped and counted."""
    box = Outbox(2)
    box.push("c1", C)
    box.push("h1", H)
    assert box.push("n1", N) == "n1"
    assert box.push("l1", L) == "l1"
    assert box.dropped_overflow == 2 and len(box) == 2
    assert drain(box) == ["c1", "h1"]


def test_overflow_victim_may_be_an_expired_item():
    """Overflow does not know the time: an expired victim counts as overflow, not expiry."""
    box = Outbox(1)
    box.push("stale", L, expires_at=1.0)
    assert box.push("fresh", L) == "stale"
    assert box.dropped_overflow == 1 and box.dropped_expired == 0


# --- pop_many / drain_all --------------------------------------------------------------------------


def test_pop_many_respects_limit_and_order():
    """pop_many returns up to limit live items in pop order and leaves the rest queued."""
    box = Outbox(10)
    for item, prio in [("n1", N), ("c1", C), ("l1", L), ("h1", H), ("n2", N)]:
        box.push(item, prio)
    assert box.pop_many(0.0, 3) == [("c1", C), ("h1", H), ("n1", N)]
    assert len(box) == 2
    assert box.pop_many(0.0, 10) == [("n2", N), ("l1", L)]
    assert box.pop_many(0.0, 10) == []


def test_pop_many_skips_expired_without_spending_limit():
    """Expired items are dropped and counted and do not count towards limit."""
    box = Outbox(10)
    box.push("x1", N, expires_at=1.0)
    box.push("a", N)
    box.push("x2", N, expires_at=1.0)
    box.push("b", N)
    assert box.pop_many(2.0, 2) == [("a", N), ("b", N)]
    assert box.dropped_expired == 2 and len(box) == 0


def test_pop_many_nonpositive_limit_takes_nothing():
    """A limit of 0 returns an empty list and leaves the queue alone."""
    box = Outbox(10)
    box.push("a", N)
    assert box.pop_many(0.0, 0) == []
    assert len(box) == 1


def test_drain_all_returns_everything_including_expired():
    """drain_all empties the queue in pop order, expired items included, without counting drops."""
    box = Outbox(10)
    box.push("n1", N, expires_at=1.0)
    box.push("c1", C)
    box.push("l1", L)
    assert box.drain_all() == [("c1", C), ("n1", N), ("l1", L)]
    assert len(box) == 0 and box.dropped_expired == 0 and box.dropped_overflow == 0
    assert box.pop(100.0) is None


# --- property --------------------------------------------------------------------------------------

class _Model:
    """Obviously-correct list model of the Outbox: entries (priority, seq, expires_at) in queue."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: list[tuple[int, int, float | None]] = []
        self.dropped_overflow = 0
        self.dropped_expired = 0

    def ordered(self) -> list[tuple[int, int, float | None]]:
        """Entries in delivery order: priority, then push order."""
        return sorted(self.entries, key=lambda e: (e[0], e[1]))

    def push(self, seq: int, prio: int, exp: float | None) -> int | None:
        """Model of Outbox.push."""
        dropped = None
        if len(self.entries) >= self.capacity:
            self.dropped_overflow += 1
            low = max(e[0] for e in self.entries)
            if low < prio:
                return seq
            victim = min((e for e in self.entries if e[0] == low), key=lambda e: e[1])
            self.entries.remove(victim)
            dropped = victim[1]
        self.entries.append((prio, seq, exp))
        return dropped

    def pop_many(self, now: float, limit: int) -> list[tuple[int, int]]:
        """Model of Outbox.pop_many (and of pop with limit 1)."""
        out = []
        for entry in self.ordered():
            if len(out) >= limit:
                break
            self.entries.remove(entry)
            if entry[2] is not None and entry[2] <= now:
                self.dropped_expired += 1
            else:
                out.append((entry[1], entry[0]))
        return out



def _assert_pop_respects_order(model: _Model, popped: list[tuple[int, int]], now: float) -> None:
    """Each popped item is the most important, oldest live item among what was queued before it."""
    live = sorted((p, s) for p, s, e in model.entries if e is None or e > now)
    for item, prio in popped:
        assert live[0] == (prio, item)
        live.pop(0)


# Small, often exactly representable steps and ttls so that expires_at == now happens regularly.
_now_step = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 2.0, allow_nan=False))
_ttl = st.one_of(st.none(), st.sampled_from([0.0, 0.5, 1.0, 2.0]), st.floats(0.0, 6.0, allow_nan=False))
_op = st.one_of(
    st.tuples(st.just("push"), st.integers(0, 3), _ttl),
    st.tuples(st.just("pop"), _now_step),
    st.tuples(st.just("pop_many"), _now_step, st.integers(0, 5)),
)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 8), ops=st.lists(_op, max_size=80))
def test_outbox_property_priority_fifo_and_bound(capacity, ops):
    """Any push/pop sequence pops the most important, oldest live item and never exceeds capacity."""
    box = Outbox(capacity)
    model = _Model(capacity)
    now = 0.0
    for seq, op in enumerate(ops):
        kind = op[0]
        if kind == "push":
            _, prio, ttl = op
            exp = None if ttl is None else now + ttl
            assert box.push(seq, prio, exp) == model.push(seq, prio, exp)
        elif kind == "pop":
            now += op[1]
            got = box.pop(now)
            live_before = [e for e in model.entries if e[2] is None or e[2] > now]
            _assert_pop_respects_order(model, [] if got is None else [got], now)
            expected = model.pop_many(now, 1)
            assert ([] if got is None else [got]) == expected
            assert (got is None) == (not live_before)
        else:
            _, dt, limit = op
            now += dt
            got = box.pop_many(now, limit)
            assert len(got) <= limit
            _assert_pop_respects_order(model, got, now)
            assert got == model.pop_many(now, limit)
        assert len(box) == len(model.entries) <= capacity
        assert bool(box) == bool(model.entries)
        assert box.depth_by_priority() == tuple(sum(1 for e in model.entries if e[0] == k) for k in range(4))
        assert (box.dropped_overflow, box.dropped_expired) == (model.dropped_overflow, model.dropped_expired)
    assert [i for i, _ in box.drain_all()] == [s for _, s, _ in model.ordered()]
