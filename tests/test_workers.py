"""`wsd serve --workers N`: real workers on one port (SO_REUSEPORT) over a real redis-server, one control socket.

Both workers take connections, the one control socket sees both (the real wsctl), SIGTERM drains both with 1001,
a worker killed with SIGKILL is restarted and its clients resume, SIGHUP reloads every worker, and the autoscaler
adds a worker under load and retires one (drained, its clients resumed elsewhere) when the load is gone. The
scaling decision itself is a pure unit tested with an injected clock.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (BASE_CONFIG, Wsd, closed_with, free_port, make_token, wait_for, 
                           welcome)
from wsd.core.scaling import Scaler, WorkerCount, WorkerCountError, parse_workers

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname().split(".")[0] or "wsd"
W1, W2 = f"{HOST}-w1", f"{HOST}-w2"


# -- the pure parts ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,cpus,want", [
    (1, 2, WorkerCount(1, 1)), ("3", 2, WorkerCount(3, 3)), ("auto", 4, WorkerCount(4, 4)),
    ("auto", 0, WorkerCount(1, 1)), ("auto:1-4", 2, WorkerCount(1, 4)), ("auto:2-2", 2, WorkerCount(2, 2)),
])
def test_worker_count_values(value, cpus, want):
    assert parse_workers(value, cpus) == want
    assert want.scaling == (want.high > want.low)


@pytest.mark.parametrize("value", [0, "0", -1, "lots", "auto:3-1", "auto:0-2", "auto:1-", "1000", True, "2.5"])
def test_worker_count_refuses_nonsense(value):
    with pytest.raises(WorkerCountError):
        parse_workers(value, 2)


def scaler(**kw: Any) -> Scaler:
    args = dict(up_cpu=0.75, down_cpu=0.25, up_after_s=10.0, down_after_s=30.0)
    args.update(kw)
    return Scaler(1, 3, **args)  # type: ignore[arg-type]


def test_scaler_adds_only_after_the_load_stays_high():
    s = scaler()
    assert s.decide(0.0, 0.9, 1) == 0
    assert s.decide(5.0, 0.9, 1) == 0
    assert s.decide(9.9, 0.9, 1) == 0
    assert s.decide(10.0, 0.9, 1) == 1
    # the clock starts over after a change: the new worker needs time before its share shows
    assert s.decide(11.0, 0.9, 2) == 0
    assert s.decide(20.9, 0.9, 2) == 0
    assert s.decide(21.0, 0.9, 2) == 1
    assert s.decide(40.0, 0.9, 3) == 0  # at the maximum
    assert s.decide(99.0, 0.9, 3) == 0


def test_scaler_a_dip_restarts_the_clock():
    s = scaler()
    assert s.decide(0.0, 0.9, 1) == 0
    assert s.decide(8.0, 0.5, 1) == 0  # between the thresholds: neither clock runs
    assert s.decide(9.0, 0.9, 1) == 0
    assert s.decide(18.0, 0.9, 1) == 0
    assert s.decide(19.0, 0.9, 1) == 1


def test_scaler_retires_after_the_load_stays_low_and_never_below_the_minimum():
    s = scaler()
    assert s.decide(0.0, 0.1, 3) == 0
    assert s.decide(29.0, 0.1, 3) == 0
    assert s.decide(30.0, 0.1, 3) == -1
    assert s.decide(31.0, 0.1, 2) == 0
    assert s.decide(60.0, 0.3, 2) == 0  # above scale_down_cpu: the clock stops
    assert s.decide(61.0, 0.1, 2) == 0
    assert s.decide(91.0, 0.1, 2) == -1
    assert s.decide(200.0, 0.0, 1) == 0  # at the minimum
    assert s.decide(400.0, 0.0, 1) == 0


def test_scaler_a_crash_restarts_the_clocks():
    s = scaler()
    s.decide(0.0, 0.9, 1)
    s.changed()
    assert s.decide(10.0, 0.9, 1) == 0
    assert s.decide(20.0, 0.9, 1) == 1


# -- the command line --------------------------------------------------------------------------------------------
def run_wsd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSD_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "wsd", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env=env)


def test_memory_engine_with_workers_is_one_line_and_exit_2(tmp_path):
    r = run_wsd("serve", "--workers", "2", "--port", str(free_port()), "--socket", str(tmp_path / "s.sock"),
                cwd=tmp_path)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'engine.type = "redis"' in lines[0] and lines[0].startswith("wsd: error:"), r.stderr
    assert not (tmp_path / "s.sock").exists()


@pytest.mark.parametrize("value", ["0", "lots", "auto:3-1"])
def test_bad_workers_value_is_a_usage_error(tmp_path, value):
    r = run_wsd("serve", "--workers", value, "--socket", str(tmp_path / "s.sock"), cwd=tmp_path)
    assert r.returncode == 2, r
    assert r.stderr.startswith("wsd: error: --workers:") and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("toml,path", [
    ('count = "many"', "workers.count"),
    ("scale_up_cpu = 0.2\nscale_down_cpu = 0.5", "workers.scale_down_cpu"),
    ("scale_up_cpu = 2.0", "workers.scale_up_cpu"),
    ("scale_down_after_s = 0", "workers.scale_down_after_s"),
    ("spare = 1", "workers.spare"),
])
def test_bad_workers_keys_name_the_key_path(tmp_path, toml, path):
    cfg = tmp_path / "w.toml"
    cfg.write_text(f"[workers]\n{toml}\n")
    r = run_wsd("serve", "-c", str(cfg), "--socket", str(tmp_path / "s.sock"), cwd=tmp_path)
    assert r.returncode == 1, r
    assert path in r.stderr, r.stderr


# -- real workers ------------------------------------------------------------------------------------------------


@pytest.fixture
def start_workers(tmp_path, redis_server):
    started: list[Wsd] = []

    def make(workers: str = "2", extra: str = "", env_extra: dict[str, str] | None = None) -> Wsd:
        d = tmp_path / f"w{len(started)}"
        d.mkdir()
        toml = f'[engine]\ntype = "redis"\nurl = "{redis_server.url}"\nprefix = "w{os.getpid()}"\n{extra}'
        env = {k: v for k, v in os.environ.items() if not k.startswith("WSD_")}
        env["PYTHONPATH"] = str(ROOT)
        env.update(env_extra or {})
        w = Wsd(d, BASE_CONFIG + "\n" + toml, env=env, args=["--workers", workers])
        started.append(w)
        return w.start(timeout=30)

    yield make
    for w in started:
        w.stop(timeout=20)


async def wsctl(w: Wsd, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSD_")}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "wsctl", "--socket", w.socket, *args,
                                                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def nodes_ready(w: Wsd, want: set[str], timeout: float = 30) -> dict[str, Any]:
    st: dict[str, Any] = {}

    async def ready() -> bool:
        nonlocal st
        try:
            st = await w.ctl("status")
        except Exception:
            return False
        items = st.get("workers", {}).get("items", [])
        return (set(st.get("answered", [])) == want and {i["node"] for i in items} == want
                and all(i["ready"] for i in items))

    await wait_for(ready, timeout=timeout, step=0.2)
    return st


async def connect(w: Wsd, user: str, session: str = "") -> Any:
    query = {"session": session} if session else {}
    ws = await w.connect("frontend", make_token(user), query=query)
    hello = await welcome(ws)
    ws.hello = hello
    ws.user = user
    return ws


async def where(w: Wsd, nodes: set[str] | None = None) -> dict[str, str]:
    """connection id -> node id, from the cluster-wide list, once it covers ``nodes`` (a node's view of the
    registry can lag a moment behind: its answer then covers itself only, without naming the other missing)."""
    res: dict[str, Any] = {}

    async def covers() -> bool:
        nonlocal res
        res = await w.ctl("connections.list", limit=1000)
        return nodes is None or set(res["nodes"]) >= nodes

    await wait_for(covers, timeout=10, step=0.1)
    return {row["id"]: row["node"] for row in res["items"]}


async def spread(w: Wsd, nodes: set[str], most: int = 60) -> list[Any]:
    """Connect until connections land on every node in ``nodes`` (the kernel hashes each connection to one); each
    connection's ``node`` is where the cluster-wide list placed it then."""
    conns: list[Any] = []
    for i in range(most):
        conns.append(await connect(w, f"u{i}"))
        if i % 4 == 3:
            on = await where(w, nodes)
            if set(on.values()) >= nodes:
                for ws in conns:
                    ws.node = on.get(ws.hello["connection_id"], "")
                return conns
    raise AssertionError(f"{most} connections did not reach every node of {nodes}: {await where(w)}")


