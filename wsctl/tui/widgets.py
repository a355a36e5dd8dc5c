"""Small widgets shared by the dashboard's screens."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from wsctl.fmt import plain


class Banner(Static):
    """The "cannot reach wsd" line at the top of every screen; hidden while the daemon answers."""

    def on_mount(self) -> None:
        msg = getattr(self.app, "unreachable", "")
        self.show(msg)

    def show(self, message: str) -> None:
        self.update(Text(plain(message)))
        self.set_class(bool(message), "-shown")
