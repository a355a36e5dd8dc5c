"""The dashboard's secondary screens: one connection whole, channels, rules, and help."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ClassVar, cast

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Static

from wsctl.tui import render
from wsctl.tui.source import RequestFailed, Unavailable
from wsctl.tui.widgets import Banner

if TYPE_CHECKING:
    from wsctl.tui.app import WsdTop


class Polling(Screen[None]):
    """A screen that reloads its data every ``app.refresh_s`` seconds in an exclusive worker."""

    def top(self) -> WsdTop:
        return cast("WsdTop", self.app)

    def on_mount(self) -> None:
        self.set_interval(self.top().refresh_s, self._tick)
        self.load()

    def _tick(self) -> None:
        if not self.top().paused and self.is_current:
            self.load()

    @work(exclusive=True, group="refresh")
    async def load(self) -> None:
        try:
            data = await self.fetch()
        except Unavailable as exc:
            self.top().set_unreachable(str(exc))
            return
        except RequestFailed as exc:
            self.top().set_reachable()
            with contextlib.suppress(NoMatches):
                self.failed(exc)
            return
        self.top().set_reachable()
        try:
            self.show(data)
        except NoMatches:
            return  # closed while the request was in flight

    async def fetch(self) -> Any:
        raise NotImplementedError

    def show(self, data: Any) -> None:
        raise NotImplementedError

    def failed(self, exc: RequestFailed) -> None:
        self.notify(str(exc), severity="error", markup=False)


class ConnectionScreen(Polling):
    """Drill-down into one connection: info, claims, subscriptions, queue and breaker, metrics, events."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,backspace", "app.pop_screen", "Back"),
        Binding("k", "kick", "Kick"),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self, conn_id: str) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.conn: dict[str, Any] | None = None
        self.gone = False

    def compose(self) -> ComposeResult:
        yield Banner(id="banner")
        title = Text.assemble(("connection ", "bold"), (self.conn_id, "bold cyan"), ("  loading…", "dim"))
        yield Static(title, id="detail-title")
        with VerticalScroll(id="detail"):
            with Horizontal(classes="row"):
                yield Static(id="info", classes="box")
                yield Static(id="claims", classes="box")
            with Horizontal(classes="row"):
                yield Static(id="queue", classes="box")
                yield Static(id="metrics", classes="box")
            yield Static(id="subs", classes="box")
            yield Static(id="events", classes="box")
        yield Footer()

    def on_mount(self) -> None:
        titles = {"info": "info", "claims": "claims (the token itself is never shown)",
                  "queue": "queue and breaker", "metrics": "metrics", "subs": "subscriptions",
                  "events": "recent events"}
        for wid, title in titles.items():
            self.query_one(f"#{wid}").border_title = title

    async def fetch(self) -> Any:
        return await self.top().source.call("connections.get", id=self.conn_id)

    def failed(self, exc: RequestFailed) -> None:
        if exc.code == "not_found":
            self.gone = True
            self.query_one("#detail-title", Static).update(Text.assemble(
                ("connection ", "bold"), (self.conn_id, "bold cyan"),
                ("  closed — no longer connected", "bold red")))
            return
        super().failed(exc)

    def show(self, c: dict[str, Any]) -> None:
        self.conn = c
        tz = self.top().tz
        subs = c.get("subscriptions") or []
        self.query_one("#detail-title", Static).update(Text.assemble(
            ("connection ", "bold"), (render.plain(c.get("id")), "bold cyan"), "  ",
            (render.plain(f"{c.get('user_id') or '-'}@{c.get('company_id') or '-'}"), "bold"),
            ("  pool ", "dim"), render.plain(c.get("pool")), ("  state ", "dim"), render.plain(c.get("state")),
            ("  subscriptions ", "dim"), str(len(subs))))
        self.query_one("#info", Static).update(render.conn_info(c, tz))
        self.query_one("#claims", Static).update(render.claims(c, tz))
        self.query_one("#queue", Static).update(render.queue_breaker(c))
        self.query_one("#metrics", Static).update(render.conn_metrics(c))
        self.query_one("#subs", Static).update(render.subscriptions(c))
        self.query_one("#events", Static).update(render.recent_events(c.get("events") or [], tz))

    def action_kick(self) -> None:
        if self.conn is None or self.gone:
            self.notify("this connection is not connected", severity="warning", markup=False)
            return
        self.top().confirm_kick(self.conn, then_back=True)


