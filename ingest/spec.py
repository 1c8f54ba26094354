"""What a stream is: its source and how to read it, checked once, and its durable form in memory."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Self

from ingest.source import Transport, check_source_options, is_live_url
from protos.clip import MIN_FPS
from vcflash.serve.errors import Invalid


@dataclass(frozen=True)
class StreamSpec:
    """One stream as AddStream or WHIP defines it and memory keeps it, so a restarted server resumes it.

    Checks here need nothing but the spec; the limits that are settings (VCFLASH_MAX_FPS,
    VCFLASH_MAX_SOURCE_CHARS) are checked when a server admits the stream (`IngestManager.admit`).
    """

    source: str  # a URL or a file path; whip://<name> for a WHIP stream (its frames come from the session)
    fps: float | None = None  # sampling rate; None: the server's VCFLASH_FPS
    realtime: bool = True  # files: play at their own pace, as a live stream would arrive
    loop: bool = False  # files: replay at the end, both clocks running on
    transport: Transport = "tcp"  # RTSP: media interleaved on the connection (tcp) or RTP over udp
    listen: bool = False  # RTSP: wait for a camera to push (ANNOUNCE/RECORD) instead of pulling
    # decode keyframes only, the sampler picking among them, while they come at least once per sampling period
    # (measured; every frame is decoded otherwise, so sampling never falls below fps: see ingest/keyframes.py)
    keyframes_only: bool = False
    # RTSP: wall times on the camera's clock (its RTCP sender reports) instead of this server's; off by default,
    # as camera clocks are often not synchronised and age retention and wall-clock questions trust wall time
    camera_clock: bool = False
    # keep the video (see ingest/recording.py): URL and file sources stream-copied, WebRTC's sampled frames encoded
    record: bool = False
    live: bool | None = None  # read as frames arrive and reconnect with backoff; None: by the URL's scheme
    resume: bool = True  # restarted with the server; False for WHIP, whose sender reconnects by itself

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise Invalid("source is empty")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps >= MIN_FPS):
            raise Invalid(f"fps must be >= {MIN_FPS:g}, got {self.fps!r}")
        try:
            check_source_options(
                self.source, transport=self.transport, listen=self.listen, camera_clock=self.camera_clock
            )
        except ValueError as e:  # source.py's own errors are plain ValueErrors
            raise Invalid(str(e)) from None

    @property
    def is_live(self) -> bool:
        """Whether the source is read as it arrives and reopened when it drops (a camera, not a file)."""
        return self.listen or (is_live_url(self.source) if self.live is None else self.live)

    def to_config(self, active: bool) -> dict[str, Any]:
        """The durable form: every field, and `active` (whether a restarted server starts it again)."""
        return asdict(self) | {"active": active}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        """The spec of a stored config; keys it lacks (configs stored by older versions) take their defaults."""
        names = {f.name for f in fields(cls)}
        unknown = set(config) - names - {"active"}
        if unknown:
            raise Invalid(f"unknown stream config keys: {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in config.items() if k in names})
