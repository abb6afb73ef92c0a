"""Sharded replicas without a cluster (docs/design.md §14.2, deploy/kubernetes/README.md).

Three ``pop3-connector run --shard k/3`` processes over one config of 300 accounts on the
private Dovecot, each with its own state directory (a StatefulSet's volumes), delivering to one
SMTP sink: every account is polled by exactly one replica (the one its name hashes to; Dovecot's
log shows each account's logins, the replicas' logs whose they were), and every message is
delivered exactly once.  Then the resharding procedure of deploy/kubernetes/README.md from 3 to
4 replicas, with its own commands (``check --shard`` for the plan, ``ledger export`` from the
old owners, ``ledger import`` into the new ones), and four ``run --shard j/4`` processes: the
accounts that moved, ``leave_on_server`` ones among them, deliver only what is new.

Rounds are started by the replicas themselves (every account polls when ``run`` starts, one
after another: the start ramp of docs/design.md §10.2, at most one login a second on the one
host) and by SIGUSR1 (every account polls now); a round is over when each replica has logged a
cycle of each of its accounts.  ``run`` is used throughout, not ``once``: the point is the service
honouring its shard, at start and on SIGUSR1.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from connector.cli import main
from connector.schedule import START_SPACING
from tests.servers import USER_PASSWORD, DovecotServer, SmtpSink

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ACCOUNTS = 300
KEEP_EVERY = 5  # every fifth account keeps its mail upstream (leave_on_server)
ROUND_DEADLINE = 90.0
_CYCLE = re.compile(r"account=(\S+) cycle (ok|failed)")
_LOGIN = re.compile(rb"pop3-login: Info: Login: user=<([^>]+)>")
_MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>", re.MULTILINE | re.IGNORECASE)


@dataclass
class Replica:
    """One ``run --shard k/N`` process, as a StatefulSet pod with its own volume."""

    shard: str
    state: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def cycles(self) -> Counter[str]:
        text = self.log.read_text(errors="replace")
        return Counter(m[1] for m in _CYCLE.finditer(text) if m[2] == "ok")

    def failures(self) -> list[str]:
        text = self.log.read_text(errors="replace")
        return [m[1] for m in _CYCLE.finditer(text) if m[2] == "failed"]


@dataclass
class Fleet:
    dovecot: DovecotServer
    sink: SmtpSink
    users: list[str]
    config: Path
    root: Path
    sent: list[str] = field(default_factory=list)  # every Message-ID put into a mailbox

    def env(self, state: Path) -> dict[str, str]:
        # The replicas share the config (a ConfigMap); each has its own state directory.
        return {**os.environ, "POP3_CONNECTOR_SERVICE__STATE_DIR": str(state)}

    def deliver_round(self, tag: str) -> None:
        """One new message in every mailbox, written into its Maildir (no doveadm per user)."""
        for user in self.users:
            msgid = f"{user}-{tag}@shard.test"
            raw = (
                f"From: x@outside.example\r\nTo: {user}@firma.test\r\nSubject: {tag}\r\n"
                f"Message-ID: <{msgid}>\r\n\r\nround {tag}\r\n"
            ).encode()
            md = self.dovecot.root / "mail" / user / "Maildir"
            name = f"{time.time_ns()}.{tag}.shard"
            tmp = md / "tmp" / name
            tmp.write_bytes(raw)
            shutil.chown(tmp, "nobody", "nogroup")
            tmp.rename(md / "new" / name)
            self.sent.append(msgid)

    def start(self, k: int, n: int) -> Replica:
        state = self.root / f"state-{k}"
        log = self.root / f"replica-{k}-of-{n}.log"
        argv = [sys.executable, "-m", "connector", "--config", str(self.config)]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*argv, "run", "--shard", f"{k}/{n}"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(state),
            )
        return Replica(f"{k}/{n}", state, log, proc)

    def upstream(self, user: str) -> int:
        return len(self.dovecot.maildir_files(user))

    def received(self) -> Counter[str]:
        return Counter(
            m[1].decode() for r in self.sink.received for m in [_MESSAGE_ID.search(r.data)] if m
        )

    def cli(self, capsys: pytest.CaptureFixture[str], state: Path, *args: str) -> str:
        """A command in this process, on a replica's state directory; its standard output."""
        os.environ["POP3_CONNECTOR_SERVICE__STATE_DIR"] = str(state)
        try:
            capsys.readouterr()
            assert main(["--config", str(self.config), *args]) == 0, capsys.readouterr().err
            return capsys.readouterr().out
        finally:
            del os.environ["POP3_CONNECTOR_SERVICE__STATE_DIR"]


