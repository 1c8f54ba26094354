"""Deleting and inspecting what memory holds (issue 8, item 10), end to end over real gRPC on loopback.

- `RemoveStream(delete_memory=True)` (`streams rm --delete-memory`) reaches a stream in any state: running,
  finished, failed, removed earlier, a WHIP stream whose sender deleted or left it, and one known only from
  memory after a restart; NOT_FOUND only when neither a server nor the memory holds it.
- `Memory.DeleteStream` (`memory rm`) refuses a stream that is live (FAILED_PRECONDITION) and deletes the rest;
  a service that runs no streams (the split deployment's reasoner) goes by the stored config's `active` flag.
- `memory ls` shows every stream memory holds, configured or not; `streams ls` lists streams while Redis is down,
  with the memory error beside them.

Servers are the all-in-one `App` (tests/test_app.py's helpers) on the embedded store or a real redis-server; the
CLI runs as a real `vcflash` process against them.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import aioice.ice
import grpc
import numpy as np
import pytest
from aiohttp import ClientSession
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from prometheus_client import CollectorRegistry

from hico import VideoChatFlash
from hico.checkpoint import make_tiny_checkpoint
from ingest.spec import StreamSpec
from ingest.webrtc import ice_host_addresses
from memory import ClipMeta, ClipRecord, MemoryStore, clip_vector, open_store
from reasoner.server import ReasonerService
from tests.test_app import (
    ANY,
    DONE_STATES,
    SIZE,
    TOKEN,
    App,
    LoopThread,
    Served,
    code_of,
    free_port,
    start_app,
    vcflash_command,
    wait_done,
    wait_for,
)
from tests.test_live import LOOPBACK, MovingSquare
from vcflash.client import Client
from vcflash.media import write_test_video
from vcflash.serve.settings import Settings

NOT_FOUND, FAILED_PRECONDITION = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> VideoChatFlash:
    return VideoChatFlash.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {n: write_test_video(root / f"{n}.mp4", seconds=int(n[:-1]), fps=25, size=SIZE) for n in ("12s", "2s")}


@pytest.fixture(scope="module")
def runner() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


def held(c: Client, name: str) -> int | None:
    """Clips memory holds of the stream; None when it holds nothing of it at all."""
    try:
        (stats,) = c.stats(name)
    except grpc.RpcError as e:
        assert e.code() == NOT_FOUND, e  # type: ignore[attr-defined]
        return None
    return stats.clips


def listed(c: Client) -> dict[str, str]:
    return {s.stream_id: s.state for s in c.list_streams()}


def indexed(served: Served, name: str, query: np.ndarray) -> bool:
    return bool(served.app.index.search(name, query, 1))


def memory_of(served: Served) -> MemoryStore:
    """Another connection to the App's memory (the same SQLite file or Redis database, the same secret key)."""
    s = served.settings
    return open_store(s.memory.redis_url, s.server.data_dir, s.memory.token_format, s.memory.secret_key)


def copy_clip(store: MemoryStore, source: str, stream_id: str, seq: int = 0) -> None:
    """Store a copy of `source`'s first clip as a clip of `stream_id` (a stream with no config)."""
    meta = store.clips(source)[0]
    tokens = store.tokens(source, [meta.seq])[0]
    store.put(ClipRecord(replace(meta, stream_id=stream_id, seq=seq), tokens, clip_vector(tokens)))


def record(stream_id: str, seq: int, dim: int = 32) -> ClipRecord:
    tokens = np.random.default_rng(seq).standard_normal((64, dim)).astype(np.float16)
    t = 1_800_000_000.0 + 4 * seq
    meta = ClipMeta(stream_id, seq, t, t + 4, 4.0 * seq, 4.0 * seq + 4, tuple(4.0 * seq + i for i in range(4)))
    return ClipRecord(meta, tokens, clip_vector(tokens))


