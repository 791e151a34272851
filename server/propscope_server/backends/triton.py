"""The Triton adapter: model discovery, editor calls and batched classifier calls
over tritonclient's gRPC aio client, spread over the Triton endpoints of the pool
(triton_endpoints.py). Triton errors become domain errors here."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import grpc
import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from propscope_server import metrics
from propscope_server.backends.model_health import ModelHealth, is_worker_failure
from propscope_server.backends.triton_endpoints import (
    ERROR,
    OK,
    UNAVAILABLE,
    Client,
    Endpoint,
    TritonEndpoints,
)
from propscope_server.backends.triton_url import SETTING
from propscope_server.config import OUTPUT_KINDS, RESIZE_MODES, PreprocessingConfig
from propscope_server.editor_contract import (
    IMAGE_INPUT,
    PARAMETERS_INPUT,
    PATH_OUTPUT,
    PROGRESS_OUTPUT,
    ROLE_PARAMETER,
    SCHEMA_PARAMETER,
    SEED_INPUT,
    STRENGTHS_INPUT,
    EditorSchema,
    ReportProgress,
    closest,
    unreported,
)
from propscope_server.errors import (
    BackendError,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    Unavailable,
)
from propscope_server.inference import ModelDescription, RepositoryEntry, Tensor
from propscope_server.open_contract import (
    CHANNEL_MEANS_PARAMETER,
    LAYERS_PARAMETER,
    Layer,
    parse_layers,
)

# How long a model's metadata and config are trusted before asking Triton again.
DESCRIPTION_TTL_S = 30.0
# The settings that bound metadata calls and inference calls, named when one runs out.
METADATA_TIMEOUT_SETTING = "PROPSCOPE_TRITON_METADATA_TIMEOUT_S"
INFER_TIMEOUT_SETTING = "PROPSCOPE_TRITON_TIMEOUT_S"
# A parameter set to the time of each reload of a sick model (see TritonBackend._reload).
RESTORED_PARAMETER = "propscope.restored"

T = TypeVar("T")
logger = logging.getLogger(__name__)


def _status_name(error: InferenceServerException) -> str:
    return (error.status() or "UNKNOWN").removeprefix("StatusCode.")


def _translate(error: InferenceServerException, model: str) -> Exception:
    """The domain error for a Triton error. Unavailable carries Triton's message only:
    the caller words it with the endpoints it tried (`unreachable`)."""
    status = _status_name(error)
    message = error.message() or str(error)
    if status == "DEADLINE_EXCEEDED":
        return DeadlineExceeded(f"Triton did not answer for model {model!r} in time")
    if "unknown model" in message or status == "NOT_FOUND":
        return NotFound(f"model {model!r} is not served by Triton (ListModels shows what is)")
    if "not ready" in message:
        return FailedPrecondition(f"model {model!r} is not ready on Triton: {message}")
    if status == "UNAVAILABLE":
        return Unavailable(message)
    return BackendError(f"model {model!r} failed: {message}")


def unreachable(tried: int) -> Unavailable:
    """What a caller is told when no Triton it tried answered: how many endpoints and the
    setting that lists them (a typo in it reads as a Triton down). The addresses are for
    the gateway's log only: callers do not learn the cluster's internal addresses."""
    endpoints = "endpoint" if tried == 1 else "endpoints"
    return Unavailable(
        f"Triton is unreachable or overloaded ({tried} {endpoints} of the gateway's "
        f"{SETTING} tried; its log names them); retry with backoff"
    )


def timeout_until(deadline: float | None, default_s: float) -> float:
    """Seconds left before `deadline` (a time.monotonic() value), at most `default_s`."""
    if deadline is None:
        return default_s
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded("the call's deadline passed before Triton was asked")
    return min(remaining, default_s)


class TritonBackend:
    """Every call is bounded by the caller's deadline and by a setting (metadata calls
    by `metadata_timeout_s`, inference by `default_timeout_s`); a call that finds Triton
    unreachable is retried `retries` times, on another endpoint when one is in rotation,
    else with doubling backoff, within them. A model whose worker died is refused and
    restored by `model_health`.

    Every endpoint is taken to serve the same model repository: descriptions are cached
    once for all of them. What lives on one Triton is made to hold on each: a
    load_on_demand model is loaded on every endpoint in rotation that lacks it (when a
    request first names it, and again when a request finds an endpoint without it: a
    restarted or added Triton), and a sick model is reloaded on every endpoint whose
    probe failed; it is healthy once every endpoint in rotation answers its probe."""

    def __init__(
        self,
        endpoints: TritonEndpoints,
        default_timeout_s: float,
        retries: int = 2,
        retry_backoff_s: float = 0.1,
        metadata_timeout_s: float = 5.0,
        heal_backoff_s: float = 1.0,
        heal_backoff_max_s: float = 60.0,
        load_on_demand: Collection[str] = (),
    ) -> None:
        self.endpoints = endpoints
        self._load_on_demand = frozenset(load_on_demand)
        self._loads: dict[str, asyncio.Lock] = {}
        self._default_timeout_s = default_timeout_s
        self._metadata_timeout_s = metadata_timeout_s
        self._retries = retries
        self._retry_backoff_s = retry_backoff_s
        self._descriptions: dict[tuple[str, str], tuple[float, ModelDescription]] = {}
        # The endpoints on which each model's last probe failed: where a reload goes.
        self._failing: dict[str, list[Endpoint]] = {}
        self.model_health = ModelHealth(
            self._reload, self._probe, heal_backoff_s, heal_backoff_max_s
        )

    def _where(self, endpoint: Endpoint) -> str:
        """The endpoint, named in messages when there are several to tell apart."""
        return f" on {endpoint.address}" if self.endpoints.several else ""

    def _bound(self, kind: str) -> tuple[float, str]:
        """The bound on one call of `kind`, and the setting that sets it."""
        if kind == "metadata":
            return self._metadata_timeout_s, METADATA_TIMEOUT_SETTING
        return self._default_timeout_s, INFER_TIMEOUT_SETTING

    async def _with_retries(
        self,
        call: Callable[[Client, float], Awaitable[T]],
        model: str,
        kind: str,
        deadline: float | None,
    ) -> T:
        """`call(client, timeout)` on the next endpoint, retried on another one (or the
        same after a backoff) while Triton is unreachable and time is left."""
        timeout_s, setting = self._bound(kind)
        tried: list[str] = []
        for attempt in range(self._retries + 1):
            timeout = timeout_until(deadline, timeout_s)
            endpoint = await self.endpoints.pick(tried)
            if endpoint.address not in tried:
                tried.append(endpoint.address)
            started = time.monotonic()
            with self.endpoints.calling(endpoint) as sent:
                try:
                    result = await call(endpoint.client, timeout)
                except InferenceServerException as error:
                    # Metadata calls may name any model a caller typed: no label per name, and
                    # a name Triton does not know is the caller's mistake, not a Triton error.
                    label = "*" if kind == "metadata" else model
                    translated = _translate(error, model)
                    unavailable = isinstance(translated, Unavailable)
                    self.endpoints.finished(endpoint, UNAVAILABLE if unavailable else ERROR, sent)
                    if not (kind == "metadata" and isinstance(translated, NotFound)):
                        code = _status_name(error)
                        metrics.TRITON_ERRORS.labels(model=label, kind=kind, code=code).inc()
                    message = error.message() or str(error)
                    if is_worker_failure(message):
                        raise await self.model_health.worker_failed(
                            model, message, started
                        ) from None
                    if isinstance(translated, DeadlineExceeded) and timeout >= timeout_s:
                        asked = "its repository index" if model == "*" else f"model {model!r}"
                        raise Unavailable(  # our bound ran out, not the caller's deadline
                            f"Triton did not answer for {asked} within {timeout_s:g} s ({setting}): "
                            "hung or overloaded; retry with backoff"
                        ) from None
                    # Another endpoint is asked at once; the same one after a backoff, jittered
                    # so that streams failing together do not retry in lockstep.
                    backoff = 0.0
                    if not self.endpoints.has_untried(tried):
                        backoff = self._retry_backoff_s * 2**attempt * random.uniform(0.5, 1.5)
                    out_of_time = deadline is not None and time.monotonic() + backoff >= deadline
                    if not unavailable or attempt == self._retries or out_of_time:
                        if unavailable:
                            translated = self._unreachable(model, tried, message)
                        raise translated from None
                    logger.info(
                        "Triton%s unavailable for model %s, retrying: %s",
                        self._where(endpoint),
                        model,
                        message,
                    )
                else:
                    self.endpoints.finished(endpoint, OK, sent)
                    return result
            metrics.TRITON_RETRIES.labels(kind=kind).inc()
            await asyncio.sleep(backoff)
        raise AssertionError("unreachable")

    def _unreachable(self, model: str, tried: Sequence[str], message: str) -> Unavailable:
        """The error, and the one WARNING, for a call no endpoint it tried answered."""
        tried_text = self.endpoints.describe_tried(tried)
        logger.warning("Triton unreachable for model %s (%s): %s", model, tried_text, message)
        return unreachable(len(tried))

    async def close(self) -> None:
        await self.model_health.close()
        await self.endpoints.close()

    async def is_live(self) -> bool:
        """Live while any endpoint is; live, not ready: Triton's strict readiness is false
        while any one model fails to load, which must not take every gateway out of
        service; requests ask per model. Its probes also move endpoints in and out of the
        rotation."""
        return await self.endpoints.check()

    async def repository(self, deadline: float | None = None) -> list[RepositoryEntry]:
        async def call(client: Client, timeout: float) -> dict:
            return await client.get_model_repository_index(as_json=True, client_timeout=timeout)

        index = await self._with_retries(call, "*", "metadata", deadline)
        return [
            RepositoryEntry(
                m["name"],
                m.get("version", ""),
                m.get("state", "UNKNOWN"),
                m.get("reason", ""),
                loads_on_demand=m["name"] in self._load_on_demand,
            )
            for m in index.get("models", [])
        ]

    async def describe(
        self, name: str, version: str = "", deadline: float | None = None
    ) -> ModelDescription:
        """The model's metadata and config, resolved to one version. A model Triton
        knows but has not loaded is FAILED_PRECONDITION, not NOT_FOUND."""
        cached = self._descriptions.get((name, version))
        if cached and time.monotonic() - cached[0] < DESCRIPTION_TTL_S:
            return cached[1]

        async def call(client: Client, timeout: float) -> tuple[dict, dict]:
            metadata, config = await asyncio.gather(
                client.get_model_metadata(name, version, as_json=True, client_timeout=timeout),
                client.get_model_config(name, version, as_json=True, client_timeout=timeout),
            )
            return metadata, config["config"]

        try:
            metadata, config = await self._with_retries(call, name, "metadata", deadline)
        except NotFound:
            if name not in self._load_on_demand:
                await self._raise_why_missing(name, version, deadline)
                raise
            await self._load(name, deadline)
            try:
                metadata, config = await self._with_retries(call, name, "metadata", deadline)
            except NotFound:
                await self._raise_why_missing(name, version, deadline)
                raise
        description = _description(metadata, config, version)
        self._descriptions[(name, version)] = (time.monotonic(), description)
        await self.model_health.track(description.name)
        return description

    async def _load(self, name: str, deadline: float | None) -> None:
        """Loads a model the settings name in load_on_demand (every version its
        version_policy serves) on every endpoint in rotation that lacks it, once however
        many requests ask at the same time. Needs --model-control-mode=explicit; a load
        that fails is Triton's reason, as for a model that failed at the start. A load
        that fails on some endpoints only is logged: the others serve, and a request that
        finds an endpoint without the model loads it there again."""
        lock = self._loads.setdefault(name, asyncio.Lock())
        async with lock:
            timeout = self._default_timeout_s
            if deadline is not None:
                timeout = max(0.001, min(timeout, deadline - time.monotonic()))
            endpoints = self.endpoints.in_rotation()
            results = await asyncio.gather(
                *(self._load_on(endpoint, name, timeout) for endpoint in endpoints),
                return_exceptions=True,
            )
            failures = [r for r in results if isinstance(r, BaseException)]
            # An unreachable endpoint was logged, with its address, where it failed.
            if results and all(isinstance(r, Unavailable) for r in results):
                raise unreachable(len(results))
            if len(failures) == len(results):
                raise failures[0]
            for failure in failures:
                if not isinstance(failure, Unavailable):
                    logger.warning("%s; the other Triton endpoints serve it", failure)
            if any(r is True for r in results):
                self._forget(name)

    async def _load_on(self, endpoint: Endpoint, name: str, timeout: float) -> bool:
        """Loads the model on one endpoint unless it is ready there: whether it loaded.
        A request that waited on the lock finds the model another one loaded."""
        where = self._where(endpoint)
        client = endpoint.client
        with self.endpoints.calling(endpoint) as sent:
            try:
                if await client.is_model_ready(name, client_timeout=timeout):
                    return False
                logger.info("loading model %s on demand (setting load_on_demand)%s", name, where)
                await client.load_model(name, client_timeout=timeout)
            except InferenceServerException as error:
                translated = _translate(error, name)
                if isinstance(translated, Unavailable):
                    self.endpoints.finished(endpoint, UNAVAILABLE, sent)
                    message = error.message() or str(error)
                    raise self._unreachable(name, [endpoint.address], message) from None
                raise FailedPrecondition(
                    f"model {name!r} (load_on_demand) failed to load{where}: {error.message()}"
                ) from None
            self.endpoints.finished(endpoint, OK, sent)
        return True

    async def require_ready(self, model: ModelDescription, deadline: float | None) -> None:
        """Descriptions are cached; readiness is asked per request, so a model unloaded
        since, or sick, is refused before any work instead of failing every property."""
        self.model_health.refuse_if_sick(model.name)

        async def call(client: Client, timeout: float) -> bool:
            return await client.is_model_ready(model.name, model.version, client_timeout=timeout)

        if await self._with_retries(call, model.name, "metadata", deadline):
            return
        if model.name in self._load_on_demand:  # an endpoint restarted or added lacks it
            await self._load(model.name, deadline)
            if await self._with_retries(call, model.name, "metadata", deadline):
                return
        await self._raise_why_missing(model.name, model.version, deadline)
        raise FailedPrecondition(
            f"model {model.name!r} version {model.version} is not ready on Triton"
        )

    async def _raise_why_missing(self, name: str, version: str, deadline: float | None) -> None:
        """Forgets the model's cached descriptions; raises FailedPrecondition when Triton's
        repository holds the model but has no version of it loaded, and NotFound naming
        the served versions when `version` is not one of them, or the served model whose
        name is closest when Triton has none of this name (a typo)."""
        self._forget(name)
        repository = await self.repository(deadline)
        entries = [e for e in repository if e.name == name]
        if not entries:
            ready = {e.name for e in repository if e.state == "READY"}
            close = closest(name, sorted(ready))
            if close:
                raise NotFound(
                    f"model {name!r} is not served by Triton; did you mean {close!r}? "
                    "(ListModels shows what is)"
                )
        served = sorted({e.version for e in entries if e.state == "READY"}, key=_version_order)
        if entries and not served:
            entry = entries[0]
            reason = f": {entry.reason}" if entry.reason else ""
            raise FailedPrecondition(
                f"model {name!r} is in Triton's repository but {entry.state}{reason}; "
                "it serves once loaded"
            )
        if served and version and version not in served:
            raise NotFound(
                f"model {name!r} has no version {version} served; Triton serves version(s) "
                f"{', '.join(served)} (an empty version asks for the latest)"
            )

    def _forget(self, name: str) -> None:
        self._descriptions = {k: v for k, v in self._descriptions.items() if k[0] != name}

    async def _reload(self, name: str) -> None:
        """Loads the model again on every endpoint its last probe failed on (every one in
        rotation when none is known), with its own config plus a changed marker
        parameter: Triton skips a load whose files and config did not change, and a
        changed config loads new instances while the old ones stay (the model never
        disappears, as it would between an unload and a load). Needs
        --model-control-mode=explicit."""
        failing = [e for e in self._failing.get(name, ()) if self.endpoints.holds(e)]
        endpoints = failing or self.endpoints.in_rotation()
        results = await asyncio.gather(
            *(self._reload_on(endpoint, name) for endpoint in endpoints),
            return_exceptions=True,
        )
        self._forget(name)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _reload_on(self, endpoint: Endpoint, name: str) -> None:
        with self.endpoints.calling(endpoint):
            response = await endpoint.client.get_model_config(
                name, as_json=True, client_timeout=self._metadata_timeout_s
            )
            config = response["config"]
            marker = {"string_value": datetime.now(UTC).isoformat()}
            config.setdefault("parameters", {})[RESTORED_PARAMETER] = marker
            await endpoint.client.load_model(
                name, config=json.dumps(config), client_timeout=self._default_timeout_s
            )

    async def _probe(self, name: str) -> None:
        """A real inference of tiny zero inputs of the model's declared types and ranks,
        on every endpoint in rotation. Its success, or the model's own error about those
        inputs (INTERNAL, not a worker failure), shows that its worker answers; anything
        else raises, and the endpoints it failed on are the next reload's."""
        model = await self.describe(name)
        batch = (1,) if model.max_batch_size > 0 else ()
        inputs = [
            triton_input(t.name, _zeros(t.datatype, (*batch, *(max(d, 1) for d in t.shape))))
            for t in model.inputs
        ]
        endpoints = self.endpoints.in_rotation()
        results = await asyncio.gather(
            *(self._probe_on(endpoint, model, inputs) for endpoint in endpoints),
            return_exceptions=True,
        )
        failed = [(e, r) for e, r in zip(endpoints, results, strict=True) if r is not None]
        self._failing[name] = [endpoint for endpoint, _ in failed]
        if failed:
            raise failed[0][1]

    async def _probe_on(self, endpoint: Endpoint, model: ModelDescription, inputs: list) -> None:
        try:
            with self.endpoints.calling(endpoint):
                await self._request(endpoint.client, model, inputs, (), self._default_timeout_s)
        except InferenceServerException as error:
            if _status_name(error) != "INTERNAL" or is_worker_failure(error.message() or ""):
                raise

    async def edit(
        self,
        editor: ModelDescription,
        image: np.ndarray,
        strengths: np.ndarray,
        parameters: str,
        seeds: list[int],
        deadline: float | None,
        progress: ReportProgress = unreported,
    ) -> np.ndarray:
        """One editor call for all samples: the paths [S, N, H, W, 3] uint8. An editor
        with dynamic batching takes it as a batch of one; a decoupled editor's progress
        reports reach `progress` as they come."""
        tensors = {
            IMAGE_INPUT: np.ascontiguousarray(image, dtype=np.uint8),
            STRENGTHS_INPUT: np.asarray(strengths, dtype=np.float32),
            PARAMETERS_INPUT: np.array([parameters.encode()], dtype=np.object_),
            SEED_INPUT: np.array([seed % 2**63 for seed in seeds], dtype=np.int64),
        }
        batch = editor.max_batch_size > 0
        inputs = [
            triton_input(name, array[None] if batch else array) for name, array in tensors.items()
        ]
        result = (await self._infer(editor, inputs, [PATH_OUTPUT], deadline, "edit", progress))[
            PATH_OUTPUT
        ]
        result = result[0] if batch else result
        expected = (len(seeds), len(strengths), *image.shape)
        if result.shape != expected or result.dtype != np.uint8:
            raise BackendError(
                f"editor {editor.name!r} returned {result.dtype}{list(result.shape)}; "
                f"the editor contract needs uint8{list(expected)}"
            )
        return result

    async def infer(
        self,
        model: ModelDescription,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        deadline: float | None,
    ) -> dict[str, np.ndarray]:
        """Named batched inputs -> named outputs, in chunks of the model's max_batch_size
        (> 0): a batch of any size never exceeds what the model accepts at once."""
        size = len(next(iter(inputs.values())))
        chunks: list[dict[str, np.ndarray]] = []
        for start in range(0, size, model.max_batch_size):
            tensors = [
                triton_input(name, array[start : start + model.max_batch_size])
                for name, array in inputs.items()
            ]
            chunks.append(await self._infer(model, tensors, outputs, deadline, kind="classify"))
        return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in outputs}

    async def _infer(
        self,
        model: ModelDescription,
        inputs: list[InferInput],
        outputs: Sequence[str],
        deadline: float | None,
        kind: str,
        progress: ReportProgress = unreported,
    ) -> dict[str, np.ndarray]:
        """Inference is idempotent, so retrying it is safe. Cancelling the awaiting task
        cancels the gRPC call, which Triton sees as a cancelled request."""

        async def call(client: Client, timeout: float) -> InferResult:
            return await self._request(client, model, inputs, outputs, timeout, progress)

        self.model_health.refuse_if_sick(model.name)
        started = time.perf_counter()
        outcome = "error"
        try:
            try:
                result = await self._with_retries(call, model.name, kind, deadline)
            except NotFound:
                if model.name not in self._load_on_demand:
                    raise
                await self._load(model.name, deadline)  # a Triton restarted or added lacks it
                result = await self._with_retries(call, model.name, kind, deadline)
            outcome = "ok"
        except NotFound:  # unloaded since it was described
            await self._raise_why_missing(model.name, model.version, deadline)
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            metrics.TRITON_SECONDS.labels(model=model.name, kind=kind, outcome=outcome).observe(
                time.perf_counter() - started
            )
        return {name: result.as_numpy(name) for name in outputs}

    async def _request(
        self,
        client: Client,
        model: ModelDescription,
        inputs: list[InferInput],
        outputs: Sequence[str],
        timeout: float,
        progress: ReportProgress = unreported,
    ) -> InferResult:
        """One inference (no outputs named: all of them). A decoupled model answers on a
        stream: its PROGRESS responses go to `progress` (asked for only when the model
        declares PROGRESS: Triton refuses an undeclared output), the response without one
        is the result. Failures are raised as a unary call raises them."""
        requested = [InferRequestedOutput(name) for name in outputs]
        if not model.decoupled:
            return await client.infer(
                model.name,
                inputs,
                model_version=model.version,
                outputs=requested,
                client_timeout=timeout,
            )

        if requested and any(tensor.name == PROGRESS_OUTPUT for tensor in model.outputs):
            requested.append(InferRequestedOutput(PROGRESS_OUTPUT))

        async def one_request() -> AsyncIterator[dict]:
            yield {
                "model_name": model.name,
                "model_version": model.version,
                "inputs": inputs,
                "outputs": requested or None,
            }

        stream = client.stream_infer(one_request(), stream_timeout=timeout)
        try:
            async for result, error in stream:
                if error is not None:  # the model's own error, which a unary call gets as INTERNAL
                    raise InferenceServerException(error.message(), status="StatusCode.INTERNAL")
                report = result.as_numpy(PROGRESS_OUTPUT)
                if report is None:
                    return result
                done, total = (int(value) for value in report.reshape(-1))
                progress(done, total)
        except grpc.RpcError as error:  # the stream itself failed: Triton down, deadline, ...
            raise InferenceServerException(error.details(), status=str(error.code())) from None
        finally:
            stream.cancel()  # after the result it only closes the stream; before, it stops the work
        raise InferenceServerException(
            f"model {model.name!r} closed its stream without a result", status="StatusCode.INTERNAL"
        )