@pytest.mark.timeout(240)  # worker starts on a loaded 2-core machine
async def test_two_workers_share_the_port_one_socket_sees_both_sigterm_drains_both(start_workers):
    w = start_workers("2")
    st = await nodes_ready(w, {W1, W2})
    assert st["workers"]["count"] == 2 and st["workers"]["supervisor_pid"] == w.proc.pid
    assert {i["pid"] for i in st["workers"]["items"]}.isdisjoint({w.proc.pid})
    conns = await spread(w, {W1, W2})
    rc, out, err = await wsctl(w, "--json", "connections")
    res = json.loads(out)
    assert res["total"] == len(conns) and sorted(res["nodes"]) == [W1, W2] and res["missing"] == [], res
    rc, out, err = await wsctl(w, "connections")
    assert rc == 0, err
    assert W1 in out and W2 in out, out + err
    # the supervisor's own events are in the cluster's
    rc, out, err = await wsctl(w, "--json", "events", "--kind", "worker_started")
    assert rc == 0, err
    started = [e for e in map(json.loads, out.splitlines()) if e["event"] == "worker_started"]
    assert {e["worker"] for e in started} == {W1, W2}, out
    # only the supervisor exposes the public socket; the workers' are private, in a 0700 directory
    private = Path(w.socket + ".workers")
    assert (os.stat(private).st_mode & 0o777) == 0o700 and os.stat(w.socket).st_mode & 0o777 == 0o600
    w.signal(signal.SIGTERM)
    codes = await asyncio.gather(*(closed_with(ws, timeout=15) for ws in conns))
    assert {c for c, _ in codes} == {1001}, codes
    assert w.proc.wait(15) == 0
    assert not Path(w.socket).exists() and not private.exists()
    assert "stopped (all workers drained)" in w.log()


