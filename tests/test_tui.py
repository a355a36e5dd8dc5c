"""`wsctl top` driven headless with Textual's pilot: against real daemons with real WebSocket clients,
and as SVG snapshots rendered from a committed recording (tests/data/tui_recording.json)."""

from __future__ import annotations

import datetime as dt
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, RichLog, Static

from tests.harness import BASE_CONFIG, Wsd, closed_with, make_token, recv_until, request, wait_for, welcome
from wsctl.tui import render
from wsctl.tui.app import MainScreen, WsdTop
from wsctl.tui.dialogs import BroadcastDialog, KickDialog, build_send
from wsctl.tui.screens import ChannelsScreen, ConnectionScreen, RulesScreen
from wsctl.tui.source import LiveSource, RecordedSource
from wsctl.tui.widgets import Banner

RECORDING = Path(__file__).parent / "data" / "tui_recording.json"
SIZE = (160, 48)
RULE = """
[[routing.rules]]
id = "alerts"
priority = 10
filter = { message_types = ["system_alert"] }
target = { type = "broadcast" }
"""


def live_app(w: Wsd, **kw: Any) -> WsdTop:
    src = LiveSource(w.socket, backoff_first=0.1, backoff_cap=0.5)
    return WsdTop(src, refresh=kw.pop("refresh", 0.5), **kw)


async def until(pred: Callable[[], bool], within: float = 8.0) -> None:
    async def check() -> bool:
        return bool(pred())

    await wait_for(check, within, step=0.03)


def column(app: WsdTop, key: str) -> list[str]:
    """The plain text of one column of the connections table, top to bottom, as drawn."""
    t = app.main.query_one("#conns", DataTable)
    idx = [str(c.key.value) for c in t.columns.values()].index(key)
    return [str(t.get_row_at(i)[idx]) for i in range(t.row_count)]


def text_of(widget: Static, width: int = 140) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(widget.content)
    out = console.file.getvalue()
    assert isinstance(out, str)
    return out


async def connect(w: Wsd, user: str, company: str = "acme", pool: str = "frontend",
                  roles: list[str] | None = None, subscribe: str = "") -> Any:
    ws = await w.connect(pool, token=make_token(user, company, roles=roles or []))
    await welcome(ws)
    if subscribe:
        assert (await request(ws, {"op": "subscribe", "id": 1, "channel": subscribe}))["ok"]
    return ws


async def recv_message(ws: Any, pred: Callable[[dict[str, Any]], bool], within: float = 5.0
                       ) -> dict[str, Any]:
    """The first pushed message matching ``pred``, looking inside batches too."""
    found: list[dict[str, Any]] = []

    def match(frame: dict[str, Any]) -> bool:
        msgs = frame.get("messages", []) if frame.get("type") == "batch" else [frame]
        found.extend(m for m in msgs if m.get("type") == "message" and pred(m))
        return bool(found)

    await recv_until(ws, match, within)
    return found[0]


# -- against a real daemon -------------------------------------------------------------------------------
async def test_sort_keys_and_header_click_reorder_rows(wsd):
    """`s` cycles the sort column and `o` reverses it; clicking a header sorts by it (server-side sort)."""
    conns = [await connect(wsd, u, c) for u, c in (("carol", "b-co"), ("alice", "c-co"), ("bob", "a-co"))]
    app = live_app(wsd)
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: app.main.total == 3 and len(column(app, "user_id")) == 3)
        for _ in range(len(render.WIDE_COLUMNS)):
            if app.main.sort.lstrip("-") == "user_id":
                break
            await pilot.press("s")
        assert app.main.sort == "user_id"
        await until(lambda: column(app, "user_id") == ["alice", "bob", "carol"])
        await pilot.press("o")
        await until(lambda: column(app, "user_id") == ["carol", "bob", "alice"])
        # click the "company" header: x is the sum of the rendered widths of the columns before it
        t = app.main.query_one("#conns", DataTable)
        x = sum(c.get_render_width(t) for c in list(t.columns.values())[:3]) + 2
        await pilot.click("#conns", offset=(x, 0))
        assert app.main.sort == "company_id"
        await until(lambda: column(app, "company_id") == ["a-co", "b-co", "c-co"])
        assert column(app, "user_id") == ["bob", "carol", "alice"]
    for ws in conns:
        await ws.close()


async def test_filter_narrows_rows_and_escape_clears(wsd):
    """Typing after `/` filters on the daemon's side; esc brings every row back."""
    conns = [await connect(wsd, u) for u in ("alice", "bob", "bobby", "carol")]
    app = live_app(wsd)
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: len(column(app, "user_id")) == 4)
        await pilot.press("slash")
        assert app.main.query_one("#filter", Input).has_focus
        await pilot.press(*"bob")
        await until(lambda: sorted(column(app, "user_id")) == ["bob", "bobby"])
        await pilot.press("enter")  # keeps the filter, back to the table
        assert app.main.query_one("#conns", DataTable).has_focus and app.main.filter == "bob"
        await pilot.press("escape")
        await until(lambda: len(column(app, "user_id")) == 4)
        assert app.main.filter == ""
    for ws in conns:
        await ws.close()


