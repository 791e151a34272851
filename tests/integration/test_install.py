"""`pip install ./server` in a clean venv starts the gateway: what the server distribution declares
is all it needs, and that is not the client SDK (only the stubs, propscope-api). The SDK and its
stubs build as sdists, the sdists build as wheels, and the wheels install into another clean venv
and make a real call. Each venv is new and empty; pip may use only build/wheelhouse (the wheels of
the declared dependencies, the build backends and the `build` frontend that `make setup`
downloads) and the local distributions built here from the working tree, so nothing comes from the
network and a dependency or build requirement missing from a pyproject.toml (or a file missing
from an sdist) makes the build, the install or the start fail."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from propscope_dev import stack
from propscope_server.api.server import LIVENESS_SERVICE

ROOT = Path(__file__).resolve().parents[2]
WHEELHOUSE = ROOT / "build" / "wheelhouse"
# Distributions the server may need beside its own: built from the working tree, as an index
# would serve them (the stubs, propscope-api).
LOCAL_DISTRIBUTIONS = ("protos/python",)
# The SDK and the stubs it needs, each built by `python -m build`: an sdist, then a wheel from it.
SDK_DISTRIBUTIONS = ("protos/python", "client")
START_DEADLINE_S = 60.0
IGNORED = shutil.ignore_patterns(
    "node", "__pycache__", "*.egg-info", "build", "*_pb2.py", "*_pb2_grpc.py", "*_pb2.pyi"
)


def _run(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
    return result


def _offline(work: Path, local: Path) -> dict[str, str]:
    """Copies of the working tree's distributions in ``work``, and the environment in which pip
    (and `build`'s isolated environments) sees only the wheelhouse and ``local``: this
    machine's pip.conf and PIP_* variables (its find-links and extra indexes) play no part, and
    no cache either."""
    assert (WHEELHOUSE / ".complete").exists(), f"{WHEELHOUSE} is missing: run `make setup`"
    for part in ("server", "protos", "client"):
        shutil.copytree(ROOT / part, work / part, ignore=IGNORED)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    env |= {
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": f"{WHEELHOUSE} {local}",
        "PIP_NO_CACHE_DIR": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    return env


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A new venv with ./server installed from copies of the working tree."""
    work = tmp_path_factory.mktemp("install")
    local = work / "local-wheels"
    env = _offline(work, local)
    venv = work / "venv"
    _run(sys.executable, "-m", "venv", venv, env=env)
    pip = venv / "bin" / "pip"
    for part in LOCAL_DISTRIBUTIONS:
        _run(pip, "wheel", "--no-deps", "--wheel-dir", local, work / part, env=env)
    _run(pip, "install", work / "server", env=env)
    yield venv, env


def test_the_gateway_imports_and_has_its_commands(clean_venv: tuple[Path, dict[str, str]]) -> None:
    venv, env = clean_venv
    _run(
        venv / "bin" / "python",
        "-c",
        "import propscope_server.main, propscope_server.api.server",
        env=env,
    )
    usage = _run(venv / "bin" / "propscope-server", "--help", env=env).stdout
    for command in ("serve", "health"):
        assert f" {command} " in usage
    # The local stack is the dev tooling's (propscope-dev), not the gateway's.
    for command in ("up", "down", "triton"):
        assert f" {command} " not in usage


def test_the_triton_extra_the_client_and_the_dev_tooling_stay_out(
    clean_venv: tuple[Path, dict[str, str]],
) -> None:
    venv, env = clean_venv
    installed = _run(venv / "bin" / "pip", "list", "--format=json", env=env).stdout
    names = {package["name"].lower() for package in json.loads(installed)}
    assert {"propscope-server", "propscope-api"} <= names
    assert not names & {"propscope", "propscope-dev", "nvidia-pytriton", "torch", "captum"}
    assert not names & {"diffusers", "transformers", "onnxruntime"}
    # The stubs load; the SDK (propscope.Client) is not there.
    probe = "import propscope, propscope.v1.explain_pb2; print(hasattr(propscope, 'Client'))"
    assert _run(venv / "bin" / "python", "-c", probe, env=env).stdout.strip() == "False"


def test_the_gateway_starts_and_answers_health(clean_venv: tuple[Path, dict[str, str]]) -> None:
    """No Triton listens at the gateway's Triton address: the gateway is live and says it cannot
    serve, in JSON logs (python-json-logger, the dependency that was once undeclared)."""
    venv, env = clean_venv
    port = stack.free_port()
    target = f"127.0.0.1:{port}"
    env = env | {
        "PROPSCOPE_LISTEN_ADDRESS": target,
        "PROPSCOPE_TRITON_URL": f"127.0.0.1:{stack.free_port()}",
        "PROPSCOPE_SHUTDOWN_DRAIN_S": "0",
    }
    gateway = subprocess.Popen(
        [venv / "bin" / "propscope-server", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        while stack.health_status(target, LIVENESS_SERVICE, 1.0) is None:
            assert gateway.poll() is None, gateway.communicate()[0]
            assert time.monotonic() < deadline, f"no health answer on {target}"
            time.sleep(0.2)
        health = subprocess.run(
            [venv / "bin" / "propscope-server", "health", target, "--service", LIVENESS_SERVICE],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert health.returncode == 0, health.stdout + health.stderr
        assert stack.health_status(target) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        gateway.terminate()
        output = gateway.communicate(timeout=60)[0]
    assert gateway.returncode == 0, output
    messages = [json.loads(line)["message"] for line in output.splitlines()]
    assert any(m.startswith(f"propscope gateway listening on port {port}") for m in messages)
    assert "triton is unreachable" in messages


@pytest.fixture(scope="module")
def sdk_venv(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, Path, dict[str, str]]]:
    """A new venv with the SDK installed from wheels built from its sdists: (venv, the folder
    of sdists and wheels, env)."""
    work = tmp_path_factory.mktemp("sdk-install")
    dist = work / "dist"
    env = _offline(work, dist)
    venv = work / "venv"
    _run(sys.executable, "-m", "venv", venv, env=env)
    _run(venv / "bin" / "pip", "install", "build", env=env)
    for part in SDK_DISTRIBUTIONS:
        _run(venv / "bin" / "python", "-m", "build", "--outdir", dist, work / part, env=env)
    _run(venv / "bin" / "pip", "install", dist / "propscope-0.1.0-py3-none-any.whl", env=env)
    yield venv, dist, env


def test_the_sdk_and_its_stubs_build_as_sdists_and_wheels(
    sdk_venv: tuple[Path, Path, dict[str, str]],
) -> None:
    """The stubs' sdist carries the contract and its generator, never generated code; the
    wheels hold the generated stubs and the SDK's templates, each package in one of them."""
    venv, dist, env = sdk_venv
    with tarfile.open(dist / "propscope_api-0.1.0.tar.gz") as sdist:
        stubs_source = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"generate_stubs.py", "protos/propscope/v1/explain.proto"} <= stubs_source
    assert "protos/vendor/google/rpc/status.proto" in stubs_source
    assert not [name for name in stubs_source if "_pb2" in name]
    with zipfile.ZipFile(dist / "propscope_api-0.1.0-py3-none-any.whl") as wheel:
        assert "propscope/v1/attribution_pb2_grpc.py" in wheel.namelist()
        assert "propscope/__init__.py" not in wheel.namelist()
    with zipfile.ZipFile(dist / "propscope-0.1.0-py3-none-any.whl") as wheel:
        assert "propscope/review/report/templates/report.html.j2" in wheel.namelist()
        assert not [name for name in wheel.namelist() if name.startswith("propscope/v1/")]
    installed = _run(venv / "bin" / "pip", "list", "--format=json", env=env).stdout
    names = {package["name"].lower() for package in json.loads(installed)}
    assert {"propscope", "propscope-api", "grpcio", "numpy", "pillow"} <= names
    # grpcio-tools builds the stubs and stays out of the runtime.
    assert not names & {"propscope-server", "propscope-dev", "torch", "grpcio-tools"}


def test_the_installed_cli_starts_every_command_group(
    sdk_venv: tuple[Path, Path, dict[str, str]],
) -> None:
    """The CLI's modules import with the SDK's declared dependencies only (typer carries its
    own click: importing the click distribution once broke `propscope` in a clean venv)."""
    venv, _, env = sdk_venv
    for command in ([], ["review"], ["review", "merge"], ["interactions"]):
        usage = _run(venv / "bin" / "propscope", *command, "--help", env=env).stdout
        assert usage.startswith("Usage: propscope"), usage


def test_the_installed_sdk_calls_the_live_stack(
    sdk_venv: tuple[Path, Path, dict[str, str]], live_stack: stack.StackInfo
) -> None:
    """The installed package (not the working tree's) explains a picture and lists the models,
    with the sync and the async client."""
    venv, dist, env = sdk_venv
    script = f"""
import asyncio, json, propscope

async def models():
    async with propscope.AsyncClient({live_stack.gateway!r}, timeout=60) as client:
        return [m.name for m in await client.list_models()]

with propscope.Client({live_stack.gateway!r}, timeout=300) as client:
    result = client.explain(
        {str(ROOT / "docs" / "sample.png")!r}, "synth_hue",
        {{"object_hue": "procedural:operation=hue,region=object"}},
        steps=8, path_mode="fixed",
    ).result()
print(json.dumps({{
    "module": propscope.__file__, "models": asyncio.run(models()),
    "ok": result.ok, "significant": result["object_hue"].significant,
}}))
"""
    answer = json.loads(_run(venv / "bin" / "python", "-c", script, env=env).stdout)
    assert answer["module"].startswith(str(venv))
    assert answer["ok"] and answer["significant"]
    assert {"synth_hue", "procedural"} <= set(answer["models"])
