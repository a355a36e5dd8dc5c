"""Redis in production shapes: two wsd nodes on a real Redis Cluster (three masters) and on a master with replicas
watched by three sentinels, with the chaos harness's publisher and applications (tests/chaos.py): delivery across
nodes, resume of a session on the other node, and a sentinel failover in the middle. Plus the ``[engine]`` keys'
checks."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from tests.chaos import Chaos
from tests.harness import ControlError, make_token, recv_until, request, welcome
from tests.test_redis_engine import redis_url  # noqa: F401 (a fixture: a private redis-server)
from tests.redis_shapes import RedisClusterSet, SentinelSet, need
from tests.test_config import errors_of, has, ok_toml
from wsd.config import config_to_dict, load_config


def _common_checks(report: dict) -> None:
    total = report["total"]
    assert total["lost"] == 0, report["lost_detail"]
    assert total["out_of_order"] == 0 and total["delivered_twice"] == 0, report
    assert total["delivered"] + total["in_gap"] == total["expected"], report


@pytest.mark.timeout(90)
async def test_two_nodes_on_a_redis_cluster_deliver_across_nodes_and_resume(tmp_path):
    """Three masters; each channel instance's keys and bus in its own slot (shard channels), sessions in theirs:
    publications made on either node reach the applications on both, and a node killed with kill -9 sends its
    applications to the other node, where their sessions resume."""
    need("redis-server", "redis-cli")
    shape = RedisClusterSet(tmp_path / "redis")
    async with Chaos(workdir=tmp_path, backend=shape) as chaos:
        await chaos.steady()
        # The channel buses are shard channels, spread over the masters by their hash tag.
        shard = [subprocess.run(["redis-cli", "-p", str(n.port), "pubsub", "shardchannels"], capture_output=True,
                                text=True, timeout=5).stdout.split() for n in shape.nodes]
        keys = [int(subprocess.run(["redis-cli", "-p", str(n.port), "dbsize"], capture_output=True, text=True,
                                   timeout=5).stdout or 0) for n in shape.nodes]
        await chaos.inject("kill")
        await chaos.finish()
        report = chaos.report()
        # A broadcast (plain PUBLISH on the shared bus, from the publish script on some master) reaches the
        # connections of the other node.
        async with chaos.nodes["A"].connect(token=make_token("zed", "acme")) as ws:
            await welcome(ws)
            await chaos.nodes["B"].ctl("broadcast", type="notice", data={"n": 1})
            m = await recv_until(ws, lambda m: m.get("type") == "message")
            assert m["data"] == {"n": 1}
    print(json.dumps(report, indent=1))
    assert sum(1 for s in shard if s) >= 2 and all(":ch:{" in c for s in shard for c in s), shard
    assert sum(1 for k in keys if k) >= 2, keys
    rows = report["phases"]
    assert rows["steady"]["acknowledged"] >= 20 and rows["kill"]["acknowledged"] >= 20, report
    assert rows["kill"]["reconnects"] >= 3 and rows["kill"]["resumed"] >= 3, report
    _common_checks(report)
    # Redis Cluster kept everything: no hole at all.
    assert report["total"]["gaps"] == 0, report


@pytest.mark.timeout(120)
async def test_delivery_and_resume_continue_through_a_sentinel_failover(tmp_path):
    """A master, two replicas, three sentinels; nodes publish with wait_replicas = 1. kill -9 of the master: the
    sentinels promote a replica, the nodes follow it (commands and bus), publishing resumes; then kill -9 of a
    node: its applications resume their sessions on the other node; then SIGSTOP of the new master (a failover
    again, the stopped master rejoining as a replica). Every acknowledged publication (it had reached
    a replica) is delivered, or lies in a reported Gap: none is lost silently, duplicated or reordered."""
    need("redis-server", "redis-sentinel", "redis-cli")
    shape = SentinelSet(tmp_path / "redis", replicas=2, wait_replicas=1)
    async with Chaos(workdir=tmp_path, backend=shape) as chaos:
        await chaos.steady()
        first = shape.master()
        await chaos.inject("failover")
        assert shape.master() != first
        await chaos.inject("kill")
        second = shape.master()
        # SIGSTOP: the bus connection to the stopped master stays open; the node moves it to the new master
        await chaos.inject("failover_stop")
        assert shape.master() not in (first, second)
        await chaos.finish()
        report = chaos.report()
    print(json.dumps(report, indent=1))
    rows = report["phases"]
    assert rows["failover"]["refused"] >= 1 and rows["failover_stop"]["refused"] >= 1, report  # no master for a moment: publications refused, not lost
    assert report["refused"].keys() <= {"engine_unavailable", "node_unreachable"}, report
    for name in ("steady", "failover", "kill", "failover_stop"):
        assert rows[name]["acknowledged"] >= 20, (name, report)
    assert rows["kill"]["resumed"] >= 3, report
    _common_checks(report)


def test_engine_mode_keys_are_checked(tmp_path: Path) -> None:
    """Each mistake in the sentinel / cluster keys is named by its key path."""
    def errs(extra: str) -> list[str]:
        return errors_of(tmp_path, ok_toml('[engine]\ntype = "redis"\n' + extra))

    assert has(errs('mode = "sentinel"\n'), "engine.sentinels: required")
    assert has(errs('mode = "sentinel"\n'), "engine.sentinel_master: required")
    assert has(errs('mode = "sentinel"\nsentinels = ["h:1", "nope"]\nsentinel_master = "m"\n'),
               "engine.sentinels[1]: must be")
    assert has(errs('mode = "sentinel"\nsentinels = ["h:1"]\nsentinel_master = "m"\nurl = "redis://h:6379/0"\n'),
               "engine.url: with engine.mode", "credentials")
    assert has(errs('url = "redis://h"\nsentinels = ["h:1"]\n'), "engine.sentinels: set, but engine.mode")
    assert has(errs('mode = "cluster"\nurl = "redis://h:7000/3"\n'), "engine.url: with engine.mode", "database 0")
    assert has(errs('mode = "cluster"\nurl = "redis://h:7000"\nwait_replicas = 1\n'), "engine.wait_replicas")
    assert has(errs('mode = "cluster"\nurl = "redis://h:7000"\ncluster_nodes = ["h"]\n'), "engine.cluster_nodes[0]")
    assert has(errs('mode = "bogus"\nurl = "redis://h"\n'), "engine.mode")
    assert has(errors_of(tmp_path, ok_toml('[engine]\nmode = "cluster"\n')), "engine.mode: set, but")


def test_sentinel_password_is_redacted_and_comes_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "wsd.toml"
    path.write_text(ok_toml('[engine]\ntype = "redis"\nmode = "sentinel"\nsentinels = ["127.0.0.1:26379"]\n'
                            'sentinel_master = "m"\nurl = "redis://:masterpw@/0"\n'))
    cfg = load_config(path, env={"WSD_ENGINE_SENTINEL_PASSWORD": "s3ntinel"})
    assert cfg.engine.sentinel_password == "s3ntinel"
    shown = json.dumps(config_to_dict(cfg, redact=True))
    assert "s3ntinel" not in shown and "masterpw" not in shown


@pytest.mark.timeout(60)
async def test_a_node_reaches_a_master_and_sentinels_that_ask_for_passwords(tmp_path, wsd_factory):
    """The master's password comes from engine.url, the sentinels' from WSD_ENGINE_SENTINEL_PASSWORD; a
    publication reaches its subscriber, and neither password is shown by config.get or status."""
    need("redis-server", "redis-sentinel", "redis-cli")
    shape = SentinelSet(tmp_path / "redis", replicas=1, wait_replicas=1, password="m4sterpw",
                        sentinel_password="s3ntinelpw")
    try:
        await asyncio.to_thread(shape.start)
        w = wsd_factory(shape.engine_toml("pw"), env={"WSD_ENGINE_SENTINEL_PASSWORD": "s3ntinelpw"})
        async with w.connect(token=make_token("alice", "acme")) as ws:
            await welcome(ws)
            await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals"})
            res = await w.ctl("publish", channel="trading-signals/acme", type="sig", data={"i": 1})
            assert res["offset"] == 1
            m = await recv_until(ws, lambda m: m.get("type") == "message")
            assert m["data"] == {"i": 1}
        shown = json.dumps([await w.ctl("config.get"), await w.ctl("status")])
        assert "m4sterpw" not in shown and "s3ntinelpw" not in shown
        assert "sentinel://wsdmaster@127.0.0.1:" in shown  # status names the sentinels and the master
    finally:
        await asyncio.to_thread(shape.stop)


async def test_wait_replicas_refuses_what_no_replica_has(wsd_factory, redis_url):
    """With engine.wait_replicas = 1 and no replica, a publication is refused (engine_unavailable, naming the key)
    instead of acknowledged: it could not survive a failover."""
    w = wsd_factory(f'[engine]\ntype = "redis"\nurl = "{redis_url}"\nwait_replicas = 1\n')
    with pytest.raises(ControlError) as info:
        await w.ctl("publish", channel="trading-signals/acme", type="sig", data={"i": 1})
    assert info.value.code == "engine_unavailable" and "engine.wait_replicas" in info.value.message
