"""The OpenAI-compatible chat API over the cameras' memory: ``GET /v1/models`` and ``POST /v1/chat/completions`` on the
HTTP port of `vcflash up` and, in the split deployment, of `vcflash ingest` (wherever the web console is).

A chat completion is one Reasoner.Ask: the request becomes a `vcflash.console.answers.Question` asked of the same
`Answers` the console's chat uses (the in-process reasoner, or the reasoner service over gRPC), so the prompt, the
clip selection, the limits and the errors are gRPC Ask's. What is asked about:

- a ``video_url`` content part ``vcflash://CAMERA?from=T&to=T`` (one part per camera, one range for all; T: an ISO
  date-time, no zone meaning UTC, or Unix seconds, on the wall clock; ``clock=media`` reads numbers as media
  seconds, as `ask-live` does without ``--wall``), in the latest user message that has any;
- or ``"vcflash": {"streams": [...], "from": T, "to": T, "clock": "wall"|"media", "max_frames": N,
  "retrieval": bool}`` in the body (the ``openai`` client's ``extra_body``); ``max_frames`` and ``retrieval`` apply
  to the parts too;
- or the model ``vcflash/CAMERA`` (``/v1/models`` lists one per stream memory holds), for clients that can only
  pick a model;
- or a ``video_url`` part ``file:///PATH`` (a path under the server's media root, as `streams add` reads files):
  answered offline by `vcflash up`'s model, as `vcflash ask` does; refused by the split deployment's ingest (no
  model) and by a server without a media root.

Earlier user/assistant messages become the Ask's history; system and developer messages are accepted and not used
(the prompt is the model's own). The answer's evidence is the extra field ``vcflash`` of the completion (and of the
last chunk when streaming): ``{"moments": [{stream, seq, start, end, wall_start, wall_end, media_start, media_end,
retrieved, score, thumbnail}], "frames", "duration_s", "note"}``. Errors are ``{"error": {"message", "type",
"param", "code"}}`` with the status gRPC's code maps to (ingest.http.HTTP_STATUS), 401 without the API token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from ingest.http import HTTP_STATUS
from ingest.source import check_source
from memory.records import ClipMeta
from memory.store import MemoryStore
from protos.clip import check_stream_name
from vcflash.console.answers import Answer, Answers, Question
from vcflash.serve.errors import Invalid, NotFound, Unavailable, excerpt
from vcflash.serve.settings import Settings

log = logging.getLogger(__name__)

MODEL = "vcflash"
MAX_BODY_BYTES = 1 << 20  # a question and its history are at most some 40,000 characters
MAX_STOP = 4  # stop sequences, as OpenAI
MAX_STOP_CHARS = 64
MAX_PARTS = 64  # content parts in one message
SCHEME = "vcflash"
# Fields of the OpenAI request this server accepts without using them (null is accepted for every field).
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"}
# Fields honoured, or refused unless left at the value that means "off".
FIELDS = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "response_format",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    SCHEME,
}
OPTIONS = {"streams", "from", "to", "clock", "max_frames", "retrieval"}


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        if self.status >= 500:
            kind = "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return web.json_response(self.body(), status=self.status, headers=headers)


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


class ChatApi:
    """The handlers, over `answers` (the reasoner) and `store` (the names memory holds, for /v1/models)."""

    def __init__(self, answers: Answers, settings: Settings, store: MemoryStore) -> None:
        token = settings.server.api_token
        if not token:
            raise ValueError("the chat API needs an API token")
        self._token = token.encode()
        self.answers, self.store = answers, store
        self.media_root = settings.ingest.media_root
        self.default_max_tokens = min(512, settings.reasoner.max_new_tokens)  # the reasoner's default

    # ---------------------------------------------------------------- handlers

    async def models(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        names = await self._streams()
        return web.json_response({"object": "list", "data": [_model(MODEL)] + [_model(f"{MODEL}/{n}") for n in names]})

    async def model(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        name = request.match_info["model"]
        stream = _model_stream(name)
        if stream is not None and stream not in await self._streams():
            raise _no_model(name)
        return web.json_response(_model(name))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        body = await _json_body(request)
        chat = self.parse(body)
        events = self.answers.ask(chat.question)
        try:
            first = await anext(events)  # a bad question, an unknown stream, a reasoner away: a status, not a stream
        except Exception as e:
            await events.aclose()
            raise _api_error(e) from None
        log.info("event=chat_completion streams=%s stream=%s", ",".join(chat.question.streams), chat.stream)
        try:
            if chat.stream:
                return await self._stream(request, chat, first, events)
            return await self._complete(chat, first, events)
        finally:
            await events.aclose()

    # ---------------------------------------------------------------- the request

    def parse(self, body: dict[str, Any]) -> Chat:
        """The chat request as a Question and how to answer it; `ApiError` 400 (404 for an unknown model)."""
        body = {k: v for k, v in body.items() if v is not None}
        unknown = set(body) - FIELDS - IGNORED
        if unknown:
            raise bad(f"unsupported fields: {excerpt(', '.join(sorted(unknown)), 120)}", sorted(unknown)[0])
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad("model must be a non-empty string (GET /v1/models lists them)", "model")
        default_stream = _model_stream(model)
        if model != MODEL and default_stream is None:
            raise _no_model(model)
        _refuse_unsupported(body)
        n = _integer(body, "n", 1)
        if n != 1:
            raise bad(f"n must be 1: one answer per request (got {n})", "n")
        stream = _flag(body, "stream")
        options = body.get("stream_options", {})
        if not isinstance(options, dict) or not set(options) <= {"include_usage", "include_obfuscation"}:
            raise bad("stream_options may hold only include_usage", "stream_options")
        include_usage = bool(options.get("include_usage", False))
        max_tokens = _integer(body, "max_completion_tokens", None)
        if max_tokens is None:
            max_tokens = _integer(body, "max_tokens", None)
        temperature = _number(body, "temperature", 0.0, 2.0)
        top_p = _number(body, "top_p", 0.0, 1.0)
        seed = _integer(body, "seed", None)
        if seed is not None and not -(1 << 63) <= seed < 1 << 63:
            raise bad("seed must fit in 64 bits", "seed")
        stop = _stop(body.get("stop"))
        question, history, parts = _messages(body.get("messages"))
        extra = body.get(SCHEME, {})
        if not isinstance(extra, dict):
            raise bad(f"{SCHEME} must be an object", SCHEME)
        if set(extra) - OPTIONS:
            unknown_options = ", ".join(sorted(set(extra) - OPTIONS))
            raise bad(f"unknown {SCHEME} fields: {excerpt(unknown_options, 120)}", SCHEME)
        scope = self._scope(parts, extra, default_stream)
        max_frames = _integer(extra, "max_frames", 512, f"{SCHEME}.max_frames")
        retrieval = _flag(extra, "retrieval", f"{SCHEME}.retrieval")
        sample = temperature is not None and temperature > 0
        q = Question(
            streams=scope.streams,
            question=question,
            start=scope.start,
            end=scope.end,
            clock=scope.clock,
            history=history,
            max_frames=max_frames,
            retrieval=retrieval,
            max_new_tokens=max_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            seed=seed,
            video=scope.video,
        )
        return Chat(model, q, stream, include_usage, stop, max_tokens or self.default_max_tokens)

    def _scope(self, parts: list[str], extra: dict[str, Any], default_stream: str | None) -> Scope:
        """What the question is about: the video parts, else the body's `vcflash` streams, else the model's."""
        if parts and "streams" in extra:
            raise bad(f"name the cameras once: video_url parts or {SCHEME}.streams, not both", f"{SCHEME}.streams")
        scopes = [self._part(url) for url in parts]
        files = [s for s in scopes if s.video is not None]
        if files:
            if len(scopes) > 1:
                raise bad("a video file is asked about alone: one video_url part", "messages")
            return files[0]
        if scopes:
            ranges = {(s.start, s.end, s.clock) for s in scopes}
            if len(ranges) > 1:
                raise bad("give every camera of a question the same from/to (one range per question)", "messages")
            streams = [name for s in scopes for name in s.streams]
            if len(set(streams)) != len(streams):
                raise bad("a camera is named twice", "messages")
            start, end, clock = ranges.pop()
            if {"from", "to", "clock"} & set(extra):
                raise bad(f"give the range in the vcflash:// URL or in {SCHEME}, not both", SCHEME)
            return Scope(streams, start, end, clock)
        clock = extra.get("clock", "wall")
        if clock not in ("wall", "media"):
            raise bad(f"{SCHEME}.clock must be 'wall' or 'media'", f"{SCHEME}.clock")
        start, end = (_when(extra.get(key), clock, f"{SCHEME}.{key}") for key in ("from", "to"))
        if "streams" in extra:
            streams = extra["streams"]
            if not isinstance(streams, list) or not streams or not all(isinstance(s, str) for s in streams):
                raise bad(f"{SCHEME}.streams must be a non-empty list of stream names", f"{SCHEME}.streams")
            for name in streams:
                _check_name(name, f"{SCHEME}.streams")
            return Scope(list(streams), start, end, clock)
        if default_stream is not None:
            return Scope([default_stream], start, end, clock)
        raise bad(
            "name the cameras: a video_url part vcflash://CAMERA?from=...&to=..., the body's "
            f"{SCHEME}.streams (extra_body), or the model {MODEL}/CAMERA",
            "messages",
        )

    def _part(self, url: str) -> Scope:
        if url.startswith("file:"):
            return Scope([], None, None, "wall", self._file(url))
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != SCHEME:
            raise bad(
                f"video_url must be {SCHEME}://CAMERA?from=...&to=... or file:///PATH under the server's media "
                f"root (no network URLs), got {excerpt(url)}",
                "messages",
            )
        name = urllib.parse.unquote(parsed.netloc)
        if parsed.path not in ("", "/") or parsed.fragment:
            raise bad(f"{SCHEME} URLs name one camera: {SCHEME}://CAMERA?from=...&to=..., got {excerpt(url)}")
        _check_name(name, "messages")
        try:
            query = urllib.parse.parse_qs(parsed.query, strict_parsing=bool(parsed.query), max_num_fields=8)
        except ValueError:
            raise bad(f"cannot read the query of {excerpt(url)}", "messages") from None
        if set(query) - {"from", "to", "clock"} or any(len(v) > 1 for v in query.values()):
            raise bad(f"a {SCHEME} URL takes from, to and clock, once each; got {excerpt(parsed.query)}", "messages")
        clock = query.get("clock", ["wall"])[0]
        if clock not in ("wall", "media"):
            raise bad("clock must be wall or media", "messages")
        start, end = (_when(query.get(key, [None])[0], clock, key) for key in ("from", "to"))
        return Scope([name], start, end, clock)

    def _file(self, url: str) -> str:
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost") or parsed.query or parsed.fragment:
            raise bad(f"a file URL is file:///PATH on this server, got {excerpt(url)}", "messages")
        if self.media_root is None:
            raise bad(
                "this server reads no local video files: start it with --media-root (VCFLASH_MEDIA_ROOT) to answer "
                "questions about files under that directory",
                "messages",
            )
        try:
            checked = check_source(urllib.parse.unquote(parsed.path), media_root=self.media_root)
        except ValueError as e:
            raise bad(str(e), "messages") from None
        path = Path(checked.target)
        if not path.is_file():
            raise ApiError(404, f"no video file {excerpt(parsed.path)} under the media root", "messages")
        return str(path)

    # ---------------------------------------------------------------- the answer

    async def _complete(self, chat: Chat, first: str | Answer, events: AsyncIterator[str | Answer]) -> web.Response:
        cut = StopFilter(chat.stop)
        answer = None
        async for item in _chain(first, events):
            if isinstance(item, str):
                cut.feed(item)
            else:
                answer = item
        if answer is None:
            raise ApiError(500, "the reasoner ended without an answer")
        content = answer.answer if not cut.stopped else cut.text.strip()
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": None},
            "logprobs": None,
            "finish_reason": chat.finish(answer, cut.stopped),
        }
        return web.json_response(
            chat.envelope("chat.completion") | {"choices": [choice], "usage": _usage(answer), SCHEME: _evidence(answer)}
        )

    async def _stream(
        self, request: web.Request, chat: Chat, first: str | Answer, events: AsyncIterator[str | Answer]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)

        async def send(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await response.write(f"data: {data}\n\n".encode())

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return chat.envelope("chat.completion.chunk") | {"choices": [choice]} | extra

        cut = StopFilter(chat.stop)
        try:
            await send(chunk({"role": "assistant", "content": ""}))
            async for item in _chain(first, events):
                if isinstance(item, str):
                    text = cut.feed(item)
                    if text:
                        await send(chunk({"content": text}))
                    continue
                if tail := cut.flush():
                    await send(chunk({"content": tail}))
                usage = {"usage": None} if chat.include_usage else {}
                await send(chunk({}, chat.finish(item, cut.stopped), **{SCHEME: _evidence(item)}, **usage))
                if chat.include_usage:
                    await send(chat.envelope("chat.completion.chunk") | {"choices": [], "usage": _usage(item)})
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as e:  # the status is sent: the error goes in the stream, as OpenAI's
            error = _api_error(e)
            if error.status >= 500:
                log.error("event=chat_completion_failed", exc_info=e)
            await send(error.body())
        await send("[DONE]")
        await response.write_eof()
        return response

    # ---------------------------------------------------------------- helpers

    def _authorize(self, request: web.Request) -> None:
        """The API token as a bearer header, as every other HTTP API (no console cookie: this API is for clients)."""
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise ApiError(
                401, "missing bearer token (Authorization: Bearer <VCFLASH_API_TOKEN>)", code="missing_api_key"
            )
        if not hmac.compare_digest(credentials.strip().encode(), self._token):
            raise ApiError(401, "invalid bearer token", code="invalid_api_key")

    async def _streams(self) -> list[str]:
        try:
            return sorted(await asyncio.to_thread(self.store.streams))
        except Exception as e:
            raise _api_error(e) from None


class Chat:
    """One chat completion request, parsed."""

    def __init__(
        self, model: str, question: Question, stream: bool, include_usage: bool, stop: list[str], max_tokens: int
    ) -> None:
        self.model, self.question, self.stream, self.include_usage = model, question, stream, include_usage
        self.stop, self.max_tokens = stop, max_tokens
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())

    def envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def finish(self, answer: Answer, stopped: bool) -> str:
        return "length" if not stopped and answer.new_tokens >= self.max_tokens else "stop"


class Scope:
    def __init__(
        self, streams: list[str], start: float | None, end: float | None, clock: str, video: str | None = None
    ) -> None:
        self.streams, self.start, self.end, self.clock, self.video = streams, start, end, clock, video


class StopFilter:
    """The answer's text up to the first stop sequence: text that could begin one is held back until it cannot.
    Generation is not cut short (the evidence comes with the end of the answer); the text after a stop is dropped."""

    def __init__(self, stop: list[str]) -> None:
        self.stop, self.text, self.stopped = stop, "", False
        self._sent = 0

    def feed(self, piece: str) -> str:
        """The text that may be sent now."""
        if self.stopped:
            return ""
        self.text += piece
        if not self.stop:
            return self._emit(len(self.text))
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._emit(len(self.text))
        hold = max(len(s) for s in self.stop) - 1
        return self._emit(max(self._sent, len(self.text) - hold))

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        out, self._sent = self.text[self._sent : upto], max(self._sent, upto)
        return out


# ---------------------------------------------------------------- request parsing


def _messages(messages: Any) -> tuple[str, list[tuple[str, str]], list[str]]:
    """(the question, the history, the video_url URLs of the latest user message that has any)."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    turns: list[tuple[str, str, list[str]]] = []  # (role, text, video URLs)
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role in ("system", "developer"):
            _text(m.get("content"), i, videos=False)  # checked, not used: the prompt is the model's own
            continue
        if role not in ("user", "assistant"):
            raise bad(
                f"messages[{i}]: role {excerpt(role)} is not supported (system, developer, user and assistant are; "
                "this model calls no tools)",
                "messages",
            )
        if m.get("tool_calls") or m.get("function_call"):
            raise bad(f"messages[{i}]: tool calls are not supported", "messages")
        text, videos = _text(m.get("content"), i, videos=role == "user")
        turns.append((role, text, videos))
    if not turns or turns[-1][0] != "user":
        raise bad("the last message (besides system ones) must be the user's question", "messages")
    if [role for role, _, _ in turns] != ["user", "assistant"] * (len(turns) // 2) + ["user"]:
        raise bad("messages must alternate user and assistant, ending with a user message", "messages")
    history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]
    videos = next((v for _, _, v in reversed(turns) if v), [])
    return turns[-1][1], history, videos


