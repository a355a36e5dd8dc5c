"""The Redis engine: several wsd nodes share channels, history positions and sessions.

- A publication is stored and numbered by one Lua script (atomic per channel): the channel's
  offset is incremented, the entry appended to a capped list, and the publication is PUBLISHed
  on the channel instance's own bus (``<prefix>:ch:{<instance>}:bus``: its keys and its bus share one
  hash tag). Every node with subscribers of the instance — the publisher included — subscribes to that
  bus and delivers from it, in offset order; a node without subscribers of it receives none of it.
  Broadcasts, publications that routing rules send beyond their channel's subscribers, and takeover
  notices travel on shared channels every node subscribes to (``<prefix>:bus``, ``<prefix>:takeover``).
- A node subscribes to a channel's bus when its first subscriber of the instance arrives: the
  subscriber's position is read only once Redis confirmed the SUBSCRIBE, so nothing published in
  between is missed (and if the confirmation is late, the position read is caught up from history
  when it comes). The bus is left ``BUS_GRACE_S`` after the last subscriber here left.
- Each channel has an epoch kept next to its offset; if Redis loses the channel's keys (a restart
  without persistence, an eviction) a new epoch is chosen and resuming clients are told
  ``recovered: false`` instead of getting a silent gap.
- An offset is never used twice in an epoch: when Redis comes back with older data (the last writes lost) and
  hands out an offset a node has already seen, a new epoch starts (the publish script, given what the node saw;
  or the subscriber's node, seeing the bus go back or Redis behind it) and the subscribers are told
  ``recovered: false``.
- Sessions are plain keys with a TTL, so a client can resume on any node.
- The bus (pub/sub) is fire-and-forget, so each node checks that it missed nothing of the channels it has
  subscribers for: the offsets on the bus must follow each other, every channel's position is read again
  after a bus reconnect and once a second; a hole is filled from history before anything later of that
  channel is delivered, or reported to the subscribers (``recovery`` with ``recovered: false``).
- A publish that Redis does not take within ``OP_TIMEOUT_S`` raises ``EngineUnavailable``; the client
  reconnects by itself once Redis is back.
- Each node refreshes a key with a TTL every second: the live nodes are those whose key exists.
- Control requests (``wsctl`` across the cluster) travel on a channel of their own: engine/redis_control.py.

- ``mode``: one server (``single``), a master found through Redis Sentinel (``sentinel``: redis-py's
  ``Sentinel.master_for``; the bus connection is moved when the sentinels name another master), or Redis Cluster
  (``cluster``: redis-py's ``RedisCluster``; channel buses are shard channels, SSUBSCRIBE / SPUBLISH in the
  instance's slot, read per master; sessions share one hash tag so their script stays in one slot).
  ``wait_replicas``: a publication is acknowledged once that many replicas have it (WAIT).

An extra: ``pip install 'wsd[redis]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any

import msgspec

from wsd.core.history import StreamPosition
from wsd.engine.base import (CONTROL_DEADLINE_S, ClusterReply, Engine, EngineUnavailable, HistoryResult, Publication,
                             log_refused)

log = logging.getLogger("wsd.engine.redis")

#: a publish (or another command) that Redis has not answered within this is failed, never left hanging
OP_TIMEOUT_S = 1.5
#: engine.wait_replicas: how long a publication waits for its replicas before it is refused
WAIT_MS = 500
#: how often a node refreshes its registry key and checks its subscribed channels' positions
CHECK_INTERVAL_S = 1.0
#: a node whose key was not refreshed for this long is gone
NODE_TTL_S = 3
#: a node whose registry key expired without a clean stop is still asked (and reported missing) this long
NODE_FORGET_S = 30.0
#: a channel's bus stays subscribed this long after its last subscriber here left (a subscriber that comes and
#: goes does not make a SUBSCRIBE / UNSUBSCRIBE per visit)
BUS_GRACE_S = 5.0
#: at most this many channels in one SUBSCRIBE or UNSUBSCRIBE command
BUS_BATCH = 500
#: at most this many connections to Redis for commands (the bus and the control channel have one each); a command
#: beyond them waits up to ``POOL_WAIT_S`` for one to be free (a burst of first subscribers or publications must
#: queue, never fail)
POOL_SIZE = 64
POOL_WAIT_S = 5.0

# Number, store and publish one publication. KEYS: meta, hist (one channel instance: one hash slot).
# ARGV: new epoch (used when the channel has none), body, history size (0: broadcast, nothing stored),
# history ttl, timestamp, the pub/sub channel to publish on (the instance's own bus, or the shared one for a
# broadcast or a publication routing rules send beyond its channel), then (epoch, offset) pairs this node saw.
# Returns {offset, epoch}. (_SPUBLISH: the same with SPUBLISH, for an instance's bus on Redis Cluster: a shard
# channel in the instance's slot.)
_PUBLISH = """
local meta = KEYS[1]
local hist = KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', meta, 'epoch', epoch)
end
local off = 0
local size = tonumber(ARGV[3])
if size > 0 then
  off = redis.call('HINCRBY', meta, 'offset', 1)
  for i = 7, #ARGV - 1, 2 do
    if epoch == ARGV[i] and off <= tonumber(ARGV[i + 1]) then
      -- Redis handed out again an offset already used in this epoch (it came back with older data): a new epoch
      epoch = ARGV[1]
      off = 1
      redis.call('HSET', meta, 'epoch', epoch, 'offset', off)
      redis.call('DEL', hist)
      break
    end
  end
  redis.call('RPUSH', hist, off .. ':' .. ARGV[5] .. ':' .. ARGV[2])
  redis.call('LTRIM', hist, -size, -1)
  local ttl = tonumber(ARGV[4])
  if ttl > 0 then
    redis.call('EXPIRE', hist, ttl)
    redis.call('EXPIRE', meta, ttl * 2 + 3600)
  end
end
redis.call('PUBLISH', ARGV[6], off .. ':' .. epoch .. ':' .. ARGV[2])
return {off, epoch}
"""
_SPUBLISH = _PUBLISH.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")

# Start a new epoch if the channel's epoch is still ARGV[1] (one whose offsets Redis hands out again): offset 0,
# history dropped. KEYS: meta, hist. ARGV: stale epoch, new epoch. Returns the channel's epoch.
_RENEW = """
local e = redis.call('HGET', KEYS[1], 'epoch')
if e and e == ARGV[1] then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[2], 'offset', 0)
  redis.call('DEL', KEYS[2])
  return ARGV[2]
end
return e
"""

# Read what follows a position: the entries after offset ARGV[1] when ARGV[2] is the channel's epoch (the list
# holds consecutive offsets, so the first entry's offset gives the index), else all of them; at most ARGV[3]
# (0 = no limit). KEYS: meta, hist. Returns {epoch, offset, entries}.
_READ_SINCE = """
local m = redis.call('HMGET', KEYS[1], 'epoch', 'offset')
local start = 0
if m[1] and m[1] == ARGV[2] then
  local head = redis.call('LINDEX', KEYS[2], 0)
  if head then
    local s = tonumber(ARGV[1]) - tonumber(string.match(head, '^(%d+):')) + 1
    if s > 0 then start = s end
  end
