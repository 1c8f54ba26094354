"""Offline video reading, frame sampling and pixel preprocessing for HiCo.

This reproduces the official VideoChat-Flash input pipeline for whole video files:

* :func:`sample_frame_indices` picks roughly one frame per second (the official
  "dynamic_fps1" frame count followed by "middle" sampling), always a multiple of the
  8-frame local window, at least 64 frames when the video has them and at most
  ``max_num_frames``.
* :func:`load_video` reads a file with PyAV, decoding it once and keeping only the
  sampled frames, so a long video never sits in memory in full.
* :func:`preprocess_frames` turns uint8 RGB frames into the normalised float tensor
  the vision encoder expects (bicubic squash to a square, ImageNet mean/std; the
  torch-free pixel math is in :mod:`hico.pixels`).

Frame indices follow decord's conventions (the official reader): the frame count is
the number of video packets in the container and the frame rate is the stream's
average rate, so the same file yields the same indices as the official code.
"""

import errno
import logging
import math
import operator
import os
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import av
import av.container
import av.stream
import av.video.stream
import numpy as np
import torch

from hico.pixels import normalize, squash_resize

__all__ = [
    "MIN_VIDEO_FRAMES",
    "SampledVideo",
    "VideoError",
    "load_video",
    "preprocess_frames",
    "sample_frame_indices",
]

logger = logging.getLogger(__name__)

#: The vision encoder consumes clips of 4 consecutive frames, so shorter videos are unusable.
MIN_VIDEO_FRAMES = 4

# The official reader keeps a sub-range 0.1 s clear of the end of the file, because the
# last frames of a container are often missing or undecodable.
_END_MARGIN_S = 0.1


class VideoError(ValueError):
    """A video that cannot be used: missing, unreadable, corrupt, empty or too short.

    The message names the path and the reason.
    """


@dataclass(frozen=True, eq=False)
class SampledVideo:
    """Frames sampled from a video file, with where they came from.

    ``eq=False`` because comparing frame arrays element-wise is never what a caller wants.
    """

    frames: np.ndarray
    """uint8 ``[T, H, W, 3]`` RGB frames, in the order of :attr:`indices`."""
    indices: list[int]
    """Index of each frame in the file (0-based, presentation order); may repeat when padded."""
    fps: float
    """The stream's average frame rate."""
    duration_s: float
    """Duration the sampling covered (the sub-range length when one was requested)."""

    def __post_init__(self) -> None:
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3:
            raise ValueError(f"frames must have shape [T, H, W, 3], got {self.frames.shape}")
        if self.frames.shape[0] != len(self.indices):
            raise ValueError(f"{self.frames.shape[0]} frames but {len(self.indices)} indices")

    @property
    def timestamps_s(self) -> list[float]:
        """Media time of each sampled frame in seconds, for the model's time prompt."""
        return [index / self.fps for index in self.indices]


# --------------------------------------------------------------------------- sampling