def _text(content: Any, i: int, videos: bool) -> tuple[str, list[str]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list) or len(content) > MAX_PARTS:
        raise bad(f"messages[{i}].content must be a string or a list of at most {MAX_PARTS} parts", "messages")
    texts, urls = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "video_url" and videos:
            video = part.get("video_url")
            url = video.get("url") if isinstance(video, dict) else video
            if not isinstance(url, str) or not url:
                raise bad(f"messages[{i}]: a video_url part needs {{'video_url': {{'url': ...}}}}", "messages")
            urls.append(url)
        elif kind == "video_url":
            raise bad(f"messages[{i}]: only user messages may hold video_url parts", "messages")
        else:
            raise bad(
                f"messages[{i}]: content parts must be text or video_url (got {excerpt(kind)}); images and audio are "
                "not supported",
                "messages",
            )
    return "\n".join(texts), urls


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Fields this server cannot honour: refused unless off, so no client believes they were applied."""
    for key in ("presence_penalty", "frequency_penalty"):
        if key in body and body[key] != 0:
            raise bad(f"{key} is not supported (only 0)", key)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad("logprobs are not supported", "logprobs")
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported", "logit_bias")
    for key in ("tools", "functions"):
        if body.get(key):
            raise bad(f"{key} are not supported: this model calls no tools", key)
    for key in ("tool_choice", "function_call"):
        if key in body and body[key] not in ("none", "auto"):
            raise bad(f"{key} is not supported: this model calls no tools", key)
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise bad("response_format is not supported (only {'type': 'text'})", "response_format")


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise bad(f"stop must be a string or a list of up to {MAX_STOP} strings of 1 to {MAX_STOP_CHARS} characters")
    return stops


def _flag(body: dict[str, Any], key: str, param: str | None = None) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise bad(f"{param or key} must be true or false", param or key)
    return value


def _integer(body: dict[str, Any], key: str, default: int | None, param: str | None = None) -> int | None:
    value = body.get(key, default)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise bad(f"{param or key} must be an integer", param or key)
    return value


def _number(body: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad(f"{key} must be a number", key)
    if not lo <= value <= hi:
        raise bad(f"{key} must be in [{lo:g}, {hi:g}], got {value}", key)
    return float(value)


def _when(value: Any, clock: str, param: str) -> float | None:
    """A range end: Unix seconds or an ISO date-time (no zone: UTC) on the wall clock; media seconds on the media
    clock."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        t = float(value)
    elif isinstance(value, str):
        try:
            t = float(value)
        except ValueError:
            if clock == "media":
                raise bad(f"{param}: media time is seconds, got {excerpt(value)}", param) from None
            try:
                when = datetime.fromisoformat(value)
            except ValueError:
                raise bad(f"{param} is neither Unix seconds nor an ISO date-time: {excerpt(value)}", param) from None
            t = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    else:
        raise bad(f"{param} must be a time (Unix seconds or an ISO date-time)", param)
    if not math.isfinite(t):
        raise bad(f"{param} must be finite", param)
    return t


