"""The reference server for the fan-out benchmark: bare ``websockets`` and nothing else.

Every connection is a subscriber, except one on ``--publish-path`` (default ``/publish``): each text
frame received there is relayed unchanged to all subscribers with ``websockets.broadcast()``. No
authentication, no JSON parsing, no queues: the baseline wsd is compared against.

Per-user traffic (benchmarks/per_user.py): a subscriber connecting with ``?user=ID`` is also kept in a
dict by that id, and each text frame ``ID PAYLOAD`` received on ``--user-publish-path`` (default
``/publish-user``) is sent (``PAYLOAD`` only) to that user's connection: one dict look-up and one send.

When ready it prints one JSON line on stdout: ``{"pid": .., "host": .., "port": .., "publish_path": ..}``.
It stops on SIGTERM or SIGINT.

    python benchmarks/bare_server.py --port 0 --ping-interval 30 --uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
from collections.abc import AsyncIterator

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


async def run(args: argparse.Namespace) -> None:
    subscribers: set[ServerConnection] = set()
    users: dict[bytes, ServerConnection] = {}
    publish_path = args.publish_path
    user_publish_path = args.user_publish_path

    async def handler(ws: ServerConnection) -> None:
        path, _, query = (ws.request.path if ws.request is not None else "/").partition("?")
        if path == publish_path:
            async for frame in _frames(ws):
                broadcast(subscribers, frame, text=True)
            return
        if path == user_publish_path:
            async for frame in _frames(ws):
                user, _, payload = frame.partition(b" ")
                conn = users.get(user)
                if conn is not None:
                    broadcast((conn,), payload, text=True)
            return
        user = query[5:].encode() if query.startswith("user=") else None
        subscribers.add(ws)
        if user is not None:
            users[user] = ws
        try:
            await ws.wait_closed()
        finally:
            subscribers.discard(ws)
            if user is not None and users.get(user) is ws:
                del users[user]

    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def request_stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)

    ping_interval = args.ping_interval if args.ping_interval > 0 else None
    async with serve(
        handler,
        args.host,
        args.port,
        compression=None,
        ping_interval=ping_interval,
        ping_timeout=ping_interval,
        backlog=args.backlog,
        max_size=1 << 20,
    ) as server:
        port = server.sockets[0].getsockname()[1]
        print(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": args.host,
                    "port": port,
                    "publish_path": publish_path,
                    "user_publish_path": user_publish_path,
                    "loop": type(loop).__module__.split(".")[0],
                }
            ),
            flush=True,
        )
        await stop
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), timeout=5)


async def _frames(ws: ServerConnection) -> AsyncIterator[bytes]:
    """Yield received frames as bytes (no str round trip) until the connection closes."""
    while True:
        try:
            yield await ws.recv(decode=False)
        except ConnectionClosed:
            return


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--publish-path", default="/publish")
    p.add_argument("--user-publish-path", default="/publish-user", help="per-user frames: 'ID PAYLOAD'")
    p.add_argument("--ping-interval", type=float, default=30.0, help="seconds; 0 disables pings")
    p.add_argument("--backlog", type=int, default=1024)
    p.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = p.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        p.error("the benchmark server only listens on loopback")
    raise_fd_limit()
    if args.uvloop:
        import uvloop

        uvloop.run(run(args))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