def _wait(what: str, done: Callable[[], bool], replicas: list[Replica], extra: float = 0.0) -> None:
    deadline = time.monotonic() + ROUND_DEADLINE + extra
    while not done():
        for r in replicas:
            if r.proc.poll() is not None:
                raise AssertionError(f"replica {r.shard} exited: {r.log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {ROUND_DEADLINE + extra:.0f} s")
        time.sleep(0.05)


def rounds(replicas: list[Replica], owned: dict[str, list[str]], count: int) -> None:
    """Until each replica has logged ``count`` good cycles of each of its accounts.  The first
    round also waits out the start ramp: one account a second on the one Dovecot host."""

    def done() -> bool:
        for r in replicas:
            cycles = r.cycles()
            if any(cycles[name] < count for name in owned[r.shard]):
                return False
        return True

    ramp = max(len(names) for names in owned.values()) * START_SPACING if count == 1 else 0.0
    _wait(f"round {count}", done, replicas, ramp)


def stop(replicas: list[Replica]) -> None:
    for r in replicas:
        r.proc.send_signal(signal.SIGTERM)
    for r in replicas:
        assert r.proc.wait(timeout=60) == 0, r.log.read_text()[-3000:]


def logins(dovecot: DovecotServer, offset: int) -> Counter[str]:
    with (dovecot.root / "dovecot.log").open("rb") as f:
        f.seek(offset)
        return Counter(m[1].decode() for m in _LOGIN.finditer(f.read()))


def check_round_trip(
    fleet: Fleet, replicas: list[Replica], owned: dict[str, list[str]], offset: int
) -> None:
    """Each account polled by its owner only, and Dovecot saw exactly those logins."""
    by_replica = {r.shard: r.cycles() for r in replicas}
    for r in replicas:
        assert r.failures() == []
        assert set(by_replica[r.shard]) == set(owned[r.shard]), f"{r.shard} polled others"
    polled = Counter[str]()
    for cycles in by_replica.values():
        polled.update(cycles)
    assert set(polled) == set(fleet.users)
    # Dovecot's log process writes a moment after the session: wait for the counts to agree.
    ours = set(fleet.users)
    _wait(
        "Dovecot's log of the logins",
        lambda: (
            Counter({u: n for u, n in logins(fleet.dovecot, offset).items() if u in ours}) == polled
        ),
        [],
    )


def plan(fleet: Fleet, capsys: pytest.CaptureFixture[str], n: int) -> dict[str, str]:
    """Account -> the shard k/n that owns it, as ``check --shard k/n`` lists them."""
    owner: dict[str, str] = {}
    for k in range(n):
        out = fleet.cli(capsys, fleet.root / "unused", "check", "--shard", f"{k}/{n}")
        for line in out.splitlines():
            if line.startswith("#   "):
                owner[line[4:]] = f"{k}/{n}"
    assert sorted(owner) == sorted(fleet.users)
    return owner


