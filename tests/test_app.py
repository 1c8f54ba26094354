"""The all-in-one service (`vcflash.app.App`) end to end: real gRPC over loopback, real memory backends.

Each App runs on an event loop in a background thread, so tests call it with the synchronous
`vcflash.client.Client` as a user would. Redis tests start their own redis-server on a free port (never
anyone else's). Test videos are short and ingested with realtime=False, so a stream finishes in well
under a second; streams that must still be running use realtime=True at 8 fps (a clip every 0.5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from hico import VideoChatFlash
from hico.checkpoint import make_tiny_checkpoint
from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from vcflash.app import App
from vcflash.client import Client
from vcflash.media import write_test_video
from vcflash.serve.settings import Settings

TOKEN = "test-token-4f2a-9b7d1c"
ANY = Path("/")  # the test videos live in pytest's temp dirs: any local file may be a source here
QUESTION = "What moves across the screen?"
SIZE = (64, 48)
TIMINGS = {"select", "prompt", "prefill", "generate", "total"}
DONE_STATES = ("finished", "failed", "stopped")
T = TypeVar("T")


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopThread:
    """An event loop running in a daemon thread; `run` executes a coroutine on it and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="app-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Served:
    """A started App with a client on it."""

    runner: LoopThread
    app: App
    settings: Settings
    client: Client = field(init=False)
    stopped: bool = False

    def __post_init__(self) -> None:
        self.client = Client(self.address, TOKEN, timeout_s=10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.client.close()
            self.runner.run(self.app.stop(grace_s=1.0))


def start_app(runner: LoopThread, model: VideoChatFlash, **settings: Any) -> Served:
    s = Settings.from_env(
        {},
        model="tiny",
        address="127.0.0.1:0",
        api_token=TOKEN,
        metrics_port=0,
        **{"media_root": ANY, "http_port": 0} | settings,
    )

    async def start() -> App:
        app = App(s, model, registry=CollectorRegistry())
        await app.start()
        return app

    return Served(runner, runner.run(start()), s)


def wait_for(check: Callable[[], T], what: str, timeout_s: float = 20.0, every_s: float = 0.05) -> T:
    """Poll `check` until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


@contextlib.contextmanager
def serving_stream(
    model: VideoChatFlash, video: Path, data_dir: Path, stream: str, **settings: Any
) -> Iterator[tuple[Served, str]]:
    """An App on a free HTTP port whose stream `stream` has stored every clip of `video` (at 1 fps); yields it and
    its HTTP base URL, and stops it afterwards."""
    port = free_port()
    runner = LoopThread()
    s = start_app(runner, model, http_port=port, data_dir=data_dir, **settings)
    try:
        s.client.add_stream(stream, str(video), fps=1, realtime=False)
        wait_done(s.client, stream)
        yield s, f"http://127.0.0.1:{port}"
    finally:
        s.stop()
        runner.close()


def wait_done(client: Client, name: str, timeout_s: float = 20.0) -> pb.StreamStatus:
    """The stream's status once its source ended and every clip it emitted is stored."""
    last: list[pb.StreamStatus] = []

    def done() -> pb.StreamStatus | None:
        last[:] = [client.stream(name)]
        s = last[0]
        return s if s.state in DONE_STATES and s.clips_stored == s.clips_emitted else None

    try:
        return wait_for(done, f"stream {name} to finish", timeout_s)
    except AssertionError as e:
        raise AssertionError(f"{e}; last status: {last}") from None


def ask(client: Client, streams: list[str], question: str = QUESTION, **kw: Any) -> tuple[list[str], pb.AskResult]:
    """The text pieces and the one final result; checks the event order."""
    events = list(client.ask(streams, question, **{"max_new_tokens": 8, **kw}))
    texts = [e for e in events if isinstance(e, str)]
    results = [e for e in events if not isinstance(e, str)]
    assert len(results) == 1 and events[-1] is results[0], events
    assert texts, "no text before the result"
    return texts, results[0]


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    return e.value.code()  # type: ignore[attr-defined]


def seqs(evidence: Any) -> list[int]:
    return [e.clip.seq for e in evidence]


def dropped(status: pb.StreamStatus) -> int:
    """Frames lost between sampling and the clip queue (decode errors never were sampled frames)."""
    return sum(n for reason, n in status.frames_dropped.items() if reason != "decode_error")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> VideoChatFlash:
    return VideoChatFlash.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {
        name: write_test_video(root / f"{name}.mp4", seconds=seconds, fps=25, size=SIZE)
        for name, seconds in (("20s", 20), ("12s", 12), ("4s", 4), ("2s", 2))
    }


@pytest.fixture(scope="module")
def runner() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture(scope="module", params=["embedded", "redis"])
def served(
    request: pytest.FixtureRequest,
    runner: LoopThread,
    model: VideoChatFlash,
    videos: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    """An App on one backend with two finished file streams: cam (20 s: 5 clips) and cam2 (12 s: 3 clips)."""
    redis_url = request.getfixturevalue("redis_server").fresh_url() if request.param == "redis" else None
    s = start_app(runner, model, data_dir=tmp_path_factory.mktemp("data"), redis_url=redis_url)
    try:
        s.client.add_stream("cam", str(videos["20s"]), fps=1, realtime=False)
        s.client.add_stream("cam2", str(videos["12s"]), fps=1, realtime=False)
        wait_done(s.client, "cam")
        wait_done(s.client, "cam2")
        yield s
    finally:
        s.stop()


# ---------------------------------------------------------------- 1. the happy path


def test_streams_are_ingested_counted_and_listed(served: Served, videos: dict[str, Path]) -> None:
    c = served.client
    streams = {s.stream_id: s for s in c.list_streams()}
    cam = streams["cam"]
    assert cam.source == str(videos["20s"]) and cam.fps == 1 and cam.state == "finished" and not cam.error
    assert (cam.frames_in, cam.frames_sampled, cam.clips_emitted, cam.clips_stored) == (500, 20, 5, 5)
    assert set(cam.frames_dropped) >= {"queue_full", "loop_busy", "incomplete_clip", "discontinuity"}
    assert all(n == 0 for n in cam.frames_dropped.values()), dict(cam.frames_dropped)
    assert cam.last_media_time == pytest.approx(19.0) and cam.last_wall_time > 0
    assert c.stream("cam") == cam
    assert (streams["cam2"].clips_stored, streams["cam2"].frames_sampled) == (3, 12)

    assert [m.seq for m in c.clips("cam", 4, 12)] == [1, 2]
    clips = c.clips("cam")
    assert [m.seq for m in clips] == [0, 1, 2, 3, 4]
    assert [(m.media_start, m.media_end) for m in clips] == [(4.0 * i, 4.0 * i + 4) for i in range(5)]
    assert all(list(m.frame_media_times) == [m.media_start + k for k in range(4)] for m in clips)
    assert [m.seq for m in c.clips("cam", limit=2)] == [0, 1]
    wall = c.clips("cam", clips[1].wall_start, clips[3].wall_start, wall_clock=True)
    assert [m.seq for m in wall] == [1, 2]

    (stats,) = c.stats("cam")
    assert stats.clips == 5 and stats.bytes > 0 and stats.first.seq == 0 and stats.last.seq == 4
    assert {m.stream_id for m in c.stats()} == {"cam", "cam2"}


def test_ask_streams_text_then_one_result_with_the_evidence(served: Served) -> None:
    texts, result = ask(served.client, ["cam"], max_new_tokens=12)
    assert result.answer == "".join(texts).strip()
    assert seqs(result.evidence) == [0, 1, 2, 3, 4]
    starts = [e.clip.media_start for e in result.evidence]
    assert starts == sorted(starts) and all(e.clip.stream_id == "cam" and not e.retrieved for e in result.evidence)
    assert (result.frames, result.visual_tokens) == (20, 320)
    assert result.prompt_tokens > 320 and 1 <= result.new_tokens <= 12
    assert result.duration_s == pytest.approx(20.0) and not result.note
    assert TIMINGS <= set(result.timings_s) and all(v >= 0 for v in result.timings_s.values())


def test_retrieval_fills_a_small_budget_with_retrieved_clips(served: Served) -> None:
    _, result = ask(served.client, ["cam"], max_frames=8, retrieval=True)
    assert len(result.evidence) == 2 and result.frames == 8 and result.visual_tokens == 128
    assert any(e.retrieved for e in result.evidence) and seqs(result.evidence) == sorted(seqs(result.evidence))
    _, uniform = ask(served.client, ["cam"], max_frames=8, selection="uniform")
    assert len(uniform.evidence) == 2 and not any(e.retrieved for e in uniform.evidence)


def test_an_empty_range_answers_that_there_is_no_video(served: Served) -> None:
    texts, result = ask(served.client, ["cam"], start=100.0, end=200.0)
    assert result.answer == "".join(texts) == "There is no video from cam in that time range."
    assert result.note and not result.evidence and (result.frames, result.visual_tokens) == (0, 0)


def test_one_ask_over_two_streams_cites_both(served: Served) -> None:
    _, one = ask(served.client, ["cam"])
    _, two = ask(served.client, ["cam", "cam2"])
    by_stream = {sid: [e.clip.seq for e in two.evidence if e.clip.stream_id == sid] for sid in ("cam", "cam2")}
    assert by_stream == {"cam": [0, 1, 2, 3, 4], "cam2": [0, 1, 2]}
    assert (two.frames, two.visual_tokens) == (32, 512)
    assert two.prompt_tokens > one.prompt_tokens


# ---------------------------------------------------------------- 6. exactness through the service


def test_ask_without_anchors_equals_the_offline_model(served: Served, model: VideoChatFlash) -> None:
    n = 24
    _, result = ask(served.client, ["cam"], max_new_tokens=n, anchors=False)
    clips = served.client.clips("cam")
    tokens = served.app.store.tokens("cam", [m.seq for m in clips])
    offline = model.answer(
        torch.from_numpy(tokens).float(),
        QUESTION,
        duration_s=clips[-1].media_end - clips[0].media_start,
        max_new_tokens=n,
    )
    assert result.answer == offline.text
    assert (result.new_tokens, result.prompt_tokens, result.visual_tokens, result.frames) == (
        len(offline.token_ids),
        offline.prompt_tokens,
        offline.visual_tokens,
        offline.num_frames,
    )


# ---------------------------------------------------------------- 2. status codes


def test_unknown_streams_are_not_found(served: Served) -> None:
    c = served.client
    assert code_of(lambda: c.ask(["nope"], QUESTION)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: c.ask(["cam", "nope"], QUESTION)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: c.stream("nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: c.remove_stream("nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: c.clips("nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: c.stats("nope")) == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "kw",
    [
        {"question": "   "},
        {"question": "x" * 10_000},
        {"start": 12.0, "end": 4.0},
        {"max_frames": 6},
        {"dropout": "bogus:1,2:1,0.5"},
        {"dropout": "nonsense"},
    ],
    ids=["empty question", "10k question", "inverted range", "max_frames 6", "bad dropout", "unknown dropout"],
)
def test_bad_questions_are_invalid_arguments(served: Served, kw: dict[str, Any]) -> None:
    kw = dict(kw)  # the parameter is shared by both backends
    question = kw.pop("question", QUESTION)
    call = lambda: served.client.ask(["cam"], question, **kw)  # noqa: E731
    assert code_of(call) == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_stream_requests_are_invalid_or_already_exist(served: Served, videos: dict[str, Path]) -> None:
    c, video = served.client, str(videos["2s"])
    assert code_of(lambda: c.add_stream("cam", video, realtime=False)) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: c.add_stream("bad name!", video)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: c.add_stream("fast", video, fps=100)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: c.add_stream("empty", "")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: c.clips("cam", 12, 4)) == grpc.StatusCode.INVALID_ARGUMENT
    # sources that would turn the server against its host (issue 8): refused before anything opens
    hostile = [
        "concat:/etc/passwd|/etc/hostname",
        "gopher://127.0.0.1:6379/_%0d%0aFLUSHALL",
        "pipe:0",
        "file:/etc/passwd",
        "rtsp://127.0.0.1:6379/x\r\nFLUSHALL",
    ]
    for i, source in enumerate(hostile):
        assert code_of(lambda: c.add_stream(f"evil{i}", source)) == grpc.StatusCode.INVALID_ARGUMENT, source  # noqa: B023
    assert {s.stream_id for s in c.list_streams()} >= {"cam", "cam2"}
    assert not {"bad name!", "fast", "empty", "evil0"} & {s.stream_id for s in c.list_streams()}


def every_method(channel: grpc.Channel) -> dict[str, Callable[..., object]]:
    """One call of each method of the App's three services, taking the call's metadata."""
    ingest, memory, reasoner = (pb_grpc.IngestStub(channel), pb_grpc.MemoryStub(channel), pb_grpc.ReasonerStub(channel))
    ask = pb.AskRequest(stream_ids=["cam"], question=QUESTION, generation=pb.Generation(max_new_tokens=1))
    return {
        "Ingest.AddStream": lambda md: ingest.AddStream(
            pb.AddStreamRequest(stream_id="intruder", source="x"), metadata=md
        ),
        "Ingest.RemoveStream": lambda md: ingest.RemoveStream(pb.RemoveStreamRequest(stream_id="cam"), metadata=md),
        "Ingest.ListStreams": lambda md: ingest.ListStreams(pb.ListStreamsRequest(), metadata=md),
        "Ingest.GetStream": lambda md: ingest.GetStream(pb.GetStreamRequest(stream_id="cam"), metadata=md),
        "Memory.ListClips": lambda md: memory.ListClips(pb.ListClipsRequest(stream_id="cam"), metadata=md),
        "Memory.GetStats": lambda md: memory.GetStats(pb.GetStatsRequest(), metadata=md),
        "Reasoner.Ask": lambda md: list(reasoner.Ask(ask, metadata=md)),
    }


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)],
    ids=["missing", "wrong", "no scheme"],
)
def test_every_service_needs_the_token(served: Served, metadata: tuple[tuple[str, str], ...]) -> None:
    with grpc.insecure_channel(served.address) as channel:
        for name, call in every_method(channel).items():
            assert code_of(lambda call=call: call(metadata)) == grpc.StatusCode.UNAUTHENTICATED, name
    names = {s.stream_id for s in served.client.list_streams()}
    assert "cam" in names and "intruder" not in names  # nothing ran behind the refusals


