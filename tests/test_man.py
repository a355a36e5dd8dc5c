"""The manual pages and docs/control.md cannot drift from the programs.

Every wsctl and wsd command (walked from the typer apps' click commands) has its own subsection in
its man page naming each of its options; the global options are in OPTIONS; the pages render
without warnings (with `man -l` and `groff`, whichever exist) and have the standard sections; every
close code, handshake refusal, signal and control method is documented.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer.main

from wsctl.cli import app as wsctl_app
from wsd import errors
from wsd.cli import app as wsd_app
from wsd.control.protocol import METHODS

ROOT = Path(__file__).resolve().parents[1]
WSCTL_PAGE = ROOT / "man" / "wsctl.1"
WSD_PAGE = ROOT / "man" / "wsd.8"
REQUIRED_SECTIONS = ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "FILES", "ENVIRONMENT")


# ------------------------------------------------------------------------------------- a small roff reader

_ESCAPES = [
    (r"\-", "-"),
    (r"\(em", "—"),
    (r"\(dq", '"'),
    (r"\(aq", "'"),
    (r"\(lq", '"'),
    (r"\(rq", '"'),
    (r"\&", ""),
    (r"\e", "\\"),
]
_FONT = re.compile(r"\\f[BIRP]")


def plain(text: str) -> str:
    """Roff text without font changes and escapes."""
    text = _FONT.sub("", text)
    for esc, rep in _ESCAPES:
        text = text.replace(esc, rep)
    return text


def macro_args(rest: str) -> list[str]:
    """The arguments of a macro line, honouring double quotes."""
    out, cur, quoted, i = [], "", False, 0
    while i < len(rest):
        ch = rest[i]
        if ch == '"':
            if quoted and i + 1 < len(rest) and rest[i + 1] == '"':
                cur += '"'
                i += 1
            else:
                quoted = not quoted
        elif ch == " " and not quoted:
            if cur:
                out.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    if cur:
        out.append(cur)
    return out


class Page:
    """A man page read into its title, sections (.SH) and subsections (.SS) as plain text."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.title: list[str] = []
        self.sections: dict[str, str] = {}
        self.subsections: list[tuple[str, str, str]] = []  # (section, heading, text)
        section = sub = None
        buf: list[str] = []

        def flush() -> None:
            text = " ".join(buf)
            if sub is not None:
                self.subsections.append((section or "", sub, text))
            if section is not None:
                self.sections[section] = self.sections.get(section, "") + " " + text
            buf.clear()

        for raw in path.read_text(encoding="utf-8").splitlines():
            if raw.startswith(('.\\"', "'\\\"")):
                continue
            if raw.startswith("."):
                name, _, rest = raw[1:].partition(" ")
                args = [plain(a) for a in macro_args(rest)]
                if name == "TH":
                    self.title = args
                elif name == "SH":
                    flush()
                    section, sub = " ".join(args), None
                elif name == "SS":
                    flush()
                    sub = " ".join(args)
                    buf.append(sub)
                elif name in ("B", "I", "SM"):
                    buf.append(" ".join(args))
                elif name in ("BR", "RB", "BI", "IB", "IR", "RI"):
                    buf.append("".join(args))
                else:
                    buf.append(" ".join(args))
            else:
                buf.append(plain(raw))
        flush()

    def subsection(self, section: str, command: str) -> str:
        """The text of the subsection whose heading starts with ``command`` (a word boundary after it)."""
        for sec, heading, text in self.subsections:
            if sec == section and (heading == command or heading.startswith(command + " ")):
                return text
        raise AssertionError(f"{self.path.name}: no subsection for {command!r} under {section}")


