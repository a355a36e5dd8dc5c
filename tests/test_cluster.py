"""Operating a cluster as one: the real wsctl against one node of three sharing a real redis-server.

Every view and action covers every node (rows carry the node id); --node and --local narrow; a node that does not
answer (SIGSTOPped) is reported missing within the deadline and never waited for beyond it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Wsd, closed_with, make_token, recv_until, request, wait_for, welcome
from wsd.engine.base import CONTROL_DEADLINE_S

WSCTL = [sys.executable, "-m", "wsctl"]
ROOT = Path(__file__).resolve().parents[1]
#: what a request may take beyond the deadline on a loaded 2-core machine
SLACK_S = 1.0


class Result:
    def __init__(self, args: tuple[str, ...], rc: int, out: str, err: str, took: float) -> None:
        self.args, self.rc, self.out, self.err, self.took = args, rc, out, err, took

    def json(self) -> Any:
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"wsctl {' '.join(self.args)} -> {self.rc} in {self.took:.2f}s\nstdout: {self.out}\nstderr: {self.err}"


async def wsctl(w: Wsd, *args: str) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSD_")}
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*WSCTL, "--socket", w.socket, *args, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env=env, cwd=ROOT)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Result(args, proc.returncode, out.decode(), err.decode(), time.monotonic() - t0)


def ok(r: Result) -> Result:
    assert r.rc == 0, r
    return r




@pytest.fixture
def prefix() -> str:
    return "c" + secrets.token_hex(3)


@pytest.fixture
def cluster(wsd_factory, redis_server, prefix) -> list[Wsd]:
    """Three nodes sharing one redis-server (their keys under ``prefix``)."""
    toml = f'[engine]\ntype = "redis"\nurl = "{redis_server.url}"\nprefix = "{prefix}"\n'
    nodes = [wsd_factory(toml) for _ in range(3)]
    return nodes


async def node_ids(nodes: list[Wsd]) -> list[str]:
    ids = [(await n.ctl("status", local=True))["engine"]["node_id"] for n in nodes]

    async def all_see_all() -> bool:
        for n in nodes:
            if set((await n.ctl("status", local=True))["nodes"]) != set(ids):
                return False
        return True

    await wait_for(all_see_all, timeout=10)
    return ids


async def connect(w: Wsd, user: str, company: str = "acme") -> Any:
    ws = await w.connect("frontend", make_token(user, company))
    hello = await welcome(ws)
    ws.cid = hello["connection_id"]
    return ws


async def test_kick_on_one_node_closes_a_users_connections_on_every_node(cluster):
    """`wsctl kick --user alice --user bob` on node B closes alice's and bob's connections on A, B and C (both users:
    the option is a list), and nobody else's."""
    a, b, c = cluster
    await node_ids(cluster)
    alice_a, alice_c, bob_b, carol_a = (await connect(a, "alice"), await connect(c, "alice"), await connect(b, "bob"),
                                        await connect(a, "carol"))
    r = ok(await wsctl(b, "--json", "kick", "--user", "alice", "--user", "bob", "--reason", "suspended"))
    res = r.json()
    assert res["closed"] == 3 and res["missing"] == [], r
    assert sorted(res["ids"]) == sorted([alice_a.cid, alice_c.cid, bob_b.cid])
    for ws in (alice_a, alice_c, bob_b):
        assert await closed_with(ws) == (4000, "suspended")
    pong = await request(carol_a, {"op": "ping", "id": 7})  # carol is still connected
    assert pong["ok"], pong
    await carol_a.close()


