"""A small synchronous Python client for a running vcflash server.

from vcflash.client import Client
with Client("127.0.0.1:50051") as c:   # token: VCFLASH_API_TOKEN or the local server's; tls_ca="ca.pem": TLS
    c.add_stream("lobby", "rtsp://cam/stream", fps=1)
    for piece in c.ask(["lobby"], "When did the van leave?"):
        print(piece, end="")          # text pieces, then the final AskResult
    for m in c.search(["lobby"], "the white van leaves").moments:  # ranked moments, no answer generated
        print(m.stream_id, m.wall_start, m.wall_end, m.score)
    c.add_alert("door", ["lobby"], "Is a person at the door?")  # a standing yes/no question
    for e in c.events(alert="door", follow=True):  # its event log, then new records; resume with after=e.id
        print(e.id, e.kind, e.stream_id, e.start_wall)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc

from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from vcflash.serve.tls import channel


def wall_seconds(t: datetime) -> float:
    """Unix seconds of a date-time; a naive one is UTC (as every time vcflash prints), not this machine's zone."""
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def resolve_range(
    start: float | datetime | None, end: float | datetime | None, wall_clock: bool = False
) -> tuple[float | None, float | None, bool]:
    """(start, end, on the wall clock?) in seconds. A datetime is a wall-clock time; a number is media seconds, or
    Unix seconds with `wall_clock`. A datetime next to media seconds is a ValueError: the clocks are unrelated
    (media time starts at 0 when the server first sees a stream)."""
    dated = [isinstance(t, datetime) for t in (start, end) if t is not None]
    if any(dated) and not all(dated) and not wall_clock:
        raise ValueError(
            f"time range mixes clocks: start {start!s} and end {end!s}; give both as wall-clock date-times, both as "
            "media seconds, or Unix seconds with the wall clock (wall_clock=True, --wall)"
        )
    start, end = (wall_seconds(t) if isinstance(t, datetime) else t for t in (start, end))
    return start, end, wall_clock or any(dated)


SELECTIONS = {
    "uniform": pb.SELECTION_UNIFORM,
    "retrieval": pb.SELECTION_RETRIEVAL,
    "scan": pb.SELECTION_SCAN,
    "index": pb.SELECTION_INDEX,
}


def time_range(start: float | datetime | None, end: float | datetime | None, wall_clock: bool) -> pb.TimeRange:
    start, end, wall = resolve_range(start, end, wall_clock)
    return pb.TimeRange(start=start, end=end, clock=pb.CLOCK_WALL if wall else pb.CLOCK_MEDIA)


