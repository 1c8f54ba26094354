"""Training data: the LLaVA / VideoChat-Flash JSON lines, every problem named by its line, bad videos reported."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hico import VideoChatFlash
from hico.dataset import DataError, FrameCache, check_videos, read_samples, sample_video
from tests.train.conftest import conversation, write_lines


def test_official_format_reads(tmp_path: Path, videos: list[Path]) -> None:
    lines = [
        # the official data moves <image> to the front, so its place in the turn does not matter
        {"id": 7, "video": videos[0].name, "conversations": conversation("What is it?", "A square.")},
        {
            "video": videos[1].name,
            "start": 1,
            "end": 7.5,
            "category": "colour",
            "conversations": [
                {"from": "system", "value": "ignored: the template has its own"},
                {"from": "human", "value": "Look: <image> What colour?"},
                {"from": "gpt", "value": " red "},
                {"from": "human", "value": "And the background?"},
                {"from": "gpt", "value": "grey"},
            ],
        },
        "",  # blank lines are skipped
        {
            "video": videos[2].name,
            "conversations": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
        },
    ]
    (tmp_path / "v").mkdir()
    path = write_lines(tmp_path / "d.jsonl", lines)
    samples = read_samples(path, data_root=videos[0].parent)
    assert [s.where for s in samples] == [f"{path}:1", f"{path}:2", f"{path}:4"]
    assert (
        samples[0].id == "7" and samples[0].video == videos[0] and samples[0].turns == (("What is it?", "A square."),)
    )
    assert samples[1].turns == (("Look:  What colour?", "red"), ("And the background?", "grey"))
    assert (samples[1].start_s, samples[1].end_s, samples[1].extra) == (1.0, 7.5, {"category": "colour"})
    assert samples[2].turns == (("Q", "A"),)
    # a JSON array (the official annotation files) reads too, video paths relative to the file by default
    array = tmp_path / "d.json"
    array.write_text(json.dumps([{"video": "x.mp4", "conversations": conversation("Q", "A")}]))
    [s] = read_samples(array)
    assert s.video == tmp_path / "x.mp4" and s.where == f"{array}[0]"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not a JSON object"),
        ('["a list"]', "expected a JSON object"),
        ({"conversations": conversation("Q", "A")}, "no `video` key"),
        ({"image": "a.jpg", "conversations": conversation("Q", "A")}, "only videos are trained on"),
        ({"video": "a.mp4"}, "`conversations` must be a non-empty list"),
        ({"video": "a.mp4", "conversations": [{"from": "human", "value": "<image>Q"}]}, "must alternate"),
        ({"video": "a.mp4", "conversations": [{"from": "bot", "value": "x"}]}, "needs `from` human/gpt"),
        ({"video": "a.mp4", "conversations": conversation("Q", "A")[:1] * 2}, "must alternate"),
        (
            {"video": "a.mp4", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
            "<image> placeholder exactly once",
        ),
        ({"video": "a.mp4", "conversations": conversation("<image> Q", "A")}, "exactly once"),
        ({"video": "a.mp4", "conversations": conversation("Q <|im_end|>", "A")}, "reserved marker <|im_end|>"),
        ({"video": "a.mp4", "conversations": conversation("Q", "  ")}, "is empty"),
        ({"video": "a.mp4", "start": 5, "end": 2, "conversations": conversation("Q", "A")}, "must be after"),
        ({"video": "a.mp4", "start": "x", "conversations": conversation("Q", "A")}, "`start` must be seconds"),
        ({"video": ["a.mp4", "b.mp4"], "conversations": conversation("Q", "A")}, "must be one path"),
        ({"video": "a.mp4", "moments": [[4, 2]], "conversations": conversation("Q", "A")}, "0 <= start < end"),
        ({"video": "a.mp4", "moments": [[-1, 2]], "conversations": conversation("Q", "A")}, "0 <= start < end"),
        ({"video": "a.mp4", "moments": [[1, "2"]], "conversations": conversation("Q", "A")}, "[start, end] seconds"),
        ({"video": "a.mp4", "moments": [3, 4], "conversations": conversation("Q", "A")}, "[start, end] seconds"),
        ({"video": "a.mp4", "moments": {"a": 1}, "conversations": conversation("Q", "A")}, "`moments` must be a list"),
        ({"video": "a.mp4", "moments": [[0, 1]] * 65, "conversations": conversation("Q", "A")}, "at most 64"),
    ],
)
def test_a_malformed_line_is_named(tmp_path: Path, line: object, message: str) -> None:
    good = {"video": "a.mp4", "conversations": conversation("Q", "A")}
    path = write_lines(tmp_path / "d.jsonl", [good, good, line])
    with pytest.raises(DataError) as e:
        read_samples(path)
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)


def test_an_empty_file_and_a_missing_one(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no samples"):
        read_samples(write_lines(tmp_path / "d.jsonl", ["", "  "]))
    with pytest.raises(FileNotFoundError, match="no such training file"):
        read_samples(tmp_path / "nope.jsonl")


def test_missing_and_corrupt_videos_are_reported_with_their_lines(tmp_path: Path, videos: list[Path]) -> None:
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_text("this is not a video\n" * 10)
    lines = [
        {"video": str(videos[0]), "conversations": conversation("Q", "A")},
        {"video": str(tmp_path / "missing.mp4"), "conversations": conversation("Q", "A")},
        {"video": str(corrupt), "conversations": conversation("Q", "A")},
        {"video": str(tmp_path / "missing.mp4"), "conversations": conversation("Q2", "A")},
    ]
    path = write_lines(tmp_path / "d.jsonl", lines)
    kept, report = check_videos(read_samples(path), "skip")
    assert [s.where for s in kept] == [f"{path}:1"]
    assert len(report) == 2
    missing = next(r for r in report if "missing.mp4" in r)
    assert "missing" in missing and f"{path}:2" in missing and f"{path}:4" in missing
    bad = next(r for r in report if "corrupt.mp4" in r)
    assert "unreadable" in bad and f"{path}:3" in bad
    with pytest.raises(DataError) as e:
        check_videos(read_samples(path), "fail")
    assert f"{path}:2" in str(e.value) and f"{path}:3" in str(e.value)


def test_frames_are_the_ones_ask_uses(tiny_base: Path, data: Path) -> None:
    """The training sampler is VideoChatFlash.answer's: same frames, same time message, same tokens."""
    model = VideoChatFlash.from_pretrained(tiny_base)
    sample = read_samples(data)[4]  # the 16 s video at 1 fps: all 16 frames
    video = sample_video(sample, 512)
    cached = FrameCache(model.config.vision.image_size, 512).get(sample)
    assert len(video.frames) == len(cached.pixels) == 16 and cached.duration_s == video.duration_s == 16.0
    tokens = model.encode_clips(model.preprocess(cached.pixels))  # squashed first: the same pixels
    assert torch.equal(tokens, model.encode_clips(model.preprocess(video.frames)))
    question = sample.turns[0][0]
    from_file = model.answer(str(sample.video), question, max_new_tokens=6, repetition_penalty=1.0)
    from_cache = model.answer(tokens, question, duration_s=cached.duration_s, max_new_tokens=6, repetition_penalty=1.0)
    assert (from_file.num_frames, from_file.duration_s, from_file.prompt_tokens) == (
        16,
        16.0,
        from_cache.prompt_tokens,
    )
    assert from_file.token_ids == from_cache.token_ids


