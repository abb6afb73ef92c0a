"""Scenarios, tables and the command line of the benchmark (issue 5; see bench/README.md)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from bench import corpus, fleet, push, runners
from bench.corpus import CorpusSpec, Mailbox, Message
from bench.runners import Endpoints, ProcResult
from tests.servers import DovecotServer, start_dovecot, stop_dovecot

SCENARIOS: Final = ("throughput", "poison", "idle", "large")
# Run only when asked for (--only fleet): ten thousand accounts over five rounds take minutes;
# (--only push): 200 messages at random instants, about two minutes per client;
# --only spool measures where keeping a message in memory stops paying (docs/design.md §5.3).
ON_REQUEST: Final = ("fleet", "spool", push.PUSH)
RSS_GOAL_MIB: Final = 100  # issue 17: pop3-connector's peak RSS in the large scenarios
MB: Final = 1e6
MIB: Final = 1024 * 1024
CONNECTOR: Final = "pop3-connector"
FETCHMAIL: Final = "fetchmail"
MPOP: Final = "mpop"
POP3_PROBE: Final = "pop3-probe"
SMTP_PROBE: Final = "smtp-probe"
SERVICE_ROUND: Final = "pop3-connector round"  # idle: a round of a started service (run mode)


def tuned_dovecot_conf(cores: int) -> str:
    """Dovecot's documented high-performance settings, for every runner alike.

    By default Dovecot forks a fresh pop3-login process for every connection ("high-security
    mode", ``service_count = 1``) and a fresh pop3 process for every session: about 15 ms of
    server CPU per login on these machines, which was the ceiling of every client in the idle
    round.  ``service_count = 0`` keeps login processes serving many connections (one per core
    waiting, ``process_min_avail``) and reuses pop3 processes (safe here: every mailbox has the
    same uid).  Providers run Dovecot this way; it only lowers the server's part of the bill.
    """
    return f"""
service pop3-login {{
  service_count = 0
  process_min_avail = {cores}
}}
service pop3 {{
  service_count = 0
  client_limit = 1
  process_min_avail = {cores}
  process_limit = 1024
}}
"""


@dataclass(frozen=True, slots=True)
class Scale:
    """How big each scenario is (full, or --quick)."""

    accounts: int = 20
    per_account: int = 500
    poison_accounts: int = 4
    poison_counts: tuple[int, ...] = (0, 50, 200, 1000)
    poison_cycles: int = 4
    good_per_cycle: int = 5
    idle_accounts: int = 200
    large_accounts: int = 8
    large_per_account: int = 3
    large_size: int = 25 * MIB
    # The same scenario with one message per account of the size Exchange Online allows.
    huge_accounts: int = 8
    huge_per_account: int = 1
    huge_size: int = 150 * MIB
    spool_sizes: tuple[int, ...] = (256 * 1024, 1 * MIB, 2 * MIB, 4 * MIB, 8 * MIB, 16 * MIB)
    spool_per_account: int = 32 * MIB  # octets per account in each spool-scenario run
    fleet_accounts: int = 10_000
    fleet_rounds: int = 5
    fleet_interval: float = 60.0
    fleet_dead_letters: int = 0
    fleet_tls: bool = False
    fleet_per_account: bool = False
    fleet_per_host: int | None = None
    push_messages: int = 200


QUICK: Final = Scale(
    accounts=4,
    per_account=50,
    poison_counts=(0, 5, 20),
    poison_cycles=3,
    idle_accounts=20,
    large_accounts=2,
    large_per_account=1,
    large_size=2 * MIB,
    huge_accounts=2,
    huge_per_account=1,
    huge_size=8 * MIB,
    spool_sizes=(1 * MIB, 8 * MIB),
    spool_per_account=8 * MIB,
    fleet_accounts=200,
    fleet_rounds=4,
    fleet_interval=5.0,
    push_messages=20,
)


@dataclass(frozen=True, slots=True)
class Row:
    """One measured client run."""

    scenario: str
    runner: str
    rep: int
    messages: int
    bytes: int
    wall: float
    cpu: float
    maxrss_mib: float
    receiver_cpu: float
    check: str
    left_upstream: int | None
    rc: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def msg_s(self) -> float:
        return self.messages / self.wall if self.wall > 0 else 0.0

    @property
    def mb_s(self) -> float:
        return self.bytes / MB / self.wall if self.wall > 0 else 0.0


class Receiver:
    """The SMTP receiver process (bench/receiver.py) and its control connection."""

    def __init__(self, log: Path) -> None:
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.receiver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=runners.REPO,
        )
        if self.proc.stdout is None:
            raise RuntimeError("no pipe to the receiver")
        line = self.proc.stdout.readline().decode()
        if not line.startswith("PORTS "):
            self.stop()
            raise RuntimeError(f"receiver did not start: {line!r} {runners.tail(log)}")
        _, smtp, ctl = line.split()
        self.port, self.ctl_port = int(smtp), int(ctl)
        import socket

        self._ctl = socket.create_connection(("127.0.0.1", self.ctl_port), timeout=30)
        self._ctl_file = self._ctl.makefile("rwb")

    def _ask(self, command: bytes) -> bytes:
        self._ctl_file.write(command + b"\n")
        self._ctl_file.flush()
        return self._ctl_file.readline()

    def reset(self) -> None:
        if self._ask(b"RESET").strip() != b"OK":
            raise RuntimeError("receiver did not reset")

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self._ask(b"STATS"))
        return data

    def seen(self) -> Counter[str]:
        return Counter(self.stats()["accepted"])

    def cpu(self) -> float:
        """User + system seconds the receiver has used so far (/proc/PID/stat, fields 14-15)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # the receiver exits at EOF on stdin
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self._log.close()


@dataclass
class Bench:
    """Everything a scenario needs: servers, users, where to write, limits."""

    dovecot: DovecotServer
    receiver: Receiver
    workdir: Path
    cache: Path
    scale: Scale
    reps: int
    parallel: int
    timeout: float | None
    profile: Path | None = None
    runners: tuple[str, ...] = (CONNECTOR, SERVICE_ROUND, FETCHMAIL, MPOP, POP3_PROBE, SMTP_PROBE)
    rows: list[Row] = field(default_factory=list)
    server_cpu: float = 0.0  # Dovecot's CPU seconds during the last measure()
    _runs: int = 0

    @property
    def ends(self) -> Endpoints:
        return Endpoints(pop3_port=self.dovecot.ports["pop3"], smtp_port=self.receiver.port)

    @property
    def mail_root(self) -> Path:
        return self.dovecot.root / "mail"

    def users(self, n: int) -> list[str]:
        return [self.dovecot.add_user()[0] for _ in range(n)]

    def rundir(self, name: str) -> Path:
        self._runs += 1
        d = self.workdir / f"{self._runs:03d}-{name}"
        d.mkdir(parents=True)
        return d

    def limit(self, messages: int, nbytes: int) -> float:
        """The time limit of one client run: generous (fetchmail at its worst), but finite."""
        if self.timeout is not None:
            return self.timeout
        return 60 + 0.06 * messages + 0.1 * nbytes / MB

    def fill(self, users: list[str], boxes: Sequence[Sequence[Message]]) -> None:
        for user, box in zip(users, boxes, strict=True):
            corpus.add_messages(corpus.reset_mailbox(self.mail_root, user), tuple(box))

    def measure(
        self,
        argv: list[str],
        *,
        log: Path,
        limit: float,
        env: dict[str, str] | None = None,
    ) -> tuple[ProcResult, float]:
        """Run one client with a fresh receiver count; (its cost, the receiver's CPU)."""
        self.receiver.reset()
        before, server_before = self.receiver.cpu(), tree_cpu(self.dovecot.proc.pid)
        result = runners.run_measured(argv, timeout=limit, log=log, env=env)
        rx = self.receiver.cpu() - before
        self.server_cpu = tree_cpu(self.dovecot.proc.pid) - server_before
        if result.timed_out:
            print(f"  ! {argv[0]} timed out after {limit:.0f}s; log: {log}", file=sys.stderr)
        return result, rx

    def run_client(
        self,
        runner: str,
        users: list[str],
        workdir: Path,
        limit: float,
        *,
        parallel: int,
        service: Sequence[str] = (),
    ) -> tuple[ProcResult, float, Path | None]:
        """Run pop3-connector, fetchmail or mpop over ``users``; mpop's Maildir is returned.
        ``service``: more ``[service]`` lines for pop3-connector."""
        ends = self.ends
        self._runs += 1
        log = workdir / f"client-{self._runs:04d}.log"
        if runner == CONNECTOR:
            cfg = runners.connector_config(workdir, ends, users, parallel=parallel, service=service)
            res, rx = self.measure(runners.connector_argv(cfg), log=log, limit=limit)
            return res, rx, None
        if runner == FETCHMAIL:
            rc = runners.fetchmail_config(workdir, ends, users)
            env = runners.fetchmail_env(workdir)
            res, rx = self.measure(runners.fetchmail_argv(rc), log=log, limit=limit, env=env)
            return res, rx, None
        if runner == MPOP:
            mrc, target = runners.mpop_config(workdir, ends, users)
            res, rx = self.measure(runners.mpop_argv(mrc), log=log, limit=limit)
            return res, rx, target
        raise ValueError(runner)


def _ok_rc(runner: str, rc: int, delivered: int) -> bool:
    # fetchmail exits 1 when there was no mail (its man page, "EXIT CODES").
    return rc == 0 or (runner == FETCHMAIL and rc == 1 and delivered == 0)


def _note_rc(row: Row) -> Row:
    if not _ok_rc(row.runner, row.rc, row.messages) and row.check == "ok":
        return Row(**{**asdict(row), "check": f"rc={row.rc}"})
    return row


# ------------------------------------------------------------------------------------------
# throughput
# ------------------------------------------------------------------------------------------


def throughput(b: Bench) -> None:
    s = b.scale
    print(f"== throughput: {s.accounts} accounts x {s.per_account} messages", flush=True)
    boxes = corpus.build(CorpusSpec("throughput", s.accounts, s.per_account), b.cache)
    users = b.users(len(boxes))
    msgs = [m for box in boxes for m in box.messages]
    expected = [m.msgid for m in msgs]
    nbytes = sum(m.size for m in msgs)
    limit = b.limit(len(msgs), nbytes)
    print(f"   corpus: {len(msgs)} messages, {nbytes / MB:.0f} MB", flush=True)
    order = tuple(r for r in b.runners if r != SERVICE_ROUND)
    for rep in range(1, b.reps + 1):
        for runner in order:
            wd = b.rundir(f"throughput-{runner}-{rep}")
            if runner != SMTP_PROBE:
                b.fill(users, [box.messages for box in boxes])
            left: int | None
            if runner == POP3_PROBE:
                argv, out = _pop3_probe(b, users, wd)
                res, rx = b.measure(argv, log=wd / "client.log", limit=limit)
                seen = Counter(json.loads(out.read_text())["seen"]) if out.exists() else Counter()
                left = None  # it only reads
            elif runner == SMTP_PROBE:
                argv, out = runners.probe_job(
                    wd,
                    "smtp",
                    {
                        "host": "127.0.0.1",
                        "port": b.receiver.port,
                        "paths": [str(m.path) for m in msgs],
                        "connections": 4,
                    },
                )
                res, rx = b.measure(argv, log=wd / "client.log", limit=limit)
                seen = b.receiver.seen()
                left = None
            else:
                res, rx, target = b.run_client(runner, users, wd, limit, parallel=b.parallel)
                if target is not None:
                    seen = runners.maildir_ids(target)
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    seen = b.receiver.seen()
                left = corpus.left_in(b.mail_root, users)
            row = _note_rc(
                Row(
                    scenario="throughput",
                    runner=runner,
                    rep=rep,
                    messages=len(msgs),
                    bytes=nbytes,
                    wall=res.wall,
                    cpu=res.cpu,
                    maxrss_mib=res.maxrss_mib,
                    receiver_cpu=rx,
                    check=runners.check_once(expected, seen),
                    left_upstream=left,
                    rc=res.rc,
                    extra={"server_cpu": b.server_cpu},
                )
            )
            b.rows.append(row)
            print(
                f"   rep {rep} {runner:<15} {row.wall:7.2f}s {row.msg_s:7.0f} msg/s "
                f"cpu {row.cpu:6.2f}s rss {row.maxrss_mib:6.1f}MiB {row.check}",
                flush=True,
            )
            if row.check != "ok":
                print(f"     log tail: {runners.tail(res.log, 600)}", file=sys.stderr)
    if b.profile is not None:
        _profile(b, users, boxes, limit, b.profile)


def _profile(b: Bench, users: list[str], boxes: list[Mailbox], limit: float, out: Path) -> None:
    """One more pop3-connector run under cProfile; print where its CPU went."""
    import pstats

    wd = b.rundir("throughput-profile")
    b.fill(users, [box.messages for box in boxes])
    cfg = runners.connector_config(wd, b.ends, users, parallel=b.parallel)
    res, _ = b.measure(runners.connector_argv(cfg, out), log=wd / "client.log", limit=limit)
    print(f"   profiled run: {res.wall:.2f}s, cpu {res.cpu:.2f}s (cProfile slows it down)")
    if out.exists():
        stats = pstats.Stats(str(out))
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)


