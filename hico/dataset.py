"""Training data: LLaVA / VideoChat-Flash JSON lines in, conversations and videos checked, frames sampled as at
inference.

A line is one sample, as in the official training annotations:

    {"id": "...", "video": "clips/a.mp4", "conversations": [
        {"from": "human", "value": "<image>\\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"}]}

`video` is relative to the data root (default: the file's directory), optional `start`/`end` (seconds) sample a
sub-range, `conversations` alternate human and gpt turns (or `role`/`content` with user/assistant), and the one
`<image>` placeholder sits in the first human turn, as in the official data (where it is moved to the front, so
its place in the turn does not matter). Other keys are kept in `extra` (the shapes data set keeps `category`
and `choices` there). A JSON array of such objects is read too. Every problem names the file and line.

Frames are sampled exactly as `VideoChatFlash.answer` samples a video file (`sample_video`), so training and
inference see the same frames and the same time message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hico.pixels import squash_resize
from hico.prompt import IMAGE_PLACEHOLDER, find_marker
from hico.video import SampledVideo, VideoError, load_video

log = logging.getLogger(__name__)
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


class DataError(ValueError):
    """A training file or line that cannot be used; the message starts with `file:line:`."""


@dataclass(frozen=True)
class Sample:
    """One conversation about one video."""

    where: str  # "file:line", for every message about it
    video: Path
    turns: tuple[tuple[str, str], ...]  # (question, answer); the first question without its <image>
    start_s: float | None = None
    end_s: float | None = None
    id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # where the answer is seen: [start, end] seconds on the video's clock (the optional `moments` key), which the
    # relevance loss of `hico.train` teaches the question to attend to
    moments: tuple[tuple[float, float], ...] = ()

    @property
    def video_key(self) -> tuple[str, float | None, float | None]:
        """Samples with the same key share their frames (and, in a training step, their visual tokens)."""
        return (str(self.video), self.start_s, self.end_s)


# -- reading ----------------------------------------------------------------------------------------------------


def _turns(conversations: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("`conversations` must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i + 1} is not an object")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role == "system" and i == 0:
            continue  # the template has its own system prompt, as in the official data pipeline
        if role not in ROLES or not isinstance(text, str):
            raise ValueError(f"turn {i + 1} needs `from` human/gpt (or `role` user/assistant) and a text `value`")
        messages.append((ROLES[role], text))
    if len(messages) % 2 or any(r != ("human" if i % 2 == 0 else "gpt") for i, (r, _) in enumerate(messages)):
        raise ValueError(f"turns must alternate human, gpt, ... and end with gpt; got {[r for r, _ in messages]}")
    first = messages[0][1]
    if first.count(IMAGE_PLACEHOLDER) != 1:
        raise ValueError(f"the first human turn must hold the {IMAGE_PLACEHOLDER} placeholder exactly once")
    pairs = []
    for i in range(0, len(messages), 2):
        question, answer = messages[i][1], messages[i + 1][1]
        if i == 0:
            question = question.replace(IMAGE_PLACEHOLDER, "").strip()
        for text, who in ((question, "human"), (answer, "gpt")):
            if (marker := find_marker(text)) is not None:
                raise ValueError(f"a {who} turn holds the reserved marker {marker} (only one {IMAGE_PLACEHOLDER})")
        if not question.strip() or not answer.strip():
            raise ValueError(f"turn {i + 1} or {i + 2} is empty")
        pairs.append((question, answer.strip()))
    return tuple(pairs)


def _optional_seconds(d: dict[str, Any], key: str) -> float | None:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value) or value < 0:
        raise ValueError(f"`{key}` must be seconds (a number >= 0), got {value!r}")
    return float(value)


MAX_MOMENTS = 64


def _moments(value: Any) -> tuple[tuple[float, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_MOMENTS:
        raise ValueError(f"`moments` must be a list of at most {MAX_MOMENTS} [start, end] pairs of seconds")
    out = []
    for m in value:
        ok = isinstance(m, list) and len(m) == 2
        ok = ok and all(isinstance(t, int | float) and not isinstance(t, bool) and np.isfinite(t) for t in m)
        if not ok or not 0 <= m[0] < m[1]:
            raise ValueError(f"each of `moments` must be [start, end] seconds with 0 <= start < end, got {m!r}")
        out.append((float(m[0]), float(m[1])))
    return tuple(out)


def parse_sample(d: Any, where: str, root: Path) -> Sample:
    """One annotation object -> Sample; DataError naming `where` and what is wrong."""
    try:
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        video = d.get("video")
        if video is None:
            other = [k for k in ("image", "images", "audio") if k in d]
            raise ValueError(f"no `video` key{f' (has {other[0]!r}: only videos are trained on)' if other else ''}")
        if not isinstance(video, str) or not video:
            raise ValueError(f"`video` must be one path, got {video!r}")
        start, end = _optional_seconds(d, "start"), _optional_seconds(d, "end")
        if start is not None and end is not None and end <= start:
            raise ValueError(f"`end` {end} must be after `start` {start}")
        turns = _turns(d.get("conversations"))
        moments = _moments(d.get("moments"))
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    extra = {k: v for k, v in d.items() if k not in ("id", "video", "conversations", "start", "end", "moments")}
    ident = d.get("id")
    return Sample(where, root / video, turns, start, end, None if ident is None else str(ident), extra, moments)


def read_samples(path: str | os.PathLike[str], data_root: str | os.PathLike[str] | None = None) -> list[Sample]:
    """Every sample of a JSON-lines file (or a JSON array); blank lines are skipped. Video paths are relative to
    `data_root`, default the file's directory. Raises DataError at the first malformed line, naming it."""
    path = Path(path)
    root = Path(data_root) if data_root is not None else path.parent
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such training file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not a JSON array ({e.msg})") from None
        return [parse_sample(d, f"{path}[{i}]", root) for i, d in enumerate(items)]
    samples = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not a JSON object ({e.msg} at column {e.colno})") from None
        samples.append(parse_sample(d, f"{path}:{n}", root))
    if not samples:
        raise DataError(f"{path}: no samples")
    return samples


