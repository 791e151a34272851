"""Memory admission on the real stack (issue 15), in bounded form: 16 concurrent
requests of a 4096 x 4096 PNG that compresses to about 60 KB (before admission, one such
request added 741 MiB to the gateway, two 1,239 MiB) against a gateway whose budget holds
two of them. Its resident memory, sampled every 50 ms, never rises past the budget; the
others are refused at once naming it. Prints what it measured (`pytest -s`)."""

from __future__ import annotations

from dataclasses import replace

from propscope.v1 import explain_pb2 as pb
from propscope_dev.hostile import (
    compressible_png,
    explain_once,
    large_image_flood,
    large_image_request,
    rss_bytes,
)
from propscope_server.api.memory import MIB, estimate_bytes
from propscope_server.config import Settings
from tests.integration.conftest import extra_gateway, scene_png
from tests.integration.test_operations import metric, wait_until
from tests.unit.test_server_memory import FIXED

SIDE = 4096
CALLS = 16
# synth_unbiased as its config.pbtxt declares it (a fixed 64 x 64 UINT8 input): what the
# gateway estimates with.
SYNTH_UNBIASED = replace(FIXED, name="synth_unbiased")


def test_large_compressible_pngs_never_take_the_gateway_past_its_budget(live_stack, tmp_path):
    image = compressible_png(SIDE)
    settings = Settings(redis_url="redis://stack")
    estimate = estimate_bytes(large_image_request(image, 0), settings, SYNTH_UNBIASED)
    budget = int(2.2 * estimate)  # two such requests at once, not three
    with extra_gateway(live_stack, tmp_path, PROPSCOPE_MEMORY_BUDGET_BYTES=str(budget)) as gateway:
        pid = gateway.process.pid
        idle = rss_bytes(pid)
        warm_up = pb.ExplainRequest(
            image=scene_png(), model=pb.ModelRef(name="synth_unbiased"), steps=2, alpha=0.5
        )
        warm_up.permutations = 100
        warm_up.properties.add(name="b").editor.CopyFrom(
            pb.EditorIntervention(model="procedural", parameters={"operation": "brightness"})
        )
        assert explain_once(gateway.target, warm_up).code == "OK"
        results, rss = large_image_flood(gateway.target, pid, image, CALLS)
        wait_until(lambda: metric(gateway.metrics_url, "propscope_memory_reserved_bytes") == 0)
        after = rss_bytes(pid)
        refused_metric = metric(
            gateway.metrics_url,
            'propscope_admission_rejections_total{limit="memory_budget_bytes"}',
        )
    codes = [result.code for result in results]
    refused = [result.details for result in results if result.code == "RESOURCE_EXHAUSTED"]
    served = [result.seconds for result in results if result.code == "OK"]
    added = rss.peak - rss.before
    print(
        f"\n{len(image)} byte PNG of {SIDE}x{SIDE}; estimate {estimate / MIB:.0f} MiB per "
        f"request, budget {budget / MIB:.0f} MiB\ngateway RSS: idle {idle / MIB:.0f} MiB, "
        f"warm {rss.before / MIB:.0f} MiB, peak {rss.peak / MIB:.0f} MiB (+{added / MIB:.0f} "
        f"MiB; {rss.samples} samples), after {after / MIB:.0f} MiB\n{len(served)} served ({', '.join(f'{s:.1f}' for s in served)} s), "
        f"{len(refused)} refused: {refused[:1]}"
    )
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert served, "no request was admitted"
    assert len(refused) == refused_metric
    assert all("memory_budget_bytes" in details for details in refused)
    assert added <= budget
