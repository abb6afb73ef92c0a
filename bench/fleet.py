"""The fleet scenario (issue 15 §3): one ``pop3-connector run`` over thousands of accounts.

A provider's machine: N accounts on the private Dovecot, one long-lived ``run`` process with a
short ``poll_interval`` and the metrics endpoint on, watched from outside over several rounds
(a round: every account's k-th cycle).  Before each round but the last, 1 % of the accounts get
1-3 new messages in their Maildirs; the last round finds nothing new (the idle round).

What is measured, and how (nothing in connector/ is touched):

* **Rounds** come from the ledger's ``accounts`` table, read beside the running service every
  half second: each cycle records its start and end there (an idle cycle logs only at debug,
  and the scenario runs at info, as a provider would).  An account is polled at most every half
  interval, so no cycle is missed.  Round k is complete when every account has k cycles.  What
  a round delivered is what the receiver got meanwhile.
* **CPU** is user + system time of the connector process (all threads, /proc/PID/stat), sampled
  when a round completes; the CPU of what the benchmark itself asks between rounds (scrapes,
  the reload) is measured around each request and taken off the round it fell into.
* **Start-up**: process start (just before the spawn) to ``READY=1`` on ``$NOTIFY_SOCKET`` (the
  benchmark listens there, as systemd would) and to the first cycle's start.
* **Reload**: SIGHUP sent to the ``configuration reloaded`` log line, in the middle of round 1
  (cycles running) and again between rounds 1 and 2 (the file unchanged both times).
* **Scrapes**: ``GET /metrics`` and ``GET /status`` between rounds (the process idle) and in the
  middle of each round (the process busy), each timed from the request to the last byte.
* **Ledger**: rows and file sizes, read with sqlite3 beside the running service (WAL lets a
  reader in).  A row is forgotten in the cycle whose listing no longer has its UIDL
  (``Ledger.sync_listing``), so the rows after a round are at most the messages that round
  delivered, and none after the idle round: growth bounded.
* **Spread**: the cycle starts of each round per tenth of the interval, from the round's first.
* **Exactly once**: the receiver's Message-IDs against every message put into a Maildir, and
  the Maildirs empty at the end.

Options: the accounts on POP3S instead of plain POP3 (``tls``: providers run 995), dead
letters already in the store at start (``dead_letters``), the per-account series
(``per_account``; off by default here, as the README tells providers), and
``max_sessions_per_host`` (``per_host``; by default the parallel limit, since every account is
on the one Dovecot).  A run cut short by its time limit keeps the figures of the cycles so far
(the round is marked partial) and fails its check.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import random
import re
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

from bench import corpus, runners
from bench.corpus import CorpusSpec, Message
from bench.runners import PASSWORD, Endpoints
from tests.servers import DovecotServer, free_port

USER_PREFIX: Final = "fleet"
SPREAD_BINS: Final = 10
WARMUP_CHUNK: Final = 1000  # accounts the warm-up probe logs in at once (see run)
MIN_ROUNDS: Final = 2  # a round with new mail, then the idle one
LEDGER_POLL: Final = 0.5  # seconds between reads of the accounts table (see CycleWatch)

_LINE: Final = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) +([\w.]+): (.*)$")


class Counting(Protocol):
    """The SMTP receiver, as far as this scenario uses it (bench.main.Receiver)."""

    def reset(self) -> None: ...

    def seen(self) -> Counter[str]: ...


@dataclass(frozen=True, slots=True)
class FleetOptions:
    """How big the fleet is and how long it is watched."""

    accounts: int
    rounds: int
    interval: float
    parallel: int
    cache: Path
    busy_fraction: float = 0.01
    max_new: int = 3
    seed: int = 15
    timeout: float | None = None
    dead_letters: int = 0  # already in the dead-letter store at start (a provider's keeps some)
    tls: bool = False  # POP3S (implicit TLS, Dovecot's test CA as ca_file), as providers run it
    per_account: bool = False  # [metrics] per_account
    per_host: int | None = None  # [service] max_sessions_per_host (None: parallel)


@dataclass(slots=True)
class Scrape:
    """One HTTP request to the endpoint."""

    path: str
    seconds: float
    size: int
    status: int
    cpu: float  # the connector's CPU seconds over the request (idle process: the request's)
    busy: bool  # asked in the middle of a round
    series: int = 0  # /metrics: sample lines (time series)


@dataclass(slots=True)
class RoundStats:
    """One round: every account's k-th cycle."""

    number: int
    new_messages: int = 0  # put into Maildirs before this round
    cycles: int = 0
    failed: int = 0
    delivered: int = 0  # what the receiver got during the round
    first_start: float | None = None
    last_end: float | None = None
    starts: list[float] = field(default_factory=list)
    cpu: float = 0.0  # ours, net of the benchmark's requests
    bench_cpu: float = 0.0  # the connector's CPU spent on the benchmark's requests
    dovecot_cpu: float = 0.0
    rss_mib: float = 0.0
    peak_rss_mib: float = 0.0
    threads: int = 0
    fds: int = 0
    ledger: dict[str, int] = field(default_factory=dict)
    scrapes: list[Scrape] = field(default_factory=list)
    log_bytes: int = 0
    spread: list[int] = field(default_factory=list)
    overflow: int = 0  # cycle starts later than one interval after the round's first
    polls_window: int = 0  # cycles started between the previous round's end and this one's
    peak_logins_per_s: int = 0
    partial: bool = False  # cut short by the time limit: the figures of the cycles so far

    @property
    def wall(self) -> float:
        if self.first_start is None or self.last_end is None:
            return 0.0
        return self.last_end - self.first_start


