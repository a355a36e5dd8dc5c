"""The ``wsctl`` command line: every operator command, and the error boundary.

Each command is one control-socket call (see docs/control.md) and prints either a human view
(``wsctl.render``) or, with ``--json``, the method's result as JSON. Failures are one line on stderr,
``wsctl: error: ...`` (or ``{"error": {...}}`` with ``--json``), and a fixed exit code:
0 ok, 1 the request failed, 2 usage, 3 the daemon is not reachable.

Importing this module must stay cheap: no textual (``top`` imports the dashboard lazily) and nothing
from the daemon except ``wsd.control.protocol``.
"""

from __future__ import annotations

import enum
import json
import re
import signal
import sys
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console, RenderableType

import wsd
from wsctl import render
from wsctl.client import Client, RequestFailed, UsageFailure, WsctlError, discover_socket
from wsctl.helptext import bad_value, readable_help
from wsd.control import protocol as P

try:  # typer >= 0.22 vendors its own click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer on the real click
    from click import exceptions as click_exc  # type: ignore[no-redef]

PROG = "wsctl"
readable_help()  # --help shows TEXT, N, PATH, not <str>, <int>, <bool>

app = typer.Typer(
    name=PROG,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    help="wsctl: control a running wsd over its control socket.\n\n"
    "Start a daemon with `wsd serve`, then: wsctl status, wsctl connections, wsctl token --user alice. "
    "Global options go before or after the command; --json makes every command print JSON.",
    epilog="Exit status: 0 ok, 1 the request failed, 2 usage error, 3 wsd not reachable. "
    "Socket: --socket, $WSD_SOCKET, config control.socket (-c / $WSD_CONFIG), "
    "$XDG_RUNTIME_DIR/wsd/wsd.sock, /run/wsd/wsd.sock, /tmp/wsd-$UID/wsd.sock. See man wsctl.",
)
rules_app = typer.Typer(no_args_is_help=False)
app.add_typer(rules_app, name="rules")


# the message priorities --priority takes: the protocol's names
Priority = enum.StrEnum("Priority", {name: name for name in P.PRIORITIES})  # type: ignore[misc]
PRIORITY_HELP = f"{P.one_of(P.PRIORITIES)}."


@dataclass
class Opts:
    socket: str | None
    config: str | None
    json: bool
    node: list[str] | None = None
    local: bool = False

    def path(self) -> str:
        return discover_socket(self.socket, self.config).path


# --------------------------------------------------------------------------------------------- helpers


def _opts(ctx: typer.Context) -> Opts:
    obj = ctx.find_root().obj
    if isinstance(obj, Opts):
        return obj
    return Opts(None, None, False)


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False)


def scope_params(opts: Opts) -> dict[str, Any]:
    """The nodes a request covers: --local (this node), --node ID... or (none given) every node of the cluster."""
    if opts.local and opts.node:
        raise UsageFailure("usage", "--local and --node cannot be combined")
    if opts.local:
        return {"local": True}
    return {"node": list(opts.node)} if opts.node else {}


def rpc(ctx: typer.Context, method: str, /, **params: Any) -> Any:
    opts = _opts(ctx)
    with Client(opts.path()) as c:
        return c.call(method, **params, **scope_params(opts))


def emit(ctx: typer.Context, result: Any, human: Any) -> None:
    """Print ``result`` as JSON (``--json``) or the human view ``human`` (renderable, str or callable)."""
    if _opts(ctx).json:
        print_json(result)
        return
    warning = render.cluster_warning(result) if isinstance(result, dict) else None
    if warning:
        sys.stderr.write(f"wsctl: warning: {warning}\n")
    view = human(result) if callable(human) else human
    if isinstance(view, str):
        sys.stdout.write(view if view.endswith("\n") else view + "\n")
    else:
        print_view(view)


def print_view(view: RenderableType) -> None:
    """A rich view on stdout; piped, it is plain text without the cells' trailing padding."""
    con = _console()
    if con.is_terminal:
        con.print(view)
        return
    with con.capture() as cap:
        con.print(view)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in cap.get().splitlines()))