@pytest.mark.timeout(240)  # worker starts on a loaded 2-core machine
async def test_a_killed_worker_is_restarted_and_its_clients_resume(start_workers):
    w = start_workers("2")
    st = await nodes_ready(w, {W1, W2})
    pids = {i["node"]: i["pid"] for i in st["workers"]["items"]}
    conns = await spread(w, {W1, W2})
    on = await where(w, {W1, W2})
    victims = [ws for ws in conns if on[ws.hello["connection_id"]] == W1]
    survivors = [ws for ws in conns if on[ws.hello["connection_id"]] == W2]
    os.kill(pids[W1], signal.SIGKILL)
    for ws in victims:
        code, _ = await closed_with(ws, timeout=10)
        assert code not in (1000, 1001), code  # gone without a close frame
    st = await nodes_ready(w, {W1, W2})
    w1 = next(i for i in st["workers"]["items"] if i["node"] == W1)
    assert w1["restarts"] == 1 and w1["pid"] != pids[W1]
    # the victims resume their sessions (on whichever worker the kernel gives them)
    for ws in victims:
        again = await connect(w, ws.user, session=ws.hello["session_id"])
        assert again.hello["resumed"] is True, again.hello
        await again.close()
    for ws in survivors:
        assert ws.close_code is None
        await ws.close()
    ev = await w.ctl("events.recent", limit=1000)
    exited = [e for e in ev["events"] if e["event"] == "worker_exited"]
    assert exited and exited[0]["worker"] == W1 and exited[0]["restart"] is True and exited[0]["status"] == -9
    assert "restarting it in" in w.log()


@pytest.mark.timeout(240)  # worker starts on a loaded 2-core machine
async def test_sighup_reloads_every_worker_and_a_refusal_is_reported(start_workers):
    w = start_workers("2")
    await nodes_ready(w, {W1, W2})
    text = w.config_path.read_text()
    w.config_path.write_text(text.replace("message_burst = 1000", "message_burst = 999"))
    res = await w.ctl("reload")
    assert res["ok"] is True and set(res["workers"]) == {W1, W2}
    assert all(r["ok"] for r in res["workers"].values()), res
    w.config_path.write_text(text + "\n[limits]\nmessage_burst = 5\n")  # a section twice: not TOML
    with pytest.raises(Exception) as exc:
        await w.ctl("reload")
    assert W1 in str(exc.value) and W2 in str(exc.value)
    w.signal(signal.SIGHUP)

    async def refused_logged() -> bool:
        return w.log().count("reload refused by worker") >= 4
    await wait_for(refused_logged, timeout=10)
    assert w.proc.poll() is None