@dataclass(slots=True)
class FleetResult:
    """The whole run."""

    accounts: int
    interval: float
    parallel: int
    dead_letters: int
    tls: bool
    planned_rounds: int
    per_account: bool = False
    per_host: int = 0
    rounds: list[RoundStats] = field(default_factory=list)
    ready_s: float | None = None
    running_line_s: float | None = None
    first_poll_s: float | None = None
    startup_cpu: float = 0.0
    startup_rss_mib: float = 0.0
    reload_s: float | None = None
    reload_busy_s: float | None = None  # SIGHUP in the middle of round 1
    reload_cpu: float = 0.0
    reload_after_round: int = 0
    reload_changed: int = 0  # accounts the reload called changed (the file was not changed)
    stop_s: float | None = None
    rc: int | None = None
    expected: int = 0
    check: str = "not run"
    left_upstream: int | None = None
    dovecot_logins: int = 0
    warnings: list[str] = field(default_factory=list)
    setup_s: float = 0.0
    # The warm-up probe (bench/probes.py, a minimal asyncio POP3 client, every account once):
    # its CPU, start-up included, is a floor for what a poll of an empty mailbox can cost.
    warmup_cpu: float = 0.0
    log: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------
# set-up: users, Maildirs, config
# ------------------------------------------------------------------------------------------


def add_users(dovecot: DovecotServer, n: int) -> list[str]:
    """``n`` more mailboxes in Dovecot's passwd-file, written at once.

    ``DovecotServer.add_user`` hands out the 500 spare users written at start; Dovecot reads a
    passwd-file again when its size or mtime changes, so one append before the first login of
    these users is seen (tests/servers.py, recipes/dovecot-for-tests.md).
    """
    users = [f"{USER_PREFIX}{i:05d}" for i in range(n)]
    with (dovecot.root / "users").open("a") as f:
        f.writelines(f"{u}:{{PLAIN}}{PASSWORD}::::::\n" for u in users)
    return users


