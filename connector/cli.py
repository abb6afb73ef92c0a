"""The ``pop3-connector`` command: argument parsing, logging setup, exit codes.

docs/design.md §4.2.

Exit codes follow sysexits.h where one fits: 0 success, 1 a cycle or connection failed,
70 (EX_SOFTWARE) an unexpected error, 74 (EX_IOERR) the state directory cannot be used at start
(its file system full or read-only, the ledger locked by another process past the busy timeout,
damaged), 75 (EX_TEMPFAIL) another instance holds the state directory, 78 (EX_CONFIG) the
configuration is invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from connector import __version__, runloop
from connector.errors import (
    AlreadyRunningError,
    ConfigError,
    DeadLetterError,
    LedgerError,
    StateError,
    UsageError,
    printable,
)

if TYPE_CHECKING:
    from connector.config import Settings
    from connector.runtime import Runtime
    from connector.sdnotify import SystemdNotifier
    from connector.service import Service
    from connector.shard import Shard

EX_OK = 0
EX_FAILED = 1
EX_SOFTWARE = 70
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_CONFIG = 78
DEFAULT_CONFIG = Path("/etc/pop3-connector/config.toml")
# X-POP3-Connector-Stage (docs/design.md §7.1).
DEAD_LETTER_STAGES = ("mail", "rcpt", "data", "size", "expired", "error")

log = logging.getLogger("connector")


class TextFormatter(logging.Formatter):
    """One line per record (``log_format = "text"``), control characters escaped.

    Server text is escaped where it enters (``errors.printable``); this is the net under it, for
    a library's message or one we missed: a log line can never move the cursor of the terminal
    that shows it, or forge a line of its own.  A traceback keeps its line breaks.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (``log_format = "json"``).

    JSON escapes C0 controls itself but not DEL or the C1 controls; the message is escaped as
    the text format's is.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": printable(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Logs go to standard error (journald and containers collect them there)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    # Neither format shows a record's source line, thread or process, and a busy cycle logs a
    # line per message: skip collecting them (the logging HOWTO's "Optimization" section).
    # findCaller alone walked the stack for every line (~10 % of the cost of a log line).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries stay quiet unless we are debugging; our transcripts say what matters.
    for noisy in ("aiosmtplib", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    # aioimaplib stays quiet even then: its DEBUG lines show the LOGIN command with the password
    # in IMAP's quoted form (it masks only the unquoted one, so a password with a quote or a
    # backslash is readable) and every line received, the text of each dead letter included.
    # Our IMAP store's errors say what failed.
    logging.getLogger("aioimaplib").setLevel(logging.WARNING)


def config_path(args: argparse.Namespace) -> Path:
    """``--config``, else ``$POP3_CONNECTOR_CONFIG``, else /etc/pop3-connector/config.toml."""
    if args.config:
        return Path(args.config)
    env = os.environ.get("POP3_CONNECTOR_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def _age(text: str) -> float:
    """``--older-than``: a duration as in the config (docs/design.md §4.1)."""
    from connector.config import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _since(text: str) -> datetime:
    """``--since``: an age (``7d``, ``12h``: failed that long ago or less) or a date or time in
    UTC (``2026-11-27``, ``2026-11-27T15:00``), as ``dead-letters list`` shows them."""
    from connector.config import parse_duration

    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    except (ValueError, OverflowError):
        pass
    try:
        when = datetime.fromisoformat(text.strip().replace(" ", "T", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(
            'expected an age like "7d" or "12h", or a UTC date like 2026-11-27 or 2026-11-27T15:00'
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _recipient(text: str) -> str:
    """``requeue --to``: an address as the config takes one for ``deliver_to``, checked before
    anything is sent (a bad one would fail at RCPT and read as a fault of the SMTP setup)."""
    from connector.addresses import is_plain_address

    if not is_plain_address(text):
        raise argparse.ArgumentTypeError(
            f'"{printable(text[:80])}" is not a mail address (expected user@domain, ASCII, no <>)'
        )
    return text


_SHARD_HELP = (
    "the accounts of shard K of N (0 <= K < N; docs/design.md §14.2): K/N, or "
    "auto/N with K from the trailing -K of $POD_NAME, else the host name"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pop3-connector",
        description="Fetch mail from POP3 mailboxes (or IMAP folders) and deliver it to "
        "Exchange over SMTP.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $POP3_CONNECTOR_CONFIG, else /etc/pop3-connector/config.toml)",
    )
    parser.add_argument("--shard", metavar="K/N", help=_SHARD_HELP)
    # The same option after the command (`run --shard auto/3`, as deploy/kubernetes runs it);
    # SUPPRESS: not given there, it leaves the global one's value alone.
    sharded = argparse.ArgumentParser(add_help=False)
    sharded.add_argument("--shard", metavar="K/N", default=argparse.SUPPRESS, help=_SHARD_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "run", parents=[sharded], help="run the service: poll every enabled account on its interval"
    )
    once = sub.add_parser(
        "once", parents=[sharded], help="one cycle of each (or the named) account, then exit"
    )
    once.add_argument("--account", action="append", metavar="NAME", help="only this account")
    check = sub.add_parser(
        "check", parents=[sharded], help="validate the config and print it, secrets masked"
    )
    check.add_argument(
        "--connect",
        action="store_true",
        help="also log in to each POP3 or IMAP account (disabled ones too) and to SMTP, and test "
        "MAIL FROM and RCPT TO each fixed recipient (nothing is sent)",
    )
    rc = sub.add_parser(
        "import-fetchmailrc", help="print a config translated from a .fetchmailrc (stdout)"
    )
    rc.add_argument("file", metavar="FILE", help="the .fetchmailrc to translate")
    status = sub.add_parser(
        "status",
        parents=[sharded],
        help="a table per account: last cycle, result, upstream, deferred, dead letters",
    )
    status.add_argument("--json", action="store_true", help="the /status JSON document instead")
    ledger = sub.add_parser(
        "ledger", help="move accounts' ledger rows to another replica or machine (resharding)"
    )
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")
    export = ledger_sub.add_parser(
        "export",
        parents=[sharded],
        help="write the named accounts' ledger rows to standard output (JSON); works beside a "
        "running service",
    )
    export.add_argument(
        "--account", action="append", required=True, metavar="NAME", help="repeatable"
    )
    imp = ledger_sub.add_parser(
        "import",
        parents=[sharded],
        help="write the rows of an export file into this ledger; refuses while the service runs",
    )
    imp.add_argument("file", metavar="FILE", help='the export file ("-": standard input)')
    imp.add_argument(
        "--replace",
        action="store_true",
        help="replace the rows an account has here already (left from an earlier resharding)",
    )
    dl = sub.add_parser("dead-letters", help="inspect, re-deliver and clean the dead letters")
    dl_sub = dl.add_subparsers(dest="dl_command", required=True, metavar="ACTION")
    dl_list = dl_sub.add_parser("list", help="every dead letter, oldest first")
    dl_list.add_argument("--json", action="store_true", help="as JSON")
    dl_show = dl_sub.add_parser("show", help="print a dead letter as stored")
    dl_show.add_argument("id", metavar="ID")
    dl_show.add_argument(
        "--eml",
        metavar="FILE",
        type=Path,
        help="write it to FILE instead (a .eml file that Outlook and other mail clients open)",
    )
    requeue = dl_sub.add_parser(
        "requeue",
        help="deliver a dead letter (or a selection) again, without our headers, once the cause "
        "is fixed",
    )
    # _main checks the choice between an ID and a selection, with this usage line.
    requeue.set_defaults(requeue_parser=requeue)
    requeue.add_argument("id", metavar="ID", nargs="?", help="the one dead letter to requeue")
    requeue.add_argument(
        "--account", action="append", metavar="NAME", help="those of this account (repeatable)"
    )
    requeue.add_argument(
        "--stage",
        action="append",
        choices=DEAD_LETTER_STAGES,
        metavar="STAGE",
        help=f"those refused at this stage: {', '.join(DEAD_LETTER_STAGES)} (repeatable)",
    )
    requeue.add_argument(
        "--since",
        type=_since,
        metavar="AGE|DATE",
        help='those that failed within AGE ("7d") or since DATE (UTC, "2026-11-27T15:00")',
    )
    requeue.add_argument(
        "--all", action="store_true", help="every dead letter (the other options narrow it down)"
    )
    requeue.add_argument(
        "--dry-run", action="store_true", help="list what would be sent; send nothing"
    )
    requeue.add_argument(
        "--to",
        action="append",
        type=_recipient,
        metavar="ADDR",
        help="deliver to ADDR instead of the account's deliver_to (repeatable)",
    )
    purge = dl_sub.add_parser("purge", help="remove the dead letters older than AGE")
    purge.add_argument(
        "--older-than",
        required=True,
        type=_age,
        metavar="AGE",
        help='a duration: "30d", "12h", or seconds',
    )
    demo = sub.add_parser("demo", help="run the connector against built-in loopback servers")
    demo.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where to keep the demo's state (default: a new temp dir)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # `pop3-connector demo | head`: the reader is gone, which is no error of ours.  Point
        # stdout at /dev/null so that the interpreter's final flush cannot fail again (the
        # recipe of the Python docs, "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EX_FAILED


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "dead-letters" and args.dl_command == "requeue":
        selecting = args.all or args.account or args.stage or args.since is not None
        usage: argparse.ArgumentParser = args.requeue_parser
        if args.id is not None and selecting:
            usage.error("give either an ID or --account/--stage/--since/--all, not both")
        if args.id is None and not selecting:
            usage.error("give an ID, or select with --account/--stage/--since/--all")
    if args.command == "import-fetchmailrc":
        from connector.fetchmailrc import main as import_fetchmailrc

        return import_fetchmailrc(Path(args.file))
    if args.command == "demo":
        from connector.demo import run_demo

        setup_logging("warning")
        state_dir = Path(args.state_dir) if args.state_dir else None
        if state_dir is not None and _in_use(state_dir):
            # The demo writes its own ledger and dead letters there: never into a real state
            # directory (it would mix its dead letters with real ones and overwrite rows).
            parser.error(
                f"demo: --state-dir {printable(str(state_dir))} exists and is not an empty "
                "directory; name a new or empty one (or leave it out: a new temporary one)"
            )
        return runloop.run(run_demo(state_dir))
    setup_logging()  # until the config says otherwise: errors while loading still get logged
    try:
        return _dispatch(args)
    except UsageError as exc:
        # An option's value (--shard, once --account), not the config file: the line names it.
        for problem in exc.problems:
            print(f"pop3-connector: {problem}", file=sys.stderr)
        return EX_CONFIG
    except ConfigError as exc:
        # A problem with a POP3_CONNECTOR_* variable starts with its name: not the file's.
        from_env = [p.startswith("POP3_CONNECTOR_") for p in exc.problems]
        source = str(config_path(args))
        if from_env and all(from_env):
            source = "the environment (POP3_CONNECTOR_* variables)"
        elif any(from_env):
            source += " and the environment"
        print(f"pop3-connector: invalid configuration in {source}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EX_CONFIG
    except AlreadyRunningError as exc:
        print(f"pop3-connector: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except StateError as exc:
        # `run` or `once` could not open its state: not a bug, so no traceback; the line
        # names the file and what to check (the same line a cycle logs when it fails so).
        print(f"pop3-connector: {exc}", file=sys.stderr)
        return EX_IOERR
    except KeyboardInterrupt:
        return EX_FAILED
    except BrokenPipeError:
        raise  # main() handles it: not a bug
    except Exception:
        # Disposition.BUG: not a failure we know.  Say so loudly, with the traceback.
        log.exception("pop3-connector stopped on an unexpected error")
        return EX_SOFTWARE


def _in_use(path: Path) -> bool:
    """Whether ``path`` exists and is anything but an empty directory."""
    try:
        return any(path.iterdir())
    except FileNotFoundError:
        return False
    except OSError:  # not a directory, or unreadable
        return True


def _dispatch(args: argparse.Namespace) -> int:
    from connector.config import config_warnings, load_settings, render_settings
    from connector.runtime import build_runtime, owned_by
    from connector.shard import ALL, parse_shard

    path = config_path(args)
    settings = load_settings(path)
    # --shard: this process's accounts (docs/design.md §14.2); fixed for the process's life,
    # reloads included.  A bad value is a configuration error (78), as a bad config is.
    shard = parse_shard(args.shard) if getattr(args, "shard", None) else ALL
    runtime = owned_by(build_runtime(settings), shard)
    setup_logging(settings.service.log_level, settings.service.log_format)
    match args.command:
        case "check":
            print(render_settings(settings))
            for warning in config_warnings(settings, path):
                print(f"warning: {warning}", file=sys.stderr)
            # The disabled accounts too: a cut-over is tested before it happens.
            everything = owned_by(build_runtime(settings, include_disabled=True), shard)
            if args.shard:
                print(_shard_listing(everything))
            if args.connect:
                from connector.check import check_connections

                return runloop.run(check_connections(everything))
            return EX_OK
        case "once":
            return runloop.run(_once(runtime, args.account))
        case "run":
            options = RunOptions.of(settings, path)
            # The settings of thousands of accounts are tens of MiB of pydantic models, and
            # `run` needs none of them once the runtime is built: let them go.
            del settings
            return runloop.run(_run(runtime, options, path))
        case "status" | "dead-letters" | "ledger":
            try:
                if args.command == "status":
                    from connector.admin import status_command

                    return runloop.run(status_command(runtime, as_json=args.json, out=sys.stdout))
                if args.command == "ledger":
                    return _ledger(args, runtime)
                return _dead_letters(args, runtime)
            except (DeadLetterError, LedgerError) as exc:
                # The store or the ledger failed (permissions, disk): say so, no traceback.
                print(f"pop3-connector: {exc}", file=sys.stderr)
                return EX_FAILED
        case _:
            raise AssertionError(args.command)


def _shard_listing(runtime: Runtime) -> str:
    """``check --shard``: which shard this is and the accounts it owns, as TOML comments (the
    output stays a config that loads)."""
    from connector.admin import shard_line

    owned = [s.name for s in runtime.accounts] + [f"{s.name} (disabled)" for s in runtime.disabled]
    lines = [f"# {shard_line(runtime)}:"] + [f"#   {name}" for name in owned]
    return "\n".join(lines) + "\n"


def _ledger(args: argparse.Namespace, runtime: Runtime) -> int:
    from connector import admin

    match args.ledger_command:
        case "export":
            return runloop.run(
                admin.ledger_export(runtime, args.account, out=sys.stdout, err=sys.stderr)
            )
        case "import":
            source = sys.stdin.buffer if args.file == "-" else Path(args.file)
            return runloop.run(
                admin.ledger_import(
                    runtime, source, replace=args.replace, out=sys.stdout, err=sys.stderr
                )
            )
        case _:
            raise AssertionError(args.ledger_command)


def _dead_letters(args: argparse.Namespace, runtime: Runtime) -> int:
    from connector import admin

    match args.dl_command:
        case "list":
            return runloop.run(admin.dead_letters_list(runtime, as_json=args.json, out=sys.stdout))
        case "show":
            sys.stdout.flush()
            return runloop.run(
                admin.dead_letters_show(
                    runtime,
                    args.id,
                    out=sys.stdout.buffer,
                    err=sys.stderr,
                    eml=args.eml,
                    terminal=sys.stdout.isatty(),
                )
            )
        case "requeue":
            return runloop.run(
                admin.dead_letters_requeue(
                    runtime,
                    args.id,
                    to=args.to,
                    out=sys.stdout,
                    err=sys.stderr,
                    selection=admin.Selection(
                        accounts=tuple(args.account or ()),
                        stages=tuple(args.stage or ()),
                        since=args.since,
                    ),
                    dry_run=args.dry_run,
                )
            )
        case "purge":
            return runloop.run(admin.dead_letters_purge(runtime, args.older_than, out=sys.stdout))
        case _:
            raise AssertionError(args.dl_command)


async def _once(runtime: Runtime, names: list[str] | None) -> int:
    from connector.service import open_service

    known = {spec.name for spec in runtime.accounts}
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        elsewhere = set(runtime.elsewhere)
        raise UsageError(
            [
                f"--account {printable(n)}: not this shard's ({runtime.shard}); another replica "
                "polls it"
                if n in elsewhere
                else f"--account {printable(n)}: no enabled account of that name"
                for n in unknown
            ]
        )
    async with open_service(runtime) as service:
        service.install_signal_handlers()
        results = await service.run_once(names)
    for r in results:
        s = r.stats
        status = "ok" if r.ok else f"FAILED: {r.error}"
        removed = f", removed {s.removed}" if s.removed else ""  # leave_on_server only
        print(
            f"{r.account}: {status}; delivered {s.delivered}, dead-lettered {s.dead_lettered}, "
            f"deferred {s.deferred}, skipped {s.skipped}{removed} ({r.duration:.2f} s)"
        )
    return EX_OK if all(r.ok for r in results) else EX_FAILED


@dataclass(frozen=True, slots=True)
class RunOptions:
    """What ``run`` reads from the settings besides the runtime (which reloads replace)."""

    listen: str
    address: tuple[str, int] | None
    allowed_hosts: tuple[str, ...]
    per_account: bool
    warnings: tuple[str, ...]

    @classmethod
    def of(cls, settings: Settings, path: Path) -> RunOptions:
        from connector.config import poll_interval_warnings, scale_warnings

        m = settings.metrics
        warnings = (*poll_interval_warnings(settings, path), *scale_warnings(settings))
        return cls(m.listen, m.address, tuple(m.allowed_hosts), m.per_account, warnings)


def _load(path: Path, shard: Shard) -> tuple[Settings, Runtime]:
    from connector.config import load_settings
    from connector.runtime import build_runtime, owned_by

    settings = load_settings(path)
    return settings, owned_by(build_runtime(settings), shard)


async def _run(runtime: Runtime, options: RunOptions, path: Path) -> int:
    from connector.http import HttpEndpoint
    from connector.metrics import Metrics
    from connector.sdnotify import SystemdNotifier
    from connector.service import open_service

    reloading: asyncio.Task[None] | None = None
    again = False  # another SIGHUP came while a reload ran: read the file once more after it

    async def reload_config() -> None:
        """A bad file keeps the old config, and says why, one problem per line."""
        log.info("received SIGHUP: reloading %s", path)
        try:
            # In a thread: reading and building thousands of accounts (and their TLS contexts)
            # takes long enough to hold up the cycles, the HTTP endpoint and the watchdog
            # pings (docs/design.md §11.5).  Only apply_runtime runs on the loop.
            new_settings, new_runtime = await asyncio.to_thread(_load, path, runtime.shard)
        except ConfigError as exc:
            log.error("reload failed; keeping the old configuration. %s is invalid:", path)
            for problem in exc.problems:
                log.error("  %s", problem)
            return
        setup_logging(new_settings.service.log_level, new_settings.service.log_format)
        if new_settings.metrics.listen != options.listen:
            log.warning("reload: metrics.listen changes take effect at the next restart")
        if new_settings.metrics.per_account != options.per_account:
            log.warning("reload: metrics.per_account changes take effect at the next restart")
        del new_settings
        service.apply_runtime(new_runtime)

    async def reloads() -> None:
        nonlocal again
        while True:
            again = False
            try:
                await reload_config()
            except Exception:  # as the signal handler would: logged, the old config kept
                log.exception("reload failed; keeping the old configuration")
            if not again:
                return

    def reload() -> None:
        """SIGHUP: one reload at a time; signals during one ask for one more after it."""
        nonlocal reloading, again
        if reloading is not None and not reloading.done():
            again = True
            return
        reloading = asyncio.create_task(reloads(), name="reload")

    systemd = SystemdNotifier.from_environment()
    metrics = Metrics(per_account=options.per_account)
    async with open_service(runtime, metrics=metrics) as service:
        endpoint: HttpEndpoint | None = None
        helpers: list[asyncio.Task[None]] = []
        address = options.address
        if address is not None:
            endpoint = HttpEndpoint(service, allowed_hosts=options.allowed_hosts)
            # Beside the scheduler, not before it: a port someone else holds must not stop
            # the mail (docs/design.md §11.2); the endpoint says so loudly and keeps trying.
            helpers.append(asyncio.create_task(endpoint.start_retrying(*address), name="http"))
        try:
            service.install_signal_handlers(reload=reload)
            await service.refresh_backlog()
            log.info(
                "pop3-connector %s running: %d account(s), state in %s",
                __version__,
                len(runtime.accounts),
                runtime.state_dir,
            )
            if runtime.shard.count > 1:
                # Which accounts this replica owns (docs/design.md §14.2); the names at debug.
                log.info(
                    "shard %s: polling %d of the %d enabled accounts (the others are other "
                    "replicas')",
                    runtime.shard,
                    len(runtime.accounts),
                    len(runtime.accounts) + len(runtime.elsewhere),
                )
                log.debug("shard %s: %s", runtime.shard, ", ".join(runtime.intervals))
            for warning in options.warnings:
                log.warning("%s", warning)
            # systemd (Type=notify, WatchdogSec=): ready now; pings from this loop while the
            # scheduler lives, so that a frozen loop gets the process restarted.
            helpers.append(asyncio.create_task(systemd.keep_alive(service.healthy), name="wd"))
            helpers.append(asyncio.create_task(_tell_stopping(service, systemd), name="stop"))
            systemd.notify("READY=1", f"STATUS=polling {len(runtime.accounts)} account(s)")
            await service.serve()
        finally:
            systemd.notify("STOPPING=1")
            if reloading is not None:
                helpers.append(reloading)
            for helper in helpers:
                helper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await helper
            if endpoint is not None:
                await endpoint.close()
    log.info("stopped")
    return EX_OK


async def _tell_stopping(service: Service, systemd: SystemdNotifier) -> None:
    """STOPPING=1 as soon as a stop begins (the messages in flight may take shutdown_grace)."""
    await service.stopping.wait()
    systemd.notify("STOPPING=1", "STATUS=finishing the messages in flight")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