class Client:
    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        timeout_s: float = 30.0,
        max_message_bytes: int = 8 << 20,
        tls_ca: Path | str | None = None,
        http_url: str | None = None,
    ) -> None:
        """`address` None: VCFLASH_ADDRESS (or 127.0.0.1:50051). `token` None: as the CLI finds it,
        VCFLASH_API_TOKEN, else the one a server on this machine keeps in VCFLASH_DATA_DIR (a ValueError when there
        is none). `tls_ca`: a CA certificate (PEM file) to connect over TLS and verify the server with; None:
        VCFLASH_TLS_CA, else plaintext. `http_url`: the server's HTTP API (recordings); None: VCFLASH_HTTP_URL, else
        the address's host on port 8080 (https with a CA)."""
        if address is None or token is None or tls_ca is None or http_url is None:
            from vcflash.serve.settings import ClientSettings

            settings = ClientSettings.from_env()
            address = address or settings.address
            token = token or settings.token()
            tls_ca = tls_ca if tls_ca is not None else settings.tls_ca
            http_url = http_url or settings.http_url
        host = address.rpartition(":")[0] or "127.0.0.1"
        self.http_url = (http_url or f"{'https' if tls_ca else 'http'}://{host}:8080").rstrip("/")
        self.tls_ca = None if tls_ca is None else Path(tls_ca)
        self._token = token
        self.channel = channel(
            address,
            None if tls_ca is None else Path(tls_ca),
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.timeout_s = timeout_s
        self.ingest = pb_grpc.IngestStub(self.channel)
        self.memory = pb_grpc.MemoryStub(self.channel)
        self.reasoner = pb_grpc.ReasonerStub(self.channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: grpc.UnaryUnaryMultiCallable, request: object) -> object:
        return method(request, metadata=self.metadata, timeout=self.timeout_s)

    def add_stream(
        self,
        stream_id: str,
        source: str,
        *,
        fps: float = 1.0,
        realtime: bool = True,
        loop: bool = False,
        transport: str = "tcp",
        keyframes_only: bool = False,
        listen: bool = False,
        live: bool | None = None,
        camera_clock: bool = False,
        retention_max_age_s: float | None = None,
        retention_max_bytes: int | None = None,
        record: bool = False,
    ) -> pb.StreamStatus:
        """Start ingesting ``source``. ``camera_clock`` (RTSP): wall times on the camera's clock (RTCP sender
        reports) instead of the server's, where within VCFLASH_CAMERA_CLOCK_MAX_SKEW_S of it. ``record``: keep the
        video too (see `recording`)."""
        request = pb.AddStreamRequest(
            stream_id=stream_id,
            source=source,
            fps=fps,
            realtime=realtime,
            loop=loop,
            transport=transport,
            keyframes_only=keyframes_only,
            listen=listen,
            live=live,
            camera_clock=camera_clock,
            retention_max_age_s=retention_max_age_s,
            retention_max_bytes=retention_max_bytes,
            record=record,
        )
        return self._call(self.ingest.AddStream, request)  # type: ignore[return-value]

    def remove_stream(self, stream_id: str, delete_memory: bool = False) -> None:
        self._call(self.ingest.RemoveStream, pb.RemoveStreamRequest(stream_id=stream_id, delete_memory=delete_memory))

    def restart_stream(self, stream_id: str) -> pb.StreamStatus:
        """Start an ended stream (failed: a camera refused its credentials; or finished) again with its spec."""
        return self._call(self.ingest.RestartStream, pb.RestartStreamRequest(stream_id=stream_id))  # type: ignore[return-value]

    def list_streams(self) -> list[pb.StreamStatus]:
        return list(self._call(self.ingest.ListStreams, pb.ListStreamsRequest()).streams)  # type: ignore[attr-defined]

    def stream(self, stream_id: str) -> pb.StreamStatus:
        return self._call(self.ingest.GetStream, pb.GetStreamRequest(stream_id=stream_id))  # type: ignore[return-value]

    def clips(
        self,
        stream_id: str,
        start: float | datetime | None = None,
        end: float | datetime | None = None,
        *,
        wall_clock: bool = False,
        limit: int = 0,
    ) -> list[pb.ClipInfo]:
        """The clips that overlap [start, end), by start time; see resolve_range for the clocks."""
        request = pb.ListClipsRequest(stream_id=stream_id, range=time_range(start, end, wall_clock), limit=limit)
        return list(self._call(self.memory.ListClips, request).clips)  # type: ignore[attr-defined]

    def thumbnails(
        self,
        stream_id: str,
        start: float | datetime | None = None,
        end: float | datetime | None = None,
        *,
        wall_clock: bool = False,
        limit: int | None = None,
    ) -> Iterator[pb.Thumbnail]:
        """The JPEG thumbnails (`.jpeg`, with `.clip`) of the clips that overlap [start, end), oldest first, at most
        `limit` of them (None: all); fetched a page (Memory.GetThumbnails, up to 32) at a time."""
        request = pb.GetThumbnailsRequest(stream_id=stream_id, range=time_range(start, end, wall_clock))
        seen: set[int] = set()
        while limit is None or len(seen) < limit:
            page = self._call(self.memory.GetThumbnails, request)
            for t in page.thumbnails:  # type: ignore[attr-defined]
                if t.clip.seq not in seen and (limit is None or len(seen) < limit):
                    seen.add(t.clip.seq)
                    yield t
            if not page.truncated:  # type: ignore[attr-defined]
                return
            request.range.start = page.next_start  # type: ignore[attr-defined]

    def recording(
        self, stream_id: str, start: float | datetime, end: float | datetime, out: Path | str
    ) -> tuple[float, float]:
        """Write the recorded moment [start, end) (Unix seconds or date-times, wall clock) of a stream started with
        `record=True` to `out` as an MP4, cut by remux over HTTP (GET /v1/streams/{id}/recording.mp4). Returns the
        wall-clock times of its first and last frame. An HTTP error is a `urllib.error.HTTPError` whose body says
        why: 404 when nothing is recorded there, 400 for a bad or too long range (VCFLASH_MAX_RECORDING_RANGE_S)."""
        import shutil
        import ssl
        import urllib.parse
        import urllib.request

        start, end = (wall_seconds(t) if isinstance(t, datetime) else float(t) for t in (start, end))
        query = urllib.parse.urlencode({"start": repr(start), "end": repr(end)})
        url = f"{self.http_url}/v1/streams/{urllib.parse.quote(stream_id, safe='')}/recording.mp4?{query}"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self._token}"})
        context = None if self.tls_ca is None else ssl.create_default_context(cafile=str(self.tls_ca))
        with urllib.request.urlopen(request, timeout=self.timeout_s, context=context) as r, open(out, "wb") as f:
            shutil.copyfileobj(r, f)
            return float(r.headers["X-Recording-Start"]), float(r.headers["X-Recording-End"])

    def stats(self, stream_id: str = "") -> list[pb.StreamMemoryStats]:
        """What memory holds of one stream, or of every stream ("") whether or not a server runs it."""
        return list(self._call(self.memory.GetStats, pb.GetStatsRequest(stream_id=stream_id)).streams)  # type: ignore[attr-defined]

    def delete_memory(self, stream_id: str) -> None:
        """Forget a stream's clips, retention and config (Memory.DeleteStream); FAILED_PRECONDITION while it
        runs: `remove_stream(stream_id, delete_memory=True)` stops and deletes it."""
        self._call(self.memory.DeleteStream, pb.DeleteStreamRequest(stream_id=stream_id))

    def ask(
        self,
        stream_ids: Sequence[str],
        question: str,
        *,
        start: float | datetime | None = None,
        end: float | datetime | None = None,
        wall_clock: bool = False,
        max_frames: int = 512,
        retrieval: bool = False,
        selection: str | None = None,
        dropout: str = "",
        max_new_tokens: int = 512,
        history: Sequence[tuple[str, str]] = (),
        anchors: bool = True,
        timeout_s: float | None = 600.0,
    ) -> Iterator[str | pb.AskResult]:
        """Yield the answer's text pieces as they are generated, then the final AskResult. The question is about
        the clips that overlap [start, end); see resolve_range for the clocks. `selection` ("uniform",
        "retrieval", "scan" or "index", the default; `retrieval=True` is "retrieval") picks the clips when the range
        exceeds max_frames; all but "uniform" also rank moments (`AskResult.moments`)."""
        request = pb.AskRequest(
            stream_ids=list(stream_ids),
            question=question,
            range=time_range(start, end, wall_clock),
            max_frames=max_frames,
            # unset: the server's default (index; README "How an Ask is answered")
            selection=SELECTIONS[selection]
            if selection
            else pb.SELECTION_RETRIEVAL
            if retrieval
            else pb.SELECTION_DEFAULT,
            dropout=dropout,
            generation=pb.Generation(max_new_tokens=max_new_tokens),
            history=[pb.Turn(question=q, answer=a) for q, a in history],
            wall_clock_anchors=anchors,
        )
        for event in self.reasoner.Ask(request, metadata=self.metadata, timeout=timeout_s):
            yield event.text if event.WhichOneof("event") == "text" else event.result

    def search(
        self,
        stream_ids: Sequence[str],
        question: str,
        *,
        start: float | datetime | None = None,
        end: float | datetime | None = None,
        wall_clock: bool = False,
        limit: int = 10,
        selection: str = "scan",
        timeout_s: float | None = 120.0,
    ) -> pb.SearchResponse:
        """The moments of the streams' [start, end) that best answer the question, best first (`.moments`: stream,
        media and wall-clock start/end, score), without generating an answer. `selection` "scan" (the model's
        attention over every clip in range), "index" (the same score from per-clip keys) or "retrieval" (the FAISS
        heuristic)."""
        request = pb.SearchRequest(
            stream_ids=list(stream_ids),
            question=question,
            range=time_range(start, end, wall_clock),
            limit=limit,
            selection=SELECTIONS[selection],
        )
        return self.reasoner.Search(request, metadata=self.metadata, timeout=timeout_s)  # type: ignore[no-any-return]

    def add_alert(
        self,
        name: str,
        stream_ids: Sequence[str],
        question: str,
        *,
        window_frames: int = 16,
        every_clips: int = 1,
        threshold: float = 0.5,
        min_duration_s: float = 0.0,
        cooldown_s: float = 0.0,
        webhook_url: str | None = None,
        mqtt_topic: str | None = None,
    ) -> pb.Alert:
        """Add a standing yes/no question, evaluated on every `every_clips` new clips of the streams over their latest
        `window_frames` frames; an event starts when P(yes) stays above `threshold` for `min_duration_s`. With a
        webhook, the answer's `webhook_secret` is the key its POSTs are signed with: sent this once only."""
        request = pb.AddAlertRequest(
            name=name,
            stream_ids=list(stream_ids),
            question=question,
            window_frames=window_frames,
            every_clips=every_clips,
            threshold=threshold,
            min_duration_s=min_duration_s,
            cooldown_s=cooldown_s,
            webhook_url=webhook_url or "",
            mqtt_topic=mqtt_topic or "",
        )
        return self._call(self.reasoner.AddAlert, request)  # type: ignore[return-value]

    def alerts(self) -> list[pb.Alert]:
        """Every alert, by name (without webhook secrets)."""
        return list(self._call(self.reasoner.ListAlerts, pb.ListAlertsRequest()).alerts)  # type: ignore[attr-defined]

    def remove_alert(self, name: str) -> None:
        """Stop evaluating an alert and forget it (its events stay in the log); NOT_FOUND if there is none."""
        self._call(self.reasoner.RemoveAlert, pb.RemoveAlertRequest(name=name))

    def events(
        self,
        *,
        after: int = 0,
        alert: str | None = None,
        follow: bool = False,
        start: float | datetime | None = None,
        end: float | datetime | None = None,
        wall_clock: bool = False,
        timeout_s: float | None = None,
    ) -> Iterator[pb.AlertEvent]:
        """The alert event log from after id `after`, ascending (of one alert; of events overlapping [start, end),
        see resolve_range for the clocks), then with `follow` each new record as it is stored, until the iterator is
        closed. To resume after a disconnect without loss or repeats, pass the last `.id` received as `after`.
        `event_record` turns a record into the JSON shape webhooks and MQTT carry."""
        request = pb.WatchEventsRequest(
            after_id=after, alert=alert or "", follow=follow, range=time_range(start, end, wall_clock)
        )
        timeout = timeout_s if timeout_s is not None or follow else self.timeout_s
        call = self.reasoner.WatchEvents(request, metadata=self.metadata, timeout=timeout)
        try:
            yield from call
        finally:
            call.cancel()


def event_record(e: pb.AlertEvent) -> dict[str, object]:
    """An event record as the engine makes it and webhooks and MQTT carry it (`None` for times not set)."""
    optional = {k: getattr(e, k) if e.HasField(k) else None for k in ("end_media_s", "start_wall", "end_wall")}
    return {
        "id": e.id,
        "key": e.key,
        "kind": e.kind,
        "alert": e.alert,
        "stream": e.stream_id,
        "event": e.event,
        "start_media_s": e.start_media_s,
        **optional,
        "peak": e.peak,
        "score": e.score,
        "clips": list(e.clips),
        "emitted_wall": e.emitted_wall,
    }
