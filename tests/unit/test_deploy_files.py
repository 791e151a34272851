"""The deployment files, checked offline (no Docker engine, no cluster here):
docker-compose.yml against the Compose Specification schema (as vendored by check-jsonschema),
deploy/k8s against the Kubernetes schemas (kubernetes-validate, strict: unknown fields fail),
and how they fit together and with the gateway (its metrics, settings and commands)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import prometheus_client
import pytest
import typer.main
import yaml
from pydantic import BaseModel

from propscope_dev.main import app as dev_app
from propscope_server import metrics
from propscope_server.api.rpc_metrics import GO_CODE_NAMES
from propscope_server.api.server import LIVENESS_SERVICE
from propscope_server.config import Limits, Settings
from propscope_server.main import app

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PROMETHEUS_FILE = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD_FILE = GRAFANA / "dashboards" / "propscope.json"
ALERTS_FILE = ROOT / "deploy" / "prometheus" / "alerts.yml"
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.31"
NAMESPACE = "propscope"


# --- docker-compose.yml ---------------------------------------------------------------------


@cache
def compose_schema() -> dict:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def compose_schema_errors(document: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(compose_schema())
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def load_compose() -> dict:
    # YAML merge keys (`<<: *gateway`) are resolved here, as Compose resolves them.
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def test_compose_file_matches_the_compose_specification(compose: dict):
    assert compose_schema()["title"] == "Compose Specification"
    assert compose_schema_errors(compose) == []


def test_the_schema_check_catches_a_misspelled_key():
    document = load_compose()
    gateway = document["services"]["gateway"]
    gateway["healthchek"] = gateway.pop("healthcheck")
    assert any("healthchek" in error for error in compose_schema_errors(document))


def test_long_running_services_have_healthchecks(services: dict):
    # A one-shot service (restart: "no") would have nothing to check once it has finished.
    unchecked = [
        name
        for name, service in services.items()
        if service.get("restart") != "no" and "healthcheck" not in service
    ]
    assert unchecked == []


def test_dependencies_exist_in_the_same_profiles(services: dict):
    """A service may depend only on services that are active whenever it is."""
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
            needed = set(services[dependency].get("profiles", []))
            assert not needed or needed & set(service.get("profiles", [])), (
                f"{name} depends on {dependency}, which only runs with profiles {sorted(needed)}"
            )


@pytest.mark.parametrize(
    ("gateway", "triton"), [("gateway", "triton"), ("gateway-cpu", "triton-cpu")]
)
def test_gateways_wait_for_healthy_triton_and_started_redis(
    services: dict, gateway: str, triton: str
):
    service = services[gateway]
    # Without Redis the gateway serves uncached: waiting for it to be healthy would only
    # keep the gateway down.
    assert service["depends_on"] == {
        triton: {"condition": "service_healthy"},
        "redis": {"condition": "service_started"},
    }
    environment = service["environment"]
    assert environment["PROPSCOPE_TRITON_URL"] == f"{triton}:8001"
    assert environment["REDIS_URL"] == "redis://redis:6379/0"
    assert "8001" in exposed_ports(services[triton])
    assert duration_s(service["stop_grace_period"]) > float(
        environment["PROPSCOPE_SHUTDOWN_GRACE_S"]
    )
    assert environment["PROPSCOPE_AUTH__REQUIRED"] == "true"


@pytest.mark.parametrize("gateway", ["gateway", "gateway-cpu"])
def test_gateway_healthcheck_asks_the_plaintext_health_port(services: dict, gateway: str):
    """Not the serving port: once that speaks TLS, a plaintext check there would fail."""
    environment = services[gateway]["environment"]
    health_port = environment["PROPSCOPE_HEALTH_LISTEN_ADDRESS"].rsplit(":", 1)[1]
    assert health_port != environment["PROPSCOPE_LISTEN_ADDRESS"].rsplit(":", 1)[1]
    test = services[gateway]["healthcheck"]["test"]
    assert test == ["CMD", "propscope-server", "health", f"127.0.0.1:{health_port}"]


def test_compose_publishes_ports_on_localhost_only(services: dict):
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    # Triton and Redis take unauthenticated calls: only the Compose network reaches them.
    assert set(published) == {"gateway", "gateway-cpu", "prometheus", "grafana"}
    for name, ports in published.items():
        for port in ports:
            assert re.fullmatch(r"127\.0\.0\.1:(\d+):\1", str(port)), f"{name}: {port}"


def test_grafana_has_no_default_admin_password(services: dict):
    environment = services["grafana"].get("environment", {})
    if "GF_SECURITY_ADMIN_PASSWORD__FILE" in environment:
        return
    # ${VAR:?message}: Compose refuses to start unless VAR is set and not empty.
    password = environment.get("GF_SECURITY_ADMIN_PASSWORD", "")
    assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", password), password


def test_the_cpu_profile_has_its_own_gateway_and_triton(services: dict):
    assert {name for name, s in services.items() if "cpu" in s.get("profiles", [])} == {
        "gateway-cpu",
        "triton-cpu",
    }
    # The default stack is the GPU one.
    gpu = services["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "--model-config-name=gpu" in services["triton"]["command"]


def test_compose_commands_exist_in_their_distributions(services: dict):
    """The gateway's health check is propscope-server's; the CPU Triton is started by the dev
    tooling's launcher (propscope-dev)."""
    assert "health" in typer.main.get_command(app).commands
    commands = typer.main.get_command(dev_app).commands
    triton_options = {option for p in commands["triton"].params for option in p.opts}
    command = services["triton-cpu"]["command"]
    assert command[:2] == ["propscope-dev", "triton"]
    assert {argument.split("=")[0] for argument in command[2:]} <= triton_options