def vcflash(served: Served, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `vcflash` command against the served App; stdin is not a terminal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VCFLASH_")}
    env |= {"VCFLASH_ADDRESS": served.address, "VCFLASH_API_TOKEN": TOKEN}
    return subprocess.run(
        [*vcflash_command(), *args], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
    )


def ok(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 0, (run.args, run.stdout, run.stderr)
    return run.stdout


def failed(run: subprocess.CompletedProcess[str], status: int, text: str) -> str:
    assert run.returncode == status and "Traceback" not in run.stderr, (run.args, run.stdout, run.stderr)
    assert text in run.stderr, run.stderr
    return run.stderr


# ---------------------------------------------------------------- RemoveStream(delete_memory)


@pytest.mark.parametrize("memory_settings", ["embedded", "redis"], indirect=True)
def test_rm_delete_memory_reaches_a_stream_in_any_state(
    runner: LoopThread, model: VideoChatFlash, videos: dict[str, Path], memory_settings: dict[str, Any], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video")
    first = start_app(runner, model, **memory_settings)
    try:
        c = first.client
        c.add_stream("live", str(videos["2s"]), fps=8, realtime=True, loop=True)  # a clip every 0.5 s, never ends
        for name in ("finished", "stopped", "kept"):
            c.add_stream(name, str(videos["12s"]), realtime=False)
        c.add_stream("failed", str(broken), realtime=False)
        for name in ("finished", "stopped", "kept"):
            wait_done(c, name)
        wait_for(lambda: c.stream("failed").state == "failed", "the broken source to fail")
        wait_for(lambda: c.stream("live").clips_stored >= 2, "live clips")
        c.remove_stream("stopped")  # stopped: this server no longer holds it, memory keeps it, inactive

        assert listed(c) == {"failed": "failed", "finished": "finished", "kept": "finished", "live": "running"}
        stats = {m.stream_id: m for m in c.stats()}
        assert [stats[n].clips for n in ("finished", "stopped", "kept", "failed")] == [3, 3, 3, 0]
        assert stats["live"].clips >= 2
        assert stats["stopped"].configured and not stats["stopped"].active
        assert stats["finished"].configured and not stats["finished"].active  # a file that played out
        assert stats["live"].configured and stats["live"].active
        queries = {n: first.app.store.vectors(n)[1][0] for n in ("live", "finished", "stopped")}
        assert all(indexed(first, n, q) for n, q in queries.items())

        for name in ("live", "finished", "stopped", "failed"):
            c.remove_stream(name, delete_memory=True)
            assert held(c, name) is None, name
            assert name not in listed(c)
            if name in queries:
                assert not indexed(first, name, queries[name]), name
        time.sleep(1.0)  # clips of `live` that were on their way when it was removed must not bring it back
        assert held(c, "live") is None and listed(c) == {"kept": "finished"}
        assert [m.stream_id for m in c.stats()] == ["kept"] and held(c, "kept") == 3  # the others untouched
        assert code_of(lambda: c.remove_stream("stopped", delete_memory=True)) == NOT_FOUND  # nothing left
        assert "live" not in first.app.store.stream_configs()  # nor resumed at the next start

        with memory_of(first) as store:  # what the next run finds: a stream with no config, one it cannot resume
            copy_clip(store, "kept", "stray")
            store.put_stream_config("orphan", {"source": "rtsp://cam/live", "fps": 100.0, "active": True})
            copy_clip(store, "kept", "orphan")
    finally:
        first.stop()

    second = start_app(runner, model, **memory_settings)  # max fps 30: orphan's config no longer passes
    try:
        c = second.client
        assert listed(c) == {}  # `kept` played out, `orphan` failed to resume: only memory knows them
        stats = {m.stream_id: m for m in c.stats()}
        assert {n: (m.clips, m.configured, m.active) for n, m in stats.items()} == {
            "kept": (3, True, False),
            "orphan": (1, True, True),
            "stray": (1, False, False),
        }
        c.remove_stream("orphan")  # without delete_memory: no longer resumed, memory stays
        assert (held(c, "orphan"), c.stats("orphan")[0].active) == (1, False)
        assert second.app.store.stream_configs()["orphan"]["active"] is False
        c.remove_stream("kept")  # already inactive: nothing to do, and no error
        assert code_of(lambda: c.remove_stream("stray")) == NOT_FOUND  # no config to deactivate...
        assert held(c, "stray") == 1  # ...and its clips stay

        for name in ("kept", "orphan", "stray"):
            c.remove_stream(name, delete_memory=True)
            assert held(c, name) is None, name
        assert c.stats() == [] and second.app.store.stream_configs() == {}
        for call in (lambda: c.remove_stream("nowhere", delete_memory=True), lambda: c.remove_stream("nowhere")):
            assert code_of(call) == NOT_FOUND
    finally:
        second.stop()


def test_rm_delete_memory_of_whip_streams_that_ended(
    runner: LoopThread, model: VideoChatFlash, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4=True, use_ipv6=True: list(LOOPBACK))
    settings = Settings.from_env(
        {},
        address="127.0.0.1:0",
        api_token=TOKEN,
        metrics_port=0,
        http_port=free_port(),
        max_wait_ms=10,
        data_dir=tmp_path,
        media_root=ANY,
    )

    async def start() -> App:
        app = App(settings, model, registry=CollectorRegistry())
        await app.start()
        return app

    served = Served(runner, runner.run(start()), settings)
    c = served.client

    async def publish(name: str, delete: bool) -> None:
        """A real aiortc sender over WHIP until two clips are stored; then it DELETEs its session, or just leaves."""
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver(MovingSquare(), direction="sendonly")
        url = f"http://127.0.0.1:{served.settings.server.http_port}/whip/{name}"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        try:
            with ice_host_addresses(LOOPBACK):
                await pc.setLocalDescription(await pc.createOffer())
            async with ClientSession() as http:
                sdp = {"Content-Type": "application/sdp"}
                async with http.post(f"{url}?fps=4", data=pc.localDescription.sdp, headers=headers | sdp) as r:
                    assert r.status == 201, await r.text()
                    answer = await r.text()
                await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
                deadline = time.monotonic() + 20
                while held(c, name) is None or held(c, name) < 2:
                    assert time.monotonic() < deadline, f"no clips of {name} stored"
                    await asyncio.sleep(0.1)
                if delete:
                    async with http.delete(url, headers=headers) as r:
                        assert r.status == 200, await r.text()
        finally:
            await pc.close()

    try:
        asyncio.run(publish("door", delete=True))  # the session is deleted: the stream is removed
        asyncio.run(publish("gate", delete=False))  # the sender leaves: the stream finishes, still listed
        wait_for(lambda: c.stream("gate").state in DONE_STATES, "the left WHIP stream to end")
        assert "door" not in listed(c)
        for name in ("door", "gate"):
            (stats,) = c.stats(name)
            assert stats.clips >= 2 and stats.configured and not stats.active, stats  # WHIP: never resumed
            c.remove_stream(name, delete_memory=True)
            assert held(c, name) is None and name not in listed(c), name
        time.sleep(0.5)
        assert c.stats() == []
    finally:
        served.stop()


# ---------------------------------------------------------------- Memory.DeleteStream and the CLI


@pytest.mark.parametrize("memory_settings", ["redis"], indirect=True)
def test_cli_memory_ls_and_rm(
    runner: LoopThread, model: VideoChatFlash, videos: dict[str, Path], memory_settings: dict[str, Any]
) -> None:
    served = start_app(runner, model, **memory_settings)
    try:
        c = served.client
        c.add_stream("live", str(videos["2s"]), fps=8, realtime=True, loop=True)
        c.add_stream("done", str(videos["12s"]), realtime=False)
        c.add_stream("old", str(videos["12s"]), realtime=False)
        for name in ("done", "old"):
            wait_done(c, name)
        wait_for(lambda: c.stream("live").clips_stored >= 1, "live clips")
        c.remove_stream("old")
        with memory_of(served) as store:
            copy_clip(store, "done", "stray")  # in memory, never configured (clips written by someone else)

        lines = {line.split("\t")[0]: line.split("\t") for line in ok(vcflash(served, "memory", "ls")).splitlines()}
        assert sorted(lines) == ["done", "live", "old", "stray"]
        assert lines["done"][1:3] == ["3 clips", f"{c.stats('done')[0].bytes / 1e6:.1f} MB"]
        assert lines["done"][4] == "retention 604800 s, 2000 MB"  # the defaults: 7 days, 2 GB
        states = {name: fields[-1] for name, fields in lines.items()}
        assert states == {"done": "finished", "live": "running", "old": "stopped", "stray": "not configured"}
        first, _, last = lines["done"][3].partition(" to ")
        assert datetime.fromisoformat(first) <= datetime.fromisoformat(last)

        rows = {r["stream_id"]: r for r in json.loads(ok(vcflash(served, "memory", "ls", "--json")))}
        done = c.stats("done")[0]
        assert rows["done"] | {"first_wall": None, "last_wall": None} == {
            "stream_id": "done",
            "clips": 3,
            "bytes": done.bytes,
            "first_wall": None,
            "last_wall": None,
            "retention_max_age_s": 604800.0,
            "retention_max_bytes": 2_000_000_000,
            "evicted_clips": 0,
            "configured": True,
            "active": False,
            "state": "finished",
        }
        first_wall = datetime.fromisoformat(rows["done"]["first_wall"]).timestamp()
        assert first_wall == pytest.approx(done.first.wall_start, abs=1e-3)
        assert (rows["stray"]["configured"], rows["stray"]["state"]) == (False, None)
        assert (rows["live"]["active"], rows["old"]["active"], rows["old"]["state"]) == (True, False, None)

        clips = ok(vcflash(served, "memory", "ls", "done")).splitlines()
        assert [line.split("\t")[0] for line in clips] == ["#0", "#1", "#2"]
        assert clips[1].split("\t")[1] == "media 4.0-8.0 s"
        (one,) = json.loads(ok(vcflash(served, "memory", "ls", "done", "--from", "4", "--to", "8", "--json")))
        assert (one["seq"], one["media_start"]) == (1, 4.0)
        by_wall = ok(vcflash(served, "memory", "ls", "done", "--from", one["wall_start"], "--to", one["wall_end"]))
        assert "#1" in [line.split("\t")[0] for line in by_wall.splitlines()]  # ISO times read on the wall clock
        assert ok(vcflash(served, "memory", "ls", "done", "--from", "2100-01-01T00:00")) == ""
        assert ok(vcflash(served, "memory", "ls", "done", "--to", "2000-01-01T00:00:00Z")) == ""
        failed(vcflash(served, "memory", "ls", "--from", "4"), 2, "name the stream")
        failed(vcflash(served, "memory", "ls", "nope"), 1, "NOT_FOUND")

        live_before = held(c, "live")
        failed(vcflash(served, "memory", "rm", "live", "--yes"), 1, "FAILED_PRECONDITION")
        assert held(c, "live") >= live_before and listed(c)["live"] == "running"  # refused: nothing deleted
        assert code_of(lambda: c.delete_memory("live")) == FAILED_PRECONDITION  # the client says the same
        failed(vcflash(served, "memory", "rm", "done"), 2, "pass --yes")  # no terminal to ask on
        assert held(c, "done") == 3

        for name, clips in (("done", 3), ("old", 3), ("stray", 1)):
            out = ok(vcflash(served, "memory", "rm", name, "--yes"))
            assert out.startswith(f"{name}: deleted {clips} clips ("), out
            assert held(c, name) is None
        assert "done" not in listed(c)  # a finished stream goes from the list with its memory
        failed(vcflash(served, "memory", "rm", "nope", "--yes"), 1, "NOT_FOUND")
        assert [line.split("\t")[0] for line in ok(vcflash(served, "memory", "ls")).splitlines()] == ["live"]

        assert ok(vcflash(served, "streams", "rm", "live", "--delete-memory")).strip() == "live: removed"
        assert (
            ok(vcflash(served, "memory", "ls")) == ""
            and json.loads(ok(vcflash(served, "memory", "ls", "--json"))) == []
        )
    finally:
        served.stop()


def test_a_memory_service_that_runs_no_streams_goes_by_the_active_flag(
    runner: LoopThread, model: VideoChatFlash, redis_server: Any, tmp_path: Path
) -> None:
    """The split deployment's reasoner serves Memory but cannot see which streams ingest runs."""
    settings = Settings.from_env(
        {},
        model="tiny",
        address="127.0.0.1:0",
        api_token=TOKEN,
        metrics_port=0,
        http_port=0,
        data_dir=tmp_path,
        redis_url=redis_server.fresh_url(),
    )
    with open_store(settings.memory.redis_url, tmp_path) as store:
        for name in ("cam", "door", "stray"):
            store.put(record(name, 0))
        store.put_stream_config("cam", StreamSpec("rtsp://cam/live").to_config(active=True))  # ingest resumes it
        store.put_stream_config("door", StreamSpec("whip://door", resume=False).to_config(active=False))

    async def start() -> ReasonerService:
        service = ReasonerService(settings, registry=CollectorRegistry())
        service.model = model
        await service.start()
        return service

    service = runner.run(start())
    served = Served(runner, service, settings)  # type: ignore[arg-type]  # a client on its port
    try:
        c = served.client
        stats = {m.stream_id: (m.clips, m.configured, m.active) for m in c.stats()}
        assert stats == {"cam": (1, True, True), "door": (1, True, False), "stray": (1, False, False)}
        rows = json.loads(ok(vcflash(served, "memory", "ls", "--json")))  # no Ingest service here: no states
        assert [(r["stream_id"], r["state"]) for r in rows] == [("cam", None), ("door", None), ("stray", None)]

        run = vcflash(served, "memory", "rm", "cam", "--yes")
        assert "streams rm --delete-memory cam" in failed(run, 1, "FAILED_PRECONDITION")
        assert held(c, "cam") == 1
        query = record("door", 0).vector
        assert service.index is not None and service.index.search("door", query, 1)
        c.delete_memory("door")
        c.delete_memory("stray")
        assert held(c, "door") is None and held(c, "stray") is None
        assert not service.index.search("door", query, 1)
        assert code_of(lambda: c.delete_memory("door")) == NOT_FOUND
        assert code_of(lambda: c.list_streams()) == grpc.StatusCode.UNIMPLEMENTED
    finally:
        served.stop()
        with open_store(settings.memory.redis_url, tmp_path) as store:
            for name in store.streams():
                store.delete_stream(name)


# ---------------------------------------------------------------- streams ls while Redis is down


def test_streams_ls_lists_the_streams_while_redis_is_down(
    runner: LoopThread, model: VideoChatFlash, videos: dict[str, Path], own_redis_server: Any, tmp_path: Path
) -> None:
    served = start_app(runner, model, data_dir=tmp_path, redis_url=own_redis_server.url)
    try:
        c = served.client
        c.add_stream("live", str(videos["2s"]), fps=8, realtime=True, loop=True)
        c.add_stream("done", str(videos["12s"]), realtime=False)
        wait_done(c, "done")
        wait_for(lambda: c.stream("live").clips_stored >= 1, "a live clip stored")
        assert all(s.memory_error == "" for s in c.list_streams())

        own_redis_server.stop()
        t0 = time.monotonic()
        streams = {s.stream_id: s for s in c.list_streams()}
        assert time.monotonic() - t0 < 5.0
        assert sorted(streams) == ["done", "live"]
        assert (streams["done"].state, streams["done"].frames_in, streams["done"].clips_stored) == ("finished", 300, 3)
        assert streams["live"].state == "running" and streams["live"].frames_in > 0
        assert all("memory unavailable" in s.memory_error for s in streams.values()), streams
        assert "memory unavailable" in c.stream("live").memory_error
        assert code_of(lambda: c.stats()) == grpc.StatusCode.UNAVAILABLE  # the memory itself still says so

        text, js, memory = (
            vcflash(served, *args) for args in (["streams", "ls"], ["streams", "ls", "--json"], ["memory", "ls"])
        )
        lines = ok(text).splitlines()
        assert [line.split("\t")[:2] for line in lines] == [["done", "finished"], ["live", "running"]]
        assert all("\tmemory error: memory unavailable" in line and "in memory" not in line for line in lines)
        rows = json.loads(ok(js))
        assert [(r["stream_id"], r["memory"]) for r in rows] == [("done", None), ("live", None)]
        assert all("memory unavailable" in r["memory_error"] for r in rows)
        failed(memory, 1, "UNAVAILABLE")

        own_redis_server.start()  # same port, same append-only file
        wait_for(lambda: all(s.memory_error == "" for s in c.list_streams()), "the memory error to clear")
        line = ok(vcflash(served, "streams", "ls")).splitlines()[0]
        assert "clips stored 3, in memory 3" in line and "memory error" not in line
        assert held(c, "done") == 3
    finally:
        served.stop()