def by_owner(owner: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, shard in owner.items():
        out.setdefault(shard, []).append(name)
    return out


@pytest.fixture
def fleet(dovecot: DovecotServer, tmp_path: Path) -> Iterator[Fleet]:
    token = secrets.token_hex(3)
    users = [f"shard{token}n{i:03d}" for i in range(ACCOUNTS)]
    # One append to the passwd-file: Dovecot reads it again when its size changes.
    with (dovecot.root / "users").open("a") as f:
        f.writelines(f"{u}:{{PLAIN}}{USER_PASSWORD}::::::\n" for u in users)
    for user in users:
        home = dovecot.root / "mail" / user
        for sub in ("cur", "new", "tmp"):
            (home / "Maildir" / sub).mkdir(parents=True)
        for p in (home, home / "Maildir", *(home / "Maildir" / s for s in ("cur", "new", "tmp"))):
            shutil.chown(p, "nobody", "nogroup")
    sink = SmtpSink().start()
    blocks = "".join(
        f"""
[[accounts]]
name = "{user}"
host = "127.0.0.1"
port = {dovecot.ports["pop3"]}
tls = "none"
username = "{user}"
password = "{USER_PASSWORD}"
deliver_to = ["{user}@firma.local"]
leave_on_server = {"true" if i % KEEP_EVERY == 0 else "false"}
"""
        for i, user in enumerate(users)
    )
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[service]
state_dir = "{tmp_path / "unused"}"
poll_interval = "1h"
log_level = "info"
[metrics]
listen = ""
[smtp]
host = "127.0.0.1"
port = {sink.port}
tls = "none"
helo_name = "connector.shard.test"
{blocks}"""
    )
    config.chmod(0o600)
    try:
        yield Fleet(dovecot, sink, users, config, tmp_path)
    finally:
        sink.stop()


def test_three_replicas_then_four_deliver_everything_once(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    keep = {u for i, u in enumerate(fleet.users) if i % KEEP_EVERY == 0}
    owner3 = plan(fleet, capsys, 3)
    owned3 = by_owner(owner3)
    assert sorted(owned3) == ["0/3", "1/3", "2/3"]
    assert all(len(names) > ACCOUNTS / 3 * 0.7 for names in owned3.values())

    # -- three replicas, two rounds ---------------------------------------------------------
    fleet.deliver_round("a1")
    fleet.deliver_round("a2")
    offset = (fleet.dovecot.root / "dovecot.log").stat().st_size
    replicas = [fleet.start(k, 3) for k in range(3)]
    try:
        rounds(replicas, owned3, 1)  # every account polls when run starts (ramped)
        fleet.deliver_round("a3")
        for r in replicas:
            r.proc.send_signal(signal.SIGUSR1)
        rounds(replicas, owned3, 2)
    finally:
        stop(replicas)
    for r in replicas:
        mine = len(owned3[r.shard])
        assert f"shard {r.shard}: polling {mine} of the {ACCOUNTS} enabled accounts" in (
            r.log.read_text()
        )
    check_round_trip(fleet, replicas, owned3, offset)
    assert fleet.received() == Counter(fleet.sent)  # each message once, none lost
    assert {u: fleet.upstream(u) for u in fleet.users} == {
        u: 3 if u in keep else 0 for u in fleet.users
    }

    # -- resharding 3 -> 4, as deploy/kubernetes/README.md says ------------------------------
    owner4 = plan(fleet, capsys, 4)  # 1. plan (the replicas are stopped: 2.)
    owned4 = by_owner(owner4)
    moving = {name for name in fleet.users if owner3[name][0] != owner4[name][0]}
    assert moving  # jump hash: only to the new shard
    assert all(owner4[name] == "3/4" for name in moving)
    assert moving & keep, "no leave_on_server account moves: the test would prove nothing"
    files: list[tuple[str, Path]] = []
    for old, names in by_owner({n: owner3[n] for n in moving}).items():
        for new, group in by_owner({n: owner4[n] for n in names}).items():
            accounts = [a for name in sorted(group) for a in ("--account", name)]
            k = int(old.split("/")[0])
            state = fleet.root / f"state-{k}"
            text = fleet.cli(capsys, state, "ledger", "export", "--shard", old, *accounts)  # 3.
            file = fleet.root / f"{old.replace('/', 'of')}-to-{new.replace('/', 'of')}.ledger"
            file.write_text(text)
            files.append((new, file))
    for new, file in files:  # 4.
        j = int(new.split("/")[0])
        out = fleet.cli(capsys, fleet.root / f"state-{j}", "ledger", "import", "--shard", new,
                        str(file))  # fmt: skip
        assert "row(s) imported" in out

    # -- four replicas (5.): only what is new is delivered ------------------------------------
    fleet.deliver_round("b1")
    offset = (fleet.dovecot.root / "dovecot.log").stat().st_size
    before = fleet.sink.handler.transactions
    replicas = [fleet.start(j, 4) for j in range(4)]
    try:
        rounds(replicas, owned4, 1)
    finally:
        stop(replicas)
    check_round_trip(fleet, replicas, owned4, offset)
    assert fleet.sink.handler.transactions - before == ACCOUNTS  # one new message each
    assert fleet.received() == Counter(fleet.sent)
    assert {u: fleet.upstream(u) for u in fleet.users} == {
        u: 4 if u in keep else 0 for u in fleet.users
    }
