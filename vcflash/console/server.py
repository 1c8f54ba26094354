"""The web console's pages and JSON API, on the HTTP server that serves WHIP, thumbnails and recordings.

Pages: ``/console/`` (the single-page app: cameras, timeline, chat, search), ``/console/signin`` (a form that POSTs the
API token; the answer sets the session cookie; failed sign-ins are limited per client address),
``/console/static/*`` (the app's ES modules and CSS, read from this package). JSON API (cookie or bearer token;
see :mod:`vcflash.console.sessions`):

- ``GET /v1/console/session``: the session's CSRF token.
- ``GET /v1/console/streams``: the running streams (redacted URLs, counters, last stored clip) and the names
  memory holds; ``POST`` adds one (``{name, url, fps?, record?, realtime?}``), ``DELETE .../{name}`` removes it.
- ``POST /v1/console/whip/{name}[?record=1]``: publish the browser's camera: an SDP offer in, the answer out, as
  ``POST /whip/{name}`` (the same WHIP session logic, names, limits and SDP checks); ``DELETE`` ends it.
- ``GET /v1/console/streams/{name}/clips?start=T&end=T&limit=N``: the stored clips overlapping a wall-clock range.
- ``POST /v1/console/ask``: ``{streams, question, start?, end?}``, answered as NDJSON lines (``{"text": ...}``
  while the answer is generated, then ``{"result": ...}`` with the evidence, or ``{"error": ...}``); 503 with a JSON
  error while the reasoner cannot be reached.
- ``POST /v1/console/search``: ``{streams, question, start?, end?, limit?}``, answered with the ranked moments
  (``{"moments": [{stream_id, first_seq, last_seq, wall_start, wall_end, media_start, media_end, score}],
  "clips_scored", "note"}``, best first); the same 4xx as an Ask, 503 while the reasoner cannot be reached.
- ``GET /v1/console/health``: whether the reasoner answers (``{"reasoner": {"available", "error"}}``).

Handlers only translate: streams come and go through the same registry (`ingest.streams.Streams`) as
Ingest.AddStream, a browser publishes through the app's `WhipServer`, and questions go to an `Answers`
(`vcflash.console.answers`): the in-process `Reasoner` in `vcflash up`, the reasoner service over gRPC in the split
deployment's ingest (`vcflash.console.split`). Thumbnails and recordings are the existing ``/v1/streams/...`` GETs,
which accept a console session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from importlib import resources
from typing import Any

from aiohttp import web

from ingest.http import HTTP_STATUS, WHIP, WhipServer
from ingest.pipeline import StreamStatus
from ingest.spec import StreamSpec
from ingest.streams import Streams
from memory.records import ClipMeta
from memory.store import UnknownStream
from protos.clip import check_stream_name
from vcflash.console.answers import Answer, Answers, Question, Search
from vcflash.console.sessions import Sessions, SignInLimit, error
from vcflash.serve.errors import (
    Unavailable,
    excerpt,
)
from vcflash.serve.settings import ServerSettings

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # a JSON request: a question is at most a few thousand characters
MAX_TIMELINE_CLIPS = 1000  # clips in one timeline answer; the page zooms in for more
DEFAULT_TIMELINE_CLIPS = 240
MAX_MOMENTS = 100  # a search's limit: SearchRequest.limit's range, as the proto states it
DEFAULT_MOMENTS = 10
# Pages run only the project's own files: no inline script or style, nothing from elsewhere. Recordings play from a
# blob: URL, fetched first so the page can read where the cut starts (X-Recording-Start).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self' blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
ASSETS = {  # the only files /console/static serves, and their types
    "main.js": "text/javascript",
    "api.js": "text/javascript",
    "cameras.js": "text/javascript",
    "timeline.js": "text/javascript",
    "chat.js": "text/javascript",
    "search.js": "text/javascript",
    "question.js": "text/javascript",
    "publish.js": "text/javascript",
    "console.css": "text/css",
}


class Console:
    """The console's handlers over the server's stream registry, and the answers of a reasoner (in this process, or
    the reasoner service)."""

    def __init__(self, streams: Streams, answers: Answers, sessions: Sessions, whip: WhipServer) -> None:
        self.streams, self.answers, self.sessions, self.whip = streams, answers, sessions, whip
        self.signins = SignInLimit()
        static = resources.files("vcflash.console") / "static"
        self.assets = {name: (static / name).read_bytes() for name in ASSETS}
        self.index = (static / "index.html").read_text()
        self.signin_page = (static / "signin.html").read_text()

    # ---------------------------------------------------------------- pages

    async def home(self, request: web.Request) -> web.StreamResponse:
        if self.sessions.session(request) is None:
            raise web.HTTPSeeOther("/console/signin")
        return _page(self.index)

    async def to_home(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/console/")

    async def signin_form(self, request: web.Request) -> web.StreamResponse:
        return _page(self.signin_page.replace("{{error}}", ""))

    async def signin(self, request: web.Request) -> web.StreamResponse:
        """The sign-in form's POST: the token in the body (never a URL), a session cookie in the answer; 429 once
        the client's address has failed too often (not even the right token is checked then)."""
        wait = self.signins.retry_after(request.remote)
        if wait:
            log.warning("event=console_signin_limited remote=%s retry_after=%d", request.remote, wait)
            message = f'<p class="error" role="alert">Too many failed sign-ins: try again in {wait} s.</p>'
            response = _page(self.signin_page.replace("{{error}}", message), status=429)
            response.headers["Retry-After"] = str(wait)
            return response
        _check_length(request, 4096)
        form = await request.post()
        token = form.get("token")
        if not isinstance(token, str) or not self.sessions.check_token(token):
            self.signins.failed(request.remote)
            log.warning("event=console_signin_refused remote=%s", request.remote)
            message = '<p class="error" role="alert">That is not this server\'s API token.</p>'
            return _page(self.signin_page.replace("{{error}}", message), status=401)
        response = web.Response(status=303, headers={"Location": "/console/", "Cache-Control": "no-store"})
        self.sessions.sign_in(response)
        log.info("event=console_signin remote=%s", request.remote)
        return response

    async def signout(self, request: web.Request) -> web.StreamResponse:
        self.sessions.authorize(request)  # a POST: a cookie needs the CSRF header, so no page can sign us out
        response = web.json_response({})
        self.sessions.sign_out(request, response)
        return response

    async def asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in self.assets:
            raise error(web.HTTPNotFound, "no such file")
        return web.Response(body=self.assets[name], content_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    # ---------------------------------------------------------------- API

    async def session(self, request: web.Request) -> web.StreamResponse:
        self.sessions.authorize(request)
        session = self.sessions.session(request)
        return web.json_response({"csrf": session.csrf if session else None})

    async def health(self, request: web.Request) -> web.StreamResponse:
        """Whether questions can be asked now: the reasoner answers (null: not checked yet), else why not."""
        self.sessions.authorize(request)
        state = self.answers.state()
        return web.json_response({"reasoner": {"available": state.available, "error": state.error}})

    async def list_streams(self, request: web.Request) -> web.StreamResponse:
        self.sessions.authorize(request)
        statuses = list(self.streams.manager.status().values())
        memory_error = ""
        try:
            stored, last = await asyncio.to_thread(self._memory_view, [s.name for s in statuses])
        except Unavailable as e:  # the cameras still show; the memory's state beside them
            stored, last, memory_error = [], {}, str(e)
        return web.json_response(
            {
                "streams": [self._stream(s, last.get(s.name)) for s in statuses],
                "stored": stored,
                "memory_error": memory_error,
            }
        )

    async def add_stream(self, request: web.Request) -> web.StreamResponse:
        self.sessions.authorize(request)
        body = await _json_body(request, {"name", "url", "fps", "record", "realtime"})
        name = _string(body, "name", 64)
        _check(check_stream_name, name)
        url = _string(body, "url", self.streams.manager.settings.max_source_chars)
        fps = _number(body.get("fps"), "fps")
        record, realtime = _bool(body, "record", False), _bool(body, "realtime", True)
        try:  # the same checks as AddStream: the source-URL policy, the media root, the limits
            spec = StreamSpec(url, fps=fps, record=record, realtime=realtime)
            status = await self.streams.add(name, spec)
        except Exception as e:
            raise _http_error(e) from None
        log.info("event=console_stream_added stream=%s", name)
        return web.json_response(self._stream(status, None), status=201)

    async def remove_stream(self, request: web.Request) -> web.StreamResponse:
        self.sessions.authorize(request)
        name = request.match_info["name"]
        _check(check_stream_name, name)
        if name not in self.streams.manager.names():
            raise error(web.HTTPNotFound, f"no stream named {name!r} runs here")
        try:
            if name in self.whip.sessions:  # published over WHIP: its WebRTC session ends too
                await self.whip.stop(name)
            else:
                await self.streams.remove(name)  # its memory stays, for the timeline and questions
        except Exception as e:
            raise _http_error(e) from None
        log.info("event=console_stream_removed stream=%s", name)
        return web.json_response({})

    async def publish(self, request: web.Request) -> web.StreamResponse:
        """The browser's camera as stream `name`: its SDP offer (``application/sdp``), answered by the WHIP endpoint's
        own logic; the session and its CSRF header stand in for the bearer token."""
        self.sessions.authorize(request)
        name = request.match_info["name"]
        response = await _json_errors(self.whip.offer(request, name))
        response.headers["Location"] = f"/v1/console/whip/{name}"
        log.info("event=console_whip_published stream=%s", name)
        return response

    async def unpublish(self, request: web.Request) -> web.StreamResponse:
        self.sessions.authorize(request)
        name = request.match_info["name"]
        _check(check_stream_name, name)
        response = await _json_errors(self.whip.stop(name))
        log.info("event=console_whip_stopped stream=%s", name)
        return response

    async def clips(self, request: web.Request) -> web.StreamResponse:
        self.sessions.authorize(request)
        name = request.match_info["name"]
        _check(check_stream_name, name)
        start, end = (_number(request.query.get(key), key) for key in ("start", "end"))
        if start is not None and end is not None and start >= end:
            raise error(web.HTTPBadRequest, f"inverted time range: start {start} >= end {end}")
        limit = _number(request.query.get("limit"), "limit")
        n = DEFAULT_TIMELINE_CLIPS if limit is None else int(limit)
        if (limit is not None and n != limit) or not 1 <= n <= MAX_TIMELINE_CLIPS:
            raise error(web.HTTPBadRequest, f"limit must be an integer in [1, {MAX_TIMELINE_CLIPS}], got {limit}")
        try:
            stats = await asyncio.to_thread(self.streams.store.stats, name)
            clips = await asyncio.to_thread(self.streams.store.clips, name, start, end, clock="wall", limit=n + 1)
        except Exception as e:
            raise _http_error(e) from None
        recordings = self.streams.recordings
        return web.json_response(
            {
                "clips": [_clip(c) for c in clips[:n]],
                "truncated": len(clips) > n,
                "first": _clip(stats.first) if stats.first else None,
                "last": _clip(stats.last) if stats.last else None,
                "recorded": recordings is not None and recordings.nbytes(name) > 0,
            }
        )

    async def ask(self, request: web.Request) -> web.StreamResponse:
        """The answer as it is generated, one JSON object a line; errors before the first line are 4xx, or 503 while
        the reasoner cannot be reached."""
        self.sessions.authorize(request)
        body = await _json_body(request, {"streams", "question", "start", "end"})
        question = Question(
            streams=_names(body),
            question=_string(body, "question", self.answers.max_question_chars),
            start=_number(body.get("start"), "start"),
            end=_number(body.get("end"), "end"),
        )
        events = self.answers.ask(question)
        try:
            first = await anext(events)  # validation, unknown streams, a reasoner away: here, before any answer
        except Exception as e:
            await events.aclose()
            if isinstance(e, Unavailable):
                log.warning("event=console_ask_unavailable error=%s", e)
            raise _http_error(e) from None
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"})
        _secure(response.headers)
        await response.prepare(request)
        try:
            item = first
            while True:
                await response.write(_line(item))
                item = await anext(events)
        except StopAsyncIteration:
            pass
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as e:  # after the first line the status is sent: the error goes in the stream
            log.exception("event=console_ask_failed")
            await response.write(json.dumps({"error": _message(e)}).encode() + b"\n")
        finally:
            await events.aclose()
        await response.write_eof()
        return response

    async def search(self, request: web.Request) -> web.StreamResponse:
        """The ranked moments of the streams' range for the question, best first; the question's checks and errors
        are an Ask's (4xx), 503 while the reasoner cannot be reached."""
        self.sessions.authorize(request)
        body = await _json_body(request, {"streams", "question", "start", "end", "limit"})
        limit = body.get("limit", DEFAULT_MOMENTS)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_MOMENTS:
            raise error(web.HTTPBadRequest, f"limit must be an integer in [1, {MAX_MOMENTS}], got {excerpt(limit)}")
        search = Search(
            streams=_names(body),
            question=_string(body, "question", self.answers.max_question_chars),
            start=_number(body.get("start"), "start"),
            end=_number(body.get("end"), "end"),
            limit=limit,
        )
        try:
            found = await self.answers.search(search)
        except Exception as e:
            if isinstance(e, Unavailable):
                log.warning("event=console_search_unavailable error=%s", e)
            raise _http_error(e) from None
        moments = [asdict(m) for m in found.moments]
        return web.json_response({"moments": moments, "clips_scored": found.clips_scored, "note": found.note})

    # ---------------------------------------------------------------- helpers

    def _memory_view(self, names: list[str]) -> tuple[list[str], dict[str, ClipMeta]]:
        """The streams memory holds, and each running stream's last stored clip. Blocking."""
        last = {}
        for name in names:
            with contextlib.suppress(UnknownStream):
                clip = self.streams.store.stats(name).last
                if clip is not None:
                    last[name] = clip
        return self.streams.store.streams(), last

    def _stream(self, s: StreamStatus, last: ClipMeta | None) -> dict[str, Any]:
        """A running stream as the cameras page shows it; `url` and `error` are redacted by the pipeline."""
        worker = self.streams.manager.worker(s.name)
        recordings = self.streams.recordings
        return {
            "name": s.name,
            "url": s.url,
            "state": s.state.value,
            "error": s.error or "",
            "fps": s.fps,
            "frames_in": s.frames_in,
            "frames_sampled": s.frames_sampled,
            "frames_dropped": sum(s.frames_dropped.values()),
            "dropped": s.frames_dropped,
            "clips_emitted": s.clips_emitted,
            "clips_stored": self.streams.stored[s.name],
            "reconnects": s.reconnects,
            "last_wall_time": s.last_wall_time,
            "record": worker.spec.record,
            "recording_bytes": recordings.nbytes(s.name) if recordings is not None else 0,
            "last_clip": _clip(last) if last else None,
        }


def _line(item: str | Answer) -> bytes:
    if isinstance(item, str):
        return json.dumps({"text": item}).encode() + b"\n"
    result = {
        "answer": item.answer,
        "evidence": [_clip(e.clip) | {"retrieved": e.retrieved, "score": e.score} for e in item.evidence],
        "frames": item.frames,
        "duration_s": item.duration_s,
        "note": item.note,
    }
    return json.dumps({"result": result}).encode() + b"\n"


def _clip(c: ClipMeta) -> dict[str, Any]:
    d = asdict(c)
    del d["frame_media_times"]
    return d


def _page(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", headers={"Cache-Control": "no-store"})


async def _json_body(request: web.Request, keys: set[str]) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise error(web.HTTPUnsupportedMediaType, "send Content-Type: application/json")
    _check_length(request, MAX_BODY_BYTES)
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise error(web.HTTPBadRequest, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise error(web.HTTPBadRequest, "the body must be a JSON object")
    unknown = set(body) - keys
    if unknown:
        raise error(web.HTTPBadRequest, f"unknown fields: {excerpt(', '.join(sorted(unknown)), 120)}")
    return body


def _check_length(request: web.Request, limit: int) -> None:
    """Bodies are read whole: their length must be given, and small."""
    size = request.content_length
    if size is None:
        raise error(web.HTTPLengthRequired, "send Content-Length")
    if size > limit:
        raise error(
            web.HTTPRequestEntityTooLarge, f"the body is larger than {limit} bytes", max_size=limit, actual_size=size
        )


def _string(body: dict[str, Any], key: str, max_chars: int) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise error(web.HTTPBadRequest, f"{key} must be a non-empty string")
    if len(value) > max_chars:
        raise error(web.HTTPBadRequest, f"{key} is longer than {max_chars} characters")
    return value


def _names(body: dict[str, Any]) -> list[str]:
    """The body's `streams`: valid stream names (whether they exist is the reasoner's to say: 404)."""
    names = body.get("streams")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise error(web.HTTPBadRequest, "streams must be a list of stream names")
    for name in names:
        _check(check_stream_name, name)
    return names


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise error(web.HTTPBadRequest, f"{key} must be true or false")
    return value


def _number(value: Any, key: str) -> float | None:
    """A finite number, from JSON or a query string; None when absent."""
    if value is None or value == "":
        return None
    try:
        number = float(value) if isinstance(value, str | int | float) and not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise error(web.HTTPBadRequest, f"{key} must be a finite number")
    return number


def _check(check: Callable[[str], None], value: str) -> None:
    try:
        check(value)
    except ValueError as e:
        raise error(web.HTTPBadRequest, str(e)) from None


def _message(e: Exception) -> str:
    return str(e) if any(isinstance(e, kind) for kind, _ in HTTP_STATUS) else "internal error (see the server log)"


def _as_json(e: web.HTTPException) -> web.HTTPException:
    """A WHIP error (plain text) as the console's ``{"error": message}``."""
    if e.content_type == "text/plain" and e.text is not None:
        message = e.text.strip()
        e.content_type = "application/json"
        e.text = json.dumps({"error": message})
    return e


async def _json_errors(call: Awaitable[web.StreamResponse]) -> web.StreamResponse:
    """A WHIP handler's answer, its plain-text HTTP errors turned into the console's JSON ones."""
    try:
        return await call
    except web.HTTPException as e:
        raise _as_json(e) from None


def _http_error(e: Exception) -> web.HTTPException:
    """A neutral error as its HTTP status; anything else is a bug: 500, logged, no detail for the browser."""
    if isinstance(e, web.HTTPException):
        return e
    for kind, status in HTTP_STATUS:
        if isinstance(e, kind):
            return error(status, str(e))
    log.error("event=console_request_failed", exc_info=e)
    return error(web.HTTPInternalServerError, _message(e))


@web.middleware
async def security_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A strict CSP and no sniffing, framing or referrers on every console answer, errors included."""
    console = request.path.startswith(("/console", "/v1/console"))
    try:
        response = await handler(request)
    except web.HTTPException as e:
        if console:
            _secure(e.headers)
        raise
    if console and not response.prepared:
        _secure(response.headers)
    return response


def _secure(headers: Any) -> None:
    headers["Content-Security-Policy"] = CSP
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    headers["Referrer-Policy"] = "no-referrer"
    headers.setdefault("Cache-Control", "no-store")


def add_console(app: web.Application, streams: Streams, answers: Answers, server: ServerSettings) -> Console:
    """Mount the console on `app` (the WHIP app, before it starts), signing in with the server's API token, its chat
    asking `answers`; a session may then also GET the app's thumbnails and recordings."""
    sessions = Sessions(server.api_token or "", server.console_session_s, secure=server.tls_cert is not None)
    console = Console(streams, answers, sessions, app[WHIP])
    app[WHIP].session_reads = sessions.reads
    app.middlewares.append(security_headers)
    r = app.router
    r.add_get("/console", console.to_home)
    r.add_get("/console/", console.home)
    r.add_get("/console/signin", console.signin_form)
    r.add_post("/console/signin", console.signin)
    r.add_post("/console/signout", console.signout)
    r.add_get("/console/static/{name}", console.asset)
    r.add_get("/v1/console/session", console.session)
    r.add_get("/v1/console/health", console.health)
    r.add_get("/v1/console/streams", console.list_streams)
    r.add_post("/v1/console/streams", console.add_stream)
    r.add_delete("/v1/console/streams/{name}", console.remove_stream)
    r.add_get("/v1/console/streams/{name}/clips", console.clips)
    r.add_post("/v1/console/whip/{name}", console.publish)
    r.add_delete("/v1/console/whip/{name}", console.unpublish)
    r.add_post("/v1/console/ask", console.ask)
    r.add_post("/v1/console/search", console.search)
    return console