def walk(cmd: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every command (path, click command) of a typer app, groups included, root first."""
    out = [(path, cmd)]
    for name, sub in getattr(cmd, "commands", {}).items():
        out += walk(sub, (*path, name))
    return out


def options_of(cmd: Any) -> list[str]:
    return [o for p in cmd.params if p.param_type_name == "option" for o in (*p.opts, *p.secondary_opts)]


# --------------------------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def wsctl_page() -> Page:
    return Page(WSCTL_PAGE)


@pytest.fixture(scope="module")
def wsd_page() -> Page:
    return Page(WSD_PAGE)


@pytest.mark.parametrize("page_path", [WSCTL_PAGE, WSD_PAGE], ids=["wsctl.1", "wsd.8"])
def test_page_has_the_standard_structure(page_path):
    """.TH names the page; NAME, SYNOPSIS, DESCRIPTION, OPTIONS, EXIT STATUS, FILES, ENVIRONMENT exist."""
    page = Page(page_path)
    name, section = page_path.stem, page_path.suffix[1:]
    assert page.title[:2] == [name.upper(), section], page.title
    for s in REQUIRED_SECTIONS:
        assert s in page.sections and page.sections[s].strip(), (
            f"{page_path.name}: section {s} missing or empty"
        )
    assert page.sections["NAME"].strip().startswith(f"{name} - ")


@pytest.mark.parametrize("page_path", [WSCTL_PAGE, WSD_PAGE], ids=["wsctl.1", "wsd.8"])
def test_page_renders_without_warnings(page_path):
    """`man -l` and `groff -man` (whichever are installed) render the page, with no warnings."""
    tools = 0
    env = dict(os.environ, MANPAGER="cat", PAGER="cat", MANWIDTH="80", LC_ALL="C.UTF-8")
    if shutil.which("man"):
        tools += 1
        p = subprocess.run(["man", "-l", str(page_path)], capture_output=True, text=True, env=env, timeout=30)
        assert p.returncode == 0, p.stderr
        assert "NAME" in p.stdout and "EXIT STATUS" in p.stdout and not p.stderr.strip(), p.stderr
    if shutil.which("groff"):
        tools += 1
        p = subprocess.run(
            ["groff", "-man", "-Tutf8", "-ww", "-z", str(page_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    if not tools:
        # Neither tool here: the structural parse (test_page_has_the_standard_structure) is the check,
        # plus balanced .nf/.fi and .RS/.RE pairs.
        text = page_path.read_text()
        assert text.count("\n.nf") == text.count("\n.fi")
        assert text.count("\n.RS") == text.count("\n.RE")


def test_every_wsctl_command_and_option_is_in_the_page(wsctl_page):
    """Each wsctl command has a COMMANDS subsection naming all its options; global options are in OPTIONS."""
    root = typer.main.get_command(wsctl_app)
    commands = walk(root)
    assert len(commands) > 20
    for path, cmd in commands:
        if not path:
            text = wsctl_page.sections["OPTIONS"]
            opts = [*options_of(cmd), "--help", "-h"]
        else:
            text = wsctl_page.subsection("COMMANDS", " ".join(path))
            opts = options_of(cmd)
        for opt in opts:
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), (
                f"wsctl {' '.join(path)}: option {opt} not documented in man/wsctl.1"
            )
        for p in cmd.params:
            if p.param_type_name == "argument":
                metavar = (p.metavar or p.name).upper()
                assert metavar in text, f"wsctl {' '.join(path)}: argument {metavar} not in man/wsctl.1"


def test_every_wsd_command_and_option_is_in_the_page(wsd_page):
    """Each wsd command has a COMMANDS subsection naming all its options and arguments."""
    root = typer.main.get_command(wsd_app)
    commands = walk(root)
    leaves = [(p, c) for p, c in commands if p and not getattr(c, "commands", None)]
    assert {" ".join(p) for p, _ in leaves} >= {
        "serve",
        "version",
        "config init",
        "config check",
        "config show",
    }
    for path, cmd in leaves:
        text = wsd_page.subsection("COMMANDS", " ".join(path))
        for opt in options_of(cmd):
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), (
                f"wsd {' '.join(path)}: option {opt} not documented in man/wsd.8"
            )
        for p in cmd.params:
            if p.param_type_name == "argument":
                assert (p.metavar or p.name).upper() in text
    assert "--help" in wsd_page.sections["OPTIONS"]


def test_wsd_page_documents_close_codes_refusals_signals_and_endpoints(wsd_page):
    """Every close code, every handshake refusal code wsd uses, the signals and the HTTP endpoints."""
    closes = wsd_page.sections["CLOSE CODES"]
    for code in sorted(errors.CLOSE_CODES):
        assert re.search(rf"\b{code}\b", closes), f"close code {code} missing from man/wsd.8"
    assert "heartbeat" in closes and "ick" in closes and "low consumer" in closes and "dle" in closes
    server_src = (ROOT / "wsd" / "runtime" / "server.py").read_text()
    refusals = wsd_page.sections["HANDSHAKE REFUSALS"]
    used = [n for n in dir(errors) if n.startswith("H_") and f"errors.{n}" in server_src]
    assert used, "no handshake refusal codes found in wsd/runtime/server.py"
    for n in used:
        status, code = getattr(errors, n)
        assert code in refusals and str(status) in refusals, f"{n} ({status} {code}) missing from man/wsd.8"
    for sig in ("SIGTERM", "SIGINT", "SIGHUP"):
        assert sig in wsd_page.sections["SIGNALS"]
    for endpoint in ("/healthz", "/readyz", "/metrics", "/ws/"):
        assert endpoint in wsd_page.sections["HTTP ENDPOINTS"]
    env = wsd_page.sections["ENVIRONMENT"]
    assert "WSD_<SECTION>_<KEY>" in env and "WSD_SOCKET" in env and "XDG_RUNTIME_DIR" in env
    status = wsd_page.sections["EXIT STATUS"]
    assert all(re.search(rf"\b{n}\b", status) for n in (0, 1, 2))


def test_wsctl_page_documents_exit_codes_discovery_and_environment(wsctl_page):
    """Exit codes 0-3 with the daemon-down message, the socket discovery order, the environment."""
    status = wsctl_page.sections["EXIT STATUS"]
    for n in (0, 1, 2, 3):
        assert re.search(rf"\b{n}\b", status)
    assert "wsctl: cannot reach wsd at PATH: is it running? (wsd serve)" in status
    disc = wsctl_page.sections["SOCKET DISCOVERY"]
    order = [
        "--socket",
        "$WSD_SOCKET",
        "control.socket",
        "$XDG_RUNTIME_DIR/wsd/wsd.sock",
        "/tmp/wsd-UID/wsd.sock",
    ]
    positions = [disc.find(x) for x in order]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), positions
    env = wsctl_page.sections["ENVIRONMENT"]
    for var in ("WSD_SOCKET", "WSD_CONFIG", "XDG_RUNTIME_DIR"):
        assert var in env
    assert "wsctl token" in wsctl_page.sections["EXAMPLES"]


def test_control_doc_covers_every_method():
    """docs/control.md has a section for every control method, plus framing, errors, streaming, security."""
    doc = (ROOT / "docs" / "control.md").read_text()
    for method in METHODS:
        assert re.search(rf"^### `{re.escape(method)}`", doc, re.M), (
            f"docs/control.md: no section for {method}"
        )
    for heading in ("## Framing", "### Error codes", "## Streaming: `events.subscribe`", "## Security"):
        assert heading in doc
    from wsd.control import protocol as P

    for code in (P.E_PARSE, P.E_BAD_REQUEST, P.E_UNKNOWN_METHOD, P.E_NOT_FOUND, P.E_FAILED, P.E_FORBIDDEN):
        assert f"`{code}`" in doc