def triton_input(name: str, array: np.ndarray) -> InferInput:
    """One named input tensor of a Triton request (also for the dev tools' direct calls)."""
    tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


def _zeros(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Zeros of a Triton datatype; empty byte strings for BYTES."""
    if datatype == "BYTES":
        return np.full(shape, b"", dtype=np.object_)
    return np.zeros(shape, dtype=triton_to_np_dtype(datatype))


def _version_order(version: str) -> int:
    return int(version) if version.isdigit() else 0


def _description(metadata: dict, config: dict, requested_version: str) -> ModelDescription:
    versions = tuple(sorted(metadata.get("versions", []), key=_version_order))
    version = requested_version or (versions[-1] if versions else "")
    parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    schema_text = parameters.get(SCHEMA_PARAMETER)

    optional = {t["name"] for t in config.get("input", []) if t.get("optional", False)}

    def tensors(items: list[dict]) -> tuple[Tensor, ...]:
        return tuple(
            Tensor(
                t["name"],
                t["datatype"],
                [int(d) for d in t.get("shape", [])],
                optional=t["name"] in optional,
            )
            for t in items
        )

    preprocessing, class_labels, problem = PreprocessingConfig(), (), ""
    layers: tuple[Layer, ...] = ()
    channel_means: dict[str, tuple[float, ...]] = {}
    try:
        preprocessing, class_labels = declared_preprocessing(parameters)
        layers, channel_means = declared_layers(parameters)
    except ValueError as error:
        problem = str(error)
    max_batch_size = int(config.get("max_batch_size", 0))
    inputs, outputs = tensors(metadata.get("inputs", [])), tensors(metadata.get("outputs", []))
    if max_batch_size > 0:  # metadata shapes include the batch dimension as -1
        inputs = tuple(Tensor(t.name, t.datatype, t.shape[1:], t.optional) for t in inputs)
        outputs = tuple(Tensor(t.name, t.datatype, t.shape[1:]) for t in outputs)
    return ModelDescription(
        name=metadata["name"],
        version=version,
        versions=versions,
        role="editor" if parameters.get(ROLE_PARAMETER) == "editor" else "classifier",
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch_size,
        description=parameters.get("description", ""),
        decoupled=bool(config.get("model_transaction_policy", {}).get("decoupled", False)),
        parameters=parameters,
        editor_schema=EditorSchema.from_json(schema_text) if schema_text else None,
        preprocessing=preprocessing,
        class_labels=class_labels,
        layers=layers,
        channel_means=channel_means,
        config_problem=problem,
    )


# config.pbtxt parameters in which a classifier's owners declare its preprocessing.
MEAN_PARAMETER = "propscope.mean"
STD_PARAMETER = "propscope.std"
RESIZE_PARAMETER = "propscope.resize"
OUTPUT_KIND_PARAMETER = "propscope.output_kind"
CLASS_LABELS_PARAMETER = "propscope.class_labels"


def declared_preprocessing(
    parameters: Mapping[str, str],
) -> tuple[PreprocessingConfig, tuple[str, ...]]:
    """The preprocessing and class labels a model's config.pbtxt declares; ValueError
    naming the parameter and the expected format when one cannot be read."""
    values: dict[str, object] = {}
    for key, name in ((MEAN_PARAMETER, "mean"), (STD_PARAMETER, "std")):
        if parameters.get(key, "").strip():
            try:
                numbers = tuple(float(v) for v in parameters[key].split(","))
            except ValueError:
                numbers = ()
            if len(numbers) != 3:
                raise ValueError(
                    f"config parameter {key} is {parameters[key]!r}; it needs three "
                    'comma-separated numbers, e.g. "0.485,0.456,0.406"'
                )
            values[name] = numbers
    for key, name, choices in (
        (RESIZE_PARAMETER, "resize", RESIZE_MODES),
        (OUTPUT_KIND_PARAMETER, "output_kind", OUTPUT_KINDS),
    ):
        value = parameters.get(key, "").strip()
        if value and value not in choices:
            raise ValueError(f"config parameter {key} is {value!r}; one of {', '.join(choices)}")
        if value:
            values[name] = value
    preprocessing = PreprocessingConfig(**values)
    if preprocessing.std is not None and min(preprocessing.std) <= 0:
        raise ValueError(f"config parameter {STD_PARAMETER} must be positive")
    labels: tuple[str, ...] = ()
    if parameters.get(CLASS_LABELS_PARAMETER, "").strip():
        try:
            parsed = json.loads(parameters[CLASS_LABELS_PARAMETER])
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
            raise ValueError(
                f"config parameter {CLASS_LABELS_PARAMETER} needs a JSON list of strings, "
                'e.g. "[\\"cat\\", \\"dog\\"]"'
            )
        labels = tuple(parsed)
    return preprocessing, labels


def declared_layers(
    parameters: Mapping[str, str],
) -> tuple[tuple[Layer, ...], dict[str, tuple[float, ...]]]:
    """The layers (order kept: it is each layer's index) and channel means an open
    model declares; ValueError naming the parameter and the expected format when one
    cannot be read."""
    layers = parse_layers(parameters.get(LAYERS_PARAMETER))
    means: dict[str, tuple[float, ...]] = {}
    text = parameters.get(CHANNEL_MEANS_PARAMETER, "").strip()
    if text:
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError(
                f"config parameter {CHANNEL_MEANS_PARAMETER} needs a JSON object of layer -> "
                f"list of one number per channel, for layers declared in {LAYERS_PARAMETER}"
            )
        channels = {layer.name: layer.channels for layer in layers}
        for name, values in parsed.items():
            if name not in channels:
                raise ValueError(
                    f"config parameter {CHANNEL_MEANS_PARAMETER} names layer {name!r}, which "
                    f"{LAYERS_PARAMETER} does not declare"
                    + (f" (it declares {', '.join(channels)})" if channels else "")
                )
            if (
                not isinstance(values, list)
                or len(values) != channels[name]
                or not all(
                    isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                    for v in values
                )
            ):
                raise ValueError(
                    f"config parameter {CHANNEL_MEANS_PARAMETER}: layer {name!r} needs a list "
                    f"of {channels[name]} finite numbers (one per channel)"
                )
            means[name] = tuple(float(v) for v in values)
    return layers, means
