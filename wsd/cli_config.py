"""``wsd config init | check | show``: write, validate and print the configuration.

Errors go to stderr, one ``error: key.path: problem`` line each, and exit with code 1.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from wsd.config import ConfigError, default_config_toml, dump_config, load_config

config_app = typer.Typer(no_args_is_help=True, add_completion=False,
                         context_settings={"help_option_names": ["-h", "--help"]},
                         help="Write, validate and show the wsd configuration.")


def _fail(lines: list[str]) -> NoReturn:
    for line in lines:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(1)


@config_app.command("init")
def init(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Where to write the config.")] = Path("wsd.toml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a complete, commented default config with a fresh random secret (mode 0600)."""
    if file.exists() and not force:
        _fail([f"{file} already exists; use --force to overwrite it"])
    text = default_config_toml()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        # Created 0600 from the start: the file holds the HMAC secret.
        fd = os.open(file, flags, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(file, 0o600)  # an overwritten file keeps its old mode otherwise
    except OSError as exc:
        _fail([f"cannot write {file}: {exc.strerror or exc}"])
    typer.echo(str(file))


@config_app.command("check")
def check(file: Annotated[Path, typer.Argument(metavar="FILE", help="The config file to validate.")]) -> None:
    """Validate FILE (with WSD_* overrides); print every error with its key path."""
    try:
        load_config(file)
    except ConfigError as exc:
        _fail(exc.errors)
    typer.echo(f"ok: {file}")


@config_app.command("show")
def show(
    file: Annotated[Path | None, typer.Argument(
        metavar="FILE", show_default=False, help="The config file; default: the built-in one.")] = None,
    config: Annotated[Path | None, typer.Option(
        "-c", "--config", metavar="FILE", help="The same as the FILE argument.")] = None,
) -> None:
    """Print the effective config (defaults + FILE + WSD_* overrides) as TOML, secrets redacted.

    Example: wsd config show wsd.toml
    """
    if file is not None and config is not None and file != config:
        _fail(["name the config file once: FILE or -c FILE"])
    try:
        cfg = load_config(file or config)
    except ConfigError as exc:
        _fail(exc.errors)
    typer.echo(dump_config(cfg, redact=True), nl=False)
