"""The deployment files, checked offline (no Docker engine, no cluster here):
docker-compose.yml against the Compose Specification schema (as vendored by check-jsonschema),
deploy/k8s against the Kubernetes schemas (kubernetes-validate, strict: unknown fields fail),
with its Redis Cluster component and review Job examples, and how they fit together and with
the gateway and the CLI (their metrics, settings, URLs, commands and options)."""

from __future__ import annotations

import copy
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

from propscope.cli import app as client_app
from propscope_dev.main import app as dev_app
from propscope_server import metrics
from propscope_server.api.rpc_metrics import GO_CODE_NAMES
from propscope_server.api.server import LIVENESS_SERVICE
from propscope_server.backends.triton_endpoints import parse_triton_url
from propscope_server.cache.redis_url import parse_redis_url
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
K8S_EXAMPLES = K8S / "examples"
REDIS_CLUSTER = K8S / "components" / "redis-cluster"
REDIS_CLUSTER_OVERLAY = ROOT / "deploy" / "overlays" / "redis-cluster"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
SCRAPE_CONFIG = K8S / "prometheus-adapter" / "prometheus-scrape.yml"
CLIENT_DOCKERFILE = ROOT / "deploy" / "client" / "Dockerfile"
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


def dockerfile_instructions(name: str, dockerfile: Path = DOCKERFILE) -> list[str]:
    lines = dockerfile.read_text().splitlines()
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


@cache
def redis_cluster_resources() -> tuple[dict, ...]:
    """The resources the Redis Cluster component adds."""
    kustomization = yaml.safe_load((REDIS_CLUSTER / "kustomization.yaml").read_text())
    return load_k8s([REDIS_CLUSTER / name for name in kustomization["resources"]])


@cache
def review_job_resources() -> tuple[dict, ...]:
    """The sharded review example (Jobs and their volumes), applied with kubectl apply -f."""
    return load_k8s(sorted(K8S_EXAMPLES.glob("*.yaml")))


def k8s_resource(kind: str, name: str, among: tuple[dict, ...] | None = None) -> dict:
    """The one resource of that kind and name among the manifests (default: deploy/k8s's)."""
    among = k8s_resources() if among is None else among
    (found,) = [r for r in among if (r["kind"], r["metadata"]["name"]) == (kind, name)]
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
    "resource",
    k8s_resources() + redis_cluster_resources() + review_job_resources(),
    ids=lambda r: f"{r['kind']}/{r['metadata']['name']}",
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
    """Its environment, with Secrets' values taken from the examples (a pod's own fields, known
    only when it runs, left out)."""
    environment = {}
    for source in container.get("envFrom", []):
        environment |= k8s_resource("ConfigMap", source["configMapRef"]["name"])["data"]
    for variable in container.get("env", []):
        if "value" in variable:
            environment[variable["name"]] = variable["value"]
        elif "secretKeyRef" in variable["valueFrom"]:
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


def test_k8s_redis_url_names_the_redis_service_and_its_port():
    url = gateway_environment()["REDIS_URL"]
    host, port = re.fullmatch(r"redis://(?::[^@/]+@)?([\w-]+):(\d+)(?:/\d+)?", url).groups()
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


@pytest.mark.parametrize("manifests", ["deploy/k8s", "deploy/overlays/redis-cluster"])
def test_k8s_services_select_pods_and_their_named_ports(manifests: str):
    among = k8s_resources() if manifests == "deploy/k8s" else redis_cluster_rendered()
    for service in [r for r in among if r["kind"] == "Service"]:
        pods = selected_pods(service, among)
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


def ingress_sources(
    pod: dict, port: int, among: tuple[dict, ...] | None = None
) -> list[dict | None] | None:
    """Who the NetworkPolicies (default: deploy/k8s's) let reach this port of the pod: a list
    of `from` peers (None: from anywhere), or None when no policy selects the pod (everything
    is allowed)."""
    labels = pod["metadata"]["labels"]
    names = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}
    policies = [
        r["spec"]
        for r in (k8s_resources() if among is None else among)
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
MONITORING = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}


