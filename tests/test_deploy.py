"""Deployment artefacts (deploy/) and the migration runbook's rules files, checked with real tools.

- Kubernetes manifests: kubernetes-validate (the official schemas, offline, strict); the
  ServiceMonitor is a CRD outside those schemas, so its structure is checked by hand.
- Prometheus alerts: `promtool check rules` (Debian package `prometheus`).
- systemd unit: `systemd-analyze verify` (Debian package `systemd`).
- Every splitter_* metric the alerts and the dashboard name exists in a real Metrics() registry.
- rules/migration-*.yaml: `splitter check`, and the widening phase only moves users forward.
A test skips only when its validator binary (promtool, systemd-analyze) is not installed.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.engine import load_rules
from proxy.engine.rollout import compare
from proxy.metrics import Metrics
from tests.conftest import ROOT, RULES_DIR, RULES_ENV, splitter_command
from tests.system_tools import find, missing, skip_reason

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
UNIT = DEPLOY / "systemd" / "splitter.service"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "splitter.json"
MIGRATION = sorted(RULES_DIR.glob("migration-*.yaml"))
CORE_MANIFESTS = ["sidecar.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "configmap.yaml", "pdb.yaml", "secret.yaml"]
DRAIN_TIMEOUT = 25.0  # splitter serve's default, and what the manifests set explicitly


def _need(binary: str) -> str:
    path = find(binary)
    if path is None:
        pytest.skip(skip_reason(missing((binary,))))
    return path


# --------------------------------------------------------------------------- metric names

def exported_metric_names() -> set[str]:
    """Series names a real registry exposes, in the forms prometheus_client writes them."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_count", "_sum"))
        else:
            names.add(family.name)
    return names


def splitter_names(expr: str) -> set[str]:
    return set(re.findall(r"\bsplitter_[A-Za-z0-9_]+", expr))


def test_metric_name_helper_knows_the_documented_series() -> None:
    names = exported_metric_names()
    assert {"splitter_events_total", "splitter_upstream_duration_seconds_bucket", "splitter_spool_oldest_event_age_seconds",
            "splitter_rollout_percent", "splitter_config_reloads_total"} <= names
    assert "splitter_events" not in names  # a counter is only ever read as *_total


# --------------------------------------------------------------------------- Dockerfile

def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in _dockerfile():
        if word == "ENV":
            for name, value in re.findall(r"(\w+)=(\S+)", rest):
                env[name] = value
    return env


def test_dockerfile_uses_slim_python_and_runtime_deps_only() -> None:
    froms = [rest for word, rest in _dockerfile() if word == "FROM"]
    assert froms and all(rest.split()[0] == "python:3.12-slim" for rest in froms)
    runs = " ".join(rest for word, rest in _dockerfile() if word == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs), "installs the repository itself"
    assert "[test]" not in runs and "pytest" not in runs


def test_dockerfile_copies_only_paths_that_exist() -> None:
    copies = [rest for word, rest in _dockerfile() if word == "COPY" and "--from=" not in rest]
    assert copies
    for rest in copies:
        for source in rest.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    # what `pip install .` needs: pyproject, its readme, setup.py (the compiled prepare()), the packages it finds
    copied = {source for rest in copies for source in rest.split()[:-1]}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {"pyproject.toml", project["readme"], "setup.py", "proxy"} <= copied