async def test_table_pages_through_the_daemon(wsd):
    """With a page size of 2, three connections take two pages: `]` and `[` move between them."""
    conns = [await connect(wsd, u) for u in ("u1", "u2", "u3")]
    app = live_app(wsd, page_size=2)
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: app.main.total == 3 and len(column(app, "id")) == 2)
        await pilot.press("right_square_bracket")
        await until(lambda: len(column(app, "id")) == 1 and app.main.page_offset == 2)
        caption = str(app.main.query_one("#caption", Static).content)
        assert "3\N{EN DASH}3 of 3" in caption and "page 2/2" in caption
        await pilot.press("left_square_bracket")
        await until(lambda: len(column(app, "id")) == 2 and app.main.page_offset == 0)
    for ws in conns:
        await ws.close()


async def test_cursor_stays_on_its_connection_across_refreshes(wsd):
    """Live updates that reorder rows keep the cursor on the same connection."""
    a = await connect(wsd, "alice")
    b = await connect(wsd, "bob")
    app = live_app(wsd)
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: len(column(app, "id")) == 2)
        await pilot.press("down")
        chosen = app.main.selected_id()
        assert chosen is not None and column(app, "user_id")[1] == "bob"
        c = await connect(wsd, "carol")  # a newer connection; with -age_s it lands after the others
        await pilot.press("o")  # reverse: rows reorder (carol first), cursor must follow bob
        await until(lambda: len(column(app, "id")) == 3 and column(app, "user_id")[0] == "carol")
        refreshes = app.main.refreshes
        await until(lambda: app.main.refreshes >= refreshes + 2)
        assert app.main.selected_id() == chosen
    for ws in (a, b, c):
        await ws.close()


async def test_enter_drills_down_to_claims_and_subscriptions(wsd):
    """Enter opens one connection whole: its claims (never the token) and its subscriptions."""
    token = make_token("alice", "acme", roles=["trader"])
    ws = await wsd.connect(token=token)
    await welcome(ws)
    assert (await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals"}))["ok"]
    app = live_app(wsd)
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: column(app, "user_id") == ["alice"])
        await pilot.press("enter")
        assert isinstance(app.screen, ConnectionScreen)
        screen = app.screen
        await until(lambda: screen.conn is not None)
        claims = text_of(screen.query_one("#claims", Static))
        assert "alice" in claims and "acme" in claims and "trader" in claims
        subs = text_of(screen.query_one("#subs", Static))
        assert "trading-signals/acme" in subs and "system-status" in subs
        assert "connect" in text_of(screen.query_one("#events", Static))
        svg = app.export_screenshot()
        assert token not in svg and token.rsplit(".", 1)[1][:12] not in svg
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)
    await ws.close()


async def test_kick_confirm_closes_the_client_with_4000(wsd):
    """`k` asks first (esc cancels, nothing closes); confirming closes the client with 4000 and the reason."""
    ws = await connect(wsd, "mallory", "evil")
    app = live_app(wsd)
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: column(app, "user_id") == ["mallory"])
        await pilot.press("k")
        assert isinstance(app.screen, KickDialog)
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)
        assert (await wsd.ctl("connections.list"))["total"] == 1
        await pilot.press("k")
        reason = app.screen.query_one("#reason", Input)
        reason.value = ""
        await pilot.press(*"maint", "enter")
        code, why = await closed_with(ws)
        assert (code, why) == (4000, "maint")
        await until(lambda: app.main.total == 0)


async def test_broadcast_dialog_validates_then_delivers(wsd):
    """The dialog refuses invalid JSON, then broadcasts; with a channel it publishes into that channel."""
    ws = await connect(wsd, "trader1", "acme", pool="mt5", subscribe="trading-signals")
    app = live_app(wsd)
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: app.main.total == 1)
        await pilot.press("b")
        dialog = app.screen
        assert isinstance(dialog, BroadcastDialog)
        dialog.query_one("#type", Input).value = "announcement"
        dialog.query_one("#data", Input).value = '{"text": oops}'
        dialog.query_one("#data", Input).focus()
        await pilot.press("enter")
        await until(lambda: "invalid JSON" in str(dialog.query_one("#error", Static).content))
        assert app.screen is dialog
        dialog.query_one("#data", Input).value = '{"text": "maintenance at 22:00"}'
        await pilot.press("enter")
        msg = await recv_message(ws, lambda m: m.get("msg_type") == "announcement")
        assert msg["data"] == {"text": "maintenance at 22:00"}
        await until(lambda: isinstance(app.screen, MainScreen))

        await pilot.press("b")
        dialog = app.screen
        dialog.query_one("#channel", Input).value = "trading-signals/acme"
        dialog.query_one("#type", Input).value = "trading_signal"
        dialog.query_one("#data", Input).value = '{"px": 1.25}'
        await pilot.click("#ok")
        msg = await recv_message(ws, lambda m: m.get("msg_type") == "trading_signal")
        assert msg["channel"] == "trading-signals/acme" and msg["data"] == {"px": 1.25}
    await ws.close()