def test_health_and_reflection_need_no_token(served: Served) -> None:
    with grpc.insecure_channel(served.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "vcflash.v1.Reasoner", "vcflash.v1.Ingest", "vcflash.v1.Memory"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        assert code_of(lambda: health.Check(health_pb2.HealthCheckRequest(service="vcflash.v1.Nope"), timeout=5)) == (
            grpc.StatusCode.NOT_FOUND
        )
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(
            reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        )
        listed = {s.name for s in replies[0].list_services_response.service}
        assert {"vcflash.v1.Ingest", "vcflash.v1.Memory", "vcflash.v1.Reasoner", "grpc.health.v1.Health"} <= listed


def test_a_message_over_the_limit_is_refused(
    runner: LoopThread, model: VideoChatFlash, tmp_path: Path, videos: dict[str, Path]
) -> None:
    served = start_app(runner, model, data_dir=tmp_path, max_message_bytes=64 * 1024)
    try:
        served.client.add_stream("cam", str(videos["2s"]), realtime=False)
        assert code_of(lambda: served.client.ask(["cam"], "x" * 100_000)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert code_of(lambda: served.client.add_stream("big", "y" * 100_000)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert served.client.stream("cam").stream_id == "cam"  # the server is fine afterwards
    finally:
        served.stop()


# ---------------------------------------------------------------- 3. credentials


def test_credentials_in_a_source_never_come_back(
    served: Served, videos: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    c = served.client
    added = [
        c.add_stream("cred", "rtsp://user:secret@127.0.0.1:9/x", realtime=False),
        c.add_stream("cred2", "rtsp://127.0.0.1:9/x?token=secret&a=1", realtime=False),
        c.add_stream("side", str(videos["12s"]), realtime=False),
    ]
    seen = [str(s) for s in added]

    def broken(name: str) -> pb.StreamStatus | None:
        """The stream's status once it gave up (failed) or waits to retry (reconnecting), saying why."""
        seen.append(str(c.list_streams()))
        s = c.stream(name)
        seen.append(str(s))
        return s if s.state in ("failed", "reconnecting") and s.error else None

    try:
        failed = {name: wait_for(lambda name=name: broken(name), f"{name} to fail") for name in ("cred", "cred2")}
        assert failed["cred"].source == "rtsp://***@127.0.0.1:9/x"
        assert failed["cred2"].source == "rtsp://127.0.0.1:9/x?token=***&a=1"
        side = wait_done(c, "side")
        assert (side.state, side.clips_stored) == ("finished", 3)
        _, result = ask(c, ["side"])
        assert seqs(result.evidence) == [0, 1, 2]
        seen.append(str(c.list_streams()))
        assert not any("secret" in text for text in seen), [t for t in seen if "secret" in t]
        assert "secret" not in caplog.text
    finally:
        for name in ("cred", "cred2", "side"):
            c.remove_stream(name, delete_memory=True)


# ---------------------------------------------------------------- 4. restart


@pytest.mark.parametrize("memory_settings", ["embedded", "redis"], indirect=True)
def test_a_restart_keeps_memory_and_resumes_the_running_streams(
    runner: LoopThread, model: VideoChatFlash, videos: dict[str, Path], memory_settings: dict[str, Any]
) -> None:
    first = start_app(runner, model, **memory_settings)
    try:
        c = first.client
        c.add_stream("live", str(videos["2s"]), fps=8, realtime=True, loop=True)  # a clip every 0.5 s, never ends
        for name in ("done", "kept", "gone"):
            c.add_stream(name, str(videos["12s"]), realtime=False)
        for name in ("done", "kept", "gone"):
            wait_done(c, name)
        before = {name: ask(c, [name], anchors=False)[1] for name in ("done", "kept")}
        c.remove_stream("kept")  # not resumed, memory kept
        c.remove_stream("gone", delete_memory=True)
        wait_for(lambda: c.stream("live").clips_stored >= 2, "live clips")
        stats = {name: c.stats(name) for name in ("done", "kept")}
    finally:
        first.stop()
    restarted_at = time.time()

    second = start_app(runner, model, **memory_settings)
    try:
        c = second.client
        assert [s.stream_id for s in c.list_streams()] == ["live"]  # a file that played out is not replayed
        time.sleep(0.3)  # a replay, had there been one, would have stored clips by now
        for name in ("done", "kept"):
            assert c.stats(name) == stats[name], name
            _, after = ask(c, [name], anchors=False)
            assert after.answer == before[name].answer and list(after.evidence) == list(before[name].evidence)
            assert seqs(after.evidence) == [0, 1, 2]
        for call in (lambda: c.clips("gone"), lambda: c.stats("gone"), lambda: c.ask(["gone"], QUESTION)):
            assert code_of(call) == grpc.StatusCode.NOT_FOUND

        wait_for(lambda: c.stream("live").clips_stored >= 1, "clips of the resumed stream")
        clips = c.clips("live")
        old = [m.seq for m in clips if m.wall_start < restarted_at]
        new = [m.seq for m in clips if m.wall_start >= restarted_at]
        assert len(old) >= 2 and new and min(new) == max(old) + 1, (old, new)
        assert sorted(old + new) == list(range(len(clips)))  # no gap, no duplicate
    finally:
        second.stop()


# ---------------------------------------------------------------- more stream lifecycle


def test_a_re_added_stream_counts_only_its_own_clips(served: Served, videos: dict[str, Path]) -> None:
    c = served.client
    c.add_stream("again", str(videos["12s"]), realtime=False)
    wait_done(c, "again")
    c.remove_stream("again", delete_memory=True)
    c.add_stream("again", str(videos["12s"]), realtime=False)
    try:
        wait_done(c, "again")  # finished can come before the encoder has stored its last clips
        time.sleep(0.5)  # any clip wrongly counted to it would be in by now
        s = c.stream("again")
        assert (s.clips_emitted, s.clips_stored) == (3, 3)
    finally:
        c.remove_stream("again", delete_memory=True)


def test_delete_memory_of_a_running_stream_leaves_nothing_behind(
    runner: LoopThread, model: VideoChatFlash, videos: dict[str, Path], tmp_path: Path
) -> None:
    # A long encoder batching wait makes the window deterministic: clips wait up to 1.5 s for company.
    served = start_app(runner, model, data_dir=tmp_path, max_batch=64, max_wait_ms=1500)
    try:
        c = served.client
        c.add_stream("brief", str(videos["4s"]), fps=8, realtime=True)
        wait_for(lambda: c.stream("brief").clips_emitted >= 1, "a clip handed to the encoder")
        c.remove_stream("brief", delete_memory=True)
        encoded = lambda: served.app.registry.get_sample_value("vcflash_encoder_clips_total", {"stream": "brief"})  # noqa: E731
        deadline = time.monotonic() + 5.0  # the encoder's batch waits up to 1.5 s, then is encoded and stored
        while not encoded() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert code_of(lambda: c.clips("brief")) == grpc.StatusCode.NOT_FOUND
    finally:
        served.stop()


# ---------------------------------------------------------------- 5. Redis going away


def test_redis_going_away_is_unavailable_and_loses_no_clip(
    runner: LoopThread, model: VideoChatFlash, videos: dict[str, Path], own_redis_server: Any, tmp_path: Path
) -> None:
    served = start_app(runner, model, data_dir=tmp_path, redis_url=own_redis_server.url)
    try:
        c = served.client
        c.add_stream("a", str(videos["12s"]), realtime=False)
        wait_done(c, "a")
        _, before = ask(c, ["a"])
        c.add_stream("live", str(videos["4s"]), fps=8, realtime=True)  # 8 clips over 4 s
        wait_for(lambda: c.stream("live").clips_stored >= 1, "a live clip stored")

        own_redis_server.stop()
        stored_when_down = c.stream("live").clips_stored
        for call in (lambda: c.ask(["a"], QUESTION), lambda: c.clips("a"), lambda: c.stats("a")):
            t0 = time.monotonic()
            assert code_of(call) == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - t0 < 5.0
        assert c.stream("live").state in ("running", "finished")  # ingest does not depend on the memory
        wait_for(lambda: c.stream("live").clips_emitted >= stored_when_down + 2, "clips made while Redis is down")
        assert c.stream("live").clips_stored == stored_when_down

        own_redis_server.start()  # same port, same append-only file
        _, after = ask(c, ["a"])  # the same App, no restart
        assert list(after.evidence) == list(before.evidence)

        live = wait_done(c, "live", timeout_s=30)
        assert live.state == "finished" and live.clips_emitted > stored_when_down
        assert [m.seq for m in c.clips("live")] == list(range(live.clips_stored))
        assert c.stats("live")[0].clips == live.clips_stored == live.clips_emitted
        # every sampled frame is accounted for (nothing is pending once the stream finished)
        assert live.frames_sampled == 4 * live.clips_emitted + dropped(live), live
    finally:
        served.stop()


# ---------------------------------------------------------------- 7. the CLI against `vcflash up`


def vcflash_command() -> list[str]:
    script = Path(sys.executable).parent / "vcflash"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vcflash.cli"]


@dataclass
class Cli:
    env: dict[str, str]
    cwd: Path

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*vcflash_command(), *args],
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run_all(self, *commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
        """Run commands concurrently (each costs a Python start-up), in order of the arguments."""
        procs = [self.start(*args) for args in commands]
        out = []
        for args, proc in zip(commands, procs, strict=True):
            stdout, stderr = proc.communicate(timeout=60)
            out.append(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
        return out


def check_ok(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 0, (run.args, run.stdout, run.stderr)
    return run.stdout


def check_error(run: subprocess.CompletedProcess[str], code: str) -> str:
    assert run.returncode == 1, (run.args, run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith(f"vcflash: error: {code}"), run.stderr
    return line


@pytest.fixture(scope="module")
def vcflash_up(tmp_path_factory: pytest.TempPathFactory, model: VideoChatFlash) -> Iterator[tuple[Cli, Client]]:
    """The real `vcflash up` command on a free port, with the tiny checkpoint; stopped by SIGTERM at the end."""
    tmp = tmp_path_factory.mktemp("up")
    checkpoint = make_tiny_checkpoint(tmp / "tiny")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VCFLASH_")} | {
        "VCFLASH_HTTP_PORT": "0",
        "VCFLASH_MEDIA_ROOT": "/",
        "VCFLASH_DATA_DIR": str(tmp / "data"),
        "VCFLASH_METRICS_PORT": "0",
        "VCFLASH_API_TOKEN": TOKEN,
        "VCFLASH_ADDRESS": f"127.0.0.1:{port}",
        "VCFLASH_CACHE": str(tmp / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    cli = Cli(env, tmp)
    up = cli.start("up", "--model", str(checkpoint), "--port", str(port))
    client = Client(f"127.0.0.1:{port}", TOKEN, timeout_s=10)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                assert up.poll() is None, up.communicate()
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                except grpc.RpcError:
                    return False
                return reply.status == health_pb2.HealthCheckResponse.SERVING

            wait_for(serving, "vcflash up to serve", timeout_s=60, every_s=0.1)
        yield cli, client
        client.close()
        up.send_signal(signal.SIGTERM)
        _, stderr = up.communicate(timeout=20)
        assert up.returncode == 0, stderr
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()


def test_the_cli_manages_streams_and_asks(vcflash_up: tuple[Cli, Client], videos: dict[str, Path]) -> None:
    cli, client = vcflash_up
    video = str(videos["20s"])
    add, missing_ask, missing_rm, wrong_token = cli.run_all(
        ["streams", "add", "cam", video, "--fast"],
        ["ask-live", "--stream", "nope", QUESTION],
        ["streams", "rm", "nope"],
        ["streams", "ls", "--token", "wrong"],
    )
    assert check_ok(add).startswith("cam: ") and f"({video}, 1 fps)" in add.stdout
    assert "nope" in check_error(missing_ask, "NOT_FOUND")
    check_error(missing_rm, "NOT_FOUND")
    check_error(wrong_token, "UNAUTHENTICATED")

    wait_done(client, "cam")
    ls, answer, empty = cli.run_all(
        ["streams", "ls"],
        ["ask-live", "--stream", "cam", QUESTION, "--max-new-tokens", "8"],
        ["ask-live", "--stream", "cam", QUESTION, "--from", "100", "--to", "200"],
    )
    (line,) = check_ok(ls).splitlines()
    fields = line.split("\t")
    assert fields[:4] == ["cam", "finished", video, "1 fps"], line
    assert "frames in 500, sampled 20, dropped 0" in line and "clips stored 5, in memory 5" in line

    out = check_ok(answer)
    assert "evidence: 5 clips, 20 frames, 320 visual tokens" in out
    evidence = [ln.strip() for ln in out.splitlines() if ln.startswith("  cam #")]
    assert [ln.split()[1] for ln in evidence] == ["#0", "#1", "#2", "#3", "#4"], out
    assert "media 0.0-4.0 s" in evidence[0] and "UTC" in evidence[0]

    out = check_ok(empty)
    assert "There is no video from cam in that time range." in out and "evidence: 0 clips" in out

    (rm,) = cli.run_all(["streams", "rm", "cam"])
    assert check_ok(rm).strip() == "cam: removed"
    assert client.list_streams() == [] and client.stats("cam")[0].clips == 5