# -- videos -----------------------------------------------------------------------------------------------------


def sample_video(sample: Sample, max_frames: int) -> SampledVideo:
    """The frames `VideoChatFlash.answer` would use for this video and range (same sampler, same floor)."""
    return load_video(
        sample.video,
        max_num_frames=max_frames,
        min_num_frames=min(64, max_frames),
        start_s=sample.start_s,
        end_s=sample.end_s,
    )


def probe_video(path: Path) -> str | None:
    """None when `path` opens as a video with frames, else why not (cheap: no decoding)."""
    import av

    if not path.exists():
        return "missing"
    if not path.is_file() or path.stat().st_size == 0:
        return "empty or not a file"
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return "no video stream"
    except (av.FFmpegError, OSError) as e:
        return f"unreadable ({e})"
    return None


def check_videos(samples: Iterable[Sample], on_bad: str = "skip") -> tuple[list[Sample], list[str]]:
    """Probe every distinct video; returns the usable samples and one report line per bad video naming the lines
    that use it. `on_bad`: 'skip' drops those samples, 'fail' raises DataError with the report."""
    if on_bad not in ("skip", "fail"):
        raise ValueError(f"on_bad must be 'skip' or 'fail', got {on_bad!r}")
    samples = list(samples)
    problems: dict[Path, str | None] = {}
    users: dict[Path, list[str]] = {}
    for s in samples:
        if s.video not in problems:
            problems[s.video] = probe_video(s.video)
        users.setdefault(s.video, []).append(s.where)
    report = [bad_video_line(v, why, users[v]) for v, why in problems.items() if why is not None]
    if report and on_bad == "fail":
        raise DataError("bad videos (--bad-videos fail):\n" + "\n".join(report))
    return [s for s in samples if problems[s.video] is None], report


def bad_video_line(video: Path, why: str, wheres: list[str]) -> str:
    shown = ", ".join(wheres[:5]) + (f" and {len(wheres) - 5} more" if len(wheres) > 5 else "")
    return f"{video}: {why}; used by {shown}"


