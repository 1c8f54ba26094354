"""Clips from every stream -> dynamic batches -> visual tokens -> memory.

A clip counts as stored only once the memory accepted it. The loop never stops on an error: a clip that
cannot be encoded, or that the memory refuses for good (a `ValueError` such as a token-shape mismatch), is
rejected and counted; any other store error (the memory down, a locked database, a full Redis) is transient:
the clip is kept and retried with backoff while the service reports NOT_SERVING, and ingest's bounded queue
absorbs the wait and counts what it drops.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable

import numpy as np
import torch
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from hico.model import VideoChatFlashModel
from memory.index import ClipIndex
from memory.records import ClipMeta, ClipRecord, clip_vector
from memory.store import MemoryStore, MemoryUnavailable
from protos.clip import Clip
from vcflash.serve.settings import EncoderSettings

log = logging.getLogger(__name__)


class EncoderMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.clips = Counter("vcflash_encoder_clips_total", "Clips encoded and stored", ["stream"], registry=registry)
        self.batch = Histogram(
            "vcflash_encoder_batch_clips", "Clips per batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry
        )
        self.seconds = Histogram("vcflash_encoder_batch_seconds", "Encode time per batch", registry=registry)
        self.retries = Counter("vcflash_encoder_store_retries_total", "Failed memory writes retried", registry=registry)
        self.failed = Counter(
            "vcflash_encoder_clips_failed_total",
            "Clips rejected: invalid, not encodable, or refused by the memory for good",
            ["reason"],
            registry=registry,
        )


def encode(model: VideoChatFlashModel, clips: list[Clip]) -> np.ndarray:
    """uint8 clips -> float16 tokens [B, 64, D]. Frames of any size; each clip on its own."""
    pixels = torch.cat([model.preprocess(c.frames) for c in clips])
    return model.encode_clips(pixels, batch_size=len(clips)).float().cpu().numpy().astype(np.float16)


def to_record(clip: Clip, tokens: np.ndarray) -> ClipRecord:
    meta = ClipMeta(
        stream_id=clip.stream_id,
        seq=clip.seq,
        wall_start=clip.wall_start,
        wall_end=clip.wall_end,
        media_start=clip.media_start,
        media_end=clip.media_end,
        frame_media_times=tuple(clip.media_times),
    )
    return ClipRecord(meta, tokens, clip_vector(tokens), clip.thumbnail)


# Store errors that are about the one clip, not the memory: retrying cannot help. Everything else (MemoryUnavailable,
# sqlite3.OperationalError "database is locked", a Redis OOM ResponseError, ...) is retried until it passes.
PERMANENT_STORE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # codec: token shape mismatch, bad stream id (Invalid is a ValueError)
    TypeError,
    sqlite3.IntegrityError,
    sqlite3.DataError,
)


def describe(e: BaseException) -> str:
    """`Type: message`, on one line and bounded: for logs and acks."""
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:300]


HealthHook = Callable[[bool, str], Awaitable[None]]


class EncoderWorker:
    def __init__(
        self,
        model: VideoChatFlashModel,
        store: MemoryStore,
        queue: asyncio.Queue[Clip],
        index: ClipIndex | None = None,
        settings: EncoderSettings | None = None,
        model_lock: threading.Lock | None = None,
        metrics: EncoderMetrics | None = None,
        on_stored: Callable[[str, int], None] | None = None,
        accepts: Callable[[str], bool] | None = None,
        on_failed: Callable[[str, int, str], None] | None = None,
        on_health: HealthHook | None = None,
    ) -> None:
        """`on_failed(stream, seq, error)`: a clip was rejected for good. `on_health(ok, reason)`: the memory
        stopped (False) or resumed (True) accepting writes; the service reports it in gRPC health."""
        self.model, self.store, self.queue, self.index = model, store, queue, index
        self.accepts = accepts  # skip clips of streams removed while they waited (all-in-one)
        self.settings = settings or EncoderSettings()
        self.model_lock = model_lock or threading.Lock()
        self.metrics = metrics or EncoderMetrics()
        self.on_stored, self.on_failed, self.on_health = on_stored, on_failed, on_health
        self.store_error: str | None = None  # while the memory refuses writes: the first error
        self._failing_since = 0.0

    async def run(self) -> None:
        """Forever; no exception from one batch ends the loop (only cancellation does)."""
        while True:
            batch = [c for c in await self._next_batch() if self.accepts is None or self.accepts(c.stream_id)]
            if not batch:
                continue
            try:
                await self._store(await self._encode_batch(batch))
            except Exception as e:  # a bug: the per-clip handling below should have caught it
                log.exception("event=encoder_batch_failed clips=%d error=%s", len(batch), describe(e))
                for c in batch:  # a clip stored already gets a duplicate ack, which ingest ignores
                    self._fail(c.stream_id, c.seq, "internal", e)

    async def _encode_batch(self, batch: list[Clip]) -> list[ClipRecord]:
        """Encode the batch; if that raises, each clip on its own, rejecting those that still fail."""
        t0 = time.perf_counter()
        try:
            tokens = await asyncio.to_thread(self._encode, batch)
            records = [to_record(c, t) for c, t in zip(batch, tokens, strict=True)]
        except Exception as e:
            if len(batch) == 1:
                self._fail(batch[0].stream_id, batch[0].seq, "encode", e)
                return []
            log.warning("event=encode_batch_failed clips=%d error=%s action=one_by_one", len(batch), describe(e))
            records = []
            for c in batch:
                try:
                    records.append(to_record(c, (await asyncio.to_thread(self._encode, [c]))[0]))
                except Exception as e1:
                    self._fail(c.stream_id, c.seq, "encode", e1)
        self.metrics.seconds.observe(time.perf_counter() - t0)
        self.metrics.batch.observe(len(batch))
        return records

    def _fail(self, stream_id: str, seq: int, reason: str, e: BaseException) -> None:
        self.metrics.failed.labels(reason).inc()
        log.warning("event=clip_failed stream=%s seq=%d reason=%s error=%s", stream_id, seq, reason, describe(e))
        if self.on_failed is not None:
            try:
                self.on_failed(stream_id, seq, f"{reason}: {describe(e)}")
            except Exception:
                log.exception("event=on_failed_error stream=%s seq=%d", stream_id, seq)

    async def _set_health(self, ok: bool, reason: str) -> None:
        if self.on_health is not None:
            try:
                await self.on_health(ok, reason)
            except Exception:
                log.exception("event=health_hook_error ok=%s", ok)

    async def _store_failing(self, r: ClipRecord, e: BaseException, delay: float) -> None:
        self.metrics.retries.inc()
        if self.store_error is None:  # logged once when failing starts, once when it recovers
            self.store_error, self._failing_since = describe(e), time.monotonic()
            log.warning("event=store_failing stream=%s seq=%d retry_s=%.1f error=%s", *r.key, delay, self.store_error)
            await self._set_health(False, f"memory refuses writes: {self.store_error}")
        else:
            log.debug("event=store_retry stream=%s seq=%d delay_s=%.1f error=%s", *r.key, delay, describe(e))

    async def _store_recovered(self) -> None:
        if self.store_error is not None:
            down_s = time.monotonic() - self._failing_since
            log.warning("event=store_recovered down_s=%.1f error=%s", down_s, self.store_error)
            self.store_error = None
            await self._set_health(True, f"memory accepts writes again after {down_s:.1f} s")

    def _encode(self, batch: list[Clip]) -> np.ndarray:
        with self.model_lock:
            return encode(self.model, batch)

    async def _next_batch(self) -> list[Clip]:
        batch = [await self.queue.get()]
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000
        while len(batch) < self.settings.max_batch:
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                break
        return batch

    async def _store(self, records: list[ClipRecord]) -> None:
        for r in records:
            if self.accepts is not None and not self.accepts(r.meta.stream_id):
                continue  # removed (and maybe deleted) while this batch was encoded
            added = await self._put(r)
            if added is None:
                continue  # rejected for good, or its stream was removed while it waited
            if added and self.index is not None:  # a resent clip is already indexed
                try:
                    # off the event loop: the index's lock may wait behind a search or a batched removal
                    await asyncio.to_thread(self.index.add, r.meta.stream_id, np.array([r.meta.seq]), r.vector[None])
                except Exception as e:  # stored all the same; the index is rebuilt from memory on restart
                    log.warning("event=index_add_failed stream=%s seq=%d error=%s", *r.key, describe(e))
            self.metrics.clips.labels(r.meta.stream_id).inc()
            if self.on_stored is not None:
                self.on_stored(*r.key)

    async def _put(self, r: ClipRecord) -> bool | None:
        """Store one record, retrying transient errors until they pass. None: rejected or no longer wanted."""
        attempt = 0
        while True:
            try:
                added = await asyncio.to_thread(self.store.put, r)
            except MemoryUnavailable as e:  # an Unavailable first: never permanent, whatever else it is
                error: BaseException = e
            except PERMANENT_STORE_ERRORS as e:
                self._fail(*r.key, "store", e)
                await self._store_recovered()  # the memory answered: it is up
                return None
            except Exception as e:
                error = e
            else:
                await self._store_recovered()
                return added
            delay = self.settings.store_retry.delay(attempt)
            attempt += 1
            await self._store_failing(r, error, delay)
            await asyncio.sleep(delay)
            if self.accepts is not None and not self.accepts(r.meta.stream_id):
                return None