end
local stop = -1
local limit = tonumber(ARGV[3])
if limit > 0 then stop = start + limit - 1 end
return {m[1], m[2], redis.call('LRANGE', KEYS[2], start, stop)}
"""

# Keep a session: drop expired entries from the session indexes (scores are expiry times), drop index
# entries whose session key is gone, evict the owner's then the store's oldest beyond the limits, store.
# KEYS: session key, owner index, all-sessions index. ARGV: blob, ttl, now, max per owner, max total,
# session key prefix, session id. Returns {evicted, expired}.
_SAVE_SESSION = """
local now = tonumber(ARGV[3])
local ttl = tonumber(ARGV[2])
local sid = ARGV[7]
local pre = ARGV[6]
local expired = redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREM', KEYS[2], sid)
redis.call('ZREM', KEYS[3], sid)
for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if redis.call('EXISTS', pre .. m) == 0 then redis.call('ZREM', KEYS[2], m) end
end
local evicted = 0
while redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) do
  local old = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  redis.call('ZREM', KEYS[2], old)
  redis.call('ZREM', KEYS[3], old)
  redis.call('DEL', pre .. old)
  evicted = evicted + 1
end
while redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[5]) do
  local old = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  redis.call('ZREM', KEYS[3], old)
  redis.call('DEL', pre .. old)
  evicted = evicted + 1
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, sid)
redis.call('EXPIRE', KEYS[2], ttl + 1)
redis.call('ZADD', KEYS[3], now + ttl, sid)
return {evicted, expired}
"""

_encode = msgspec.json.Encoder().encode

#: publication script calls sent to Redis in one pipeline at most
MAX_BATCH = 512


class _Pending:
    """A publication waiting for its turn in a pipeline: its channel, script keys and arguments, and the future
    its ``publish`` waits on ((offset, epoch), or EngineUnavailable)."""

    __slots__ = ("args", "channel", "fut", "keys")

    def __init__(self, channel: str, keys: tuple[str, ...], args: tuple[Any, ...], fut: asyncio.Future[Any]) -> None:
        self.channel = channel
        self.keys = keys
        self.args = args
        self.fut = fut


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    for p in batch:
        if not p.fut.done():
            p.fut.set_exception(exc)


class _Wire(msgspec.Struct, array_like=True):
    """A publication (and its delivery scope) as it travels on the bus and sits in history."""

    id: str
    channel: str
    group: str
    type: str
    priority: int
    data: Any
    ts: float
    ttl_s: float | None
    source: str
    user_id: str
    company_id: str
    broadcast: bool = False
    pools: list[str] = []
    companies: list[str] = []
    enc: str = ""  # "A256GCM": data is an encrypted envelope (last, so entries stored before it still decode)


_decode = msgspec.json.Decoder(_Wire).decode


class _StoredWire(_Wire, array_like=True):
    """A stored publication read back for history: ``data`` stays the encoded bytes it was stored as."""

    data: msgspec.Raw


_decode_stored = msgspec.json.Decoder(_StoredWire).decode


def _to_pub(w: _Wire, offset: int, epoch: str, now: float) -> Publication:
    expires = None
    if w.ttl_s:
        expires = now + w.ttl_s - max(0.0, time.time() - w.ts)
    return Publication(id=w.id, channel=w.channel, group=w.group, type=w.type, priority=w.priority, data=w.data,
                       ts=w.ts, ttl_s=w.ttl_s, source=w.source, user_id=w.user_id, company_id=w.company_id,
                       offset=offset, epoch=epoch, expires_at=expires, enc=w.enc)


class RedisEngine(Engine):
    name = "redis"
    shared = True
    durable_sessions = True

    def __init__(self, url: str, prefix: str = "wsd", *, mode: str = "single", sentinels: Sequence[str] = (),
                 sentinel_master: str = "", sentinel_password: str = "", cluster_nodes: Sequence[str] = (),
                 wait_replicas: int = 0) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError

        super().__init__()

        self.url = url
        self.prefix = prefix
        self.mode = mode
        #: Redis Cluster: each channel instance's bus is a shard channel (SSUBSCRIBE / SPUBLISH in its slot)
        self.sharded = mode == "cluster"
        #: a publication is acknowledged once this many replicas have it (WAIT on the connection that wrote it)
        self.wait_replicas = wait_replicas
        self.node_id = secrets.token_hex(4)
        # Sessions and their indexes: one hash tag on Redis Cluster, so one script keeps them in one slot.
        self._sess = f"{prefix}:{{sessions}}:" if self.sharded else f"{prefix}:"
        self._sentinel: Any = None
        self._master = sentinel_master
        self._shown_url = _redact_url(url)
        if mode == "sentinel":
            from redis.asyncio.connection import parse_url
            from redis.asyncio.sentinel import Sentinel

            # The URL gives the master's credentials, database and TLS (rediss://); the sentinels its address.
            conn: dict[str, Any] = {k: v for k, v in parse_url(url).items() if k in ("username", "password", "db")
                                    } if url else {}
            if url.startswith("rediss://"):
                conn["ssl"] = True
            self._sentinel = Sentinel(
                [_host_port(a) for a in sentinels],
                sentinel_kwargs={"socket_timeout": 1.0, "socket_connect_timeout": 1.0,
                                 "password": sentinel_password or None},
                **conn)
            self._shown_url = f"sentinel://{sentinel_master}@{','.join(sentinels)}"
            # Each connection asks the sentinels for the master's address when it (re)connects.
            self.redis = self._sentinel.master_for(sentinel_master, decode_responses=False, socket_timeout=1.0,
                                                   socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 1))
            self._bus_client = self.pubsub_client()
        elif mode == "cluster":
            from redis.asyncio.cluster import ClusterNode, RedisCluster

            first = [ClusterNode(*_host_port(a)) for a in cluster_nodes]
            self.redis = RedisCluster.from_url(url, startup_nodes=first, decode_responses=False,
                                               socket_timeout=1.0, socket_connect_timeout=1.0)
            # The bus: a connection for the shared channels, one per master for the channel buses it holds
            self._bus_client = RedisCluster.from_url(url, startup_nodes=list(first), decode_responses=False,
                                                     socket_connect_timeout=1.0)
        else:
            # Bounded: one retry on a fresh connection (a pooled one that Redis closed), 1 s per attempt.
            # A blocking pool: a burst of commands (hundreds of first subscribers reading their position at once)
            # waits for a connection instead of failing with "Too many connections".
            self.redis = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
                url, max_connections=POOL_SIZE, timeout=POOL_WAIT_S, decode_responses=False, socket_timeout=1.0,
                socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 1)))
            # The bus has a connection of its own: it waits for messages, and reconnects when it loses Redis.
            self._bus_client = self.pubsub_client()
        #: the shared bus: broadcasts and publications routed beyond their channel (every node subscribes)
        self.bus = f"{prefix}:bus".encode()
        #: takeover notices: "<node id> <session id> <owner>" from the node that resumed the session
        self.takeovers = f"{prefix}:takeover".encode()
        self._script = self.redis.register_script(_PUBLISH)
        # Publications waiting to be sent (``publish``), and the task sending them, one pipeline at a time.
        self._outgoing: list[_Pending] = []
        self._sender: asyncio.Task[None] | None = None
        self._script_sharded = self.redis.register_script(_SPUBLISH) if self.sharded else self._script
        self._listener: asyncio.Task[None] | None = None
        self._on_remote: Callable[..., None] | None = None
        self._save_session = self.redis.register_script(_SAVE_SESSION)
        self._read_since = self.redis.register_script(_READ_SINCE)
        self._renew = self.redis.register_script(_RENEW)
        # Positions of channel instances this node published to (position(), channels()): bounded by
        # max_channels (least recently published first) and forgotten once their history would have expired.
        self._known: dict[str, dict[str, Any]] = {}
        self.received = 0
        self._stats = {"sessions": 0, "sessions_evicted": 0, "sessions_expired": 0, "sessions_refused": 0,
                       "channels_evicted": 0, "channels_expired": 0}
        self._counting: asyncio.Task[None] | None = None
        # Gap-free bus: the last position delivered here per channel with subscribers here, the bus messages
        # held while a channel's hole is filled from history, the positions read at the previous check.
        self._last: dict[str, list[Any]] = {}
        self._filling: dict[str, list[tuple[Publication, dict[str, Any]]]] = {}
        self._checked: dict[str, tuple[int, str]] = {}
        # The last (offset, epoch) the bus brought per channel in _last: the bus keeps each channel's order, so a
        # message at or below it in the same epoch is an offset Redis handed out again (it lost data).
        self._bus_top: dict[str, tuple[int, str]] = {}
        self._bus_reconnected = False
        self._watcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._nodes: list[str] = []
        self._quiet: dict[str, float] = {}  # node id -> when its registry key was first seen expired
        self._started = time.time()
        self.bus_stats = {"fills": 0, "filled": 0, "gaps": 0, "reconnects": 0, "messages_channel": 0,
                          "messages_shared": 0, "subscribes": 0, "unsubscribes": 0, "late_confirms": 0}
        # Per-channel buses: the instances whose bus this node subscribes to (the future is done once Redis
        # confirmed the SUBSCRIBE), since when each has had no subscriber here, bus name -> instance, and the
        # SUBSCRIBE / UNSUBSCRIBE commands still to send (one task sends them, batched).
        self._bus_on: dict[str, asyncio.Future[None]] = {}
        self._bus_idle: dict[str, float] = {}
        self._bus_names: dict[bytes, str] = {}
        self._bus_todo_sub: set[bytes] = set()
        self._bus_todo_unsub: set[bytes] = set()
        self._bus_syncing: asyncio.Task[None] | None = None
        #: Redis Cluster: the reader of each master's shard channel connection, by node name
        self._readers: dict[str, asyncio.Task[None]] = {}
        #: what a lost, paused or restarting Redis raises
        self._unavailable: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)

    def pubsub_client(self) -> Any:
        """A new client for a pub/sub connection of its own (plain SUBSCRIBE / PUBLISH), reaching Redis as this
        engine does: the server at the URL; with Sentinel the current master (asked at each reconnect); on Redis
        Cluster the node of the URL (a cluster delivers PUBLISH on every node)."""
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        if self._sentinel is not None:
            return self._sentinel.master_for(self._master, decode_responses=False, socket_connect_timeout=1.0,
                                             retry=Retry(NoBackoff(), 1))
        return aioredis.Redis.from_url(self.url, decode_responses=False, socket_connect_timeout=1.0,
                                       retry=Retry(NoBackoff(), 1))

    def _meta(self, channel: str) -> str:
        return f"{self.prefix}:ch:{{{channel}}}:meta"

    def _hist(self, channel: str) -> str:
        return f"{self.prefix}:ch:{{{channel}}}:hist"

    def channel_bus(self, channel: str) -> bytes:
        """The pub/sub channel of one channel instance's publications: the same hash tag as its keys."""
        return f"{self.prefix}:ch:{{{channel}}}:bus".encode()

    async def start(self, on_remote: Callable[..., None]) -> None:
        self._on_remote = on_remote
        if self.sharded:
            await self.redis.initialize()
            await self._bus_client.initialize()
        await self.redis.ping()
        # Subscribe confirmations are read: a channel's bus is live only once Redis confirmed it.
        self._pubsub = self._bus_client.pubsub(ignore_subscribe_messages=False)
        await self._pubsub.subscribe(self.bus, self.takeovers)
        # Called after each reconnect of the bus connection, once it has subscribed again.
        self._pubsub.connection.register_connect_callback(self._bus_connected)
        loop = asyncio.get_running_loop()
        self._listener = loop.create_task(self._listen())
        await self._heartbeat()
        self._watcher = loop.create_task(self._watch())
        from wsd.engine.redis_control import RedisControl  # cluster-wide control requests (wsctl)

        self.control_channel = RedisControl(self)
        await self.control_channel.start()

    async def control(self, method: str, params: dict[str, Any], nodes: list[str] | None = None,
                      deadline_s: float = CONTROL_DEADLINE_S) -> ClusterReply:
        return await self.control_channel.call(method, params, nodes, deadline_s)

    def _bus_connected(self, connection: Any) -> None:
        self._bus_reconnected = True

    async def _listen(self, node: Any = None) -> None:
        """Read one bus connection: the shared one, or (Redis Cluster) the shard channels of one master."""
        loop = asyncio.get_running_loop()
        failing = False
        shards = getattr(self._pubsub, "node_pubsub_mapping", {})
        while True:
            if node is not None and node.name not in shards:
                return  # redis-py dropped this master's connection (no shard channel left on it, or moved)
            try:
                if node is None:
                    msg = await self._pubsub.get_message(timeout=1.0)
                else:
                    msg = await self._pubsub.get_sharded_message(target_node=node, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except self._unavailable as exc:
                if not failing:
                    log.warning("the redis bus connection failed (%s); reconnecting", exc)
                failing = True
                await asyncio.sleep(0.2)
                continue
            except Exception:
                log.exception("redis bus read failed; retrying")
                failing = True
                await asyncio.sleep(0.2)
                continue
            if failing or (node is None and self._bus_reconnected):
                # Whatever was published while the bus was away never comes: look at every channel now.
                failing = False
                if node is None:
                    self._bus_reconnected = False
                self.bus_stats["reconnects"] += 1
                log.info("the redis bus is connected again; checking the subscribed channels' positions")
                self._bus_resync()
                self._spawn(self._check(at_once=True))
            if msg is None:
                continue
            mtype = msg["type"]
            if mtype != "message" and mtype != "smessage":
                if mtype == "subscribe" or mtype == "ssubscribe":
                    self._bus_confirmed(msg["channel"])
                continue
            chan = msg["channel"]
            if chan == self.takeovers:
                self.bus_stats["messages_shared"] += 1
                self._takeover_notice(msg["data"])
                continue
            if chan == self.bus:
                self.bus_stats["messages_shared"] += 1
            else:
                self.bus_stats["messages_channel"] += 1
            try:
                raw: bytes = msg["data"]
                off_s, epoch_b, body = raw.split(b":", 2)
                w = _decode(body)
                pub = _to_pub(w, int(off_s), epoch_b.decode(), loop.time())
                self.received += 1
                reused = False
                if pub.offset and pub.channel in self._last:
                    top = self._bus_top.get(pub.channel)
                    reused = top is not None and top[1] == pub.epoch and pub.offset <= top[0]
                    self._bus_top[pub.channel] = (pub.offset, pub.epoch)
                self._accept(pub, {"broadcast": w.broadcast, "pools": tuple(w.pools),
                                   "companies": tuple(w.companies)}, reused)
            except Exception:
                log.exception("bad publication on the redis bus")

    def _takeover_notice(self, raw: bytes) -> None:
        try:
            node, session_id, owner = raw.decode().split(" ", 2)
        except (UnicodeDecodeError, ValueError):
            log.warning("bad takeover notice on the redis bus")
            return
        if node != self.node_id:
            try:
                self.on_takeover(session_id, owner)
            except Exception:
                log.exception("handling a takeover notice failed")

    # -- per-channel buses ---------------------------------------------------------------------------------
    def _want_bus(self, channel: str) -> asyncio.Future[None]:
        """Subscribe to ``channel``'s bus (if not already): the future is done once Redis confirmed it."""
        self._bus_idle.pop(channel, None)
        fut = self._bus_on.get(channel)
        if fut is None:
            fut = self._bus_on[channel] = asyncio.get_running_loop().create_future()
            name = self.channel_bus(channel)
            self._bus_names[name] = channel
            # An UNSUBSCRIBE not sent yet is dropped; one already sent is followed by this SUBSCRIBE, whose
            # confirmation comes after its own (one connection keeps the order).
            self._bus_todo_unsub.discard(name)
            self._bus_todo_sub.add(name)
            self._bus_kick()
        return fut

    def _bus_kick(self) -> None:
        if self._bus_syncing is None or self._bus_syncing.done():
            self._bus_syncing = asyncio.get_running_loop().create_task(self._bus_sync())

    async def _bus_sync(self) -> None:
        """Send the SUBSCRIBE / UNSUBSCRIBE commands asked for, batched: what one turn of the event loop asked
        for (e.g. many first subscribers at once) goes in one command. Retried while the bus is away."""
        while self._bus_todo_sub or self._bus_todo_unsub:
            await asyncio.sleep(0)
            if not self._bus_up():
                # The listener reconnects the bus (and redis-py subscribes again to what it had): sending on the
                # connection while it does would race its reconnect. What is queued goes once it is back.
                await asyncio.sleep(0.2)
                continue
            unsub = list(self._bus_todo_unsub)
            sub = list(self._bus_todo_sub)
            self._bus_todo_unsub.clear()
            self._bus_todo_sub.clear()
            try:
                # Redis Cluster: shard channels, each sent to the master of its slot (by redis-py)
                unsubscribe = self._pubsub.sunsubscribe if self.sharded else self._pubsub.unsubscribe
                subscribe = self._pubsub.ssubscribe if self.sharded else self._pubsub.subscribe
                for i in range(0, len(unsub), BUS_BATCH):
                    part = unsub[i:i + BUS_BATCH]
                    await unsubscribe(*part)
                    self.bus_stats["unsubscribes"] += len(part)
                for i in range(0, len(sub), BUS_BATCH):
                    part = sub[i:i + BUS_BATCH]
                    await subscribe(*part)
                    self.bus_stats["subscribes"] += len(part)
                self._shard_readers()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, self._unavailable) and self._bus_up():
                    log.exception("subscribing to channel buses failed; retrying")
                else:
                    log.debug("subscribing to channel buses failed: %s; retrying", exc)
                # Sent again what is still wanted (sending one twice is harmless: Redis confirms it again).
                names = self._bus_names
                self._bus_todo_sub.update(n for n in sub if n in names)
                self._bus_todo_unsub.update(n for n in unsub if n not in names)
                await asyncio.sleep(0.2)

    def _shard_readers(self) -> None:
        """Redis Cluster: one reader per master holding channel buses of this node (redis-py keeps one pub/sub
        connection per master for shard channels)."""
        if not self.sharded:
            return
        for name in list(self._pubsub.node_pubsub_mapping):
            task = self._readers.get(name)
            if task is not None and not task.done():
                continue
            node = self._bus_client.get_node(node_name=name)
            if node is not None:
                self._readers[name] = asyncio.get_running_loop().create_task(self._listen(node))

    def _bus_up(self) -> bool:
        """Whether the bus connection is connected (a lost one is reconnected by the listener)."""
        conn = getattr(self._pubsub, "connection", None)
        return conn is not None and bool(conn.is_connected)

    def _bus_confirmed(self, name: bytes) -> None:
        """Redis confirmed a SUBSCRIBE: the channel's bus is live. A position read for it before (the wait for
        the confirmation timed out, or a shared-bus message came first) is caught up from history now: what was
        published before the confirmation never comes on the bus."""
        channel = self._bus_names.get(name)
        if channel is None:
            return
        fut = self._bus_on.get(channel)
        if fut is None or fut.done():
            return
        fut.set_result(None)
        if channel in self._last and channel not in self._filling:
            self.bus_stats["late_confirms"] += 1
            self._start_fill(channel, [])

    def _bus_resync(self) -> None:
        """After a reconnect redis-py subscribed again to what it had: an UNSUBSCRIBE it had not seen confirmed
        is sent again, and a SUBSCRIBE that failed is still queued."""
        names = self._bus_names
        have = self._pubsub.shard_channels if self.sharded else self._pubsub.channels
        extra = [n for n in have if n not in names and n not in (self.bus, self.takeovers)]
        if extra:
            self._bus_todo_unsub.update(extra)
            self._bus_kick()

    def _bus_prune(self, now: float) -> None:
        """Leave the buses of channels without a subscriber here for ``BUS_GRACE_S`` (once a second)."""
        idle = self._bus_idle
        in_use = self.in_use
        for ch in self._bus_on:
            if in_use(ch):
                if ch in idle:
                    del idle[ch]
            elif ch not in idle:
                idle[ch] = now
        drop = [ch for ch, t in idle.items()
                if now - t >= BUS_GRACE_S and ch not in self._filling and self._bus_on[ch].done()]
        for ch in drop:
            del idle[ch]
            del self._bus_on[ch]
            name = self.channel_bus(ch)
            self._bus_names.pop(name, None)
            self._bus_todo_sub.discard(name)
            self._bus_todo_unsub.add(name)
            # Continuity restarts from the next subscriber's position.
            self._last.pop(ch, None)
            self._bus_top.pop(ch, None)
            self._checked.pop(ch, None)
        if drop:
            self._bus_kick()

    def bus_metrics(self) -> dict[str, Any]:
        st = self.bus_stats
        return {"messages_channel": st["messages_channel"], "messages_shared": st["messages_shared"],
                "channels": sum(1 for f in self._bus_on.values() if f.done()), "subscribes": st["subscribes"],
                "unsubscribes": st["unsubscribes"], "fills": st["fills"], "filled": st["filled"], "gaps": st["gaps"]}

    async def announce_takeover(self, session_id: str, owner: str) -> None:
        await self.redis.publish(self.takeovers, f"{self.node_id} {session_id} {owner}".encode())

    def _accept(self, pub: Publication, scope: dict[str, Any], reused: bool = False) -> None:
        """Deliver a bus message unless it shows a hole (fill it first), an offset handed out again (start a new
        epoch, report the loss) or was delivered already."""
        off = pub.offset
        if off:
            ch = pub.channel
            held = self._filling.get(ch)
            if held is not None:
                held.append((pub, scope, reused))  # a fill is running: it goes after what the fill delivers
                return
            last = self._last.get(ch)
            if last is not None:
                if reused and pub.epoch == last[1]:
                    self._start_fill(ch, [], stale=pub.epoch)
                    return
                if off == last[0] + 1 and pub.epoch == last[1]:
                    last[0] = off
                elif off <= last[0] and pub.epoch == last[1]:
                    return  # delivered already (by a fill)
                else:
                    self._start_fill(ch, [(pub, scope, False)])
                    return
            elif self.in_use(ch):
                self._last[ch] = [off, pub.epoch]
        self._deliver(pub, scope)

    def _deliver(self, pub: Publication, scope: dict[str, Any]) -> None:
        try:
            assert self._on_remote is not None
            self._on_remote(pub, scope)
        except Exception:
            log.exception("delivering a publication from the redis bus failed")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_fill(self, channel: str, held: list[tuple[Publication, dict[str, Any], bool]],
                    stale: str = "") -> None:
        self._filling[channel] = held
        self.bus_stats["fills"] += 1
        self._spawn(self._fill(channel, stale))

    async def _fill(self, channel: str, stale: str = "") -> None:
        """Deliver what this node missed of ``channel`` from history, then the bus messages held meanwhile.
        With ``stale`` (an epoch whose offsets Redis hands out again) a new epoch is started first and the loss
        reported."""
        last = self._last[channel]
        since = StreamPosition(last[0], last[1])
        got = None
        renewed = not stale
        for attempt in range(3):
            try:
                if not renewed:
                    await asyncio.wait_for(self._renew(keys=[self._meta(channel), self._hist(channel)],
                                                       args=[stale, secrets.token_hex(4)]), OP_TIMEOUT_S)
                    renewed = True
                got = await asyncio.wait_for(self._read(channel, since=since), OP_TIMEOUT_S)
                break
            except asyncio.CancelledError:
                raise
            except self._unavailable as exc:
                log.warning("reading %s's history to fill a hole after offset %d failed: %s",
                            channel, since.offset, exc)
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("reading %s's history to fill a hole failed", channel)
                break
        current = ""
        try:
            held = self._filling[channel]
            if got is None:
                # History cannot be read: the hole is reported, delivery goes on from the next message.
                first = held[0][0] if held else None
                now = StreamPosition(first.offset, first.epoch) if first else since
                self._gap(channel, since, now)
                del self._last[channel]
                return
            entries, top, epoch = got
            current = epoch
            loop_now = asyncio.get_running_loop().time()
            if not since.epoch and not stale:
                # from a channel that had nothing yet (a position read before its bus was confirmed)
                missing, recovered = entries, (entries[0][0] == 1) if entries else not top
            elif epoch == since.epoch and not stale:
                missing = [e for e in entries if e[0] > since.offset]
                recovered = top <= since.offset or (bool(missing) and missing[0][0] == since.offset + 1)
            elif epoch == since.epoch:
                missing, recovered = [], False  # no new epoch could be started: the loss is still reported
            else:
                missing, recovered = entries, False
            if not recovered:
                self._gap(channel, since, StreamPosition(top, epoch))
            for off, _, body in missing:
                w = _decode(body)
                self._deliver(_to_pub(w, off, epoch, loop_now), {"broadcast": w.broadcast, "pools": tuple(w.pools),
                                                                 "companies": tuple(w.companies)})
                self.bus_stats["filled"] += 1
            if missing:
                last[0], last[1] = missing[-1][0], epoch
            elif epoch != since.epoch and epoch:
                last[0], last[1] = top, epoch
            elif not epoch:
                del self._last[channel]  # Redis holds nothing of the channel now: continuity restarts from the bus
        finally:
            # What the bus brought meanwhile follows, checked again (a later hole starts another fill).
            held = self._filling.pop(channel, [])
            for pub, scope, reused in held:
                if current and pub.epoch != current:
                    continue  # of an epoch Redis no longer has (its loss was reported): stale, not a new hole
                self._accept(pub, scope, reused)

    def _gap(self, channel: str, since: StreamPosition, now: StreamPosition) -> None:
        self.bus_stats["gaps"] += 1
        log.warning("the redis bus missed messages of %s after offset %d (epoch %s) that history no longer "
                    "holds: its subscribers here are told recovered:false", channel, since.offset, since.epoch)
        try:
            self.on_gap(channel, since, now)
        except Exception:
            log.exception("reporting a bus gap failed")

    async def _check(self, at_once: bool = False) -> None:
        """Read the position of every channel with subscribers here (one round trip) and fill what was missed:
        at once (after a bus reconnect), or what was already published at the previous check (once a second:
        a message still on its way over the bus is not taken for a miss)."""
        last_map = self._last
        for ch in [ch for ch in last_map if not self.in_use(ch) and ch not in self._filling]:
            del last_map[ch]
            self._checked.pop(ch, None)
        for ch in [ch for ch in self._bus_top if ch not in last_map]:
            del self._bus_top[ch]
        for ch in [ch for ch in last_map if ch not in self._bus_on]:
            self._want_bus(ch)  # subscribers here whose bus is not subscribed (none came through history())
        chans = list(last_map)
        if not chans:
            return
        # What was delivered before the read: Redis's position cannot be behind it (unless it lost data).
        delivered = {ch: (last_map[ch][0], last_map[ch][1]) for ch in chans}
        try:
            async with self.redis.pipeline(transaction=False) as p:
                for ch in chans:
                    p.hmget(self._meta(ch), "epoch", "offset")
                rows = await asyncio.wait_for(p.execute(), OP_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except self._unavailable as exc:
            log.debug("checking channel positions failed: %s", exc)
            return
        checked = self._checked
        for ch, (epoch_b, off_b) in zip(chans, rows):
            top = (int(off_b) if off_b else 0, epoch_b.decode() if epoch_b else "")
            before = checked.get(ch)
            checked[ch] = top
            last = last_map.get(ch)
            if last is None or ch in self._filling or not top[1]:
                continue
            if top[1] == last[1] == delivered[ch][1] and top[0] < delivered[ch][0]:
                # Redis is behind what was delivered in this epoch (it came back with older data): the offsets
                # after its position would be handed out again
                self._start_fill(ch, [], stale=top[1])
                continue
            ref = top if at_once else before
            if ref is None or ref[1] != top[1]:
                continue
            if (ref[1] == last[1] and ref[0] > last[0]) or (ref[1] != last[1] and (at_once or ref == top)):
                self._start_fill(ch, [])

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            try:
                await self._heartbeat()
            except asyncio.CancelledError:
                raise
            except self._unavailable as exc:
                log.debug("node heartbeat failed: %s", exc)
            except Exception:
                log.exception("node heartbeat failed")
            try:
                await self._follow_master()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("asking the sentinels for the master failed: %s", exc)
            try:
                self._shard_readers()
                self._bus_prune(time.monotonic())
                await self._check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("checking channel positions failed")

    async def _follow_master(self) -> None:
        """Redis Sentinel: once a second, ask the sentinels for the master; a bus connection still on another
        server (the old master, stalled or demoted) is closed, so redis-py reconnects it to the new master and
        subscribes again (then every channel's position is read again, see ``_listen``). The command connections
        need no such check: a command to a server that no longer answers times out, and each new connection asks
        the sentinels."""
        if self._sentinel is None:
            return
        conn = self._pubsub.connection
        if conn is None or not conn.is_connected:
            return
        host, port = await asyncio.wait_for(self._sentinel.discover_master(self._master), OP_TIMEOUT_S)
        if (conn.host, int(conn.port)) != (host, int(port)):
            log.warning("redis sentinel: the master is now %s:%s; moving the bus connection there", host, port)
            await conn.disconnect()

    async def _heartbeat(self) -> None:
        """Refresh this node's registry key (it expires ``NODE_TTL_S`` after the last refresh) and read which
        nodes are alive (their key exists); nodes whose key expired are dropped from the index."""
        reg = f"{self.prefix}:nodes"
        async with self.redis.pipeline(transaction=False) as p:
            p.set(f"{self.prefix}:node:{self.node_id}", _encode({"started_at": self._started}), ex=NODE_TTL_S)
            p.sadd(reg, self.node_id)
            p.smembers(reg)
            *_, members = await asyncio.wait_for(p.execute(), OP_TIMEOUT_S)
        ids = sorted(m.decode() for m in members)
        async with self.redis.pipeline(transaction=False) as p:
            for i in ids:
                p.exists(f"{self.prefix}:node:{i}")
            alive = await asyncio.wait_for(p.execute(), OP_TIMEOUT_S)
        # A node whose key expired without leaving (a clean stop removes it from the index) stalled or died: it
        # stays among the nodes asked, reported missing, for NODE_FORGET_S, then is dropped from the index. So a
        # node that stalled a few seconds (a loaded host) shows as missing, never silently outside the cluster.
        now = asyncio.get_running_loop().time()
        quiet = self._quiet
        gone: list[str] = []
        for i, a in zip(ids, alive):
            if a:
                quiet.pop(i, None)
            elif now - quiet.setdefault(i, now) >= NODE_FORGET_S:
                gone.append(i)
        for i in [i for i in quiet if i not in ids]:
            del quiet[i]
        if gone:
            await asyncio.wait_for(self.redis.srem(reg, *gone), OP_TIMEOUT_S)
            for i in gone:
                quiet.pop(i, None)
        self._nodes = [i for i in ids if i not in gone]

    def live_nodes(self) -> list[str] | None:
        return list(self._nodes)

    async def read_registry(self) -> None:
        """Refresh this node's registry key and read the live nodes now (a control request about to ask them)."""
        await self._heartbeat()

    async def stop(self) -> None:
        if getattr(self, "control_channel", None) is not None:
            await self.control_channel.stop()
        if self._counting is not None:
            self._counting.cancel()
        for task in (self._watcher, self._listener, self._bus_syncing, self._sender, *self._tasks,
                     *self._readers.values()):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        queued, self._outgoing = self._outgoing, []
        _fail(queued, EngineUnavailable("the redis engine is stopping: the message was not acknowledged"))
        with contextlib.suppress(Exception):
            async with self.redis.pipeline(transaction=False) as p:
                p.srem(f"{self.prefix}:nodes", self.node_id)
                p.delete(f"{self.prefix}:node:{self.node_id}")
                await asyncio.wait_for(p.execute(), OP_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()
        with contextlib.suppress(Exception):
            await self._bus_client.aclose()
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def publish(self, pub: Publication, history_size: int, history_ttl_s: float,
                      scope: dict[str, Any] | None = None) -> None:
        """Store, number and share ``pub``: acknowledged (returns) only once Redis ran the publication script.

        Publications made in one loop turn go to Redis together: one pipeline of script calls (``_send``), in
        the order they were made, so one channel's publications keep their order; one batch is in flight at
        a time. Each waits for its own result: Redis not answering within ``OP_TIMEOUT_S`` (or unreachable)
        fails it with ``EngineUnavailable``, and a Redis error on one script call fails that publication only.
        A publication whose wait ended before its batch was sent is not sent.
        """
        scope = scope or {}
        w = _Wire(pub.id, pub.channel, pub.group, pub.type, int(pub.priority), pub.data, pub.ts, pub.ttl_s,
                  pub.source, pub.user_id, pub.company_id, bool(scope.get("broadcast")),
                  list(scope.get("pools", ())), list(scope.get("companies", ())), pub.enc)
        body = _encode(w)
        channel = pub.channel or "_broadcast"
        size = history_size if pub.channel else 0
        # The channel's own bus reaches the nodes with its subscribers; the shared one reaches every node.
        bus = self.bus if not pub.channel or scope.get("broadcast") or scope.get("wide") else self.channel_bus(channel)
        if self.wait_replicas or self.sharded:
            # One call at a time: WAIT must follow the script on its connection; a cluster's shard channels
            # need SPUBLISH's own script.
            from redis.exceptions import ConnectionError as RedisConnectionError
            from redis.exceptions import TimeoutError as RedisTimeoutError

            script = self._script if bus == self.bus else self._script_sharded
            keys = [self._meta(channel), self._hist(channel)]
            args = [secrets.token_hex(4), body, size, int(history_ttl_s), repr(pub.ts), bus, *self._seen(channel)]
            try:
                if self.wait_replicas:
                    # WAIT counts the replicas that have this connection's writes: it follows the script on the
                    # same connection (one pipeline).
                    async with self.redis.pipeline(transaction=False) as p:
                        await script(keys=keys, args=args, client=p)
                        # well within the connection's 1 s socket timeout (a timeout would retry the whole pipeline)
                        p.execute_command("WAIT", self.wait_replicas, WAIT_MS)
                        (off, epoch), copies = await asyncio.wait_for(p.execute(), OP_TIMEOUT_S + 0.5)
                    if int(copies) < self.wait_replicas:
                        raise EngineUnavailable(
                            f"the redis engine stored the message, but only {int(copies)} of the "
                            f"{self.wait_replicas} replicas asked for (engine.wait_replicas) have it: not "
                            f"acknowledged, a failover now could lose it")
                else:
                    off, epoch = await asyncio.wait_for(script(keys=keys, args=args), OP_TIMEOUT_S)
            except (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError) as exc:
                raise EngineUnavailable(f"the redis engine is unavailable ({type(exc).__name__}): the message was not "
                                        f"acknowledged; retry once redis is back") from None
        else:
            # Publications made in one loop turn go to Redis in one pipeline, in order (_send_batches).
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[Any] = loop.create_future()
            self._outgoing.append(_Pending(channel, (self._meta(channel), self._hist(channel)),
                                           (secrets.token_hex(4), body, size, int(history_ttl_s), repr(pub.ts), bus,
                                            *self._seen(channel)), fut))
            if self._sender is None:
                self._sender = loop.create_task(self._send_batches())
            try:
                off, epoch = await asyncio.wait_for(fut, OP_TIMEOUT_S)
            except TimeoutError:
                raise EngineUnavailable("the redis engine is unavailable (TimeoutError): the message was not "
                                        "acknowledged; retry once redis is back") from None
        pub.offset = int(off)
        pub.epoch = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        if pub.channel and size:
            known = self._known
            known.pop(pub.channel, None)
            if len(known) >= self.max_channels:
                self._forget_oldest()
            known[pub.channel] = {"offset": pub.offset, "epoch": pub.epoch,
                                  "until": time.monotonic() + (history_ttl_s if history_ttl_s > 0 else float("inf"))}

    async def _send_batches(self) -> None:
        """Send what ``publish`` queued, a batch (at most ``MAX_BATCH``) at a time, until nothing is queued."""
        try:
            while self._outgoing:
                queued = self._outgoing
                batch = [p for p in queued[:MAX_BATCH] if not p.fut.done()]  # done: its wait ended, not sent
                self._outgoing = queued[MAX_BATCH:]
                if batch:
                    await self._send(batch)
        finally:
            self._sender = None

    async def _send(self, batch: list[_Pending], retried: bool = False) -> None:
        """One pipeline of publication script calls for ``batch``; each publication gets its own result."""
        sha = self._script.sha
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for p in batch:
                    pipe.evalsha(sha, len(p.keys), *p.keys, *p.args)
                results = await asyncio.wait_for(pipe.execute(raise_on_error=False), OP_TIMEOUT_S)
        except asyncio.CancelledError:
            _fail(batch, EngineUnavailable("the redis engine is stopping: the message was not acknowledged"))
            raise
        except Exception as exc:  # unreachable, timed out, or anything else: none of them is acknowledged
            _fail(batch, EngineUnavailable(f"the redis engine is unavailable ({type(exc).__name__}): the message "
                                           f"was not acknowledged; retry once redis is back"))
            return
        from redis.exceptions import NoScriptError

        again: list[_Pending] = []
        for i, (p, res) in enumerate(zip(batch, results)):
            if isinstance(res, NoScriptError) and not retried:
                # Redis lost its script cache (a restart): this call ran nothing. It is sent again once the script
                # is loaded, unless a later publication of its channel in this batch was stored (another client
                # loaded the script meanwhile): sent now, it would come after that one.
                if any(q.channel == p.channel and not isinstance(r, Exception)
                       for q, r in zip(batch[i + 1:], results[i + 1:])):
                    _fail([p], EngineUnavailable("the redis engine lost its scripts: the message was not "
                                                 "acknowledged; retry"))
                else:
                    again.append(p)
            elif isinstance(res, Exception):
                log.warning("redis refused a publication to %s: %s", p.channel[:200], res)
                _fail([p], EngineUnavailable(f"redis refused the publication ({type(res).__name__}): the message "
                                             f"was not acknowledged"))
            elif not p.fut.done():
                p.fut.set_result(res)
        if again:
            try:
                await asyncio.wait_for(self.redis.script_load(_PUBLISH), OP_TIMEOUT_S)
            except asyncio.CancelledError:
                _fail(again, EngineUnavailable("the redis engine is stopping: the message was not acknowledged"))
                raise
            except Exception as exc:  # unreachable, timed out, or anything else: none of them is acknowledged
                _fail(again, EngineUnavailable(f"the redis engine is unavailable ({type(exc).__name__}): the "
                                               f"message was not acknowledged; retry once redis is back"))
                return
            await self._send(again, retried=True)

    def _seen(self, channel: str) -> list[Any]:
        """The highest offsets this node saw of ``channel`` (published, delivered, on the bus) as epoch, offset
        pairs: the publish script starts a new epoch when Redis hands out one of them again."""
        out: list[Any] = []
        k = self._known.get(channel)
        if k:
            out += [k["epoch"], k["offset"]]
        last = self._last.get(channel)
        if last is not None and last[1]:
            out += [last[1], last[0]]
        top = self._bus_top.get(channel)
        if top is not None:
            out += [top[1], top[0]]
        return out

    def _forget_oldest(self) -> None:
        """Forget one position: the least recently published among the 64 oldest that has no subscriber here,
        else the oldest. A bounded look, so a node with more subscribed channels than the cap does not walk
        them all for each new channel (the map is only this node's view; Redis keeps the positions)."""
        known = self._known
        victim = None
        for name in islice(known, 64):
            if not self.in_use(name):
                victim = name
                break
        del known[victim if victim is not None else next(iter(known))]
        self._stats["channels_evicted"] += 1

    async def _read(self, channel: str, newest: int | None = None, since: StreamPosition | None = None,
                    limit: int | None = None) -> tuple[list[tuple[int, float, bytes]], int, str]:
        """The channel's stored entries and position: only the ``newest`` N when given (none for 0); with
        ``since``, only those after it (all when its epoch is not the channel's), at most ``limit``."""
        if since is not None:
            epoch_b, off_b, items = await self._read_since(
                keys=[self._meta(channel), self._hist(channel)],
                args=[max(0, since.offset), since.epoch, limit if limit and limit > 0 else 0])
        else:
            async with self.redis.pipeline(transaction=True) as p:
                p.hmget(self._meta(channel), "epoch", "offset")
                if newest is None or newest > 0:
                    p.lrange(self._hist(channel), -newest if newest else 0, -1)
                (epoch_b, off_b), *rest = await p.execute()
            items = rest[0] if rest else []
        epoch = epoch_b.decode() if epoch_b else ""
        top = int(off_b) if off_b else 0
        entries = []
        for raw in items:
            off_s, ts_s, body = raw.split(b":", 2)
            entries.append((int(off_s), float(ts_s), body))
        return entries, top, epoch

    async def history(self, channel: str, *, limit: int | None = None, since: StreamPosition | None = None,
                      ttl_s: float | None = None) -> HistoryResult:
        late = False
        if self.in_use(channel):
            # A subscriber here: the channel's bus must be live before its position is read, else what is
            # published in between would reach neither the history read nor this node's bus.
            fut = self._want_bus(channel)
            if not fut.done():
                try:
                    await asyncio.wait_for(asyncio.shield(fut), OP_TIMEOUT_S)
                except TimeoutError:
                    late = True
                    # Read anyway; the confirmation, when it comes, fills what was published meanwhile.
                    log.debug("the bus of %s is not confirmed yet; reading its position anyway", channel)
        # Only what is asked for is read: the newest `limit` (none for a subscribe without history), or what
        # follows `since`.
        entries, top, epoch = await self._read(channel, limit if since is None else None, since, limit)
        if (top or late) and channel not in self._last:
            # Continuity on the bus is checked from here (the first subscriber's position); the check forgets
            # it again if nobody here subscribes. Read before the bus was confirmed, even an empty channel's
            # position is kept: the confirmation fills from it.
            self._last[channel] = [top, epoch]
        loop_now = asyncio.get_running_loop().time()
        if ttl_s is None:
            g = getattr(self, "groups", {}).get(channel.split("/", 1)[0])
            ttl_s = float(g.history_ttl_s) if g is not None else None
        if ttl_s:
            cutoff = time.time() - ttl_s
            entries = [e for e in entries if e[1] >= cutoff]
        pos = StreamPosition(top, epoch)
        if since is None:
            chosen = entries if limit is None else (entries[-limit:] if limit > 0 else [])
            recovered = True
        else:
            if epoch and since.epoch != epoch:
                chosen, recovered = entries, False
            elif not epoch:
                chosen, recovered = [], since.offset == 0
            else:
                chosen = [e for e in entries if e[0] > since.offset]
                if since.offset > top:
                    recovered = False
                elif since.offset == top:
                    recovered = True
                else:
                    recovered = bool(chosen) and chosen[0][0] == since.offset + 1
            if limit is not None:
                chosen = chosen[:limit]
        # data stays encoded (msgspec.Raw): the push is built around its bytes, never decoded/re-encoded
        pubs = [_to_pub(_decode_stored(body), off, epoch, loop_now) for off, _, body in chosen]
        return HistoryResult(pubs, pos, recovered)

    def position(self, channel: str) -> StreamPosition:
        k = self._known.get(channel)
        return StreamPosition(k["offset"], k["epoch"]) if k else StreamPosition(0, "")

    def channels(self) -> dict[str, dict[str, Any]]:
        return {ch: {"depth": None, "offset": v["offset"], "epoch": v["epoch"]} for ch, v in self._known.items()}

    async def save_session(self, session_id: str, owner: str, blob: bytes, ttl_s: float) -> bool:
        key = f"{self._sess}session:{session_id}"
        if len(blob) > self.max_session_bytes:
            self._stats["sessions_refused"] += 1
            log_refused(len(blob), self.max_session_bytes)
            await self.drop_session(session_id)
            return False
        evicted, expired = await self._save_session(
            keys=[key, f"{self._sess}sessions:user:{owner}", f"{self._sess}sessions"],
            args=[blob, max(1, int(ttl_s)), repr(time.time()), self.max_sessions_per_user, self.max_sessions,
                  f"{self._sess}session:", session_id])
        self._stats["sessions_evicted"] += int(evicted)
        self._stats["sessions_expired"] += int(expired)
        return True

    async def save_live_sessions(self, sessions: list[tuple[str, str, bytes]], ttl_s: float) -> None:
        """Live sessions in one pipeline (one round trip): each key set with its TTL, and taken out of the
        indexes of kept sessions (a resumed one was in them): live sessions are bounded by the connection
        limits, not counted or evicted as disconnected ones; the save at close indexes them again."""
        ttl = max(1, int(ttl_s))
        async with self.redis.pipeline(transaction=False) as p:
            for session_id, owner, blob in sessions:
                key = f"{self._sess}session:{session_id}"
                if len(blob) > self.max_session_bytes:
                    p.delete(key)  # not kept; counted and logged once, by the save when the connection closes
                else:
                    p.set(key, blob, ex=ttl)
                p.zrem(f"{self._sess}sessions", session_id)
                p.zrem(f"{self._sess}sessions:user:{owner}", session_id)
            await p.execute()

    async def load_session(self, session_id: str) -> bytes | None:
        raw = await self.redis.get(f"{self._sess}session:{session_id}")
        return bytes(raw) if raw else None

    async def drop_session(self, session_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as p:
            p.delete(f"{self._sess}session:{session_id}")
            p.zrem(f"{self._sess}sessions", session_id)
            await p.execute()

    def sweep(self) -> None:
        """Forget positions of unused instances whose history has expired; count the stored sessions
        (their keys expire in Redis by themselves; the index is trimmed here) in the background."""
        now = time.monotonic()
        known = self._known
        stale = [ch for ch, v in known.items() if v["until"] <= now and not self.in_use(ch)]
        for ch in stale:
            del known[ch]
        self._stats["channels_expired"] += len(stale)
        if self._counting is None or self._counting.done():
            self._counting = asyncio.get_running_loop().create_task(self._count_sessions())

    async def _count_sessions(self) -> None:
        try:
            async with self.redis.pipeline(transaction=True) as p:
                p.zremrangebyscore(f"{self._sess}sessions", "-inf", repr(time.time()))
                p.zcard(f"{self._sess}sessions")
                expired, count = await p.execute()
            self._stats["sessions_expired"] += int(expired)
            self._stats["sessions"] = int(count)
        except Exception:
            log.warning("counting sessions in redis failed", exc_info=True)

    def memory_stats(self) -> dict[str, Any]:
        return {**self._stats, "channels": len(self._known)}

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "node_id": self.node_id, "url": self._shown_url, "mode": self.mode,
                "received": self.received, "bus": dict(self.bus_stats)}


def _host_port(addr: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:26379"`` for IPv6) as redis-py takes an address."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def _redact_url(url: str) -> str:
    """A Redis URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user + ':' if user else ''}***@{host}"
    return url