@dataclass
class Frames:
    """A video's sampled frames, squashed to the model's input size (the first, uint8 step of preprocessing)."""

    pixels: np.ndarray  # uint8 [T, S, S, 3]
    duration_s: float
    times_s: np.ndarray  # float64 [T]: each frame's time on the video's clock

    @property
    def nbytes(self) -> int:
        return self.pixels.nbytes

    def clips_within(self, moments: Sequence[tuple[float, float]], clip_frames: int) -> list[int]:
        """The clips (runs of `clip_frames` frames) with a frame inside one of `moments` ([start, end] seconds)."""
        clip = np.arange(len(self.times_s)) // clip_frames
        inside = np.zeros(len(self.times_s), bool)
        for start, end in moments:
            inside |= (self.times_s >= start) & (self.times_s <= end)
        return sorted({int(c) for c in clip[inside]})


class BytesLRU:
    """Values by key, the least recently used dropped once they hold more than `max_bytes` (`nbytes` of each).
    Safe to share between threads; `compute` runs outside the lock, so two threads may both compute a missing key
    (the first stored wins)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self._bytes = max_bytes, 0
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()
        with self._lock:
            if key in self._items:
                return self._items[key]
            self._items[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes and len(self._items) > 1:
                self._bytes -= self._items.popitem(last=False)[1].nbytes
        return value


class FrameCache:
    """Sampled, squashed frames per (video, range), least recently used dropped past `max_bytes`.

    Squashing in uint8 first is exactly `hico.video.preprocess_frames`' first step, so normalising the cached
    frames later gives the same pixels as preprocessing the decoded ones.

    With `directory`, frames are also kept on disk, so later runs on the same videos (a second stage, a resumed or
    repeated run) skip decoding: one file per (video file as it is now: path, size and mtime; range; frame budget;
    input size), named by a hash of that, so an edited video or another budget is a miss, never stale. A file that
    cannot be read is decoded again and rewritten. The directory grows with the data (about T x S x S x 3 bytes a
    video) and is the user's to delete."""

    def __init__(
        self,
        image_size: int,
        max_frames: int,
        max_bytes: int = 1 << 30,
        directory: str | os.PathLike[str] | None = None,
    ) -> None:
        self.image_size, self.max_frames = image_size, max_frames
        self._lru = BytesLRU(max_bytes)
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # frames of the user's footage
        self.decoded = 0  # videos decoded by this cache (not read from memory or disk)

    def get(self, sample: Sample) -> Frames:
        """Raises FileNotFoundError or VideoError (hico.video) for a video that cannot be used."""
        return self._lru.get(sample.video_key, lambda: self._load(sample))

    def _decode(self, sample: Sample) -> Frames:
        video = sample_video(sample, self.max_frames)
        times = np.asarray(video.indices, np.float64) / video.fps
        self.decoded += 1
        return Frames(np.stack([squash_resize(f, self.image_size) for f in video.frames]), video.duration_s, times)

    def _load(self, sample: Sample) -> Frames:
        if self.directory is None:
            return self._decode(sample)
        stat = os.stat(sample.video)  # FileNotFoundError, as decoding would raise
        key = (str(Path(sample.video).resolve()), stat.st_size, stat.st_mtime_ns, sample.start_s, sample.end_s)
        name = hashlib.sha256(repr((*key, self.max_frames, self.image_size, FRAME_FILE_VERSION)).encode()).hexdigest()
        path = self.directory / f"{name}.npz"
        try:
            with np.load(path, allow_pickle=False) as f:
                cached = Frames(f["pixels"], float(f["duration_s"]), f["times_s"])
            if well_formed(cached, self.image_size):
                return cached
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # missing or unreadable: decode and (re)write
        frames = self._decode(sample)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as out:
                np.savez(out, pixels=frames.pixels, duration_s=frames.duration_s, times_s=frames.times_s)
            os.replace(tmp, path)  # whole or absent, whoever reads it
        except OSError as e:  # a full disk fails the cache, not the video: its frames are decoded and right
            tmp.unlink(missing_ok=True)
            log.warning("frame cache %s: cannot write (%s); going on without keeping this video", self.directory, e)
        return frames


FRAME_FILE_VERSION = 1  # bump when what a cached frame file holds changes


def well_formed(frames: Frames, image_size: int) -> bool:
    """uint8 [T, S, S, 3] pixels with T >= 1 and one time per frame."""
    p = frames.pixels
    return (
        p.dtype == np.uint8
        and p.ndim == 4
        and len(p) > 0
        and p.shape[1:] == (image_size, image_size, 3)
        and (frames.times_s.shape == (len(p),))
    )


VIDEO_ERRORS = (FileNotFoundError, VideoError, OSError, ValueError)
