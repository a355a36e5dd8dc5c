"""Modal dialogs: confirm a kick (with a reason), compose a publish or broadcast."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar, cast

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

from wsctl.fmt import plain
from wsctl.tui.source import RequestFailed, Unavailable
from wsd.control import protocol as P

if TYPE_CHECKING:
    from wsctl.tui.app import WsdTop

PRIORITIES = P.PRIORITIES


class KickDialog(ModalScreen[str | None]):
    """Confirm closing one connection with code 4000; dismisses with the reason, or None on cancel."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, row: dict[str, Any]) -> None:
        super().__init__()
        self.row = row

    def compose(self) -> ComposeResult:
        r = self.row
        with Vertical(classes="dialog -danger", id="kick-dialog"):
            who = escape(plain(f"user {r.get('user_id') or '-'} · company {r.get('company_id') or '-'} · "
                               f"pool {r.get('pool')}"))
            yield Label(f"[b]Kick connection {escape(plain(r.get('id')))}?[/b]\n{who}\n"
                        "The client is closed with code 4000 and this reason:")
            with Grid(classes="form"):
                yield Label("reason")
                yield Input(value="kicked by operator", placeholder="reason", id="reason", max_length=120,
                            compact=True)
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel", compact=True)
                yield Button("Kick", variant="error", id="ok", compact=True)

    def on_mount(self) -> None:
        self.query_one("#reason", Input).focus()

    @on(Input.Submitted, "#reason")
    @on(Button.Pressed, "#ok")
    def confirm(self) -> None:
        self.dismiss(self.query_one("#reason", Input).value.strip() or "kicked by operator")

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


def build_send(channel: str, msg_type: str, priority: str, data_text: str, pool: str
               ) -> tuple[str, dict[str, Any]]:
    """The control request the dialog sends: ``publish`` with a channel, ``broadcast`` without.

    Raises ValueError with a message for the user when a field is wrong.
    """
    channel, msg_type, pool = channel.strip(), msg_type.strip(), pool.strip()
    if any(c.isspace() for c in channel):
        raise ValueError("channel: no spaces (a group like trading-signals/acme, or empty to broadcast)")
    if priority not in PRIORITIES:
        raise ValueError(f"priority: one of {', '.join(PRIORITIES)}")
    try:
        data = json.loads(data_text) if data_text.strip() else None
    except ValueError as exc:
        raise ValueError(f"data: invalid JSON ({exc})") from None
    if data is None:
        raise ValueError("data: required (any JSON value, e.g. {\"text\": \"hello\"})")
    params: dict[str, Any] = {"data": data, "priority": priority}
    if msg_type:
        params["type"] = msg_type
    if channel:
        if pool:
            raise ValueError("pool: only for a broadcast (leave the channel empty)")
        params["channel"] = channel
        return "publish", params
    if pool:
        params["pool"] = pool
    return "broadcast", params


class BroadcastDialog(ModalScreen[dict[str, Any] | None]):
    """Publish into a channel, or broadcast to everyone (optionally one pool); validated before sending."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="send-dialog"):
            yield Label("[b]Publish / broadcast[/b]\nWith a channel: publish into it. "
                        "Without: broadcast to every connection (optionally one pool).")
            with Grid(classes="form"):
                yield Label("channel")
                yield Input(placeholder="e.g. trading-signals/acme (empty = broadcast)", id="channel",
                            compact=True)
                yield Label("type")
                yield Input(placeholder="default: message / broadcast", id="type", compact=True)
                yield Label("priority")
                yield Select([(p, p) for p in PRIORITIES], value="normal", allow_blank=False, id="priority",
                             compact=True)
                yield Label("data")
                yield Input(placeholder='JSON, e.g. {"text": "hello"}', id="data", compact=True)
                yield Label("pool")
                yield Input(placeholder="broadcast only, optional", id="pool", compact=True)
            yield Static("", classes="error", id="error")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel", compact=True)
                yield Button("Send", variant="primary", id="ok", compact=True)

    def on_mount(self) -> None:
        self.query_one("#channel", Input).focus()

    @on(Input.Submitted)
    @on(Button.Pressed, "#ok")
    def submit(self) -> None:
        def val(i: str) -> str:
            return self.query_one(f"#{i}", Input).value
        prio = self.query_one("#priority", Select).value
        try:
            method, params = build_send(val("channel"), val("type"), str(prio), val("data"), val("pool"))
        except ValueError as exc:
            self.query_one("#error", Static).update(Text(plain(exc)))
            return
        self.query_one("#error", Static).update("sending…")
        self.send(method, params)

    @work(exclusive=True, group="send")
    async def send(self, method: str, params: dict[str, Any]) -> None:
        app = cast("WsdTop", self.app)
        try:
            res = await app.source.call(method, **params)
        except (RequestFailed, Unavailable) as exc:
            self.query_one("#error", Static).update(Text(plain(f"{method} failed: {exc}")))
            return
        self.dismiss({"method": method, "params": params, "result": res})

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