def test_k8s_network_policies_admit_only_the_gateway_to_redis_and_triton():
    pods = deployment_pods()
    assert ingress_sources(pods["redis"], 6379) == [GATEWAY_PEER]
    assert ingress_sources(pods["triton"], 8001) == [GATEWAY_PEER]
    assert ingress_sources(pods["triton"], 8000) == [GATEWAY_PEER]
    # Metrics: any pod of the namespace, and of the namespace monitoring (the Prometheus the
    # Triton autoscaler reads through), nothing else.
    metrics_sources = ingress_sources(pods["triton"], 8002)
    assert {"podSelector": {}} in metrics_sources
    for peer in metrics_sources:
        assert peer == {"podSelector": {}} or peer == {"namespaceSelector": MONITORING}, peer
    # A port nobody is admitted to.
    assert ingress_sources(pods["redis"], 6380) == []
    # The gateway's own ports are open to all.
    (gateway,) = pods["propscope-gateway"]["spec"]["containers"]
    for port in gateway["ports"]:
        assert None in ingress_sources(pods["propscope-gateway"], port["containerPort"]), port


# --- Kubernetes at scale: many Tritons, many gateways, Redis Cluster, sharded reviews -------


def strategic_merge(base: object, patch: object) -> object:
    """Kustomize's strategic merge as far as the component's patches use it: maps merge key by
    key, lists of named items (containers, env) merge item by item by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return base | {k: strategic_merge(base[k], v) if k in base else v for k, v in patch.items()}
    named = isinstance(base, list) and isinstance(patch, list)
    if named and all(isinstance(item, dict) and "name" in item for item in base + patch):
        merged = list(base)
        for item in patch:
            at = [i for i, old in enumerate(merged) if old["name"] == item["name"]]
            if at:
                merged[at[0]] = strategic_merge(merged[at[0]], item)
            else:
                merged.append(item)
        return merged
    return patch


@cache
def redis_cluster_rendered() -> tuple[dict, ...]:
    """deploy/overlays/redis-cluster: deploy/k8s with the Redis Cluster component, merged here
    as kustomize merges it (the test below compares with kustomize where it is installed), and
    the example Secrets."""
    kustomization = yaml.safe_load((REDIS_CLUSTER / "kustomization.yaml").read_text())
    rendered = list(copy.deepcopy(load_k8s(k8s_files()))) + list(redis_cluster_resources())
    for entry in kustomization["patches"]:
        text = entry["patch"] if "patch" in entry else (REDIS_CLUSTER / entry["path"]).read_text()
        patch = yaml.safe_load(text)
        key = (patch["kind"], patch["metadata"]["name"])
        (at,) = [i for i, r in enumerate(rendered) if (r["kind"], r["metadata"]["name"]) == key]
        if patch.get("$patch") == "delete":
            del rendered[at]
        else:
            rendered[at] = strategic_merge(rendered[at], patch)
    return tuple(rendered) + k8s_example_resources()


def identities(resources: tuple[dict, ...]) -> list[tuple[str, str]]:
    return sorted((r["kind"], r["metadata"]["name"]) for r in resources)


def kustomize_build(directory: Path) -> tuple[dict, ...] | None:
    """What kustomize renders of the directory; None where neither kustomize nor kubectl is
    installed (neither is a dependency of the tests)."""
    if kustomize := shutil.which("kustomize"):
        command = [kustomize, "build", str(directory)]
    elif kubectl := shutil.which("kubectl"):
        command = [kubectl, "kustomize", str(directory)]
    else:
        return None
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return tuple(document for document in yaml.safe_load_all(result.stdout) if document)


def test_the_redis_cluster_overlay_renders_as_kustomize_builds_it():
    built = kustomize_build(REDIS_CLUSTER_OVERLAY)
    if built is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    rendered = redis_cluster_rendered()[: -len(k8s_example_resources())]
    assert identities(built) == identities(rendered)
    # The single Redis is gone, and the gateway reads the cluster's URL.
    assert ("Deployment", "redis") not in identities(built)
    (built_gateway,), (gateway,) = (
        k8s_resource("Deployment", "propscope-gateway", among)["spec"]["template"]["spec"][
            "containers"
        ]
        for among in (built, rendered)
    )
    assert built_gateway["env"] == gateway["env"]
    base = kustomize_build(K8S)
    assert identities(base) == identities(load_k8s(k8s_files()))


def pods_of(among: tuple[dict, ...]) -> dict[str, dict]:
    """The pod templates of the Deployments, StatefulSets and Jobs, by their owner's name."""
    kinds = {"Deployment", "StatefulSet", "Job"}
    return {r["metadata"]["name"]: r["spec"]["template"] for r in among if r["kind"] in kinds}