def test_gateway_environment_names_real_settings(services: dict):
    for name in ("gateway", "gateway-cpu"):
        assert [v for v in services[name]["environment"] if not is_setting(v)] == []


def test_redis_is_a_bounded_lru_cache(services: dict):
    command = services["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert "--maxmemory" in command


def test_compose_files_it_refers_to_exist(compose: dict, services: dict):
    for name, service in services.items():
        if "build" in service:
            assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    # The tokens file is created by whoever runs the stack and must never be committed.
    tokens = compose["secrets"]["propscope_tokens"]["file"]
    assert "/" + tokens.removeprefix("./") in (ROOT / ".gitignore").read_text().splitlines()
    example = json.loads((ROOT / "deploy" / "secrets" / "tokens.example.json").read_text())
    assert example and all(isinstance(v, str) for v in example.values())


def test_images_are_pinned(services: dict):
    images = [s["image"] for s in services.values() if "image" in s] + [
        container["image"] for container in k8s_containers()
    ]
    assert images
    for image in images:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), image


def dockerfile_instructions(name: str) -> list[str]:
    lines = DOCKERFILE.read_text().splitlines()
    return [line.split(None, 1)[1] for line in lines if line.split(None, 1)[:1] == [name]]


def test_gateway_image_base_is_pinned_and_runs_as_non_root():
    (base,) = dockerfile_instructions("FROM")
    # A patch release, not a moving tag such as python:3.11-slim.
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base
    user = dockerfile_instructions("USER")[-1]
    uid, _, gid = user.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can check it; and the uid the manifest uses.
    assert uid.isdigit() and int(uid) != 0, user
    assert gateway_pod()["securityContext"]["runAsUser"] == int(uid)
    assert not gid or gateway_pod()["securityContext"]["runAsGroup"] == int(gid)


# --- Prometheus and Grafana -----------------------------------------------------------------


def stacks(services: dict) -> dict[str, set[str]]:
    """The services of each stack: the default (GPU) one, and one per profile, in which
    `<name>-<profile>` stands in for `<name>` (gateway-cpu for gateway)."""
    default = {name for name, service in services.items() if not service.get("profiles")}
    result = {"default": default}
    for profile in {p for service in services.values() for p in service.get("profiles", [])}:
        own = {name for name, s in services.items() if profile in s.get("profiles", [])}
        result[profile] = own | {name for name in default if f"{name}-{profile}" not in own}
    return result