# ------------------------------------------------------------------------------------------
# poison
# ------------------------------------------------------------------------------------------


def poison(b: Bench) -> None:
    s = b.scale
    print(
        f"== poison: {s.poison_accounts} accounts, P = {list(s.poison_counts)} refused each, "
        f"{s.good_per_cycle} new good messages per account per cycle, {s.poison_cycles} cycles",
        flush=True,
    )
    pmax = max(s.poison_counts)
    # Refused mail is spam-like: small text messages.
    bad = corpus.build(
        CorpusSpec("poison", s.poison_accounts, pmax, large_fraction=0.0, prefix="poison"),
        b.cache,
    )
    good = corpus.build(
        CorpusSpec("good", s.poison_accounts, s.good_per_cycle * s.poison_cycles, prefix="good"),
        b.cache,
    )
    users = b.users(s.poison_accounts)
    for rep in range(1, b.reps + 1):
        for p in s.poison_counts:
            for runner in (r for r in (CONNECTOR, FETCHMAIL) if r in b.runners):
                _poison_run(b, runner, rep, p, users, bad, good)


def _poison_run(
    b: Bench,
    runner: str,
    rep: int,
    p: int,
    users: list[str],
    bad: list[Mailbox],
    good: list[Mailbox],
) -> None:
    s = b.scale
    k = s.good_per_cycle
    wd = b.rundir(f"poison-{runner}-P{p}-{rep}")
    mds = [corpus.reset_mailbox(b.mail_root, u) for u in users]
    for md, box in zip(mds, bad, strict=True):
        corpus.add_messages(md, box.messages[:p])
    for cycle in range(1, s.poison_cycles + 1):
        fresh = [box.messages[(cycle - 1) * k : cycle * k] for box in good]
        for md, new in zip(mds, fresh, strict=True):
            corpus.add_messages(md, new)
        expected = [m.msgid for new in fresh for m in new]
        nbytes = sum(m.size for new in fresh for m in new)
        limit = b.limit(len(users) * (p + k), len(users) * (p * 10_000) + nbytes)
        res, rx, _ = b.run_client(runner, users, wd, limit, parallel=b.parallel)
        stats = b.receiver.stats()
        row = _note_rc(
            Row(
                scenario="poison",
                runner=runner,
                rep=rep,
                messages=len(expected),
                bytes=nbytes,
                wall=res.wall,
                cpu=res.cpu,
                maxrss_mib=res.maxrss_mib,
                receiver_cpu=rx,
                check=runners.check_once(expected, Counter(stats["accepted"])),
                left_upstream=corpus.left_in(b.mail_root, users),
                rc=res.rc,
                extra={"P": p, "cycle": cycle, "refused_offered": stats["refused"]},
            )
        )
        b.rows.append(row)
        print(
            f"   rep {rep} {runner:<15} P={p:<5} cycle {cycle}: {row.wall:7.2f}s "
            f"cpu {row.cpu:6.2f}s refused offered {stats['refused']:<5} "
            f"left {row.left_upstream:<5} {row.check}",
            flush=True,
        )