def config(
    workdir: Path,
    ends: Endpoints,
    users: list[str],
    *,
    parallel: int,
    interval: float,
    metrics_port: int,
    pop3s: tuple[int, Path] | None = None,
    per_account: bool = False,
    per_host: int | None = None,
) -> Path:
    """The service's config: POP3 (``pop3s``: (port, CA file) for implicit TLS, else plain) and
    plain SMTP on loopback, metrics on, log level info."""
    if pop3s is None:
        pop3 = [f"port = {ends.pop3_port}", 'tls = "none"']
    else:
        pop3 = [f"port = {pop3s[0]}", 'tls = "implicit"', f'ca_file = "{pop3s[1]}"']
    lines = [
        "[service]",
        f'state_dir = "{workdir / "state"}"',
        f"max_parallel_accounts = {parallel}",
        f"max_sessions_per_host = {per_host or parallel}",
        f"poll_interval = {interval:g}",
        'log_level = "info"',
        "",
        "[metrics]",
        f'listen = "127.0.0.1:{metrics_port}"',
        f"per_account = {'true' if per_account else 'false'}",
        "",
        "[smtp]",
        'host = "127.0.0.1"',
        f"port = {ends.smtp_port}",
        'tls = "none"',
        'helo_name = "connector.bench.example"',
        "",
    ]
    for user in users:
        lines += [
            "[[accounts]]",
            f'name = "{user}"',
            'host = "127.0.0.1"',
            *pop3,
            f'username = "{user}"',
            f'password = "{PASSWORD}"',
            f'deliver_to = ["{corpus.RECIPIENT}"]',
            "",
        ]
    (workdir / "state").mkdir(parents=True, exist_ok=True)
    path = workdir / "config.toml"
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return path


def plan_mail(
    users: list[str], opts: FleetOptions
) -> tuple[list[dict[str, list[int]]], CorpusSpec]:
    """Which accounts get how many new messages before each round (none before the last).

    Returns, per round, {user: [message indexes into the pool]}, and the pool's corpus spec.
    """
    rng = random.Random(opts.seed)
    busy = max(1, round(len(users) * opts.busy_fraction))
    plans: list[dict[str, list[int]]] = []
    used = 0
    for number in range(1, opts.rounds + 1):
        plan: dict[str, list[int]] = {}
        if number < opts.rounds:
            for user in rng.sample(users, busy):
                k = rng.randint(1, opts.max_new)
                plan[user] = list(range(used, used + k))
                used += k
        plans.append(plan)
    # Sized for the largest plan of this shape, so that the cached pool serves any seed.
    size = max(used, busy * opts.max_new * max(opts.rounds - 1, 1))
    return plans, CorpusSpec("fleet", 1, size, prefix="fleet")


def seed_dead_letters(state: Path, users: list[str], count: int) -> None:
    """``count`` dead letters in the default store (``<state_dir>/dead-letters``), spread over
    the accounts, written through the connector's own MaildirStore as a cycle would."""
    if count <= 0:
        return
    from connector.deadletter import DeadLetterInfo
    from connector.deadletter.maildir import MaildirStore

    store = MaildirStore(state / "dead-letters")
    now = datetime.now(UTC)
    raw = b"From: spam@bench.example\r\nSubject: refused\r\n\r\n" + b"x" * 4000 + b"\r\n"

    async def put_all() -> None:
        for i in range(count):
            info = DeadLetterInfo(
                users[i % len(users)], f"seed{i}", "data", "554 5.7.1 refused (seed)", now
            )
            await store.put(raw, info)

    asyncio.run(put_all())


