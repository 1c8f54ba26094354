"""Live ingest: RTSP (PyAV) and WebRTC (aiortc, WHIP) streams sampled into 4-frame clips (issue 4)."""

from ingest.clips import CLIP_FRAMES, Clip, ClipGrouper
from ingest.clock import MediaClock
from ingest.metrics import DropReason, IngestMetrics
from ingest.pipeline import IngestManager, StreamState, StreamStatus, StreamWorker
from ingest.sampler import FrameSampler, Verdict
from ingest.source import Frame, SourceError, SourceRefused, open_frames, redact_url
from ingest.spec import StreamSpec

__all__ = [
    "CLIP_FRAMES",
    "Clip",
    "ClipGrouper",
    "DropReason",
    "Frame",
    "FrameSampler",
    "IngestManager",
    "IngestMetrics",
    "MediaClock",
    "SourceError",
    "SourceRefused",
    "StreamSpec",
    "StreamState",
    "StreamStatus",
    "StreamWorker",
    "Verdict",
    "open_frames",
    "redact_url",
]