async def test_connections_lists_every_node_with_its_id_and_node_or_local_narrow(cluster):
    """`wsctl connections` on one node lists the connections of all three with their node ids; --node ID and --local
    narrow the view to one node; a node id nobody has is a clear error."""
    a, b, c = cluster
    ids = await node_ids(cluster)
    conns = [await connect(n, f"u{i}") for i, n in enumerate(cluster)]
    res = ok(await wsctl(a, "--json", "connections")).json()
    assert res["total"] == 3 and res["missing"] == [] and sorted(res["nodes"]) == sorted(ids)
    where = {row["id"]: row["node"] for row in res["items"]}
    assert where == {ws.cid: ids[i] for i, ws in enumerate(conns)}
    human = ok(await wsctl(a, "connections"))
    assert "NODE" in human.out.splitlines()[0]
    for i, ws in enumerate(conns):
        line = next(ln for ln in human.out.splitlines() if ws.cid[:8] in ln)
        assert ids[i] in line
    only_c = ok(await wsctl(a, "--json", "connections", "--node", ids[2])).json()
    assert [row["id"] for row in only_c["items"]] == [conns[2].cid] and only_c["nodes"] == [ids[2]]
    local = ok(await wsctl(b, "--json", "--local", "connections")).json()
    assert [row["id"] for row in local["items"]] == [conns[1].cid] and local["nodes"] == [ids[1]]
    bad = await wsctl(a, "connections", "--node", "nosuchnode")
    assert bad.rc == 1 and "no live node 'nosuchnode'" in bad.err, bad
    # status covers the cluster: the sum, and each node's own figures
    st = ok(await wsctl(a, "--json", "status")).json()
    assert st["connections"] == 3 and sorted(st["nodes"]) == sorted(ids)
    assert {n["node"]: n["connections"] for n in st["node_stats"]} == {i: 1 for i in ids}
    for ws in conns:
        await ws.close()


async def test_connection_send_and_kick_by_id_reach_the_node_holding_it(cluster):
    """A connection id (or a unique prefix of it) given to node A reaches the node holding that connection."""
    a, b, c = cluster
    ids = await node_ids(cluster)
    ws = await connect(c, "dave")
    one = ok(await wsctl(a, "--json", "connection", ws.cid[:10])).json()
    assert one["id"] == ws.cid and one["node"] == ids[2] and one["user_id"] == "dave"
    sent = ok(await wsctl(b, "--json", "send", ws.cid, "--type", "notice", "--data", '{"n": 1}')).json()
    assert sent["node"] == ids[2] and sent["delivered"] == 1
    msg = await recv_until(ws, lambda m: m.get("msg_type") == "notice")
    assert msg["data"] == {"n": 1}
    subs = ok(await wsctl(a, "--json", "subscriptions", ws.cid)).json()
    assert subs["missing"] == [] and all(s["node"] == ids[2] for s in subs["items"])
    gone = await wsctl(a, "kick", "0123456789abcdef")
    assert gone.rc == 1 and "no connection '0123456789abcdef'" in gone.err, gone
    kicked = ok(await wsctl(a, "--json", "kick", ws.cid)).json()
    assert kicked["closed"] == 1 and kicked["by_node"] == {ids[2]: 1}
    assert (await closed_with(ws))[0] == 4000


async def test_a_stopped_node_is_missing_within_the_deadline(cluster, redis_server, prefix):
    """A node that does not answer (SIGSTOP, its registry key not expired: the test keeps it as a hung node's would
    be for up to 3 s) is reported missing, each command returns within the deadline and a little slack, and what
    the other nodes answered is there."""
    a, b, c = cluster
    ids = await node_ids(cluster)
    conns = [await connect(a, "erin"), await connect(b, "erin")]
    keep = asyncio.Event()
    r = redis_server.client()

    async def keep_key() -> None:  # the stopped node's registry key stays as if it had just refreshed it
        while not keep.is_set():
            await asyncio.to_thread(r.set, f"{prefix}:node:{ids[2]}", b"{}", ex=3)
            await asyncio.sleep(0.5)

    keeper = asyncio.get_running_loop().create_task(keep_key())
    c.signal(signal.SIGSTOP)
    try:
        # the request itself, on the socket: the deadline and a little slack, not more
        t0 = time.monotonic()
        res = await a.ctl("connections.list")
        took = time.monotonic() - t0
        assert res["missing"] == [ids[2]] and res["total"] == 2, res
        assert CONTROL_DEADLINE_S * 0.9 <= took < CONTROL_DEADLINE_S + SLACK_S, took  # waited for, never longer
        listed = ok(await wsctl(a, "--json", "connections"))  # and wsctl says the same
        assert listed.json()["missing"] == [ids[2]], listed
        human = ok(await wsctl(a, "kick", "--user", "erin"))
        warning = [ln for ln in human.err.splitlines() if ln.startswith("wsctl: warning:")]
        assert len(warning) == 1 and ids[2] in warning[0] and "missing" in warning[0], human
        assert "closed 2 connections" in human.out
        for ws in conns:
            assert (await closed_with(ws))[0] == 4000
        st = ok(await wsctl(a, "status"))
        assert "no answer (missing)" in st.out and ids[2] in st.out, st
    finally:
        keep.set()
        await keeper
        c.signal(signal.SIGCONT)