def _as_int(name: str, value: object) -> int:
    """Accept Python/numpy integers but not floats or bools, which hide caller bugs."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def _check_sampler_args(max_num_frames: int, min_num_frames: int, local_num_frames: int) -> None:
    """Validate the frame-count knobs so every sample is a whole number of 4-frame clips."""
    local = _as_int("local_num_frames", local_num_frames)
    if local <= 0 or local % MIN_VIDEO_FRAMES:
        raise ValueError(f"local_num_frames must be a positive multiple of 4, got {local}")
    max_frames = _as_int("max_num_frames", max_num_frames)
    if max_frames <= 0 or max_frames % MIN_VIDEO_FRAMES:
        raise ValueError(f"max_num_frames must be a positive multiple of 4, got {max_frames}")
    min_frames = _as_int("min_num_frames", min_num_frames)
    if min_frames < 0 or min_frames % MIN_VIDEO_FRAMES:
        raise ValueError(f"min_num_frames must be a non-negative multiple of 4, got {min_frames}")
    if min_frames > max_frames:
        raise ValueError(f"min_num_frames ({min_frames}) must not exceed max_num_frames ({max_frames})")


def sample_frame_indices(
    num_video_frames: int,
    fps: float,
    *,
    max_num_frames: int = 512,
    min_num_frames: int = 64,
    local_num_frames: int = 8,
) -> list[int]:
    """Pick which frames of a ``num_video_frames``-frame video at ``fps`` the model sees.

    The count is about one frame per second rounded down to a multiple of
    ``local_num_frames``, clamped to ``[min_num_frames, max_num_frames]`` (the minimum is
    lowered to what a short video can provide). Frames are then taken from the middle of
    equal-length segments; when the video has fewer frames than the count, the last index
    is repeated so the count (and thus the clip structure) is preserved.
    """
    vlen = _as_int("num_video_frames", num_video_frames)
    if vlen <= 0:
        raise ValueError(f"num_video_frames must be positive, got {vlen}")
    rate = float(fps)
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"fps must be a positive finite number, got {fps!r}")
    _check_sampler_args(max_num_frames, min_num_frames, local_num_frames)

    # "dynamic_fps1": about one frame per second, in whole local windows.
    if min_num_frames > vlen:
        min_num_frames = (vlen // local_num_frames) * local_num_frames
    num_segments = int((vlen / rate) // local_num_frames)
    num_frames = local_num_frames * max(num_segments, 1)
    num_frames = max(min_num_frames, min(num_frames, max_num_frames))

    # "middle": the centre frame of each of min(num_frames, vlen) equal segments.
    edges = np.linspace(0, vlen, min(num_frames, vlen) + 1).astype(int)
    indices: list[int] = ((edges[:-1] + edges[1:] - 1) // 2).tolist()
    indices.extend([indices[-1]] * (num_frames - len(indices)))
    return indices


# --------------------------------------------------------------------------- reading


class _Plan(NamedTuple):
    indices: list[int]
    duration_s: float


def _plan_sampling(
    file: Path,
    vlen: int,
    fps: float,
    start_s: float | None,
    end_s: float | None,
    max_num_frames: int,
    min_num_frames: int,
) -> _Plan:
    """Choose file frame indices for the whole video or the requested sub-range."""
    duration = vlen / fps
    if vlen < MIN_VIDEO_FRAMES:
        raise VideoError(
            f"{file}: only {vlen} video frame(s); at least {MIN_VIDEO_FRAMES} are needed "
            "because the model encodes 4-frame clips"
        )
    if start_s is None and end_s is None:
        indices = sample_frame_indices(vlen, fps, max_num_frames=max_num_frames, min_num_frames=min_num_frames)
        return _Plan(indices, duration)

    # Official sub-range semantics: clamp, stay 0.1 s clear of the end, then sample the
    # range as if it were a video of its own and shift back to file indices.
    start = max(0.0, 0.0 if start_s is None else start_s)
    end = min(duration - _END_MARGIN_S, duration if end_s is None else end_s)
    if end <= start:
        raise ValueError(
            f"{file}: requested range start_s={start_s}, end_s={end_s} is empty for a "
            f"{duration:.3f} s video (usable up to {duration - _END_MARGIN_S:.3f} s)"
        )
    clip_len = int((end - start) * fps)
    if clip_len < MIN_VIDEO_FRAMES:
        raise VideoError(
            f"{file}: range {start:.3f}-{end:.3f} s holds only {clip_len} frame(s) at {fps:g} fps; "
            f"at least {MIN_VIDEO_FRAMES} are needed because the model encodes 4-frame clips"
        )
    first = int(start * fps)
    indices = sample_frame_indices(clip_len, fps, max_num_frames=max_num_frames, min_num_frames=min_num_frames)
    return _Plan([first + index for index in indices], end - start)


@contextmanager
def _open_container(file: Path) -> Iterator[av.container.InputContainer]:
    """Open ``file`` for reading, turning PyAV failures into :class:`VideoError`."""
    try:
        container = av.open(str(file), mode="r")
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"{file}: not a readable video container ({e})") from e
    try:
        yield container
    finally:
        container.close()


def _video_stream(container: av.container.InputContainer, file: Path) -> av.video.stream.VideoStream:
    """The first real video stream; cover art (an attached picture) is not a video."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    raise VideoError(f"{file}: no video stream")