# ------------------------------------------------------------------------------------------
# idle and large
# ------------------------------------------------------------------------------------------


def _pop3_probe(b: Bench, users: list[str], wd: Path) -> tuple[list[str], Path]:
    return runners.probe_job(
        wd,
        "pop3",
        {
            "host": "127.0.0.1",
            "port": b.ends.pop3_port,
            "users": users,
            "password": runners.PASSWORD,
            "window": 32,
        },
    )


def _service_round(
    b: Bench, users: list[str], wd: Path, limit: float
) -> tuple[runners.ProcResult, float]:
    """A started service's second round (bench/service_round.py): wall and CPU of the round,
    not of the process; peak RSS and the exit status of the process."""
    cfg = runners.connector_config(wd, b.ends, users, parallel=b.parallel)
    out = wd / "rounds.json"
    argv = [sys.executable, "-m", "bench.service_round", str(cfg), str(out), "2"]
    res, rx = b.measure(argv, log=wd / "client.log", limit=limit)
    if res.rc == 0 and out.exists():
        last = json.loads(out.read_text())[-1]
        res = replace(res, wall=last["wall"], cpu=last["cpu"])
    return res, rx


def tree_cpu(root: int) -> float:
    """User + system seconds of ``root``'s process tree: its own, its reaped children's
    (cutime, cstime) and every live descendant's (/proc/PID/stat fields 14-17)."""
    parent: dict[int, int] = {}
    times: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        pid = int(stat.parent.name)
        parent[pid] = int(fields[1])
        times[pid] = sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo.extend(p for p, pp in parent.items() if pp == pid and p not in tree)
    return sum(times.get(pid, 0.0) for pid in tree)


