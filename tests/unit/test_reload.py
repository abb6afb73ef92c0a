"""Service.apply_runtime (SIGHUP): accounts added, removed after their cycle, changed in place."""

from __future__ import annotations

from pathlib import Path

from connector.config import load_settings
from connector.ledger import Ledger
from connector.metrics import Metrics
from connector.service import Runtime, Service, build_runtime


def runtime(tmp_path: Path, accounts: dict[str, str], parallel: int = 8) -> Runtime:
    blocks = "".join(
        f"""
[[accounts]]
name = "{name}"
host = "{host}"
tls = "none"
username = "u"
password = "p"
deliver_to = ["{name}@firma.test"]
"""
        for name, host in accounts.items()
    )
    config = tmp_path / "config.toml"
    config.write_text(
        f'[service]\nstate_dir = "{tmp_path}"\nmax_parallel_accounts = {parallel}\n'
        f'[smtp]\nhost = "127.0.0.1"\ntls = "none"\nhelo_name = "c.test"\n{blocks}'
    )
    config.chmod(0o600)
    return build_runtime(load_settings(config))


async def test_apply_runtime_adds_removes_and_changes(tmp_path: Path) -> None:
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3")
    try:
        metrics = Metrics()
        service = Service(
            runtime(tmp_path, {"info": "a.test", "old": "b.test"}), ledger, metrics=metrics
        )
        info, old = service.accounts["info"], service.accounts["old"]
        info.failing = True
        service.apply_runtime(runtime(tmp_path, {"info": "c.test", "new": "d.test"}, 2))

        assert list(service.accounts) == ["info", "new"]
        assert old.removed  # its loop ends after the cycle in flight
        assert old.poll_now.is_set()  # woken, so it does not sleep out its interval first
        assert service.accounts["info"] is info  # same state: failures, lock, last result kept
        assert info.spec.endpoint.host == "c.test"
        assert info.poll_now.is_set()  # failing and changed: the change may be the fix
        assert not service.accounts["new"].removed
        assert service.runtime.max_parallel == 2
        get = metrics.registry.get_sample_value
        assert get("pop3_connector_dead_letters", {"account": "new"}) == 0
        assert get("pop3_connector_dead_letters", {"account": "old"}) is None

        # Re-added while its old cycle might still run: the same lock, never two cycles at once.
        service.apply_runtime(runtime(tmp_path, {"info": "c.test", "old": "b.test"}))
        assert service.accounts["old"] is not old
        assert service.accounts["old"].lock is old.lock
        unchanged = service.accounts["info"]
        unchanged.poll_now.clear()
        service.apply_runtime(runtime(tmp_path, {"info": "c.test", "old": "b.test"}))
        assert service.accounts["info"] is unchanged
        assert not unchanged.poll_now.is_set()
    finally:
        await ledger.close()