def _average_fps(stream: av.video.stream.VideoStream, file: Path) -> float:
    """The average frame rate (decord's ``get_avg_fps``), with fallbacks for odd containers."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0 and math.isfinite(float(rate)):
            return float(rate)
    raise VideoError(f"{file}: video stream has no usable frame rate")


def _probe(file: Path) -> tuple[int, float]:
    """Frame count and average fps, without decoding.

    The header's frame count is used when present; otherwise (Matroska, WebM, raw
    streams) video packets are counted, one packet per frame, as decord does.
    """
    with _open_container(file) as container:
        stream = _video_stream(container, file)
        fps = _average_fps(stream, file)
        if stream.frames > 0:
            return stream.frames, fps
        count = 0
        try:
            for packet in container.demux(stream):
                if packet.size > 0:
                    count += 1
        except av.FFmpegError as e:
            # A damaged tail: keep what was demuxed; decoding will confirm the real count.
            logger.warning("%s: demuxing stopped after %d packets: %s", file, count, e)
        return count, fps


def _iter_frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, file: Path
) -> Iterator[av.VideoFrame]:
    """Decoded frames in presentation order, skipping packets the decoder rejects.

    Skipping (rather than failing) keeps a mostly intact video usable; a demuxer error
    ends the stream, which the caller notices as fewer frames than promised.
    """
    bad_packets = 0
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError as e:
                bad_packets += 1
                logger.debug("%s: skipping undecodable packet: %s", file, e)
                continue
            yield from frames
    except av.FFmpegError as e:
        logger.warning("%s: demuxing stopped early: %s", file, e)
    finally:
        if bad_packets:
            logger.warning("%s: skipped %d undecodable packet(s)", file, bad_packets)


def _decode_selected(file: Path, indices: list[int]) -> tuple[np.ndarray | None, int]:
    """Decode ``file`` once, converting only the frames at ``indices`` to RGB.

    Returns the frames (``None`` if the video ended before the last wanted index) and the
    number of frames decoded, which is the true frame count when the video ran out early.
    Decoding stops right after the last wanted frame.
    """
    positions: dict[int, list[int]] = {}
    for position, index in enumerate(indices):
        positions.setdefault(index, []).append(position)
    last_wanted = max(positions)
    out: np.ndarray | None = None
    decoded = 0
    with _open_container(file) as container:
        stream = _video_stream(container, file)
        stream.thread_type = "AUTO"
        with closing(_iter_frames(container, stream, file)) as decoded_frames:
            for index, frame in enumerate(decoded_frames):
                decoded = index + 1
                wanted = positions.get(index)
                if wanted is None:
                    continue
                if out is None:
                    rgb = frame.to_ndarray(format="rgb24")
                    out = np.empty((len(indices), *rgb.shape), dtype=np.uint8)
                else:
                    # A mid-stream resolution change is scaled back to the first frame's size.
                    height, width = out.shape[1:3]
                    if (frame.height, frame.width) == (height, width):
                        rgb = frame.to_ndarray(format="rgb24")
                    else:
                        rgb = frame.to_ndarray(format="rgb24", width=width, height=height)
                out[wanted] = rgb
                if index == last_wanted:
                    return out, decoded
    return None, decoded


def load_video(
    path: str | os.PathLike[str],
    *,
    max_num_frames: int = 512,
    min_num_frames: int = 64,
    start_s: float | None = None,
    end_s: float | None = None,
) -> SampledVideo:
    """Read and sample a video file the way the official model does.

    ``start_s``/``end_s`` restrict sampling to a sub-range (``None`` means the start /
    end of the video). Raises :class:`FileNotFoundError` for a missing file,
    :class:`VideoError` for an unusable one and :class:`ValueError` for a bad request.
    """
    _check_sampler_args(max_num_frames, min_num_frames, 8)
    for name, value in (("start_s", start_s), ("end_s", end_s)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    if start_s is not None and end_s is not None and end_s <= start_s:
        raise ValueError(f"end_s ({end_s}) must be greater than start_s ({start_s})")
    if end_s is not None and end_s <= 0:
        raise ValueError(f"end_s must be positive, got {end_s}")

    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(errno.ENOENT, "video file not found", str(file))
    if not file.is_file():
        raise VideoError(f"{file}: not a regular file")
    if file.stat().st_size == 0:
        raise VideoError(f"{file}: empty file (0 bytes)")

    vlen, fps = _probe(file)
    if vlen == 0:
        raise VideoError(f"{file}: video stream has no frames")
    plan = _plan_sampling(file, vlen, fps, start_s, end_s, max_num_frames, min_num_frames)
    logger.debug("%s: %d frames at %.3f fps, sampling %d", file, vlen, fps, len(plan.indices))

    frames, decoded = _decode_selected(file, plan.indices)
    if frames is None:
        # The container promised more frames than decode; resample on the true count.
        logger.warning("%s: container reports %d frames but only %d decode", file, vlen, decoded)
        if decoded == 0:
            raise VideoError(f"{file}: no frame could be decoded")
        plan = _plan_sampling(file, decoded, fps, start_s, end_s, max_num_frames, min_num_frames)
        frames, _ = _decode_selected(file, plan.indices)
        if frames is None:
            raise VideoError(f"{file}: decoding is not repeatable (frame count changed between passes)")
    return SampledVideo(frames=frames, indices=plan.indices, fps=fps, duration_s=plan.duration_s)


# --------------------------------------------------------------------------- pixels


def preprocess_frames(frames: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """Turn uint8 RGB frames ``[T, H, W, 3]`` into encoder input, float32 ``[T, 3, S, S]``.

    Each frame is squashed (not cropped, aspect ratio not kept) to ``S x S`` with PIL
    bicubic resampling in uint8, as the official image processor does, then scaled to
    ``[0, 1]`` and normalised with the ImageNet mean and std.
    """
    size = _as_int("image_size", image_size)
    if size <= 0:
        raise ValueError(f"image_size must be positive, got {size}")
    if isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8:
            raise TypeError(f"frames must be uint8, got {frames.dtype}")
        array = frames.detach().cpu().numpy()
    elif isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise TypeError(f"frames must be uint8, got {frames.dtype}")
        array = frames
    else:
        raise TypeError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
    if array.ndim != 4 or array.shape[-1] != 3 or 0 in array.shape[1:3]:
        raise ValueError(f"frames must have shape [T, H, W, 3] with H, W > 0, got {tuple(array.shape)}")

    resized = np.empty((len(array), size, size, 3), dtype=np.uint8)
    for i, frame in enumerate(array):
        resized[i] = squash_resize(frame, size)
    return torch.from_numpy(normalize(resized))
