"""connector.metrics: the names, types and labels of docs/design.md §11.1, on our own registry."""

from __future__ import annotations

import itertools

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from connector.cycle import CycleStats, Outcome
from connector.metrics import CYCLE_BUCKETS, NO_CODE, Metrics, smtp_code

# docs/design.md §11.1, as the parser names the families (counters without their _total suffix).
EXPECTED = {
    "pop3_connector_cycle_duration_seconds": "histogram",
    "pop3_connector_cycles": "counter",
    "pop3_connector_messages": "counter",
    "pop3_connector_delivered_bytes": "counter",
    "pop3_connector_mailbox_messages": "gauge",
    "pop3_connector_mailbox_bytes": "gauge",
    "pop3_connector_deferred_messages": "gauge",
    "pop3_connector_dead_letters": "gauge",
    "pop3_connector_last_success_timestamp_seconds": "gauge",
    "pop3_connector_account_failing": "gauge",
    "pop3_connector_smtp_responses": "counter",
    "pop3_connector_build_info": "gauge",
    "pop3_connector_smtp_data_timeouts": "counter",
    "pop3_connector_ledger_writable": "gauge",
    # The counts of accounts, in both modes (per_account on or off).
    "pop3_connector_accounts": "gauge",
    "pop3_connector_accounts_failing": "gauge",
    "pop3_connector_oldest_last_success_timestamp_seconds": "gauge",
    "pop3_connector_host_pauses": "counter",
    "pop3_connector_idle_connected": "gauge",
    "pop3_connector_account_info": "gauge",
}
# Without per_account: the same families less the four that are about one account each.
PER_ACCOUNT_ONLY = {
    "pop3_connector_last_success_timestamp_seconds",
    "pop3_connector_account_failing",
    "pop3_connector_account_info",
    "pop3_connector_idle_connected",
}


def families(metrics: Metrics) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(metrics.render().decode())}


def test_every_metric_of_the_contract_with_its_type() -> None:
    m = Metrics(version="1.2.3")
    m.set_accounts(["info"])
    m.cycle("info", ok=True, duration=0.2, stats=CycleStats(mailbox_known=True), finished=5.0,
            failing=False)  # fmt: skip
    assert families(m) == EXPECTED
    assert m.registry.get_sample_value("pop3_connector_build_info", {"version": "1.2.3"}) == 1


def test_our_own_registry_not_the_global_one() -> None:
    Metrics()
    Metrics()  # a second set on the same names would raise on a shared registry
    names = {name for metric in REGISTRY.collect() for name in [metric.name]}
    assert not any(n.startswith("pop3_connector_") for n in names)


def test_series_exist_at_zero_for_each_account() -> None:
    m = Metrics()
    m.set_accounts(["info", "sales"])
    get = m.registry.get_sample_value
    for account in ("info", "sales"):
        for outcome in ("delivered", "dead_lettered", "deferred", "skipped", "removed"):
            labels = {"account": account, "outcome": outcome}
            assert get("pop3_connector_messages_total", labels) == 0
        for result in ("ok", "failed"):
            labels = {"account": account, "result": result}
            assert get("pop3_connector_cycles_total", labels) == 0
        assert get("pop3_connector_cycle_duration_seconds_count", {"account": account}) == 0


@pytest.mark.parametrize(
    ("response", "code"),
    [
        ("250 2.0.0 OK queued", "250"),
        ("250 OK (refused: b@x: 550 5.1.1 unknown)", "250"),
        ("data: 554 5.1.0 Sender denied", "554"),
        ("size: 552 5.3.4 message of 9 octets exceeds the server's SIZE limit of 5", "552"),
        ("expired: 451 4.3.0 Try later", "451"),
        ("451 4.7.1 Greylisted", "451"),
        ("421", "421"),
        ("timed out waiting for the server", NO_CODE),
        ("connection lost", NO_CODE),
        ("data: connection lost", NO_CODE),
        ("2500 nonsense", NO_CODE),
        ("", NO_CODE),
    ],
)
def test_smtp_code_is_a_bounded_label(response: str, code: str) -> None:
    assert smtp_code(response) == code