# ------------------------------------------------------------------------------------------
# watching the process
# ------------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def proc_cpu(pid: int) -> float:
    """User + system seconds of ``pid``, all its threads (/proc/PID/stat fields 14-15)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_memory(pid: int) -> tuple[float, float, int]:
    """(RSS, peak RSS) in MiB and the thread count, from /proc/PID/status."""
    values: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        values[key] = value.strip()

    def mib(key: str) -> float:
        return int(values.get(key, "0 kB").split()[0]) / 1024

    return mib("VmRSS"), mib("VmHWM"), int(values.get("Threads", "0"))


def proc_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def find_connector(root: int, deadline: float) -> int:
    """The Python process running ``-m connector`` under ``root`` (itself, or the child of a
    wrapper such as ``py-spy record --``)."""
    while True:
        todo, seen = [root], set()
        while todo:
            pid = todo.pop()
            seen.add(pid)
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                exe = Path(f"/proc/{pid}/exe").resolve().name
                if exe.startswith("python") and b"connector" in argv and b"-m" in argv:
                    return pid
            todo.extend(c for c in _children(pid) if c not in seen)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no connector process under pid {root}")
        time.sleep(0.01)


def _log_time(stamp: str) -> float:
    """The logging module's asctime (local time, milliseconds) as a Unix time."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


class LogWatch:
    """Follows the connector's log file: its lines (at info: a cycle that moved mail or
    failed, the reloads, the warnings) with their times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self._partial = b""
        self.events: list[tuple[float, str, str]] = []  # (time, level, message)

    def poll(self) -> None:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        if not data:
            return
        self.offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            self._line(raw.decode("utf-8", "replace"))

    def _line(self, text: str) -> None:
        m = _LINE.match(text)
        if m is None:
            return  # a traceback's continuation lines
        stamp, level, _logger, message = m.groups()
        self.events.append((_log_time(stamp), level, message))

    def first(self, needle: str, after: float = 0.0) -> float | None:
        """The time of the first log line after ``after`` whose message contains ``needle``."""
        return next((t for t, _, msg in self.events if t >= after and needle in msg), None)


class CycleWatch:
    """Counts cycles per account and per round from the ledger's ``accounts`` table (each
    cycle records its start and end there), read every LEDGER_POLL seconds beside the
    running service."""

    def __init__(self, state: Path, accounts: int) -> None:
        self.path = state / "ledger.sqlite3"
        self.accounts = accounts
        self.seen: dict[str, float] = {}  # account -> the start of its last cycle counted
        self.cycles: Counter[str] = Counter()
        self.rounds: dict[int, RoundStats] = {}
        self.done: Counter[int] = Counter()  # round -> accounts that finished it
        self.all_starts: list[float] = []  # every cycle's start, whatever its round
        self._next = 0.0

    def round(self, number: int) -> RoundStats:
        return self.rounds.setdefault(number, RoundStats(number))

    def poll(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + LEDGER_POLL
        if not self.path.exists():
            return
        try:
            with _ledger(self.path) as conn:
                rows = conn.execute(
                    "SELECT name, last_cycle_started, last_cycle_finished, result FROM accounts"
                    " WHERE last_cycle_started IS NOT NULL"
                ).fetchall()
        except sqlite3.OperationalError:  # not migrated yet
            return
        for name, started, finished, result in rows:
            if self.seen.get(name) == started:
                continue
            self.seen[name] = started
            self.all_starts.append(started)
            self.cycles[name] += 1
            r = self.round(self.cycles[name])
            r.cycles += 1
            r.starts.append(started)
            r.first_start = started if r.first_start is None else min(r.first_start, started)
            r.last_end = finished if r.last_end is None else max(r.last_end, finished)
            if result != "ok":
                r.failed += 1
            self.done[self.cycles[name]] += 1

    def complete(self, number: int) -> bool:
        return self.done[number] >= self.accounts


class Notify:
    """The ``$NOTIFY_SOCKET`` a systemd would listen on: records when READY=1 arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.ready_at: float | None = None

    def wait(self, seconds: float) -> None:
        """Wait up to ``seconds`` for a datagram (a short sleep of the watch loop)."""
        readable, _, _ = select.select([self.sock], [], [], seconds)
        if not readable:
            return
        with contextlib.suppress(BlockingIOError):
            data = self.sock.recv(4096)
            if b"READY=1" in data.split(b"\n") and self.ready_at is None:
                self.ready_at = time.time()

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def http_get(port: int, path: str, pid: int, *, busy: bool) -> Scrape:
    """GET ``path`` from the endpoint: time to the last byte, size, the connector's CPU."""
    cpu = proc_cpu(pid)
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        status = resp.status
    finally:
        conn.close()
    seconds = time.perf_counter() - start
    used = proc_cpu(pid) - cpu
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return Scrape(path, seconds, len(body), status, used, busy, series)


