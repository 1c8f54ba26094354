"""Clips from every stream -> dynamic batches -> visual tokens -> memory.

A clip counts as stored only once the memory accepted it: when the memory is down, the batch is
kept and retried with backoff (ingest's bounded queue absorbs the wait and counts what it drops).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

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
    return ClipRecord(meta, tokens, clip_vector(tokens))


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
    ) -> None:
        self.model, self.store, self.queue, self.index = model, store, queue, index
        self.accepts = accepts  # skip clips of streams removed while they waited (all-in-one)
        self.settings = settings or EncoderSettings()
        self.model_lock = model_lock or threading.Lock()
        self.metrics = metrics or EncoderMetrics()
        self.on_stored = on_stored

    async def run(self) -> None:
        while True:
            batch = [c for c in await self._next_batch() if self.accepts is None or self.accepts(c.stream_id)]
            if not batch:
                continue
            t0 = time.perf_counter()
            tokens = await asyncio.to_thread(self._encode, batch)
            self.metrics.seconds.observe(time.perf_counter() - t0)
            self.metrics.batch.observe(len(batch))
            await self._store([to_record(c, t) for c, t in zip(batch, tokens, strict=True)])

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
            attempt = 0
            while True:
                try:
                    added = await asyncio.to_thread(self.store.put, r)
                    break
                except MemoryUnavailable as e:
                    self.metrics.retries.inc()
                    delay = self.settings.store_retry.delay(attempt)
                    attempt += 1
                    log.warning("event=store_retry stream=%s seq=%d delay_s=%.1f error=%s", *r.key, delay, e)
                    await asyncio.sleep(delay)
            if added and self.index is not None:  # a resent clip is already indexed
                self.index.add(r.meta.stream_id, np.array([r.meta.seq]), r.vector[None])
            self.metrics.clips.labels(r.meta.stream_id).inc()
            if self.on_stored is not None:
                self.on_stored(*r.key)
