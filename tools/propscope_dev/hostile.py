"""Hostile-client drivers (issue 15): streams that never read, and callers without a
token sending large messages. Like soak.py, only clients of a running gateway: the
integration tests run them in bounded form, `make soak` at full size."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from propscope.v1 import explain_pb2 as pb
from propscope.v1 import explain_pb2_grpc
from propscope_server.synthetic.world import Scene, render

EXPLAIN = "/propscope.v1.ExplainService/Explain"
# A client that never reads, on a connection of its own: without BDP probing its receive
# window stays at 64 KiB, so a stream with path images fills it at once.
NEVER_READING_OPTIONS = [("grpc.http2.bdp_probe", 0), ("grpc.use_local_subchannel_pool", 1)]
# Well-behaved callers each on a connection of their own too.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def bearer(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying `token`; None without one."""
    return (("authorization", f"Bearer {token}"),) if token else None


def hue_request_fields(image: bytes, seed: int) -> dict:
    """The fields of a cheap explanation of `image`: synth_hue, one procedural hue
    property, 8 steps, 200 permutations (pb.ExplainRequest(**fields), overridable)."""
    return dict(
        image=image,
        model=pb.ModelRef(name="synth_hue"),
        properties=[
            pb.Property(
                name="hue",
                editor=pb.EditorIntervention(model="procedural", parameters={"operation": "hue"}),
            )
        ],
        steps=8,
        permutations=200,
        alpha=0.05,
        seed=seed,
    )


def well_behaved_request(seed: int) -> pb.ExplainRequest:
    """A cheap explanation of a scene drawn for `seed`: a different image per seed, so
    that no call is a cache hit and latencies compare."""
    scene = Scene(
        shape=seed % 2,
        hue_deg=float(seed * 37 % 360),
        radius_px=12.0,
        background=0.5,
        patch=False,
        center=(32.0, 32.0),
    )
    return pb.ExplainRequest(**hue_request_fields(_png(render(scene)), seed))