def idle(b: Bench) -> None:
    n = b.scale.idle_accounts
    print(f"== idle: {n} accounts with empty mailboxes, one round", flush=True)
    users = b.users(n)
    for u in users:
        corpus.reset_mailbox(b.mail_root, u)
    # An untimed first round: Dovecot writes a mailbox's index and UID list at its first login,
    # once in the life of a mailbox; an idle round on a real server finds them there.  Nobody
    # changes an empty mailbox, so the runners then all meet the same state.
    argv, _ = _pop3_probe(b, users, b.rundir("idle-warmup"))
    warm, _ = b.measure(argv, log=b.workdir / "idle-warmup.log", limit=b.limit(n * 10, 0))
    print(f"   warm-up round (untimed): {warm.wall:.2f}s rc={warm.rc}", flush=True)
    for rep in range(1, b.reps + 1):
        for runner in (
            r for r in (CONNECTOR, SERVICE_ROUND, FETCHMAIL, MPOP, POP3_PROBE) if r in b.runners
        ):
            wd = b.rundir(f"idle-{runner.replace(' ', '-')}-{rep}")
            if runner == POP3_PROBE:
                argv, _ = _pop3_probe(b, users, wd)
                res, rx = b.measure(argv, log=wd / "client.log", limit=b.limit(n * 10, 0))
            elif runner == SERVICE_ROUND:
                res, rx = _service_round(b, users, wd, b.limit(n * 10, 0))
            else:
                res, rx, _ = b.run_client(
                    runner, users, wd, b.limit(n * 10, 0), parallel=b.parallel
                )
            stats = b.receiver.stats()
            check = "ok" if stats["transactions"] == 0 else f"{stats['transactions']} mails?"
            row = _note_rc(
                Row(
                    scenario="idle",
                    runner=runner,
                    rep=rep,
                    messages=0,
                    bytes=0,
                    wall=res.wall,
                    cpu=res.cpu,
                    maxrss_mib=res.maxrss_mib,
                    receiver_cpu=rx,
                    check=check,
                    left_upstream=0,
                    rc=res.rc,
                    # Dovecot's CPU over the whole client run (start-up included): the server's
                    # share of the round, the same for everyone; it bounds the round on 2 cores.
                    extra={
                        "accounts": n,
                        "server_cpu": b.server_cpu,
                    },
                )
            )
            b.rows.append(row)
            print(
                f"   rep {rep} {runner:<15} {row.wall:7.2f}s cpu {row.cpu:6.2f}s "
                f"({row.cpu / n * 1000:.1f} ms/account) {row.check}",
                flush=True,
            )


def large(b: Bench) -> None:
    """8 accounts x three 25 MiB messages, and 8 x one 150 MiB ("huge"), polled in parallel:
    time and peak RSS, pop3-connector against the goal of RSS_GOAL_MIB (its large messages go
    through the spool, docs/design.md §5.3), beside fetchmail and mpop."""
    s = b.scale
    variants = (
        ("large", s.large_accounts, s.large_per_account, s.large_size),
        ("huge", s.huge_accounts, s.huge_per_account, s.huge_size),
    )
    for scenario, accounts, per_account, size in variants:
        print(
            f"== {scenario}: {accounts} accounts x {per_account} messages of "
            f"{size / MIB:.0f} MiB, polled in parallel",
            flush=True,
        )
        spec = CorpusSpec(
            scenario,
            accounts,
            per_account,
            large_fraction=1.0,
            large_size=size,
            prefix=scenario,
        )
        boxes = corpus.build(spec, b.cache)
        users = b.users(len(boxes))
        msgs = [m for box in boxes for m in box.messages]
        nbytes = sum(m.size for m in msgs)
        for rep in range(1, b.reps + 1):
            for runner in (r for r in (CONNECTOR, FETCHMAIL, MPOP) if r in b.runners):
                b.fill(users, [box.messages for box in boxes])
                wd = b.rundir(f"{scenario}-{runner}-{rep}")
                res, rx, target = b.run_client(
                    runner, users, wd, b.limit(len(msgs), nbytes * 20), parallel=accounts
                )
                if target is not None:
                    seen = runners.maildir_ids(target)
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    seen = b.receiver.seen()
                row = _note_rc(
                    Row(
                        scenario=scenario,
                        runner=runner,
                        rep=rep,
                        messages=len(msgs),
                        bytes=nbytes,
                        wall=res.wall,
                        cpu=res.cpu,
                        maxrss_mib=res.maxrss_mib,
                        receiver_cpu=rx,
                        check=runners.check_once([m.msgid for m in msgs], seen),
                        left_upstream=corpus.left_in(b.mail_root, users),
                        rc=res.rc,
                    )
                )
                if runner == CONNECTOR and row.check == "ok" and row.maxrss_mib > RSS_GOAL_MIB:
                    row = Row(**{**asdict(row), "check": f"rss>{RSS_GOAL_MIB}MiB"})
                b.rows.append(row)
                print(
                    f"   rep {rep} {runner:<15} {row.wall:7.2f}s cpu {row.cpu:6.2f}s "
                    f"rss {row.maxrss_mib:6.1f}MiB {row.check}",
                    flush=True,
                )


