"""`wsctl top`: the live dashboard of a running wsd, as k9s or htop are for their domains.

Everything comes through the control socket (``LiveSource``) or a recording (``RecordedSource``);
the app gets its source injected and never imports the daemon. Polling runs in exclusive workers so
the UI never waits on the daemon, and the connections table is paged by the daemon (offset, limit,
sort, filter) so 10,000 connections never cross the socket every second.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections import deque
from typing import Any, ClassVar

from rich.text import Text
from textual import events, on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, RichLog, Sparkline, Static
from textual.worker import Worker

from wsctl.tui import render
from wsctl.tui.dialogs import BroadcastDialog, KickDialog
from wsctl.tui.screens import ChannelsScreen, ConnectionScreen, HelpScreen, RulesScreen
from wsctl.tui.source import DataSource, LiveSource, RequestFailed, Unavailable
from wsctl.tui.widgets import Banner
from wsd.control import protocol as P

NARROW_BELOW = 120
#: numeric columns sort largest first when chosen; text columns A to Z
DESC_FIRST = P.NUMERIC_SORT_FIELDS


class MainScreen(Screen[None]):
    """Header, pools, charts, the paged connections table and the live event log."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark", "app.help", "Help"),
        Binding("slash", "filter", "Filter"),
        Binding("s", "sort_next", "Sort"),
        Binding("o", "sort_reverse", "Order", show=False),
        Binding("k", "kick", "Kick"),
        Binding("b", "broadcast", "Publish"),
        Binding("c", "channels", "Channels"),
        Binding("r", "rules", "Rules"),
        Binding("left_square_bracket", "page(-1)", "Prev page", show=False),
        Binding("right_square_bracket", "page(1)", "Next page", show=False),
        Binding("p", "pause", "Pause", show=False),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.sort = "-" + P.DEFAULT_SORT
        self.filter = ""
        self.page_offset = 0
        self.total = 0
        self.narrow = False
        self.clustered = False  # the rows come from several nodes: a node column leads the table
        self.status: dict[str, Any] = {}
        self.pools: list[dict[str, Any]] = []
        self.capacity: dict[str, Any] | None = None  # the shared connection capacity (pools.list)
        self.rows: list[dict[str, Any]] = []  # the page on screen, in table order
        self._keys: list[str] = []
        self._last_rows: list[dict[str, Any]] = []
        self._prev_totals: tuple[float, dict[str, int]] | None = None
        self._rates: dict[str, float | None] = {}
        self._samples: deque[dict[str, float]] = deque(maxlen=120)
        self._worker: Worker[None] | None = None
        self._started = 0.0
        self.refreshes = 0  # completed polls (tests wait on it)
        self._suspended = False

    def top(self) -> WsdTop:
        app = self.app
        assert isinstance(app, WsdTop)
        return app

    # -- layout ---------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Banner(id="banner")
        yield Static(Text("connecting…", style="dim"), id="header")
        with Horizontal(id="top"):
            yield Static(id="pools")
            with Vertical(id="charts"):
                yield Static(classes="chart-label", id="label-out")
                yield Sparkline([], id="spark-out")
                yield Static(classes="chart-label", id="label-in")
                yield Sparkline([], id="spark-in")
                yield Static(classes="chart-label", id="label-lat")
                yield Sparkline([], id="spark-lat")
        yield Static(id="caption")
        yield Input(placeholder="filter: id, pool, user, company, state or address — enter keeps, esc clears",
                    id="filter")
        yield DataTable(id="conns", cursor_type="row", zebra_stripes=True)
        yield RichLog(id="log", max_lines=500, wrap=False, markup=False, auto_scroll=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#pools").border_title = "pools"
        self.query_one("#charts").border_title = f"last {self.top().window}s"
        self.query_one("#log").border_title = "events"
        self.narrow = self.top().size.width < NARROW_BELOW
        self._build_columns()
        self.query_one("#conns", DataTable).focus()
        self.set_interval(self.top().refresh_s, self._tick)
        self.poll()
        self.follow_events()

    def on_resize(self, event: events.Resize) -> None:
        narrow = event.size.width < NARROW_BELOW
        if narrow != self.narrow:
            self.narrow = narrow
            self._build_columns()
            self._draw_status()

    def on_screen_suspend(self) -> None:
        self._suspended = True

    def on_screen_resume(self) -> None:
        if self._suspended:  # back from another screen: show fresh data now, not at the next tick
            self._suspended = False
            self.poll()

    # -- polling --------------------------------------------------------------------------------------
    def _tick(self) -> None:
        app = self.top()
        if app.paused or not self.is_current:
            return  # another screen is on top: it polls what it shows; this one catches up on resume
        # a slow daemon: let the running poll finish instead of cancelling it every tick
        if self._worker is not None and self._worker.is_running and time.monotonic() - self._started < 10:
            return
        self.poll()

    def poll(self) -> None:
        self._started = time.monotonic()
        self._worker = self._poll()

    @work(exclusive=True, group="refresh")
    async def _poll(self) -> None:
        app = self.top()
        src = app.source
        params: dict[str, Any] = {"sort": self.sort, "offset": self.page_offset, "limit": app.page_size}
        if self.filter:
            params["filter"] = self.filter
        try:
            status = await src.call("status", samples=app.window)
            pools = await src.call("pools.list")
            conns = await src.call("connections.list", **params)
        except Unavailable as exc:
            app.set_unreachable(str(exc))
            with contextlib.suppress(NoMatches):
                self._draw_caption()
            return
        except RequestFailed as exc:
            app.set_reachable()
            self.notify(str(exc), severity="error", timeout=4, markup=False)
            return
        app.set_reachable()
        try:
            self._apply(status, pools, conns)
        except NoMatches:
            return  # the app is shutting down and the widgets are gone

    def _apply(self, status: dict[str, Any], pools: dict[str, Any], conns: dict[str, Any]) -> None:
        app = self.top()
        now = time.monotonic()
        totals = render.pool_totals(pools.get("pools", []))
        prev = self._prev_totals
        self._rates = render.pool_rates(prev[1] if prev else None, totals, now - prev[0] if prev else 0.0)
        self._prev_totals = (now, totals)
        self.status = status
        self.pools = pools.get("pools", [])
        self.capacity = pools.get("capacity")
        samples = status.get("samples") or []
        if samples:
            self._samples = deque(samples, maxlen=app.window)
        else:  # an older daemon without per-second samples: keep our own from each poll
            lat = status.get("latency") or {}
            self._samples.append({"in": status.get("rate_in", 0), "out": status.get("rate_out", 0),
                                  "p99_ms": lat.get("p99_ms", 0)})
        self._draw_status()
        clustered = len(set(conns.get("nodes") or ()) | set(conns.get("missing") or ())) > 1
        if clustered != self.clustered:
            self.clustered = clustered
            self._build_columns()
        self._show_connections(conns)
        self.refreshes += 1

    @work(exclusive=True, group="events")
    async def follow_events(self) -> None:
        log = self.query_one("#log", RichLog)
        tz = self.top().tz
        async for ev in self.top().source.events(backlog=50):
            if not log.is_attached:
                return
            log.write(render.event_line(ev, tz), expand=True)

    # -- drawing --------------------------------------------------------------------------------------
    def _draw_status(self) -> None:
        if not self.status:
            return
        self.query_one("#header", Static).update(render.header(self.status, narrow=self.narrow))
        pools = render.pools_table(self.pools, self._rates, narrow=self.narrow)
        panel = self.query_one("#pools", Static)
        panel.update(pools)
        panel.border_subtitle = render.shared_capacity(self.capacity)
        s = list(self._samples)
        series = {
            "out": [float(x.get("out", 0)) for x in s], "in": [float(x.get("in", 0)) for x in s],
            "lat": [float(x.get("p99_ms", 0)) for x in s],
        }
        labels = {"out": ("msgs/s out", render.rate), "in": ("msgs/s in", render.rate),
                  "lat": ("p99 latency", render.ms)}
        for key, data in series.items():
            name, fmt = labels[key]
            now = data[-1] if data else 0.0
            peak = max(data) if data else 0.0
            self.query_one(f"#label-{key}", Static).update(Text.assemble(
                (name, "bold"), "  ", fmt(now), ("  max ", "dim"), fmt(peak)))
            self.query_one(f"#spark-{key}", Sparkline).data = data or [0.0]

    def _draw_caption(self) -> None:
        app = self.top()
        cap = render.page_caption(self.total, self.page_offset, len(self.rows), self.sort, self.filter,
                                  app.page_size, app.paused)
        if app.unreachable:
            cap.append("  (stale)", style="bold red")
        self.query_one("#caption", Static).update(cap)

    def _columns(self) -> tuple[render.Col, ...]:
        cols = render.NARROW_COLUMNS if self.narrow else render.WIDE_COLUMNS
        if self.clustered:  # rows from several nodes: which one holds each connection comes first
            return ((render.NARROW_NODE_COLUMN if self.narrow else render.NODE_COLUMN), *cols)
        return cols

    def _build_columns(self) -> None:
        table = self.query_one("#conns", DataTable)
        keep = self.selected_id()
        table.clear(columns=True)
        for col in self._columns():
            table.add_column(render.column_label(col, self.sort), width=col.width, key=col.key)
        self._keys = []
        if self.rows:
            self._fill(self.rows, keep)

    def _show_connections(self, res: dict[str, Any]) -> None:
        items = list(res.get("items") or [])
        self.total = int(res.get("total") or 0)
        app = self.top()
        if not items and self.page_offset and self.total:
            # the page emptied under us (connections left): go to the last page that has rows
            self.page_offset = (self.total - 1) // app.page_size * app.page_size
            self.poll()
            return
        self.rows = items
        keys = [str(r["id"]) for r in items]
        table = self.query_one("#conns", DataTable)
        if keys == self._keys:
            old = {str(r["id"]): r for r in self._last_rows}
            for r in items:
                prev = old.get(str(r["id"]), {})
                for col in self._columns():
                    if prev.get(col.key) != r.get(col.key):
                        table.update_cell(str(r["id"]), col.key, render.conn_cell(col, r))
        else:
            self._fill(items, self.selected_id())
        self._last_rows = items
        self._draw_caption()

    def _fill(self, items: list[dict[str, Any]], keep: str | None) -> None:
        """Re-add the rows, keeping the cursor on the same connection (or the same line) and the scroll."""
        table = self.query_one("#conns", DataTable)
        index = table.cursor_row
        scroll_y = table.scroll_y
        cols = self._columns()
        table.clear()
        keys = []
        for r in items:
            table.add_row(*(render.conn_cell(c, r) for c in cols), key=str(r["id"]))
            keys.append(str(r["id"]))
        self._keys = keys
        self._last_rows = items
        if not keys:
            return
        target = keys.index(keep) if keep in keys else min(max(index, 0), len(keys) - 1)

        def restore() -> None:
            table.scroll_to(y=scroll_y, animate=False, immediate=True)
            table.move_cursor(row=target, animate=False)

        table.move_cursor(row=target, scroll=False)
        self.call_after_refresh(restore)

    def selected_id(self) -> str | None:
        table = self.query_one("#conns", DataTable)
        i = table.cursor_row
        return self._keys[i] if 0 <= i < len(self._keys) else None

    def selected_row(self) -> dict[str, Any] | None:
        cid = self.selected_id()
        return next((r for r in self.rows if str(r["id"]) == cid), None)

    # -- actions --------------------------------------------------------------------------------------
    def _resort(self, sort: str) -> None:
        self.sort = sort
        self.page_offset = 0
        self._build_columns()
        self._draw_caption()
        self.poll()

    def action_sort_next(self) -> None:
        keys = [c.key for c in self._columns() if c.key != "node"]  # the daemon sorts within each node's fields
        cur = self.sort.lstrip("-")
        nxt = keys[(keys.index(cur) + 1) % len(keys)] if cur in keys else keys[0]
        self._resort(("-" if nxt in DESC_FIRST else "") + nxt)

    def action_sort_reverse(self) -> None:
        self._resort(self.sort[1:] if self.sort.startswith("-") else "-" + self.sort)

    @on(DataTable.HeaderSelected, "#conns")
    def header_clicked(self, event: DataTable.HeaderSelected) -> None:
        key = str(event.column_key.value)
        if key == "node":
            return  # not a sort key: each node sorts its own rows, the cluster merges them in that order
        if key == self.sort.lstrip("-"):
            self.action_sort_reverse()
        else:
            self._resort(("-" if key in DESC_FIRST else "") + key)

    def action_page(self, step: int) -> None:
        size = self.top().page_size
        last = max(0, (self.total - 1) // size * size)
        offset = min(last, max(0, self.page_offset + step * size))
        if offset != self.page_offset:
            self.page_offset = offset
            self.poll()

    def action_filter(self) -> None:
        inp = self.query_one("#filter", Input)
        inp.add_class("-shown")
        # focus now, not after a refresh: keys typed right after `/` (a paste, a fast typist) go to the input
        self.set_focus(inp)

    @on(Input.Changed, "#filter")
    def filter_changed(self, event: Input.Changed) -> None:
        value = event.value.strip()
        if value != self.filter:
            self.filter = value
            self.page_offset = 0
            self.poll()

    @on(Input.Submitted, "#filter")
    def filter_done(self) -> None:
        inp = self.query_one("#filter", Input)
        if not inp.value.strip():
            inp.remove_class("-shown")
        self.set_focus(self.query_one("#conns", DataTable))

    def action_clear_filter(self) -> None:
        inp = self.query_one("#filter", Input)
        inp.remove_class("-shown")
        self.set_focus(self.query_one("#conns", DataTable))
        if inp.value:
            inp.value = ""  # Input.Changed re-polls

    def action_pause(self) -> None:
        app = self.top()
        app.paused = not app.paused
        self._draw_caption()
        if not app.paused:
            self.poll()

    @on(DataTable.RowSelected, "#conns")
    def drill_down(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.app.push_screen(ConnectionScreen(str(event.row_key.value)))

    def action_kick(self) -> None:
        row = self.selected_row()
        if row is None:
            self.notify("no connection selected", severity="warning", markup=False)
            return
        self.top().confirm_kick(row)

    def action_broadcast(self) -> None:
        self.top().open_broadcast()

    def action_channels(self) -> None:
        self.app.push_screen(ChannelsScreen())

    def action_rules(self) -> None:
        self.app.push_screen(RulesScreen())


class WsdTop(App[None]):
    """The dashboard. ``source`` is a LiveSource (control socket) or a RecordedSource (tests, demos)."""

    CSS_PATH = "dashboard.tcss"
    TITLE = "wsctl top"
    ENABLE_COMMAND_PALETTE = False
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (NARROW_BELOW, "-wide")]  # noqa: RUF012 (declared by App)
    VERTICAL_BREAKPOINTS = [(0, "-short"), (36, "-tall")]  # noqa: RUF012 (declared by App)
    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+c", "quit", "Quit", show=False, priority=True)]

    def __init__(self, source: DataSource, *, refresh: float = 1.0, page_size: int = 100, window: int = 120,
                 tz: dt.tzinfo | None = None) -> None:
        super().__init__()
        self.source = source
        self.refresh_s = max(0.05, float(refresh))
        self.page_size = max(1, page_size)
        self.window = window
        self.tz = tz
        self.paused = False
        self.unreachable = ""
        self.main = MainScreen()

    def get_default_screen(self) -> Screen[Any]:
        return self.main

    async def on_unmount(self) -> None:
        await self.source.close()

    # -- reachability ---------------------------------------------------------------------------------
    def set_unreachable(self, reason: str) -> None:
        detail = reason.split(": ", 1)[-1] if reason.startswith("cannot reach wsd") else reason
        self._set_banner(f"cannot reach wsd at {self.source.address} — retrying ({detail})")

    def set_reachable(self) -> None:
        if self.unreachable:
            self._set_banner("")

    def _set_banner(self, msg: str) -> None:
        self.unreachable = msg
        for screen in self.screen_stack:
            for b in screen.query(Banner):
                b.show(msg)

    # -- actions shared by the screens ----------------------------------------------------------------
    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def confirm_kick(self, row: dict[str, Any], *, then_back: bool = False) -> None:
        def done(reason: str | None) -> None:
            if reason is not None:
                self.kick(str(row["id"]), reason, then_back)

        self.push_screen(KickDialog(row), done)

    @work(group="actions")
    async def kick(self, conn_id: str, reason: str, then_back: bool) -> None:
        try:
            res = await self.source.call("kick", ids=[conn_id], reason=reason)
        except (RequestFailed, Unavailable) as exc:
            self.notify(f"kick failed: {exc}", severity="error", markup=False)
            return
        self.notify(f"kicked {res.get('closed', 0)} connection(s): {conn_id} ({reason})", markup=False)
        if then_back and isinstance(self.screen, ConnectionScreen):
            self.pop_screen()
        self.main.poll()

    def open_broadcast(self) -> None:
        def done(res: dict[str, Any] | None) -> None:
            if res is None:
                return
            r = res.get("result") or {}
            where = res["params"].get("channel") or "everyone"
            self.notify(f"{res['method']} to {where}: delivered {r.get('delivered', 0)}"
                        + (f", queued {r['queued']}" if r.get("queued") else ""), markup=False)

        self.push_screen(BroadcastDialog(), done)


def run(socket_path: str, refresh: float = 1.0, scope: dict[str, Any] | None = None) -> None:
    """Run the dashboard against the wsd listening on ``socket_path`` until the user quits (``scope``: the nodes
    of a cluster it covers, as ``wsctl --node`` / ``--local`` give them)."""
    WsdTop(LiveSource(socket_path, scope=scope), refresh=refresh).run()