def print_json(data: Any, indent: int | None = 2) -> None:
    sys.stdout.write(json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def parse_data(value: str, option: str = "--data") -> Any:
    """``--data`` as JSON: inline text, ``-`` (stdin) or ``@file``."""
    where = option
    if value == "-":
        text = sys.stdin.read()
        where = f"{option} - (stdin)"
    elif value.startswith("@"):
        fname = value[1:]
        where = f"{option} @{fname}"
        try:
            with open(fname, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise UsageFailure("bad_data", f"{where}: cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise UsageFailure("bad_data", f"{where}: not UTF-8 text") from None
    else:
        text = value
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageFailure("bad_json", f"{where}: invalid JSON: {exc}") from None


_DUR_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)?")
_DUR_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(text: str) -> float:
    """``30s``, ``15m``, ``1h``, ``2d``, ``1h30m``, ``500ms`` or plain seconds -> seconds."""
    s = text.strip().lower()
    pos, total = 0, 0.0
    if not s:
        raise ValueError("empty duration")
    while pos < len(s):
        m = _DUR_PART.match(s, pos)
        if m is None or (m.group(2) is None and (pos != 0 or m.end() != len(s))):
            raise ValueError(f"{text!r} is not a duration (examples: 30s, 15m, 1h, 2d)")
        total += float(m.group(1)) * _DUR_UNITS[m.group(2)]
        pos = m.end()
    if total <= 0:
        raise ValueError("a duration must be positive")
    return total


def duration_param(value: str) -> float:
    """``parse_duration`` for an option: a bad value is a usage error naming the option."""
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


# shell completion from the running daemon (silent when it is not reachable)
def _complete(ctx: Any, method: str, pick: Any, incomplete: str) -> list[str]:
    root = ctx.find_root()
    try:
        path = discover_socket(root.params.get("socket"), root.params.get("config")).path
        with Client(path, timeout=2.0) as c:
            values = pick(c.call(method))
    except Exception:
        return []
    return [v for v in values if isinstance(v, str) and v.startswith(incomplete)]


def complete_pool(ctx: typer.Context, incomplete: str) -> list[str]:
    return _complete(ctx, "pools.list", lambda r: [p["id"] for p in r["pools"]], incomplete)


def complete_connection(ctx: typer.Context, incomplete: str) -> list[str]:
    return _complete(ctx, "connections.list", lambda r: [c["id"] for c in r["items"]], incomplete)


def complete_channel(ctx: typer.Context, incomplete: str) -> list[str]:
    return _complete(
        ctx,
        "channels.list",
        lambda r: [g["group_id"] for g in r["groups"]] + [i["channel"] for i in r["instances"]],
        incomplete,
    )


def complete_rule(ctx: typer.Context, incomplete: str) -> list[str]:
    return _complete(ctx, "rules.list", lambda r: [x["id"] for x in r["rules"]], incomplete)


# ------------------------------------------------------------------------------------------ global options


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"wsctl {wsd.__version__} (control protocol {P.PROTOCOL_VERSION})\n")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    socket: Annotated[
        str | None,
        typer.Option(
            "--socket",
            metavar="PATH",
            help="Control socket of the wsd to talk to (default: discovered, see below).",
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            "-c",
            "--config",
            metavar="FILE",
            help="A wsd config file: its control.socket is used when --socket and $WSD_SOCKET are unset.",
        ),
    ] = None,
    json_: Annotated[
        bool,
        typer.Option("--json", help="Machine-readable output: JSON on stdout, errors as JSON on stderr."),
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the wsctl version and exit."),
    ] = False,
    node: Annotated[
        list[str] | None,
        typer.Option(
            "--node",
            metavar="ID",
            help="With a shared engine: only this node of the cluster (repeatable; ids: wsctl status).",
        ),
    ] = None,
    local: Annotated[
        bool, typer.Option("--local", help="Only the node this socket belongs to, not the whole cluster.")
    ] = False,
) -> None:
    """wsctl: control a running wsd over its control socket."""
    ctx.obj = Opts(socket=socket, config=config, json=json_, node=node or None, local=local)


# ------------------------------------------------------------------------------------------------ views


@app.command()
def status(ctx: typer.Context) -> None:
    """Manager summary: uptime, version, engine, connections by pool and state, rates, latency, RSS, CPU.

    Example:
    $ wsctl status
    """
    emit(ctx, rpc(ctx, "status"), render.render_status)


@app.command()
def pools(ctx: typer.Context) -> None:
    """Each pool: type, path, connections / max, messages in and out, queued, drops, error rate.

    Example:
    $ wsctl pools
    """
    emit(ctx, rpc(ctx, "pools.list"), render.render_pools)