def spool_scenario(b: Bench) -> None:
    """Where keeping a message in memory stops paying: for each size, the same mail (8
    accounts, ``spool_per_account`` octets each) through pop3-connector three times: every
    message in memory (``spool_threshold`` 1 GiB, so no budget holds it back either), every
    message through the spool (``spool_threshold`` 1), and the default configuration (the
    threshold and the budget as shipped): CPU per GB and peak RSS."""
    s = b.scale
    modes: dict[str, tuple[str, ...]] = {
        "memory": ('spool_threshold = "1GiB"',),
        "spool": ("spool_threshold = 1",),
        "default": (),
    }
    for size in s.spool_sizes:
        per_account = max(2, s.spool_per_account // size)
        print(
            f"== spool: {b.parallel} accounts x {per_account} messages of "
            f"{size / MIB:g} MiB, in memory and through the spool",
            flush=True,
        )
        spec = CorpusSpec(
            f"spool-{size}",
            b.parallel,
            per_account,
            large_fraction=1.0,
            large_size=size,
            prefix=f"spool{size}",
        )
        boxes = corpus.build(spec, b.cache)
        users = b.users(len(boxes))
        msgs = [m for box in boxes for m in box.messages]
        nbytes = sum(m.size for m in msgs)
        for rep in range(1, b.reps + 1):
            for mode, service in modes.items():
                b.fill(users, [box.messages for box in boxes])
                wd = b.rundir(f"spool-{size}-{mode}-{rep}")
                res, rx, _ = b.run_client(
                    CONNECTOR,
                    users,
                    wd,
                    b.limit(len(msgs), nbytes * 20),
                    parallel=b.parallel,
                    service=service,
                )
                row = _note_rc(
                    Row(
                        scenario="spool",
                        runner=f"{CONNECTOR} ({mode})",
                        rep=rep,
                        messages=len(msgs),
                        bytes=nbytes,
                        wall=res.wall,
                        cpu=res.cpu,
                        maxrss_mib=res.maxrss_mib,
                        receiver_cpu=rx,
                        check=runners.check_once([m.msgid for m in msgs], b.receiver.seen()),
                        left_upstream=corpus.left_in(b.mail_root, users),
                        rc=res.rc,
                        extra={"size": size, "mode": mode},
                    )
                )
                b.rows.append(row)
                print(
                    f"   rep {rep} {mode:<6} {row.wall:7.2f}s cpu {row.cpu:6.2f}s "
                    f"({row.cpu / (nbytes / 1e9):.2f} s/GB) rss {row.maxrss_mib:6.1f}MiB "
                    f"{row.check}",
                    flush=True,
                )


def report_spool(rows: list[Row]) -> str:
    rs_all = [r for r in rows if r.scenario == "spool"]
    if not rs_all:
        return ""
    table = []
    for size in dict.fromkeys(r.extra["size"] for r in rs_all):
        cells = [f"{size / MIB:g}"]
        for mode in ("memory", "spool", "default"):
            rs = [r for r in rs_all if r.extra["size"] == size and r.extra["mode"] == mode]
            gb = rs[0].bytes / 1e9
            cells += [
                f"{_med([r.wall for r in rs]):.2f}",
                f"{_med([r.cpu for r in rs]) / gb:.2f}",
                f"{_med([r.maxrss_mib for r in rs]):.0f}",
            ]
        cells.append(_checks([r for r in rs_all if r.extra["size"] == size]))
        table.append(cells)
    head = [
        "message MiB",
        "memory: wall s",
        "CPU s/GB",
        "peak RSS MiB",
        "spool: wall s",
        "CPU s/GB",
        "peak RSS MiB",
        "default: wall s",
        "CPU s/GB",
        "peak RSS MiB",
        "exactly once",
    ]
    return "### spool: in memory or through the spool, by message size (medians)\n\n" + _table(
        head, table
    )


def fleet_scenario(b: Bench) -> None:
    """One ``run`` process over thousands of accounts (bench/fleet.py), one Row per round."""
    s = b.scale
    print(
        f"== fleet: {s.fleet_accounts} accounts, one `run` process, poll_interval "
        f"{s.fleet_interval:g}s, {s.fleet_rounds} rounds; before each but the last, 1 % of the "
        "accounts get 1-3 new messages",
        flush=True,
    )
    opts = fleet.FleetOptions(
        accounts=s.fleet_accounts,
        rounds=max(s.fleet_rounds, fleet.MIN_ROUNDS),
        interval=s.fleet_interval,
        parallel=b.parallel,
        cache=b.cache,
        timeout=b.timeout,
        dead_letters=s.fleet_dead_letters,
        tls=s.fleet_tls,
        per_account=s.fleet_per_account,
        per_host=s.fleet_per_host,
    )
    try:
        res = fleet.run(
            b.dovecot,
            b.receiver,
            b.rundir("fleet"),
            opts,
            dovecot_cpu=lambda: tree_cpu(b.dovecot.proc.pid),
        )
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"  ! fleet: {exc}", file=sys.stderr)
        b.rows.append(Row("fleet", CONNECTOR, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, f"FAIL {exc}", None, -1))
        return
    summary = {k: v for k, v in res.as_dict().items() if k != "rounds"}
    for r in res.rounds:
        last = r.number == len(res.rounds)
        check = res.check if last else ("ok" if r.failed == 0 else f"FAIL {r.failed} failed")
        b.rows.append(
            Row(
                scenario="fleet",
                runner=CONNECTOR,
                rep=r.number,
                messages=r.delivered,
                bytes=0,
                wall=r.wall,
                cpu=r.cpu,
                maxrss_mib=r.peak_rss_mib,
                receiver_cpu=0.0,
                check=check,
                left_upstream=res.left_upstream if last else None,
                rc=(res.rc if res.rc is not None else -1) if last else 0,
                extra={
                    "round": {
                        **{k: v for k, v in asdict(r).items() if k != "starts"},
                        "wall": r.wall,
                    },
                    "run": summary,
                },
            )
        )


# ------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------


def _med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _checks(rows: Sequence[Row]) -> str:
    bad = [r.check for r in rows if r.check != "ok"]
    return "ok" if not bad else "; ".join(sorted(set(bad)))


def report_throughput(rows: list[Row]) -> str:
    tp = [r for r in rows if r.scenario == "throughput"]
    if not tp:
        return ""
    runners_seen = list(dict.fromkeys(r.runner for r in tp))
    out = []
    table = []
    for name in runners_seen:
        rs = [r for r in tp if r.runner == name]
        left = [r.left_upstream for r in rs if r.left_upstream is not None]
        table.append(
            [
                name,
                f"{_med([r.msg_s for r in rs]):,.0f}",
                f"{_med([r.mb_s for r in rs]):.1f}",
                f"{_med([r.wall for r in rs]):.2f}",
                f"{_med([r.cpu for r in rs]):.2f}",
                f"{_med([r.maxrss_mib for r in rs]):.1f}",
                f"{_med([r.receiver_cpu for r in rs]):.2f}",
                f"{_med([r.extra.get('server_cpu', 0.0) for r in rs]):.2f}",
                _checks(rs),
                str(max(left)) if left else "-",
            ]
        )
    first = tp[0]
    out.append(
        f"### throughput: {first.messages} messages, {first.bytes / MB:.0f} MB, "
        f"medians of {max(r.rep for r in tp)} repetitions\n"
    )
    out.append(
        _table(
            [
                "runner",
                "msg/s",
                "MB/s",
                "wall s",
                "CPU s",
                "peak RSS MiB",
                "receiver CPU s",
                "Dovecot CPU s",
                "exactly once",
                "left upstream",
            ],
            table,
        )
    )
    others = [n for n in runners_seen if n != CONNECTOR]
    if CONNECTOR in runners_seen and others:
        ratio_rows = []
        for rep in sorted({r.rep for r in tp}):
            by = {r.runner: r for r in tp if r.rep == rep}
            if CONNECTOR not in by:
                continue
            ours = by[CONNECTOR].msg_s
            ratio_rows.append(
                [str(rep)]
                + [f"{ours / by[n].msg_s:.2f}" if n in by and by[n].msg_s else "-" for n in others]
            )
        out.append("\npop3-connector msg/s divided by each runner's, per repetition:\n")
        out.append(_table(["rep", *others], ratio_rows))
    return "\n".join(out)


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    if len(points) < 2:
        return float("nan")
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else float("nan")