async def test_events_stream_carries_the_other_nodes_events(cluster):
    """`wsctl events -f` on node A shows a connect on node C, tagged with C's node id."""
    a, b, c = cluster
    ids = await node_ids(cluster)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSD_")}
    proc = await asyncio.create_subprocess_exec(*WSCTL, "--socket", a.socket, "--json", "events", "-f", "-n", "50",
                                                "--kind", "connect", stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT)
    try:
        # Whether the stream starts before or after the connection, the event comes once: from the backlog or later.
        ws = await connect(c, "frank")
        assert proc.stdout is not None
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), 10)
            assert line, "the stream ended"
            ev = json.loads(line)
            if ev.get("connection_id") == ws.cid:
                break
        assert ev["node"] == ids[2] and ev["event"] == "connect" and ev["user_id"] == "frank"
        await ws.close()
    finally:
        proc.kill()
        await proc.wait()


async def test_one_node_alone_answers_in_the_same_shape(wsd):
    """The memory engine: one node (named by manager_id), the same reply shape, --local works, another node id is a
    clear error, and kick --user takes several users."""
    a, b, c = await connect(wsd, "alice"), await connect(wsd, "bob"), await connect(wsd, "carol")
    res = ok(await wsctl(wsd, "--json", "connections")).json()
    assert res["nodes"] == ["ws-manager-v1"] and res["missing"] == [] and res["total"] == 3
    assert {row["node"] for row in res["items"]} == {"ws-manager-v1"}
    human = ok(await wsctl(wsd, "connections"))
    assert "NODE" not in human.out and not human.err  # one node: no node column, no warning
    assert ok(await wsctl(wsd, "--json", "--local", "connections")).json()["total"] == 3
    bad = await wsctl(wsd, "--node", "elsewhere", "connections")
    assert bad.rc == 1 and bad.err == "wsctl: error: no live node 'elsewhere' (nodes: ws-manager-v1)\n", bad
    both = await wsctl(wsd, "--node", "ws-manager-v1", "--local", "status")
    assert both.rc == 2 and "--local and --node cannot be combined" in both.err, both
    kicked = ok(await wsctl(wsd, "--json", "kick", "--user", "alice", "--user", "bob")).json()
    assert kicked["closed"] == 2 and sorted(kicked["ids"]) == sorted([a.cid, b.cid])
    assert (await closed_with(a))[0] == 4000 and (await closed_with(b))[0] == 4000
    assert (await request(c, {"op": "ping", "id": 1}))["ok"]
    await c.close()


async def test_control_channel_carries_no_token_and_survives_garbage(wsd_factory, redis_server, prefix):
    """What travels on the control channel never holds a client's token; garbage and unknown methods published there
    by whoever can reach Redis get dropped or an error reply, and the nodes keep answering."""
    toml = f'[engine]\ntype = "redis"\nurl = "{redis_server.url}"\nprefix = "{prefix}"\n'
    a, b = wsd_factory(toml), wsd_factory(toml)
    ids = await node_ids([a, b])
    r = redis_server.client()
    ps = r.pubsub()
    ps.psubscribe(f"{prefix}:ctl*")
    token = make_token("grace", "acme")
    ws = await b.connect("frontend", token)
    cid = (await welcome(ws))["connection_id"]
    for garbage in (b"not json", b'{"id": 1}', b'{"id": "x", "from": "n", "method": 5}', b"\xff" * 100):
        r.publish(f"{prefix}:ctl", garbage)
    # a request nobody's code sends: an error reply, on the asker's reply channel
    r.publish(f"{prefix}:ctl", json.dumps({"id": "r1", "from": "tester", "method": "token", "params": {"user": "x"},
                                           "nodes": None, "deadline_s": 1}))
    one = ok(await wsctl(a, "--json", "connection", cid)).json()
    assert one["node"] == ids[1] and one["user_id"] == "grace"
    seen: list[bytes] = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        msg = await asyncio.to_thread(ps.get_message, timeout=0.2)
        if msg and msg["type"] == "pmessage":
            seen.append(msg["data"])
    replies = [json.loads(m) for m in seen if m.startswith(b'{"id":"r1"')]
    assert replies and all(x["reply"]["error"]["code"] == "unknown_method" for x in replies), seen
    assert any(b"grace" in m for m in seen)  # the connection's reply did travel here
    assert not any(token.encode() in m or token.split(".")[2].encode() in m for m in seen)
    ps.close()
    await ws.close()
