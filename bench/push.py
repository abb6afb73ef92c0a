"""The push scenario (issue 16): how soon mail that arrives in an IMAP mailbox is in Exchange.

Each client waits on one IMAP mailbox of the private Dovecot with IDLE (RFC 2177):

* pop3-connector: ``python -m connector run``, one account with ``protocol = "imap"`` (push is
  the default), ``poll_interval = "15m"`` (so nothing but the push can be fast);
* fetchmail: ``--nodetach --daemon 900`` with ``idle`` in its rc file (its IDLE mode), SMTP to
  the receiver as in the other scenarios;
* getmail6: ``getmail --idle INBOX``, forwarding over LMTP to the receiver (its ``MDA_lmtp``:
  getmail has no SMTP destination; the receiver answers LHLO like EHLO).

After a warm-up message (the client has logged in, fetched it and gone back to IDLE), messages
are delivered into the mailbox one at a time at random instants (gaps drawn uniformly from
``GAP`` seconds, seeded, the same for every client) with ``doveadm save``.  A message's latency is
the time from the moment ``doveadm save`` returned (the message is in Dovecot's mailbox and
index) to the receiver's ``250`` for its Message-ID (``bench/receiver.py`` records the time of
the first ``250`` per Message-ID; one machine, one clock).  p50 / p99 / max over the messages.
Part of every figure is Dovecot's: it tells an IDLE client about a new message only when its
mailbox watcher fires (inotify, then a short delay of its own), the same for every client.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from bench import corpus, runners
from bench.corpus import RECIPIENT

if TYPE_CHECKING:
    from bench.main import Bench, Row

PUSH: Final = "push"
CONNECTOR: Final = "pop3-connector"
FETCHMAIL: Final = "fetchmail"
GETMAIL: Final = "getmail6"
CLIENTS: Final = (CONNECTOR, FETCHMAIL, GETMAIL)
GAP: Final = (0.1, 1.0)  # seconds between two deliveries, uniform
SETTLE: Final = 2.0  # seconds after the warm-up message, for the client to be back in IDLE
WAIT_AFTER: Final = 60.0  # seconds the last message may take before the run counts as failed
GOAL_P99: Final = 1.0


@dataclass(frozen=True, slots=True)
class Latencies:
    """One client's latencies, in seconds, and what did not arrive."""

    values: tuple[float, ...]
    missing: int
    duplicates: int

    def quantile(self, q: float) -> float:
        if not self.values:
            return float("nan")
        ordered = sorted(self.values)
        # The nearest-rank quantile: p99 of 200 values is the 198th, never interpolated.
        return ordered[max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.999999) - 1))]

    @property
    def p50(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")


def _message(runner: str, i: int) -> tuple[str, bytes]:
    mid = f"<push-{runner}-{i}@bench.example>"
    raw = (
        f"Return-Path: <sender@customer.example>\r\nFrom: sender@customer.example\r\n"
        f"To: {RECIPIENT}\r\nSubject: push {i}\r\nMessage-ID: {mid}\r\n\r\n"
        f"Message {i} for {runner}.\r\n"
    ).encode()
    return mid, raw


def connector_config(workdir: Path, imap_port: int, smtp_port: int, user: str) -> Path:
    text = f"""[service]
state_dir = "{workdir / "state"}"
poll_interval = "15m"
log_level = "info"

[metrics]
listen = ""

[smtp]
host = "127.0.0.1"
port = {smtp_port}
tls = "none"
helo_name = "connector.bench.example"

[[accounts]]
name = "push"
protocol = "imap"
host = "127.0.0.1"
port = {imap_port}
tls = "none"
username = "{user}"
password = "{runners.PASSWORD}"
deliver_to = ["{RECIPIENT}"]
"""
    (workdir / "state").mkdir(parents=True, exist_ok=True)
    path = workdir / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def fetchmail_config(workdir: Path, imap_port: int, smtp_port: int, user: str) -> Path:
    """Its IDLE mode: ``idle`` on an IMAP poll entry, in daemon mode (bench-facts.md's
    settings for the receiver; ``sslproto ""`` keeps plain IMAP on loopback)."""
    text = (
        'set postmaster ""\nset no bouncemail\nset no syslog\n'
        f"poll 127.0.0.1 with proto IMAP service {imap_port}\n"
        f'  user "{user}" there with password "{runners.PASSWORD}" is "bench" here options '
        f'nokeep fetchall idle sslproto "" smtphost "127.0.0.1/{smtp_port}" '
        f'smtpname "{RECIPIENT}"\n'
    )
    path = workdir / "fetchmailrc"
    path.write_text(text)
    path.chmod(0o600)
    return path


def getmail_config(workdir: Path, imap_port: int, smtp_port: int, user: str) -> Path:
    text = f"""[retriever]
type = SimpleIMAPRetriever
server = 127.0.0.1
port = {imap_port}
username = {user}
password = {runners.PASSWORD}
mailboxes = ("INBOX",)

[destination]
type = MDA_lmtp
host = 127.0.0.1
port = {smtp_port}
override = {RECIPIENT}

[options]
delete = true
read_all = true
verbose = 0
"""
    path = workdir / "getmailrc"
    path.write_text(text)
    path.chmod(0o600)
    return path


def client_argv(runner: str, workdir: Path, imap_port: int, smtp_port: int, user: str) -> list[str]:
    if runner == CONNECTOR:
        cfg = connector_config(workdir, imap_port, smtp_port, user)
        return [sys.executable, "-m", "connector", "--config", str(cfg), "run"]
    if runner == FETCHMAIL:
        rc = fetchmail_config(workdir, imap_port, smtp_port, user)
        return [
            "fetchmail",
            "--fetchmailrc",
            str(rc),
            "--nodetach",
            "--daemon",
            "900",
            "--idfile",
            str(workdir / "fetchids"),
            "--pidfile",
            str(workdir / "fetchmail.pid"),
        ]
    if runner == GETMAIL:
        rc = getmail_config(workdir, imap_port, smtp_port, user)
        return [
            "getmail",
            "--getmaildir",
            str(workdir),
            "--rcfile",
            str(rc),
            "--idle",
            "INBOX",
        ]
    raise ValueError(runner)


def _wait_accepted(b: Bench, mids: Sequence[str], seconds: float) -> dict[str, float]:
    """The receiver's first-250 times of ``mids``, once all are in or ``seconds`` passed."""
    deadline = time.monotonic() + seconds
    while True:
        at: dict[str, float] = b.receiver.stats()["accepted_at"]
        if all(m in at for m in mids) or time.monotonic() > deadline:
            return {m: at[m] for m in mids if m in at}
        time.sleep(0.05)


def measure(b: Bench, runner: str, messages: int, seed: int) -> tuple[Latencies, Path]:
    """One client's run: warm-up, ``messages`` at random instants, stop; its latencies."""
    (user,) = b.users(1)
    corpus.reset_mailbox(b.mail_root, user)
    workdir = b.rundir(f"push-{runner}")
    env = {**os.environ, "HOME": str(workdir), "FETCHMAILHOME": str(workdir)}
    argv = client_argv(runner, workdir, b.dovecot.ports["imap"], b.receiver.port, user)
    b.receiver.reset()
    log = workdir / "client.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: S603 - argv is built above
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=runners.REPO,
        )
    try:
        warm, raw = _message(runner, -1)
        b.dovecot.deliver(user, raw)
        if not _wait_accepted(b, [warm], WAIT_AFTER):
            raise RuntimeError(f"{runner}: the warm-up message never arrived; {runners.tail(log)}")
        time.sleep(SETTLE)  # back in IDLE after the warm-up's fetch (not a measured wait)
        rng = random.Random(seed)
        delivered: dict[str, float] = {}
        for i in range(messages):
            time.sleep(rng.uniform(*GAP))
            mid, raw = _message(runner, i)
            b.dovecot.deliver(user, raw)
            delivered[mid] = time.time()
        accepted = _wait_accepted(b, list(delivered), WAIT_AFTER)
        counts = b.receiver.stats()["accepted"]
    finally:
        with_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with_group(proc.pid, signal.SIGKILL)
            proc.wait()
    latencies = tuple(accepted[m] - t for m, t in delivered.items() if m in accepted)
    duplicates = sum(1 for m in delivered if counts.get(m, 0) > 1)
    return Latencies(latencies, len(delivered) - len(accepted), duplicates), log