def selected_pods(service: dict, among: tuple[dict, ...]) -> list[dict]:
    selector = service["spec"]["selector"]
    return [
        pod
        for pod in pods_of(among).values()
        if selector.items() <= pod["metadata"]["labels"].items()
    ]


def headless_service(host: str, among: tuple[dict, ...]) -> dict:
    """The Service that `<service>.propscope.svc.cluster.local` names. Headless: the name
    resolves to every ready pod, not to one virtual IP that balances connections."""
    match = re.fullmatch(rf"([\w-]+)\.{NAMESPACE}\.svc\.cluster\.local", host)
    assert match, f"{host}: not the full DNS name of a Service of namespace {NAMESPACE}"
    service = k8s_resource("Service", match[1], among)
    assert service["spec"].get("clusterIP") == "None", f"{match[1]} is not headless"
    return service


def test_k8s_gateway_balances_over_every_triton_pod_of_a_headless_service():
    url = gateway_environment()["PROPSCOPE_TRITON_URL"]
    Settings(triton_url=url)  # the gateway accepts it
    target = parse_triton_url(url)
    assert target.dns_host, f"{url}: a dns:/// URL, re-resolved as Triton pods come and go"
    service = headless_service(target.dns_host, k8s_resources())
    assert target.dns_port in [port["port"] for port in service["spec"]["ports"]]
    triton = k8s_resource("Deployment", "triton")["spec"]["template"]
    assert selected_pods(service, k8s_resources()) == [triton]
    # The gateway reaches every one of those pods (one policy for all of them).
    assert ingress_sources(triton, target.dns_port) == [GATEWAY_PEER]


def test_k8s_gateways_have_a_headless_service_for_round_robin_callers():
    headless = headless_service(
        f"propscope-gateway-headless.{NAMESPACE}.svc.cluster.local", k8s_resources()
    )
    gateway = k8s_resource("Deployment", "propscope-gateway")["spec"]["template"]
    assert selected_pods(headless, k8s_resources()) == [gateway]
    grpc_port = int(gateway_environment()["PROPSCOPE_LISTEN_ADDRESS"].rsplit(":", 1)[1])
    assert [port["port"] for port in headless["spec"]["ports"]] == [grpc_port]


def adapter_rule() -> dict:
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rule


def test_k8s_triton_scales_on_the_adapters_saturation_metric():
    deployment = k8s_resource("Deployment", "triton")
    autoscaler = k8s_resource("HorizontalPodAutoscaler", "triton")
    assert autoscaler["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "triton",
    }
    assert "replicas" not in deployment["spec"]
    # A surge pod would wait for a GPU the replicas hold.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    (metric,) = autoscaler["spec"]["metrics"]
    assert metric["type"] == "Pods"
    rule = adapter_rule()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert {"namespace", "pod"} == set(rule["resources"]["overrides"])
    budget = k8s_resource("PodDisruptionBudget", "triton")
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]
    assert budget["spec"]["maxUnavailable"] < autoscaler["spec"]["minReplicas"]


def test_the_adapter_rule_is_valid_promql_over_the_series_it_selects(tmp_path: Path):
    rule = adapter_rule()
    (series,) = re.findall(r"^(\w+)\{", rule["seriesQuery"])
    assert re.fullmatch(rule["name"]["matches"], series)
    query = rule["metricsQuery"]
    assert series in query and "<<.LabelMatchers>>" in query and "<<.GroupBy>>" in query
    expr = query.replace("<<.LabelMatchers>>", 'namespace="propscope",pod=~"triton-.*"')
    expr = expr.replace("<<.GroupBy>>", "pod")
    rules = {"groups": [{"name": "adapter", "rules": [{"record": "adapter:query", "expr": expr}]}]}
    (tmp_path / "adapter.yml").write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", "adapter.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # promtool is what catches a wrong query: the same with a syntax error fails.
    rules["groups"][0]["rules"][0]["expr"] = expr.replace(")", "", 1)
    (tmp_path / "adapter.yml").write_text(yaml.safe_dump(rules))
    assert promtool("check", "rules", "adapter.yml", cwd=tmp_path).returncode != 0