def test_message_counts_outcomes_and_final_codes_never_uidls() -> None:
    m = Metrics()
    m.set_accounts(["info"])
    m.message("info", "UID-1", 10, Outcome.DELIVERED, "250 2.0.0 OK")
    m.message("info", "UID-2", 10, Outcome.DEAD_LETTERED, "data: 554 5.1.0 Sender denied")
    m.message("info", "UID-3", 10, Outcome.DEFERRED, "timed out waiting for the server")
    m.message("info", "UID-4", 10, Outcome.SKIPPED, "250 2.0.0 OK")  # no SMTP this cycle
    m.message("info", "UID-5", 10, Outcome.REMOVED, "250 2.0.0 OK")  # neither
    get = m.registry.get_sample_value
    for outcome in ("delivered", "dead_lettered", "deferred", "skipped", "removed"):
        assert get("pop3_connector_messages_total", {"account": "info", "outcome": outcome}) == 1
    assert get("pop3_connector_smtp_responses_total", {"account": "info", "code": "250"}) == 1
    assert get("pop3_connector_smtp_responses_total", {"account": "info", "code": "554"}) == 1
    assert get("pop3_connector_smtp_responses_total", {"account": "info", "code": "none"}) == 1
    assert b"UID-" not in m.render()


def test_cycle_sets_gauges_only_from_a_stat_that_happened() -> None:
    m = Metrics()
    m.set_accounts(["info"])
    get = m.registry.get_sample_value
    ok = CycleStats(mailbox_messages=7, mailbox_bytes=7000, delivered_bytes=512,
                    mailbox_known=True)  # fmt: skip
    m.cycle("info", ok=True, duration=0.03, stats=ok, finished=1000.0, failing=False)
    failed = CycleStats()  # failed before STAT: the last STAT stays
    m.cycle("info", ok=False, duration=2.0, stats=failed, finished=2000.0, failing=True)
    labels = {"account": "info"}
    assert get("pop3_connector_mailbox_messages", labels) == 7
    assert get("pop3_connector_mailbox_bytes", labels) == 7000
    assert get("pop3_connector_delivered_bytes_total", labels) == 512
    assert get("pop3_connector_last_success_timestamp_seconds", labels) == 1000.0
    assert get("pop3_connector_account_failing", labels) == 1
    assert get("pop3_connector_cycles_total", {**labels, "result": "ok"}) == 1
    assert get("pop3_connector_cycles_total", {**labels, "result": "failed"}) == 1
    assert get("pop3_connector_cycle_duration_seconds_count", labels) == 2
    assert get("pop3_connector_cycle_duration_seconds_bucket", {**labels, "le": "0.05"}) == 1
    assert get("pop3_connector_cycle_duration_seconds_bucket", {**labels, "le": "2.5"}) == 2


def test_buckets_span_50_ms_to_30_minutes() -> None:
    assert CYCLE_BUCKETS[0] == 0.05
    assert CYCLE_BUCKETS[-1] == 1800.0
    assert list(CYCLE_BUCKETS) == sorted(set(CYCLE_BUCKETS))
    steps = [b / a for a, b in itertools.pairwise(CYCLE_BUCKETS)]
    assert max(steps) <= 3.0  # no blind spot: each bucket at most triples the one before


def test_backlog_and_removed_accounts() -> None:
    m = Metrics()
    m.set_accounts(["info", "old"])
    m.backlog({"info": 2, "old": 1}, {"info": 5})
    get = m.registry.get_sample_value
    assert get("pop3_connector_deferred_messages", {"account": "info"}) == 2
    assert get("pop3_connector_dead_letters", {"account": "info"}) == 5
    assert get("pop3_connector_dead_letters", {"account": "old"}) == 0
    m.set_accounts(["info"])
    assert get("pop3_connector_deferred_messages", {"account": "old"}) is None
    assert get("pop3_connector_dead_letters", {"account": "old"}) is None
    assert get("pop3_connector_deferred_messages", {"account": "info"}) == 2


def _cycle(m: Metrics, account: str, *, ok: bool, mailbox: int, finished: float,
           failing: bool = False) -> None:  # fmt: skip
    stats = CycleStats(mailbox_messages=mailbox, mailbox_bytes=mailbox * 100, delivered_bytes=10,
                       mailbox_known=True)  # fmt: skip
    m.cycle(account, ok=ok, duration=0.03, stats=stats, finished=finished, failing=failing)


