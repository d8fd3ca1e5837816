"""The one interceptor that turns exceptions into gRPC status codes.

An exception with a ``code`` attribute (``server.registry.errors``, ``server.errors``) gets
that status and its message; ``ImageDecodeError`` is INVALID_ARGUMENT (its message names the
image's index); ``NotImplementedError`` (what a generated servicer base raises for a method we
do not override, e.g. the KServe v2 RPCs protoserve leaves out) is UNIMPLEMENTED; anything else
is INTERNAL with the traceback logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from server.imaging import ImageDecodeError
from server.metrics import Metrics

__all__ = ["ErrorInterceptor", "status_for"]

log = logging.getLogger(__name__)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ImageDecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, "protoserve does not implement this RPC"
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in grpc.StatusCode.__members__:
        return grpc.StatusCode[code], str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def _abort(
    method: str, context: grpc.ServicerContext, exc: Exception, done: Callable[[str], None]
) -> None:
    status, message = status_for(exc)
    if status is grpc.StatusCode.UNIMPLEMENTED:
        message = f"{method.rsplit('/', 1)[-1]}: {message}"
    done(status.name)
    fields = {"rpc": method.rsplit("/", 1)[-1], "code": status.name}
    if status is grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method, extra=fields)
    else:
        log.info("%s -> %s: %s", method, status.name, message, extra=fields)
    context.abort(status, message)


class ErrorInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Maps exceptions to statuses; with ``metrics``, records each RPC's status and latency."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        # gRPC asks for a handler on every call; a method's wrapped handler is built once
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        metrics = self.metrics

        def recorder() -> Callable[[str], None]:
            start = time.perf_counter()

            def done(code: str) -> None:
                if metrics is not None:
                    metrics.observe(method, code, time.perf_counter() - start)

            return done

        def unary(fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                done = recorder()
                try:
                    out = fn(request, context)
                except Exception as e:
                    _abort(method, context, e, done)
                    raise  # not reached: abort raises
                done("OK")
                return out

            return call

        def streaming(
            fn: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
        ) -> Callable[..., Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                done = recorder()
                try:
                    yield from fn(request, context)
                except Exception as e:
                    _abort(method, context, e, done)
                    raise  # not reached: abort raises
                done("OK")

            return call

        kinds = {
            "unary_unary": (unary, grpc.unary_unary_rpc_method_handler),
            "unary_stream": (streaming, grpc.unary_stream_rpc_method_handler),
            "stream_unary": (unary, grpc.stream_unary_rpc_method_handler),
            "stream_stream": (streaming, grpc.stream_stream_rpc_method_handler),
        }
        for attr, (wrap, make) in kinds.items():
            fn = getattr(handler, attr)
            if fn is not None:
                return make(
                    wrap(fn),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler
