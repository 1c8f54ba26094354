"""WHIP over HTTP: a sender (OBS, a browser, any WHIP client) POSTs an SDP offer and streams video.

``POST /whip/{stream}`` (``Content-Type: application/sdp``) negotiates a :class:`WebRTCSession`
and adds stream ``{stream}`` to the stream registry (:class:`Streams`, the path AddStream takes
too: same limits, retention and durable config) with the session as its frame source;
``DELETE /whip/{stream}`` ends both. Negotiation is non-trickle (no ``PATCH``): the offer
must carry the sender's candidates, and the answer carries ours. ``GET /whip/{stream}`` shows the
stream's and the session's status (including frames dropped before the pipeline), ``GET
/healthz`` answers 200. ``GET /v1/streams/{stream}/thumbnails/{seq}.jpg`` serves a stored clip's JPEG
thumbnail from the memory (404 when the stream or the clip is unknown). ``GET
/v1/streams/{stream}/recording.mp4?start=T&end=T`` (Unix seconds or ISO date-times, wall clock) cuts a recorded moment
as an MP4 by remux (see :mod:`ingest.recording`): 400 for a bad or too long range, 404 when nothing is recorded
there. With a token configured every request but
the CORS preflight and ``/healthz`` needs ``Authorization: Bearer <token>``; a GET may instead carry the session
cookie of the web console mounted on the same app (``session_reads``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import inspect
import ipaddress
import json
import logging
import math
import os
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from ingest.pipeline import ENDED, StreamStatus
from ingest.spec import StreamSpec
from ingest.streams import Streams
from ingest.webrtc import OfferError, WebRTCSession, WebRTCSettings, check_offer
from protos.clip import check_stream_name
from vcflash.serve.errors import (
    AlreadyExists,
    Exhausted,
    FailedPrecondition,
    Invalid,
    NotFound,
    Unavailable,
    excerpt,
)
from vcflash.serve.settings import IngestSettings

logger = logging.getLogger(__name__)

SDP = "application/sdp"
JPEG = "image/jpeg"
MP4 = "video/mp4"
_REPLACE_WAIT_S = 2.0  # how long a new offer waits for the ended session's stream to finish
# The neutral errors as HTTP statuses (serve.rpc maps them to gRPC codes), most specific first; the console's too.
HTTP_STATUS: tuple[tuple[type[Exception], type[web.HTTPException]], ...] = (
    (Unavailable, web.HTTPServiceUnavailable),
    (NotFound, web.HTTPNotFound),
    (AlreadyExists, web.HTTPConflict),
    (FailedPrecondition, web.HTTPConflict),
    (Exhausted, web.HTTPServiceUnavailable),
    (Invalid, web.HTTPBadRequest),
)

OnAdd = Callable[[str, StreamStatus], Awaitable[None] | None]


class WhipServer:
    """The WHIP endpoints' state: sessions by stream, and the settings they are negotiated with.

    ``webrtc`` None means: decided by :func:`start_http` from the address it binds (loopback:
    :meth:`WebRTCSettings.loopback`), otherwise the defaults.
    """

    def __init__(
        self,
        streams: Streams,
        *,
        token: str | None,
        on_add: OnAdd | None,
        max_sdp_bytes: int,
        webrtc: WebRTCSettings | None,
        fps: float | None,
        cors_origin: str | None,
    ) -> None:
        if max_sdp_bytes < 1:
            raise ValueError(f"max_sdp_bytes must be >= 1, got {max_sdp_bytes}")
        if token is not None and not token:
            raise ValueError("token must be a non-empty string or None")
        self.streams = streams
        self.webrtc = webrtc
        self.fps = fps
        self._spec("default", fps)  # a bad default fails here, not at every POST
        self._token = None if token is None else token.encode()
        self.on_add = on_add
        self._max_sdp_bytes = max_sdp_bytes
        self._cors_origin = cors_origin
        self.sessions: dict[str, WebRTCSession] = {}
        self._negotiating: set[str] = set()  # names reserved while their offer is being answered
        self.body_timeout_s = 10.0  # how long an offer's body may take to arrive; start_http sets it
        # whether a request without the token is a signed-in web console's read (a GET needs no CSRF check);
        # set by the console mounted on this app, so its <img> tags and fetches reach thumbnails and recordings
        self.session_reads: Callable[[web.Request], bool] | None = None

    @property
    def settings(self) -> WebRTCSettings:
        return self.webrtc or WebRTCSettings()

    # ---------------------------------------------------------------- handlers

    async def post(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        return await self.offer(request, request.match_info["stream"])

    async def delete(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        return await self.stop(request.match_info["stream"])

    async def offer(self, request: web.Request, name: str) -> web.StreamResponse:
        """Publish stream `name` from the SDP offer in `request`'s body (the caller has authorized it): the answer,
        201. Shared by ``POST /whip/{stream}`` and the web console's publish (its session authorizes that)."""
        _check_name(name)
        spec = self._spec_of(name, request)
        if request.content_type != SDP:
            raise _error(
                web.HTTPUnsupportedMediaType, f"Content-Type must be {SDP}, got {excerpt(request.content_type)}"
            )
        offer = await self._read_offer(request)
        try:
            check_offer(offer, self.settings)  # before anything changes: a bad offer leaves no trace
        except OfferError as e:
            raise _error(web.HTTPBadRequest, str(e)) from None
        if name in self._negotiating:
            raise _error(web.HTTPConflict, f"stream {name!r} is being negotiated by another request")
        self._negotiating.add(name)
        try:
            return await self._publish(name, offer, spec)
        finally:
            self._negotiating.discard(name)

    async def stop(self, name: str) -> web.StreamResponse:
        """End WHIP stream `name` and its session (the caller has authorized it); 404 if no session has that name."""
        session = self.sessions.pop(name, None)
        if session is None:
            raise _error(web.HTTPNotFound, f"no WHIP stream named {excerpt(name)}")
        status = await self.streams.remove(name) if name in self.streams.manager.names() else None
        await session.close()
        logger.info("whip stream deleted stream=%s", name)
        return web.json_response(_describe(status, session), dumps=_dumps)

    async def get(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["stream"]
        self._authorize(request)
        session = self.sessions.get(name)
        if session is None:
            raise _error(web.HTTPNotFound, f"no WHIP stream named {excerpt(name)}")
        status = self.streams.manager.status().get(name)
        return web.json_response(_describe(status, session), dumps=_dumps)

    async def thumbnail(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/streams/{stream}/thumbnails/{seq}.jpg``: a stored clip's JPEG thumbnail, from the memory."""
        name, seq = request.match_info["stream"], int(request.match_info["seq"])
        self._authorize(request)
        _check_name(name)
        if seq >= 1 << 63:
            raise _error(web.HTTPNotFound, f"stream {name!r} holds no clip {seq}")
        try:
            jpegs = await asyncio.to_thread(self.streams.store.thumbnails, name, [seq])
        except (Unavailable, NotFound) as e:  # Redis down: 503; a stream memory does not hold: 404
            raise _http_error(e, name) from None
        if seq not in jpegs:
            raise _error(web.HTTPNotFound, f"stream {name!r} holds no thumbnail of clip {seq}")
        # a clip's thumbnail never changes while it is held; a client holding the token may keep it
        return web.Response(body=jpegs[seq], content_type=JPEG, headers={"Cache-Control": "private, max-age=86400"})

    async def recording(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/streams/{stream}/recording.mp4?start=T&end=T``: the recorded moment as an MP4 cut by remux;
        ``X-Recording-Start``/``-End`` give the wall-clock times of its first and last frame."""
        name = request.match_info["stream"]
        self._authorize(request)
        _check_name(name)
        recordings = self.streams.recordings
        if recordings is None:
            raise _error(web.HTTPNotFound, "this server keeps no recordings")
        start, end = (_when(request.query.get(key), key) for key in ("start", "end"))
        fd, path = tempfile.mkstemp(prefix="vcflash-cut-", suffix=".mp4")
        os.close(fd)
        try:
            first, last = await asyncio.to_thread(recordings.cut, name, start, end, Path(path))
            file = open(path, "rb")  # noqa: SIM115 - read below, after the name is gone
        except (Invalid, NotFound) as e:
            raise _http_error(e, name) from None
        finally:
            os.unlink(path)
        with file:
            size = os.fstat(file.fileno()).st_size
            headers = {"X-Recording-Start": f"{first:.3f}", "X-Recording-End": f"{last:.3f}"}
            response = web.StreamResponse(headers=headers | {"Cache-Control": "private, no-store"})
            response.content_type, response.content_length = MP4, size
            await response.prepare(request)
            while chunk := await asyncio.to_thread(file.read, 1 << 18):
                await response.write(chunk)
            await response.write_eof()
        return response

    async def options(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=204, headers={"Accept-Post": SDP})

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok\n")

    @web.middleware
    async def cors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        """CORS headers on every answer, errors included, so a page on another origin can publish."""
        try:
            response = await handler(request)
        except web.HTTPException as e:
            self._add_cors(e.headers)
            raise
        self._add_cors(response.headers)
        return response

    async def close(self, app: web.Application | None = None) -> None:
        """Close every session (their streams then end); on the app's shutdown."""
        await asyncio.gather(*(session.close() for session in self.sessions.values()))

    # ---------------------------------------------------------------- helpers

    async def _publish(self, name: str, offer: str, spec: StreamSpec) -> web.StreamResponse:
        manager = self.streams.manager
        previous = self.sessions.get(name)
        if previous is not None and previous.closed and name in manager.names():
            with contextlib.suppress(TimeoutError):  # its stream is ending: let it finish, not 409
                await asyncio.wait_for(manager.wait(name), _REPLACE_WAIT_S)
        # The same sender publishing again after its session ended (OBS reconnecting) replaces the ended
        # stream, carrying on its clip numbering and its media clock; any other stream holds its name.
        if name in manager.names() and (previous is None or manager.worker(name).status().state not in ENDED):
            raise _error(web.HTTPConflict, f"stream {name!r} already exists")
        if previous is not None:
            self.sessions.pop(name, None)
            await previous.close()

        session = WebRTCSession(name, self.settings)
        try:
            answer = await session.accept(offer)
        except OfferError as e:
            raise _error(web.HTTPBadRequest, str(e)) from None
        except TimeoutError:
            raise _error(web.HTTPServiceUnavailable, "negotiating the WebRTC session timed out") from None

        try:  # e.g. added by someone else (gRPC) while we negotiated, or the server is full
            status = await self.streams.add(name, spec, source=session.frames, replace=previous is not None)
        except Exception as e:
            await session.close()
            raise _http_error(e, name) from None
        except BaseException:
            await session.close()
            raise
        self.sessions[name] = session
        if self.on_add is not None:
            try:
                result = self.on_add(name, status)
                if inspect.isawaitable(result):
                    await result
            except BaseException as e:
                self.sessions.pop(name, None)
                await self.streams.remove(name)
                await session.close()
                if isinstance(e, web.HTTPException | asyncio.CancelledError):
                    raise
                logger.exception("whip on_add failed stream=%s", name)
                raise _error(web.HTTPInternalServerError, f"setting up stream {name!r} failed") from None
        logger.info("whip stream published stream=%s fps=%g first_seq=%d", name, status.fps, status.next_seq)
        return web.Response(status=201, body=answer.encode(), content_type=SDP, headers={"Location": f"/whip/{name}"})

    def _authorize(self, request: web.Request) -> None:
        if self._token is None:
            return
        if "Authorization" not in request.headers and self.session_reads is not None and self.session_reads(request):
            return
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise _error(web.HTTPUnauthorized, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(credentials.strip().encode(), self._token):
            raise _error(
                web.HTTPUnauthorized,
                "invalid bearer token",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )

    def _spec_of(self, name: str, request: web.Request) -> StreamSpec:
        """The stream a POST asks for, checked before anything is negotiated; ``?fps=`` sets its rate, ``?record=1``
        keeps its sampled frames as a recording."""
        value = request.query.get("fps")
        record = request.query.get("record", "0")
        if record not in ("0", "1", "true", "false"):
            raise _error(web.HTTPBadRequest, f"record must be 0 or 1, got {excerpt(record)}")
        try:
            return self._spec(name, self.fps if value is None else float(value), record in ("1", "true"))
        except ValueError as e:
            raise _error(web.HTTPBadRequest, f"bad fps: {e}") from None

    def _spec(self, name: str, fps: float | None, record: bool = False) -> StreamSpec:
        # Never resumed by the server: the sender reconnects by itself.
        spec = StreamSpec(f"whip://{name}", fps=fps, realtime=False, resume=False, record=record)
        self.streams.manager.admit(spec, hooked=True)
        return spec

    async def _read_offer(self, request: web.Request) -> str:
        limit = self._max_sdp_bytes
        too_large = f"the SDP offer is larger than {limit} bytes"
        if request.content_length is not None and request.content_length > limit:
            raise _error(web.HTTPRequestEntityTooLarge, too_large, max_size=limit, actual_size=request.content_length)
        body = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout_s):
                async for chunk in request.content.iter_chunked(16 * 1024):
                    body += chunk
                    if len(body) > limit:
                        raise _error(web.HTTPRequestEntityTooLarge, too_large, max_size=limit, actual_size=len(body))
        except TimeoutError:
            raise _error(
                web.HTTPRequestTimeout, f"the SDP offer did not arrive within {self.body_timeout_s:g} s"
            ) from None
        try:
            offer = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _error(web.HTTPBadRequest, "the SDP offer is not UTF-8 text") from None
        if not offer.strip():
            raise _error(web.HTTPBadRequest, "empty body: expected an SDP offer")
        return offer

    def _add_cors(self, headers: Any) -> None:
        if self._cors_origin is None:
            return
        headers["Access-Control-Allow-Origin"] = self._cors_origin
        headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
        headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        headers["Access-Control-Expose-Headers"] = "Location, Accept-Post"
        headers["Access-Control-Max-Age"] = "600"
        if self._cors_origin != "*":
            headers["Vary"] = "Origin"


WHIP = web.AppKey("whip", WhipServer)


def create_whip_app(
    streams: Streams,
    *,
    token: str | None,
    on_add: OnAdd | None = None,
    max_sdp_bytes: int = IngestSettings.max_sdp_bytes,
    webrtc: WebRTCSettings | None = None,
    fps: float | None = None,
    cors_origin: str | None = "*",
) -> web.Application:
    """The WHIP endpoints adding streams to ``streams``; run them on its event loop.

    ``token``: the bearer token senders must present (None: no authentication). ``on_add(name,
    status)``, plain or async, runs after a stream is published; if it raises, the stream is
    removed and the sender gets 500 (or the ``aiohttp.web.HTTPException`` it raised, e.g. 503).
    ``max_sdp_bytes``: the largest offer (VCFLASH_MAX_SDP_BYTES).
    ``webrtc``: candidate and buffer settings (None: see :class:`WhipServer`). ``fps``: the
    sampling rate of published streams (None: the server's default; ``?fps=`` on the POST URL
    overrides both). ``cors_origin``: the ``Access-Control-Allow-Origin`` value, None for no CORS.
    The :class:`WhipServer` is ``app[WHIP]``.
    """
    whip = WhipServer(
        streams,
        token=token,
        on_add=on_add,
        max_sdp_bytes=max_sdp_bytes,
        webrtc=webrtc,
        fps=fps,
        cors_origin=cors_origin,
    )
    app = web.Application(middlewares=[whip.cors])
    app[WHIP] = whip
    app.router.add_post("/whip/{stream}", whip.post)
    app.router.add_delete("/whip/{stream}", whip.delete)
    app.router.add_get("/whip/{stream}", whip.get, allow_head=False)
    app.router.add_route("OPTIONS", "/whip/{stream}", whip.options)
    app.router.add_get("/healthz", whip.healthz)
    app.router.add_get(r"/v1/streams/{stream}/thumbnails/{seq:\d{1,20}}.jpg", whip.thumbnail, allow_head=False)
    app.router.add_get("/v1/streams/{stream}/recording.mp4", whip.recording, allow_head=False)
    app.on_shutdown.append(whip.close)
    return app


async def start_http(
    app: web.Application,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    *,
    timeout_s: float = 10.0,
    max_connections: int = 256,
) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` (0: any free port), over HTTPS with ``ssl_context``; returns the runner
    (``await runner.cleanup()``) and the port.

    A WHIP app left to choose its WebRTC settings keeps candidates on 127.0.0.1 when ``host`` is a
    loopback address, so a server bound to loopback never negotiates media elsewhere.

    Limits (VCFLASH_HTTP_TIMEOUT_S, VCFLASH_HTTP_MAX_CONNECTIONS): a connection whose next request head has
    not fully arrived ``timeout_s`` after it connected or after its previous response is closed (idle keep-alive
    and slow headers alike), a WHIP offer's body must arrive within ``timeout_s`` (else 408), and at most
    ``max_connections`` are open at once: one more is closed as soon as it is accepted.
    """
    if timeout_s <= 0 or max_connections < 1:
        raise ValueError(f"timeout_s must be > 0 and max_connections >= 1, got {timeout_s}, {max_connections}")
    whip = app.get(WHIP)
    if whip is not None and whip.webrtc is None:
        whip.webrtc = WebRTCSettings.loopback() if _is_loopback(host) else WebRTCSettings()
    if whip is not None:
        whip.body_timeout_s = timeout_s
    # aiohttp arms keepalive_timeout when a connection opens and after each response, and closes the connection
    # if no complete request head has arrived by then: the header timeout. Lingering (reading an unread body
    # before closing) is bounded the same way. Access lines leave out query strings (a client may put a token
    # there) and a request the HTTP parser refuses is one line, not a traceback anyone can repeat.
    runner = _CappedRunner(
        app,
        max_connections,
        keepalive_timeout=timeout_s,
        lingering_time=timeout_s,
        access_log_class=_AccessLog,
        logger=_ServerLog(logging.getLogger("aiohttp.server"), {}),
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]


class _CappedRunner(web.AppRunner):
    """An AppRunner whose sites accept at most ``max_connections`` open connections (its ``server``, the protocol
    factory the sites listen with, counts them); one over the cap is closed at once and logged."""

    def __init__(self, app: web.Application, max_connections: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.max_connections = max_connections
        self.open = 0
        self.refused = 0

    @property
    def server(self) -> Any:
        real = super().server
        return None if real is None else functools.partial(self._protocol, real)

    def _protocol(self, real: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
        if self.open >= self.max_connections:
            self.refused += 1
            if self.refused == 1 or self.refused % 100 == 0:
                logger.warning("http connection refused: %d open, the limit (refused=%d)", self.open, self.refused)
            return _Refused()
        self.open += 1
        return _Counted(real(), self)


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted out of the runner's open connections when it closes."""

    def __init__(self, inner: asyncio.Protocol, runner: _CappedRunner) -> None:
        self._inner, self._runner, self._open = inner, runner, True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._open:
            self._open = False
            self._runner.open -= 1
        self._inner.connection_lost(exc)


class _AccessLog(AbstractAccessLogger):
    """One line per request: method, path without its query, status, size and time."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %d %d %.3fs",
            request.remote,
            request.method,
            excerpt(request.path),
            response.status,
            response.body_length,
            time,
        )


class _ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger, where a request its parser refused (a client's fault: answered 400) is one line
    without a traceback; a failing handler keeps its traceback."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if not self._refused(logging.INFO, exc_info):
            self.error(msg, *args, exc_info=exc_info, **kwargs)

    def debug(self, msg: object, *args: object, exc_info: Any = None, **kwargs: Any) -> None:
        if not self._refused(logging.DEBUG, exc_info):
            super().debug(msg, *args, exc_info=exc_info, **kwargs)

    def _refused(self, level: int, exc: object) -> bool:
        if isinstance(exc, HttpProcessingError):
            self.log(level, "http request refused: %s", excerpt(str(exc.message)))
            return True
        return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_name(name: str) -> None:
    try:
        check_stream_name(name)
    except ValueError as e:
        raise _error(web.HTTPBadRequest, str(e)) from None


def _when(value: str | None, name: str) -> float:
    """A query's wall-clock time: Unix seconds, or an ISO date-time (naive: UTC)."""
    if value is None:
        raise _error(web.HTTPBadRequest, f"missing ?{name}= (Unix seconds or an ISO date-time)")
    try:
        t = float(value)
    except ValueError:
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise _error(web.HTTPBadRequest, f"{name} is neither Unix seconds nor an ISO date-time") from None
        t = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(t):
        raise _error(web.HTTPBadRequest, f"{name} must be finite, got {excerpt(value)}")
    return t


def _error(kind: type[web.HTTPException], message: str, **kwargs: Any) -> web.HTTPException:
    return kind(text=message + "\n", **kwargs)


def _http_error(e: Exception, name: str) -> web.HTTPException:
    """A neutral error as its HTTP status; anything else is a bug (500, logged, no detail for the sender)."""
    for kind, status in HTTP_STATUS:
        if isinstance(e, kind):
            return _error(status, str(e))
    logger.error("whip stream setup failed stream=%s", name, exc_info=e)
    return _error(web.HTTPInternalServerError, f"setting up stream {name!r} failed")


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)  # enums, and whatever a later status field holds


def _describe(status: StreamStatus | None, session: WebRTCSession) -> dict[str, Any]:
    stats = dataclasses.asdict(session.stats())
    return {
        "stream": None if status is None else dataclasses.asdict(status),
        "session": stats,
    }
