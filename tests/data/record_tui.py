"""Regenerate tests/data/tui_recording.json, the recording the dashboard's snapshot tests render from.

    python tests/data/record_tui.py

Starts a real daemon, connects a dozen clients across pools and companies, moves some traffic, then
records the dashboard's polled methods through ``wsctl.tui.source.record``. Paths and the manager's
process numbers are replaced with fixed values so the committed file says nothing about this machine.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.harness import BASE_CONFIG, Wsd, make_token, request, welcome
from wsctl.tui.source import LiveSource, record

OUT = Path(__file__).with_name("tui_recording.json")

RULES = """
[[routing.rules]]
id = "critical-alerts"
priority = 100
filter = { message_types = ["system_alert"] }
target = { type = "broadcast" }

[[routing.rules]]
id = "acme-vip"
priority = 50
enabled = false
filter = { message_types = ["trading_signal"], expression = "conn.company_id == 'acme'" }
target = { type = "filtered", reliable_delivery = true, max_retries = 3 }
"""

CLIENTS = [  # (pool, user, company, roles)
    ("frontend", "alice", "acme", ["trader"]), ("frontend", "bob", "acme", []),
    ("frontend", "carol", "globex", []),
    ("frontend", "dave", "initech", []), ("mt5", "mt5-0001", "acme", ["trader"]),
    ("mt5", "mt5-0002", "globex", ["trader"]), ("mt5", "mt5-0003", "initech", ["trader"]),
    ("api", "svc-pricing", "acme", ["service"]), ("api", "svc-risk", "globex", ["service"]),
    ("admin", "root", "ops", ["admin"]), ("frontend", "erin", "umbrella", []),
    ("frontend", "frank", "hooli", []),
]


async def main() -> None:
    w = Wsd(Path(tempfile.mkdtemp(prefix="tuirec")), BASE_CONFIG + RULES).start()
    src = LiveSource(w.socket)
    try:
        conns = []
        for pool, user, company, roles in CLIENTS:
            ws = await w.connect(pool, token=make_token(user, company, roles=roles))
            await welcome(ws)
            await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals"})
            if pool == "frontend":
                await request(ws, {"op": "subscribe", "id": 2, "channel": "notifications", "mode": "batch"})
            conns.append(ws)
        for i in range(300):  # ~15 s of traffic that swells and ebbs, so the charts have a shape
            burst = 1 + int(4 * (1 + math.sin(i / 25)))
            for company in ("acme", "globex", "initech")[: 1 + i % 3]:
                for _ in range(burst):
                    await w.ctl("publish", channel=f"trading-signals/{company}", type="trading_signal",
                                data={"symbol": "EURUSD", "px": round(1.08 + i / 1000, 4)})
            await request(conns[i % len(conns)], {"op": "ping", "id": 100 + i})
            await asyncio.sleep(0.05)
        await record(src, OUT, connections=len(CLIENTS), events=40)
        for ws in conns:
            await ws.close()
    finally:
        await src.close()
        w.stop()
    data = json.loads(OUT.read_text())
    st = data["results"]["status"]
    st.update({"socket": "/run/wsd/wsd.sock", "config_path": "/etc/wsd/wsd.toml", "rss_bytes": 57_344_000,
               "cpu_percent": 3.5, "uptime_s": 7384.2, "started_at": 1_767_000_000.0})
    st["listen"]["port"] = 8765
    for ev in data["events"]:
        if "port" in ev:
            ev["port"] = 8765
    data["results"]["hello"]["pid"] = 4242
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    asyncio.run(main())
