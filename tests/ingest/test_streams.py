"""StreamSpec, MediaClock and the stream registry: checks, the durable form, and where a stream goes on from."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from ingest.clock import MediaClock
from ingest.pipeline import IngestManager, StreamState
from ingest.source import Frame
from ingest.spec import StreamSpec
from ingest.streams import Streams
from memory.embedded import EmbeddedStore
from memory.records import ClipMeta, ClipRecord, Retention, clip_vector
from memory.store import MemoryUnavailable
from vcflash.serve.errors import AlreadyExists, Exhausted, Invalid, NotFound
from vcflash.serve.settings import IngestSettings

# Ingest mechanics read local test videos: any file is allowed (the file policy has its own tests).
ROOT = Path("/")
FILES = IngestSettings(media_root=ROOT)

# ---------------------------------------------------------------------------- StreamSpec


def test_spec_round_trips_through_its_config() -> None:
    spec = StreamSpec("rtsp://cam/live", fps=2.0, transport="udp", keyframes_only=True, live=True, resume=False)
    config = spec.to_config(active=True)
    assert config["active"] is True and config["source"] == "rtsp://cam/live"
    assert StreamSpec.from_config(config) == spec


def test_a_config_stored_by_an_older_version_takes_the_defaults() -> None:
    old = {"source": "/videos/door.mp4", "fps": 1.0, "realtime": True, "loop": False, "active": True}
    spec = StreamSpec.from_config(old)
    assert spec == StreamSpec("/videos/door.mp4", fps=1.0)
    assert (spec.transport, spec.listen, spec.keyframes_only, spec.live) == ("tcp", False, False, None)
    assert spec.resume
    whip = {"source": "whip://door", "fps": 1.0, "realtime": False, "loop": False, "active": False}
    assert StreamSpec.from_config(whip).source == "whip://door"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": ""}, "source is empty"),
        ({"fps": 0.0}, "fps must be"),
        ({"fps": float("nan")}, "fps must be"),
        ({"transport": "http"}, "transport must be one of"),
        ({"source": "http://h/x", "listen": True}, "listen needs an rtsp:// URL"),
    ],
)
def test_a_bad_spec_is_invalid(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(Invalid, match=match):
        StreamSpec(**({"source": "rtsp://cam/live"} | kwargs))  # type: ignore[arg-type]


def test_unknown_config_keys_are_invalid() -> None:
    with pytest.raises(Invalid, match="colour"):
        StreamSpec.from_config({"source": "rtsp://cam/live", "colour": "red"})


def test_live_follows_the_scheme_unless_said() -> None:
    assert StreamSpec("rtsp://cam/live").is_live and not StreamSpec("/v.mp4").is_live
    assert StreamSpec("http://relay/stream", live=True).is_live
    assert StreamSpec("rtsp://0.0.0.0:8554/push", listen=True, live=False).is_live  # a listener waits for pushes


def test_admission_fills_the_default_fps_and_checks_the_limits() -> None:
    settings = IngestSettings(media_root=ROOT, fps=2.0, max_fps=5.0, max_source_chars=32)
    manager = IngestManager(settings, registry=CollectorRegistry())
    assert manager.admit(StreamSpec("rtsp://cam/live")).fps == 2.0
    assert manager.admit(StreamSpec("rtsp://cam/live", fps=5.0)).fps == 5.0
    with pytest.raises(Invalid, match="fps must be <= 5"):
        manager.admit(StreamSpec("rtsp://cam/live", fps=6.0))
    with pytest.raises(Invalid, match="longer than 32"):
        manager.admit(StreamSpec("rtsp://cam/" + "x" * 40))


# ---------------------------------------------------------------------------- MediaClock


def test_first_connection_keeps_its_pts() -> None:
    clock = MediaClock()
    clock.connect(min_gap_s=1.0)
    assert [clock.media_time(t, 1000.0 + t) for t in (5.0, 5.5, 6.0)] == [5.0, 5.5, 6.0]
    assert clock.last == (6.0, 1006.0)


def test_a_reconnect_goes_on_by_the_wall_time_away() -> None:
    clock = MediaClock()
    clock.connect(min_gap_s=1.0)
    clock.media_time(10.0, 1000.0)
    clock.connect(min_gap_s=1.0)  # the new session restarts its clock near 0, 3 s of wall time later
    assert [clock.media_time(t, 1003.0 + t) for t in (0.0, 0.5)] == pytest.approx([13.0, 13.5])


def test_a_quick_reconnect_still_moves_on_by_one_interval() -> None:
    clock = MediaClock()
    clock.connect(min_gap_s=0.5)
    clock.media_time(10.0, 1000.0)
    clock.connect(min_gap_s=0.5)
    assert clock.media_time(0.0, 999.0) == pytest.approx(10.5)  # wall time went back: media time does not


def test_a_resumed_clock_shifts_even_the_first_connection() -> None:
    clock = MediaClock.after(40.0, 2000.0)  # where the stored clips end
    clock.connect(min_gap_s=1.0)
    assert clock.media_time(0.0, 2010.0) == pytest.approx(50.0)
    assert clock.media_time(1.0, 2011.0) == pytest.approx(51.0)


def test_a_connection_without_frames_leaves_the_clock_alone() -> None:
    clock = MediaClock()
    clock.connect(min_gap_s=1.0)
    clock.media_time(4.0, 1004.0)
    clock.connect(min_gap_s=1.0)  # failed before its first frame
    clock.connect(min_gap_s=1.0)
    assert clock.media_time(0.0, 1010.0) == pytest.approx(10.0)


# ---------------------------------------------------------------------------- the registry


def frames(pts: list[float]) -> Callable[[threading.Event], Iterator[Frame]]:
    """A frame source (as a WebRTC session gives) of synthetic frames arriving now."""

    def source(stop: threading.Event) -> Iterator[Frame]:
        for t in pts:
            yield Frame(pts=t, wall_time=time.time(), image=np.zeros((8, 8, 3), np.uint8))

    return source


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EmbeddedStore]:
    with EmbeddedStore(tmp_path / "memory.sqlite3") as store:
        yield store


def registry(store: EmbeddedStore, **settings: object) -> Streams:
    manager = IngestManager(IngestSettings(media_root=ROOT, **settings), registry=CollectorRegistry())  # type: ignore[arg-type]
    return Streams(manager, store, Retention())


def drain(streams: Streams) -> list:
    clips = []
    while not streams.manager.clips.empty():
        clips.append(streams.manager.clips.get_nowait())
    return clips


@pytest.mark.asyncio
async def test_admission_errors_are_the_neutral_ones(store: EmbeddedStore) -> None:
    streams = registry(store, max_streams=1)
    spec = StreamSpec("whip://a", fps=1.0, realtime=False, resume=False)
    await streams.add("a", spec, source=frames([]))
    with pytest.raises(AlreadyExists):
        await streams.add("a", spec, source=frames([]))
    with pytest.raises(Exhausted, match="at most 1 streams"):
        await streams.add("b", spec, source=frames([]))
    with pytest.raises(NotFound):
        await streams.remove("nope")
    with pytest.raises(Invalid, match="fps"):
        await streams.add("c", replace(spec, fps=100.0))
    assert streams.manager.names() == ["a"]
    await streams.manager.close()


@pytest.mark.asyncio
async def test_a_replaced_stream_continues_numbering_and_media_clock(store: EmbeddedStore) -> None:
    streams = registry(store)
    spec = StreamSpec("whip://a", fps=1.0, realtime=False, resume=False)
    await streams.add("a", spec, source=frames([t / 10 for t in range(80)]))  # 8 s: two clips
    assert (await streams.manager.wait("a")).state is StreamState.FINISHED
    with pytest.raises(AlreadyExists):  # an ended stream holds its name...
        await streams.add("a", spec, source=frames([]))
    await streams.add("a", spec, source=frames([t / 10 for t in range(40)]), replace=True)  # ...unless replaced
    await streams.manager.wait("a")

    clips = drain(streams)
    assert [c.seq for c in clips] == [0, 1, 2]
    assert clips[2].media_start >= clips[1].media_times[-1] + 1.0  # the new session's clock restarted at 0
    assert store.stream_configs()["a"] == spec.to_config(active=False)  # kept, never resumed
    await streams.manager.close()


@pytest.mark.asyncio
async def test_resume_continues_after_the_last_stored_clip(store: EmbeddedStore, videos: dict[str, Path]) -> None:
    last_wall = time.time() - 5.0
    meta = ClipMeta("cam", 6, last_wall - 4.0, last_wall, 26.0, 30.0, (26.0, 27.0, 28.0, 29.0))
    tokens = np.ones((64, 8), np.float16)
    store.put(ClipRecord(meta, tokens, clip_vector(tokens)))
    old = {"source": str(videos["20s"]), "fps": 1.0, "realtime": False, "loop": False, "active": True}
    store.put_stream_config("cam", old)
    store.put_stream_config("gone", old | {"active": False})

    streams = registry(store)
    assert await streams.resume() == ["cam"]
    status = await streams.manager.wait("cam")
    clips = drain(streams)
    assert status.state is StreamState.FINISHED and [c.seq for c in clips] == [7, 8, 9, 10, 11]
    assert clips[0].media_start >= 35.0 - 0.5  # 30 s, plus the ~5 s the stream was away
    assert all(b.media_start > a.media_start for a, b in zip(clips, clips[1:], strict=False))
    for _ in range(100):  # a file that played out is not resumed again
        if not store.stream_configs()["cam"]["active"]:
            break
        await asyncio.sleep(0.01)
    assert store.stream_configs()["cam"] == StreamSpec.from_config(old).to_config(active=False)
    await streams.manager.close()


class Unreachable(EmbeddedStore):
    """Embedded memory that fails as an unreachable Redis does (MemoryUnavailable) for its first `fail` reads of
    stream configs and of a stream's stats: a restarting Redis, a Cluster master failing over."""

    def __init__(self, path: Path, fail: int) -> None:
        super().__init__(path)
        self.fail = {"stream_configs": fail, "stats": fail}

    def _maybe_fail(self, what: str) -> None:
        if self.fail[what] > 0:
            self.fail[what] -= 1
            raise MemoryUnavailable(f"redis at 127.0.0.1:1 unreachable ({what})")

    def stream_configs(self) -> dict:
        self._maybe_fail("stream_configs")
        return super().stream_configs()

    def stats(self, stream_id: str):  # type: ignore[no-untyped-def]
        self._maybe_fail("stats")
        return super().stats(stream_id)