async def test_rules_screen_toggles_a_rule(wsd_factory):
    """`r` lists the rules; space disables the selected rule on the daemon and again enables it."""
    w = wsd_factory(RULE)
    app = live_app(w)

    async def enabled() -> bool:
        return bool((await w.ctl("rules.get", id="alerts"))["enabled"])

    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("r")
        screen = app.screen
        assert isinstance(screen, RulesScreen)
        await until(lambda: "alerts" in screen.rules)
        await pilot.press("space")
        await wait_for(lambda: _not(enabled()), 5)
        await until(lambda: screen.rules["alerts"]["enabled"] is False)
        await pilot.press("space")
        await wait_for(enabled, 5)


async def _not(aw: Any) -> bool:
    return not await aw


async def test_channels_view_and_event_log(wsd):
    """The channels screen counts subscribers per instance; the event log shows a client connecting."""
    app = live_app(wsd)
    async with app.run_test(size=SIZE) as pilot:
        log = app.main.query_one("#log", RichLog)
        await until(lambda: app.main.refreshes >= 1)
        ws = await connect(wsd, "zoe", "acme", subscribe="trading-signals")
        await until(lambda: any("connect" in s.text and "zoe" in s.text for s in log.lines))
        await pilot.press("c")
        screen = app.screen
        assert isinstance(screen, ChannelsScreen)
        t = screen.query_one("#instances", DataTable)
        await until(lambda: "trading-signals/acme" in [str(k.value) for k in t.rows])
        row = [str(c) for c in t.get_row("trading-signals/acme")]
        assert row[1] == "trading-signals" and row[2] == "1"
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)
        await ws.close()


async def test_daemon_going_away_shows_banner_and_recovers(wsd, tmp_path):
    """When wsd stops the dashboard says it cannot reach it; a new daemon on that socket brings it back."""
    app = live_app(wsd)
    (tmp_path / "second").mkdir()
    second = Wsd(tmp_path / "second", BASE_CONFIG)
    async with app.run_test(size=SIZE) as pilot:
        banner = app.main.query_one(Banner)
        await until(lambda: app.main.refreshes >= 1)
        assert not banner.has_class("-shown")
        wsd.stop()
        await until(lambda: banner.has_class("-shown"))
        assert f"cannot reach wsd at {wsd.socket} — retrying" in str(banner.content)
        await pilot.press("c")  # other screens show it too
        await until(lambda: app.screen.query_one(Banner).has_class("-shown"))
        await pilot.press("escape")
        second.socket = wsd.socket
        second.start()
        try:
            ws = await connect(second, "phoenix")
            await until(lambda: not banner.has_class("-shown") and column(app, "user_id") == ["phoenix"], 10)
            await ws.close()
        finally:
            second.stop()


def test_build_send_picks_publish_or_broadcast():
    """The dialog's request: a channel means publish, none means broadcast; bad input is refused."""
    assert build_send("trading-signals/acme", "sig", "high", '{"a": 1}', "") == (
        "publish", {"channel": "trading-signals/acme", "type": "sig", "priority": "high", "data": {"a": 1}})
    assert build_send("", "", "low", "[1, 2]", "mt5") == (
        "broadcast", {"data": [1, 2], "priority": "low", "pool": "mt5"})
    for args in (("", "", "normal", "{nope", ""), ("a b", "", "normal", "1", ""), ("", "", "urgent", "1", ""),
                 ("ch", "", "normal", "1", "mt5"), ("", "", "normal", "  ", "")):
        with pytest.raises(ValueError):
            build_send(*args)


def test_claims_view_never_draws_a_credential():
    """Even if a daemon sent a token-like claim, the drill-down does not draw it."""
    conn = {"auth": {"user_id": "alice", "company_id": "acme", "roles": ["trader"], "pool": "", "exp": 0,
                     "token": "eyJhbGciOi.secret", "claims": {"jwt": "eyJraWQi.secret", "tier": "gold"}}}
    console = Console(width=100, file=io.StringIO(), color_system=None)
    console.print(render.claims(conn, dt.UTC))
    out = console.file.getvalue()
    assert "alice" in out and "gold" in out and "secret" not in out and "eyJ" not in out