def _check_name(name: str, param: str) -> None:
    try:
        check_stream_name(name)
    except ValueError as e:
        raise bad(str(e), param) from None


def _model_stream(model: str) -> str | None:
    """The camera a model id `vcflash/CAMERA` names; None for any other id."""
    prefix, _, name = model.partition("/")
    if prefix != MODEL or not name:
        return None
    try:
        return check_stream_name(name)
    except ValueError:
        return None


def _no_model(model: str) -> ApiError:
    return ApiError(
        404,
        f"no model {excerpt(model)}: use {MODEL!r} (cameras named in the request) or {MODEL}/CAMERA (GET /v1/models)",
        "model",
        "model_not_found",
    )


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ApiError(415, "send Content-Type: application/json")
    size = request.content_length
    if size is not None and size > MAX_BODY_BYTES:
        raise ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    raw = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise bad("the body is not JSON") from None
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    return body


# ---------------------------------------------------------------- the answer


async def _chain(first: str | Answer, events: AsyncIterator[str | Answer]) -> AsyncIterator[str | Answer]:
    yield first
    async for item in events:
        yield item


def _usage(a: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": a.prompt_tokens,
        "completion_tokens": a.new_tokens,
        "total_tokens": a.prompt_tokens + a.new_tokens,
    }


