"""gRPC plumbing shared by every vcflash server: auth, error mapping, health, reflection."""

from __future__ import annotations

import asyncio
import errno
import functools
import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vcflash.serve.errors import AlreadyExists, Exhausted, FailedPrecondition, Invalid, NotFound, Unavailable
from vcflash.serve.settings import check_token

log = logging.getLogger(__name__)

# Probes must work without credentials (compose healthchecks, grpcurl list).
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")
STATUS = (  # the neutral errors, most specific first
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (Exhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Invalid, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one place where errors become gRPC status codes: the neutral ones by kind, anything else is a bug
    (INTERNAL, with no detail for the client)."""
    for kind, code in STATUS:
        if isinstance(exc, kind):
            return code, _short(str(exc))
    return grpc.StatusCode.INTERNAL, "internal error"


MAX_DETAILS_CHARS = 512


def _short(message: str) -> str:
    """`message` cut to MAX_DETAILS_CHARS, unprintable characters escaped: status details travel as a header (8 KiB
    for all of them by default) and end up in clients' logs, and a message quoting client input whole (a 10 KB
    stream name, a URL with CR/LF) must neither send it all back, nor break the call, nor forge a log line."""
    if len(message) > MAX_DETAILS_CHARS:
        message = f"{message[:MAX_DETAILS_CHARS]}... ({len(message)} chars)"
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message)


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
            except grpc.aio.AbortError:  # already answered (e.g. a malformed message in a request stream)
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status
                await abort(context, exc)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            await abort(context, exc)

    return unary  # type: ignore[return-value]


MALFORMED = object()  # what a request message that does not parse deserializes to
MALFORMED_MESSAGE = "malformed request: the message is not a valid protobuf of the method's request type"


class MalformedRequests(grpc.aio.ServerInterceptor):
    """A request message that does not parse is INVALID_ARGUMENT, for every method and call shape (grpc-python
    would answer UNKNOWN or INTERNAL and log a traceback): each handler's deserializer returns `MALFORMED` instead
    of raising, and its behaviour aborts on it, for a unary request before the method runs, in a request stream
    when the method reads that message."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def deserialize(raw: bytes) -> Any:
            try:
                return parse(raw)
            except Exception:  # noqa: BLE001 - DecodeError and kin: the client's mistake, answered by the behaviour
                return MALFORMED

        kind = {
            (False, False): "unary_unary",
            (False, True): "unary_stream",
            (True, False): "stream_unary",
            (True, True): "stream_stream",
        }[(handler.request_streaming, handler.response_streaming)]
        behavior = getattr(handler, kind)
        if behavior is None:
            return handler
        guard = _guard_stream if handler.request_streaming else _guard_unary
        return handler._replace(request_deserializer=deserialize, **{kind: guard(behavior)})


async def _refuse(context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_MESSAGE)


def _guard_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """`behavior` (a coroutine or async generator function; grpc.aio tells them apart) refusing MALFORMED."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if request is MALFORMED:
                await _refuse(context)
            async for item in behavior(request, context):
                yield item

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request is MALFORMED:
            await _refuse(context)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result

    return unary


def _guard_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """A request-streaming `behavior` that is cancelled, and the call refused, when a MALFORMED message arrives:
    the method may read its requests in another task (EncodeClips does), so raising in the iterator would not end
    the call; the iterator flags the message and waits, and each step of the method races that flag."""

    async def checked(requests: Any, bad: asyncio.Event) -> AsyncIterator[Any]:
        async for request in requests:
            if request is MALFORMED:
                bad.set()
                await asyncio.Event().wait()  # until the call is cancelled below
            yield request

    async def step(work: Awaitable[Any], bad: asyncio.Event, context: grpc.aio.ServicerContext) -> Any:
        task = asyncio.ensure_future(work)
        flag = asyncio.ensure_future(bad.wait())
        try:
            await asyncio.wait({task, flag}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            flag.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if bad.is_set() and task.cancelled():
            await _refuse(context)
        return task.result()

    if inspect.isasyncgenfunction(behavior):

        async def stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            bad = asyncio.Event()
            responses = behavior(checked(requests, bad), context)
            try:
                while True:
                    try:
                        item = await step(responses.__anext__(), bad, context)
                    except StopAsyncIteration:
                        return
                    yield item
            finally:
                await responses.aclose()

        return stream

    async def unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        bad = asyncio.Event()

        async def call() -> Any:
            result = behavior(checked(requests, bad), context)
            return await result if inspect.isawaitable(result) else result

        return await step(call(), bad, context)

    return unary


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


class HealthServicer(health.aio.HealthServicer):
    """grpc's asyncio health servicer with `List`, which grpc.health.v1 has and the stock servicer lacks (the generated
    base raises NotImplementedError: UNKNOWN for any caller, no token needed, and a traceback in the log).
    The whole server ("") and each named service start NOT_SERVING: the stock servicer says SERVING for "" from
    the start, so a server still resuming (or about to fail doing so) would pass `vcflash health` and compose's
    check."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        super().__init__()
        for name in ["", *names]:
            self._server_status[name] = health_pb2.HealthCheckResponse.NOT_SERVING

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        statuses = dict(self._server_status)  # the servicer's own table; grpc_health has no public accessor
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name, status in statuses.items()}
        )


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
        interceptors=[MalformedRequests(), BearerAuth(token)],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a busy port fails instead of silently sharing it
            # clients' keepalive pings (ingest's encoder link: every 20 s) are welcome, also between calls;
            # gRPC's default answers pings more often than every 5 min with GOAWAY "too_many_pings"
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    names = []
    for add, servicer, name in services:
        add(servicer, server)
        names.append(name)
    health_servicer = HealthServicer(names)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpc's "Failed to bind": in use, or not an address of this host
        port = 0
    if port == 0:
        raise OSError(errno.EADDRINUSE, f"cannot listen on {address} (in use, or not an address of this host)")
    return server, port, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *names]:
        await health_servicer.set(name, status)