# ------------------------------------------------------------------------------------------
# the ledger, from outside
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _ledger(path: Path) -> Iterator[sqlite3.Connection]:
    # The service holds the ledger open in WAL mode: a reader goes beside it; a writer waits
    # for the service's short transactions (busy timeout).
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def ledger_stats(state: Path) -> dict[str, int]:
    """Rows and file sizes of the ledger in ``state``."""
    path = state / "ledger.sqlite3"
    out: dict[str, int] = {}
    for key, suffix in (("bytes_db", ""), ("bytes_wal", "-wal"), ("bytes_shm", "-shm")):
        p = Path(str(path) + suffix)
        out[key] = p.stat().st_size if p.exists() else 0
    if not path.exists():
        return out
    with _ledger(path) as conn:
        out["messages"] = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        out["gone"] = conn.execute(
            "SELECT count(*) FROM messages WHERE gone_since IS NOT NULL"
        ).fetchone()[0]
        out["accounts"] = conn.execute("SELECT count(*) FROM accounts").fetchone()[0]
        out["pages"] = conn.execute("PRAGMA page_count").fetchone()[0]
        out["free_pages"] = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return out


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------


def _spread(r: RoundStats, interval: float, starts: list[float]) -> None:
    """The polls of the last interval before the round's end (every account's, whatever its
    round: an account's k-th cycle need not fall in the same interval as another's), per tenth
    of it, and the busiest second."""
    if r.last_end is None:
        return
    since = r.last_end - interval
    bins = [0] * SPREAD_BINS
    per_second: Counter[int] = Counter()
    for s in starts:
        if since < s <= r.last_end:
            bins[min(int((s - since) / interval * SPREAD_BINS), SPREAD_BINS - 1)] += 1
            per_second[int(s)] += 1
    r.spread = bins
    r.peak_logins_per_s = max(per_second.values(), default=0)


def _settled_size(log: Path) -> int:
    """The size of Dovecot's log once the warm-up's last lines are in (its log process
    writes them a moment after the session ends)."""
    size, stable_since = -1, time.monotonic()
    deadline = stable_since + 5
    while time.monotonic() < deadline:
        now = log.stat().st_size if log.exists() else 0
        if now != size:
            size, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= 0.5:
            break
        time.sleep(0.05)
    return size


def _dovecot_logins(log: Path, offset: int) -> int:
    try:
        with log.open("rb") as f:
            f.seek(offset)
            return sum(1 for line in f if b"Login: user=<" + USER_PREFIX.encode() in line)
    except OSError:
        return 0


