"""What the client hands to the application: messages, gaps, history pages, and its errors."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import msgspec

from wsd.client.decrypt import open_envelope


class Position(msgspec.Struct, frozen=True):
    """A place in a channel instance: "everything up to ``offset`` of ``epoch``"."""

    offset: int
    epoch: str

    def wire(self) -> dict[str, Any]:
        return {"offset": self.offset, "epoch": self.epoch}


class Message(msgspec.Struct, frozen=True):
    """One channel message, as the server sent it (``type`` is the frame's ``msg_type``)."""

    channel: str
    offset: int
    epoch: str
    type: str
    data: Any
    priority: str = "normal"
    ts: float = 0.0
    seq: int | None = None
    history: bool = False
    #: the key id of an encrypted message (None for a plain one)
    key_id: str | None = None
    #: why an encrypted message could not be decrypted (``data`` is then the envelope as received), else None
    decrypt_error: str | None = None

    @property
    def position(self) -> Position:
        return Position(self.offset, self.epoch)


class Gap(msgspec.Struct, frozen=True):
    """A hole the server could not fill: messages after ``last`` and before ``resumed`` may be missing.

    ``last`` is the last position delivered to the application before the hole (``None`` if none);
    ``resumed`` the position of the first message delivered after it (``None`` when not known yet, e.g.
    nothing was held). ``reason`` says how the hole was found."""

    channel: str
    last: Position | None
    resumed: Position | None
    reason: str


class History(msgspec.Struct, frozen=True):
    """One ``history`` reply. Iterating, ``len()`` and indexing go over ``messages``.

    ``recovered`` is false when messages after the asked ``since`` were no longer held; ``more`` and
    ``next`` say there is a further page (ask again with ``since=next``)."""

    channel: str
    messages: list[Message]
    recovered: bool
    position: Position
    more: bool = False
    next: Position | None = None

    def __iter__(self) -> Iterator[Message]:
        return iter(self.messages)

    def __len__(self) -> int:
        return len(self.messages)

    def __getitem__(self, i: int) -> Message:
        return self.messages[i]


class ClientError(Exception):
    """The client cannot go on (or a request could not be made)."""


class ClientClosed(ClientError):
    """The client was closed: by the application, or by the server with a code that means stop."""

    def __init__(self, message: str, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class Kicked(ClientClosed):
    """An operator closed the connection (4000): the session is over; the client does not reconnect."""


class NotAdmitted(ClientClosed):
    """The pool does not admit this token (4003 after a refresh, or a 401/403/404 handshake refusal)."""


class TakenOver(ClientClosed):
    """Another connection resumed this client's session (4011): that one won; this client does not reconnect."""


class RequestError(ClientError):
    """The server answered a request with an error reply: ``code`` and ``message`` as in docs/protocol.md."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(ClientError):
    """The connection ended before the reply to a request arrived: the request may or may not have happened."""


def message_from(frame: dict[str, Any], keys: Mapping[str, Any] | None = None) -> Message:
    """The Message of a ``message`` push; an encrypted one (``enc``) is decrypted with ``keys`` (key id ->
    prepared key, see wsd.client.decrypt), or kept as received with ``decrypt_error`` saying why."""
    seq = frame.get("seq")
    channel = str(frame.get("channel") or "")
    data, key_id, error = open_envelope(keys or {}, channel, frame.get("enc"), frame.get("data"))
    return Message(channel=channel, offset=int(frame.get("offset") or 0),
                   epoch=str(frame.get("epoch") or ""), type=str(frame.get("msg_type") or "message"),
                   data=data, priority=str(frame.get("priority") or "normal"),
                   ts=float(frame.get("ts") or 0.0), seq=int(seq) if seq is not None else None,
                   history=bool(frame.get("history", False)), key_id=key_id, decrypt_error=error)


def position_from(d: Any) -> Position | None:
    if not isinstance(d, dict) or "offset" not in d:
        return None
    return Position(int(d["offset"]), str(d.get("epoch") or ""))