def test_prometheus_scrapes_services_that_expose_those_ports(services: dict):
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    assert {"gateway:9100", "triton:8002"} <= set(targets)
    for stack, names in stacks(services).items():
        for target in targets:
            host, port = target.split(":")
            answering = [n for n in names if host in network_names(n, services[n])]
            assert len(answering) == 1, f"{stack} stack: {answering} answer to {host}"
            assert port in exposed_ports(services[answering[0]]), f"{answering[0]}: no {port}"
    assert mounted_at(services["prometheus"], "/etc/prometheus/prometheus.yml") == (
        "./deploy/prometheus/prometheus.yml"
    )


def test_grafana_provisioning_fits_compose(services: dict):
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    assert [(d["uid"], d["url"]) for d in datasources] == [("prometheus", "http://prometheus:9090")]
    assert "9090" in exposed_ports(services["prometheus"])
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "propscope.yml").read_text()
    )["providers"]
    grafana = services["grafana"]
    assert mounted_at(grafana, providers[0]["options"]["path"]) == "./deploy/grafana/dashboards"
    assert mounted_at(grafana, "/etc/grafana/provisioning") == "./deploy/grafana/provisioning"


def gateway_metrics() -> dict[str, set[str]]:
    """Every sample name the gateway exposes, with its metric's label names."""
    names = {}
    for collector in vars(metrics).values():
        if not isinstance(collector, prometheus_client.metrics.MetricWrapperBase):
            continue
        labels = set(collector._labelnames)
        for family in collector.describe():
            suffixes = {
                "counter": ["_total"],
                "gauge": [""],
                "histogram": ["_bucket", "_sum", "_count"],
                "info": ["_info"],
            }[family.type]
            if family.type == "info":  # its labels are set with its value
                (sample,) = collector.collect()[0].samples
                labels = set(sample.labels)
            for suffix in suffixes:
                names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


# Replaced by grpc_server_handled_total and grpc_server_handling_seconds; exported for one
# release more, and off the dashboard.
DEPRECATED_FAMILIES = {"propscope_rpc", "propscope_rpc_seconds"}
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"instance", "job"}
GATEWAY_METRIC = re.compile(r"\b(?:propscope|grpc_server)_\w+")


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS_FILE.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def unknown_names(expr: str) -> list[str]:
    """The gateway metrics and labels `expr` names that the gateway does not export."""
    exposed = gateway_metrics()
    queried = set(GATEWAY_METRIC.findall(expr))
    unknown = sorted(queried - set(exposed))
    if unknown or not queried:
        return unknown
    labels = set().union(*(exposed[name] for name in queried)) | TARGET_LABELS
    used = set(re.findall(r"\b(\w+)\s*!?[=~]+\s*\"", expr))
    for grouping in re.findall(r"\bby \(([^)]*)\)", expr):
        used |= {label.strip() for label in grouping.split(",")}
    return sorted(used - labels)


def test_the_name_check_catches_unknown_metrics_and_labels():
    assert (
        unknown_names('sum by (grpc_code) (rate(grpc_server_handled_total{grpc_method="X"}[5m]))')
        == []
    )
    assert unknown_names("rate(grpc_server_handled_totl[5m])") == ["grpc_server_handled_totl"]
    assert unknown_names('sum by (modle) (propscope_property_results_total{status="OK"})') == [
        "modle"
    ]


def test_dashboard_queries_only_metrics_the_gateway_exposes():
    exposed = gateway_metrics()
    assert "grpc_server_handled_total" in exposed and "propscope_build_info" in exposed
    for expr in dashboard_queries():
        assert unknown_names(expr) == [], expr


def family(sample: str) -> str:
    return re.sub(r"_(total|bucket|sum|count)$", "", sample)


