"""A disconnected session as it is kept for resume: typed, and encoded once for the engine.

The engine stores the encoded bytes and knows nothing of their shape. The JSON is what it has always
been (an object with ``user_id``, ``company_id``, ``pool``, ``subs``, ``unacked``, ``next_seq``,
``reconnections``; each unacked message an array ``[seq, payload, priority, retries left, ack timeout]``),
so sessions kept by an older wsd resume, and the other way round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from wsd.runtime.conn import Conn


class SavedSub(msgspec.Struct, kw_only=True):
    """One subscription and its position: the last offset sent, in ``epoch``."""

    channel: str
    group: str = ""
    mode: str = "realtime"
    types: list[str] | None = None
    offset: int = 0
    epoch: str = ""


class SavedUnacked(msgspec.Struct, array_like=True):
    """A reliable message not acknowledged when the connection went: sent again first on resume."""

    seq: int
    payload: str
    priority: int
    retries: int
    ack_timeout_s: float


class Session(msgspec.Struct, kw_only=True):
    user_id: str
    company_id: str = ""
    pool: str = ""
    subs: list[SavedSub] = msgspec.field(default_factory=list)
    unacked: list[SavedUnacked] = msgspec.field(default_factory=list)
    next_seq: int = 1
    reconnections: int = 0

    @property
    def owner(self) -> str:
        """What the session counts against for ``limits.max_sessions_per_user``: its tenant and user."""
        return f"{self.company_id}/{self.user_id}"


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Session).decode


def encode(session: Session) -> bytes:
    return _encode(session)


def decode(blob: bytes) -> Session | None:
    """The session in ``blob``, or None when it is not one (damaged, or written by something else)."""
    try:
        return _decode(blob)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def capture(conn: Conn) -> Session:
    """What ``conn`` leaves behind to be resumed: its subscriptions with their positions, its unacked messages."""
    subs = [SavedSub(channel=s.channel, group=s.group, mode=s.mode,
                     types=sorted(s.types) if s.types is not None else None, offset=s.offset, epoch=s.epoch)
            for s in conn.subs.values()]
    rs = conn.reliable
    unacked = []
    if rs is not None:
        unacked = [SavedUnacked(seq, u.payload.decode(), u.priority, u.retries, u.ack_timeout_s)
                   for seq, u in sorted(rs.unacked.items())]
    return Session(user_id=conn.user_id, company_id=conn.company_id, pool=conn.pool.id, subs=subs,
                   unacked=unacked, next_seq=rs.next_seq if rs is not None else 1,
                   reconnections=conn.reconnections)


def merge(live: Session, base: Session) -> Session:
    """``live`` (captured from a connection still restoring ``base``) completed with what it has not restored
    yet: the subscriptions of ``base`` it does not hold, and the reliable state of ``base`` if it has none yet."""
    have = {s.channel for s in live.subs}
    subs = live.subs + [s for s in base.subs if s.channel not in have]
    if live.next_seq < base.next_seq:  # its reliable state is not back yet
        return msgspec.structs.replace(live, subs=subs, unacked=base.unacked, next_seq=base.next_seq)
    return msgspec.structs.replace(live, subs=subs)


def mark(conn: Conn) -> int:
    """A fingerprint of what moves in ``conn``'s session between writes: each subscription's position and the
    reliable state. Equal marks: nothing to write. Computed by the sweep (once a second per connection), not
    by the fan-out loop, which moves positions inline for every receiver and must stay free of extra work."""
    rs = conn.reliable
    return hash((tuple([(s.channel, s.offset, s.epoch) for s in conn.subs.values()]),
                 (rs.next_seq, len(rs.unacked)) if rs is not None else None))
