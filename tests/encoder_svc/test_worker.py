"""The encoder loop never dies: bad clips are rejected and counted, store errors of any kind are retried with the
service NOT_SERVING meanwhile, and it recovers by itself."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from encoder_svc.server import EncoderServicer
from encoder_svc.worker import EncoderMetrics, EncoderWorker
from hico import VideoChatFlash
from hico.checkpoint import make_tiny_checkpoint
from memory import EmbeddedStore
from memory.records import ClipRecord
from memory.store import MemoryStore
from protos.clip import Clip, clip_from_request, clip_request
from protos.vcflash.v1 import vcflash_pb2 as pb
from vcflash.serve.errors import Invalid
from vcflash.serve.lifecycle import Service
from vcflash.serve.settings import Backoff, EncoderSettings, Settings

FAST = EncoderSettings(max_wait_ms=20.0, store_retry=Backoff(initial_s=0.05, max_s=0.2, jitter=0.0))
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> VideoChatFlash:
    return VideoChatFlash.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


def clip(seq: int, stream: str = "cam", size: int = 32) -> Clip:
    frames = np.random.default_rng(seq).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    times = tuple(4.0 * seq + i for i in range(4))
    return Clip(stream, seq, frames, times, tuple(1000.0 + t for t in times), 1.0)


def failed(metrics: EncoderMetrics, reason: str) -> float:
    return metrics.failed.labels(reason)._value.get()


async def until(check: Callable[[], Any], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.02)


class Harness:
    """A worker over `store` with every callback recorded."""

    def __init__(self, model: VideoChatFlash, store: MemoryStore, on_health: Any = None) -> None:
        self.queue: asyncio.Queue[Clip] = asyncio.Queue()
        self.stored: list[tuple[str, int]] = []
        self.failures: list[tuple[str, int, str]] = []
        self.health: list[bool] = []
        self.metrics = EncoderMetrics(CollectorRegistry())

        async def record_health(ok: bool, reason: str) -> None:
            self.health.append(ok)
            if on_health is not None:
                await on_health(ok, reason)

        self.worker = EncoderWorker(
            model,
            store,
            self.queue,
            settings=FAST,
            metrics=self.metrics,
            on_stored=lambda s, q: self.stored.append((s, q)),
            on_failed=lambda s, q, e: self.failures.append((s, q, e)),
            on_health=record_health,
        )


class WorkerService(Service):
    """A real gRPC server with health, running only the encoder loop."""

    name = "encoder-test"

    def __init__(self, settings: Settings, run: Callable[[], Any]) -> None:
        super().__init__(settings, CollectorRegistry())
        self.run = run

    async def setup(self) -> tuple[list[Any], list[Any]]:
        return [], [self.run()]


@pytest.mark.asyncio
async def test_a_locked_sqlite_database_is_waited_out_with_health_not_serving(
    model: VideoChatFlash, tmp_path: Path
) -> None:
    store = EmbeddedStore(tmp_path / "memory.sqlite3", busy_timeout_s=0.1)
    settings = Settings.from_env({}, address="127.0.0.1:0", api_token="t0ken-for-encoder-tests", metrics_port=0)
    service: WorkerService | None = None

    async def hook(ok: bool, reason: str) -> None:
        assert service is not None
        await service.set_healthy(ok, reason)

    h = Harness(model, store, hook)
    service = WorkerService(settings, h.worker.run)
    port = await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)

    async def status() -> int:
        return (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)).status

    blocker = sqlite3.connect(tmp_path / "memory.sqlite3", isolation_level=None)
    try:
        assert await status() == SERVING
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database
        for seq in range(5):
            h.queue.put_nowait(clip(seq))
        await until(lambda: h.health == [False], "the worker to notice the lock")
        assert await status() == NOT_SERVING
        await asyncio.sleep(1.5)  # a few seconds of lock, retried meanwhile
        assert h.stored == [] and await status() == NOT_SERVING
        blocker.execute("COMMIT")
        await until(lambda: len(h.stored) == 5, "all clips stored after the lock")
        assert h.health == [False, True] and await status() == SERVING
        assert [m.seq for m in store.clips("cam")] == [0, 1, 2, 3, 4]  # none lost
        assert h.failures == [] and h.metrics.retries._value.get() >= 2
        h.queue.put_nowait(clip(5))  # and it keeps going
        await until(lambda: len(h.stored) == 6, "a later clip")
    finally:
        blocker.close()
        await channel.close()
        await service.stop(grace_s=0.5)
        store.close()


class Flaky(MemoryStore):
    """The real store behind one error of each kind given, then normal."""

    def __init__(self, store: EmbeddedStore, errors: list[BaseException]) -> None:
        self.store, self.errors = store, errors

    def put(self, record: ClipRecord) -> bool:
        if self.errors:
            raise self.errors.pop(0)
        return self.store.put(record)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


for _name in ("clips", "tokens", "vectors", "streams", "stats", "delete_stream", "set_retention"):
    setattr(Flaky, _name, lambda self, *a, _n=_name, **k: getattr(self.store, _n)(*a, **k))
for _name in ("enforce_retention", "put_stream_config", "stream_configs", "close"):
    setattr(Flaky, _name, lambda self, *a, _n=_name, **k: getattr(self.store, _n)(*a, **k))
Flaky.__abstractmethods__ = frozenset()


class ResponseError(Exception):
    """Like redis.exceptions.ResponseError: not a connection error."""


@pytest.mark.asyncio
async def test_a_non_connection_store_error_is_retried_and_a_permanent_one_rejects_the_clip(
    model: VideoChatFlash, tmp_path: Path
) -> None:
    real = EmbeddedStore(tmp_path / "memory.sqlite3")
    oom = ResponseError("OOM command not allowed when used memory > 'maxmemory'.")
    h = Harness(model, Flaky(real, [oom]))
    task = asyncio.create_task(h.worker.run())
    try:
        h.queue.put_nowait(clip(0))
        await until(lambda: h.stored == [("cam", 0)], "the clip stored after one OOM")
        assert h.health == [False, True] and h.metrics.retries._value.get() == 1
        # A different token shape for the same stream: the store refuses that clip for good (ValueError).
        h.worker.store = Flaky(real, [ValueError("stream 'cam' holds (64, 8) tokens, clip 1 has (64, 9)")])
        h.queue.put_nowait(clip(1))
        h.queue.put_nowait(clip(2))
        await until(lambda: len(h.stored) == 2, "the clip after the rejected one")
        assert h.stored[-1] == ("cam", 2) and [f[:2] for f in h.failures] == [("cam", 1)]
        assert "store: ValueError" in h.failures[0][2] and failed(h.metrics, "store") == 1
        assert h.health == [False, True] and not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        real.close()


@pytest.mark.asyncio
async def test_a_clip_that_breaks_encoding_is_rejected_and_the_rest_are_stored(
    model: VideoChatFlash, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = EmbeddedStore(tmp_path / "memory.sqlite3")
    h = Harness(model, store)
    preprocess = model.preprocess

    def fragile(frames: np.ndarray) -> Any:
        if frames[0, 0, 0, 0] == 7:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return preprocess(frames)

    monkeypatch.setattr(model, "preprocess", fragile)
    poison = clip(1)
    poison.frames.flags.writeable = True
    poison.frames[0, 0, 0, 0] = 7
    task = asyncio.create_task(h.worker.run())
    try:
        for c in (clip(0), poison, clip(2)):  # one batch: the batch fails, then each clip on its own
            h.queue.put_nowait(c)
        await until(lambda: len(h.stored) + len(h.failures) == 3, "the batch handled")
        assert sorted(h.stored) == [("cam", 0), ("cam", 2)]
        assert [f[:2] for f in h.failures] == [("cam", 1)] and failed(h.metrics, "encode") == 1
        h.queue.put_nowait(poison)  # alone, too
        h.queue.put_nowait(clip(3))
        await until(lambda: ("cam", 3) in h.stored, "a later clip")
        assert failed(h.metrics, "encode") == 2 and h.health == [] and not task.done()
        assert [m.seq for m in store.clips("cam")] == [0, 2, 3]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        store.close()


def test_bad_clips_are_refused_at_the_boundary() -> None:
    good = clip_request(clip(0))
    assert clip_from_request(good, 4096).seq == 0
    bad = [
        pb.EncodeClipRequest(**{**_fields(good), "fps": float("nan")}),
        pb.EncodeClipRequest(**{**_fields(good), "fps": 0.0}),
        pb.EncodeClipRequest(**{**_fields(good), "media_times": [0.0, 1.0, float("inf"), 3.0]}),
        pb.EncodeClipRequest(**{**_fields(good), "wall_times": [0.0, 1.0]}),
        pb.EncodeClipRequest(**{**_fields(good), "seq": -1}),
        pb.EncodeClipRequest(**{**_fields(good), "stream_id": "no spaces"}),
        pb.EncodeClipRequest(**{**_fields(good), "frames": good.frames[:-1]}),
    ]
    for request in bad:
        with pytest.raises(Invalid):
            clip_from_request(request, 4096)
    with pytest.raises(Invalid):  # in process too
        Clip("cam", 0, np.zeros((4, 0, 8, 3), np.uint8), (0.0,) * 4, (0.0,) * 4, 1.0)
    with pytest.raises(Invalid):
        Clip("cam", -2, np.zeros((4, 8, 8, 3), np.uint8), (0.0,) * 4, (0.0,) * 4, 1.0)


def _fields(r: pb.EncodeClipRequest) -> dict[str, Any]:
    return {f.name: v for f, v in r.ListFields()}


@pytest.mark.asyncio
async def test_a_failed_clip_is_acknowledged_with_an_error() -> None:
    servicer = EncoderServicer(asyncio.Queue(), 4096)
    acks: asyncio.Queue[pb.EncodeClipAck] = asyncio.Queue()
    servicer.routes[("cam", 4)] = acks
    servicer.on_failed("cam", 4, "encode: RuntimeError: boom")
    ack = acks.get_nowait()
    assert (ack.stream_id, ack.seq, ack.stored, ack.error) == ("cam", 4, False, "encode: RuntimeError: boom")
    assert servicer.routes == {}
    servicer.on_failed("cam", 4, "again")  # a clip whose connection went away: nothing to do
    assert acks.empty()