def test_dashboard_plots_every_gateway_metric_but_the_deprecated():
    queried = {name for expr in dashboard_queries() for name in GATEWAY_METRIC.findall(expr)}
    plotted = {family(name) for name in queried}
    exported = {family(name) for name in gateway_metrics()}
    assert DEPRECATED_FAMILIES <= exported
    assert exported - DEPRECATED_FAMILIES - plotted == set()
    assert plotted & DEPRECATED_FAMILIES == set()


# go-grpc-prometheus's spelling (api/rpc_metrics.py); the same set as the alert's.
SERVER_CODES = {"Internal", "Unknown", "Unavailable", "DeadlineExceeded", "DataLoss"}


def test_dashboard_error_ratio_counts_server_side_codes_only():
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    (panel,) = [p for p in dashboard["panels"] if "error ratio" in p["title"].lower()]
    (target,) = panel["targets"]
    numerator, _ = target["expr"].split(" / ")
    (codes,) = re.findall(r'grpc_code=~"([^"]*)"', numerator)
    assert set(codes.split("|")) == SERVER_CODES
    assert SERVER_CODES <= set(GO_CODE_NAMES.values())
    assert all(code in panel["description"] for code in SERVER_CODES)
    (alert,) = [rule for rule in alert_rules() if rule["alert"] == "PropscopeHighErrorRatio"]
    (alert_codes,) = re.findall(r'grpc_code=~"([^"]*)"', alert["expr"])
    assert set(alert_codes.split("|")) == SERVER_CODES


def test_alerts_query_only_metrics_the_gateway_exports_and_jobs_prometheus_scrapes():
    jobs = {
        job["job_name"] for job in yaml.safe_load(PROMETHEUS_FILE.read_text())["scrape_configs"]
    }
    rules = alert_rules()
    assert len(rules) >= 5
    for rule in rules:
        expr = rule["expr"]
        assert unknown_names(expr) == [], rule["alert"]
        for job in re.findall(r'\bup\{job="([^"]+)"', expr):
            assert job in jobs, rule["alert"]
        assert GATEWAY_METRIC.search(expr) or "up{" in expr, rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        anchor = rule["alert"].lower()
        assert rule["annotations"]["runbook_url"].endswith(f"/docs/operations.md#{anchor}")


def test_prometheus_loads_the_alert_rules_compose_mounts_beside_its_config(services: dict):
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    assert config["rule_files"] == [ALERTS_FILE.name]
    # Relative rule files are read beside the configuration file.
    assert mounted_at(services["prometheus"], f"/etc/prometheus/{ALERTS_FILE.name}") == (
        "./deploy/prometheus/alerts.yml"
    )


