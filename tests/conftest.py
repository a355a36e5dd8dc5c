from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import BASE_CONFIG, REDIS_MISSING, Wsd, tool_missing


@pytest.fixture
def wsd_factory(tmp_path: Path) -> Iterator[Callable[..., Wsd]]:
    """Start real daemons: ``wsd_factory(extra_toml="", env=None, args=None, port=None, port_flag=True)``;
    all stopped at the end, and their socket directories removed."""
    started: list[Wsd] = []

    def make(extra_toml: str = "", *, env: dict[str, str] | None = None, args: list[str] | None = None,
             base: str = BASE_CONFIG, start: bool = True, port: int | None = None, port_flag: bool = True) -> Wsd:
        d = tmp_path / f"wsd{len(started)}"
        d.mkdir()
        w = Wsd(d, base + "\n" + extra_toml, env=env, args=args, port=port, port_flag=port_flag)
        started.append(w)
        return w.start() if start else w

    yield make
    for w in started:
        w.stop()


@pytest.fixture
def wsd(wsd_factory: Callable[..., Wsd]) -> Wsd:
    """A daemon on the default pools and channels, with a known HS256 secret."""
    return wsd_factory()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A private redis-server on a free port (AOF, appendfsync always; restartable, pausable: tests/chaos.py),
    never the machine's shared one. Missing redis-server: skipped, failed under WSD_CI_REQUIRE_TOOLS=1."""
    if shutil.which("redis-server") is None:
        tool_missing(REDIS_MISSING)
    from tests.chaos import RedisServer

    d = tmp_path / "redis"
    d.mkdir()
    server = RedisServer(d)
    server.start()
    yield server
    server.stop()
