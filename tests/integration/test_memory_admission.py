"""Memory admission on the real stack (issue 15), in bounded form: 16 concurrent
requests of a 4096 x 4096 PNG that compresses to about 60 KB (before admission, one such
request added 741 MiB to the gateway, two 1,239 MiB) against a gateway whose budget holds
two of them. Its resident memory, sampled every 50 ms, never rises past the budget; the
others are refused at once naming it. Prints what it measured (`pytest -s`)."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from PIL import Image

from propscope.v1 import explain_pb2 as pb
from propscope.v1 import explain_pb2_grpc
from propscope_dev.hostile import OWN_CONNECTION, rss_bytes
from propscope_server.api.memory import MIB, estimate_bytes
from propscope_server.config import Settings
from propscope_server.inference import ModelDescription, Tensor
from tests.integration.conftest import extra_gateway, scene_png
from tests.integration.test_operations import metric, wait_until

SIDE = 4096
CALLS = 16
# synth_unbiased as its config.pbtxt declares it: what the gateway estimates with.
SYNTH_UNBIASED = ModelDescription(
    name="synth_unbiased",
    version="1",
    versions=("1",),
    role="classifier",
    inputs=(Tensor("IMAGE", "UINT8", [64, 64, 3]),),
    outputs=(Tensor("LOGITS", "FP32", [2]),),
    max_batch_size=64,
)


class PeakRss:
    """A process's resident memory, sampled every 50 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = self.peak = rss_bytes(pid)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_bytes(self.pid))
            self.samples += 1

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def large_png() -> bytes:
    """4096 x 4096 of flat colour blocks: a small message, a large decoded image."""
    pixels = np.full((SIDE, SIDE, 3), 128, np.uint8)
    pixels[SIDE // 4 : 3 * SIDE // 4, SIDE // 4 : 3 * SIDE // 4] = (200, 40, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def request(image: bytes, seed: int) -> pb.ExplainRequest:
    return pb.ExplainRequest(
        image=image,
        model=pb.ModelRef(name="synth_unbiased"),
        properties=[
            pb.Property(
                name="brightness",
                editor=pb.EditorIntervention(
                    model="procedural", parameters={"operation": "brightness"}
                ),
            )
        ],
        steps=2,
        samples=1,
        path_mode=pb.PATH_MODE_FIXED,
        permutations=100,
        alpha=0.5,
        seed=seed,
    )


def call(target: str, message: pb.ExplainRequest) -> tuple[str, str, float]:
    """(status code name, details, seconds) of one Explain on a connection of its own."""
    started = time.perf_counter()
    with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
        stub = explain_pb2_grpc.ExplainServiceStub(channel)
        try:
            events = list(stub.Explain(message, timeout=300))
        except grpc.RpcError as error:
            return error.code().name, error.details() or "", time.perf_counter() - started
    done = events[-1].HasField("done") and not events[-1].done.properties_failed
    return ("OK" if done else "FAILED"), "", time.perf_counter() - started


def test_large_compressible_pngs_never_take_the_gateway_past_its_budget(live_stack, tmp_path):
    image = large_png()
    settings = Settings(redis_url="redis://stack")
    estimate = estimate_bytes(request(image, 0), settings, SYNTH_UNBIASED)
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
        assert call(gateway.target, warm_up)[0] == "OK"
        with PeakRss(pid) as rss:
            with ThreadPoolExecutor(CALLS) as pool:
                results = list(
                    pool.map(lambda seed: call(gateway.target, request(image, seed)), range(CALLS))
                )
        wait_until(lambda: metric(gateway.metrics_url, "propscope_memory_reserved_bytes") == 0)
        after = rss_bytes(pid)
        refused_metric = metric(
            gateway.metrics_url,
            'propscope_admission_rejections_total{limit="memory_budget_bytes"}',
        )
    codes = [code for code, _, _ in results]
    refused = [details for code, details, _ in results if code == "RESOURCE_EXHAUSTED"]
    served = [seconds for code, _, seconds in results if code == "OK"]
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