def test_dashboard_imports_only_the_control_protocol_from_wsd():
    """wsctl.tui talks to the daemon through the socket only: no daemon module but the protocol is loaded."""
    import subprocess
    import sys

    code = ("import sys, wsctl.tui.app; "
            "print(sorted(m for m in sys.modules if m == 'wsd' or m.startswith('wsd.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['wsd', 'wsd.control', 'wsd.control.protocol']"


# -- snapshots from the committed recording ----------------------------------------------------------------
def recorded_app() -> WsdTop:
    # refresh far in the future: exactly one poll, so nothing on screen depends on timing; times in UTC
    return WsdTop(RecordedSource(RECORDING, address="/run/wsd/wsd.sock"), refresh=3600, tz=dt.UTC)


async def _loaded(pilot: Pilot[Any]) -> None:
    app = pilot.app
    assert isinstance(app, WsdTop)
    n_events = min(50, len(json.loads(RECORDING.read_text())["events"]))
    log = app.main.query_one("#log", RichLog)
    await until(lambda: app.main.refreshes >= 1 and (len(log.lines) >= n_events or not log.display))


async def _drilled(pilot: Pilot[Any]) -> None:
    await _loaded(pilot)
    app = pilot.app
    assert isinstance(app, WsdTop)
    await pilot.press("slash", *"alice", "enter")
    await until(lambda: column(app, "user_id") == ["alice"])
    await pilot.press("enter")
    screen = pilot.app.screen
    assert isinstance(screen, ConnectionScreen)
    await until(lambda: screen.conn is not None)


def test_snapshot_main_screen(snap_compare):
    """The main screen at 160x48: header, pools, charts, connections, event log."""
    assert snap_compare(recorded_app(), terminal_size=SIZE, run_before=_loaded)


def test_snapshot_main_screen_small_terminal(snap_compare):
    """The main screen at 80x24: charts and event log give way to the table."""
    assert snap_compare(recorded_app(), terminal_size=(80, 24), run_before=_loaded)


def test_snapshot_drill_down(snap_compare):
    """Filter to alice, Enter: info, claims, queue and breaker, metrics, subscriptions, events."""
    assert snap_compare(recorded_app(), terminal_size=SIZE, run_before=_drilled)


def cluster_recording(path: Path) -> Path:
    """The committed recording as three nodes would answer it: each row on a node, each node's header figures, and
    a fourth node that did not answer in time."""
    data = json.loads(RECORDING.read_text())
    nodes = ["a1b2c3d4", "e5f6a7b8", "c9d0e1f2"]
    res = data["results"]
    for i, row in enumerate(res["connections.list"]["items"]):
        row["node"] = nodes[i % 3]
    res["connections.list"].update(node=nodes[0], nodes=nodes, missing=["0badf00d"])
    st = res["status"]
    st.update(node=nodes[0], nodes=sorted(nodes + ["0badf00d"]), missing=["0badf00d"], node_stats=[
        {"node": n, "connections": sum(1 for r in res["connections.list"]["items"] if r["node"] == n),
         "max_connections": 10000, "rate_in": 10.0 * (i + 1), "rate_out": 100.0 * (i + 1), "rate_publish": 1.0,
         "latency": {"p50_ms": 0.4, "p99_ms": 2.0 + i}, "cpu_percent": 3.0 + i, "rss_bytes": (60 + i) << 20,
         "draining": False} for i, n in enumerate(nodes)])
    out = path / "tui_cluster_recording.json"
    out.write_text(json.dumps(data))
    return out


def test_snapshot_cluster_main_screen(snap_compare, tmp_path):
    """Three nodes and a missing one: the node column leads the table, the header has a line per node."""
    app = WsdTop(RecordedSource(cluster_recording(tmp_path), address="/run/wsd/wsd.sock"), refresh=3600, tz=dt.UTC)
    assert snap_compare(app, terminal_size=SIZE, run_before=_loaded)


async def test_cluster_node_column_is_not_a_sort_key(tmp_path):
    """With several nodes the table's first column is the node; sorting with s skips it (no daemon sorts on it)."""
    app = WsdTop(RecordedSource(cluster_recording(tmp_path), address="/run/wsd/wsd.sock"), refresh=3600, tz=dt.UTC)
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: app.main.refreshes >= 1)
        table = app.main.query_one("#conns", DataTable)
        assert str(list(table.columns)[0].value) == "node"
        assert set(column(app, "node")) == {"a1b2c3d4", "e5f6a7b8", "c9d0e1f2"}
        for _ in range(len(table.columns)):
            await pilot.press("s")
            assert app.main.sort.lstrip("-") != "node"