def _evidence(a: Answer) -> dict[str, Any]:
    return {
        "moments": [_moment(e.clip) | {"retrieved": e.retrieved, "score": e.score} for e in a.evidence],
        "frames": a.frames,
        "duration_s": a.duration_s,
        "note": a.note,
    }


def _moment(c: ClipMeta) -> dict[str, Any]:
    name = urllib.parse.quote(c.stream_id, safe="")
    return {
        "stream": c.stream_id,
        "seq": c.seq,
        "start": _iso(c.wall_start),
        "end": _iso(c.wall_end),
        "wall_start": c.wall_start,
        "wall_end": c.wall_end,
        "media_start": c.media_start,
        "media_end": c.media_end,
        "thumbnail": f"/v1/streams/{name}/thumbnails/{c.seq}.jpg",
    }


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": MODEL}


def _api_error(e: Exception) -> ApiError:
    """A neutral error as the status gRPC's code maps to; anything else is a bug: 500, logged, no detail."""
    if isinstance(e, ApiError):
        return e
    for kind, status in HTTP_STATUS:
        if isinstance(e, kind):
            code = {NotFound: "not_found", Invalid: "invalid_request", Unavailable: "unavailable"}.get(kind)
            return ApiError(status.status_code, str(e), code=code)
    log.error("event=chat_completion_failed", exc_info=e)
    return ApiError(500, "internal error (see the server log)")


@web.middleware
async def openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """ApiError as OpenAI's error body, on this API's paths only."""
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()


def add_openai_api(app: web.Application, answers: Answers, settings: Settings, store: MemoryStore) -> ChatApi:
    """Mount /v1/models and /v1/chat/completions on `app` (the HTTP app, before it starts)."""
    api = ChatApi(answers, settings, store)
    app.middlewares.append(openai_errors)
    r = app.router
    r.add_get("/v1/models", api.models, allow_head=False)
    r.add_get("/v1/models/{model:.+}", api.model, allow_head=False)
    r.add_post("/v1/chat/completions", api.chat)
    return api