@app.command()
def connections(
    ctx: typer.Context,
    pool: Annotated[
        str | None, typer.Option("--pool", help="Only this pool.", autocompletion=complete_pool)
    ] = None,
    user: Annotated[str | None, typer.Option("--user", help="Only this user id.")] = None,
    company: Annotated[str | None, typer.Option("--company", help="Only this company id.")] = None,
    state: Annotated[
        str | None, typer.Option("--state", help="Only this state: connecting, connected, disconnecting.")
    ] = None,
    filter_: Annotated[
        str | None, typer.Option("--filter", help="Substring of id, pool, user, company, state or address.")
    ] = None,
    sort: Annotated[
        str,
        typer.Option(
            "--sort",
            help=f"{P.one_of(P.SORT_KEYS)}; prefix - for descending (--sort=-out).",
        ),
    ] = "age",
    limit: Annotated[int, typer.Option("--limit", min=0, help="At most this many rows.")] = 100,
) -> None:
    """The connection table (ids are shown as 8-character prefixes; any unique prefix works).

    Examples:
    $ wsctl connections --pool mt5 --sort=-out --limit 20
    $ wsctl connections --user alice --json
    """
    desc = sort.startswith("-")
    key = sort.lstrip("-")
    key = P.SORT_KEYS.get(key, key)  # the word, or the row field itself
    if key not in P.SORT_FIELDS:
        raise UsageFailure("usage", f"--sort: one of {', '.join(P.SORT_KEYS)} (prefix - for descending)")
    if state is not None and state not in P.CONNECTION_STATES:
        raise UsageFailure("usage", f"--state: one of {', '.join(P.CONNECTION_STATES)}")
    res = rpc(
        ctx,
        "connections.list",
        pool=pool,
        user=user,
        company=company,
        state=state,
        filter=filter_,
        sort=("-" if desc else "") + key,
        limit=limit,
    )
    emit(
        ctx, res, lambda r: render.render_connections(r, filtered=any((pool, user, company, state, filter_)))
    )


@app.command()
def connection(
    ctx: typer.Context,
    id: Annotated[
        str,
        typer.Argument(
            metavar="ID", help="Connection id or a unique prefix of it.", autocompletion=complete_connection
        ),
    ],
) -> None:
    """One connection whole: info, auth claims (never the token), subscriptions, queue, breaker, metrics.

    Example:
    $ wsctl connection d272b4ad
    """
    emit(ctx, rpc(ctx, "connections.get", id=id), render.render_connection)


@app.command()
def channels(ctx: typer.Context) -> None:
    """Channel groups and their instances, with subscriber counts and history depth.

    Example:
    $ wsctl channels
    """
    emit(ctx, rpc(ctx, "channels.list"), render.render_channels)


@app.command()
def subscriptions(
    ctx: typer.Context,
    id: Annotated[
        str | None,
        typer.Argument(
            metavar="ID",
            help="Only this connection's subscriptions (its id or a unique prefix).",
            autocompletion=complete_connection,
            show_default=False,
        ),
    ] = None,
    connection: Annotated[
        str | None,
        typer.Option(
            "--connection",
            metavar="ID",
            help="The same as the ID argument.",
            autocompletion=complete_connection,
        ),
    ] = None,
    channel: Annotated[
        str | None,
        typer.Option(
            "--channel",
            metavar="CH",
            help="Only the subscribers of this channel instance.",
            autocompletion=complete_channel,
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=0, help="At most this many rows.")] = 1000,
) -> None:
    """Subscriptions: of one connection, of one channel instance, or all of them.

    Examples:
    $ wsctl subscriptions d272b4ad
    $ wsctl subscriptions --channel trading-signals/acme
    """
    if id and connection and id != connection:
        raise UsageFailure("usage", "name the connection once: ID or --connection ID")
    connection = id or connection
    if connection and channel:
        raise UsageFailure("usage", "--connection and --channel cannot be combined")
    emit(
        ctx,
        rpc(ctx, "subscriptions.list", connection=connection, channel=channel, limit=limit),
        render.render_subscriptions,
    )


@app.command()
def history(
    ctx: typer.Context,
    channel: Annotated[
        str,
        typer.Argument(
            metavar="CHANNEL",
            help="A channel instance, e.g. trading-signals/acme.",
            autocompletion=complete_channel,
        ),
    ],
    limit: Annotated[int, typer.Option("--limit", min=0, help="The last N messages.")] = 20,
) -> None:
    """The history buffer of one channel instance, with its (offset, epoch) position.

    Example:
    $ wsctl history trading-signals/acme --limit 5
    """
    emit(ctx, rpc(ctx, "history.get", channel=channel, limit=limit), render.render_history)


