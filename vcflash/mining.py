"""Ask-like training videos with hard negatives (`vcflash make-dataset hard --model M`).

A long-memory Ask shows the model the clips its key index ranks highest for the question, in time order: the
answering clip among the clips that look most like it to this very model. Brief-event videos (`shapes.long_video`)
surround the event with random scenes instead, so a model trained on them alone meets its own near-misses only at
inference and reads the answer off them. Here each training video is assembled from 4 s clips: the brief events'
clips and distractor clips drawn from a pool, most of them from the top of the pool as the given model's key index
ranks it for the event's question (`hico.relevance`, exactly as `reasoner.keys` does), the rest at random.

The distractors never show an event's shape, so every question keeps one right answer; their clips are cut from
whole scenes (`shapes.random_scene`) and spliced back to back in a random order, as a selection from hours of
memory is. Questions and moments are those of brief videos (`shapes.brief_questions`). Everything but the ranking
is a pure function of the seed; the ranking is a pure function of the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from protos.clip import CLIP_FRAMES
from vcflash.shapes import (
    BRIEF_S,
    BRIEF_SCENE_SECONDS,
    COLOURS,
    SHAPES,
    LongVideo,
    Scene,
    _overlap,
    _random_sprite,
    brief_questions,
    random_scene,
    record,
    reshaped,
)

if TYPE_CHECKING:
    from hico.model import VideoChatFlashModel

CLIP_S = float(CLIP_FRAMES)  # a clip's seconds at 1 fps
VIDEO_CLIPS = (8, 16, 24, 32)  # an assembled video's length in clips: 32 to 128 s, up to the niah budget of 128 frames
HARD_SHARE = 0.75  # of the distractor clips, this share comes from the top of the ranking, the rest at random
TOP_SHARE = 0.1  # "the top of the ranking": this share of the pool clips that may stand beside the event


def cut(scene: Scene, start: float, seconds: float = CLIP_S) -> Scene:
    """The part of `scene` from `start` for `seconds`, on its own clock: sprites shifted in time (their positions
    follow, `Sprite.centre` is relative to `appear_s`), those not on screen then dropped."""
    sprites = tuple(
        replace(s, appear_s=s.appear_s - start, leave_s=s.leave_s - start)
        for s in scene.sprites
        if s.appear_s < start + seconds and s.leave_s > start
    )
    return replace(scene, seconds=seconds, sprites=sprites)


def shapes_on_screen(clip: Scene) -> frozenset[str]:
    return frozenset(s.shape for s in clip.sprites if s.appear_s < clip.seconds and s.leave_s > 0)


def pool(rng: np.random.Generator, clips: int) -> list[Scene]:
    """`clips` 4 s clips cut from random 8-24 s scenes at 1 fps, each scene drawing its sprites' shapes from a
    random one or two of the three (so that pools for one event shape and for two exist)."""
    out: list[Scene] = []
    while len(out) < clips:
        seconds = CLIP_S * int(rng.integers(BRIEF_SCENE_SECONDS[0] // 4, BRIEF_SCENE_SECONDS[1] // 4 + 1))
        allowed = [str(k) for k in rng.permutation(list(SHAPES))[: int(rng.integers(1, 3))]]
        scene = reshaped(random_scene(rng, seconds, 1), allowed, rng)
        out.extend(cut(scene, a) for a in np.arange(0.0, seconds, CLIP_S))
    return out[:clips]


def event_clip(rng: np.random.Generator, shape: str, others: Sequence[str]) -> tuple[Scene, int]:
    """A 4 s clip of a random scene whose shapes are `others`, with a `shape` of a random colour on screen
    throughout: the brief event. Returns the clip and the event sprite's index in it."""
    scene = reshaped(random_scene(rng, CLIP_S, 1), others, rng)
    colour = str(rng.choice(list(COLOURS)))
    for _ in range(200):
        sprite = replace(_random_sprite(rng, colour, shape, 0.0, CLIP_S, scene.size), leave_s=CLIP_S)
        if not any(_overlap(sprite, other, CLIP_S) for other in scene.sprites):
            break
    else:  # no room beside them: the event alone
        scene = replace(scene, sprites=())
    return replace(scene, sprites=(*scene.sprites, sprite)), len(scene.sprites)


def pick_distractors(
    rng: np.random.Generator,
    scores: np.ndarray,
    allowed: np.ndarray,
    count: int,
    hard_share: float = HARD_SHARE,
    top_share: float = TOP_SHARE,
) -> list[int]:
    """`count` pool clips among `allowed` (bool [P]): `hard_share` of them from the `top_share` best scored,
    the rest at random from the others allowed; without repeats."""
    candidates = np.flatnonzero(allowed)
    ranked = candidates[np.argsort(-scores[candidates], kind="stable")]
    top = ranked[: max(1, int(round(top_share * len(ranked))))]
    hard = rng.choice(top, min(len(top), int(round(hard_share * count))), replace=False)
    rest = np.setdiff1d(candidates, hard)
    easy = rng.choice(rest, min(len(rest), count - len(hard)), replace=False)
    return [int(i) for i in np.concatenate([hard, easy])]


