"""The `wsd` command line: serve, config, keygen, version (and --version, shell completion)."""

from __future__ import annotations

import asyncio
import os
import platform
import sys
from typing import Annotated, Any, Optional

import typer
import typer.main

import wsd
from wsctl.helptext import bad_value, readable_help
from wsd.cli_config import config_app

readable_help()  # --help shows TEXT, N, PATH, not <str>, <int>, <bool>

app = typer.Typer(
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    help="wsd: the WebSocket gateway daemon. Start it with `wsd serve` (no config needed), then operate "
    "it with wsctl.",
    epilog="Exit status: 0 ok, 1 error (config invalid, port in use, ...), 2 usage error. "
    "See man wsd (or wsctl man wsd for the path of the page).",
)
app.add_typer(config_app, name="config")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wsd {wsd.__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True,
                     help="Print the wsd version and exit (`wsd version` adds Python, websockets, engines)."),
    ] = False,
) -> None:
    """wsd: the WebSocket gateway daemon."""


@app.command()
def serve(
    config: Annotated[Optional[str], typer.Option(
        "-c", "--config", metavar="FILE", help="TOML config file (default: the built-in one).")] = None,
    host: Annotated[Optional[str], typer.Option(
        "--host", metavar="ADDRESS", help="Listen address (overrides server.host).")] = None,
    port: Annotated[Optional[int], typer.Option(
        "--port", metavar="PORT", help="Listen port (overrides server.port; 0 = any free port).")] = None,
    socket: Annotated[Optional[str], typer.Option(
        "--socket", metavar="PATH", help="Control socket path (overrides control.socket).")] = None,
    log_level: Annotated[Optional[str], typer.Option(
        "--log-level", metavar="LEVEL", help="debug, info, warning or error (overrides log.level).")] = None,
    log_format: Annotated[Optional[str], typer.Option(
        "--log-format", metavar="FORMAT", help="text or json (overrides log.format).")] = None,
    workers: Annotated[Optional[str], typer.Option(
        "--workers", metavar="N", help="Worker processes sharing the port: a number, auto (one per CPU) or "
        "auto:MIN-MAX (scaled on CPU); more than 1 needs engine.type = \"redis\" (overrides workers.count).")] = None,
    worker: Annotated[str, typer.Option("--worker", hidden=True, help="(internal) run as this supervised worker")] = "",
) -> None:
    """Run the daemon in the foreground (no config needed: built-in defaults).

    With no -c it runs on built-in defaults: 127.0.0.1:8765, memory engine, an ephemeral HS256
    secret, four pools (frontend, mt5, admin, api). SIGHUP (or `wsctl reload`) re-reads the config;
    SIGTERM drains and stops.

    Example: wsd serve   then, in another terminal: wsctl token --user alice
    """
    from wsd import config as wconfig

    try:
        from wsd.runtime import logs
    except ImportError as exc:  # a websockets release the runtime does not work with
        print(f"wsd: error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    try:
        cfg = wconfig.load_config(config)
    except wconfig.ConfigError as exc:
        for line in exc.errors:
            print(f"wsd: error: {line}", file=sys.stderr)
        raise typer.Exit(1) from None
    level = log_level or cfg.log.level
    fmt = log_format or cfg.log.format
    if level not in ("debug", "info", "warning", "error"):
        print("wsd: error: --log-level must be debug, info, warning or error", file=sys.stderr)
        raise typer.Exit(2)
    if fmt not in ("text", "json"):
        print("wsd: error: --log-format must be text or json", file=sys.stderr)
        raise typer.Exit(2)
    logs.setup(level, fmt, node=worker)
    if not worker:
        count = _worker_count(workers, cfg)
        if count.high > 1:
            _run(_supervisor(cfg, count, config, host, port, socket, level, fmt).run())
    from wsd.runtime.daemon import Daemon

    daemon = Daemon(cfg, config_path=config, host=host, port=port, socket_path=socket, worker=worker,
                    shared_secret=os.environ.pop("WSD_WORKER_SECRET", "") if worker else "")
    _run(daemon.run())


def _worker_count(value: Optional[str], cfg: Any) -> Any:
    """--workers (or workers.count): how many; more than one needs the shared engine (a usage error: exit 2)."""
    from wsd.core.scaling import WorkerCountError, parse_workers

    try:
        count = parse_workers(value if value is not None else cfg.workers.count, os.cpu_count() or 1)
    except WorkerCountError as exc:
        where = "--workers" if value is not None else "workers.count"
        print(f"wsd: error: {where}: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    if count.high > 1 and cfg.engine.type != "redis":
        print(f"wsd: error: {count.high} workers need a shared engine: set engine.type = \"redis\" and engine.url "
              "in the config (the memory engine is one process), or run one worker", file=sys.stderr)
        raise typer.Exit(2)
    return count


def _supervisor(cfg: Any, count: Any, config: Optional[str], host: Optional[str], port: Optional[int],
                socket: Optional[str], level: str, fmt: str) -> Any:
    from wsd.control.protocol import default_socket_path
    from wsd.runtime.supervisor import Supervisor

    path = socket or cfg.control.socket or default_socket_path()
    return Supervisor(cfg, count, config_path=config, socket_path=path, host=host, port=port, log_level=level,
                      log_format=fmt)


def _run(coro: Any) -> None:
    """Run the daemon (or the supervisor) to its exit status."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is optional off Linux/macOS
        runner = asyncio.run
    try:
        code = runner(coro)
    except (OSError, RuntimeError) as exc:
        print(f"wsd: error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


@app.command()
def keygen(
    path: Annotated[str, typer.Argument(metavar="PATH", help="The key file to create (never overwritten).")],
) -> None:
    """Write a new message encryption key to PATH: the base64 of 32 random bytes, mode 0600.

    Name it in the config under a key id and encrypt a channel group with it:

      [encryption.keys]
      "2026-12" = "/etc/wsd/keys/2026-12.key"

      [channels.trading-signals]
      encrypt = "2026-12"

    An existing file is never overwritten (a replaced key makes the history written under it unreadable).
    The key is not printed; give the same file to the clients that decrypt. See docs/security.md.
    """
    import os

    from wsd.core.encryption import new_key_text

    try:
        # O_EXCL: never overwrite, never follow a planted symlink; created 0600 from the start.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"wsd: error: {path} already exists; a key is never overwritten (choose a new path and "
              "key id: old messages stay readable with the old key)", file=sys.stderr)
        raise typer.Exit(1) from None
    except OSError as exc:
        print(f"wsd: error: cannot create {path}: {exc.strerror or exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(new_key_text())
    except OSError as exc:
        print(f"wsd: error: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    print(path)


@app.command()
def version() -> None:
    """Print the wsd, Python and websockets versions and the engines available."""
    import websockets

    engines = ["memory"]
    try:
        import redis  # noqa: F401

        engines.append("redis")
    except ImportError:
        pass
    print(f"wsd {wsd.__version__}")
    print(f"python {platform.python_version()}")
    print(f"websockets {websockets.__version__}")
    print(f"engines {', '.join(engines)}")


def main(argv: list[str] | None = None) -> None:
    """Run wsd; a usage error is one line on stderr (``wsd: error: --port: a whole number``), exit 2."""
    try:  # typer >= 0.22 vendors its own click
        from typer._click import exceptions as click_exc
    except ImportError:  # pragma: no cover - older typer on the real click
        from click import exceptions as click_exc  # type: ignore[no-redef]

    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="wsd", standalone_mode=False)
    except click_exc.NoArgsIsHelpError as exc:
        exc.show()
        raise SystemExit(2) from None
    except click_exc.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "wsd"
        worded = bad_value(exc) if isinstance(exc, click_exc.BadParameter) else None
        msg = worded or exc.format_message().rstrip(".")
        print(f"wsd: error: {msg} (see '{where} --help')", file=sys.stderr)
        raise SystemExit(2) from None
    except click_exc.ClickException as exc:
        print(f"wsd: error: {exc.format_message()}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        raise SystemExit(130) from None
    raise SystemExit(rv if isinstance(rv, int) else 0)
