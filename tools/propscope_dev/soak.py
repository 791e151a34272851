"""A load driver for the Explain API: many concurrent streaming calls for a while, every
outcome classified and the gateway's memory sampled, so that "no unexpected errors, bounded
memory, every accepted request completes or is rejected up front" is measured, not assumed.

Like validation/, it is only a client of the running service (`make soak` runs it through
bench/soak.py, the integration tests run a short version)."""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

import propscope
from propscope_dev.stack import health_status
from propscope_dev.validation.tables import markdown_table
from propscope_server.synthetic.world import Scene, make_split, render, sample_scene

# The demo's interventions (Makefile DEMO_PROPERTIES): cheap procedural edits, so that the
# load is on the gateway and Triton's scheduling rather than on diffusion.
PROPERTIES = (
    "object_hue=procedural:operation=hue,region=object",
    "patch=procedural:operation=blend",
    "background_brightness=procedural:operation=brightness,region=background,amount=0.2",
)
MODELS = ("synth_unbiased", "synth_hue", "synth_patch")
STEPS = (8, 10)
SAMPLES = (1, 2)
SEEDS = (0, 1)
# A fixed pool of images re-explained with few (steps, seed) choices hits the path cache
# once warm; the other calls explain a freshly drawn scene and miss it.
REPEATED_IMAGES = 8
REPEATED_FRACTION = 0.5
PATH_IMAGES_FRACTION = 0.125
# A rejected worker waits this long before its next call; retrying at once would only spin.
REJECTED_BACKOFF_S = 0.2
RSS_INTERVAL_S = 0.5
MAX_MESSAGES_KEPT = 5
MIB = 1024.0


class Outcome(enum.Enum):
    COMPLETED = "completed"
    # RESOURCE_EXHAUSTED before any event: admission control doing its job.
    REJECTED = "rejected"
    # RESOURCE_EXHAUSTED after the stream started: breaks "accepted means it completes".
    REJECTED_AFTER_ACCEPTANCE = "rejected_after_acceptance"
    UNEXPECTED = "unexpected"


@dataclass(frozen=True)
class CallSpec:
    """One Explain call of the mix."""

    image: np.ndarray
    model: str
    properties: tuple[str, ...]
    steps: int
    samples: int
    seed: int
    return_path_images: bool

    @property
    def property_names(self) -> tuple[str, ...]:
        return tuple(spec.split("=", 1)[0] for spec in self.properties)


@dataclass(frozen=True)
class CallRecord:
    """What one call did; `detail` says why for anything but a completed call."""

    worker: int
    started_s: float  # since the run started
    latency_s: float
    outcome: Outcome
    detail: str
    properties: int = 0
    cache_hits: int = 0
    cache_misses: int = 0


@dataclass(frozen=True)
class MemoryFigures:
    """The gateway's resident memory in MiB. `peak_mib` is the largest 0.5 s sample, `hwm_mib`
    the kernel's VmHWM (the peak since the process started, between samples too); a last
    quarter mean well above the first quarter's under a steady load is the leak signal."""

    start_mib: float
    peak_mib: float
    hwm_mib: float
    end_mib: float
    first_quarter_mean_mib: float
    last_quarter_mean_mib: float
    per_tenth_mib: tuple[float, ...]  # mean of each tenth of the run: the curve's shape
    samples: int

    @property
    def growth_mib(self) -> float:
        return self.last_quarter_mean_mib - self.first_quarter_mean_mib


