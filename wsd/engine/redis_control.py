"""The Redis engine's control channel: a request to every node (or some), their replies, a deadline.

A requesting node PUBLISHes one request on ``<prefix>:ctl``::

    {"id": "<random>", "from": "<node id>", "method": "...", "params": {...}, "nodes": [...] | null,
     "deadline_s": 2.0, "until": <unix time the deadline ends>}

Every node named in ``nodes`` (every node when null) but the requester serves its part (``Engine.on_control``,
bounded by the deadline) and PUBLISHes ``{"id", "node", "reply"}`` on the requester's own reply channel
``<prefix>:ctl:reply:<node id>``; the requester serves its own part in-process. The requester waits for the live
nodes of the registry (or the ones named) until the deadline, never longer: whoever has not answered by then is
reported missing, and a late reply is dropped. A node that reads a request after its ``until`` (plus
``CLOCK_SKEW_S`` for the nodes' clocks) does not serve it: it was frozen or cut off meanwhile, and the requester has
already told the operator that this node's part did not happen (a stale kick run minutes later would contradict it).

The channel is as trusted as Redis itself: whoever may PUBLISH there may ask any node to list or close its
connections. No request carries a token, and each reply is bounded (``MAX_CONTROL_REPLY_BYTES``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import msgspec

from wsd.engine.base import CONTROL_DEADLINE_S, MAX_CONTROL_REPLY_BYTES, ClusterReply

if TYPE_CHECKING:
    from wsd.engine.redis import RedisEngine

log = logging.getLogger("wsd.engine.redis")

#: how far apart the nodes' clocks may be: a request read later than its ``until`` plus this is not served
CLOCK_SKEW_S = 1.0


class _Request(msgspec.Struct, forbid_unknown_fields=False):
    id: str
    sender: str = msgspec.field(name="from")
    method: str
    params: dict[str, Any] = {}
    nodes: list[str] | None = None
    deadline_s: float = CONTROL_DEADLINE_S
    until: float = 0.0  # unix time the requester stops waiting (0: not said)


class _Reply(msgspec.Struct, forbid_unknown_fields=False):
    id: str
    node: str
    reply: dict[str, Any]


_encode = msgspec.json.Encoder().encode
_decode_request = msgspec.json.Decoder(_Request).decode
_decode_reply = msgspec.json.Decoder(_Reply).decode


class _Pending:
    __slots__ = ("done", "expected", "replies")

    def __init__(self, expected: set[str]) -> None:
        self.expected = expected
        self.replies: dict[str, dict[str, Any]] = {}
        self.done = asyncio.Event()
        if not expected:
            self.done.set()

    def add(self, node: str, reply: dict[str, Any]) -> None:
        self.replies[node] = reply
        if self.expected <= set(self.replies):
            self.done.set()


class RedisControl:
    """The control channel of one node: serves the others' requests, sends its own, collects replies."""

    def __init__(self, engine: RedisEngine) -> None:
        self.engine = engine
        self.node_id = engine.node_id
        self.requests = f"{engine.prefix}:ctl".encode()
        self.replies = self.reply_channel(engine.node_id)
        # A connection of its own that waits for messages (the engine's commands keep theirs), reaching Redis as
        # the engine does (with Sentinel: the current master).
        self._client = engine.pubsub_client()
        self._pubsub: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._waiting: dict[str, _Pending] = {}
        self._serving: set[asyncio.Task[None]] = set()
        self.stats = {"requests": 0, "served": 0, "late_replies": 0, "bad": 0, "stale": 0}

    def reply_channel(self, node: str) -> bytes:
        return f"{self.engine.prefix}:ctl:reply:{node}".encode()

    async def start(self) -> None:
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(self.requests, self.replies)
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def stop(self) -> None:
        for task in (self._listener, *self._serving):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()
        with contextlib.suppress(Exception):
            await self._client.aclose()

    async def _listen(self) -> None:
        failing = False
        while True:
            try:
                msg = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning("the redis control channel failed (%s); reconnecting", exc)
                failing = True
                await asyncio.sleep(0.2)
                continue
            failing = False
            if msg is None:
                continue
            try:
                if msg.get("channel") == self.replies:
                    self._reply(_decode_reply(msg["data"]))
                else:
                    self._request(_decode_request(msg["data"]))
            except (msgspec.DecodeError, msgspec.ValidationError, TypeError):
                self.stats["bad"] += 1
                log.warning("a malformed message on the redis control channel was dropped")

    def _reply(self, r: _Reply) -> None:
        pending = self._waiting.get(r.id)
        if pending is None:
            self.stats["late_replies"] += 1
            return
        pending.add(r.node, r.reply)

    def _request(self, req: _Request) -> None:
        if req.sender == self.node_id or (req.nodes is not None and self.node_id not in req.nodes):
            return  # the requester serves itself in-process; a request for other nodes is theirs
        if req.until and time.time() > req.until + CLOCK_SKEW_S:
            self.stats["stale"] += 1
            log.warning("a control request (%r from node %r) arrived %.1fs after its deadline (this node was frozen "
                        "or cut off): not served", req.method, req.sender, time.time() - req.until)
            return
        task = asyncio.get_running_loop().create_task(self._serve(req))
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

    async def _serve(self, req: _Request) -> None:
        deadline = min(max(req.deadline_s, 0.05), 60.0)
        try:
            reply = await asyncio.wait_for(self.engine.on_control(req.method, req.params), deadline)
        except asyncio.TimeoutError:
            reply = {"error": {"code": "timeout", "message": f"not served within {deadline:g}s"}}
        self.stats["served"] += 1
        body = _encode({"id": req.id, "node": self.node_id, "reply": reply})
        if len(body) > MAX_CONTROL_REPLY_BYTES:
            body = _encode({"id": req.id, "node": self.node_id, "reply": {"error": {
                "code": "too_large", "message": f"this node's reply is {len(body)} bytes, over the control "
                                                f"channel's {MAX_CONTROL_REPLY_BYTES}: ask for fewer rows"}}})
        try:
            await asyncio.wait_for(self.engine.redis.publish(self.reply_channel(req.sender), body), deadline)
        except Exception as exc:
            log.warning("a control reply could not be sent: %s", exc)

    async def call(self, method: str, params: dict[str, Any], nodes: list[str] | None = None,
                   deadline_s: float = CONTROL_DEADLINE_S) -> ClusterReply:
        me = self.node_id
        if nodes is None:
            # The registry as it is now, not as the last heartbeat read it (a node that started a moment ago
            # would be left out without a word); a Redis that does not answer leaves the last reading.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.engine.read_registry(), min(deadline_s, 1.0))
        expected = set(nodes) if nodes is not None else set(self.engine.live_nodes() or ())
        others = expected - {me}
        rid = secrets.token_hex(8)
        pending = _Pending(others)
        self._waiting[rid] = pending
        self.stats["requests"] += 1
        replies: dict[str, dict[str, Any]] = {}
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        try:
            if others or nodes is None:  # nodes not yet in this node's view of the registry answer too
                body = _encode({"id": rid, "from": me, "method": method, "params": params, "nodes": nodes,
                                "deadline_s": deadline_s, "until": time.time() + deadline_s})
                try:
                    await asyncio.wait_for(self.engine.redis.publish(self.requests, body), deadline_s)
                except Exception as exc:
                    log.warning("a control request could not be sent: %s", exc)
            if nodes is None or me in expected:
                replies[me] = await self.engine.on_control(method, params)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(pending.done.wait(), max(0.0, end - loop.time()))
            replies.update(pending.replies)
        finally:
            self._waiting.pop(rid, None)
        return ClusterReply(replies, sorted(others - set(replies)))