@pytest.mark.timeout(240)  # worker starts on a loaded 2-core machine
async def test_autoscale_adds_a_worker_under_load_and_retires_it_after(start_workers):
    extra = ("[workers]\nscale_up_cpu = 0.3\nscale_up_after_s = 1.0\nscale_down_cpu = 0.15\n"
             "scale_down_after_s = 5.0\n")
    w = start_workers("auto:1-2", extra)
    await nodes_ready(w, {W1})
    readers = [await connect(w, f"r{i}") for i in range(30)]
    drain = [asyncio.ensure_future(_drain(ws)) for ws in readers]
    stop = asyncio.Event()
    load = asyncio.ensure_future(_broadcast_loop(w, stop))
    try:
        await nodes_ready(w, {W1, W2}, timeout=60)
    finally:
        stop.set()
        await load
    ev = await w.ctl("events.recent", limit=1000)
    up = [e for e in ev["events"] if e["event"] == "worker_scaled"]
    assert up and up[0]["direction"] == "up" and up[0]["worker"] == W2, up
    assert "worker_scaled direction=up" in w.log()
    # clients on the new worker: drained with 1001 when it is retired, then they resume on the other
    more = await spread(w, {W2})
    moved = [ws for ws in more if ws.node == W2]
    codes = await asyncio.gather(*(closed_with(ws, timeout=60) for ws in moved))
    assert {c for c, _ in codes} == {1001}, codes
    await nodes_ready(w, {W1}, timeout=30)
    for ws in moved:
        again = await connect(w, ws.user, session=ws.hello["session_id"])
        assert again.hello["resumed"] is True, again.hello
        assert (await where(w, {W1}))[again.hello["connection_id"]] == W1
        await again.close()
    ev = await w.ctl("events.recent", limit=1000)
    down = [e for e in ev["events"] if e["event"] == "worker_scaled" and e["direction"] == "down"]
    assert down and down[0]["worker"] == W2
    for t in drain:
        t.cancel()
    for ws in readers + more:
        await ws.close()


async def _drain(ws: Any) -> None:
    with __import__("contextlib").suppress(Exception):
        while True:
            await ws.recv()


async def _broadcast_loop(w: Wsd, stop: asyncio.Event) -> None:
    """Broadcasts as fast as one control connection takes them: the worker it reaches fans each out."""
    reader, writer = await asyncio.open_unix_connection(w.socket)
    data = {"pad": "x" * 2000}
    n = 0
    try:
        while not stop.is_set():
            n += 1
            writer.write(json.dumps({"id": n, "method": "broadcast", "params": {"type": "load", "data": data}})
                         .encode() + b"\n")
            await writer.drain()
            await reader.readline()
    finally:
        writer.close()



@pytest.mark.timeout(240)  # worker starts on a loaded 2-core machine
async def test_a_worker_that_keeps_dying_stops_wsd_with_one_line_and_exit_1(start_workers, redis_server):
    """Redis gone, a worker killed: each restart fails at once; after 5 exits within 60 s the supervisor gives up,
    drains the other worker and exits 1."""
    w = start_workers("2")
    st = await nodes_ready(w, {W1, W2})
    pid = next(i["pid"] for i in st["workers"]["items"] if i["node"] == W1)
    redis_server.stop()
    os.kill(pid, signal.SIGKILL)
    code = await asyncio.to_thread(w.proc.wait, 60)
    assert code == 1, w.log()
    assert f"worker {W1} exited" in w.log() and "giving up, stopping wsd" in w.log()
    assert not Path(w.socket).exists()


@pytest.mark.timeout(240)  # worker starts on a loaded 2-core machine
def test_systemd_hears_the_supervisor_only_ready_once_every_worker_listens(start_workers):
    from tests.test_notify import NotifyListener

    lst = NotifyListener(abstract=False)
    try:
        w = start_workers("2", env_extra={"NOTIFY_SOCKET": lst.env_value})
        i, ready = lst.wait(lambda m: m.get("READY") == "1", timeout=30)
        assert ready["MAINPID"] == str(w.proc.pid) and ready["STATUS"] == "2 of 2 workers listening", ready
        st = asyncio.run(w.ctl("status"))
        assert all(item["ready"] for item in st["workers"]["items"])
        w.signal(signal.SIGHUP)
        j, _ = lst.wait(lambda m: m.get("RELOADING") == "1", i + 1)
        k, again = lst.wait(lambda m: m.get("READY") == "1", j + 1)
        assert "refused" not in again["STATUS"]
        w.signal(signal.SIGTERM)
        lst.wait(lambda m: m.get("STOPPING") == "1", k + 1)
        assert w.proc.wait(20) == 0
        # nothing from a worker reached the service manager: one MAINPID, the supervisor's
        assert {m["MAINPID"] for m in lst.messages if "MAINPID" in m} == {str(w.proc.pid)}
    finally:
        lst.close()