def never_reading_request(seed: int) -> pb.ExplainRequest:
    """Cheap to compute, but its answer (noisy path images) is far larger than 64 KiB."""
    noise = np.random.default_rng(seed).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    request = well_behaved_request(seed)
    request.image = _png(noise)
    request.return_path_images = True
    return request


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class PeakRss:
    """Samples a process's resident memory every 20 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = self.peak = rss_bytes(pid)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes(self.pid))
            self.samples += 1

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def added_mib(self) -> float:
        return (self.peak - self.before) / 2**20


def timed_explains(target: str, seeds: range, timeout_s: float = 120.0) -> list[float]:
    """Seconds per call of well-behaved explanations, one after another; raises on a
    failed call or property."""
    seconds = []
    with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
        stub = explain_pb2_grpc.ExplainServiceStub(channel)
        for seed in seeds:
            started = time.perf_counter()
            events = list(stub.Explain(well_behaved_request(seed), timeout=timeout_s))
            seconds.append(time.perf_counter() - started)
            failed = [
                e.property_result.status.message
                for e in events
                if e.HasField("property_result") and e.property_result.status.code
            ]
            if not events[-1].HasField("done") or failed:
                raise RuntimeError(f"a well-behaved call failed: {failed}")
    return seconds


@dataclass
class SlowReaderReport:
    streams: int
    idle_s: list[float]
    loaded_s: list[float]
    # How each never-reading stream ended, seen when it is finally read: refused at
    # once by a limit, ended by send_timeout_s, or completed (never stalled).
    outcomes: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def p95(seconds: list[float]) -> float:
        return float(np.percentile(seconds, 95))

    @property
    def p95_ratio(self) -> float:
        return self.p95(self.loaded_s) / self.p95(self.idle_s)

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("never-reading streams opened on one connection", str(self.streams)),
            (
                "their ends",
                ", ".join(f"{name} {count}" for name, count in sorted(self.outcomes.items())),
            ),
            (
                "well-behaved explain p50 / p95, idle",
                f"{np.median(self.idle_s):.2f} / {self.p95(self.idle_s):.2f} s "
                f"({len(self.idle_s)} calls)",
            ),
            (
                "well-behaved explain p50 / p95, with the streams open",
                f"{np.median(self.loaded_s):.2f} / {self.p95(self.loaded_s):.2f} s "
                f"({len(self.loaded_s)} calls, all succeeded)",
            ),
            ("p95 with the streams open / idle", f"{self.p95_ratio:.2f}x"),
        ]


def slow_reader_attack(
    target: str,
    streams: int,
    idle_calls: int,
    loaded_calls: int,
    settle_s: float,
    read_after_s: float = 0.0,
) -> SlowReaderReport:
    """Idle latencies of a well-behaved caller, then `streams` never-reading streams on
    one connection, then the caller's latencies again (after `settle_s`, when the
    admitted streams have done their work and stalled); finally, no earlier than
    `read_after_s` after they were opened, the streams are read to learn how each ended."""
    idle = timed_explains(target, range(1000, 1000 + idle_calls))
    with grpc.insecure_channel(target, options=NEVER_READING_OPTIONS) as greedy:
        stub = explain_pb2_grpc.ExplainServiceStub(greedy)
        opened = time.monotonic()
        calls = [stub.Explain(never_reading_request(i), timeout=600) for i in range(streams)]
        time.sleep(settle_s)
        loaded = timed_explains(target, range(2000, 2000 + loaded_calls))
        time.sleep(max(0.0, opened + read_after_s - time.monotonic()))
        outcomes: dict[str, int] = {}
        for call in calls:
            end = _how_it_ended(call)
            outcomes[end] = outcomes.get(end, 0) + 1
    return SlowReaderReport(streams, idle, loaded, outcomes)


def _how_it_ended(call: grpc.Call) -> str:
    try:
        for _ in call:
            pass
    except grpc.RpcError as error:
        details = error.details() or ""
        for limit in ("send_timeout_s", "max_streams_per_connection", "max_streams_per_peer"):
            if limit in details:
                return limit
        return error.code().name
    return "completed"


def large_message_flood(
    target: str, pid: int, callers: int, mib: int, token: str | None = None
) -> tuple[list[str], float]:
    """`callers` concurrent calls, each sending `mib` MiB (with `token`, or without
    one): their status codes and the MiB they added to process `pid`'s peak memory."""
    payload = pb.ExplainRequest(image=b"\0" * (mib * 2**20)).SerializeToString()
    metadata = bearer(token)
    codes: list[str] = []

    def call() -> None:
        with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
            try:
                list(channel.unary_stream(EXPLAIN)(payload, timeout=120, metadata=metadata))
                codes.append("OK")
            except grpc.RpcError as error:
                codes.append(error.code().name)

    with PeakRss(pid) as rss:
        threads = [threading.Thread(target=call) for _ in range(callers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return codes, rss.added_mib


def compressible_png(side: int) -> bytes:
    """side x side of flat colour blocks: a message of tens of KB, a large decoded image."""
    pixels = np.full((side, side, 3), 128, np.uint8)
    pixels[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = (200, 40, 40)
    return _png(pixels)


def large_image_request(image: bytes, seed: int) -> pb.ExplainRequest:
    """The cheapest explanation of `image`: what it costs is the image's size."""
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


@dataclass
class CallOutcome:
    code: str  # a status code's name, or "FAILED" for a stream that ended with failures
    details: str
    seconds: float


def explain_once(target: str, request: pb.ExplainRequest, token: str | None = None) -> CallOutcome:
    """One Explain on a connection of its own (with `token`, or without one)."""
    metadata = bearer(token)
    started = time.perf_counter()
    with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
        stub = explain_pb2_grpc.ExplainServiceStub(channel)
        try:
            events = list(stub.Explain(request, timeout=300, metadata=metadata))
        except grpc.RpcError as error:
            return CallOutcome(
                error.code().name, error.details() or "", time.perf_counter() - started
            )
    done = events[-1].HasField("done") and not events[-1].done.properties_failed
    return CallOutcome("OK" if done else "FAILED", "", time.perf_counter() - started)


def large_image_flood(
    target: str, pid: int, image: bytes, calls: int, token: str | None = None
) -> tuple[list[CallOutcome], PeakRss]:
    """`calls` concurrent explanations of `image`, each on its own connection: their
    outcomes and process `pid`'s memory meanwhile."""

    def call(seed: int) -> CallOutcome:
        return explain_once(target, large_image_request(image, seed), token)

    with PeakRss(pid) as rss, ThreadPoolExecutor(calls) as pool:
        outcomes = list(pool.map(call, range(calls)))
    return outcomes, rss