@dataclass(frozen=True)
class SoakReport:
    target: str
    streams: int
    duration_s: float
    call_deadline_s: float
    elapsed_s: float
    calls: int
    completed: int
    rejected: int
    rejected_after_acceptance: int
    unexpected: int
    errors: tuple[str, ...]  # the first unexpected and rejected-after-acceptance calls
    rejections: tuple[str, ...]  # the first up-front rejections
    completed_per_worker: tuple[int, ...]
    properties_completed: int
    cache_hits: int
    cache_misses: int
    latency_p50_ms: float | None  # of completed calls
    latency_p95_ms: float | None
    latency_max_ms: float | None
    memory: MemoryFigures
    healthy_after: bool

    @property
    def calls_per_s(self) -> float:
        return self.completed / self.elapsed_s

    @property
    def properties_per_s(self) -> float:
        return self.properties_completed / self.elapsed_s

    @property
    def passed(self) -> bool:
        """The issue's rule: nothing unexpected, nothing rejected once accepted, still serving."""
        return self.unexpected == 0 and self.rejected_after_acceptance == 0 and self.healthy_after

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            calls_per_s=self.calls_per_s,
            properties_per_s=self.properties_per_s,
            passed=self.passed,
        )
        data["memory"]["growth_mib"] = self.memory.growth_mib
        return data

    def to_markdown(self) -> str:
        memory = self.memory
        rows = [
            ("concurrent streams", self.streams),
            ("duration (requested / elapsed)", f"{self.duration_s:.0f} s / {self.elapsed_s:.1f} s"),
            ("deadline per call", f"{self.call_deadline_s:.0f} s"),
            ("calls", self.calls),
            ("completed", self.completed),
            ("rejected up front (RESOURCE_EXHAUSTED)", self.rejected),
            ("rejected after acceptance", self.rejected_after_acceptance),
            ("unexpected", self.unexpected),
            (
                "completed per worker (min / max)",
                f"{min(self.completed_per_worker)} / {max(self.completed_per_worker)}",
            ),
            (
                "throughput",
                f"{self.calls_per_s:.2f} calls/s, {self.properties_per_s:.2f} properties/s",
            ),
            ("path cache hits / misses", f"{self.cache_hits} / {self.cache_misses}"),
            (
                "latency p50 / p95 / max (completed)",
                " / ".join(
                    _ms(v) for v in (self.latency_p50_ms, self.latency_p95_ms, self.latency_max_ms)
                ),
            ),
            ("gateway RSS at start", f"{memory.start_mib:.1f} MiB"),
            (
                "gateway RSS peak (sampled / VmHWM)",
                f"{memory.peak_mib:.1f} / {memory.hwm_mib:.1f} MiB",
            ),
            (
                "gateway RSS mean, first / last quarter",
                f"{memory.first_quarter_mean_mib:.1f} / {memory.last_quarter_mean_mib:.1f} MiB "
                f"({memory.growth_mib:+.1f} MiB)",
            ),
            ("gateway RSS at end", f"{memory.end_mib:.1f} MiB ({memory.samples} samples)"),
            (
                "gateway RSS mean by tenth of the run",
                " → ".join(f"{value:.0f}" for value in memory.per_tenth_mib) + " MiB",
            ),
            ("health after the load", "SERVING" if self.healthy_after else "**not SERVING**"),
            ("verdict", "pass" if self.passed else "**FAIL**"),
        ]
        parts = [
            markdown_table(("figure", "value"), rows),
            "",
            f"Request mix: {MIX_DESCRIPTION}",
        ]
        for title, messages in (("Errors", self.errors), ("Rejections", self.rejections)):
            if messages:
                parts += ["", f"{title} (first {len(messages)}):", ""]
                parts += [f"- `{message}`" for message in messages]
        return "\n".join(parts)


MIX_DESCRIPTION = (
    f"each call explains one of {', '.join(MODELS)} for 1 to {len(PROPERTIES)} of the demo's "
    f"procedural properties (object hue, blend patch, background brightness), steps "
    f"{' or '.join(map(str, STEPS))}, samples {' or '.join(map(str, SAMPLES))}; "
    f"{REPEATED_FRACTION:.0%} of the calls re-explain one of {REPEATED_IMAGES} fixed images "
    f"(path cache hits once warm), the others a freshly drawn scene (misses); "
    f"{PATH_IMAGES_FRACTION:.1%} ask for the path images."
)


def repeated_images(count: int = REPEATED_IMAGES, seed: int = 0) -> list[np.ndarray]:
    """The fixed pool of images that calls come back to."""
    _, _, scenes = make_split("none", count, seed)
    return [render(_without_patch(scene)) for scene in scenes]


def _without_patch(scene: Scene) -> Scene:
    """The blend property pastes the world's patch where a scene's own patch sits: on a
    scene that has one, that edit changes nothing, which the service refuses
    (FAILED_PRECONDITION) rather than scoring 0."""
    return replace(scene, patch=False)


def plan_call(rng: np.random.Generator, repeated: Sequence[np.ndarray]) -> CallSpec:
    """The next call of the mix, drawn from `rng`."""
    if rng.random() < REPEATED_FRACTION:
        image = repeated[int(rng.integers(len(repeated)))]
    else:
        scene = sample_scene(int(rng.integers(2)), "none", rng, shape_agreement=1.0)
        image = render(_without_patch(scene))
    count = int(rng.integers(1, len(PROPERTIES) + 1))
    chosen = sorted(rng.choice(len(PROPERTIES), size=count, replace=False))
    return CallSpec(
        image=image,
        model=MODELS[int(rng.integers(len(MODELS)))],
        properties=tuple(PROPERTIES[i] for i in chosen),
        steps=int(rng.choice(STEPS)),
        samples=int(rng.choice(SAMPLES)),
        seed=int(rng.choice(SEEDS)),
        return_path_images=bool(rng.random() < PATH_IMAGES_FRACTION),
    )