class ChannelsScreen(Polling):
    """Channel groups (config) and live instances with subscriber counts and history depth."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,backspace,c", "app.pop_screen", "Back"),
        Binding("q", "app.quit", "Quit"),
    ]

    def compose(self) -> ComposeResult:
        yield Banner(id="banner")
        yield Static(Text("channel groups", style="bold"), classes="list-title")
        yield DataTable(id="groups", cursor_type="row", zebra_stripes=True)
        yield Static(Text("channel instances", style="bold"), classes="list-title", id="instances-title")
        yield DataTable(id="instances", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#groups", DataTable).add_columns(
            "group", "type", "inst", "subs", "history/ttl", "publishers", "name")
        self.query_one("#instances", DataTable).add_columns(
            "channel", "group", "subs", "users", "hist", "position")
        self.query_one("#instances", DataTable).focus()

    async def fetch(self) -> Any:
        return await self.top().source.call("channels.list")

    def show(self, data: dict[str, Any]) -> None:
        _fill(self.query_one("#groups", DataTable), [(g["group_id"], render.group_row(g))
                                                      for g in data.get("groups", [])])
        inst = data.get("instances", [])
        _fill(self.query_one("#instances", DataTable), [(i["channel"], render.instance_row(i)) for i in inst])
        self.query_one("#instances-title", Static).update(Text.assemble(
            ("channel instances ", "bold"), (f"{len(inst)} live", "dim")))


class RulesScreen(Polling):
    """Routing rules with hit counts; enter / space toggles the selected rule on or off."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,backspace,r", "app.pop_screen", "Back"),
        Binding("space,e", "toggle_rule", "Enable/disable"),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.rules: dict[str, dict[str, Any]] = {}

    def compose(self) -> ComposeResult:
        yield Banner(id="banner")
        yield Static(Text("routing rules", style="bold"), classes="list-title", id="rules-title")
        yield DataTable(id="rules", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        t = self.query_one("#rules", DataTable)
        t.add_columns("id", "prio", "state", "stop", "hits", "target", "filter")
        t.focus()

    async def fetch(self) -> Any:
        return await self.top().source.call("rules.list")

    def show(self, data: dict[str, Any]) -> None:
        rules = data.get("rules", [])
        self.rules = {r["id"]: r for r in rules}
        _fill(self.query_one("#rules", DataTable), [(r["id"], render.rule_row(r)) for r in rules])
        m = data.get("metrics") or {}
        self.query_one("#rules-title", Static).update(Text.assemble(
            ("routing rules ", "bold"), (f"{len(rules)}", ""), ("  routed ", "dim"),
            render.count(m.get("messages_routed")), ("  unrouted ", "dim"),
            render.count(m.get("messages_unrouted")),
            ("   enter / space: enable or disable", "dim")))

    @on(DataTable.RowSelected, "#rules")
    def action_toggle_rule(self) -> None:
        t = self.query_one("#rules", DataTable)
        if not t.row_count:
            return
        rid = t.coordinate_to_cell_key(t.cursor_coordinate).row_key.value
        rule = self.rules.get(str(rid))
        if rule is not None:
            self.set_enabled(rule["id"], not rule.get("enabled"))

    @work(exclusive=True, group="toggle")
    async def set_enabled(self, rid: str, enabled: bool) -> None:
        try:
            await self.top().source.call("rules.set_enabled", id=rid, enabled=enabled)
        except (RequestFailed, Unavailable) as exc:
            self.notify(f"rule {rid}: {exc}", severity="error", markup=False)
            return
        self.notify(f"rule {rid} {'enabled' if enabled else 'disabled'}", markup=False)
        self.load()


def _fill(table: DataTable[Any], rows: list[tuple[str, tuple[Any, ...]]]) -> None:
    """Replace a small table's rows, keeping the cursor on the same key."""
    keys = [k for k, _ in rows]
    current = [str(k.value) for k in table.rows]
    if keys == current:
        for k, cells in rows:
            for col, v in zip(table.columns, cells, strict=False):
                table.update_cell(k, col, v)
        return
    old = table.cursor_row
    cur = current[old] if 0 <= old < len(current) else None
    table.clear()
    for k, cells in rows:
        table.add_row(*cells, key=k)
    if rows:
        table.move_cursor(row=keys.index(cur) if cur in keys else min(old, len(rows) - 1))


HELP = (
    ("main screen", ""),
    ("↑ ↓ pgup pgdn", "move in the connections table"),
    ("enter", "drill down into the selected connection"),
    ("/", "filter: id, pool, user, company, state, address"),
    ("", "(enter keeps the filter, esc clears it)"),
    ("s / o", "sort by the next column / reverse the order"),
    ("", "(or click a column header)"),
    ("[ ]", "previous / next page of connections"),
    ("k", "kick the selected connection (code 4000)"),
    ("b", "publish to a channel, or broadcast to all"),
    ("c", "channels and their subscribers"),
    ("r", "routing rules: enable or disable"),
    ("p", "pause / resume refreshing"),
    ("? / q", "this help / quit"),
    ("other screens", ""),
    ("esc", "back to the main screen"),
    ("k", "kick this connection (drill-down)"),
    ("space, enter", "toggle the selected rule (rules)"),
)


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,question_mark,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        t = Table(box=None, show_header=False, padding=(0, 1))
        t.add_column(style="bold cyan", no_wrap=True)
        t.add_column()
        for k, v in HELP:
            if not v:
                t.add_row(Text(k, style="bold underline"), "")
            else:
                t.add_row(k, v)
        with Vertical(classes="dialog", id="help-dialog"):
            yield Static(Text.assemble(("wsctl top — keys", "bold"), ("   (docs/dashboard.md)", "dim")))
            yield Static(t, id="help-body")

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(None)