def test_without_per_account_the_same_families_as_totals_without_the_label() -> None:
    m = Metrics(per_account=False, clock=lambda: 100.0)
    m.set_accounts(["info", "sales", "quiet"])
    _cycle(m, "info", ok=True, mailbox=3, finished=1000.0)
    _cycle(m, "sales", ok=False, mailbox=4, finished=1100.0, failing=True)
    m.message("info", "U1", 10, Outcome.DELIVERED, "250 OK")
    m.message("sales", "U2", 10, Outcome.DELIVERED, "250 OK")
    m.account_backlog("info", 2, 5)
    m.account_backlog("sales", 1, None)  # dead letters not counted yet: left as they were
    families_seen = families(m)
    assert families_seen == {k: v for k, v in EXPECTED.items() if k not in PER_ACCOUNT_ONLY}
    text = m.render().decode()
    assert "account=" not in text
    get = m.registry.get_sample_value
    assert get("pop3_connector_messages_total", {"outcome": "delivered"}) == 2
    assert get("pop3_connector_messages_total", {"outcome": "removed"}) == 0
    assert get("pop3_connector_cycles_total", {"result": "ok"}) == 1
    assert get("pop3_connector_cycles_total", {"result": "failed"}) == 1
    assert get("pop3_connector_cycle_duration_seconds_count", {}) == 2
    assert get("pop3_connector_delivered_bytes_total", {}) == 20
    assert get("pop3_connector_mailbox_messages", {}) == 7
    assert get("pop3_connector_mailbox_bytes", {}) == 700
    assert get("pop3_connector_deferred_messages", {}) == 3
    assert get("pop3_connector_dead_letters", {}) == 5
    assert get("pop3_connector_accounts", {}) == 3
    assert get("pop3_connector_accounts_failing", {}) == 1
    # "quiet" has had no cycle: it counts from the start of the process (100.0).
    assert get("pop3_connector_oldest_last_success_timestamp_seconds", {}) == 100.0
    m.set_accounts(["info", "sales"])  # a reload removed "quiet" ...
    assert get("pop3_connector_oldest_last_success_timestamp_seconds", {}) == 100.0
    _cycle(m, "sales", ok=True, mailbox=0, finished=1200.0)  # ... and "sales" recovered
    assert get("pop3_connector_oldest_last_success_timestamp_seconds", {}) == 1000.0
    assert get("pop3_connector_accounts_failing", {}) == 0
    assert get("pop3_connector_mailbox_messages", {}) == 3
    m.set_accounts(["sales"])  # removed accounts leave the totals of the gauges
    assert get("pop3_connector_mailbox_messages", {}) == 0
    assert get("pop3_connector_deferred_messages", {}) == 1
    assert get("pop3_connector_dead_letters", {}) == 0


def test_per_account_series_and_the_counts_beside_them() -> None:
    m = Metrics(clock=lambda: 100.0)
    m.set_accounts(["info", "sales"])
    _cycle(m, "info", ok=True, mailbox=3, finished=1000.0)
    _cycle(m, "sales", ok=False, mailbox=4, finished=1100.0, failing=True)
    m.account_backlog("info", 2, 5)
    get = m.registry.get_sample_value
    assert get("pop3_connector_deferred_messages", {"account": "info"}) == 2
    assert get("pop3_connector_dead_letters", {"account": "info"}) == 5
    assert get("pop3_connector_deferred_messages", {"account": "sales"}) == 0
    assert get("pop3_connector_account_failing", {"account": "sales"}) == 1
    assert get("pop3_connector_accounts", {}) == 2
    assert get("pop3_connector_accounts_failing", {}) == 1
    assert get("pop3_connector_oldest_last_success_timestamp_seconds", {}) == 100.0
    m.host_paused()
    assert get("pop3_connector_host_pauses_total", {}) == 1


def test_no_accounts_nothing_overdue() -> None:
    m = Metrics()
    value = m.registry.get_sample_value("pop3_connector_oldest_last_success_timestamp_seconds")
    assert value is not None
    assert value != value  # NaN: time() - NaN > x is never true, so no alert fires


def test_account_info_names_each_accounts_smtp_target() -> None:
    """One series per account (docs/design.md §14.1), not a label on the others; an account
    that moves to another target, or goes, leaves no series behind."""
    m = Metrics()
    m.set_accounts(["info", "sales"])
    m.set_targets({"info": "default", "sales": "kunde-b"})

    def info(account: str, target: str) -> float | None:
        labels = {"account": account, "smtp_target": target}
        return m.registry.get_sample_value("pop3_connector_account_info", labels)

    assert (info("info", "default"), info("sales", "kunde-b")) == (1, 1)
    m.set_targets({"info": "kunde-b"})
    assert (info("info", "default"), info("info", "kunde-b")) == (None, 1)
    assert info("sales", "kunde-b") is None
    infos = [
        s for f in text_string_to_metric_families(m.render().decode())
        if f.name == "pop3_connector_account_info" for s in f.samples
    ]  # fmt: skip
    assert len(infos) == 1
    # No other series carries the target.
    assert b"smtp_target" not in b"".join(
        line for line in m.render().splitlines() if b"account_info" not in line
    )