def relabel(labels: dict[str, str], configs: list[dict]) -> dict[str, str] | None:
    """Prometheus's relabelling (actions keep and replace, as the scrape job uses them): the
    target's labels after it, or None when it is dropped."""
    labels = dict(labels)
    for config in configs:
        value = ";".join(labels.get(name, "") for name in config["source_labels"])
        match = re.fullmatch(config.get("regex", "(.*)"), value)
        action = config.get("action", "replace")
        if action == "keep":
            if not match:
                return None
        elif action == "replace" and match:
            replacement = config.get("replacement", "$1")
            labels[config["target_label"]] = re.sub(r"\$(\d+)", r"\\\1", replacement)
            labels[config["target_label"]] = match.expand(labels[config["target_label"]])
        else:
            assert action == "replace", action
    return labels


def test_prometheus_scrapes_triton_metrics_labelled_by_pod_as_the_adapter_needs():
    (job,) = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    pod = k8s_resource("Deployment", "triton")["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    metrics_port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    discovered = {
        "__address__": "10.1.2.3:8000",
        "__meta_kubernetes_namespace": NAMESPACE,
        "__meta_kubernetes_pod_name": "triton-5d8c7-x2x9q",
    }
    for key, value in pod["metadata"]["annotations"].items():
        discovered["__meta_kubernetes_pod_annotation_" + re.sub(r"\W", "_", key)] = value
    labels = relabel(discovered, job["relabel_configs"])
    assert labels["__address__"] == f"10.1.2.3:{metrics_port}"
    assert labels["__metrics_path__"] == "/metrics"
    # The labels the adapter maps to the pod.
    overrides = adapter_rule()["resources"]["overrides"]
    assert {label: labels[label] for label in overrides} == {
        "namespace": NAMESPACE,
        "pod": "triton-5d8c7-x2x9q",
    }
    # A pod without the annotation is not scraped.
    del discovered["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    assert relabel(discovered, job["relabel_configs"]) is None
    # And the namespace of that Prometheus may reach the metrics port.
    assert {"namespaceSelector": MONITORING} in ingress_sources(pod, metrics_port)


def redis_conf(config_map: dict) -> dict[str, str]:
    return dict(
        line.split(None, 1)
        for line in config_map["data"]["redis.conf"].splitlines()
        if line and not line.startswith("#")
    )


def test_k8s_redis_cluster_replaces_the_single_redis_and_the_gateway_seeds_from_its_nodes():
    rendered = redis_cluster_rendered()
    assert not {("Deployment", "redis"), ("Service", "redis")} & set(identities(rendered))
    (gateway,) = k8s_resource("Deployment", "propscope-gateway", rendered)["spec"]["template"][
        "spec"
    ]["containers"]
    url = container_environment(gateway)["REDIS_URL"]
    Settings(redis_url=url)  # the gateway accepts it
    target = parse_redis_url(url)
    assert target.cluster, url
    ((host, port),) = target.seeds
    service = headless_service(host, rendered)
    statefulset = k8s_resource("StatefulSet", "redis-cluster", rendered)
    assert selected_pods(service, rendered) == [statefulset["spec"]["template"]]
    assert port in [p["port"] for p in service["spec"]["ports"]]
    # Nodes find each other (and the create Job finds them) before they are ready.
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    # Each node announces its stable name under that Service, not a pod IP.
    (node,) = statefulset["spec"]["template"]["spec"]["containers"]
    arguments = node["args"]
    announced = arguments[arguments.index("--cluster-announce-hostname") + 1]
    assert announced == f"$(POD_NAME).{host}"
    (pod_name,) = [v for v in node["env"] if v["name"] == "POD_NAME"]
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # The password the nodes require is the one the gateway and the create Job send.
    environment = container_environment(node)
    password = environment[
        re.fullmatch(r"\$\((\w+)\)", arguments[arguments.index("--requirepass") + 1])[1]
    ]
    assert re.fullmatch(r"redis\+cluster://:([^@/]+)@.*", url)[1] == password
    assert environment["REDISCLI_AUTH"] == password
    (create,) = k8s_resource("Job", "redis-cluster-create", rendered)["spec"]["template"]["spec"][
        "containers"
    ]
    assert container_environment(create)["REDISCLI_AUTH"] == password
    assert "PONG" in " ".join(node["readinessProbe"]["exec"]["command"])


def test_k8s_redis_cluster_nodes_are_bounded_caches_serving_without_full_coverage():
    rendered = redis_cluster_rendered()
    settings = redis_conf(k8s_resource("ConfigMap", "redis-cluster", rendered))
    assert settings["cluster-enabled"] == "yes"
    # One node down: its slots miss, the others keep serving theirs.
    assert settings["cluster-require-full-coverage"] == "no"
    assert settings["maxmemory-policy"] == "allkeys-lru"
    assert settings["cluster-preferred-endpoint-type"] == "hostname"
    statefulset = k8s_resource("StatefulSet", "redis-cluster", rendered)
    pod = statefulset["spec"]["template"]["spec"]
    (node,) = pod["containers"]
    assert byte_size(settings["maxmemory"]) < byte_size(node["resources"]["limits"]["memory"])
    # nodes.conf (the node's identity and slots) outlives the pod: on a claimed volume.
    mounts = {m["mountPath"]: m["name"] for m in node["volumeMounts"]}
    config_dir = str(Path(settings["cluster-config-file"]).parent)
    claims = [claim["metadata"]["name"] for claim in statefulset["spec"]["volumeClaimTemplates"]]
    assert mounts[config_dir] in claims
    ports = {p["name"]: p["containerPort"] for p in node["ports"]}
    assert ports["cluster-bus"] == ports["redis"] + 10000
    # The create Job makes a cluster of every node of the StatefulSet.
    (create,) = k8s_resource("Job", "redis-cluster-create", rendered)["spec"]["template"]["spec"][
        "containers"
    ]
    environment = container_environment(create)
    assert int(environment["REDIS_CLUSTER_NODES"]) == statefulset["spec"]["replicas"] >= 3
    script = create["command"][-1]
    assert "redis-cli --cluster create" in script and "--cluster-yes" in script
    assert f"redis-cluster-$i.{statefulset['spec']['serviceName']}." in script
    assert node["image"] == create["image"]


def test_k8s_redis_cluster_admits_the_gateway_the_create_job_and_its_own_bus():
    rendered = redis_cluster_rendered()
    pods = pods_of(rendered)
    node = pods["redis-cluster"]

    def peer(pod: dict) -> dict:
        return {"podSelector": {"matchLabels": {"app.kubernetes.io/name": name_of(pod)}}}

    def name_of(pod: dict) -> str:
        return pod["metadata"]["labels"]["app.kubernetes.io/name"]

    clients = ingress_sources(node, 6379, rendered)
    expected = [peer(pods[name]) for name in ("propscope-gateway", "redis-cluster-create")]
    assert sorted(map(str, clients)) == sorted(map(str, [*expected, peer(node)]))
    # The cluster bus has no password: the nodes only.
    assert ingress_sources(node, 16379, rendered) == [peer(node)]
    assert name_of(pods["redis-cluster-create"]) != name_of(node)  # not a Service endpoint


def review_jobs() -> tuple[dict, dict]:
    among = review_job_resources()
    return (
        k8s_resource("Job", "propscope-review-shards", among),
        k8s_resource("Job", "propscope-review-merge", among),
    )


def parse_cli(argv: list[str]) -> tuple[list[str], dict]:
    """The command names `propscope ARGV` runs and its options' values, as the CLI parses
    them (running nothing, checking no file); every option must be one of the command it
    follows (the root's before the first command name)."""
    command = typer.main.get_command(client_app)
    root_options = {opt for param in command.params for opt in param.opts + param.secondary_opts}
    context = command.make_context("propscope", list(argv), resilient_parsing=True)
    names = []
    while hasattr(command, "resolve_command"):
        arguments = [*context._protected_args, *context.args]
        name, command, rest = command.resolve_command(context, arguments)
        names.append(name)
        context = command.make_context(name, rest, parent=context, resilient_parsing=True)
    options = {opt for param in command.params for opt in param.opts + param.secondary_opts}
    first = argv.index(names[0])
    for at, token in enumerate(argv):
        if token.startswith("-"):
            known = root_options if at < first else options
            assert token.split("=")[0] in known, f"propscope {' '.join(names)}: unknown {token}"
    return names, context.params


def test_the_cli_check_catches_an_unknown_option():
    with pytest.raises(AssertionError, match="--shrd"):
        parse_cli(["review", "/spec/review.yaml", "--shrd=0/3"])


def test_k8s_review_shards_run_one_shard_per_index_against_every_gateway():
    shards, _ = review_jobs()
    spec = shards["spec"]
    assert spec["completionMode"] == "Indexed"
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    gateway = k8s_resource("Deployment", "propscope-gateway")["spec"]["template"]
    for index in range(spec["completions"]):
        argv = [a.replace("$(JOB_COMPLETION_INDEX)", str(index)) for a in container["command"]]
        assert argv[0] == "propscope"
        names, options = parse_cli(argv[1:])
        assert names == ["review", "run"]
        # 0-based, as the completion index; every index runs at once.
        shard, count = map(int, options["shard"].split("/"))
        assert (shard, count) == (index, spec["completions"]) == (index, spec["parallelism"])
        assert options["out"] == Path(f"/results/shard-{index}")
        # Calls balance over every gateway: the CLI resolves a dns:/// target to all of a
        # headless Service's addresses.
        assert options["target"].startswith("dns:///"), options["target"]
        host, port = options["target"].removeprefix("dns:///").rsplit(":", 1)
        service = headless_service(host, k8s_resources())
        assert int(port) in [p["port"] for p in service["spec"]["ports"]]
        assert selected_pods(service, k8s_resources()) == [gateway]
        assert None in ingress_sources(gateway, int(port))
    # The gateway requires mutual TLS and a token: the Job has both, from the Secrets.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for option in ("--ca-cert", "--client-cert", "--client-key"):
        (file,) = [a.split("=", 1)[1] for a in container["command"] if a.startswith(option + "=")]
        secret_name = volumes[mounts[str(Path(file).parent)]]["secret"]["secretName"]
        assert Path(file).name in k8s_resource("Secret", secret_name)["stringData"], file
    assert container_environment(container)["PROPSCOPE_TOKEN"]


def test_k8s_review_merge_reads_every_shards_partial_from_the_same_volume():
    shards, merge = review_jobs()
    (shard,) = shards["spec"]["template"]["spec"]["containers"]
    (merger,) = merge["spec"]["template"]["spec"]["containers"]
    shell, flag, line = merger["command"]
    assert (shell, flag) == ("sh", "-c") and line.startswith("exec propscope ")
    names, options = parse_cli(line.split()[2:])
    assert names == ["review", "merge"]
    (pattern,) = options["partials"]
    out = next(a for a in shard["command"] if a.startswith("--out=")).split("=", 1)[1]
    for index in range(shards["spec"]["completions"]):
        written = Path(out.replace("$(JOB_COMPLETION_INDEX)", str(index))) / "review-partial.json"
        assert written.match(str(pattern)), (written, pattern)

    def claim_at(job: dict, container: dict, path: str) -> str:
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        return volumes[mounts[path]]["persistentVolumeClaim"]["claimName"]

    assert claim_at(shards, shard, "/results") == claim_at(merge, merger, "/results")
    claim = k8s_resource(
        "PersistentVolumeClaim", claim_at(merge, merger, "/results"), review_job_resources()
    )
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # shards on several nodes
    assert options["out"].parent == Path("/results")
    # A verdict (1, 4) or a refused merge (2) is final: no retry.
    (rule,) = merge["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and set(rule["onExitCodes"]["values"]) == {1, 2, 4}
    assert rule["onExitCodes"]["containerName"] == merger["name"]


def test_k8s_jobs_run_as_the_client_image_user_without_a_token_to_the_api():
    (user,) = dockerfile_instructions("USER", CLIENT_DOCKERFILE)[-1:]
    uid = int(user.split(":")[0])
    assert "./client[review]" in " ".join(dockerfile_instructions("RUN", CLIENT_DOCKERFILE))
    jobs = [r for r in review_job_resources() + redis_cluster_resources() if r["kind"] == "Job"]
    assert len(jobs) == 3
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", container["image"]), container["image"]
            if "propscope" in container["image"]:
                assert pod["securityContext"]["runAsUser"] == uid
            for variable in container.get("env", []):
                reference = variable.get("valueFrom", {}).get("secretKeyRef")
                assert reference is None or secret_value(reference)


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