def test_dockerfile_entrypoint_is_the_declared_console_script() -> None:
    entry = [rest for word, rest in _dockerfile() if word == "ENTRYPOINT"]
    assert len(entry) == 1
    argv = json.loads(entry[0])
    assert argv == ["splitter", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts
    module, _, function = scripts[argv[0]].partition(":")
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
    import importlib

    assert callable(getattr(importlib.import_module(module), function))


def test_dockerfile_runs_as_non_root_with_volumes_and_env() -> None:
    users = [rest for word, rest in _dockerfile() if word == "USER"]
    assert users, "USER must be set"
    assert users[-1].split(":")[0] not in {"root", "0"}
    env = _docker_env()
    assert env["SPLITTER_CONFIG"] == "/etc/splitter/rules.yaml"
    assert env["SPLITTER_LISTEN"] == "0.0.0.0:8080"
    assert env["SPLITTER_ADMIN"] == "127.0.0.1:9090"
    assert env["SPLITTER_SPOOL_DIR"] == "/var/lib/splitter/spool"
    assert env["SPLITTER_DEAD_LETTER_DIR"] == "/var/lib/splitter/dead-letter"
    volumes = json.loads(next(rest for word, rest in _dockerfile() if word == "VOLUME"))
    assert set(volumes) == {"/etc/splitter", "/var/lib/splitter"}
    exposed = {int(p.split("/")[0]) for word, rest in _dockerfile() if word == "EXPOSE" for p in rest.split()}
    assert exposed == {int(env["SPLITTER_LISTEN"].rpartition(":")[2]), int(env["SPLITTER_ADMIN"].rpartition(":")[2])}


def test_dockerfile_healthcheck_hits_admin_healthz_with_urllib() -> None:
    health = [rest for word, rest in _dockerfile() if word == "HEALTHCHECK"]
    assert len(health) == 1
    command = json.loads(health[0].partition("CMD")[2].strip())
    assert command[:2] == ["python", "-c"]
    assert "urllib.request" in command[2] and "/healthz" in command[2] and "curl" not in health[0]
    compile(command[2], "<healthcheck>", "exec")  # valid Python


# --------------------------------------------------------------------------- Kubernetes

def _docs(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def _validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("name", CORE_MANIFESTS)
def test_manifest_validates_against_kubernetes_schemas(name: str) -> None:
    docs = _docs(name)
    assert docs
    for doc in docs:
        _validate(doc)


def test_validator_really_rejects_broken_manifests() -> None:
    broken = _docs("deployment.yaml")[0]
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)
    unknown = _docs("pdb.yaml")[0]
    unknown["spec"]["maxUnavailabel"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(unknown)


def _pod_specs() -> dict[str, dict[str, Any]]:
    return {name: _docs(name)[0]["spec"]["template"]["spec"] for name in ("sidecar.yaml", "deployment.yaml")}


def _splitter(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == "splitter")


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.parametrize("name", ["sidecar.yaml", "deployment.yaml"])
def test_pods_probe_admin_port_with_a_token_and_drain_in_time(name: str) -> None:
    pod = _pod_specs()[name]
    container = _splitter(pod)
    env = _env(container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    admin_port = int(env["SPLITTER_ADMIN"].rpartition(":")[2])
    assert env["SPLITTER_ADMIN"].startswith("0.0.0.0:")
    secret = _docs("secret.yaml")[0]
    assert "SPLITTER_ADMIN_TOKEN" in secret["stringData"]
    assert any(ref.get("secretRef", {}).get("name") == secret["metadata"]["name"] for ref in container["envFrom"])
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports[get["port"]] == admin_port
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = float(env.get("SPLITTER_DRAIN_TIMEOUT") or DRAIN_TIMEOUT)
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # the rules: a directory mount of the ConfigMap (subPath would never see updates)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/splitter")
    assert "subPath" not in mount
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == _docs("configmap.yaml")[0]["metadata"]["name"]
    assert env["SPLITTER_CONFIG"] == "/etc/splitter/rules.yaml"
    assert env["SPLITTER_SPOOL_DIR"].startswith("/var/lib/splitter/")
    assert any(m["mountPath"] == "/var/lib/splitter" for m in container["volumeMounts"])


def test_sidecar_app_sends_to_loopback_and_spool_is_an_emptydir() -> None:
    doc = _docs("sidecar.yaml")[0]
    assert doc["kind"] == "Deployment"
    pod = doc["spec"]["template"]["spec"]
    app = next(c for c in pod["containers"] if c["name"] != "splitter")
    assert "http://127.0.0.1:8080" in _env(app).values()
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == "spool")
    assert "subPath" in (K8S / "configmap.yaml").read_text()  # the comment warning against it


def test_shared_tier_has_per_replica_spool_hpa_pdb_and_service() -> None:
    tier = _docs("deployment.yaml")[0]
    assert [t["metadata"]["name"] for t in tier["spec"]["volumeClaimTemplates"]] == ["spool"]
    assert tier["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    hpa = _docs("hpa.yaml")[0]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": tier["apiVersion"], "kind": tier["kind"], "name": tier["metadata"]["name"]}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    pdb = _docs("pdb.yaml")[0]
    assert pdb["apiVersion"] == "policy/v1"
    pod_labels = tier["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    services = {s["metadata"]["name"]: s for s in _docs("service.yaml")}
    assert tier["spec"]["serviceName"] in services
    assert services["splitter"]["spec"]["selector"].items() <= pod_labels.items()


def test_servicemonitor_structure() -> None:
    """A CRD: not in the core schemas, so checked by hand."""
    (monitor,) = _docs("servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["metadata"]["name"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in _docs("service.yaml") if selector.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == ["splitter"]
    service_ports = {p["name"] for p in selected[0]["spec"]["ports"]}
    assert monitor["spec"]["endpoints"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings", "metricRelabelings"}


def test_configmap_rules_pass_splitter_check(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(_docs("configmap.yaml")[0]["data"]["rules.yaml"])
    result = _check(rules)
    assert result.returncode == 0, result.stderr


def test_kubernetes_readme_covers_scaling_and_spools() -> None:
    text = (K8S / "README.md").read_text()
    for phrase in ("deterministic", "murmur3", "HPA", "Performance", "own spool", "subPath"):
        assert phrase in text, phrase


# --------------------------------------------------------------------------- systemd

def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_unit_keys() -> None:
    service = _unit()["Service"]
    assert service["ExecStart"] == "/usr/local/bin/splitter serve --config /etc/splitter/rules.yaml"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert float(service["TimeoutStopSec"]) > DRAIN_TIMEOUT
    assert service["EnvironmentFile"] == "-/etc/splitter/env"
    assert service["StateDirectory"] == "splitter"
    assert service["DynamicUser"] == "yes"
    assert service["Restart"] == "on-failure"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectControlGroups", "LockPersonality"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert service["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert service["SystemCallFilter"] == "@system-service"
    assert service["CapabilityBoundingSet"] == ""
    assert "MemoryDenyWriteExecute" in UNIT.read_text()  # left out, with the reason in a comment
    assert "MemoryDenyWriteExecute" not in service
    assert _unit()["Install"]["WantedBy"] == "multi-user.target"


def _verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # The console script is not installed at /usr/local/bin here: point ExecStart at an executable
    # that exists so verify checks everything else.
    path = tmp_path / "splitter.service"
    path.write_text(unit_text.replace("/usr/local/bin/splitter", sys.executable))
    return subprocess.run([_need("systemd-analyze"), "verify", str(path)], capture_output=True, text=True, timeout=60)


def _diagnostics(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if "splitter.service" in line]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    result = _verify(UNIT.read_text(), tmp_path)
    assert result.returncode == 0, result.stderr
    assert _diagnostics(result) == []
    broken = _verify(UNIT.read_text().replace("TimeoutStopSec=", "TimeoutStopSecs="), tmp_path)
    assert any("TimeoutStopSecs" in line for line in _diagnostics(broken)), "verify must flag an unknown key"


# --------------------------------------------------------------------------- Prometheus

def _alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_promtool_check_rules(tmp_path: Path) -> None:
    promtool = _need("promtool")
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(ALERTS.read_text().replace("splitter_breaker_state) == 2", "splitter_breaker_state) === 2"))
    assert subprocess.run([promtool, "check", "rules", str(bad)], capture_output=True, text=True, timeout=60).returncode != 0


def test_alerts_cover_every_signal_with_for_severity_and_annotations() -> None:
    rules = _alert_rules()
    for rule in rules:
        assert "for" in rule and rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    everything = " ".join(rule["expr"] for rule in rules)
    for needle in ("splitter_upstream_requests_total", "splitter_spool_oldest_event_age_seconds", "deriv(splitter_spool_bytes",
                   "splitter_events_dropped_total", "splitter_mirror_dropped_total", "splitter_events_dead_lettered_total",
                   'splitter_config_reloads_total{result=~"error|refused"}', "splitter_breaker_state) == 2", "up{", 'role="mirror"',
                   "rate(splitter_dedup_store_errors_total"):
        assert needle in everything, needle


def test_alert_metrics_exist_in_the_registry() -> None:
    known = exported_metric_names()
    for rule in _alert_rules():
        used = splitter_names(rule["expr"])
        assert used <= known, f"{rule['alert']}: unknown metrics {sorted(used - known)}"


# --------------------------------------------------------------------------- Grafana

def _exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return own + [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def test_dashboard_is_valid_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    variables = dash["templating"]["list"]
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in variables)
    ids = [panel["id"] for panel in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def test_dashboard_has_the_migration_panels() -> None:
    text = " ".join(_exprs(json.loads(DASHBOARD.read_text())))
    for needle in ("splitter_rollout_percent", "rate(splitter_events_total[1m])", "by (destination, role)",
                   "histogram_quantile(0.5,", "histogram_quantile(0.95,", "histogram_quantile(0.99,",
                   "splitter_upstream_duration_seconds_bucket", "splitter_spool_records", "splitter_spool_oldest_event_age_seconds",
                   "splitter_config_reloads_total", "splitter_requests_total", "splitter_events_dead_lettered_total",
                   "splitter_events_dropped_total", "splitter_breaker_state"):
        assert needle in text, needle


def test_dashboard_metrics_exist_in_the_registry() -> None:
    known = exported_metric_names()
    exprs = _exprs(json.loads(DASHBOARD.read_text()))
    assert exprs
    for expr in exprs:
        assert splitter_names(expr), expr
        assert splitter_names(expr) <= known, f"{expr}: unknown metrics {sorted(splitter_names(expr) - known)}"


# --------------------------------------------------------------------------- migration rules

def _check(path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(RULES_ENV)
    return subprocess.run(splitter_command("check", str(path)), capture_output=True, text=True, env=env, timeout=60)


def test_every_migration_phase_ships_a_rules_file() -> None:
    assert [p.name for p in MIGRATION] == [
        "migration-1-server-side.yaml", "migration-2-client-apps-webhook.yaml", "migration-2-client-apps.yaml",
        "migration-3-parallel.yaml", "migration-5-widening.yaml", "migration-6-cutover.yaml",
    ]


@pytest.mark.parametrize("path", MIGRATION, ids=lambda p: p.name)
def test_migration_rules_pass_splitter_check(path: Path) -> None:
    result = _check(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: ok: ")


def _load(name: str):  # type: ignore[no-untyped-def]
    env = dict(os.environ)
    env.update(RULES_ENV)
    return load_rules(str(RULES_DIR / name), env)


def _percents(rules) -> dict[str, dict[str, float]]:  # type: ignore[no-untyped-def]
    return {r.name: dict(r.route.split.percents) for r in rules.rules if r.route.split}


def test_widening_only_adds_users() -> None:
    parallel, widening = _load("migration-3-parallel.yaml"), _load("migration-5-widening.yaml")
    before, after = _percents(parallel), _percents(widening)
    common = before.keys() & after.keys()
    assert common
    salts = {r.name: r.cohort for r in parallel.rules}
    for name in common:
        assert {r.name: r.cohort for r in widening.rules}[name] == salts[name], f"{name}: same salt and key"
        assert after[name]["rudderstack"] > before[name]["rudderstack"], name
    report = compare(parallel, widening)
    assert report.refused == ()
    assert report.rollbacks == ()
    assert all(change.buckets_back == 0 and change.buckets_forward > 0 for change in report.changes)
    assert {change.rule for change in report.changes} == common


@pytest.mark.parametrize("old,new", [
    ("migration-1-server-side.yaml", "migration-2-client-apps.yaml"),
    ("migration-2-client-apps.yaml", "migration-3-parallel.yaml"),
    ("migration-3-parallel.yaml", "migration-5-widening.yaml"),
    ("migration-5-widening.yaml", "migration-6-cutover.yaml"),
])
def test_every_phase_reloads_without_reshuffle_or_rollback(old: str, new: str) -> None:
    report = compare(_load(old), _load(new))
    assert report.refused == () and report.rollback_entries() == ()


def test_cutover_switches_segment_off() -> None:
    cutover = _load("migration-6-cutover.yaml")
    assert list(cutover.destinations) == ["rudderstack"]


def test_rolling_back_is_allowed_and_reported() -> None:
    report = compare(_load("migration-5-widening.yaml"), _load("migration-3-parallel.yaml"))
    assert report.refused == ()
    assert report.rollbacks and all(change.buckets_back > 0 for change in report.rollbacks)


def test_runbook_names_every_phase_file_and_the_warehouse_caveat() -> None:
    text = (ROOT / "docs" / "migration.md").read_text()
    for path in MIGRATION:
        assert f"rules/{path.name}" in text
    for phrase in ("messageId", "simulate", "--against", "rollback", "splitter_events_total", "splitter_spool_oldest_event_age_seconds",
                   "splitter_events_dead_lettered_total"):
        assert phrase in text, phrase
