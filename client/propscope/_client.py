"""The synchronous client."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc

from propscope._errors import PropscopeError
from propscope._events import Event, ModelInfo, event_from_proto
from propscope._images import ImageLike
from propscope._preprocessing import PathMode, Preprocessing
from propscope._properties import Property
from propscope._requests import (
    Metadata,
    build_explain_request,
    build_list_models_request,
    call_options,
    channel_options,
)
from propscope.v1 import explain_pb2, explain_pb2_grpc

__all__ = ["Client"]

logger = logging.getLogger(__name__)


class Client:
    """A connection to a propscope gateway.

    ``target`` is ``host:port``. Without ``credentials`` the channel is insecure. ``token`` is
    the gateway's bearer token (sent as ``authorization: Bearer <token>``). ``metadata`` is
    sent with every call (a call's own ``metadata`` is appended), ``timeout`` (seconds) is the
    default deadline of every call (for ``explain``, of the whole stream). ``options`` are extra
    gRPC channel options. Every failed call raises ``PropscopeError``. Use as a context manager or
    call ``close()``.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        metadata: Metadata = (),
        timeout: float | None = None,
        options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self._metadata = tuple(metadata)
        if token:
            self._metadata += (("authorization", f"Bearer {token}"),)
            host = target.rsplit(":", 1)[0]
            if credentials is None and host not in ("127.0.0.1", "localhost", "[::1]"):
                logger.warning("sending a bearer token to %s over a plaintext channel", target)
        self._timeout = timeout
        merged_options = channel_options(options)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=merged_options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=merged_options)
        self._stub = explain_pb2_grpc.ExplainServiceStub(self._channel)
        self._closed = False

    def explain(
        self,
        image: ImageLike,
        model: str,
        properties: Property | str | Iterable[Property | str],
        *,
        steps: int = 0,
        samples: int = 0,
        seed: int = 0,
        permutations: int = 0,
        alpha: float = 0.0,
        min_probability_change: float | None = None,
        return_path_images: bool = False,
        target_class: int | None = None,
        model_version: str = "",
        model_output: str = "",
        request_id: str = "",
        preprocessing: Preprocessing | None = None,
        class_labels: Sequence[str] = (),
        path_mode: PathMode | None = None,
        max_steps: int = 0,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> Iterator[Event]:
        """Explains ``model``'s prediction on ``image`` for each of ``properties``.

        ``image``: encoded PNG/JPEG bytes, a path, an RGB uint8 HxWx3 array or a PIL image.
        ``properties``: ``Property`` objects or ``parse_property`` strings. 0 for ``steps``,
        ``samples``, ``permutations`` and ``alpha`` means the server's default;
        ``target_class=None`` follows the class the model predicts for the original image;
        ``min_probability_change=None`` takes the server's default effect size for ``relevant``.
        ``preprocessing`` overrides, field by field, what the model declares (mean, std, output
        kind, resize mode); ``class_labels`` names the classes by index (default: the model's).
        ``path_mode`` is "adaptive" (the server's default: a path the test cannot decide is
        lengthened up to ``max_steps``, 0 meaning the server's limit) or "fixed".

        The arguments are checked and the call started before this returns (``ValueError``,
        ``TypeError`` or ``OSError`` for bad arguments); the returned iterator yields
        ``Accepted``, then ``Progress`` and ``PropertyResult`` events, and ``Done`` last, and
        raises ``PropscopeError`` when the call fails, also midway. Closing the iterator early
        (``break``, ``close()``) cancels the call.
        """
        self._check_open()
        request = build_explain_request(
            image,
            model,
            properties,
            steps=steps,
            samples=samples,
            seed=seed,
            permutations=permutations,
            alpha=alpha,
            min_probability_change=min_probability_change,
            return_path_images=return_path_images,
            target_class=target_class,
            model_version=model_version,
            model_output=model_output,
            request_id=request_id,
            preprocessing=preprocessing,
            class_labels=class_labels,
            path_mode=path_mode,
            max_steps=max_steps,
        )
        logger.debug(
            "Explain %s: model %s, %d properties, request_id %r",
            self.target,
            model,
            len(request.properties),
            request_id,
        )
        call = self._stub.Explain(request, **self._call_options(timeout, metadata))
        return _events(call)

    def list_models(
        self, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> list[ModelInfo]:
        """The classifiers and editors the gateway's Triton server serves."""
        self._check_open()
        try:
            response: explain_pb2.ListModelsResponse = self._stub.ListModels(
                build_list_models_request(), **self._call_options(timeout, metadata)
            )
        except grpc.RpcError as error:
            raise PropscopeError.from_rpc_error(error) from error
        return [ModelInfo.from_proto(model) for model in response.models]

    def close(self) -> None:
        """Closes the channel, cancelling calls in flight; closing twice is harmless."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    def _call_options(self, timeout: float | None, metadata: Metadata | None) -> dict[str, Any]:
        return call_options(
            default_timeout=self._timeout,
            default_metadata=self._metadata,
            timeout=timeout,
            metadata=metadata,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the client is closed")


def _events(call: Any) -> Iterator[Event]:
    """The typed events of a started Explain call; cancels the call when closed early."""
    try:
        for message in call:
            try:
                event = event_from_proto(message)
            except ValueError:
                logger.debug("skipping an event this SDK does not know: %s", message)
                continue
            yield event
    except grpc.RpcError as error:
        raise PropscopeError.from_rpc_error(error) from error
    finally:
        call.cancel()
