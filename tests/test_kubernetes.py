"""deploy/kubernetes/: the manifests against Kubernetes' own schemas, and against the rest of us.

There is no cluster here.  What can be checked without one:

* every core object against the OpenAPI schemas of a pinned Kubernetes version, strictly (an
  unknown field is an error), with ``kubernetes-validate`` (PyPI), which ships the schemas: no
  network is needed;
* the PodMonitor (a Prometheus Operator CRD, not in those schemas) against the subset of its
  schema we use, written out below, equally strict;
* that the manifests agree with the config they carry, the image (deploy/Dockerfile), the
  systemd unit's memory limit, the alert rules and the endpoint's own Host check
  (connector/http.py), run on a real socket as the kubelet and Prometheus will talk to it.
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import jsonschema
import kubernetes_validate
import pytest
import yaml

from connector.config import load_settings
from connector.http import HttpEndpoint

ROOT: Final = Path(__file__).resolve().parent.parent
DEPLOY: Final = ROOT / "deploy"
K8S: Final = DEPLOY / "kubernetes"
# The oldest Kubernetes the manifests are written for (deploy/kubernetes/README.md): nothing
# newer may creep in unnoticed.  kubernetes-validate ships this version's schemas.
KUBERNETES_VERSION: Final = "1.30"
SECRET_NAME: Final = "pop3-connector-passwords"
CONFIG_MAP_NAME: Final = "pop3-connector-config"

# The part of monitoring.coreos.com/v1 PodMonitor (prometheus-operator's CRD) that
# prometheus-operator/podmonitor.yaml uses, with no other field allowed: a typo is an error here,
# where the API server would silently prune it.  Durations as the CRD's pattern has them.
_DURATION: Final = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    r"(([0-9]+)ms)?)$",
}
_STRING_MAP: Final = {"type": "object", "additionalProperties": {"type": "string"}}
PODMONITOR_SCHEMA: Final[Mapping[str, Any]] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "labels": _STRING_MAP,
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "additionalProperties": False,
                    "properties": {"matchLabels": _STRING_MAP},
                },
                "jobLabel": {"type": "string"},
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string", "minLength": 1},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                        },
                    },
                },
            },
        },
    },
}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _manifests() -> dict[str, dict[str, Any]]:
    """Every object under deploy/kubernetes/, by kind (one object of each kind)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in _documents(path):
            assert doc["kind"] not in found, f"a second {doc['kind']} in {path}"
            found[doc["kind"]] = doc
    return found


MANIFESTS: Final = _manifests()
CORE_KINDS: Final = (
    "ConfigMap",
    "Service",
    "StatefulSet",
    "PodDisruptionBudget",
    # maintenance/: the resharding procedure's pod and a new replica's claim (README.md).
    "Pod",
    "PersistentVolumeClaim",
)


def _pod(manifests: Mapping[str, Any] = MANIFESTS) -> dict[str, Any]:
    spec: dict[str, Any] = manifests["StatefulSet"]["spec"]["template"]["spec"]
    return spec


def _container(manifests: Mapping[str, Any] = MANIFESTS) -> dict[str, Any]:
    (container,) = _pod(manifests)["containers"]
    assert isinstance(container, dict)
    return container