def classify_call(
    events: Sequence[propscope.Event], error: Exception | None, spec: CallSpec
) -> tuple[Outcome, str]:
    """The outcome of one call from the events it streamed and the error that ended it, with
    why when it is not a completion. Completed means: Accepted first, Done last, and every
    requested property reported OK with all its samples (and their path images when asked)."""
    if isinstance(error, propscope.PropscopeError):
        after = f" after {len(events)} events" if events else ""
        if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            outcome = Outcome.REJECTED_AFTER_ACCEPTANCE if events else Outcome.REJECTED
            return outcome, f"{error}{after}"
        return Outcome.UNEXPECTED, f"{error}{after}"
    if error is not None:
        return Outcome.UNEXPECTED, f"{type(error).__name__}: {error}"
    if not events or not isinstance(events[0], propscope.Accepted):
        return Outcome.UNEXPECTED, "the stream did not start with Accepted"
    if not isinstance(events[-1], propscope.Done):
        return Outcome.UNEXPECTED, f"the stream ended after {len(events)} events without Done"
    results = [e for e in events if isinstance(e, propscope.PropertyResult)]
    reported = sorted(r.property_name for r in results)
    if reported != sorted(spec.property_names):
        return (
            Outcome.UNEXPECTED,
            f"properties reported {reported}, asked {list(spec.property_names)}",
        )
    for result in results:
        if not result.ok:
            return Outcome.UNEXPECTED, f"property {result.property_name} failed: {result.error}"
        if len(result.samples) != spec.samples:
            return (
                Outcome.UNEXPECTED,
                f"property {result.property_name}: {len(result.samples)} samples, asked {spec.samples}",
            )
        # An adaptive path may have been lengthened: the result says to which N.
        images = result.steps + 1 if spec.return_path_images else 0
        if result.steps < spec.steps or any(
            len(sample.path_images) != images for sample in result.samples
        ):
            return Outcome.UNEXPECTED, f"property {result.property_name}: not {images} path images"
    return Outcome.COMPLETED, ""


def parse_memory_kib(status: str) -> dict[str, int]:
    """VmRSS and VmHWM (kiB) of a /proc/<pid>/status text."""
    values = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def summarize_memory(samples: Sequence[tuple[float, float]], hwm_mib: float) -> MemoryFigures:
    """Figures from (seconds, RSS MiB) samples; quarters are of the sampled time span."""
    times = np.array([t for t, _ in samples])
    rss = np.array([r for _, r in samples])
    quarter = (times[-1] - times[0]) / 4
    return MemoryFigures(
        start_mib=float(rss[0]),
        peak_mib=float(rss.max()),
        hwm_mib=max(hwm_mib, float(rss.max())),
        end_mib=float(rss[-1]),
        first_quarter_mean_mib=float(rss[times <= times[0] + quarter].mean()),
        last_quarter_mean_mib=float(rss[times >= times[-1] - quarter].mean()),
        per_tenth_mib=tuple(float(part.mean()) for part in np.array_split(rss, 10) if len(part)),
        samples=len(samples),
    )


def build_report(
    records: Sequence[CallRecord],
    *,
    target: str,
    streams: int,
    duration_s: float,
    call_deadline_s: float,
    elapsed_s: float,
    memory: MemoryFigures,
    healthy_after: bool,
) -> SoakReport:
    """The report of a run's call records."""

    def of(outcome: Outcome) -> list[CallRecord]:
        return [r for r in records if r.outcome is outcome]

    def first_messages(kept: Sequence[CallRecord]) -> tuple[str, ...]:
        ordered = sorted(kept, key=lambda r: r.started_s)[:MAX_MESSAGES_KEPT]
        return tuple(f"t={r.started_s:.1f}s worker {r.worker}: {r.detail}" for r in ordered)

    completed = of(Outcome.COMPLETED)
    failures = of(Outcome.UNEXPECTED) + of(Outcome.REJECTED_AFTER_ACCEPTANCE)
    latencies_ms = np.array([r.latency_s for r in completed]) * 1e3
    p50, p95, peak = (
        (
            float(np.percentile(latencies_ms, 50)),
            float(np.percentile(latencies_ms, 95)),
            float(latencies_ms.max()),
        )
        if len(completed)
        else (None, None, None)
    )
    return SoakReport(
        target=target,
        streams=streams,
        duration_s=duration_s,
        call_deadline_s=call_deadline_s,
        elapsed_s=elapsed_s,
        calls=len(records),
        completed=len(completed),
        rejected=len(of(Outcome.REJECTED)),
        rejected_after_acceptance=len(of(Outcome.REJECTED_AFTER_ACCEPTANCE)),
        unexpected=len(of(Outcome.UNEXPECTED)),
        errors=first_messages(failures),
        rejections=first_messages(of(Outcome.REJECTED)),
        completed_per_worker=tuple(
            sum(r.worker == worker for r in completed) for worker in range(streams)
        ),
        properties_completed=sum(r.properties for r in completed),
        cache_hits=sum(r.cache_hits for r in completed),
        cache_misses=sum(r.cache_misses for r in completed),
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        latency_max_ms=peak,
        memory=memory,
        healthy_after=healthy_after,
    )


