"""Tests for hico.video: frame sampling, video reading and pixel preprocessing.

Test videos are encoded with PyAV. Each frame is two flat grey blocks whose levels
encode the frame index (high and low base-16 digit), so the tests can tell exactly
which frames a reader returned even after lossy compression.
"""

import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from hico.pixels import IMAGENET_MEAN, IMAGENET_STD
from hico.video import (
    SampledVideo,
    VideoError,
    load_video,
    preprocess_frames,
    sample_frame_indices,
)

WIDTH, HEIGHT = 64, 48


def _frame_for_index(index: int) -> np.ndarray:
    assert 0 <= index < 256
    frame = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    frame[:, : WIDTH // 2] = 16 * (index // 16) + 8
    frame[:, WIDTH // 2 :] = 16 * (index % 16) + 8
    return frame


def _index_of_frame(frame: np.ndarray) -> int:
    """Read back the index from the interior of both blocks (edges blur under compression)."""
    high = frame[8:-8, 4 : WIDTH // 2 - 4].mean()
    low = frame[8:-8, WIDTH // 2 + 4 : -4].mean()
    return 16 * round((high - 8) / 16) + round((low - 8) / 16)


def _write_video(path: Path, num_frames: int, fps: int = 25, *, options: dict[str, str] | None = None) -> Path:
    with av.open(str(path), mode="w", options=options or {}) as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = WIDTH, HEIGHT
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(_frame_for_index(index), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def video_150(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 s at 25 fps (150 frames) in MP4, where the header carries the frame count."""
    return _write_video(tmp_path_factory.mktemp("video") / "clip.mp4", 150)


def _decoded_indices(video: SampledVideo) -> list[int]:
    return [_index_of_frame(frame) for frame in video.frames]


# --------------------------------------------------------------------------- sampler


def test_sampler_short_video_is_floored_to_64_middle_frames() -> None:
    indices = sample_frame_indices(300, 30.0)  # 10 s: ~1 fps would be 8, the floor is 64
    assert len(indices) == 64
    # Segment edges are floor(k * 300 / 64) = 0, 4, 9, 14, 18, ...; centres (a + b - 1) // 2.
    assert indices[:4] == [1, 6, 11, 15]
    assert indices[-1] == 297  # last segment is frames 295..299


@pytest.mark.parametrize(
    ("vlen", "fps", "expected"),
    [
        (3600, 1.0, 512),  # 1 h at 1 fps: capped
        (36000, 30.0, 512),  # 20 min: capped
        (2500, 25.0, 96),  # 100 s: 12 windows of 8
        (3000, 30.0, 96),  # 100 s
        (6000, 30.0, 200),  # 200 s: 25 windows of 8
        (1920, 30.0, 64),  # 64 s: exactly the floor
        (50, 25.0, 48),  # fewer than 64 frames: floor lowered to 48
        (9, 30.0, 8),
        (6, 30.0, 8),  # fewer than 8 frames: padded to one window
    ],
)
def test_sampler_frame_counts(vlen: int, fps: float, expected: int) -> None:
    assert len(sample_frame_indices(vlen, fps)) == expected


def test_sampler_hand_checked_indices() -> None:
    # 20 frames at 10 fps: floor becomes 16; edges floor(k * 1.25) = 0,1,2,3,5,6,7,8,10,...
    assert sample_frame_indices(20, 10.0) == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15, 16, 17, 18]
    # 6 frames: every frame once, then the last one repeated up to 8.
    assert sample_frame_indices(6, 30.0) == [0, 1, 2, 3, 4, 5, 5, 5]


def test_sampler_respects_custom_limits() -> None:
    assert len(sample_frame_indices(3600, 1.0, max_num_frames=128)) == 128
    assert len(sample_frame_indices(300, 30.0, max_num_frames=16, min_num_frames=8)) == 8
    assert len(sample_frame_indices(300, 30.0, min_num_frames=0, local_num_frames=4)) == 8  # 10 s // 4


def test_sampler_properties_over_many_videos() -> None:
    for fps in (0.5, 1.0, 10.0, 23.976, 30.0, 60.0):
        for vlen in range(8, 6000, 37):
            indices = sample_frame_indices(vlen, fps)
            n = len(indices)
            assert n % 8 == 0 and 8 <= n <= 512, (vlen, fps, n)
            assert n >= min(64, vlen // 8 * 8), (vlen, fps, n)
            assert 0 <= indices[0] and indices[-1] < vlen, (vlen, fps)
            assert all(a <= b for a, b in zip(indices, indices[1:], strict=False)), (vlen, fps)
            if n <= vlen:
                assert len(set(indices)) == n, (vlen, fps)
            # roughly one frame per second once above the floor and below the cap
            if 64 < n < 512:
                assert abs(n - vlen / fps) < 8, (vlen, fps, n)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((0, 30.0), {}, "num_video_frames must be positive, got 0"),
        ((-5, 30.0), {}, "got -5"),
        ((100, 0.0), {}, "fps must be a positive finite number, got 0.0"),
        ((100, -1.0), {}, "got -1.0"),
        ((100, math.nan), {}, "got nan"),
        ((100, math.inf), {}, "got inf"),
        ((100, 30.0), {"max_num_frames": 0}, "max_num_frames must be a positive multiple of 4, got 0"),
        ((100, 30.0), {"max_num_frames": 66}, "got 66"),
        ((100, 30.0), {"min_num_frames": 6}, "min_num_frames must be a non-negative multiple of 4, got 6"),
        ((100, 30.0), {"max_num_frames": 32}, "min_num_frames (64) must not exceed max_num_frames (32)"),
        ((100, 30.0), {"local_num_frames": 3}, "local_num_frames must be a positive multiple of 4, got 3"),
    ],
)
def test_sampler_rejects_bad_arguments(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        sample_frame_indices(*args, **kwargs)
    assert message in str(info.value)


def test_sampler_rejects_non_integer_frame_count() -> None:
    with pytest.raises(TypeError, match="num_video_frames must be an integer, got float 100.0"):
        sample_frame_indices(100.0, 30.0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- load_video


def test_load_video_returns_the_sampled_frames(video_150: Path) -> None:
    video = load_video(video_150)
    expected = sample_frame_indices(150, 25.0)
    assert len(expected) == 64
    assert video.indices == expected
    assert video.frames.dtype == np.uint8
    assert video.frames.shape == (64, HEIGHT, WIDTH, 3)
    assert _decoded_indices(video) == expected  # the pixels really are those frames
    assert video.fps == 25.0
    assert video.duration_s == pytest.approx(6.0)
    assert video.timestamps_s[:3] == pytest.approx([0.0, 2 / 25, 5 / 25])  # indices 0, 2, 5
    assert video.timestamps_s == pytest.approx([i / 25 for i in expected])


def test_load_video_honours_frame_limits(video_150: Path) -> None:
    video = load_video(video_150, max_num_frames=16, min_num_frames=8)
    assert video.indices == [8, 27, 46, 65, 83, 102, 121, 140]  # 6 s -> one window of 8
    assert _decoded_indices(video) == video.indices


def test_load_video_sub_range(video_150: Path) -> None:
    video = load_video(video_150, start_s=2.0, end_s=4.0)
    # 2 s at 25 fps = 50 frames from frame 50; floor lowered to 48 for a 50-frame clip.
    expected = [50 + i for i in sample_frame_indices(50, 25.0)]
    assert len(expected) == 48
    assert video.indices == expected
    assert _decoded_indices(video) == expected
    assert video.duration_s == pytest.approx(2.0)
    assert all(2.0 <= t < 4.0 for t in video.timestamps_s)


def test_load_video_sub_range_truncates_to_whole_frames(video_150: Path) -> None:
    video = load_video(video_150, start_s=2.03, end_s=4.0)
    # first = int(2.03 * 25) = int(50.75) = 50; length = int(1.97 * 25) = int(49.25) = 49 frames.
    expected = [50 + i for i in sample_frame_indices(49, 25.0)]
    assert video.indices == expected
    assert _decoded_indices(video) == expected
    assert video.duration_s == pytest.approx(1.97)


def test_load_video_open_ended_range_stops_short_of_the_end(video_150: Path) -> None:
    video = load_video(video_150, start_s=5.0)
    # end = 6.0 - 0.1 = 5.9 s -> int(0.9 * 25) = 22 frames from 125 -> 16 frames.
    assert video.duration_s == pytest.approx(0.9)
    assert video.indices == [125 + i for i in sample_frame_indices(22, 25.0)]
    assert len(video.indices) == 16
    assert _decoded_indices(video) == video.indices
    video = load_video(video_150, end_s=1.0)
    assert video.indices == sample_frame_indices(25, 25.0)
    assert _decoded_indices(video) == video.indices


def test_load_video_counts_packets_when_the_header_has_no_frame_count(tmp_path: Path) -> None:
    path = _write_video(tmp_path / "clip.mkv", 150)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # Matroska: no count in the header
    video = load_video(path)
    assert video.indices == sample_frame_indices(150, 25.0)
    assert _decoded_indices(video) == video.indices


def test_load_video_pads_a_very_short_video(tmp_path: Path) -> None:
    video = load_video(_write_video(tmp_path / "six.mp4", 6))
    assert video.indices == [0, 1, 2, 3, 4, 5, 5, 5]
    assert _decoded_indices(video) == video.indices
    assert np.array_equal(video.frames[7], video.frames[5])


def test_load_video_resamples_when_the_file_is_truncated(tmp_path: Path) -> None:
    full = _write_video(tmp_path / "full.mp4", 150, options={"movflags": "faststart"})
    data = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])  # header still says 150 frames
    with av.open(str(cut)) as container:
        stream = container.streams.video[0]
        assert stream.frames == 150
        decodable = sum(len(packet.decode()) for packet in container.demux(stream))
    assert 8 <= decodable < 150
    video = load_video(cut)
    assert video.indices == sample_frame_indices(decodable, 25.0)
    assert _decoded_indices(video) == video.indices
    assert video.duration_s == pytest.approx(decodable / 25)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.mp4"
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        load_video(path)


def test_text_file_is_not_a_video(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 50)
    with pytest.raises(VideoError, match=r"notes\.mp4: not a readable video container"):
        load_video(path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.touch()
    with pytest.raises(VideoError, match=r"empty\.mp4: empty file"):
        load_video(path)


def test_directory_is_not_a_video(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="not a regular file"):
        load_video(tmp_path)


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        samples = np.zeros((1, 800), dtype=np.int16)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(VideoError, match=r"tone\.wav: no video stream"):
        load_video(path)


def test_two_frame_video_is_too_short(tmp_path: Path) -> None:
    path = _write_video(tmp_path / "two.mp4", 2)
    with pytest.raises(VideoError, match=r"two\.mp4: only 2 video frame\(s\); at least 4"):
        load_video(path)


def test_range_with_too_few_frames(video_150: Path) -> None:
    with pytest.raises(VideoError, match="holds only 2 frame"):
        load_video(video_150, start_s=1.0, end_s=1.1)


@pytest.mark.parametrize(
    ("start_s", "end_s", "message"),
    [
        (4.0, 2.0, r"end_s \(2.0\) must be greater than start_s \(4.0\)"),
        (3.0, 3.0, "must be greater than start_s"),
        (None, -1.0, "end_s must be positive"),
        (math.nan, None, "start_s must be finite"),
        (7.0, None, "is empty for a 6.000 s video"),  # starts after the end
        (5.95, 6.0, "is empty"),  # inside the final 0.1 s, which is never used
    ],
)
def test_bad_ranges(video_150: Path, start_s: float | None, end_s: float | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_video(video_150, start_s=start_s, end_s=end_s)


# --------------------------------------------------------------------------- preprocess


def test_preprocess_shape_and_dtype() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (3, HEIGHT, WIDTH, 3), dtype=np.uint8)
    out = preprocess_frames(frames, 32)
    assert out.shape == (3, 3, 32, 32)
    assert out.dtype == torch.float32
    assert out.is_contiguous()


def test_preprocess_constant_colour_normalises_by_hand() -> None:
    frames = np.empty((2, 30, 50, 3), dtype=np.uint8)
    frames[...] = (255, 128, 0)
    out = preprocess_frames(frames, 16)
    expected = [
        (1.0 - 0.485) / 0.229,  # 2.2489...
        (128 / 255 - 0.456) / 0.224,  # 0.2051...
        (0.0 - 0.406) / 0.225,  # -1.8044...
    ]
    for channel in range(3):
        assert torch.allclose(out[:, channel], torch.full((2, 16, 16), expected[channel]), atol=1e-6)
    assert expected[0] == pytest.approx(2.24890829, abs=1e-7)


def test_preprocess_squashes_rather_than_crops() -> None:
    # A wide frame of four vertical stripes; a centre crop would lose the outer two.
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    frame = np.empty((40, 160, 3), dtype=np.uint8)
    for i, colour in enumerate(colours):
        frame[:, 40 * i : 40 * (i + 1)] = colour
    out = preprocess_frames(frame[None], 32)[0]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = ((out * std + mean) * 255).round()
    for i, colour in enumerate(colours):
        column = 8 * i + 4  # centre of the i-th stripe after squashing 160 -> 32 wide
        for row in (0, 16, 31):  # full height kept
            assert rgb[:, row, column].tolist() == list(map(float, colour)), (i, row)


def test_preprocess_matches_the_reference_formula_exactly() -> None:
    frames = np.random.default_rng(1).integers(0, 256, (2, 37, 53, 3), dtype=np.uint8)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    reference = []
    for frame in frames:
        resized = np.asarray(Image.fromarray(frame).resize((24, 24), Image.Resampling.BICUBIC))
        scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
        reference.append(((scaled - mean) / std).transpose(2, 0, 1))
    assert np.array_equal(preprocess_frames(frames, 24).numpy(), np.stack(reference))


def test_preprocess_accepts_torch_input() -> None:
    frames = np.random.default_rng(2).integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    assert torch.equal(preprocess_frames(torch.from_numpy(frames), 12), preprocess_frames(frames, 12))


def test_preprocess_empty_batch() -> None:
    assert preprocess_frames(np.zeros((0, 8, 8, 3), dtype=np.uint8), 4).shape == (0, 3, 4, 4)


@pytest.mark.parametrize(
    ("frames", "error", "message"),
    [
        (np.zeros((1, 8, 8, 3), dtype=np.float32), TypeError, "must be uint8, got float32"),
        (torch.zeros((1, 8, 8, 3)), TypeError, "must be uint8, got torch.float32"),
        (np.zeros((8, 8, 3), dtype=np.uint8), ValueError, r"got \(8, 8, 3\)"),
        (np.zeros((1, 8, 8, 4), dtype=np.uint8), ValueError, r"got \(1, 8, 8, 4\)"),
        (np.zeros((1, 0, 8, 3), dtype=np.uint8), ValueError, r"got \(1, 0, 8, 3\)"),
        ([[[[0, 0, 0]]]], TypeError, "got list"),
    ],
)
def test_preprocess_rejects_bad_input(frames: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        preprocess_frames(frames, 8)  # type: ignore[arg-type]


def test_preprocess_rejects_bad_size() -> None:
    with pytest.raises(ValueError, match="image_size must be positive, got 0"):
        preprocess_frames(np.zeros((1, 8, 8, 3), dtype=np.uint8), 0)


def test_load_then_preprocess(video_150: Path) -> None:
    pixels = preprocess_frames(load_video(video_150).frames, 32)
    assert pixels.shape == (64, 3, 32, 32)
    assert torch.isfinite(pixels).all()