def run(
    dovecot: DovecotServer,
    receiver: Counting,
    workdir: Path,
    opts: FleetOptions,
    *,
    dovecot_cpu: Callable[[], float],
) -> FleetResult:
    """The scenario; ``dovecot_cpu()`` gives Dovecot's CPU seconds so far."""
    started = time.monotonic()
    ends = Endpoints(pop3_port=dovecot.ports["pop3"], smtp_port=_receiver_port(receiver))
    mail_root = dovecot.root / "mail"
    users = add_users(dovecot, opts.accounts)
    for user in users:
        corpus.reset_mailbox(mail_root, user)
    plans, spec = plan_mail(users, opts)
    pool = corpus.build(spec, opts.cache)[0].messages
    # An untimed first round: Dovecot writes a mailbox's index and UID list at its first
    # login, once in the mailbox's life (as in the idle scenario).  The probe logs every
    # account in at once; in chunks below the pop3 service's process_limit (1024 in
    # tuned_dovecot_conf, one session each), since at 10,000 at once Dovecot's login processes
    # found the pop3 service's socket full (its log: "net_connect_unix(pop3) failed: Resource
    # temporarily unavailable", SocketUnavailable) and dropped a few logins.
    warm_wall, warm_cpu, warm_rc = 0.0, 0.0, 0
    for i in range(0, len(users), WARMUP_CHUNK):
        argv, _ = runners.probe_job(
            workdir / "warmup",
            "pop3",
            {
                "host": "127.0.0.1",
                "port": ends.pop3_port,
                "users": users[i : i + WARMUP_CHUNK],
                "password": PASSWORD,
                "window": 32,
            },
        )
        warm = runners.run_measured(argv, timeout=120, log=workdir / "warmup.log")
        warm_wall += warm.wall
        warm_cpu += warm.cpu
        warm_rc = warm_rc or warm.rc
    print(
        f"   set-up and warm-up round: {warm_wall:.1f}s, probe CPU {warm_cpu:.2f}s rc={warm_rc}",
        flush=True,
    )
    port = free_port()
    cfg = config(
        workdir,
        ends,
        users,
        parallel=opts.parallel,
        interval=opts.interval,
        metrics_port=port,
        pop3s=(dovecot.ports["pop3s"], dovecot.ca_file) if opts.tls else None,
        per_account=opts.per_account,
        per_host=opts.per_host,
    )
    seed_dead_letters(workdir / "state", users, opts.dead_letters)
    result = FleetResult(
        opts.accounts,
        opts.interval,
        opts.parallel,
        opts.dead_letters,
        opts.tls,
        opts.rounds,
        per_account=opts.per_account,
        per_host=opts.per_host or opts.parallel,
    )
    result.setup_s = time.monotonic() - started
    result.warmup_cpu = warm_cpu
    expected: list[str] = []

    def deliver(number: int) -> int:
        plan = plans[number - 1]
        count = 0
        for user, indexes in plan.items():
            msgs: list[Message] = [pool[i] for i in indexes]
            corpus.add_messages(corpus.maildir(mail_root, user), msgs)
            expected.extend(m.msgid for m in msgs)
            count += len(msgs)
        return count

    receiver.reset()
    first_new = deliver(1)
    log_path = workdir / "connector.log"
    result.log = str(log_path)
    notify = Notify(workdir / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path)}
    wrap = os.environ.get("POP3_BENCH_WRAP", "").split()
    cmd = [*wrap, sys.executable, "-m", "connector", "--config", str(cfg), "run"]
    dovecot_log = dovecot.root / "dovecot.log"
    dovecot_offset = _settled_size(dovecot_log)
    deadline = time.monotonic() + (
        opts.timeout
        if opts.timeout is not None
        else 120 + opts.rounds * (opts.interval + 60 + opts.accounts * 0.05)
    )
    watch = LogWatch(log_path)
    cycles = CycleWatch(workdir / "state", opts.accounts)
    cut_short: str | None = None
    with log_path.open("wb") as out:
        t0 = time.time()
        proc = subprocess.Popen(  # noqa: S603 - argv built here
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=runners.REPO,
        )
    try:
        pid = find_connector(proc.pid, time.monotonic() + 30)
        try:
            _watch(
                result,
                watch,
                cycles,
                receiver,
                notify,
                proc,
                pid,
                t0,
                opts,
                port=port,
                state=workdir / "state",
                deliver=deliver,
                first_new=first_new,
                deadline=deadline,
                dovecot_cpu=dovecot_cpu,
            )
        except TimeoutError as exc:
            # The figures so far stand (the last round's marked partial); the check fails.
            cut_short = str(exc)
            print(f"   ! {cut_short}", flush=True)
        # Stop gracefully and time it.
        stop = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        try:
            result.rc = proc.wait(timeout=120)
            result.stop_s = time.monotonic() - stop
        except subprocess.TimeoutExpired:
            result.warnings.append("did not stop within 120 s of SIGTERM")
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        notify.close()
    watch.poll()
    result.warnings += [
        f"{level} {message}"
        for _, level, message in watch.events
        if level in ("WARNING", "ERROR", "CRITICAL")
    ]
    result.expected = len(expected)
    result.dovecot_logins = _dovecot_logins(dovecot_log, dovecot_offset)
    if cut_short is not None:
        result.check = f"FAIL {cut_short}"
        return result
    result.check = runners.check_once(expected, receiver.seen())
    refused = [sc for r in result.rounds for sc in r.scrapes if sc.status != 200]
    if refused and result.check == "ok":
        result.check = f"FAIL GET {refused[0].path} answered {refused[0].status}"
    failed = sum(r.failed for r in result.rounds)
    if failed and result.check == "ok":
        result.check = f"FAIL {failed} cycles failed"
    if len(result.rounds) < opts.rounds and result.check == "ok":
        result.check = f"FAIL only {len(result.rounds)} of {opts.rounds} rounds"
    result.left_upstream = corpus.left_in(mail_root, users)
    if result.left_upstream and result.check == "ok":
        result.check = f"FAIL {result.left_upstream} left upstream"
    return result