def report_poison(rows: list[Row]) -> str:
    po = [r for r in rows if r.scenario == "poison"]
    if not po:
        return ""
    out = ["### poison: cycle time against P refused messages per account\n"]
    table = []
    summary = []
    for name in dict.fromkeys(r.runner for r in po):
        steady_by_p: dict[int, float] = {}
        for p in sorted({r.extra["P"] for r in po}):
            rs = [r for r in po if r.runner == name and r.extra["P"] == p]
            first = [r for r in rs if r.extra["cycle"] == 1]
            steady = [r for r in rs if r.extra["cycle"] > 1]
            steady_by_p[p] = _med([r.wall for r in steady])
            table.append(
                [
                    name,
                    str(p),
                    f"{_med([r.wall for r in first]):.2f}",
                    f"{steady_by_p[p]:.3f}",
                    f"{_med([r.cpu for r in steady]):.3f}",
                    f"{_med([float(r.extra['refused_offered']) for r in steady]):.0f}",
                    str(max((r.left_upstream or 0) for r in rs)),
                    _checks(rs),
                ]
            )
        ps = sorted(steady_by_p)
        slope = _slope([(float(p), steady_by_p[p]) for p in ps])
        ratio = steady_by_p[ps[-1]] / steady_by_p[ps[0]] if steady_by_p[ps[0]] else float("nan")
        summary.append([name, f"{slope * 1000:.3f}", f"P={ps[-1]} / P={ps[0]}: {ratio:.2f}x"])
    out.append(
        _table(
            [
                "runner",
                "P",
                "first cycle s",
                "steady cycle s (median)",
                "steady CPU s",
                "refused offered per steady cycle",
                "left upstream (max)",
                "good mail exactly once",
            ],
            table,
        )
    )
    out.append("\nSlope of the steady cycle time (ms per refused message per account):\n")
    out.append(_table(["runner", "slope ms/msg", "steady ratio"], summary))
    return "\n".join(out)


def report_simple(rows: list[Row], scenario: str, title: str) -> str:
    rs_all = [r for r in rows if r.scenario == scenario]
    if not rs_all:
        return ""
    table = []
    for name in dict.fromkeys(r.runner for r in rs_all):
        rs = [r for r in rs_all if r.runner == name]
        if scenario == "idle":
            n = rs[0].extra["accounts"]
            table.append(
                [
                    name,
                    f"{_med([r.wall for r in rs]):.2f}",
                    f"{_med([r.wall for r in rs]) / n * 1000:.1f}",
                    f"{_med([r.cpu for r in rs]):.2f}",
                    f"{_med([r.cpu for r in rs]) / n * 1000:.2f}",
                    f"{_med([r.maxrss_mib for r in rs]):.1f}",
                    f"{_med([r.extra.get('server_cpu', 0.0) for r in rs]):.2f}",
                    _checks(rs),
                ]
            )
        else:
            table.append(
                [
                    name,
                    f"{_med([r.wall for r in rs]):.2f}",
                    f"{_med([r.mb_s for r in rs]):.1f}",
                    f"{_med([r.cpu for r in rs]):.2f}",
                    f"{_med([r.maxrss_mib for r in rs]):.1f}",
                    _checks(rs),
                ]
            )
    head = (
        [
            "runner",
            "wall s",
            "wall ms/account",
            "CPU s",
            "CPU ms/account",
            "peak RSS MiB",
            "Dovecot CPU s",
            "check",
        ]
        if scenario == "idle"
        else ["runner", "wall s", "MB/s", "CPU s", "peak RSS MiB", "exactly once"]
    )
    return f"### {title}\n\n" + _table(head, table)


def _scrapes(rnd: dict[str, Any], path: str) -> str:
    """ "idle s (KiB); busy s" for one endpoint path in one round."""
    parts = []
    for busy in (False, True):
        for sc in rnd["scrapes"]:
            if sc["path"] == path and sc["busy"] == busy:
                kib = "" if busy else f" ({sc['size'] / 1024:,.0f} KiB)"
                parts.append(f"{'busy ' if busy else ''}{sc['seconds']:.3f}{kib}")
    return "; ".join(parts) or "-"


