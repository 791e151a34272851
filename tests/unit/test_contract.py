"""The contract against buf (the @bufbuild/buf that `make setup` installs with the Node client):
buf lint on protos/ (buf.yaml), buf breaking against the released contract
(protos/released/), and proof on altered copies that both checks can fail."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "client" / "node" / "node_modules" / ".bin" / "buf"
RELEASED_CONFIG = Path("protos") / "released" / "buf.yaml"
EXPLAIN = Path("protos") / "propscope" / "v1" / "explain.proto"


def _buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert BUF.exists(), f"{BUF} is missing: `make setup` installs @bufbuild/buf (client/node)"
    return subprocess.run(
        [str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def _lint(cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return _buf("lint", cwd=cwd)


def _breaking(cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return _buf("breaking", "--against", ".", "--against-config", str(RELEASED_CONFIG), cwd=cwd)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A copy of the buf workspace (buf.yaml and protos/) to alter."""
    shutil.copy2(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    return tmp_path


def test_the_protos_pass_buf_lint() -> None:
    result = _lint()
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_contract_keeps_every_released_name_and_number() -> None:
    result = _breaking()
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_baseline_is_the_released_explain_service() -> None:
    """An empty or wrong baseline would make buf breaking pass whatever changed."""
    released = (
        ROOT / "protos" / "released" / "543714e" / EXPLAIN.relative_to("protos")
    ).read_text()
    assert "service ExplainService {" in released
    assert "rpc Explain(ExplainRequest) returns (stream ExplainEvent);" in released


def _edit_field(proto_file: Path, message: str, field: str, edit: Callable[[str], str]) -> None:
    """Replaces the declaration line of message.field by edit(line)."""
    proto = proto_file.read_text()
    start = proto.index(f"message {message} {{\n")
    end = proto.index("\n}\n", start)
    line = re.search(rf"^ *\S+ {field} = \d+;\n", proto[start:end], re.M)
    assert line, f"field {message}.{field} not found"
    at = start + line.start()
    proto_file.write_text(proto[:at] + edit(line.group(0)) + proto[start + line.end() :])


def _assert_breaking_reports(workspace: Path, finding: str) -> None:
    result = _breaking(cwd=workspace)
    assert result.returncode != 0
    assert re.search(finding, result.stdout), result.stdout + result.stderr


def test_buf_breaking_fails_when_a_released_field_is_removed(workspace: Path) -> None:
    _edit_field(workspace / EXPLAIN, "ExplainRequest", "request_id", lambda line: "")
    _assert_breaking_reports(
        workspace, r'field "\d+" with name "request_id" on message "ExplainRequest" was deleted'
    )


def test_buf_breaking_fails_when_a_released_field_is_renumbered(workspace: Path) -> None:
    _edit_field(
        workspace / EXPLAIN,
        "ExplainRequest",
        "request_id",
        lambda line: re.sub(r"= \d+;", "= 999;", line),
    )
    _assert_breaking_reports(
        workspace, r'field "\d+" with name "request_id" on message "ExplainRequest" was deleted'
    )


def test_buf_breaking_fails_when_a_released_rpc_is_removed(workspace: Path) -> None:
    path = workspace / EXPLAIN
    rpc = "  rpc ListModels(ListModelsRequest) returns (ListModelsResponse);\n"
    proto = path.read_text()
    assert rpc in proto
    path.write_text(proto.replace(rpc, ""))
    _assert_breaking_reports(workspace, r'RPC "ListModels" on service "ExplainService" was deleted')


def test_buf_lint_fails_on_a_field_name_that_is_not_lower_snake_case(workspace: Path) -> None:
    _edit_field(
        workspace / EXPLAIN,
        "ExplainRequest",
        "request_id",
        lambda line: line.replace("request_id", "requestId"),
    )
    result = _lint(cwd=workspace)
    assert result.returncode != 0
    assert 'Field name "requestId" should be lower_snake_case' in result.stdout, (
        result.stdout + result.stderr
    )
