"""Running and measuring one client process: pop3-connector, fetchmail, mpop, or a probe.

Every client runs as a child in its own session with a hard timeout (the whole process group is
killed when it passes).  ``os.wait4`` gives the child's own resource usage: user+system CPU of
the child and every descendant it waited for, and the peak RSS of the largest of them.  Servers
(Dovecot, the SMTP receiver) are never descendants of a client, so nothing of theirs is charged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.corpus import RECIPIENT

REPO: Final = Path(__file__).resolve().parent.parent
PASSWORD: Final = "secret-pw"  # noqa: S105 - tests.servers' throwaway test mailboxes
GNU_TIME: Final = "/usr/bin/time"
_MSGID: Final = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True, slots=True)
class ProcResult:
    """What one client run cost."""

    wall: float  # seconds, spawn to exit
    cpu: float  # user + system seconds of the client's process tree
    maxrss_mib: float
    rc: int
    timed_out: bool
    log: Path


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the servers listen."""

    pop3_port: int
    smtp_port: int


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def run_measured(
    argv: Sequence[str], *, timeout: float, log: Path, env: dict[str, str] | None = None
) -> ProcResult:
    """Run ``argv`` to completion (or ``timeout``) and measure it.

    The child is started through GNU time when it is there, only for the peak RSS: Linux
    counts the memory a forked child had *before* exec (here, the benchmark's ~40 MiB of
    Python) in its ``ru_maxrss``, and GNU time is a small process to fork from.
    """
    rss_file = log.with_suffix(".rss")
    rss_file.unlink(missing_ok=True)
    wrapper = [GNU_TIME, "-o", str(rss_file), "-f", "%M"] if Path(GNU_TIME).exists() else []
    with log.open("wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(  # noqa: S603 - argv is built by this module
            [*wrapper, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the timeout kills all of it
            env=env,
            cwd=REPO,
        )
        fired = threading.Event()

        def expire() -> None:
            fired.set()
            _kill_group(proc.pid)

        timer = threading.Timer(timeout, expire)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    _kill_group(proc.pid)  # leftovers of the group, if any
    maxrss_kib = float(usage.ru_maxrss)
    # Without GNU time, or when it was killed: the (inflated) figure from wait4.
    with contextlib.suppress(OSError, ValueError, IndexError):
        maxrss_kib = float(rss_file.read_text().split()[-1])
    return ProcResult(
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        maxrss_mib=maxrss_kib / 1024,
        rc=proc.returncode,
        timed_out=fired.is_set(),
        log=log,
    )


def _write_private(path: Path, text: str) -> Path:
    # fetchmail and mpop refuse a config with a password that others can read; so would we.
    path.write_text(text)
    path.chmod(0o600)
    return path


# ------------------------------------------------------------------------------------------
# pop3-connector
# ------------------------------------------------------------------------------------------


def connector_config(
    workdir: Path,
    ends: Endpoints,
    users: list[str],
    *,
    parallel: int,
    log_level: str = "info",
    service: Sequence[str] = (),
) -> Path:
    """A config for ``pop3-connector once``: plain POP3 and SMTP on loopback, metrics off;
    ``service``: more ``[service]`` lines (``spool_threshold = ...``)."""
    lines = [
        "[service]",
        f'state_dir = "{workdir / "state"}"',
        f"max_parallel_accounts = {parallel}",
        f'log_level = "{log_level}"',
        *service,
        "",
        "[metrics]",
        'listen = ""',
        "",
        "[smtp]",
        'host = "127.0.0.1"',
        f"port = {ends.smtp_port}",
        'tls = "none"',
        'helo_name = "connector.bench.example"',
        "",
    ]
    for i, user in enumerate(users):
        lines += [
            "[[accounts]]",
            f'name = "a{i:03d}"',
            'host = "127.0.0.1"',
            f"port = {ends.pop3_port}",
            'tls = "none"',
            f'username = "{user}"',
            f'password = "{PASSWORD}"',
            f'deliver_to = ["{RECIPIENT}"]',
            "",
        ]
    (workdir / "state").mkdir(parents=True, exist_ok=True)
    return _write_private(workdir / "config.toml", "\n".join(lines))


def connector_argv(config: Path, profile: Path | None = None) -> list[str]:
    """``python -m connector --config F once`` with this interpreter (the project's venv)."""
    # POP3_BENCH_WRAP: a command to run the connector under, e.g. "py-spy record -o F --"
    head = [*os.environ.get("POP3_BENCH_WRAP", "").split(), sys.executable]
    if profile is not None:
        head += ["-m", "cProfile", "-o", str(profile)]
    return [*head, "-m", "connector", "--config", str(config), "once"]


# ------------------------------------------------------------------------------------------
# fetchmail
# ------------------------------------------------------------------------------------------


def fetchmail_config(workdir: Path, ends: Endpoints, users: list[str]) -> Path:
    """An rc file: every account in one poll entry, nokeep, SMTP to the receiver, softbounce.

    ``sslproto ""`` keeps plain POP3 (else fetchmail upgrades via STLS and fails on the test
    certificate); ``no bouncemail`` and ``postmaster ""`` stop it mailing bounces to
    localhost:25 (bench-facts.md).  ``fetchall`` makes every message count, as for the others.
    """
    lines = [
        'set postmaster ""',
        "set no bouncemail",
        "set no syslog",
        f"poll 127.0.0.1 with proto POP3 service {ends.pop3_port}",
    ]
    lines += [
        f'  user "{user}" there with password "{PASSWORD}" is "bench" here options nokeep '
        f'fetchall sslproto "" smtphost "127.0.0.1/{ends.smtp_port}" smtpname "{RECIPIENT}"'
        for user in users
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    return _write_private(workdir / "fetchmailrc", "\n".join(lines) + "\n")


def fetchmail_argv(rc: Path) -> list[str]:
    """One poll of every account, in the foreground, state kept next to the rc file."""
    return [
        "fetchmail",
        "--fetchmailrc",
        str(rc),
        "--nodetach",
        "--idfile",
        str(rc.with_name("fetchids")),
        "--pidfile",
        str(rc.with_name("fetchmail.pid")),
    ]


def fetchmail_env(workdir: Path) -> dict[str, str]:
    return {**os.environ, "HOME": str(workdir), "FETCHMAILHOME": str(workdir)}


# ------------------------------------------------------------------------------------------
# mpop
# ------------------------------------------------------------------------------------------


def mpop_config(workdir: Path, ends: Endpoints, users: list[str]) -> tuple[Path, Path]:
    """An mpoprc delivering every account to one Maildir (``keep off``, every message)."""
    target = workdir / "maildir"
    for sub in ("cur", "new", "tmp"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    lines = [
        "defaults",
        "tls off",
        "auth user",
        "keep off",
        "only_new off",
        "pipelining auto",
        f"delivery maildir {target}",
        f"uidls_file {workdir / 'uidls'}",
        "",
    ]
    for i, user in enumerate(users):
        lines += [
            f"account a{i:03d}",
            "host 127.0.0.1",
            f"port {ends.pop3_port}",
            f"user {user}",
            f"password {PASSWORD}",
            "",
        ]
    return _write_private(workdir / "mpoprc", "\n".join(lines)), target


def mpop_argv(rc: Path) -> list[str]:
    return ["mpop", "--file", str(rc), "--all-accounts", "--quiet"]


def maildir_ids(target: Path) -> Counter[str]:
    """Message-IDs of the messages mpop delivered."""
    seen: Counter[str] = Counter()
    for sub in ("new", "cur"):
        for p in (target / sub).iterdir():
            with p.open("rb") as f:
                head = f.read(64 * 1024)
            end = head.find(b"\n\n")
            end2 = head.find(b"\r\n\r\n")
            stop = min(x for x in (end, end2, len(head)) if x >= 0)
            m = _MSGID.search(head, 0, stop)
            seen[m.group(1).decode("ascii", "replace") if m else ""] += 1
    return seen


# ------------------------------------------------------------------------------------------
# probes
# ------------------------------------------------------------------------------------------


def probe_job(workdir: Path, kind: str, job: dict[str, object]) -> tuple[list[str], Path]:
    """argv for ``python -m bench.probes`` and the path it writes its result to."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_path = workdir / f"{kind}-job.json"
    out = workdir / f"{kind}-out.json"
    job_path.write_text(json.dumps(job))
    out.unlink(missing_ok=True)
    return [sys.executable, "-m", "bench.probes", kind, str(job_path), str(out)], out


def tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def check_once(expected: Iterable[str], seen: Counter[str]) -> str:
    """ "ok" when every expected Message-ID arrived exactly once and nothing else did."""
    want = set(expected)
    missing = len(want - seen.keys())
    dups = sum(1 for k, v in seen.items() if k in want and v > 1)
    extra = sum(v for k, v in seen.items() if k not in want)
    if not (missing or dups or extra):
        return "ok"
    return f"FAIL missing={missing} dup={dups} extra={extra}"