def _env(container: Mapping[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def _mounts_by_volume(container: Mapping[str, Any]) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container["volumeMounts"]}


def _volume(name: str) -> dict[str, Any]:
    (volume,) = [v for v in _pod()["volumes"] if v["name"] == name]
    assert isinstance(volume, dict)
    return volume


def _config_text() -> str:
    text = MANIFESTS["ConfigMap"]["data"]["config.toml"]
    assert isinstance(text, str)
    return text


@pytest.fixture
def settings_dir() -> Iterator[Path]:
    """A directory other uids can enter (pytest's tmp_path is root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="k8s-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _password_mount() -> str:
    mounts = _mounts_by_volume(_container())
    (volume,) = [v for v in _pod()["volumes"] if "secret" in v]
    return mounts[volume["name"]]


def _config_copy(directory: Path) -> Path:
    """The ConfigMap's config.toml with the Secret's mount point moved to ``directory``,
    which gets one password file per password_file, as the kubelet would mount them."""
    mount = _password_mount()
    text = _config_text()
    for name in re.findall(rf'^password_file = "{re.escape(mount)}/([^"]+)"', text, re.M):
        (directory / name).write_text("the POP3 password\n", encoding="utf-8")
    config = directory / "config.toml"
    config.write_text(text.replace(f'"{mount}/', f'"{directory}/'), encoding="utf-8")
    return config


def _metrics_port() -> int:
    (port,) = [p for p in _container()["ports"] if p["name"] == "metrics"]
    assert isinstance(port["containerPort"], int)
    return port["containerPort"]


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------


def test_every_file_holds_what_this_test_knows() -> None:
    assert sorted(MANIFESTS) == sorted([*CORE_KINDS, "PodMonitor"])


@pytest.mark.parametrize("kind", CORE_KINDS)
def test_core_objects_validate_against_the_pinned_kubernetes_schema(kind: str) -> None:
    version = kubernetes_validate.validate(MANIFESTS[kind], KUBERNETES_VERSION, strict=True)
    assert version == KUBERNETES_VERSION


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "replicas"), "3"),  # a string where Kubernetes wants an integer
        (("spec", "template", "spec", "terminationGracePeriodSecond"), 45),  # a typo
        (("spec", "template", "spec", "securityContext", "runAsNonroot"), True),
    ],
)
def test_schema_validation_catches_a_broken_statefulset(path: tuple[str, ...], value: Any) -> None:
    broken = copy.deepcopy(MANIFESTS["StatefulSet"])
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def _podmonitor_problems(manifests: Mapping[str, Any]) -> list[str]:
    """What is wrong with the PodMonitor: its schema, and what it must agree with."""
    monitor = manifests["PodMonitor"]
    validator = jsonschema.Draft202012Validator(PODMONITOR_SCHEMA)
    problems = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(monitor)
    ]
    if problems:
        return problems
    labels = manifests["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    if not selector.items() <= labels.items():
        problems.append(f"selector {selector} does not select the pods ({labels})")
    ports = {p["name"] for p in _container(manifests)["ports"]}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        if endpoint["port"] not in ports:
            problems.append(f"port {endpoint['port']!r} is none of the container's {ports}")
        if endpoint.get("path", "/metrics") != "/metrics":
            problems.append(f"path {endpoint['path']!r} is not /metrics")
    # deploy/prometheus/alerts.yml: Pop3ConnectorDown watches up{job="pop3-connector"}.
    alerts = (DEPLOY / "prometheus" / "alerts.yml").read_text(encoding="utf-8")
    (job,) = set(re.findall(r'up\{job="([^"]+)"\}', alerts))
    if labels.get(monitor["spec"].get("jobLabel", "")) != job:
        problems.append(f'jobLabel does not make job="{job}", which the alert rules expect')
    return problems


def test_podmonitor_has_the_crd_shape_and_scrapes_the_metrics_port() -> None:
    assert _podmonitor_problems(MANIFESTS) == []


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("port", "metric", "port 'metric' is none of the container's"),
        ("path", "/healthz", "path '/healthz' is not /metrics"),
        ("interval", "30 seconds", "interval: '30 seconds' does not match"),
        ("targetPort", 9469, "Additional properties are not allowed ('targetPort'"),
    ],
)
def test_podmonitor_check_catches_a_broken_endpoint(key: str, value: Any, problem: str) -> None:
    broken = copy.deepcopy(MANIFESTS)
    broken["PodMonitor"]["spec"]["podMetricsEndpoints"][0][key] = value
    assert any(problem in p for p in _podmonitor_problems(broken)), _podmonitor_problems(broken)


def test_podmonitor_check_catches_a_job_the_alerts_do_not_watch() -> None:
    broken = copy.deepcopy(MANIFESTS)
    del broken["PodMonitor"]["spec"]["jobLabel"]
    assert any("jobLabel" in p for p in _podmonitor_problems(broken))


# --------------------------------------------------------------------------------------------
# The manifests against the config, the image and the unit
# --------------------------------------------------------------------------------------------


def test_config_map_loads_with_the_pods_environment(
    settings_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real loader reads the ConfigMap's config with the container's environment set
    (POP3_CONNECTOR_SHARDS shares the settings' prefix but must not be taken for one)."""
    for name, value in _env(_container()).items():
        monkeypatch.setenv(name, value if isinstance(value, str) else "pop3-connector-2")
    config = _config_copy(settings_dir)
    monkeypatch.setenv("POP3_CONNECTOR_CONFIG", str(config))
    settings = load_settings(config)
    assert settings.accounts


def test_probes_and_scrapes_reach_the_listen_port(settings_dir: Path) -> None:
    settings = load_settings(_config_copy(settings_dir))
    address = settings.metrics.address
    assert address is not None
    host, port = address
    assert host == "0.0.0.0"  # noqa: S104 (the kubelet and Prometheus come from outside the pod)
    assert _metrics_port() == port
    container = _container()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe
    (service_port,) = MANIFESTS["Service"]["spec"]["ports"]
    assert service_port["targetPort"] == "metrics"
    assert service_port["port"] == port
    annotations = MANIFESTS["StatefulSet"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


class _Alive:
    """connector.http.Operations of a live service."""

    def metrics_text(self) -> bytes:
        return b"# EOF\n"

    def healthy(self) -> bool:
        return True

    async def status(self) -> Mapping[str, Any]:
        return {"accounts": []}

    def poll_now(self, name: str | None = None) -> tuple[list[str], dict[str, float]]:
        raise KeyError(name)


async def _get(port: int, target: str, host: str, agent: str) -> bytes:
    # What the kubelet's httpGet probe and Prometheus send: the target's IP address and port
    # as Host (the pod's IP; neither knows a name for it).
    head = (
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {agent}\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode())
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data.split(b"\r\n", 1)[0]


@pytest.mark.parametrize(
    ("listen", "status"),
    [
        ("config", b"HTTP/1.1 200 OK"),
        # On a loopback address the pod IP is no name of ours (421): the reason for 0.0.0.0.
        ("127.0.0.1", b"HTTP/1.1 421 Misdirected Request"),
    ],
)
async def test_the_endpoint_answers_probes_and_prometheus_by_pod_ip(
    settings_dir: Path, listen: str, status: bytes
) -> None:
    settings = load_settings(_config_copy(settings_dir))
    address = settings.metrics.address
    assert address is not None
    host = address[0] if listen == "config" else listen
    port = address[1]
    async with HttpEndpoint(_Alive(), allowed_hosts=settings.metrics.allowed_hosts) as endpoint:
        await endpoint.start(host, 0)
        bound = endpoint.address[1]
        pod_ip = f"10.244.1.7:{port}"
        assert await _get(bound, "/healthz", pod_ip, "kube-probe/1.30") == status
        assert await _get(bound, "/metrics", pod_ip, "Prometheus/2.53.0") == status
        # Still refused: a name nobody configured (DNS rebinding).
        assert await _get(bound, "/healthz", f"rebind.example:{port}", "curl/8") == (
            b"HTTP/1.1 421 Misdirected Request"
        )


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text(encoding="utf-8")


def test_the_pod_runs_as_the_images_user_locked_down() -> None:
    user = re.findall(r"^USER (\d+):(\d+)$", _dockerfile(), re.M)[-1]
    pod = _pod()["securityContext"]
    assert (str(pod["runAsUser"]), str(pod["runAsGroup"])) == user
    assert str(pod["fsGroup"]) == user[1]  # the volumes' group: the Secret and the state
    assert pod["runAsNonRoot"] is True
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    container = _container()["securityContext"]
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert _pod()["automountServiceAccountToken"] is False


def test_config_state_and_image_paths_agree(settings_dir: Path) -> None:
    settings = load_settings(_config_copy(settings_dir))
    container = _container()
    mounts = _mounts_by_volume(container)
    config_path = Path(_env(container)["POP3_CONNECTOR_CONFIG"])
    assert f"POP3_CONNECTOR_CONFIG={config_path}" in _dockerfile()
    assert mounts["config"] == str(config_path.parent)
    assert _volume("config")["configMap"]["name"] == MANIFESTS["ConfigMap"]["metadata"]["name"]
    assert list(MANIFESTS["ConfigMap"]["data"]) == [config_path.name]
    # State: one claim per replica, mounted where the config and the image keep it.
    (claim,) = MANIFESTS["StatefulSet"]["spec"]["volumeClaimTemplates"]
    assert mounts[claim["metadata"]["name"]] == str(settings.service.state_dir)
    assert f'VOLUME ["{settings.service.state_dir}"]' in _dockerfile()
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    retention = MANIFESTS["StatefulSet"]["spec"]["persistentVolumeClaimRetentionPolicy"]
    assert retention == {"whenDeleted": "Retain", "whenScaled": "Retain"}  # the ledgers
    assert mounts["tmp"] == "/tmp"  # the root filesystem is read-only


def test_the_secret_is_mounted_where_the_config_reads_passwords(settings_dir: Path) -> None:
    secret = _volume("passwords")["secret"]
    assert secret["secretName"] == SECRET_NAME
    mount = _password_mount()
    settings = load_settings(_config_copy(settings_dir))
    names = [a.password_file.name for a in settings.accounts if a.password_file is not None]
    assert names
    assert len(names) == len(settings.accounts)
    text = _config_text()
    for name in names:
        assert f'password_file = "{mount}/{name}"' in text
    # README: the command that creates the Secret names every one of those files.
    readme = (K8S / "README.md").read_text(encoding="utf-8")
    (command,) = re.findall(
        rf"^kubectl (?:-n \S+ )?create secret generic {SECRET_NAME} .*?[^\\]$", readme, re.M | re.S
    )
    # --from-file=KEY=PATH names the file KEY; --from-file=PATH names it after PATH.
    assert "--from-literal" not in command  # the password would stay in the shell's history
    files = [t.removeprefix("--from-file=") for t in command.split() if t.startswith("--from-")]
    given = [f.split("=", 1)[0] if "=" in f else Path(f).name for f in files]
    assert sorted(given) == sorted(names), command


def test_the_service_user_reads_the_mounted_secret(settings_dir: Path) -> None:
    """Files as the kubelet mounts the Secret (root, group fsGroup, defaultMode), read by
    `pop3-connector check` as the image's uid and gid, with fsGroup as supplementary group:
    no error, and no warning that others may read them."""
    exe = shutil.which("pop3-connector", path=str(Path(sys.executable).parent))
    assert exe
    if os.geteuid() != 0:
        pytest.fail("this test switches uid with setpriv: run the suite as root (as CI does)")
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv is missing: apt-get install util-linux"
    pod = _pod()["securityContext"]
    mode = _volume("passwords")["secret"]["defaultMode"]
    assert mode & 0o007 == 0  # nothing for others
    config = _config_copy(settings_dir)
    config.chmod(0o444)  # a ConfigMap's files: the config holds no password
    for secret in settings_dir.glob("*.password"):
        os.chown(secret, 0, pod["fsGroup"])
        secret.chmod(mode)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(settings_dir)}
    command = [
        setpriv,
        f"--reuid={pod['runAsUser']}",
        f"--regid={pod['runAsGroup']}",
        f"--groups={pod['fsGroup']}",
        exe,
        "--config",
        str(config),
        "check",
    ]
    checked = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert checked.returncode == 0, checked.stderr
    assert "password_file" not in checked.stderr, checked.stderr


def test_the_grace_period_covers_shutdown_grace(settings_dir: Path) -> None:
    settings = load_settings(_config_copy(settings_dir))
    grace = _pod()["terminationGracePeriodSeconds"]
    # shutdown_grace for the message in flight, then QUIT and the ledger's last commit.
    assert grace >= settings.service.shutdown_grace + 10


_QUANTITY: Final = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
_SYSTEMD_SIZE: Final = {"K": 2**10, "M": 2**20, "G": 2**30}


def _bytes(quantity: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity)
    assert m, f"{quantity}: write memory in Ki, Mi or Gi"
    return int(m.group(1)) * _QUANTITY[m.group(2)]


def test_memory_limit_is_the_systemd_units_memory_max() -> None:
    unit = (DEPLOY / "systemd" / "pop3-connector.service").read_text(encoding="utf-8")
    (value,) = re.findall(r"^MemoryMax=(\d+)([KMG])$", unit, re.M)
    memory_max = int(value[0]) * _SYSTEMD_SIZE[value[1]]
    resources = _container()["resources"]
    assert _bytes(resources["limits"]["memory"]) == memory_max
    bench = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    m = re.search(r"^\| large \| ([\d,]+) MiB peak RSS", bench, re.M)
    assert m, "bench/README.md no longer states the large scenario's peak RSS"
    peak = int(m.group(1).replace(",", "")) * 2**20
    assert peak <= _bytes(resources["requests"]["memory"]) <= memory_max


# --------------------------------------------------------------------------------------------
# Sharding: the interface deploy/kubernetes/README.md asks of the code
# --------------------------------------------------------------------------------------------


def test_each_replica_is_told_its_shard() -> None:
    statefulset = MANIFESTS["StatefulSet"]
    container = _container()
    env = _env(container)
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # N twice, equal: a replica k >= N would own nothing, a missing one leaves accounts unpolled.
    assert int(env["POP3_CONNECTOR_SHARDS"]) == statefulset["spec"]["replicas"]
    assert container["args"] == ["run", "--shard", "auto/$(POP3_CONNECTOR_SHARDS)"]
    # Pods are named <StatefulSet>-<ordinal>: the "-k" that `--shard auto/N` reads.
    assert statefulset["metadata"]["name"] == "pop3-connector"
    assert statefulset["spec"]["serviceName"] == MANIFESTS["Service"]["metadata"]["name"]
    assert MANIFESTS["Service"]["spec"]["clusterIP"] == "None"
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    for kind in ("StatefulSet", "PodDisruptionBudget"):
        selector = MANIFESTS[kind]["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), kind
    assert MANIFESTS["Service"]["spec"]["selector"].items() <= labels.items()
    readme = (K8S / "README.md").read_text(encoding="utf-8")
    assert "`--shard auto/N`" in readme
    assert "## Resharding" in readme
    assert "pop3-connector ledger export --account" in readme
    assert "pop3-connector ledger import" in readme


def test_the_maintenance_pod_is_a_replica_without_the_service() -> None:
    """The resharding procedure's pod (maintenance/pod.yaml) runs the ledger commands on a
    replica's volume: the replica's image, user, config, passwords and state mount, but no
    label the Service, PodDisruptionBudget or PodMonitor select (it must not pass for one)."""
    pod, replica = MANIFESTS["Pod"], _pod()
    (container,) = pod["spec"]["containers"]
    assert container["image"] == _container()["image"]
    assert container["command"] == ["sleep", "infinity"]
    assert pod["spec"]["securityContext"] == replica["securityContext"]
    assert container["securityContext"] == _container()["securityContext"]
    assert _env(container)["POP3_CONNECTOR_CONFIG"] == _env(_container())["POP3_CONNECTOR_CONFIG"]
    mounts, replica_mounts = _mounts_by_volume(container), _mounts_by_volume(_container())
    assert mounts == replica_mounts
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for volume in replica["volumes"]:
        assert volumes[volume["name"]] == volume
    claim = MANIFESTS["StatefulSet"]["spec"]["volumeClaimTemplates"][0]
    state = volumes[claim["metadata"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert state == f"{claim['metadata']['name']}-pop3-connector-0"
    labels = pod["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        spec = MANIFESTS[kind]["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert not selector.items() <= labels.items(), kind
    monitor = MANIFESTS["PodMonitor"]["spec"]["selector"]["matchLabels"]
    assert not monitor.items() <= labels.items()


def test_a_new_replicas_claim_is_what_the_statefulset_would_make() -> None:
    claim, template = (
        MANIFESTS["PersistentVolumeClaim"],
        MANIFESTS["StatefulSet"]["spec"]["volumeClaimTemplates"][0],
    )
    assert claim["spec"] == template["spec"]
    assert claim["metadata"]["labels"] == template["metadata"]["labels"]
    # <template>-<StatefulSet>-<ordinal>: the name the StatefulSet adopts.
    assert claim["metadata"]["name"] == f"{template['metadata']['name']}-pop3-connector-0"