def with_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def push(b: Bench, messages: int, seed: int = 16) -> None:
    """The scenario: every client in turn on a fresh mailbox, the same instants for each."""
    print(
        f"== push: {messages} messages at random instants ({GAP[0]:g}-{GAP[1]:g} s apart) into "
        "an IMAP mailbox while each client waits in IDLE",
        flush=True,
    )
    from bench.main import Row

    for runner in CLIENTS:
        if runner == GETMAIL and shutil.which("getmail") is None:
            print("   getmail6 is not installed (bench/run installs it); skipped", flush=True)
            continue
        for rep in range(1, b.reps + 1):
            try:
                lat, log = measure(b, runner, messages, seed + rep)
            except RuntimeError as exc:
                print(f"  ! {exc}", file=sys.stderr)
                b.rows.append(
                    Row(PUSH, runner, rep, 0, 0, 0.0, 0.0, 0.0, 0.0, f"FAIL {exc}"[:200], None, -1)
                )
                continue
            check = "ok"
            if lat.missing or lat.duplicates:
                check = f"FAIL missing={lat.missing} dup={lat.duplicates}"
            row = Row(
                scenario=PUSH,
                runner=runner,
                rep=rep,
                messages=len(lat.values),
                bytes=0,
                wall=lat.p50,
                cpu=0.0,
                maxrss_mib=0.0,
                receiver_cpu=0.0,
                check=check,
                left_upstream=None,
                rc=0,
                extra={
                    "p50": lat.p50,
                    "p99": lat.quantile(0.99),
                    "max": max(lat.values, default=float("nan")),
                    "latencies": list(lat.values),
                    "log": str(log),
                },
            )
            b.rows.append(row)
            print(
                f"   rep {rep} {runner:<15} p50 {lat.p50 * 1000:6.0f} ms  p99 "
                f"{lat.quantile(0.99) * 1000:6.0f} ms  max {row.extra['max'] * 1000:6.0f} ms  "
                f"{check}",
                flush=True,
            )


