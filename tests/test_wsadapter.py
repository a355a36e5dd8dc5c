"""The websockets adapter keeps a connection as small as websockets' own."""

from __future__ import annotations

import sys

from websockets.asyncio.server import ServerConnection
from websockets.server import ServerProtocol

from wsd.runtime.wsadapter import WsdServerConnection


class _Server:
    pass


async def test_our_connection_keeps_the_shared_key_dict_of_websockets_connection():
    """CPython shares one key table between instance dicts only up to 30 keys; past that each connection's
    __dict__ is its own (~1.3 KiB more per connection). Ours must stay within the shared table."""
    plain = ServerConnection(ServerProtocol(), _Server())
    ours = WsdServerConnection(ServerProtocol(), _Server())
    for c in (plain, ours):  # connection_made adds websockets' recv_messages and transport
        c.recv_messages = c.transport = None
    ours.wsd_hs = None  # the handler drops the handshake state once admitted
    assert len(ours.__dict__) <= 30, sorted(set(ours.__dict__) - set(plain.__dict__))
    assert sys.getsizeof(ours.__dict__) == sys.getsizeof(plain.__dict__)