def test_moments_say_which_clips_answer(tmp_path: Path, videos: list[Path], tiny_base: Path) -> None:
    """`moments` ([start, end] seconds on the video's clock) become the clips whose frames fall inside them."""
    line = {"video": str(videos[2]), "moments": [[8, 9.5], [14.0, 20]], "conversations": conversation("Q", "A")}
    [sample] = read_samples(write_lines(tmp_path / "d.jsonl", [line]))
    assert sample.moments == ((8.0, 9.5), (14.0, 20.0)) and "moments" not in sample.extra
    model = VideoChatFlash.from_pretrained(tiny_base)
    frames = FrameCache(model.config.vision.image_size, 512).get(sample)  # 16 frames at 1 fps: t = 0, 1, ..., 15
    assert frames.times_s.tolist() == [float(t) for t in range(16)]
    assert frames.clips_within(sample.moments, 4) == [2, 3]  # frames 8, 9 (clip 2) and 14, 15 (clip 3)
    assert frames.clips_within([(3.5, 4.0)], 4) == [1]  # frame 4 only
    assert frames.clips_within([(16.5, 30.0)], 4) == []  # after the last frame
    ranged = read_samples(write_lines(tmp_path / "r.jsonl", [line | {"start": 8, "end": 16}]))[0]
    assert FrameCache(model.config.vision.image_size, 512).get(ranged).clips_within(ranged.moments, 4) == [0, 1]


def test_a_frame_cache_directory_serves_later_runs_and_misses_what_changed(
    data: Path, videos: list[Path], tmp_path: Path
) -> None:
    """Frames kept on disk are the decoded ones; another cache on the same directory (a later run) decodes nothing;
    another frame budget, an unreadable file or an edited video is decoded again."""
    samples = read_samples(data)
    root = tmp_path / "frames"

    def cache(max_frames: int = 512) -> FrameCache:
        return FrameCache(112, max_frames, directory=root)

    first = cache()
    decoded = [first.get(s) for s in samples]
    assert first.decoded == len(videos)  # once per video: its two questions share it
    assert len(list(root.glob("*.npz"))) == len(videos) and not list(root.glob("*.tmp"))

    later = cache()
    for s, d in zip(samples, decoded, strict=True):
        f = later.get(s)
        assert np.array_equal(f.pixels, d.pixels) and np.array_equal(f.times_s, d.times_s)
        assert f.duration_s == d.duration_s
    assert later.decoded == 0

    budget = cache(8)
    assert len(budget.get(samples[0]).pixels) == 8 and budget.decoded == 1

    for p in root.glob("*.npz"):
        p.write_bytes(b"not an npz")
    again = cache()
    assert np.array_equal(again.get(samples[0]).pixels, decoded[0].pixels) and again.decoded == 1
    rewritten = cache()
    rewritten.get(samples[0])
    assert rewritten.decoded == 0

    edited = tmp_path / "edited.mp4"  # a copy, touched as if edited after the first run cached it
    edited.write_bytes(Path(samples[0].video).read_bytes())
    sample = replace(samples[0], video=edited)
    cache().get(sample)
    os.utime(edited, ns=(edited.stat().st_atime_ns, edited.stat().st_mtime_ns + 10**9))
    after = cache()
    after.get(sample)
    assert after.decoded == 1


def test_a_frame_cache_that_cannot_write_still_gives_the_frames(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk fails the cache, not the video: the frames come back decoded, with a warning, and no file is left."""
    sample = read_samples(data)[0]
    reference = FrameCache(112, 512).get(sample)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with caplog.at_level("WARNING", logger="hico.dataset"):
        frames = FrameCache(112, 512, directory=tmp_path / "frames").get(sample)
    assert np.array_equal(frames.pixels, reference.pixels)
    assert "No space left" in caplog.text and not list((tmp_path / "frames").iterdir())
