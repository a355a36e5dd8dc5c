"""Follow one wsd channel with the Python client (wsd.client, docs/client.md) and print what arrives.

    TOKEN=$(wsctl token --user bob --company acme) python examples/python/follow.py
    TOKEN=$(wsctl token --user bob --company acme) python examples/python/follow.py \
        --publish '{"symbol":"GBPUSD","side":"sell"}'

It connects to the api pool, subscribes to `trading-signals` (the company's instance, e.g.
trading-signals/acme) with its last 5 messages, optionally publishes one message there itself, and prints one
line per message and per gap until Ctrl-C (or `--count` messages). The client reconnects and resumes by
itself: stop and start wsd and it goes on, printing a GAP line where messages may be missing (the memory
engine loses history on a restart). The token is read from $TOKEN, never from the command line (a process's
arguments are visible to every user of the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from wsd.client import Client, ClientError, Gap


def show(item: object) -> str:
    """One line for a Message or a Gap; data as JSON (control characters escaped: it comes from outside)."""
    if isinstance(item, Gap):
        last = f"#{item.last.offset}" if item.last else "the start"
        resumed = f"#{item.resumed.offset}" if item.resumed else "now"
        return f"GAP in {item.channel} between {last} and {resumed}: {item.reason}"
    m = item
    replay = " (history)" if m.history else ""
    return f"{m.channel} #{m.offset} [{m.type}]{replay} {json.dumps(m.data)}"


async def follow(args: argparse.Namespace, token: str) -> int:
    client = Client(args.url, token, connect_timeout=args.connect_timeout,
                    on_state=lambda state: print(f"-- {state}", file=sys.stderr, flush=True))
    async with client:
        sub = await client.subscribe(args.channel, history=args.history)
        print(f"-- subscribed to {sub.channel} as {client.welcome['user_id']}", file=sys.stderr, flush=True)
        if args.publish is not None:
            reply = await client.publish(args.channel, json.loads(args.publish), type=args.type)
            print(f"-- published {reply['channel']} #{reply['offset']} (delivered to {reply['delivered']})",
                  file=sys.stderr, flush=True)
        seen = 0
        async for item in sub:
            print(show(item), flush=True)
            if not isinstance(item, Gap):
                seen += 1
                if args.count and seen >= args.count:
                    break
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="ws://127.0.0.1:8765/ws/api",
                   help="the pool's URL (default: %(default)s)")
    p.add_argument("--channel", default="trading-signals",
                   help="channel group or instance (default: %(default)s)")
    p.add_argument("--history", type=int, default=5, help="messages of history first (default: %(default)s)")
    p.add_argument("--publish", metavar="JSON", help="publish this JSON value to the channel once subscribed")
    p.add_argument("--type", default="trading_signal",
                   help="message type of --publish (default: %(default)s)")
    p.add_argument("--count", type=int, default=0,
                   help="exit after this many messages (default: run until Ctrl-C)")
    p.add_argument("--connect-timeout", type=float, default=10.0,
                   help="seconds to wait for the first connection (default: %(default)s)")
    args = p.parse_args()
    token = os.environ.get("TOKEN", "").strip()
    if not token:
        p.error("no token: run it as "
                "TOKEN=$(wsctl token --user bob --company acme) python examples/python/follow.py")
    if args.publish is not None:
        try:
            json.loads(args.publish)
        except ValueError as exc:
            p.error(f"--publish is not JSON: {exc}")
    try:
        return asyncio.run(follow(args, token))
    except KeyboardInterrupt:
        return 0
    except (ClientError, TimeoutError) as exc:
        print(f"follow.py: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
