"""Connection capacity shared by the pools: reservations, ceilings and the daemon-wide limit.

Each pool has a reservation (``pools.<id>.min_connections``: always there for it) and a ceiling
(``pools.<id>.max_connections``). The daemon-wide limit (``manager.max_connections``) less every
pool's reservation is shared: a pool past its reservation takes from it, up to its ceiling. A pool's
unused reservation is held back from the others, so a burst in one pool never takes what another
pool reserved, and a pool that reserved nothing still gets whatever is left.

    shared free = limit - sum over pools of max(connections, reservation)

(connections within a reservation, unused reservations and connections past a reservation are all
held; what remains is free). Pure: numbers in, a decision out; the runtime counts the connections.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

ADMIT = ""
MANAGER_FULL = "manager"  # the daemon-wide limit is reached
POOL_CEILING = "ceiling"  # the pool is at its own max_connections
SHARED_EXHAUSTED = "shared"  # past its reservation, and nothing is left of the shared capacity


@dataclass(frozen=True, slots=True)
class Share:
    """One pool's reservation and ceiling."""

    reserved: int
    ceiling: int


def shared_free(limit: int, shares: Mapping[str, Share], used: Mapping[str, int]) -> int:
    """Connections still free for any pool past its reservation (never negative).

    ``used`` may name pools that are not in ``shares`` (removed by a reload, with connections left):
    they hold their connections and reserve nothing.
    """
    held = 0
    for pid, n in used.items():
        s = shares.get(pid)
        held += n if s is None else max(n, s.reserved)
    for pid, s in shares.items():
        if pid not in used:
            held += s.reserved
    return max(0, limit - held)


def decide(limit: int, shares: Mapping[str, Share], used: Mapping[str, int], pool_id: str) -> str:
    """May ``pool_id`` take one more connection? ``ADMIT`` (''), else which limit refuses it.

    ``used`` is the open connections per pool. The daemon-wide limit is checked first (a reload may
    have lowered it below what is open); then a pool below its reservation is admitted; past it, the
    pool needs room under its ceiling and some shared capacity free.
    """
    share = shares.get(pool_id)
    if share is None:  # a pool a reload removed: it takes no new connection
        return POOL_CEILING
    n = used.get(pool_id, 0)
    if sum(used.values()) >= limit:
        return MANAGER_FULL
    if n >= share.ceiling:
        return POOL_CEILING
    if n < share.reserved:
        return ADMIT
    return ADMIT if shared_free(limit, shares, used) > 0 else SHARED_EXHAUSTED

