"""The series the Triton autoscaler reads (deploy/k8s/prometheus-adapter/values.yaml) in what a
real Triton exports: a metric renamed or turned off in Triton would leave the autoscaler with
no data, and it would then keep the Triton count as it is whatever the load."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import yaml

ADAPTER_VALUES = (
    Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "prometheus-adapter" / "values.yaml"
)


def test_triton_exports_per_model_the_series_the_autoscaler_reads(live_stack):
    with urllib.request.urlopen(live_stack.triton_metrics_url, timeout=30) as response:
        text = response.read().decode()
    samples = re.findall(r"^(\w+)\{([^}]*)\}", text, re.MULTILINE)
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert rules
    for rule in rules:
        read = set(re.findall(r"\bnv_\w+", rule["seriesQuery"] + rule["metricsQuery"]))
        assert read, rule["seriesQuery"]
        for series in read:
            # One sample per loaded model: summed per pod by the rule.
            labels = [labels for name, labels in samples if name == series]
            assert labels, f"Triton exports no {series}"
            assert all('model="' in label for label in labels), series
