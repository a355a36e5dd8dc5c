"""Redis in production shapes, started from Debian's ``redis-server`` / ``redis-sentinel`` on free ports in a temp
dir: a Redis Cluster of three masters (:class:`RedisClusterSet`) and a master with replicas watched by three
sentinels (:class:`SentinelSet`). Each gives the ``[engine]`` table of the wsd nodes on it and its faults; both
plug into :class:`tests.chaos.Chaos` (``Chaos(backend=...)``). Used by tests/test_redis_shapes.py."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


from tests.harness import free_port, tool_missing

MASTER = "wsdmaster"


def need(*tools: str) -> None:
    """Skip when a tool is missing, but fail under WSD_CI_REQUIRE_TOOLS=1 (CI installs them)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        msg = f"{', '.join(missing)} not on PATH (Debian: apt-get install redis-server redis-sentinel)"
        tool_missing(msg)


def _cli(port: int, *args: str, timeout: float = 5.0) -> str:
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True,
                         timeout=timeout, text=True)
    return out.stdout


def _wait(what: str, check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except (OSError, subprocess.SubprocessError):
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _pong(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
        s.sendall(b"PING\r\n")
        reply = s.recv(64)
        return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")  # up (a password is asked for)


class _Proc:
    def __init__(self, argv: list[str], port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(f"{argv[0]} on port {port}", lambda: self.proc.poll() is None and _pong(port), 15)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class RedisClusterSet:
    """Three redis-server masters (no replicas) joined by ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.dir = workdir
        self.n = masters
        self.nodes: list[_Proc] = []

    def start(self) -> None:
        for i in range(self.n):
            d = self.dir / f"cluster{i}"
            d.mkdir(parents=True, exist_ok=True)
            port, bus = free_port(), free_port()
            self.nodes.append(_Proc(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", "",
                 "--appendonly", "no", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-port", str(bus), "--cluster-node-timeout", "2000"], port))
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)
        for n in self.nodes:
            _wait("cluster_state:ok", lambda n=n: "cluster_state:ok" in _cli(n.port, "cluster", "info"), 20)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def engine_toml(self, prefix: str) -> str:
        others = ", ".join(f'"127.0.0.1:{n.port}"' for n in self.nodes[1:])
        return (f'\n[engine]\ntype = "redis"\nmode = "cluster"\nurl = "{self.url}"\ncluster_nodes = [{others}]\n'
                f'prefix = "{prefix}"\n')

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


class SentinelSet:
    """A master, ``replicas`` replicas and three sentinels (quorum 2) that fail over within a few seconds."""

    def __init__(self, workdir: Path, replicas: int = 2, wait_replicas: int = 1, password: str = "",
                 sentinel_password: str = "") -> None:
        self.dir = workdir
        self.password = password  # the master's and replicas' requirepass
        self.sentinel_password = sentinel_password  # the sentinels' requirepass
        self.replicas = replicas
        self.wait_replicas = wait_replicas
        self.servers: dict[int, _Proc] = {}
        self.sentinels: list[_Proc] = []
        self.first_master = 0

    def _server(self, name: str, *extra: str) -> int:
        d = self.dir / name
        d.mkdir(parents=True, exist_ok=True)
        port = free_port()
        auth = ["--requirepass", self.password, "--masterauth", self.password] if self.password else []
        self.servers[port] = _Proc(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", *auth, *extra], port)
        return port

    def _cli(self, port: int, *args: str) -> str:
        auth = ["--no-auth-warning", "-a", self.password] if self.password else []
        return _cli(port, *auth, *args)

    def _scli(self, port: int, *args: str) -> str:
        auth = ["--no-auth-warning", "-a", self.sentinel_password] if self.sentinel_password else []
        return _cli(port, *auth, *args)

    def start(self) -> None:
        m = self.first_master = self._server("master")
        for i in range(self.replicas):
            self._server(f"replica{i}", "--replicaof", "127.0.0.1", str(m))
        _wait("the replicas in sync",
              lambda: self._cli(m, "info", "replication").count("state=online") == self.replicas, 20)
        for i in range(3):
            d = self.dir / f"sentinel{i}"
            d.mkdir(parents=True, exist_ok=True)
            port = free_port()
            conf = d / "sentinel.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {d}\n"
                            f"sentinel monitor {MASTER} 127.0.0.1 {m} 2\n"
                            f"sentinel down-after-milliseconds {MASTER} 1000\n"
                            f"sentinel failover-timeout {MASTER} 4000\n"
                            f"sentinel parallel-syncs {MASTER} 2\n"
                            + (f"sentinel auth-pass {MASTER} {self.password}\n" if self.password else "")
                            + (f"requirepass {self.sentinel_password}\n" if self.sentinel_password else ""))
            self.sentinels.append(_Proc(["redis-sentinel", str(conf)], port))
        # a failover needs every sentinel to know the others and the replicas
        for s in self.sentinels:
            _wait("the sentinels to know each other", lambda s=s: self._sentinel_info(s.port).get(
                "num-other-sentinels") == "2" and self._sentinel_info(s.port).get("num-slaves") == str(
                self.replicas), 20)

    def _sentinel_info(self, port: int) -> dict[str, str]:
        lines = self._scli(port, "sentinel", "master", MASTER).splitlines()
        return dict(zip(lines[::2], lines[1::2]))

    def master(self) -> int:
        """The master's port as the sentinels report it."""
        out = self._scli(self.sentinels[0].port, "sentinel", "get-master-addr-by-name", MASTER).split()
        return int(out[1]) if len(out) == 2 else 0

    def engine_toml(self, prefix: str) -> str:
        addrs = ", ".join(f'"127.0.0.1:{s.port}"' for s in self.sentinels)
        url = f'url = "redis://:{self.password}@/0"\n' if self.password else ""
        return (f'\n[engine]\ntype = "redis"\nmode = "sentinel"\nsentinels = [{addrs}]\n'
                f'sentinel_master = "{MASTER}"\nwait_replicas = {self.wait_replicas}\nprefix = "{prefix}"\n{url}')

    def failover(self, how: str = "kill") -> tuple[int, int]:
        """``kill -9`` (or SIGSTOP) the master and wait until the sentinels promoted a replica, that replica takes
        writes and has ``wait_replicas`` replicas: (old, new) ports. A stopped master is resumed once a replica was
        promoted (the sentinels make it a replica)."""
        old = self.master()
        proc = self.servers[old]
        if how == "kill":
            proc.kill()
        else:
            proc.proc.send_signal(signal.SIGSTOP)
        new = _wait("a new master", lambda: (p := self.master()) and p != old and p, 30)
        _wait("the new master to take writes", lambda: "role:master" in self._cli(new, "info", "replication"), 15)
        if how != "kill":
            proc.proc.send_signal(signal.SIGCONT)
        # healthy again: the new master has the replicas publications wait for (the other replica, re-pointed by
        # the sentinels; or the stopped master, back as a replica)
        _wait("a replica of the new master", lambda: self.replicas_of(new) >= self.wait_replicas, 30)
        return old, new

    def replicas_of(self, port: int) -> int:
        return self._cli(port, "info", "replication").count("state=online")

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        for p in self.servers.values():
            p.stop()

    async def fault_failover(self, chaos: Any) -> None:
        """kill -9 of the master; the sentinels promote a replica."""
        import asyncio

        old, new = await asyncio.to_thread(self.failover, "kill")
        chaos.events.append(f"kill -9 redis master :{old}; the sentinels promoted :{new}")

    async def fault_failover_stop(self, chaos: Any) -> None:
        """SIGSTOP of the master; the sentinels promote a replica; the old master continues as a replica."""
        import asyncio

        old, new = await asyncio.to_thread(self.failover, "stop")
        chaos.events.append(f"SIGSTOP redis master :{old}; the sentinels promoted :{new}")