def report_push(rows: Sequence[Row]) -> str:
    """The table: p50 / p99 / max per client (over every repetition's messages)."""
    mine = [r for r in rows if r.scenario == PUSH]
    if not mine:
        return ""
    head = ["client", "messages", "p50", "p99", "max", "check"]
    table: list[list[str]] = []
    best_other: float | None = None
    ours: float | None = None
    for runner in CLIENTS:
        rs = [r for r in mine if r.runner == runner]
        if not rs:
            continue
        lat = Latencies(
            tuple(v for r in rs for v in r.extra.get("latencies", [])),
            0,
            0,
        )
        p99 = lat.quantile(0.99)
        if runner == CONNECTOR:
            ours = p99
        elif p99 == p99:  # not NaN
            best_other = p99 if best_other is None else min(best_other, p99)
        checks = sorted({r.check for r in rs})
        table.append(
            [
                runner,
                str(len(lat.values)),
                f"{lat.p50 * 1000:.0f} ms",
                f"{p99 * 1000:.0f} ms",
                f"{max(lat.values, default=float('nan')) * 1000:.0f} ms",
                "ok" if checks == ["ok"] else "; ".join(checks),
            ]
        )
    lines = [
        "push: time from delivery into Dovecot (doveadm save returned) to the receiver's 250, "
        "each client waiting in IMAP IDLE",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in table),
    ]
    if ours is not None:
        goal = ours < GOAL_P99 and (best_other is None or ours <= best_other)
        other = "" if best_other is None else f", best other p99 {best_other * 1000:.0f} ms"
        lines.append(
            f"\ngoal: pop3-connector p99 < {GOAL_P99:g} s and not worse than the best other: "
            f"{'met' if goal else 'NOT met'} (p99 {ours * 1000:.0f} ms{other})"
        )
    return "\n".join(lines)
