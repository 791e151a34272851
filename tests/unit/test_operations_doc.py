"""docs/operations.md is the configuration and operations reference: it must list every
setting and every metric, and explain every alert."""

from __future__ import annotations

import re
from pathlib import Path

import prometheus_client
import yaml
from pydantic import BaseModel

from propscope_server import metrics
from propscope_server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = ROOT / "docs" / "operations.md"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"


def environment_variables(model: type[BaseModel], prefix: str) -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += environment_variables(annotation, f"{prefix}{name.upper()}__")
        else:
            names.append(field.validation_alias or f"{prefix}{name.upper()}")
    return names


def test_every_setting_is_documented():
    text = OPERATIONS.read_text()
    variables = environment_variables(Settings, "PROPSCOPE_")
    assert "PROPSCOPE_LIMITS__MAX_EDITS" in variables and "REDIS_URL" in variables
    missing = [
        v
        for v in variables
        if f"`{v}`" not in text and f"`{v.removeprefix('PROPSCOPE_LIMITS__')}`" not in text
    ]
    assert not missing, f"settings missing from docs/operations.md: {missing}"


def exported_families() -> set[str]:
    """The metric names metrics.py exports, as a reader would query them."""
    names = set()
    for collector in vars(metrics).values():
        if isinstance(collector, prometheus_client.metrics.MetricWrapperBase):
            for family in collector.describe():
                suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
                names.add(family.name + suffix)
    return names


def test_every_metric_is_documented():
    text = OPERATIONS.read_text()
    families = exported_families()
    assert {"grpc_server_handled_total", "propscope_build_info"} <= families
    assert [name for name in sorted(families) if f"`{name}`" not in text] == []


def test_every_alert_has_a_runbook_entry():
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    alerts = [rule["alert"] for group in groups for rule in group["rules"]]
    headings = re.findall(r"^### (\w+)$", OPERATIONS.read_text(), re.MULTILINE)
    assert alerts and [alert for alert in alerts if alert not in headings] == []
