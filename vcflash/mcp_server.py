"""`vcflash mcp`: an MCP (Model Context Protocol) server over a running vcflash, built on the official `mcp` SDK.

It is a client of the server's gRPC API (`vcflash.client.Client`, with the API token as every client finds it:
``--token``, VCFLASH_API_TOKEN, else the local server's data dir), so it answers exactly as the CLI does: `ask` is
`vcflash ask-live`'s Reasoner.Ask, with its limits and errors. Tools: list_cameras, camera_status, ask,
get_thumbnails. Transports: stdio (an agent starts ``vcflash mcp``) and streamable HTTP (``vcflash mcp --http-port
N``, at ``/mcp``, on loopback unless ``--host`` says otherwise, every request needing ``Authorization: Bearer
<API token>``: the MCP endpoint gives what the token gives, so it asks for the token too).

Nothing here imports torch: the MCP server needs no model.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Annotated, Any

import grpc
from pydantic import Field

from protos.vcflash.v1 import vcflash_pb2 as pb
from vcflash.client import Client

MAX_THUMBNAILS = 16
INSTRUCTIONS = (
    "vcflash keeps a searchable visual memory of live cameras (each camera is a named stream). Call list_cameras "
    "to learn the camera names and the time span each holds, then ask questions about what a camera saw over a "
    "time range with ask; its answer comes with the moments (clips with their UTC times) it is based on, and "
    "get_thumbnails shows those moments as JPEG images. Times are UTC."
)
Camera = Annotated[str, Field(description="A camera (stream) name as list_cameras gives it, e.g. 'lobby'.")]
Time = Annotated[
    str | float | None,
    Field(
        description="A wall-clock time: an ISO 8601 date-time (no zone means UTC), e.g. '2026-11-21T14:05:00Z', or "
        "Unix seconds. Omit for an open end."
    ),
]


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z") if t else ""


def _when(value: str | float | None, name: str) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name} must be an ISO 8601 date-time or Unix seconds, got {value[:48]!r}") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _moment(c: pb.ClipInfo) -> dict[str, Any]:
    return {
        "camera": c.stream_id,
        "seq": c.seq,
        "start": _iso(c.wall_start),
        "end": _iso(c.wall_end),
        "wall_start": c.wall_start,
        "wall_end": c.wall_end,
    }


class Tools:
    """The tools, over `client` (ingest and memory) and `reasoner` (Ask; the same server in `vcflash up`)."""

    def __init__(self, client: Client, reasoner: Client | None = None) -> None:
        self.client, self.reasoner = client, reasoner or client

    def list_cameras(self) -> dict[str, Any]:
        """List the cameras: each stream this server runs (state, frames per second, clips stored, last frame time,
        error if any) and each camera memory holds clips of (whether it still runs or not), with the UTC time span
        of its clips. Call this first to learn the camera names the other tools take."""
        running = {s.stream_id: s for s in self._call(self.client.list_streams)}
        memory = {m.stream_id: m for m in self._memory()}
        cameras = []
        for name in sorted(set(running) | set(memory)):
            cameras.append(self._camera(name, running.get(name), memory.get(name)))
        return {"cameras": cameras}

    def camera_status(self, camera: Camera) -> dict[str, Any]:
        """One camera's status: whether it runs and its state (running, reconnecting, failed, finished ...), its
        error, frames in and dropped, clips stored, the last frame's time, and the UTC span of the clips memory
        holds (first and last clip)."""
        status = None
        try:
            status = self.client.stream(camera)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                raise _tool_error(e) from None
        stats = self._memory(camera)
        if status is None and not stats:
            raise ValueError(f"no camera named {camera[:64]!r}: list_cameras gives the names")
        out = self._camera(camera, status, stats[0] if stats else None)
        if status is not None:
            out |= {
                "frames_in": status.frames_in,
                "frames_dropped": dict(status.frames_dropped),
                "clips_emitted": status.clips_emitted,
                "reconnects": status.reconnects,
            }
        return out

    def ask(
        self,
        question: Annotated[str, Field(description="The question about what the cameras saw, in plain language.")],
        cameras: Annotated[
            list[str],
            Field(
                description="The cameras to look at (1 to 8 names from list_cameras); several share the frame "
                "budget and are labelled in the prompt.",
                min_length=1,
            ),
        ],
        start: Time = None,
        end: Time = None,
        max_frames: Annotated[
            int,
            Field(
                description=(
                    "Frames the answer may look at (multiple of 4); over a longer range the server's default "
                    "selection picks them."
                )
            ),
        ] = 512,
        retrieval: Annotated[
            bool,
            Field(description="Also pick the clips closest to the question (a heuristic), beside the uniform ones."),
        ] = False,
        max_new_tokens: Annotated[int, Field(description="Longest answer, in tokens.")] = 512,
    ) -> dict[str, Any]:
        """Ask a question about what one or more cameras saw between start and end (UTC; both optional: the whole
        memory). Answered from the cameras' stored memory, as `vcflash ask-live` does. Returns the answer and the
        moments it is based on: each clip used (camera, seq, UTC start and end), which get_thumbnails can show.
        An empty range answers that there is no video there."""
        t0, t1 = _when(start, "start"), _when(end, "end")
        result = None
        try:
            for event in self.reasoner.ask(
                cameras,
                question,
                start=t0,
                end=t1,
                wall_clock=True,
                max_frames=max_frames,
                retrieval=retrieval,
                max_new_tokens=max_new_tokens,
            ):
                if not isinstance(event, str):
                    result = event
        except grpc.RpcError as e:
            raise _tool_error(e) from None
        assert result is not None
        return {
            "answer": result.answer,
            "moments": [_moment(e.clip) for e in result.evidence],
            "frames": result.frames,
            "note": result.note,
        }

    def search(
        self,
        question: Annotated[str, Field(description="What to find, in plain language (e.g. 'a red van leaving').")],
        cameras: Annotated[
            list[str], Field(description="The cameras to search (1 to 8 names from list_cameras).", min_length=1)
        ],
        start: Time = None,
        end: Time = None,
        limit: Annotated[int, Field(description="Most moments to return (1 to 100).", ge=1, le=100)] = 10,
    ) -> dict[str, Any]:
        """Find the moments between start and end (UTC; both optional: the whole memory) that best match the
        question, best first, without writing an answer: each moment's camera, UTC start and end, score (the
        model's attention to it) and clips (first and last seq). Use it for "when did X happen"; pass a moment's
        start and end to get_thumbnails to look at it, or to ask to ask about it."""
        t0, t1 = _when(start, "start"), _when(end, "end")
        try:
            found = self.reasoner.search(cameras, question, start=t0, end=t1, wall_clock=True, limit=limit)
        except grpc.RpcError as e:
            raise _tool_error(e) from None
        moments = [
            {
                "camera": m.stream_id,
                "start": _iso(m.wall_start),
                "end": _iso(m.wall_end),
                "wall_start": m.wall_start,
                "wall_end": m.wall_end,
                "score": m.score,
                "first_seq": m.first_seq,
                "last_seq": m.last_seq,
            }
            for m in found.moments
        ]
        return {"moments": moments, "clips_scored": found.clips_scored}

    def get_thumbnails(
        self,
        camera: Camera,
        start: Time = None,
        end: Time = None,
        limit: Annotated[
            int, Field(description=f"Most thumbnails to return (1 to {MAX_THUMBNAILS}).", ge=1, le=MAX_THUMBNAILS)
        ] = 4,
    ) -> list[Any]:
        """JPEG thumbnails (each clip's middle frame, 320 px wide) of a camera's clips between start and end (UTC),
        oldest first, at most `limit`: to look at the moments ask returned, pass a moment's start and end. Returns
        a JSON list of the clips (camera, seq, UTC times) followed by one image per clip."""
        from mcp.server.mcpserver import Image

        t0, t1 = _when(start, "start"), _when(end, "end")
        try:
            shots = list(self.client.thumbnails(camera, t0, t1, wall_clock=True, limit=limit))
        except grpc.RpcError as e:
            raise _tool_error(e) from None
        index = json.dumps({"thumbnails": [_moment(t.clip) for t in shots]})
        return [index, *(Image(data=t.jpeg, format="jpeg") for t in shots)]

    # ---------------------------------------------------------------- helpers

    def _memory(self, camera: str = "") -> list[pb.StreamMemoryStats]:
        try:
            return self.client.stats(camera)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                return []
            raise _tool_error(e) from None

    def _call(self, method: Callable[[], Any]) -> Any:
        try:
            return method()
        except grpc.RpcError as e:
            raise _tool_error(e) from None

    @staticmethod
    def _camera(name: str, s: pb.StreamStatus | None, m: pb.StreamMemoryStats | None) -> dict[str, Any]:
        out: dict[str, Any] = {"name": name, "running": s is not None}
        if s is not None:
            out |= {
                "state": s.state,
                "source": s.source,  # redacted by the server
                "fps": s.fps,
                "clips_stored": s.clips_stored,
                "last_frame": _iso(s.last_wall_time),
                "error": s.error,
                "memory_error": s.memory_error,
            }
        if m is not None:
            out |= {
                "clips": m.clips,
                "first": _iso(m.first.wall_start) if m.HasField("first") else "",
                "last": _iso(m.last.wall_end) if m.HasField("last") else "",
            }
        return out


def _tool_error(e: grpc.RpcError) -> Exception:
    from mcp.server.mcpserver.exceptions import ToolError

    return ToolError(f"{e.code().name}: {e.details()}")  # type: ignore[attr-defined]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vcflash")
    except PackageNotFoundError:
        return "unknown"


def build(tools: Tools) -> Any:
    """The MCP server with the tools."""
    from mcp.server.mcpserver import MCPServer
    from mcp.types import ToolAnnotations

    server = MCPServer("vcflash", instructions=INSTRUCTIONS, version=_version())
    read = ToolAnnotations(readOnlyHint=True, openWorldHint=False)
    for fn in (tools.list_cameras, tools.camera_status, tools.ask, tools.search):
        server.add_tool(fn, annotations=read)  # JSON results, with their output schema
    server.add_tool(tools.get_thumbnails, annotations=read, structured_output=False)  # text, then images
    return server


class BearerAuth:
    """ASGI middleware: every HTTP request needs `Authorization: Bearer <token>` (401 otherwise)."""

    def __init__(self, app: Any, token: str) -> None:
        self.app, self.token = app, token.encode()

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            kind, _, credentials = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if kind.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(), self.token):
                body = json.dumps({"error": "missing or invalid bearer token"}).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b"Bearer"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def serve_http(server: Any, token: str, host: str, port: int) -> None:
    """Streamable HTTP at http://HOST:PORT/mcp, behind the bearer token."""
    import uvicorn

    app = BearerAuth(server.streamable_http_app(host=host), token)
    uvicorn.run(app, host=host, port=port, log_level="warning")
