"""Callers over many gateways: one Python SDK client, one Node client and one `propscope review`
given both gateways of the scaled-out stack spread their calls over both (gRPC's round_robin),
counted from each gateway's own grpc_server_handled_total; the SDK client's Explains then
reach both Tritons from each gateway (its propscope_triton_endpoint_calls_total)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import propscope
from propscope_dev.scale_out import ScaledStack
from tests.integration.conftest import NODE_CLIENT, scene_png
from tests.integration.test_operations import sample_sum

_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))
LIST_MODELS = {"grpc_service": "propscope.v1.ExplainService", "grpc_method": "ListModels"}
EXPLAIN = {"grpc_service": "propscope.v1.ExplainService", "grpc_method": "Explain"}
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "review"
HUE = "object_hue=procedural:operation=hue,region=object"

# Makes N ListModels calls on one client of TARGET, one after the other.
NODE_CALLS = """\
const { createClient } = require(process.argv[1]);
(async () => {
  const client = createClient(process.argv[2]);
  try {
    for (let i = 0; i < Number(process.argv[3]); i++) {
      await client.listModels({ deadline: Date.now() + 60_000 });
    }
  } finally {
    client.close();
  }
})().catch((error) => { console.error(error); process.exit(1); });
"""


def handled(scaled: ScaledStack, method: dict[str, str]) -> list[float]:
    """Each gateway's count of `method` calls answered OK."""
    counts = []
    for url in scaled.gateway_metrics:
        with _LOCAL.open(url, timeout=10) as response:
            body = response.read().decode()
        counts.append(
            sum(
                sample.value
                for family in text_string_to_metric_families(body)
                for sample in family.samples
                if sample.name == "grpc_server_handled_total"
                and {**method, "grpc_code": "OK"}.items() <= sample.labels.items()
            )
        )
    return counts


def triton_calls(scaled: ScaledStack) -> list[list[float]]:
    """Each gateway's successful calls to each Triton (its per-endpoint counter)."""
    return [
        [
            sample_sum(url, "propscope_triton_endpoint_calls_total", endpoint=triton, outcome="ok")
            for triton in scaled.tritons
        ]
        for url in scaled.gateway_metrics
    ]


def grown(before: list[float], after: list[float]) -> list[float]:
    return [b - a for a, b in zip(before, after, strict=True)]


@pytest.mark.parametrize("form", ["ipv4", "list"])
def test_one_sdk_client_spreads_its_calls_over_both_gateways(
    scaled_stack: ScaledStack, form: str
) -> None:
    """round_robin picks among the connections that are up: once both gateways answered,
    calls alternate, so the next ten split five and five and two Explains go one to each."""
    addresses = ",".join(scaled_stack.gateways)
    target = f"ipv4:{addresses}" if form == "ipv4" else addresses
    with propscope.Client(target, timeout=120) as client:
        start = handled(scaled_stack, LIST_MODELS)
        for _ in range(100):
            client.list_models()
            if all(grown(start, handled(scaled_stack, LIST_MODELS))):
                break
        before = handled(scaled_stack, LIST_MODELS)
        for _ in range(10):
            client.list_models()
        assert grown(before, handled(scaled_stack, LIST_MODELS)) == [5, 5]

        before = handled(scaled_stack, EXPLAIN)
        sent_before = triton_calls(scaled_stack)
        for seed in (1, 2):
            # A fresh image per call: its edit and its classifications each reach Triton.
            image = scene_png(hue_deg=40.0 + 90.0 * seed + (0 if form == "ipv4" else 45.0))
            result = client.explain(image, "synth_hue", [HUE], steps=6, seed=seed)
            assert result.result().ok
        assert grown(before, handled(scaled_stack, EXPLAIN)) == [1, 1]
        # And each gateway spread its share of the work over both Tritons.
        sent = zip(sent_before, triton_calls(scaled_stack), strict=True)
        for gateway, (then, now) in enumerate(sent):
            assert all(grown(then, now)), (gateway, grown(then, now))


def test_one_node_client_spreads_its_calls_over_both_gateways(
    scaled_stack: ScaledStack,
    npm: str,
    tmp_path: Path,
) -> None:
    before = handled(scaled_stack, LIST_MODELS)
    subprocess.run(
        [
            "node",
            "-e",
            NODE_CALLS,
            str(NODE_CLIENT / "dist" / "src"),
            ",".join(scaled_stack.gateways),
            "20",
        ],
        cwd=tmp_path,
        check=True,
        timeout=120,
    )
    counts = grown(before, handled(scaled_stack, LIST_MODELS))
    assert sum(counts) == 20 and all(counts), counts


def test_a_review_given_both_gateways_spreads_its_explanations(
    scaled_stack: ScaledStack, tmp_path: Path
) -> None:
    rows = (EXAMPLES / "manifest.csv").read_text().splitlines()[:7]
    (tmp_path / "manifest.csv").write_text(
        "\n".join(rows).replace("images/", f"{EXAMPLES}/images/")
    )
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "candidate: {name: synth_hue}\n"
        "images: {manifest: manifest.csv}\n"
        "properties: {object_hue: 'procedural:operation=hue,region=object'}\n"
        "explain: {steps: 6}\n"
        "concurrency: 2\n"
        "strips: 0\n"
        "rules: [{rule: max_flip_rate, properties: [object_hue], max: 1.0}]\n"
    )
    before = handled(scaled_stack, EXPLAIN)
    finished = subprocess.run(
        [sys.executable, "-m", "propscope", "review", str(spec), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PROPSCOPE_TARGET": ",".join(scaled_stack.gateways)},
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    counts = grown(before, handled(scaled_stack, EXPLAIN))
    assert sum(counts) == 6 and all(counts), counts
    assert json.loads((tmp_path / "out" / "review.json").read_text())["verdict"] == "passed"
