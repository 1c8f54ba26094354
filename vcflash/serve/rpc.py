"""gRPC plumbing shared by every vcflash server: auth, error mapping, health, reflection."""

from __future__ import annotations

import functools
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vcflash.serve.errors import AlreadyExists, Exhausted, Invalid, NotFound, Unavailable
from vcflash.serve.settings import check_token

log = logging.getLogger(__name__)

# Probes must work without credentials (compose healthchecks, grpcurl list).
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")
STATUS = (  # the neutral errors, most specific first
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (Exhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Invalid, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one place where errors become gRPC status codes: the neutral ones by kind, anything else is a bug
    (INTERNAL, with no detail for the client)."""
    for kind, code in STATUS:
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error"


F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(method: F) -> F:
    """Abort with the mapped status instead of leaking a traceback; works for unary and streaming methods."""

    async def abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
        code, message = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("event=rpc_failed method=%s", method.__name__)
        await context.abort(code, message)

    if hasattr(method, "__code__") and method.__code__.co_flags & 0x200:  # async generator

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except Exception as exc:  # noqa: BLE001 - mapped to a status
                await abort(context, exc)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            await abort(context, exc)

    return unary  # type: ignore[return-value]


class BearerAuth(grpc.aio.ServerInterceptor):
    """Every call but health and reflection needs `authorization: Bearer <token>`; a short token is refused here
    too, so no caller can turn auth off by passing an empty one."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {check_token(token, 'the server settings')}".encode()

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        # One refusal per call shape, keyed by (request_streaming, response_streaming).
        self._deny = {
            (False, False): grpc.unary_unary_rpc_method_handler(deny),
            (False, True): grpc.unary_stream_rpc_method_handler(deny),
            (True, False): grpc.stream_unary_rpc_method_handler(deny),
            (True, True): grpc.stream_stream_rpc_method_handler(deny),
        }

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(got.encode() if isinstance(got, str) else got, self._expected):
            return handler
        return self._deny[(handler.request_streaming, handler.response_streaming)]


def create_server(
    address: str,
    services: Iterable[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]],
    token: str,
    max_message_bytes: int,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """A grpc.aio server with the given (add_fn, servicer, full service name) triples, auth, health
    (every service NOT_SERVING until the caller marks it ready) and reflection, over TLS when `credentials` are
    given (`tls.server_credentials`). Returns the bound port."""
    server = grpc.aio.server(
        interceptors=[BearerAuth(token)],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    names = []
    for add, servicer, name in services:
        add(servicer, server)
        names.append(name)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, port, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *names]:
        await health_servicer.set(name, status)
