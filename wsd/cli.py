"""The `wsd` command line: serve, config, version."""

from __future__ import annotations

import asyncio
import platform
import sys
from typing import Annotated, Optional

import typer

import wsd
from wsd.cli_config import config_app

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="wsd: the WebSocket gateway daemon. Start with `wsd serve` (no config needed).")
app.add_typer(config_app, name="config")


@app.command()
def serve(
    config: Annotated[Optional[str], typer.Option("-c", "--config", help="TOML config file (default: embedded)")] = None,
    host: Annotated[Optional[str], typer.Option("--host", help="listen address (overrides server.host)")] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="listen port (overrides server.port; 0 = any)")] = None,
    socket: Annotated[Optional[str], typer.Option("--socket", help="control socket path (overrides control.socket)")] = None,
    log_level: Annotated[Optional[str], typer.Option("--log-level", help="debug|info|warning|error")] = None,
    log_format: Annotated[Optional[str], typer.Option("--log-format", help="text|json")] = None,
) -> None:
    """Run the manager. With no -c it runs on built-in defaults: 127.0.0.1:8765, memory engine,
    an ephemeral HS256 secret, four pools (frontend, mt5, admin, api).

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
    logs.setup(level, fmt)
    from wsd.runtime.daemon import Daemon

    daemon = Daemon(cfg, config_path=config, host=host, port=port, socket_path=socket)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is optional off Linux/macOS
        runner = asyncio.run
    try:
        code = runner(daemon.run())
    except (OSError, RuntimeError) as exc:
        print(f"wsd: error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


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


def main() -> None:
    app(prog_name="wsd")
