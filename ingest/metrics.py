"""Prometheus metrics for ingest, registered on a caller-chosen registry (tests use their own)."""

from __future__ import annotations

import enum
from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge


class DropReason(enum.StrEnum):
    """Why a frame never reached the clip queue."""

    QUEUE_FULL = "queue_full"  # the shared clip queue was full: the clip's 4 frames
    LOOP_BUSY = "loop_busy"  # the event loop fell behind taking clips from the source thread
    DISCONTINUITY = "discontinuity"  # PTS went backwards: the partial clip before it
    INCOMPLETE_CLIP = "incomplete_clip"  # the stream ended or stopped with a partial clip
    DECODE_ERROR = "decode_error"  # an undecodable packet (one frame each); never counted in frames_in
    DISCONNECT = "disconnect"  # a live source dropped: the partial clip before it


class IngestMetrics:
    """The ingest counters, labelled by stream, and the shared queue's depth."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.frames_in = Counter(
            "vcflash_ingest_frames_in_total", "Frames decoded from the source.", ["stream"], registry=registry
        )
        self.frames_sampled = Counter(
            "vcflash_ingest_frames_sampled_total", "Frames kept by the sampler.", ["stream"], registry=registry
        )
        self.frames_dropped = Counter(
            "vcflash_ingest_frames_dropped_total",
            "Frames lost before reaching the clip queue, by reason.",
            ["stream", "reason"],
            registry=registry,
        )
        self.clips = Counter(
            "vcflash_ingest_clips_total", "Clips put on the clip queue.", ["stream"], registry=registry
        )
        self.reconnects = Counter(
            "vcflash_ingest_reconnects_total",
            "Times a live source was reopened after it failed, dropped or stalled.",
            ["stream"],
            registry=registry,
        )
        self.keyframe_interval = Gauge(
            "vcflash_ingest_keyframe_interval_seconds",
            "Keyframes-only streams: the latest keyframe interval measured (NaN until two keyframes came).",
            ["stream"],
            registry=registry,
        )
        self.keyframes_fallback = Gauge(
            "vcflash_ingest_keyframes_fallback",
            "Keyframes-only streams: 1 while every frame is decoded because keyframes come further apart than "
            "the sampling period.",
            ["stream"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "vcflash_ingest_queue_depth", "Clips waiting in the shared clip queue.", registry=registry
        )

    def track_queue(self, depth: Callable[[], int]) -> None:
        """Read the queue depth at scrape time, so consumers need not report it."""
        self.queue_depth.set_function(depth)

    def forget(self, stream: str) -> None:
        """Remove a stream's series once it is removed, so names do not pile up."""
        for counter in (self.frames_in, self.frames_sampled, self.clips, self.reconnects):
            counter.remove(stream)
        for gauge in (self.keyframe_interval, self.keyframes_fallback):  # keyframes-only streams only
            gauge.remove(stream)
        for reason in DropReason:
            self.frames_dropped.remove(stream, reason.value)
