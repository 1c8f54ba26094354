"""`vcflash make-dataset hard`: Ask-like videos of brief events among the clips a model's key index ranks highest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from hico import VideoChatFlash
from hico.dataset import read_samples
from hico.relevance import clip_keys, default_layer, key_scores, question_query
from vcflash import mining
from vcflash.niah import encode_frames
from vcflash.shapes import BRIEF_S, SHAPES, random_scene


def test_a_cut_shows_what_the_scene_showed_then() -> None:
    scene = random_scene(np.random.default_rng(3), 16.0, 1)
    frames = list(scene.frames())
    for start in (0.0, 4.0, 12.0):
        clip = mining.cut(scene, start)
        assert clip.seconds == 4.0
        assert all(
            np.array_equal(a, b) for a, b in zip(clip.frames(), frames[int(start) : int(start) + 4], strict=True)
        )


def test_assembled_videos_hide_the_event_shape_everywhere_else_and_take_most_distractors_from_the_top() -> None:
    rng = np.random.default_rng(0)
    clips = mining.pool(rng, 400)
    scores = {shape: rng.random(len(clips)) for shape in SHAPES}
    for length in mining.VIDEO_CLIPS * 3:
        video = mining.assemble(rng, clips, scores, length)
        assert len(video.scenes) == length and video.starts == tuple(4.0 * i for i in range(length))
        assert 1 <= len(video.briefs) <= 2 and len({b.shape for b in video.briefs}) == len(video.briefs)
        events = {int(b.appear_s // 4) for b in video.briefs}
        for b in video.briefs:
            assert b.appear_s % 4 == 0 and b.leave_s == b.appear_s + BRIEF_S  # a whole clip
            shown = [i for i, s in enumerate(video.scenes) if b.shape in mining.shapes_on_screen(s)]
            assert shown == [int(b.appear_s // 4)]
            assert [s.colour for s in video.scenes[shown[0]].sprites if s.shape == b.shape] == [b.colour]
        # the distractors: distinct pool clips, most of them among the best scored that may stand there
        picked = [next(i for i, c in enumerate(clips) if c is s) for j, s in enumerate(video.scenes) if j not in events]
        assert len(set(picked)) == len(picked) == length - len(video.briefs)
        shapes = {b.shape for b in video.briefs}
        allowed = np.array([not (mining.shapes_on_screen(c) & shapes) for c in clips])
        tops = set()
        for b in video.briefs:
            ranked = np.flatnonzero(allowed)[np.argsort(-scores[b.shape][allowed])]
            tops |= set(ranked[: round(mining.TOP_SHARE * len(ranked))].tolist())
        assert sum(i in tops for i in picked) >= round(mining.HARD_SHARE * len(picked)) - len(video.briefs)


def test_the_pool_is_ranked_by_the_key_index(tiny_base: Path) -> None:
    model = VideoChatFlash.from_pretrained(tiny_base).eval()
    clips = mining.pool(np.random.default_rng(1), 6)
    scores = mining.rank_pool(model, clips, batch=4)
    layer = default_layer(model.config.text)
    tokens = torch.from_numpy(encode_frames(model, [np.stack(list(c.frames())) for c in clips]))
    keys = clip_keys(model, tokens, layer).float()
    for shape in SHAPES:
        expected = key_scores(question_query(model, f"What colour is the {shape}?", layer), keys).numpy()
        np.testing.assert_allclose(scores[shape], expected, rtol=1e-5, atol=1e-7)
        assert abs(float(scores[shape].sum()) - 1.0) < 1e-4  # one softmax over the whole pool


def test_a_hard_data_set_is_training_format_with_moments(tiny_base: Path, tmp_path: Path) -> None:
    model = VideoChatFlash.from_pretrained(tiny_base).eval()
    paths = mining.make_hard_dataset(tmp_path, model, videos=2, test_videos=1, pool_clips=40, seed=3)
    samples = read_samples(paths["train"])
    assert {s.extra["category"] for s in samples} <= {"colour", "presence", "order"}
    assert samples and all(len(s.moments) in (1, 2) and s.video.is_file() for s in samples)
    scenes = {json.loads(line)["video"]: json.loads(line)["scene"] for line in open(tmp_path / "scenes.jsonl")}
    assert len(scenes) == 3
    for s in samples:
        briefs = scenes[str(s.video.relative_to(tmp_path))]["briefs"]
        assert set(s.moments) <= {(b["appear_s"], b["leave_s"]) for b in briefs}
    again = mining.make_hard_dataset(tmp_path / "again", model, videos=2, test_videos=1, pool_clips=40, seed=3)
    assert again["train"].read_text() == paths["train"].read_text()  # a pure function of the seed and the model