def promtool(*arguments: str, cwd: Path = PROMETHEUS_FILE.parent) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: deploy/scripts/install-system-deps.sh installs prometheus"
    return subprocess.run([binary, *arguments], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "arguments",
    [
        ("check", "config", PROMETHEUS_FILE.name),
        ("check", "rules", ALERTS_FILE.name),
        ("test", "rules", *sorted(p.name for p in PROMETHEUS_FILE.parent.glob("*.test.yml"))),
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool_accepts_the_config_and_rules_and_their_unit_tests_pass(arguments):
    result = promtool(*arguments)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_cover_alerts_and_can_fail(tmp_path: Path):
    tests = [yaml.safe_load(p.read_text()) for p in PROMETHEUS_FILE.parent.glob("*.test.yml")]
    tested = {
        case["alertname"]
        for document in tests
        for group in document["tests"]
        for case in group["alert_rule_test"]
    }
    assert len(tested) >= 2 and tested <= {rule["alert"] for rule in alert_rules()}
    # The same tests against alerts that never fire must fail.
    silent = yaml.safe_load(ALERTS_FILE.read_text())
    for group in silent["groups"]:
        for rule in group["rules"]:
            rule["expr"] = "vector(0) > 1"
    (tmp_path / ALERTS_FILE.name).write_text(yaml.safe_dump(silent))
    (tmp_path / "alerts.test.yml").write_text(
        (PROMETHEUS_FILE.parent / "alerts.test.yml").read_text()
    )
    result = promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr


def test_dashboard_uses_the_provisioned_datasource():
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}
        assert all(target["datasource"] == panel["datasource"] for target in panel["targets"])
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    assert "${DS_" not in DASHBOARD_FILE.read_text()


# --- deploy/scripts/install-system-deps.sh -------------------------------------------------

SYSTEM_DEPS = ROOT / "deploy" / "scripts" / "install-system-deps.sh"
REVIEW_DOC = ROOT / "docs" / "review.md"


def missing_system_packages(tmp_path: Path, libdir_has_libpython: bool) -> list[str]:
    """What the script would install for a Python 3.97 (no system has its libpython)
    whose LIBDIR does or does not hold libpython3.97.so.1.0."""
    libdir = tmp_path / "lib"
    libdir.mkdir()
    if libdir_has_libpython:
        (libdir / "libpython3.97.so.1.0").touch()
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nprintf '3.97\\n{libdir}\\n'\n")
    python.chmod(0o755)
    result = subprocess.run(
        [str(SYSTEM_DEPS), "--dry-run"],
        env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "PYTHON": str(python)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("missing:")]
    return line.removeprefix("missing:").split()


def test_system_deps_take_libpython_from_the_pythons_own_lib_directory(tmp_path: Path):
    """As on setup-python and pyenv: no apt package (ubuntu-24.04 has no libpython3.11)."""
    assert "libpython3.97" not in missing_system_packages(tmp_path, libdir_has_libpython=True)


def test_system_deps_ask_apt_for_libpython_only_when_the_python_has_none(tmp_path: Path):
    assert "libpython3.97" in missing_system_packages(tmp_path, libdir_has_libpython=False)


def test_the_ci_example_checks_the_python_that_builds_the_venv():
    """Under sudo, python3 would be the runner's system Python (3.12 on ubuntu-24.04)."""
    text = REVIEW_DOC.read_text()
    (call,) = [
        line.strip()
        for line in text.splitlines()
        if "install-system-deps.sh" in line and "sudo" in line
    ]
    assert call.startswith('sudo PYTHON="$(command -v python3)" '), call
    assert "apt-get install" not in text


# --- Kubernetes -----------------------------------------------------------------------------


def k8s_files(examples: bool = False) -> list[Path]:
    """The manifests `kubectl apply -k` applies, or (examples=True) the examples of what is
    created out of band (Secrets), which are validated but never applied."""
    return sorted(
        p
        for p in K8S.glob("*.yaml")
        if p.name != "kustomization.yaml" and p.name.endswith(".example.yaml") == examples
    )


def load_k8s(paths: list[Path]) -> tuple[dict, ...]:
    return tuple(
        document for path in paths for document in yaml.safe_load_all(path.read_text()) if document
    )


@cache
def k8s_resources() -> tuple[dict, ...]:
    """The applied manifests, then the examples."""
    return load_k8s(k8s_files()) + k8s_example_resources()


@cache
def k8s_example_resources() -> tuple[dict, ...]:
    return load_k8s(k8s_files(examples=True))


def k8s_resource(kind: str, name: str) -> dict:
    (found,) = [r for r in k8s_resources() if (r["kind"], r["metadata"]["name"]) == (kind, name)]
    return found


def k8s_containers() -> list[dict]:
    return [
        container
        for r in k8s_resources()
        if r["kind"] == "Deployment"
        for container in r["spec"]["template"]["spec"]["containers"]
    ]


def k8s_schema_errors(resource: dict) -> str | None:
    try:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return f"{'.'.join(map(str, error.path))}: {error.message}"
    return None


@pytest.mark.parametrize(
    "resource", k8s_resources(), ids=lambda r: f"{r['kind']}/{r['metadata']['name']}"
)
def test_k8s_manifest_matches_the_kubernetes_schema(resource: dict):
    assert k8s_schema_errors(resource) is None
    if resource["kind"] != "Namespace":
        assert resource["metadata"]["namespace"] == NAMESPACE


def test_the_k8s_schema_check_catches_an_unknown_field():
    deployment = json.loads(json.dumps(k8s_resource("Deployment", "propscope-gateway")))
    deployment["spec"]["template"]["spec"]["containers"][0]["envFrm"] = []
    assert "envFrm" in k8s_schema_errors(deployment)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == NAMESPACE
    assert sorted(kustomization["resources"]) == [p.name for p in k8s_files()]
    # Applying a placeholder Secret would overwrite the real one (and make the placeholder
    # token valid): Secrets are created out of band, shaped as in the examples.
    assert [r for r in load_k8s(k8s_files()) if r["kind"] == "Secret"] == []
    assert {r["kind"] for r in k8s_example_resources()} == {"Secret"}
    images = {image["name"] for image in kustomization["images"]}
    built = {c["image"].split(":")[0] for c in k8s_containers()} - {"redis"}
    assert built == images


def gateway_pod() -> dict:
    return k8s_resource("Deployment", "propscope-gateway")["spec"]["template"]["spec"]


def secret_value(reference: dict) -> str:
    """A secretKeyRef's value in the example Secrets."""
    secret = k8s_resource("Secret", reference["name"])
    return (secret.get("stringData", {}) | secret.get("data", {}))[reference["key"]]


def container_environment(container: dict) -> dict[str, str]:
    """Its environment, with Secrets' values taken from the examples."""
    environment = {}
    for source in container.get("envFrom", []):
        environment |= k8s_resource("ConfigMap", source["configMapRef"]["name"])["data"]
    for variable in container.get("env", []):
        if "value" in variable:
            environment[variable["name"]] = variable["value"]
        else:
            environment[variable["name"]] = secret_value(variable["valueFrom"]["secretKeyRef"])
    return environment


def gateway_environment() -> dict[str, str]:
    (container,) = gateway_pod()["containers"]
    return container_environment(container)


def deployment_pods() -> dict[str, dict]:
    return {
        r["metadata"]["name"]: r["spec"]["template"]
        for r in k8s_resources()
        if r["kind"] == "Deployment"
    }


def test_k8s_secrets_the_pods_use_have_examples():
    for name, pod in deployment_pods().items():
        for volume in pod["spec"].get("volumes", []):
            if "secret" in volume:
                k8s_resource("Secret", volume["secret"]["secretName"])
        for container in pod["spec"]["containers"]:
            for variable in container.get("env", []):
                reference = variable.get("valueFrom", {}).get("secretKeyRef")
                assert reference is None or secret_value(reference), (name, variable["name"])
        assert pod["spec"]["automountServiceAccountToken"] is False, name


def test_k8s_gateway_drains_before_it_is_killed():
    (container,) = gateway_pod()["containers"]
    pause = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    grace = float(gateway_environment()["PROPSCOPE_SHUTDOWN_GRACE_S"])
    assert gateway_pod()["terminationGracePeriodSeconds"] > grace + float(pause[1])


def test_k8s_gateway_settings_and_mounted_files():
    environment = gateway_environment()
    assert [name for name in environment if not is_setting(name)] == []
    assert environment["PROPSCOPE_AUTH__REQUIRED"] == "true"
    # The Redis URL carries its password: from a Secret, never from the ConfigMap.
    (container,) = gateway_pod()["containers"]
    (redis_url,) = [v for v in container["env"] if v["name"] == "REDIS_URL"]
    assert redis_url["valueFrom"]["secretKeyRef"]["name"] == "propscope-redis"
    assert all(
        "REDIS_URL" not in k8s_resource("ConfigMap", source["configMapRef"]["name"])["data"]
        for source in container["envFrom"]
    )
    pod = gateway_pod()
    (container,) = pod["containers"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in container["volumeMounts"]}
    files = [value for name, value in environment.items() if name.endswith("_FILE")]
    assert len(files) == 4  # tokens, TLS certificate, key and client CA
    for file in files:
        path = Path(file)
        secret = k8s_resource("Secret", mounts[str(path.parent)]["secret"]["secretName"])
        assert path.name in secret.get("stringData", {}) | secret.get("data", {}), file


def test_k8s_urls_name_services_and_their_ports():
    environment = gateway_environment()
    for url in (environment["PROPSCOPE_TRITON_URL"], environment["REDIS_URL"]):
        host, port = re.fullmatch(
            r"(?:redis://(?::[^@/]+@)?)?([\w-]+):(\d+)(?:/\d+)?", url
        ).groups()
        ports = [p["port"] for p in k8s_resource("Service", host)["spec"]["ports"]]
        assert int(port) in ports, url


def test_k8s_redis_requires_the_password_the_gateway_sends():
    (container,) = deployment_pods()["redis"]["spec"]["containers"]
    environment = container_environment(container)
    arguments = container["args"]
    variable = re.fullmatch(r"\$\((\w+)\)", arguments[arguments.index("--requirepass") + 1])[1]
    password = environment[variable]
    assert password and environment.get("REDISCLI_AUTH") == password
    assert re.fullmatch(r"redis://:([^@/]+)@.*", gateway_environment()["REDIS_URL"])[1] == password
    # redis-cli exits 0 on an error reply (NOAUTH): the probe must look for PONG itself.
    probe = " ".join(container["readinessProbe"]["exec"]["command"])
    assert "PONG" in probe


def test_k8s_services_select_pods_and_their_named_ports():
    for service in [r for r in k8s_resources() if r["kind"] == "Service"]:
        selector = service["spec"]["selector"]
        pods = [
            r["spec"]["template"]
            for r in k8s_resources()
            if r["kind"] == "Deployment"
            and selector.items() <= r["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, service["metadata"]["name"]
        names = {p["name"] for c in pods[0]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= names


def test_k8s_gateway_scaling_and_disruption_budget():
    deployment = k8s_resource("Deployment", "propscope-gateway")
    autoscaler = k8s_resource("HorizontalPodAutoscaler", "propscope-gateway")
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    # The autoscaler owns the count: `replicas` here would reset it at every apply.
    assert "replicas" not in deployment["spec"]
    # Utilization is relative to the request: without one the autoscaler does nothing.
    assert all("cpu" in c["resources"]["requests"] for c in gateway_pod()["containers"])
    budget = k8s_resource("PodDisruptionBudget", "propscope-gateway")
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]
    assert budget["spec"]["minAvailable"] < autoscaler["spec"]["minReplicas"]
    # During a Triton outage every gateway is unready; drains must still evict them.
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert gateway_pod()["securityContext"]["runAsNonRoot"] is True


def test_k8s_gateway_probes_ask_the_plaintext_health_port():
    (container,) = gateway_pod()["containers"]
    health_port = int(gateway_environment()["PROPSCOPE_HEALTH_LISTEN_ADDRESS"].rsplit(":", 1)[1])
    assert health_port in {port["containerPort"] for port in container["ports"]}
    # Ready: the whole gateway (service "") is SERVING, i.e. Triton answers.
    assert container["readinessProbe"]["grpc"] == {"port": health_port}
    # Live: the event loop runs, whatever Triton does, so a Triton outage restarts nothing.
    for probe in ("livenessProbe", "startupProbe"):
        assert container[probe]["grpc"] == {"port": health_port, "service": LIVENESS_SERVICE}


def test_k8s_gateway_memory_fits_requests_at_the_path_pixel_limit():
    (container,) = gateway_pod()["containers"]
    resources = container["resources"]
    # config.py: a request peaks near 20 bytes per path pixel; leave room for three.
    peak = 20 * Limits().max_path_pixels
    assert byte_size(resources["limits"]["memory"]) >= 3 * peak
    assert byte_size(resources["requests"]["memory"]) <= byte_size(resources["limits"]["memory"])


def test_k8s_triton_gets_a_gpu():
    pod = k8s_resource("Deployment", "triton")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert "--model-config-name=gpu" in container["args"]


def test_k8s_redis_is_a_bounded_lru_cache_within_its_memory_limit():
    settings = dict(
        line.split(None, 1)
        for line in k8s_resource("ConfigMap", "redis")["data"]["redis.conf"].splitlines()
        if line and not line.startswith("#")
    )
    assert settings["maxmemory-policy"] == "allkeys-lru"
    pod = k8s_resource("Deployment", "redis")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert byte_size(settings["maxmemory"]) < byte_size(container["resources"]["limits"]["memory"])


def ingress_sources(pod: dict, port: int) -> list[dict | None] | None:
    """Who the NetworkPolicies let reach this port of the pod: a list of `from` peers (None:
    from anywhere), or None when no policy selects the pod (everything is allowed)."""
    labels = pod["metadata"]["labels"]
    names = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}
    policies = [
        r["spec"]
        for r in k8s_resources()
        if r["kind"] == "NetworkPolicy"
        and r["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
        and "Ingress" in r["spec"]["policyTypes"]
    ]
    if not policies:
        return None
    sources = []
    for policy in policies:
        for rule in policy.get("ingress", []):
            ports = [names.get(p["port"], p["port"]) for p in rule.get("ports", [])]
            if not ports or port in ports:
                sources += rule.get("from") or [None]
    return sources


GATEWAY_PEER = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "propscope-gateway"}}}


