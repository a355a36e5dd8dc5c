from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import BASE_CONFIG, Wsd


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