@pytest.mark.asyncio
async def test_resume_waits_for_memory_that_cannot_be_reached(
    tmp_path: Path, videos: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Memory failing at start (on the configs, then in the middle of a stream's start) is waited for and
    retried, never fatal: every active stream resumes once, each where it left off."""
    with Unreachable(tmp_path / "memory.sqlite3", fail=2) as store:
        for name in ("a", "b"):
            store.put_stream_config(name, {"source": str(videos["20s"]), "fps": 1.0, "active": True})
        streams = registry(store)
        with caplog.at_level("WARNING", logger="ingest.streams"):
            assert await streams.resume(max_wait_s=0.05) == ["a", "b"]
        assert sorted(streams.manager.names()) == ["a", "b"]
        assert store.fail == {"stream_configs": 0, "stats": 0}
        waits = [r.getMessage() for r in caplog.records if "event=resume_waiting_for_memory" in r.getMessage()]
        assert len(waits) == 4 and all("unreachable" in w for w in waits)
        await streams.manager.close()


@pytest.mark.asyncio
async def test_a_stored_config_that_no_longer_passes_is_left_stopped(store: EmbeddedStore) -> None:
    store.put_stream_config("fast", {"source": "rtsp://cam/live", "fps": 25.0, "active": True})
    streams = registry(store, max_fps=10.0)
    assert await streams.resume() == []
    assert streams.manager.names() == []


@pytest.mark.asyncio
async def test_a_failed_stream_is_not_resumed_with_the_server(store: EmbeddedStore, tmp_path: Path) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    streams = registry(store)
    spec = StreamSpec(str(broken), fps=1.0, realtime=False)
    await streams.add("cam", spec)
    status = await streams.manager.wait("cam")
    assert status.state is StreamState.FAILED
    for _ in range(100):
        if not store.stream_configs()["cam"]["active"]:
            break
        await asyncio.sleep(0.01)
    assert store.stream_configs()["cam"]["active"] is False  # back only on request (RestartStream)
    assert await registry(store).resume() == []
    await streams.manager.close()