def assemble(
    rng: np.random.Generator,
    clips: Sequence[Scene],
    scores: dict[str, np.ndarray],
    length: int,
    hard_share: float = HARD_SHARE,
    top_share: float = TOP_SHARE,
) -> LongVideo:
    """A video of `length` 4 s clips: one or two brief events of distinct shapes (each in a clip of its own, at a
    random position) among distractors from `clips` that show neither shape, picked by `pick_distractors` from
    `scores[shape]` (the pool ranked for "What colour is the <shape>?"), split between the events."""
    count = 1 if rng.random() < 0.5 else 2
    shapes = [str(k) for k in rng.permutation(list(SHAPES))[:count]]
    others = [k for k in SHAPES if k not in shapes]
    allowed = np.array([not (shapes_on_screen(c) & set(shapes)) for c in clips])
    events = [event_clip(rng, shape, others) for shape in shapes]
    picked: list[int] = []
    for i, shape in enumerate(shapes):
        share = (length - count) // count + (i < (length - count) % count)
        free = allowed.copy()
        free[picked] = False
        picked += pick_distractors(rng, scores[shape], free, share, hard_share, top_share)
    order = rng.permutation(len(picked) + count)  # positions: the events' first, then the distractors'
    scenes: list[Scene] = [clips[0]] * len(order)
    briefs = []
    for (clip, sprite), at in zip(events, order[:count], strict=True):
        scenes[at] = clip
        s = clip.sprites[sprite]
        briefs.append(replace(s, appear_s=float(at * CLIP_S), leave_s=float(at * CLIP_S + BRIEF_S)))
    for i, at in zip(picked, order[count:], strict=True):
        scenes[at] = clips[i]
    starts = tuple(CLIP_S * i for i in range(len(scenes)))
    return LongVideo(tuple(scenes), starts, tuple(sorted(briefs, key=lambda b: b.appear_s)))


def rank_pool(model: VideoChatFlashModel, clips: Sequence[Scene], batch: int = 32) -> dict[str, np.ndarray]:
    """Each pool clip's relevance, per shape, to "What colour is the <shape>?" by the model's key index: the clip's
    tokens through the encoder's path, its keys and the question's query at the scoring layer, scored together as
    one memory (`hico.relevance.key_scores`)."""
    import torch

    from hico.relevance import clip_keys, default_layer, key_scores, question_query
    from vcflash.niah import encode_frames

    layer = default_layer(model.config.text)
    keys = []
    for a in range(0, len(clips), batch):
        frames = [np.stack(list(c.frames())) for c in clips[a : a + batch]]
        tokens = torch.from_numpy(encode_frames(model, frames))
        keys.append(clip_keys(model, tokens, layer).float().clone())
    block = torch.cat(keys)
    return {
        shape: key_scores(question_query(model, f"What colour is the {shape}?", layer), block).numpy()
        for shape in SHAPES
    }


def make_hard_dataset(
    out: str | os.PathLike[str],
    model: VideoChatFlashModel,
    videos: int = 600,
    test_videos: int | None = None,
    pool_clips: int = 2000,
    seed: int = 0,
    progress: bool = False,
    hard_share: float = HARD_SHARE,
    top_share: float = TOP_SHARE,
) -> dict[str, Path]:
    """As `shapes.make_dataset` (OUT/videos/{train,test}, OUT/{train,test}.jsonl with moments, OUT/scenes.jsonl),
    the videos assembled by `assemble` from a pool of `pool_clips` clips per split, ranked by `model`
    (`hard_share` of the distractors from the `top_share` best ranked). The two splits draw their pools and videos
    from independent streams of the seed."""
    from tqdm.auto import tqdm

    out = Path(out)
    test_videos = max(10, videos // 5) if test_videos is None else test_videos
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl"}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scenes.jsonl", "w") as scenes:
        for (split, count), seq in zip(
            (("train", videos), ("test", test_videos)), np.random.SeedSequence(seed).spawn(2), strict=True
        ):
            rng = np.random.default_rng(seq)
            clips = pool(rng, pool_clips)
            scores = rank_pool(model, clips)
            (out / "videos" / split).mkdir(parents=True, exist_ok=True)
            with open(paths[split], "w") as lines:
                for i in tqdm(range(count), desc=f"{split} videos", disable=not progress):
                    video = f"videos/{split}/{i:05d}.mp4"
                    long = assemble(rng, clips, scores, int(rng.choice(VIDEO_CLIPS)), hard_share, top_share)
                    long.write(out / video)
                    scenes.write(json.dumps({"video": video, "scene": long.to_dict()}) + "\n")
                    for j, qa in enumerate(brief_questions(long, rng)):
                        lines.write(json.dumps(record(video, qa, f"{split}-{i:05d}-{j:02d}")) + "\n")
    return paths
