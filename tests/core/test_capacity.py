"""wsd.core.capacity: reservations, ceilings and the shared capacity, as numbers."""

from __future__ import annotations

import itertools
import random

from wsd.core.capacity import ADMIT, MANAGER_FULL, POOL_CEILING, SHARED_EXHAUSTED, Share, decide, shared_free

# 100 connections: mt5 reserves 30, frontend reserves nothing and may grow to 100.
SHARES = {"frontend": Share(0, 100), "mt5": Share(30, 50), "admin": Share(5, 10)}


def fill(pool: str, used: dict[str, int], limit: int = 100, shares: dict[str, Share] = SHARES) -> str:
    """Admit into ``pool`` until refused: the refusal."""
    while True:
        why = decide(limit, shares, used, pool)
        if why:
            return why
        used[pool] = used.get(pool, 0) + 1


def test_a_burst_in_one_pool_leaves_the_reservations():
    """Frontend fills what nobody reserved (100 - 30 - 5), then is refused: shared capacity exhausted."""
    used: dict[str, int] = {}
    assert fill("frontend", used) == SHARED_EXHAUSTED
    assert used["frontend"] == 65 and shared_free(100, SHARES, used) == 0
    # mt5 and admin still get every reserved connection (mt5 cannot take admin's), then the manager is full
    assert fill("mt5", used) == SHARED_EXHAUSTED and used["mt5"] == 30
    assert fill("admin", used) == MANAGER_FULL and used["admin"] == 5
    assert sum(used.values()) == 100


def test_admin_full_before_mt5_leaves_mt5_its_reservation():
    """In the other order the refusals differ but the reservations hold."""
    used = {"frontend": 65}
    assert fill("admin", used) == SHARED_EXHAUSTED and used["admin"] == 5
    assert fill("mt5", used) == MANAGER_FULL and used["mt5"] == 30


def test_an_idle_pool_share_past_its_reservation_is_used_by_others():
    """mt5 grows past its reservation into shared capacity, up to its ceiling."""
    used: dict[str, int] = {}
    assert fill("mt5", used) == POOL_CEILING and used["mt5"] == 50
    # frontend gets the rest: 100 - 50 (mt5) - 5 (admin's unused reservation)
    assert fill("frontend", used) == SHARED_EXHAUSTED and used["frontend"] == 45
    assert shared_free(100, SHARES, used) == 0


def test_ceiling_refuses_even_with_shared_room():
    used = {"admin": 10}
    assert decide(100, SHARES, used, "admin") == POOL_CEILING
    assert shared_free(100, SHARES, used) == 100 - 10 - 30


def test_below_reservation_is_admitted_without_shared_room():
    used = {"frontend": 65, "mt5": 29}
    assert shared_free(100, SHARES, used) == 0
    assert decide(100, SHARES, used, "mt5") == ADMIT
    assert decide(100, SHARES, used, "frontend") == SHARED_EXHAUSTED


def test_freeing_one_connection_gives_room_back():
    used = {"frontend": 65, "mt5": 30, "admin": 5}
    assert decide(100, SHARES, used, "frontend") == MANAGER_FULL
    used["mt5"] -= 1  # a terminal left: its reserved seat is mt5's again, not frontend's
    assert decide(100, SHARES, used, "frontend") == SHARED_EXHAUSTED
    assert decide(100, SHARES, used, "mt5") == ADMIT
    used["frontend"] -= 1
    assert decide(100, SHARES, used, "frontend") == ADMIT


def test_lowered_limits_refuse_new_and_count_the_open():
    """After a reload lowered the numbers, more are open than allowed: nothing new is admitted there."""
    used = {"frontend": 80, "mt5": 10}
    assert decide(60, SHARES, used, "mt5") == MANAGER_FULL
    assert decide(100, {"frontend": Share(0, 50), "mt5": Share(30, 50)}, used, "frontend") == POOL_CEILING
    assert shared_free(60, SHARES, used) == 0


def test_removed_pool_holds_its_connections_and_takes_no_more():
    used = {"gone": 40, "frontend": 0}
    assert shared_free(100, SHARES, used) == 100 - 40 - 30 - 5
    assert decide(100, SHARES, used, "gone") == POOL_CEILING


def test_no_reservations_is_the_old_behaviour():
    shares = {"a": Share(0, 3), "b": Share(0, 10)}
    used: dict[str, int] = {}
    assert fill("a", used, 5, shares) == POOL_CEILING and used["a"] == 3
    assert fill("b", used, 5, shares) == MANAGER_FULL and used["b"] == 2


def test_random_admissions_never_break_a_reservation_or_the_limit():
    """Whatever the order of arrivals and departures, the total stays within the limit, every pool
    within its ceiling, and a pool below its reservation is never refused."""
    rnd = random.Random(7)
    pools = list(SHARES)
    used = dict.fromkeys(pools, 0)
    for _ in range(20000):
        pid = rnd.choice(pools)
        if rnd.random() < 0.4 and used[pid]:
            used[pid] -= 1
            continue
        why = decide(100, SHARES, used, pid)
        if used[pid] < SHARES[pid].reserved:
            assert why == ADMIT, (pid, used)
        if not why:
            used[pid] += 1
        assert sum(used.values()) <= 100
        assert all(used[p] <= SHARES[p].ceiling for p in pools)
        assert sum(max(used[p], SHARES[p].reserved) for p in pools) <= 100


def test_shared_free_counts_each_pool_once():
    for a, b in itertools.product(range(0, 60, 7), range(0, 60, 11)):
        used = {"frontend": a, "mt5": b}
        assert shared_free(100, SHARES, used) == max(0, 100 - a - max(b, 30) - 5)