def report_fleet(rows: list[Row]) -> str:
    fl = [r for r in rows if r.scenario == "fleet" and "round" in r.extra]
    if not fl:
        bad = [r for r in rows if r.scenario == "fleet"]
        return f"### fleet\n\n{bad[0].check}" if bad else ""
    run: dict[str, Any] = fl[0].extra["run"]
    rounds: list[dict[str, Any]] = [r.extra["round"] for r in fl]
    n, interval = run["accounts"], run["interval"]
    table = []
    for r in rounds:
        led = r["ledger"]
        spread = " ".join(str(c) for c in r["spread"])
        if r["overflow"]:
            spread += f" +{r['overflow']} later"
        table.append(
            [
                str(r["number"])
                + (
                    " (cut short)"
                    if r["partial"]
                    else " (idle)"
                    if r["number"] == run["planned_rounds"]
                    else ""
                ),
                f"{r['cycles']:,} ({r['polls_window']:,})"
                + (f" ({r['failed']} failed)" if r["failed"] else ""),
                f"{r['new_messages']} / {r['delivered']}",
                f"{r['wall']:.1f}",
                f"{r['cpu']:.2f}",
                f"{r['cpu'] / max(r['polls_window'] or r['cycles'], 1) * 1000:.2f}",
                f"{r['dovecot_cpu'] / max(r['polls_window'] or r['cycles'], 1) * 1000:.2f}",
                f"{r['rss_mib']:.0f} ({r['peak_rss_mib']:.0f})",
                f"{led.get('messages', 0):,}",
                f"{(led.get('bytes_db', 0) + led.get('bytes_wal', 0)) / 1024:,.0f}",
                _scrapes(r, "/metrics"),
                _scrapes(r, "/status"),
                spread,
                f"{r['peak_logins_per_s']}",
            ]
        )
    out = [
        f"### fleet: {n:,} accounts, one `run` process, poll_interval {interval:g} s, "
        f"max_parallel_accounts {run['parallel']}, "
        f"max_sessions_per_host {run['per_host']}, "
        f"{'POP3S (implicit TLS)' if run['tls'] else 'plain POP3'}, metrics on "
        f"({'per account' if run['per_account'] else 'totals: per_account = false'})"
        + (f", {run['dead_letters']:,} dead letters in the store" if run["dead_letters"] else "")
        + "\n",
        _table(
            [
                "round",
                "polls (in its CPU window)",
                "new / delivered",
                "wall s",
                "our CPU s",
                "CPU ms/poll",
                "Dovecot CPU ms/login",
                "RSS (peak) MiB",
                "ledger rows",
                "ledger KiB (db+WAL)",
                "/metrics s (size); busy",
                "/status s (size); busy",
                "polls per tenth of the last interval",
                "peak logins/s",
            ],
            table,
        ),
        "",
    ]

    def sec(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} s"

    out.append(
        f"- start-up: READY after {sec(run['ready_s'])} (the `running` line after "
        f"{sec(run['running_line_s'])}), first poll after {sec(run['first_poll_s'])}; "
        f"{run['startup_cpu']:.2f} CPU s and {run['startup_rss_mib']:.0f} MiB at READY"
    )
    between = (
        f"{sec(run['reload_s'])} after round {run['reload_after_round']} (between rounds, "
        f"{run['reload_cpu']:.2f} CPU s)"
        if run["reload_s"] is not None
        else "not reached between rounds"
    )
    out.append(
        f"- reload (SIGHUP, the file unchanged): {sec(run['reload_busy_s'])} to "
        f"`configuration reloaded` in the middle of round 1 (cycles running), {between}; "
        f"accounts it called changed: {run['reload_changed']}"
    )
    # A row is forgotten in the account's next cycle once its message left the mailbox: after
    # a round, at most the messages it delivered; after the idle round, none.
    rows_after = [r["ledger"].get("messages", 0) for r in rounds]
    bounded: bool | None = None
    if rounds[-1]["number"] == run["planned_rounds"] and not rounds[-1]["partial"]:
        bounded = rows_after[-1] == 0 and all(
            n_rows <= r["delivered"] for n_rows, r in zip(rows_after, rounds, strict=True)
        )
    out.append(
        "- ledger growth: rows after each round "
        + " / ".join(f"{n_rows:,}" for n_rows in rows_after)
        + " (at most that round's deliveries, none after the idle round: "
        + ("bounded" if bounded else "not measured" if bounded is None else "NOT bounded")
        + "); file "
        + " / ".join(f"{r['ledger'].get('bytes_db', 0) / 1024:,.0f}" for r in rounds)
        + " KiB"
    )
    series = max(
        (sc.get("series", 0) for r in rounds for sc in r["scrapes"] if sc["path"] == "/metrics"),
        default=0,
    )
    if run.get("warmup_cpu"):
        out.append(
            f"- the floor: the warm-up probe (a minimal asyncio POP3 client, bench/probes.py) "
            f"logged every account in once for {run['warmup_cpu']:.2f} CPU s, its start-up "
            f"included: {run['warmup_cpu'] / max(n, 1) * 1000:.2f} ms per login"
        )
    out.append(f"- /metrics: {series:,} series ({series / max(n, 1):.1f} per account)")
    out.append(
        f"- stop: SIGTERM to exit {sec(run['stop_s'])}, rc {run['rc']}; Dovecot logged "
        f"{run['dovecot_logins']:,} logins for {sum(r['cycles'] for r in rounds):,} polls"
    )
    out.append(
        f"- exactly once: {run['check']} ({run['expected']} messages), left upstream "
        f"{run['left_upstream']}; log lines at WARNING or above: {len(run['warnings'])}"
        + (f" (first: {run['warnings'][0][:160]})" if run["warnings"] else "")
    )
    last = rounds[-1]
    idle_ms = last["cpu"] / max(last["polls_window"] or last["cycles"], 1) * 1000
    reached = last["number"] == run["planned_rounds"] and not last["partial"]
    idle_what = "" if reached else f" (idle round not reached; round {last['number']}'s)"
    peak = max(r["peak_rss_mib"] for r in rounds)
    worst = {
        path: max(
            (sc["seconds"] for r in rounds for sc in r["scrapes"] if sc["path"] == path),
            default=float("nan"),
        )
        for path in ("/metrics", "/status")
    }

    def goal(ok: bool | None) -> str:
        return "not measured" if ok is None else "met" if ok else "MISSED"

    start = run["ready_s"]
    reloads = [v for v in (run["reload_s"], run["reload_busy_s"]) if v is not None]
    reload_s = max(reloads) if reloads else None
    out.append(
        "- goals: our CPU per idle poll < 0.5 ms: "
        f"{idle_ms:.2f} ms{idle_what} {goal(idle_ms < 0.5)}; RSS < 150 MiB: {peak:.0f} "
        f"{goal(peak < 150)}; ledger growth bounded: {goal(bounded)}; /metrics < 1 s: "
        f"{worst['/metrics']:.2f} {goal(worst['/metrics'] < 1)}; /status < 1 s: "
        f"{worst['/status']:.2f} {goal(worst['/status'] < 1)}; start < 2 s: {sec(start)} "
        f"{goal(start is not None and start < 2)}; reload < 2 s: {sec(reload_s)} "
        f"{goal(reload_s is not None and reload_s < 2)}"
    )
    return "\n".join(out)