def wait_serving(target: str, timeout_s: float) -> bool:
    """Whether the gateway's standard health check says SERVING within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while health_status(target) != health_pb2.HealthCheckResponse.SERVING:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True


def run_soak(
    target: str,
    streams: int,
    duration_s: float,
    gateway_pid: int,
    *,
    call_deadline_s: float = 60.0,
    seed: int = 0,
) -> SoakReport:
    """`streams` workers, each with its own channel, loop Explain calls of the mix for
    `duration_s` (calls in flight then finish); the gateway's RSS is sampled meanwhile.
    The gateway must answer SERVING first (ValueError otherwise)."""
    if streams < 1 or duration_s <= 0:
        raise ValueError("streams must be at least 1 and duration_s positive")
    status_file = Path(f"/proc/{gateway_pid}/status")
    if not status_file.exists():
        raise ValueError(f"no process {gateway_pid}")
    if not wait_serving(target, timeout_s=60.0):
        raise ValueError(f"the gateway at {target} is not SERVING")
    repeated = repeated_images()
    started = time.monotonic()
    stop_at = started + duration_s
    stop_sampling = threading.Event()
    samples: list[tuple[float, float]] = []
    sampler = threading.Thread(
        target=_sample_rss, args=(status_file, started, stop_sampling, samples), daemon=True
    )
    sampler.start()
    try:
        with ThreadPoolExecutor(streams, thread_name_prefix="soak") as pool:
            per_worker = list(
                pool.map(
                    lambda worker: _worker(
                        worker, target, repeated, started, stop_at, call_deadline_s, seed
                    ),
                    range(streams),
                )
            )
        elapsed_s = time.monotonic() - started
    finally:
        stop_sampling.set()
        sampler.join()
    hwm_kib = parse_memory_kib(_read(status_file)).get("VmHWM", 0)
    return build_report(
        [record for records in per_worker for record in records],
        target=target,
        streams=streams,
        duration_s=duration_s,
        call_deadline_s=call_deadline_s,
        elapsed_s=elapsed_s,
        memory=summarize_memory(samples, hwm_kib / MIB),
        healthy_after=wait_serving(target, timeout_s=10.0),
    )


def _worker(
    worker: int,
    target: str,
    repeated: Sequence[np.ndarray],
    started: float,
    stop_at: float,
    call_deadline_s: float,
    seed: int,
) -> list[CallRecord]:
    rng = np.random.default_rng([seed, worker])
    records: list[CallRecord] = []
    with propscope.Client(target) as client:
        while time.monotonic() < stop_at:
            record = _call(client, plan_call(rng, repeated), worker, started, call_deadline_s)
            records.append(record)
            if record.outcome is Outcome.REJECTED:
                time.sleep(REJECTED_BACKOFF_S)
    return records


def _call(
    client: propscope.Client, spec: CallSpec, worker: int, started: float, deadline_s: float
) -> CallRecord:
    call_started = time.monotonic()
    events: list[propscope.Event] = []
    error: Exception | None = None
    try:
        stream = client.explain(
            spec.image,
            spec.model,
            spec.properties,
            steps=spec.steps,
            samples=spec.samples,
            seed=spec.seed,
            return_path_images=spec.return_path_images,
            timeout=deadline_s,
        )
        for event in stream:
            events.append(event)
    except Exception as exc:  # anything, a driver bug included, is an outcome to report
        error = exc
    latency_s = time.monotonic() - call_started
    outcome, detail = classify_call(events, error, spec)
    results = [e for e in events if isinstance(e, propscope.PropertyResult)]
    return CallRecord(
        worker=worker,
        started_s=call_started - started,
        latency_s=latency_s,
        outcome=outcome,
        detail=detail,
        properties=len(results),
        cache_hits=sum(r.cache_hits for r in results),
        cache_misses=sum(r.cache_misses for r in results),
    )


def _sample_rss(
    status_file: Path,
    started: float,
    stop: threading.Event,
    samples: list[tuple[float, float]],
) -> None:
    """Appends (seconds since start, VmRSS MiB) every RSS_INTERVAL_S until `stop` or until the
    process is gone."""
    while True:
        rss_kib = parse_memory_kib(_read(status_file)).get("VmRSS")
        if rss_kib is None:  # gone, or a zombie
            return
        samples.append((time.monotonic() - started, rss_kib / MIB))
        if stop.wait(RSS_INTERVAL_S):
            return


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"


def _read(path: Path) -> str:
    """The file's text, or "" once the process is gone."""
    try:
        return path.read_text()
    except OSError:
        return ""
