"""Ingest benchmark: CPU of one 1080p stream (full vs keyframe-only decoding), and how many 1 fps streams keep up.

    python bench/bench_ingest.py                     # both parts, Markdown tables on stdout
    python bench/bench_ingest.py --streams 8 16 24 --window 20

(a) A 1920x1080 25 fps H.264 file (libx264 at 4 Mb/s, GOP 25, made with ffmpeg) through IngestManager at 1 fps with the
encoder's frame_size 448: process CPU seconds per media second, in fast mode (as fast as it decodes) and paced to
real time; the issue's target is <= 5 % of one core with keyframes only.
(b) N concurrent 320x240 25 fps streams at 1 fps, ingest only (a consumer just drains the clip queue), from
1. files played in real time and 2. one GStreamer RTSP server (tests/ingest/rtsp_server.py, a shared live
encoder, all clients over TCP on 127.0.0.1). A stream keeps up when it decodes ~25 frames/s, samples ~1 frame/s
and drops nothing; the server's own CPU is reported apart, since it shares the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from ingest.pipeline import IngestManager, StreamState, StreamStatus
from ingest.spec import StreamSpec
from vcflash.media import write_test_video
from vcflash.serve.settings import IngestSettings

# Ingest mechanics read local test videos: any file is allowed (the file policy has its own tests).
ROOT = Path("/")
FILES = IngestSettings(media_root=ROOT)

log = logging.getLogger("bench_ingest")

FRAME_SIZE = 448  # the encoder's S for the released res448 models: ingest squashes sampled frames to it
SOURCE_FPS = 25
TARGET_CORE_PCT = 5.0
SERVER_SCRIPT = Path(__file__).resolve().parent.parent / "tests" / "ingest" / "rtsp_server.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with python3-gi and GstRtspServer
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """CPU time of this process, all threads (decoder threads included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pid_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_1080p(path: Path, seconds: int) -> Path:
    """A camera-like stream: moving test pattern with sensor-like noise at 4 Mb/s, a keyframe every 25 frames.

    The noise matters: a clean synthetic pattern compresses to a few hundred kb/s and decodes far cheaper
    than a real camera's picture.
    """
    command = (
        f"ffmpeg -nostdin -loglevel error -y -f lavfi -i testsrc2=size=1920x1080:rate={SOURCE_FPS},"
        f"noise=alls=10:allf=t -t {seconds} -c:v libx264 -preset veryfast -b:v 4M -maxrate 4M -bufsize 8M "
        f"-g {SOURCE_FPS} -keyint_min {SOURCE_FPS} -sc_threshold 0 -pix_fmt yuv420p"
    )
    subprocess.run([*command.split(), str(path)], check=True)
    return path


async def drain(manager: IngestManager, lags: list[float]) -> None:
    """The consumer: take every clip at once; record how late it is against its last frame's wall time."""
    while True:
        clip = await manager.clips.get()
        lags.append(time.time() - clip.wall_times[-1])


@dataclass(frozen=True)
class DecodeResult:
    mode: str
    pacing: str
    media_s: float
    wall_s: float
    cpu_s: float
    frames_in: int
    clips: int

    @property
    def core_pct(self) -> float:
        return 100 * self.cpu_s / self.media_s


async def decode_cost(path: Path, media_s: float, keyframes_only: bool, realtime: bool) -> DecodeResult:
    manager = IngestManager(IngestSettings(media_root=ROOT, frame_size=FRAME_SIZE), registry=CollectorRegistry())
    lags: list[float] = []
    consumer = asyncio.create_task(drain(manager, lags))
    cpu0, wall0 = cpu_seconds(), time.monotonic()
    manager.add("hd", StreamSpec(str(path), fps=1.0, realtime=realtime, keyframes_only=keyframes_only))
    status = await manager.wait("hd")
    cpu, wall = cpu_seconds() - cpu0, time.monotonic() - wall0
    consumer.cancel()
    await manager.close()
    if status.state is not StreamState.FINISHED:
        raise RuntimeError(f"1080p decode ended {status.state.value}: {status.error}")
    mode = "keyframes only" if keyframes_only else "full decode"
    result = DecodeResult(mode, "real time" if realtime else "fast", media_s, wall, cpu, status.frames_in, len(lags))
    log.info("decoded mode=%s pacing=%s cpu_s=%.2f wall_s=%.2f", mode, result.pacing, cpu, wall)
    return result


@dataclass(frozen=True)
class LoadResult:
    source: str
    streams: int
    window_s: float
    frames_in_per_s: tuple[float, float]  # min and mean over streams
    sampled_per_s: tuple[float, float]
    clips: int
    dropped: int
    not_running: int
    lag_p95_s: float
    cpu_pct: float  # of one core, this process
    server_cpu_pct: float | None


@contextlib.contextmanager
def rtsp_server(port: int) -> Iterator[subprocess.Popen[bytes]]:
    server = subprocess.Popen(
        [SYSTEM_PYTHON, str(SERVER_SCRIPT), str(port), "/cam"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert server.stdout is not None
        if not server.stdout.readline().startswith(b"ready"):
            raise RuntimeError(f"RTSP server on port {port} did not start (exit code {server.poll()})")
        yield server
    finally:
        server.kill()
        server.wait(5)


def window(before: dict[str, StreamStatus], after: dict[str, StreamStatus], seconds: float) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {"in": [], "sampled": []}
    for name, end in after.items():
        start = before[name]
        rates["in"].append((end.frames_in - start.frames_in) / seconds)
        rates["sampled"].append((end.frames_sampled - start.frames_sampled) / seconds)
    return rates


async def sustain(source: str, n: int, url: str, warmup_s: float, window_s: float, server: int | None) -> LoadResult:
    manager = IngestManager(IngestSettings(media_root=ROOT, frame_size=FRAME_SIZE), registry=CollectorRegistry())
    lags: list[float] = []
    consumer = asyncio.create_task(drain(manager, lags))
    for i in range(n):
        manager.add(f"s{i}", StreamSpec(url, fps=1.0, realtime=True, loop=True))
    deadline = time.monotonic() + 30
    while any(s.state is not StreamState.RUNNING for s in manager.status().values()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{source} x{n}: not all streams running after 30 s: {manager.status()}")
        await asyncio.sleep(0.1)
    await asyncio.sleep(warmup_s)
    before, cpu0, lags_before = manager.status(), cpu_seconds(), len(lags)
    server0 = pid_cpu_seconds(server) if server else 0.0
    start = time.monotonic()
    await asyncio.sleep(window_s)
    after, elapsed = manager.status(), time.monotonic() - start
    cpu = cpu_seconds() - cpu0
    server_cpu = pid_cpu_seconds(server) - server0 if server else None
    consumer.cancel()
    await manager.close()

    rates = window(before, after, elapsed)
    window_lags = sorted(lags[lags_before:]) or [float("nan")]
    result = LoadResult(
        source=source,
        streams=n,
        window_s=elapsed,
        frames_in_per_s=(min(rates["in"]), sum(rates["in"]) / n),
        sampled_per_s=(min(rates["sampled"]), sum(rates["sampled"]) / n),
        clips=sum(a.clips_emitted - before[k].clips_emitted for k, a in after.items()),
        dropped=sum(sum(a.frames_dropped.values()) - sum(before[k].frames_dropped.values()) for k, a in after.items()),
        not_running=sum(a.state is not StreamState.RUNNING for a in after.values()),
        lag_p95_s=window_lags[int(0.95 * (len(window_lags) - 1))],
        cpu_pct=100 * cpu / elapsed,
        server_cpu_pct=None if server_cpu is None else 100 * server_cpu / elapsed,
    )
    log.info("sustained source=%s streams=%d result=%s", source, n, result)
    return result


def keeps_up(r: LoadResult) -> bool:
    """Decoding at the source's rate (within 5 %), sampling 1 fps (within 10 %), no drops, every stream running."""
    return (
        r.frames_in_per_s[0] >= 0.95 * SOURCE_FPS
        and r.sampled_per_s[0] >= 0.9
        and r.dropped == 0
        and r.not_running == 0
    )


def report_decode(results: list[DecodeResult], seconds: int) -> None:
    print(
        f"\n### (a) One 1920x1080 25 fps H.264 stream (4 Mb/s, GOP 25, {seconds} s), 1 fps sampling, "
        f"frame_size {FRAME_SIZE}"
    )
    print("\n| decoding | pacing | frames decoded | clips | CPU s / media s | % of one core | target <= 5 % |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        target = ("met" if r.core_pct <= TARGET_CORE_PCT else "missed") if r.mode == "keyframes only" else "–"
        print(
            f"| {r.mode} | {r.pacing} ({r.wall_s:.1f} s wall) | {r.frames_in} | {r.clips} | {r.cpu_s / r.media_s:.3f} "
            f"| {r.core_pct:.1f} % | {target} |"
        )


def report_load(results: list[LoadResult], window_s: float) -> None:
    print(f"\n### (b) Concurrent 320x240 25 fps streams at 1 fps, ingest only, {window_s:g} s window after warm-up")
    print(
        "\n| source | streams | decoded fps / stream (min, mean) | sampled fps / stream (min, mean) | clips "
        "| dropped frames | clip lag p95 | ingest CPU (% of a core) | RTSP server CPU | keeps up |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        server = "–" if r.server_cpu_pct is None else f"{r.server_cpu_pct:.0f} %"
        print(
            f"| {r.source} | {r.streams} | {r.frames_in_per_s[0]:.1f}, {r.frames_in_per_s[1]:.1f} "
            f"| {r.sampled_per_s[0]:.2f}, {r.sampled_per_s[1]:.2f} | {r.clips} | {r.dropped} | {r.lag_p95_s:.2f} s "
            f"| {r.cpu_pct:.0f} % | {server} | {'yes' if keeps_up(r) else 'no'} |"
        )


async def run(args: argparse.Namespace, root: Path) -> None:
    decode: list[DecodeResult] = []
    if not args.skip_decode:
        hd = make_1080p(root / "1080p.mp4", args.seconds)
        for realtime in (False, True):
            media_s = args.seconds if not realtime else args.realtime_seconds
            path = hd if not realtime else make_1080p(root / "1080p_short.mp4", args.realtime_seconds)
            for keyframes_only in (False, True):
                decode.append(await decode_cost(path, media_s, keyframes_only, realtime))

    load: list[LoadResult] = []
    small = write_test_video(root / "240p.mp4", seconds=20, fps=SOURCE_FPS, size=(320, 240))
    gstreamer = Path(SYSTEM_PYTHON).exists() and shutil.which("gst-inspect-1.0") is not None
    for n in args.streams:
        load.append(await sustain("file, real time", n, str(small), args.warmup, args.window, None))
        if gstreamer:
            port = free_port()
            with rtsp_server(port) as server:
                url = f"rtsp://127.0.0.1:{port}/cam"
                load.append(await sustain("RTSP (GStreamer, TCP)", n, url, args.warmup, args.window, server.pid))
        else:
            log.warning("no GStreamer RTSP server here: RTSP rows left out")

    print(f"\n{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    if decode:
        report_decode(decode, args.seconds)
    report_load(load, args.window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=40, help="length of the 1080p file decoded in fast mode")
    parser.add_argument("--realtime-seconds", type=int, default=20, help="length of the 1080p file paced to real time")
    parser.add_argument("--streams", type=int, nargs="+", default=[8, 16, 24], help="concurrent stream counts")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds after all streams run, before measuring")
    parser.add_argument("--window", type=float, default=15.0, help="seconds measured per stream count")
    parser.add_argument("--skip-decode", action="store_true", help="only part (b)")
    args = parser.parse_args()
    if shutil.which("ffmpeg") is None and not args.skip_decode:
        sys.exit("ffmpeg is needed to make the 1080p file (apt-get install ffmpeg), or pass --skip-decode")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("ingest").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