@app.command()
def metrics(
    ctx: typer.Context,
    prometheus: Annotated[
        bool, typer.Option("--prometheus", help="Print the Prometheus exposition text.")
    ] = False,
) -> None:
    """Daemon metrics: manager, pools, routing, subscriptions, queues.

    Examples:
    $ wsctl metrics
    $ wsctl metrics --prometheus | grep wsd_connections
    """
    if prometheus:
        res = rpc(ctx, "metrics.prometheus")
        emit(ctx, res, lambda r: r.get("text", ""))
    else:
        emit(ctx, rpc(ctx, "metrics.get"), render.render_metrics)


# --------------------------------------------------------------------------------------------- actions

DATA_HELP = "The message data as JSON; - reads stdin, @FILE reads a file."


def _delivered(r: dict[str, Any]) -> str:
    n = r.get("delivered")
    if n is None:  # a shared engine (redis) delivers on every node: this node cannot count
        return "handed to the shared engine for every node to deliver"
    return f"delivered to {n} connection{'s' if n != 1 else ''}"


@app.command()
def publish(
    ctx: typer.Context,
    channel: Annotated[
        str,
        typer.Argument(
            metavar="CHANNEL",
            help="A channel instance, e.g. trading-signals/acme.",
            autocompletion=complete_channel,
        ),
    ],
    data: Annotated[str, typer.Option("--data", metavar="JSON", help=DATA_HELP)],
    type_: Annotated[str, typer.Option("--type", help="The message type (msg_type).")] = "message",
    priority: Annotated[
        Priority, typer.Option("--priority", metavar="PRIORITY", help=PRIORITY_HELP)
    ] = Priority.normal,
    ttl: Annotated[
        float | None,
        typer.Option(
            "--ttl",
            metavar="DURATION",
            parser=duration_param,
            help="Drop the message if not delivered within this time (30s, 5m; plain number = seconds).",
        ),
    ] = None,
    trace: Annotated[
        bool, typer.Option("--trace", help="Report what happened at each receiver (counts; --json lists up to 1000).")
    ] = False,
) -> None:
    """Publish into one channel instance (routing rules apply, history keeps it).

    Examples:
    $ wsctl publish trading-signals/acme --type signal --data '{"px": 1.0842}'
    $ echo '{"up": true}' | wsctl publish system-status --data - --ttl 30s
    $ wsctl publish trading-signals/acme --type signal --data '{"px": 1.08}' --trace
    """
    payload = parse_data(data)
    if trace:
        return _publish_traced(ctx, channel, type_, payload, priority.value, ttl)
    res = rpc(ctx, "publish", channel=channel, type=type_, data=payload, priority=priority.value, ttl_s=ttl)
    emit(
        ctx,
        res,
        lambda r: (
            f"published to {r.get('channel')} at offset {r.get('offset')} "
            f"(epoch {r.get('epoch') or '-'}): {_delivered(r)}"
        ),
    )


def _publish_traced(ctx: typer.Context, channel: str, type_: str, payload: Any, priority: str,
                    ttl: float | None) -> None:
    res = rpc(ctx, "publish.trace", channel=channel, type=type_, data=payload, priority=priority, ttl_s=ttl)
    emit(ctx, res, render.render_trace)


@app.command()
def broadcast(
    ctx: typer.Context,
    data: Annotated[str, typer.Option("--data", metavar="JSON", help=DATA_HELP)],
    pool: Annotated[
        list[str] | None,
        typer.Option(
            "--pool", help="Only connections of this pool (repeatable).", autocompletion=complete_pool
        ),
    ] = None,
    company: Annotated[
        list[str] | None, typer.Option("--company", help="Only connections of this company (repeatable).")
    ] = None,
    type_: Annotated[str, typer.Option("--type", help="The message type (msg_type).")] = "broadcast",
    priority: Annotated[
        Priority, typer.Option("--priority", metavar="PRIORITY", help=PRIORITY_HELP)
    ] = Priority.normal,
    ttl: Annotated[
        float | None,
        typer.Option(
            "--ttl",
            metavar="DURATION",
            parser=duration_param,
            help="Drop the message if not delivered within this time.",
        ),
    ] = None,
) -> None:
    """Send to every connection, optionally narrowed to pools and companies.

    Examples:
    $ wsctl broadcast --type system_alert --priority critical --data '{"down": 5}'
    $ wsctl broadcast --pool mt5 --company acme --data @alert.json
    """
    payload = parse_data(data)
    res = rpc(
        ctx,
        "broadcast",
        data=payload,
        type=type_,
        priority=priority.value,
        ttl_s=ttl,
        pools=pool or None,
        companies=company or None,
    )
    emit(ctx, res, lambda r: f"broadcast {_delivered(r)}")