def report(rows: list[Row], scale: Scale, parallel: int, dovecot: str) -> str:
    parts = [
        report_throughput(rows),
        report_poison(rows),
        report_simple(
            rows, "idle", f"idle: {scale.idle_accounts} empty accounts, one round (medians)"
        ),
        report_simple(
            rows,
            "large",
            f"large: {scale.large_accounts} accounts x {scale.large_per_account} messages of "
            f"{scale.large_size / MIB:.0f} MiB (medians); pop3-connector RSS goal: "
            f"{RSS_GOAL_MIB} MiB",
        ),
        report_simple(
            rows,
            "huge",
            f"huge: {scale.huge_accounts} accounts x {scale.huge_per_account} messages of "
            f"{scale.huge_size / MIB:.0f} MiB (medians); pop3-connector RSS goal: "
            f"{RSS_GOAL_MIB} MiB",
        ),
        report_spool(rows),
        report_fleet(rows),
        push.report_push(rows),
    ]
    head = (
        f"pop3-connector max_parallel_accounts = {parallel} (large: one per account); "
        f"Dovecot: {dovecot} login settings\n"
    )
    return head + "\n\n".join(p for p in parts if p)


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small corpus, 1 repetition (< 1 min)")
    p.add_argument(
        "--only",
        choices=SCENARIOS + ON_REQUEST,
        action="append",
        help="run only this scenario (repeatable); fleet and push run only when named here",
    )
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3; quick: 1)")
    p.add_argument("--json", metavar="FILE", help="write the raw results here")
    p.add_argument(
        "--parallel",
        type=int,
        default=8,
        help="pop3-connector's max_parallel_accounts (default 8, the product's default)",
    )
    p.add_argument(
        "--runner",
        action="append",
        choices=(CONNECTOR, SERVICE_ROUND, FETCHMAIL, MPOP, POP3_PROBE, SMTP_PROBE),
        help="run only this runner (repeatable; default: all); for quick A/B runs of one",
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds per client run")
    p.add_argument(
        "--cache",
        default="/var/tmp/pop3-connector-bench",  # noqa: S108 - a cache, not a secret
        help="where the generated corpus is kept between runs",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument(
        "--dovecot",
        choices=("tuned", "stock"),
        default="tuned",
        help="Dovecot's login settings: tuned (high-performance mode, the default) or stock "
        "(a new process per login, as tests/ run it)",
    )
    p.add_argument(
        "--profile",
        metavar="FILE",
        help="throughput: one more pop3-connector run under cProfile, stats written here",
    )
    p.add_argument(
        "--fleet-accounts", type=int, help="fleet: accounts (default 10,000; quick: 200)"
    )
    p.add_argument("--fleet-rounds", type=int, help="fleet: rounds, at least 4 (default 5)")
    p.add_argument(
        "--fleet-interval",
        type=float,
        help="fleet: poll_interval in seconds (default 60; quick: 5); longer than a round",
    )
    p.add_argument(
        "--fleet-dead-letters",
        type=int,
        help="fleet: dead letters in the store at start, spread over the accounts (default 0)",
    )
    p.add_argument(
        "--fleet-per-account",
        action="store_true",
        help="fleet: [metrics] per_account = true (default: false, the totals, as for providers)",
    )
    p.add_argument(
        "--fleet-per-host",
        type=int,
        help="fleet: [service] max_sessions_per_host (default: --parallel; one Dovecot host)",
    )
    p.add_argument(
        "--fleet-tls",
        action="store_true",
        help="fleet: the accounts on POP3S (implicit TLS) instead of plain POP3",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen scenarios and print the tables; 0 when every check passed."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root (Dovecot's mail files belong to nobody)", file=sys.stderr)
        return 1
    for tool in ("fetchmail", "mpop", "dovecot"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is missing; bench/run installs it", file=sys.stderr)
            return 1
    scale = QUICK if args.quick else Scale()
    fleet_args = {
        "fleet_accounts": args.fleet_accounts,
        "fleet_rounds": args.fleet_rounds,
        "fleet_interval": args.fleet_interval,
        "fleet_dead_letters": args.fleet_dead_letters,
        "fleet_tls": args.fleet_tls or None,
        "fleet_per_account": args.fleet_per_account or None,
        "fleet_per_host": args.fleet_per_host,
    }
    scale = replace(scale, **{k: v for k, v in fleet_args.items() if v is not None})
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    chosen = args.only or list(SCENARIOS)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    # Client state (mpop's Maildir, the connector's ledger and dead letters) goes to tmpfs
    # when there is one: the receiver keeps nothing on disk either, and on a disk mounted with
    # online discard, deleting 480 MB of mpop's files took minutes.
    shm = Path("/dev/shm")  # noqa: S108 - mkdtemp makes a private directory in it
    workdir = Path(tempfile.mkdtemp(prefix="pop3-bench-", dir=shm if shm.is_dir() else None))
    started = time.monotonic()
    dovecot = start_dovecot(
        tuned_dovecot_conf(os.cpu_count() or 1) if args.dovecot == "tuned" else ""
    )
    receiver: Receiver | None = None
    bench: Bench | None = None
    try:
        receiver = Receiver(workdir / "receiver.log")
        bench = Bench(
            dovecot=dovecot,
            receiver=receiver,
            workdir=workdir,
            cache=cache,
            scale=scale,
            reps=reps,
            parallel=args.parallel,
            timeout=args.timeout,
            profile=Path(args.profile) if args.profile else None,
            runners=tuple(args.runner) if args.runner else Bench.runners,
        )
        steps: dict[str, Callable[[Bench], None]] = {
            "throughput": throughput,
            "poison": poison,
            "idle": idle,
            "large": large,
            "fleet": fleet_scenario,
            "spool": spool_scenario,
            push.PUSH: lambda b: push.push(b, b.scale.push_messages),
        }
        for name in SCENARIOS + ON_REQUEST:
            if name in chosen:
                steps[name](bench)
    finally:
        if receiver is not None:
            receiver.stop()
        stop_dovecot(dovecot)
        if bench is not None and args.json:
            Path(args.json).write_text(
                json.dumps(
                    [{**asdict(r), "msg_s": r.msg_s, "mb_s": r.mb_s} for r in bench.rows],
                    indent=1,
                )
            )
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(report(bench.rows, scale, args.parallel, args.dovecot))
    print(
        f"\n(total {time.monotonic() - started:.0f} s; work dir {workdir}"
        f"{'' if args.keep else ', removed'})"
    )
    return 0 if all(r.check == "ok" for r in bench.rows) else 1
