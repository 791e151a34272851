"""`propscope-server serve` with a refused setting: one line per problem, naming the variable
as it is set, and no traceback (pydantic's filled a screen and hid the line to fix)."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from propscope_server.main import app


def serve(monkeypatch: pytest.MonkeyPatch, **variables: str):
    for name in list(os.environ):
        if name.startswith("PROPSCOPE_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return CliRunner().invoke(app, ["serve"])


def test_each_refused_setting_is_one_line_naming_its_variable(monkeypatch):
    result = serve(
        monkeypatch,
        PROPSCOPE_TRITON_URL="127.0.0.1:8001;127.0.0.1:8002",
        PROPSCOPE_TRITON_ENDPOINT_RETRY_S="-1",
        PROPSCOPE_CACHE_TTL_S="a day",
    )
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.output and len(lines) == 3, result.output
    assert lines[0].startswith("propscope-server: PROPSCOPE_TRITON_URL is '127.0.0.1:8001;")
    assert "dns:///name:port" in lines[0]
    assert lines[1] == (
        "propscope-server: PROPSCOPE_TRITON_ENDPOINT_RETRY_S: Input should be greater than 0"
    )
    assert lines[2].startswith("propscope-server: PROPSCOPE_CACHE_TTL_S: Input should be")


def test_an_aliased_setting_is_named_as_set_and_its_password_hidden(monkeypatch):
    result = serve(monkeypatch, REDIS_URL="redis+cluster://user:secret@127.0.0.1:7000/3")
    assert result.exit_code == 1
    assert result.stderr.startswith("propscope-server: REDIS_URL 'redis+cluster://user:***@")
    assert "PROPSCOPE_REDIS_URL" not in result.stderr and "secret" not in result.output