@app.command()
def send(
    ctx: typer.Context,
    connection_id: Annotated[
        str,
        typer.Argument(
            metavar="CONNECTION_ID",
            help="Connection id or unique prefix.",
            autocompletion=complete_connection,
        ),
    ],
    data: Annotated[str, typer.Option("--data", metavar="JSON", help=DATA_HELP)],
    type_: Annotated[str, typer.Option("--type", help="The message type (msg_type).")] = "direct",
    priority: Annotated[
        Priority, typer.Option("--priority", metavar="PRIORITY", help=PRIORITY_HELP)
    ] = Priority.normal,
    ttl: Annotated[
        float | None,
        typer.Option(
            "--ttl",
            metavar="DURATION",
            parser=duration_param,
            help="Drop the message if not delivered within this time.",
        ),
    ] = None,
) -> None:
    """Send a message to one connection (no channel, no history).

    Example:
    $ wsctl send d272b4ad --type notice --ttl 30s --data '{"text": "hello"}'
    """
    payload = parse_data(data)
    res = rpc(
        ctx,
        "send",
        connection_id=connection_id,
        data=payload,
        type=type_,
        priority=priority.value,
        ttl_s=ttl,
    )
    emit(ctx, res, lambda r: f"sent to connection {r.get('connection_id')}")


@app.command()
def kick(
    ctx: typer.Context,
    ids: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="ID", help="Connection ids (or unique prefixes).", autocompletion=complete_connection
        ),
    ] = None,
    user: Annotated[
        list[str] | None, typer.Option("--user", help="Every connection of this user (repeatable).")
    ] = None,
    company: Annotated[
        str | None, typer.Option("--company", help="Every connection of this company.")
    ] = None,
    pool: Annotated[
        str | None,
        typer.Option("--pool", help="Every connection of this pool.", autocompletion=complete_pool),
    ] = None,
    reason: Annotated[str, typer.Option("--reason", help="The close reason the clients see.")] = "kicked",
) -> None:
    """Close connections with code 4000 and a reason; prints how many were closed.

    Name ids, or --user (repeatable: each user named) / --company / --pool (combined, they narrow each other).
    With a shared engine every node of the cluster closes its matching connections.

    Examples:
    $ wsctl kick d272b4ad 9f03c1aa --reason "account suspended"
    $ wsctl kick --user alice --pool mt5
    $ wsctl kick --user alice --user bob
    """
    if ids and (user or company or pool):
        raise UsageFailure("usage", "name connection ids or --user/--company/--pool, not both")
    if not (ids or user or company or pool):
        raise UsageFailure("usage", "name the connections to kick: ID... or --user, --company, --pool")
    if len(reason.encode()) > 123:
        raise UsageFailure(
            "usage", "--reason: at most 123 bytes of UTF-8 (the WebSocket limit for a close reason)"
        )
    res = rpc(ctx, "kick", ids=ids or None, users=user or None, company=company, pool=pool, reason=reason)
    emit(
        ctx,
        res,
        lambda r: (
            f"closed {r.get('closed', 0)} connection{'s' if r.get('closed', 0) != 1 else ''}"
            + (": " + " ".join(render.short_id(i) for i in r.get("ids", [])) if r.get("ids") else "")
        ),
    )


# ------------------------------------------------------------------------------------------------ rules


@rules_app.callback(invoke_without_command=True)
def rules_main(ctx: typer.Context) -> None:
    """The routing rules and their hit counts: list (the default), show, enable, disable.

    Examples:
    $ wsctl rules
    $ wsctl rules show critical-alerts
    $ wsctl rules disable critical-alerts
    """
    if ctx.invoked_subcommand is None:
        emit(ctx, rpc(ctx, "rules.list"), render.render_rules)


@rules_app.command("list")
def rules_list(ctx: typer.Context) -> None:
    """Every rule in evaluation order, with hit counts.

    Example:
    $ wsctl rules list
    """
    emit(ctx, rpc(ctx, "rules.list"), render.render_rules)


@rules_app.command("show")
def rules_show(
    ctx: typer.Context,
    id: Annotated[str, typer.Argument(metavar="ID", help="The rule id.", autocompletion=complete_rule)],
) -> None:
    """One rule: filter, target, transform, hits.

    Example:
    $ wsctl rules show critical-alerts
    """
    emit(ctx, rpc(ctx, "rules.get", id=id), render.render_rule)


def _set_rule(ctx: typer.Context, rule_id: str, enabled: bool) -> None:
    res = rpc(ctx, "rules.set_enabled", id=rule_id, enabled=enabled)
    emit(
        ctx,
        res,
        lambda r: (
            f"rule {r.get('id')} {'enabled' if r.get('enabled') else 'disabled'} "
            "(until the next reload or restart)"
        ),
    )