def _receiver_port(receiver: Counting) -> int:
    port = getattr(receiver, "port", None)
    if not isinstance(port, int):
        raise TypeError("the receiver has no port")
    return port


def _reload(watch: LogWatch, pid: int, alive: Callable[[], None]) -> tuple[float, float, int]:
    """SIGHUP; (seconds to the ``configuration reloaded`` line, the connector's CPU meanwhile,
    accounts the reload called changed)."""
    before = proc_cpu(pid)
    sent = time.time()
    os.kill(pid, signal.SIGHUP)
    while (done := watch.first("configuration reloaded", sent)) is None:
        if watch.first("reload failed", sent) is not None:
            raise RuntimeError("fleet: the reload failed; see the log")
        alive()
        time.sleep(0.01)
        watch.poll()
    changed = sum(
        1 for t, _, msg in watch.events if t >= sent and msg.startswith("reload: account=")
    )
    return done - sent, proc_cpu(pid) - before, changed


def _watch(
    result: FleetResult,
    watch: LogWatch,
    cycles: CycleWatch,
    receiver: Counting,
    notify: Notify,
    proc: subprocess.Popen[bytes],
    pid: int,
    t0: float,
    opts: FleetOptions,
    *,
    port: int,
    state: Path,
    deliver: Callable[[int], int],
    first_new: int,
    deadline: float,
    dovecot_cpu: Callable[[], float],
) -> None:
    """Follow the rounds; between them deliver, scrape and reload."""
    n = opts.accounts
    reload_after = 1
    cpu_mark: float | None = None
    dovecot_mark = dovecot_cpu()
    busy_scraped: set[int] = set()
    idle_scrape_cpu: list[float] = []
    new_before = {1: first_new}
    received_mark = 0
    log_mark = 0
    polls_mark = 0
    current = 1

    def settle(r: RoundStats) -> None:
        """What a round ends with (or what a round cut short by the time limit got to).  Its
        CPU: from the previous round's end (round 1: from READY) to now, less what the
        benchmark's own requests cost meanwhile."""
        nonlocal cpu_mark, dovecot_mark, received_mark, log_mark, polls_mark
        now_cpu = proc_cpu(pid)
        r.cpu = now_cpu - (cpu_mark if cpu_mark is not None else 0.0) - r.bench_cpu
        cpu_mark = now_cpu
        d = dovecot_cpu()
        r.dovecot_cpu, dovecot_mark = d - dovecot_mark, d
        r.rss_mib, r.peak_rss_mib, r.threads = proc_memory(pid)
        r.fds = proc_fds(pid)
        r.new_messages = new_before.get(r.number, 0)
        received = sum(receiver.seen().values())
        r.delivered, received_mark = received - received_mark, received
        watch.poll()
        r.log_bytes, log_mark = watch.offset - log_mark, watch.offset
        r.ledger = ledger_stats(state)
        _spread(r, opts.interval, cycles.all_starts)
        r.polls_window = len(cycles.all_starts) - polls_mark
        polls_mark = len(cycles.all_starts)
        if r.number == 1:
            starts = [s for s in r.starts if s >= t0]
            result.first_poll_s = min(starts) - t0 if starts else None
        result.rounds.append(r)
        print(
            f"   round {r.number}{' (cut short)' if r.partial else ''}: {r.cycles} polls in "
            f"{r.wall:.1f}s, {r.new_messages} new, {r.delivered} delivered, {r.failed} failed; "
            f"CPU {r.cpu:.2f}s over {r.polls_window} polls "
            f"({r.cpu / max(r.polls_window, 1) * 1000:.2f} ms/poll); "
            f"RSS {r.rss_mib:.0f} MiB (peak {r.peak_rss_mib:.0f}); ledger "
            f"{r.ledger.get('messages', 0)} rows; log {r.log_bytes / 1024:.0f} KiB; "
            + ", ".join(
                f"{s.path}{' busy' if s.busy else ''} {s.seconds:.3f}s {s.size / 1024:.0f} KiB"
                for s in r.scrapes
            ),
            flush=True,
        )

    def alive() -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"pop3-connector exited rc={proc.returncode}")
        if time.monotonic() > deadline:
            r = cycles.round(current)
            r.partial = True
            settle(r)
            raise TimeoutError(f"round {current} not complete within the time limit")

    while current <= opts.rounds:
        alive()
        notify.wait(0.05)
        watch.poll()
        cycles.poll()
        if cpu_mark is None and notify.ready_at is not None:
            cpu_mark = proc_cpu(pid)
            result.startup_cpu = cpu_mark
            result.startup_rss_mib = proc_memory(pid)[0]
            result.ready_s = notify.ready_at - t0
            running = watch.first(" running: ")
            result.running_line_s = None if running is None else running - t0
        r = cycles.round(current)
        if (
            current not in busy_scraped
            and cycles.done[current] >= n // 2
            and not cycles.complete(current)
        ):
            # In the middle of a round: the loop is busy with cycles.  The CPU taken off the
            # round is what the same requests cost an idle process (the mean measured so far;
            # in round 1, before any idle request, what was measured over the request).
            busy_scraped.add(current)
            for path in ("/metrics", "/status"):
                sc = http_get(port, path, pid, busy=True)
                r.scrapes.append(sc)
                if current == 1:
                    r.bench_cpu += sc.cpu
            if current > 1:
                r.bench_cpu += sum(idle_scrape_cpu[-2:])
        if current == 1 and result.reload_busy_s is None and cycles.done[1] >= n // 4:
            # A reload while the cycles run (the admin does not wait for a quiet moment).
            seconds, cpu, _ = _reload(watch, pid, alive)
            result.reload_busy_s = seconds
            r.bench_cpu += cpu
        if not cycles.complete(current):
            continue
        settle(r)
        # Between rounds: the next round's mail, the idle scrapes, the reload.
        following = cycles.round(current + 1)
        if current < opts.rounds:
            new_before[current + 1] = deliver(current + 1)
        for path in ("/metrics", "/status"):
            s = http_get(port, path, pid, busy=False)
            r.scrapes.append(s)
            idle_scrape_cpu.append(s.cpu)
            following.bench_cpu += s.cpu
        if current == reload_after:
            result.reload_s, result.reload_cpu, result.reload_changed = _reload(watch, pid, alive)
            result.reload_after_round = current
            following.bench_cpu += result.reload_cpu
        current += 1
