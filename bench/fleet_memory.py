"""Where a ``run`` process's memory goes, per account: what it builds, one step at a time.

No servers and no network: a config of N accounts (plain POP3, or POP3S with ``--tls``) is
loaded and built as ``pop3-connector run`` does, and VmRSS and the CPU time are read after each
step (the fleet scenario measures the running process as a whole; this says which part is
which):

    python -m bench.fleet_memory 10000 [--tls] [--reloads K] [--per-account]

Steps: the imports; ``load_settings``; ``build_runtime``; the settings let go (``run`` keeps
only the runtime); ``open_service`` with ``Metrics(per_account=...)`` (with per-account series,
``Metrics.set_accounts`` creates every account's); one finished cycle's metrics per account (the
gauges first set then); every account on the scheduler's plan (``Service.schedule_all``, as
``serve`` starts); rendering ``/metrics`` once; then K reloads of the unchanged file as SIGHUP
does them (``load_settings`` and ``build_runtime``, then ``Service.apply_runtime``).
"""

from __future__ import annotations

import asyncio
import gc
import sys
import tempfile
import time
from pathlib import Path

from bench.runners import PASSWORD


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _config(root: Path, accounts: int, tls: bool) -> Path:
    pop3 = ["port = 995", 'tls = "implicit"'] if tls else ["port = 110", 'tls = "none"']
    lines = [
        "[service]",
        f'state_dir = "{root / "state"}"',
        "poll_interval = 300",
        "",
        "[metrics]",
        'listen = ""',
        "",
        "[smtp]",
        'host = "127.0.0.1"',
        "port = 2525",
        'tls = "none"',
        'helo_name = "connector.bench.example"',
        "",
    ]
    for i in range(accounts):
        lines += [
            "[[accounts]]",
            f'name = "fleet{i:05d}"',
            'host = "127.0.0.1"',
            *pop3,
            f'username = "fleet{i:05d}"',
            f'password = "{PASSWORD}"',
            'deliver_to = ["bench@example.test"]',
            "",
        ]
    (root / "state").mkdir()
    path = root / "config.toml"
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return path


class Steps:
    """VmRSS and CPU seconds after each step."""

    def __init__(self, accounts: int) -> None:
        self.accounts = accounts
        self.rows: list[tuple[str, float, float]] = []
        self._rss = 0.0
        self._cpu = time.process_time()

    def mark(self, name: str) -> None:
        gc.collect()
        rss, cpu = _rss_mib(), time.process_time()
        self.rows.append((name, rss, cpu - self._cpu))
        self._rss, self._cpu = rss, cpu

    def print(self) -> None:
        before = 0.0
        for name, rss, cpu in self.rows:
            grew = rss - before
            per = grew * 1024 / self.accounts
            print(
                f"{name:<46} RSS {rss:7.1f} MiB  +{grew:6.1f} MiB  "
                f"{per:6.1f} KiB/account  CPU {cpu:6.2f} s"
            )
            before = rss


async def _service_steps(config: Path, steps: Steps, reloads: int, per_account: bool) -> None:
    from connector.config import load_settings
    from connector.cycle import CycleStats
    from connector.metrics import Metrics
    from connector.runtime import build_runtime
    from connector.service import open_service

    settings = load_settings(config)
    steps.mark("load_settings")
    runtime = build_runtime(settings)
    steps.mark("build_runtime")
    del settings
    steps.mark("the settings let go")
    metrics = Metrics(per_account=per_account)
    async with open_service(runtime, metrics=metrics) as service:
        steps.mark(f"open_service + Metrics(per_account={per_account})")
        now = time.time()
        for name in service.accounts:
            stats = CycleStats(mailbox_known=True)
            metrics.cycle(name, ok=True, duration=0.01, stats=stats, finished=now, failing=False)
        steps.mark("one finished cycle's metrics per account")
        service.schedule_all()
        await asyncio.sleep(0.1)
        steps.mark("every account on the plan (schedule_all)")
        body = service.metrics_text()
        steps.mark(f"render /metrics ({len(body) / 1e6:.2f} MB)")
        del body
        for k in range(1, reloads + 1):
            new = await asyncio.to_thread(lambda: build_runtime(load_settings(config)))
            service.apply_runtime(new)
            del new
            steps.mark(f"reload {k}")


def main(argv: list[str]) -> int:
    accounts = int(argv[0]) if argv else 10_000
    tls = "--tls" in argv
    reloads = int(argv[argv.index("--reloads") + 1]) if "--reloads" in argv else 0
    per_account = "--per-account" in argv
    steps = Steps(accounts)
    # What `run` has imported by the time it serves (the service, the metrics, pydantic).
    import connector.cli
    import connector.config
    import connector.metrics
    import connector.service  # noqa: F401

    steps.mark("imports")
    with tempfile.TemporaryDirectory(prefix="fleet-memory-") as tmp:
        config = _config(Path(tmp), accounts, tls)
        asyncio.run(_service_steps(config, steps, reloads, per_account))
    print(
        f"{accounts} accounts, {'POP3S' if tls else 'plain POP3'}, "
        f"per_account = {'true' if per_account else 'false'}"
    )
    steps.print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