@rules_app.command("enable")
def rules_enable(
    ctx: typer.Context,
    id: Annotated[str, typer.Argument(metavar="ID", help="The rule id.", autocompletion=complete_rule)],
) -> None:
    """Enable a rule at run time (the config file decides again on reload).

    Example:
    $ wsctl rules enable critical-alerts
    """
    _set_rule(ctx, id, True)


@rules_app.command("disable")
def rules_disable(
    ctx: typer.Context,
    id: Annotated[str, typer.Argument(metavar="ID", help="The rule id.", autocompletion=complete_rule)],
) -> None:
    """Disable a rule at run time (the config file decides again on reload).

    Example:
    $ wsctl rules disable critical-alerts
    """
    _set_rule(ctx, id, False)


@rules_app.command("test")
def rules_test(
    ctx: typer.Context,
    channel: Annotated[
        str,
        typer.Option("--channel", metavar="CHANNEL", help="The channel instance, e.g. trading-signals/acme.",
                     autocompletion=complete_channel),
    ],
    type_: Annotated[str, typer.Option("--type", help="The message type (msg_type).")] = "message",
    priority: Annotated[
        Priority, typer.Option("--priority", metavar="PRIORITY", help=PRIORITY_HELP)
    ] = Priority.normal,
    data: Annotated[str, typer.Option("--data", metavar="JSON", help=DATA_HELP)] = "null",
    user: Annotated[str | None, typer.Option("--user", help="The publisher's user id (default: the channel's).")]
    = None,
    company: Annotated[
        str | None, typer.Option("--company", help="The publisher's company id (default: the channel's).")
    ] = None,
) -> None:
    """Match a message against the live rules without sending it: the walk, receivers per pool, data.

    Examples:
    $ wsctl rules test --channel trading-signals/acme --type trading_signal --data '{"price": 1.08}'
    $ wsctl rules test --channel system-status --type system_alert --priority critical --json
    """
    res = rpc(ctx, "rules.test", channel=channel, type=type_, data=parse_data(data), priority=priority.value,
              user=user, company=company)
    emit(ctx, res, render.render_rules_test)


# ---------------------------------------------------------------------------------------- admin commands


@app.command()
def token(
    ctx: typer.Context,
    user: Annotated[str, typer.Option("--user", help="The sub claim (user id).")],
    company: Annotated[str | None, typer.Option("--company", help="The company_id claim.")] = None,
    role: Annotated[list[str] | None, typer.Option("--role", help="A role (repeatable).")] = None,
    pool: Annotated[
        str | None,
        typer.Option("--pool", help="Restrict the token to this pool.", autocompletion=complete_pool),
    ] = None,
    ttl: Annotated[
        float | None,
        typer.Option(
            "--ttl",
            metavar="DURATION",
            parser=duration_param,
            help="Lifetime: 30s, 15m, 1h, 2d (default: the daemon's, 1h).",
        ),
    ] = None,
) -> None:
    """Mint a JWT signed by the running daemon's key; prints only the token (claims with --json).

    Works with the ephemeral secret of a config-less `wsd serve`; a daemon with only a public key refuses.

    Examples:
    $ TOKEN=$(wsctl token --user alice --company acme --role trader --ttl 15m)
    $ websocat "ws://127.0.0.1:8765/ws/frontend?token=$TOKEN"
    """
    res = rpc(ctx, "token", user=user, company=company, roles=role or None, pool=pool, ttl_s=ttl)
    emit(ctx, res, lambda r: r["token"])


@app.command()
def reload(ctx: typer.Context) -> None:
    """Re-read the config file; an invalid file is refused, every error printed, the old config kept.

    Same as sending SIGHUP to wsd, but you see the outcome.

    Example:
    $ wsctl reload
    """
    res = rpc(ctx, "reload")

    def human(r: dict[str, Any]) -> str:
        pending = r.get("pending_restart") or []
        if pending:
            def v(x: Any) -> str:
                return json.dumps(x) if isinstance(x, str) else str(x)
            return "reloaded; restart required: " + ", ".join(
                f"{p['key']} (running {v(p['running'])}, file {v(p['file'])})" for p in pending)
        return "reloaded: the new config is live"

    emit(ctx, res, human)


