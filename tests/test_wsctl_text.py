"""Text that came from clients cannot break operator views: shown literally, control characters escaped.

A client subscribes with filter types carrying rich markup and an OSC 52 clipboard write, publishes a
message whose type is markup plus a screen clear, carries claims with markup, and closes with such a
reason. Every wsctl view of it (subscriptions, connection, history, events, in table and JSON modes)
must succeed, show the text literally, and never emit a raw ESC byte; the dashboard's drill-down
(Textual pilot, real daemon) must draw it too.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.harness import make_token, request, welcome
from tests.test_tui import text_of
from tests.test_wsctl import awsctl, ok
from wsctl import fmt

OSC52 = "\x1b]52;c;SGVsbG8=\x07"  # "write Hello to the clipboard"
MARKUP = "[/x]"
TYPES = [MARKUP, OSC52, "[bold red]alarm"]
MSG_TYPE = "[/x]\x1b[2Jcleared"
CLOSE_REASON = "[bold]bye\x1b[2J[/x]"
CLAIM = "[link=http://x]\x1b]0;title\x07"


def test_plain_escapes_control_characters_and_keeps_markup_literal():
    assert fmt.plain("a\x1bb\nc\td\x07") == "a\\x1bb\\nc\\td\\x07"
    assert fmt.plain("\u202eevil") == "\\u202eevil"  # a bidi override cannot reorder the line
    assert fmt.plain("[bold]x[/x] café") == "[bold]x[/x] café"
    assert fmt.text("[/x]").plain == "[/x]"


async def _client_with_hostile_text(wsd):
    token = make_token("eve", "acme", pool="", team=CLAIM)
    ws = await wsd.connect("frontend", token)
    hello = await welcome(ws)
    reply = await request(ws, {"op": "subscribe", "id": 1, "channel": "trading-signals",
                               "filter": {"types": TYPES}})
    assert reply.get("ok"), reply
    return ws, hello["connection_id"]


def _no_raw_escape(out: str, where: str) -> None:
    assert "\x1b" not in out, f"raw ESC from client text in {where}: {out!r}"
    assert "\x07" not in out, f"raw BEL from client text in {where}: {out!r}"


async def test_wsctl_views_show_client_text_literally(wsd):
    ws, cid = await _client_with_hostile_text(wsd)
    # an mt5 client publishes a message whose type is markup and a screen clear
    pub = await wsd.connect("mt5", make_token("mt", "acme"))
    await welcome(pub)
    reply = await request(pub, {"op": "publish", "id": 2, "channel": "trading-signals", "type": MSG_TYPE,
                                "data": {"note": "[red]" + OSC52}})
    assert reply.get("ok"), reply

    r = ok(await awsctl(wsd, "subscriptions", cid))
    _no_raw_escape(r.out, "subscriptions")
    assert "\\x1b]52;c" in r.out  # the types column is cut to its width; what shows is escaped
    r = ok(await awsctl(wsd, "--json", "subscriptions", cid))
    assert any(item["types"] == sorted(TYPES) for item in r.json()["items"])

    r = ok(await awsctl(wsd, "subscriptions"))
    _no_raw_escape(r.out, "subscriptions (all)")

    r = ok(await awsctl(wsd, "connection", cid))
    _no_raw_escape(r.out, "connection")
    assert "[link=http://x]\\x1b]0;title\\x07" in r.out

    r = ok(await awsctl(wsd, "history", "trading-signals/acme"))
    _no_raw_escape(r.out, "history")
    assert "[/x]\\x1b[2Jcl" in r.out and "[red]" in r.out

    await ws.close(code=1000, reason=CLOSE_REASON)
    await pub.close()
    for _ in range(100):
        r = ok(await awsctl(wsd, "events", "--kind", "disconnect"))
        if "bye" in r.out:
            break
        await asyncio.sleep(0.05)
    _no_raw_escape(r.out, "events")
    assert "[bold]bye\\x1b[2J[/x]" in r.out, r

    # JSON keeps the exact text (escaped by JSON itself, so still no raw ESC on the terminal)
    r = ok(await awsctl(wsd, "--json", "events", "--kind", "disconnect"))
    _no_raw_escape(r.out, "events --json")
    assert any(json.loads(line).get("reason") == CLOSE_REASON for line in r.out.splitlines())


async def test_dashboard_drill_down_shows_client_text_literally(wsd):
    pytest.importorskip("textual")
    from textual.widgets import RichLog, Static

    from wsctl.tui.app import WsdTop
    from wsctl.tui.screens import ConnectionScreen
    from wsctl.tui.source import LiveSource

    ws, cid = await _client_with_hostile_text(wsd)
    gone = await wsd.connect("frontend", make_token("gone", "acme"))
    await welcome(gone)
    await gone.close(code=1000, reason=CLOSE_REASON)  # its disconnect event is in the log's backlog
    app = WsdTop(LiveSource(wsd.socket), refresh=0.2)
    async with app.run_test(size=(160, 48)) as pilot:
        log = app.main.query_one("#log", RichLog)
        for _ in range(100):
            lines = ["".join(seg.text for seg in strip) for strip in log.lines]
            if any("bye" in line for line in lines):
                break
            await pilot.pause(0.05)
        assert any("reason=[bold]bye\\x1b[2J[/x]" in line for line in lines), lines
        assert not any("\x1b" in line for line in lines)
        screen = ConnectionScreen(cid)
        await app.push_screen(screen)
        for _ in range(100):
            await pilot.pause(0.05)
            if screen.conn is not None:
                break
        assert screen.conn is not None, "the drill-down never loaded"
        await pilot.pause(0.1)
        drawn = "\n".join(text_of(w, 300) for w in screen.query(Static))
        assert "[/x]" in drawn and "\\x1b]52;c;SGVsbG8=\\x07" in drawn, drawn
        assert "[link=http://x]\\x1b]0;title\\x07" in drawn
        assert "\x1b" not in drawn
    await ws.close()