def test_k8s_network_policies_admit_only_the_gateway_to_redis_and_triton():
    pods = deployment_pods()
    assert ingress_sources(pods["redis"], 6379) == [GATEWAY_PEER]
    assert ingress_sources(pods["triton"], 8001) == [GATEWAY_PEER]
    assert ingress_sources(pods["triton"], 8000) == [GATEWAY_PEER]
    # Metrics: any pod of the namespace (Prometheus), nothing from outside it.
    metrics_sources = ingress_sources(pods["triton"], 8002)
    assert metrics_sources and all(set(peer) == {"podSelector"} for peer in metrics_sources)
    # A port nobody is admitted to.
    assert ingress_sources(pods["redis"], 6380) == []
    # The gateway's own ports are open to all.
    (gateway,) = pods["propscope-gateway"]["spec"]["containers"]
    for port in gateway["ports"]:
        assert None in ingress_sources(pods["propscope-gateway"], port["containerPort"]), port


# --- helpers --------------------------------------------------------------------------------


def is_setting(variable: str) -> bool:
    """Whether the gateway reads this environment variable (config.Settings)."""
    if variable == "REDIS_URL":
        return True
    if not variable.startswith("PROPSCOPE_"):
        return False
    model = Settings
    for part in variable.removeprefix("PROPSCOPE_").lower().split("__"):
        is_model = isinstance(model, type) and issubclass(model, BaseModel)
        field = model.model_fields.get(part) if is_model else None
        if field is None:
            return False
        model = field.annotation
    return True


def exposed_ports(service: dict) -> set[str]:
    """Container ports a compose service publishes or exposes."""
    published = {str(port).split(":")[-1] for port in service.get("ports", [])}
    return published | {str(port) for port in service.get("expose", [])}


def network_names(name: str, service: dict) -> set[str]:
    aliases = service.get("networks", {}).get("default", {}).get("aliases", [])
    return {name, *aliases}


def mounted_at(service: dict, target: str) -> str | None:
    for volume in service.get("volumes", []):
        source, mount, *_ = volume.split(":")
        if mount == target:
            return source
    return None


def duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert "".join(number + unit for number, unit in parts) == text, text
    return sum(float(number) * units[unit] for number, unit in parts)


def byte_size(text: str) -> int:
    """Redis (2gb) and Kubernetes (2560Mi, 2G) sizes."""
    number, unit = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", text).groups()
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "kb": 2**10, "mb": 2**20, "gb": 2**30}
    scale |= {"ki": 2**10, "mi": 2**20, "gi": 2**30}
    return int(number) * scale[unit.lower()]