@app.command()
def events(
    ctx: typer.Context,
    follow: Annotated[
        bool, typer.Option("-f", "--follow", help="Keep printing events as they happen (Ctrl-C stops).")
    ] = False,
    limit: Annotated[
        int,
        typer.Option(
            "-n", "--limit", min=0, help="Show the last N events first (0 with --follow: only new ones)."
        ),
    ] = 20,
    kind: Annotated[
        list[str] | None,
        typer.Option(
            "--kind",
            help="Only this kind (repeatable): connect, disconnect, kick, refused, rate_limited, "
            "slow_consumer, reload, ...; the full list is in man wsctl.",
        ),
    ] = None,
) -> None:
    """Lifecycle and security events, one line each (one JSON object per line with --json).

    Examples:
    $ wsctl events --follow
    $ wsctl --json events -f --kind refused --kind kick | jq .
    """
    as_json = _opts(ctx).json
    kinds = set(kind or [])
    unknown = sorted(kinds - set(P.EVENT_KINDS))
    if unknown:
        raise UsageFailure(
            "usage", f"--kind {render.plain(unknown[0])}: one of {', '.join(sorted(P.EVENT_KINDS))}"
        )

    def show(ev: dict[str, Any]) -> None:
        if kinds and ev.get("event") not in kinds:
            return
        line = json.dumps(ev, ensure_ascii=False, default=str) if as_json else render.event_line(ev)
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    if not follow:
        res = rpc(ctx, "events.recent", limit=limit if not kinds else max(limit, 10000))
        evs = [e for e in res.get("events", []) if not kinds or e.get("event") in kinds]
        for ev in evs[-limit:] if limit else []:
            show(ev)
        return
    with Client(_opts(ctx).path()) as c:
        for ev in c.stream("events.subscribe", kinds=sorted(kinds) or None, backlog=limit,
                           **scope_params(_opts(ctx))):
            show(ev)
    raise RequestFailed("stream_ended", "wsd closed the event stream (it is stopping)")


@app.command("config")
def config_cmd(ctx: typer.Context) -> None:
    """The running daemon's live config as TOML, secrets redacted (--json: as an object).

    Values set on wsd's command line (--host, --port, --socket) are shown as running; file values
    that wait for a restart are listed as comments at the end.

    Example:
    $ wsctl config > running.toml
    """
    res = rpc(ctx, "config.get")
    if _opts(ctx).json:
        print_json({"path": res.get("path", ""), "config": res.get("config"),
                    "overrides": res.get("overrides", []), "pending_restart": res.get("pending_restart", [])})
    else:
        emit(ctx, res, _config_toml)


def _config_toml(r: dict[str, Any]) -> str:
    """The running config's TOML, then (as TOML comments, so the output stays a valid file) what the
    command line set and what the file changed that waits for a restart."""
    lines = [r.get("toml", "").rstrip("\n")]
    for o in r.get("overrides") or []:
        lines.append(f"# {o['key']} = {json.dumps(o['value'])}: set by {o['flag']} on the command line")
    pending = r.get("pending_restart") or []
    if pending:
        lines.append("# pending a restart (the file says otherwise; the running value is above):")
        lines += [f"#   {p['key']}: running {json.dumps(p['running'])}, file {json.dumps(p['file'])}" for p in pending]
    return "\n".join(lines) + "\n"


MAN_PAGES = {"wsctl": "man1/wsctl.1", "wsd": "man8/wsd.8"}


def man_page_path(page: str) -> str | None:
    """Where a manual page is: ``<prefix>/share/man/`` (installed from a wheel) or the checkout's man/."""
    import os
    import sysconfig

    rel = MAN_PAGES[page]
    candidates = [
        os.path.join(sysconfig.get_path("data"), "share", "man", rel),
        os.path.join(sys.prefix, "share", "man", rel),
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "man", rel.split("/")[1]),
    ]
    return next((c for c in candidates if os.path.isfile(c)), None)


@app.command("man")
def man_cmd(
    ctx: typer.Context,
    page: Annotated[str, typer.Argument(metavar="PAGE", help="wsctl (the default) or wsd.")] = "wsctl",
    path: Annotated[
        bool, typer.Option("--path", help="Print the page's file name instead of showing it.")
    ] = False,
) -> None:
    """Show the manual page of wsctl or wsd, wherever it was installed (also from a source checkout).

    Examples:
    $ wsctl man wsd
    $ man -l "$(wsctl man --path)"
    """
    if page not in MAN_PAGES:
        raise UsageFailure("usage", f"PAGE: one of {', '.join(MAN_PAGES)}")
    where = man_page_path(page)
    if where is None:
        raise RequestFailed("not_found", f"the {page} manual page is not installed with this wsctl")
    if path or _opts(ctx).json:
        emit(ctx, {"page": page, "path": where}, lambda r: r["path"])
        return
    import os
    import shutil

    if shutil.which("man") is None:
        with open(where, encoding="utf-8") as f:
            sys.stdout.write(f.read())
        return
    os.execvp("man", ["man", "-l", where])


