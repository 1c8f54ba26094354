"""Recording benchmark: CPU of stream-copying one 1080p25 camera into segments, and of cutting a moment as an MP4.

    python bench/bench_record.py                  # a 60 s 1080p25 H.264 file made with ffmpeg, Markdown on stdout
    python bench/bench_record.py --seconds 120

The file is bench_ingest's camera-like stream (testsrc2 with sensor-like noise, libx264 at 4 Mb/s, a keyframe
every 25 frames). Three measurements:
(a) the recorder alone: the file's packets fed to `StreamRecording` exactly as a source thread feeds them (each
    demuxed packet, and the wall time of each frame's PTS), the thread CPU time spent inside the recorder per media
    second: the cost `--record` adds to a camera's ingest (target <= 2% of one core);
(b) the whole ingest (keyframes only, 1 fps, as fast as it decodes) with and without `record=True`, process CPU
    per media second: the same cost seen from outside, noise of the machine included;
(c) cutting 30 s as an MP4 by remux: wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import av
from prometheus_client import CollectorRegistry

from ingest.pipeline import IngestManager, StreamState
from ingest.recording import Recordings, StreamRecording
from ingest.spec import StreamSpec
from vcflash.serve.settings import IngestSettings

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from bench_ingest import SOURCE_FPS as FPS  # noqa: E402 - the sibling benchmark's camera-like 1080p25 stream
from bench_ingest import make_1080p  # noqa: E402

log = logging.getLogger("bench_record")


class Timed:
    """A recorder whose every call adds its thread CPU time to `cpu_s`."""

    def __init__(self, inner: StreamRecording) -> None:
        self.inner, self.cpu_s = inner, 0.0

    def __getattr__(self, name: str):  # noqa: ANN204 - a transparent proxy
        method = getattr(self.inner, name)

        def timed(*args: object) -> object:
            t0 = time.thread_time()
            try:
                return method(*args)
            finally:
                self.cpu_s += time.thread_time() - t0

        return timed


def recorder_cost(path: Path, root: Path) -> tuple[float, float, int]:
    """(a): (recorder CPU s, media s, segment bytes) of the whole file."""
    recordings = Recordings(root, segment_s=60.0)
    recorder = Timed(recordings.stream("hd"))
    wall0 = time.time()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        recorder.start(stream)
        last = 0.0
        for packet in container.demux(stream):
            if packet.pts is not None:
                last = max(last, float(packet.pts * stream.time_base))
                recorder.frame_time(float(packet.pts * stream.time_base), wall0 + float(packet.pts * stream.time_base))
            recorder.packet(packet)
        recorder.end()
    return recorder.cpu_s, last + 1 / FPS, recordings.nbytes("hd")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def ingest_cost(path: Path, root: Path, record: bool) -> float:
    """(b): process CPU seconds of ingesting the file (keyframes only, 1 fps, fast), with or without recording."""
    settings = IngestSettings(media_root=path.parent, frame_size=448)
    manager = IngestManager(settings, registry=CollectorRegistry())
    recorder = Recordings(root, segment_s=60.0).stream("hd") if record else None
    drain = asyncio.create_task(_drain(manager))
    cpu0 = cpu_seconds()
    spec = StreamSpec(str(path), fps=1.0, realtime=False, keyframes_only=True, record=record)
    manager.add("hd", spec, recorder=recorder)
    status = await manager.wait("hd")
    cpu = cpu_seconds() - cpu0
    drain.cancel()
    await manager.close()
    if status.state is not StreamState.FINISHED:
        raise RuntimeError(f"ingest ended {status.state.value}: {status.error}")
    return cpu


async def _drain(manager: IngestManager) -> None:
    while True:
        await manager.clips.get()


def cut_cost(root: Path, out: Path) -> tuple[float, float, int]:
    """(c): wall seconds of cutting 30 s from the middle of the recording, and the MP4's length and bytes."""
    recordings = Recordings(root, segment_s=60.0)
    segments = recordings.stream("hd").segments()
    middle = (segments[0].start + segments[-1].end) / 2
    t0 = time.monotonic()
    start, end = recordings.cut("hd", middle - 15, middle + 15, out)
    return time.monotonic() - t0, end - start, out.stat().st_size


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="length of the 1080p file (default 60)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of (a); the median is reported (default 3)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if shutil.which("ffmpeg") is None:
        sys.exit("ffmpeg is needed to make the 1080p file (apt-get install ffmpeg)")
    with tempfile.TemporaryDirectory(prefix="bench-record-") as tmp:
        tmp_path = Path(tmp)
        video = make_1080p(tmp_path / "hd.mp4", args.seconds)
        runs = [recorder_cost(video, tmp_path / f"a{i}") for i in range(args.repeat)]
        cpu, media_s, nbytes = sorted(runs)[len(runs) // 2]
        without = asyncio.run(ingest_cost(video, tmp_path / "b0", record=False))
        with_rec = asyncio.run(ingest_cost(video, tmp_path / "b1", record=True))
        cut_s, cut_len, cut_bytes = cut_cost(tmp_path / "b1", tmp_path / "cut.mp4")

    load = os.getloadavg()[0]
    print(
        f"### {cpu_model()}, {os.cpu_count()} cores, load {load:.1f} — "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, PyAV {av.__version__} (FFmpeg {av.ffmpeg_version_info})\n"
    )
    print(f"1920x1080 25 fps H.264, 4 Mb/s, GOP 25, {media_s:.0f} s; segments of 60 s (MPEG-TS, stream copy)\n")
    print("| measured | CPU s per media s | % of one core | target <= 2% |")
    print("|---|---|---|---|")
    pct = 100 * cpu / media_s
    print(
        f"| (a) recorder alone (thread CPU, median of {args.repeat}) | {cpu / media_s:.4f} | {pct:.2f}% | "
        f"{'met' if pct <= 2 else 'missed'} |"
    )
    print(f"| (b) ingest, keyframes only, 1 fps | {without / media_s:.4f} | {100 * without / media_s:.2f}% | — |")
    delta = 100 * (with_rec - without) / media_s
    print(
        f"| (b) the same with `record=True` | {with_rec / media_s:.4f} | {100 * with_rec / media_s:.2f}% | "
        f"difference {delta:+.2f} points |"
    )
    print(
        f"\nSegments: {nbytes / media_s * 3600 / 1e9:.2f} GB per camera-hour ({8 * nbytes / media_s / 1e6:.2f} Mb/s)."
    )
    print(f"Cut of {cut_len:.1f} s as MP4 (remux): {cut_s:.3f} s wall, {cut_bytes / 1e6:.1f} MB.")


if __name__ == "__main__":
    main()