def top(
    ctx: typer.Context,
    refresh: Annotated[
        float, typer.Option("--refresh", min=0.1, metavar="SECONDS", help="Seconds between updates.")
    ] = 1.0,
) -> None:
    """The live dashboard (Textual): connections, rates, pools, channels, events. q quits.

    Example:
    $ wsctl top --refresh 0.5
    """
    if _opts(ctx).json:
        raise UsageFailure("usage", "top is interactive and has no --json output; use wsctl --json status")
    path = _opts(ctx).path()
    with Client(path) as c:
        c.call("hello")  # exit 3 with the usual message before starting a full-screen app
    if hasattr(signal, "SIGPIPE"):
        # The dashboard outlives the daemon: a write to its dead control socket must be an error the
        # dashboard handles ("cannot reach wsd ... retrying"), not a signal that kills it mid-screen.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        from wsctl.tui import app as tui_app  # lazy: importing wsctl.cli never imports textual
    except ImportError as exc:
        raise RequestFailed("unavailable", f"the dashboard cannot start: {exc}") from None
    tui_app.run(path, refresh, scope_params(_opts(ctx)))


app.command("top")(top)
app.command("monitor", help="Alias of top: the live dashboard.\n\nExample:\n$ wsctl monitor --refresh 2")(top)


# ------------------------------------------------------------------------------------- the error boundary

_GLOBAL_FLAGS = ("--json", "--local")
_GLOBAL_VALUED = ("--socket", "-c", "--config", "--node")


def hoist_globals(args: list[str]) -> list[str]:
    """Move global options given after the command (``wsctl status --json``) to the front."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    seen_command = False
    while i < len(args):
        a = args[i]
        if a == "--":
            rest.extend(args[i:])
            break
        if not seen_command:
            if a in _GLOBAL_VALUED and i + 1 < len(args):
                front += [a, args[i + 1]]
                i += 2
                continue
            if not a.startswith("-"):
                seen_command = True
            front.append(a) if not seen_command else rest.append(a)
            i += 1
            continue
        if a in _GLOBAL_FLAGS:
            front.append(a)
        elif a in _GLOBAL_VALUED and i + 1 < len(args):
            front += [a, args[i + 1]]
            i += 1
        elif a.startswith(("--socket=", "--config=", "--node=")):
            front.append(a)
        else:
            rest.append(a)
        i += 1
    return front + rest


def _fail(err: WsctlError | P.ControlFailure, as_json: bool) -> NoReturn:
    exit_code = err.exit_code if isinstance(err, WsctlError) else 1  # the daemon refused or misbehaved
    if as_json:
        sys.stderr.write(json.dumps({"error": {**err.as_dict(), "exit_code": exit_code}}, ensure_ascii=False) + "\n")
    else:
        prefix = "wsctl: " if err.code == "unreachable" else "wsctl: error: "
        sys.stderr.write(prefix + render.plain(err.message) + "\n")  # may quote what a client sent
        for line in err.details:
            sys.stderr.write(f"  {render.plain(line)}\n")
    sys.stderr.flush()
    raise SystemExit(exit_code)


def main(argv: list[str] | None = None) -> None:
    """Run wsctl: parse, call, print; every failure becomes one stderr line and a fixed exit code."""
    if hasattr(signal, "SIGPIPE"):
        # `wsctl events -f | head` ends quietly; `top` sets it back to ignored (it writes to sockets)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = hoist_globals(list(sys.argv[1:] if argv is None else argv))
    head = args[: args.index("--")] if "--" in args else args
    as_json = "--json" in head
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=args, prog_name=PROG, standalone_mode=False)
    except (WsctlError, P.ControlFailure) as err:
        _fail(err, as_json)
    except click_exc.NoArgsIsHelpError as exc:
        if as_json:
            _fail(UsageFailure("usage", exc.format_message()), True)
        exc.show()
        raise SystemExit(2) from None
    except click_exc.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else PROG
        worded = bad_value(exc) if isinstance(exc, click_exc.BadParameter) else None
        msg = worded or exc.format_message().rstrip(".")
        _fail(UsageFailure("usage", f"{msg} (see '{where} --help')"), as_json)
    except click_exc.ClickException as exc:
        _fail(WsctlError("error", exc.format_message()), as_json)
    except typer.Abort:
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    raise SystemExit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
