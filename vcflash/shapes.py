"""Synthetic shapes scenes: coloured shapes moving over textured backgrounds, with templated questions.

A `Scene` is a logged plan (which shape appears when, where it goes, when it leaves), rendered frame by frame
and written as H.264 with `vcflash.media.write_video`. `make_dataset` writes videos and question/answer lines
in the LLaVA / VideoChat-Flash training format (one JSON object a line: `video` plus `conversations`, the
`<image>` placeholder opening the first human turn), with a `category` and the answer `choices` kept beside them
for `vcflash eval qa`. Everything is a pure function of the seed.

The scenes are built to be answerable from about one frame a second in 4-frame clips: every shape stays at
least 4 s, moves at least 40 px, and two shapes asked about in an order question first show up at least 4 s
apart.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from itertools import pairwise
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vcflash.media import write_video

COLOURS = {"red": (215, 35, 35), "green": (35, 175, 60), "blue": (40, 80, 225), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
LABELS = {"shape": SHAPES, "colour": tuple(COLOURS), "direction": tuple(DIRECTIONS)}  # what a sprite is, per patch
CATEGORIES = ("colour", "shape", "count", "direction", "presence", "order", "list", "describe")
FREE_TEXT = ("list", "describe")  # answers without a fixed set of choices
SIZE = (320, 240)  # width, height: the test video's size
MIN_STAY_S = 4.0  # every shape is on screen at least this long
MIN_TRAVEL_PX = 40.0
ORDER_GAP_S = 4.0  # first appearances this far apart (a 4-frame clip at 1 fps) make an order question
ORDER_MIN_SECONDS = MIN_STAY_S + 2 * ORDER_GAP_S + 1  # three staggered appearances on the half-second grid fit


@dataclass(frozen=True)
class Sprite:
    """One shape: where it is at `appear_s`, where it heads and how fast, and when it leaves."""

    colour: str
    shape: str
    size: int  # bounding-box side, px
    x: float  # centre at appear_s, px
    y: float
    direction: str
    speed: float  # px/s
    appear_s: float
    leave_s: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def visible(self, t: float) -> bool:
        return self.appear_s <= t < self.leave_s

    def centre(self, t: float) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        travelled = self.speed * (t - self.appear_s)
        return self.x + dx * travelled, self.y + dy * travelled


@dataclass(frozen=True)
class Background:
    """A static low-saturation texture: stripes, a checkerboard, smooth noise or a plain gradient."""

    kind: str
    base: tuple[int, int, int]
    contrast: float
    period: float  # stripes and checkers: px; noise: cells across
    angle: float  # stripes: radians
    seed: int  # noise

    def render(self, width: int, height: int) -> np.ndarray:
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        if self.kind == "stripes":
            wave = np.sin(2 * math.pi * (x * math.cos(self.angle) + y * math.sin(self.angle)) / self.period)
        elif self.kind == "checker":
            wave = ((x // self.period + y // self.period) % 2) * 2 - 1
        elif self.kind == "noise":
            cells = int(self.period)
            grid = np.random.default_rng(self.seed).uniform(-1, 1, (cells * height // width + 2, cells + 2))
            image = Image.fromarray(((grid + 1) * 127.5).astype(np.uint8))
            wave = np.asarray(image.resize((width, height), Image.BICUBIC), dtype=np.float32) / 127.5 - 1
        else:  # plain: a gentle diagonal gradient
            wave = (x / width + y / height) - 1
        out = np.asarray(self.base, dtype=np.float32) + self.contrast * wave[..., None]
        return np.clip(out, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, s: Sprite, t: float, fill: tuple[int, int, int] | float) -> None:
    cx, cy = s.centre(t)
    h = s.size / 2
    box = (cx - h, cy - h, cx + h, cy + h)
    if s.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif s.shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # an upright triangle
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)


@dataclass(frozen=True)
class Scene:
    seconds: float
    fps: int
    background: Background
    sprites: tuple[Sprite, ...]
    size: tuple[int, int] = SIZE

    def frame(self, t: float, background: np.ndarray | None = None) -> np.ndarray:
        """The picture at time t, uint8 [H, W, 3]."""
        width, height = self.size
        image = Image.fromarray(self.background.render(width, height) if background is None else background)
        draw = ImageDraw.Draw(image)
        for s in self.sprites:
            if s.visible(t):
                _draw(draw, s, t, COLOURS[s.colour])
        return np.asarray(image)

    def patch_labels(self, t: float, grid: int, key: str) -> np.ndarray:
        """What covers each cell of a grid x grid patch grid over the squashed frame at time t, as area fractions
        [1 + K, grid, grid]: background first, then each of the K kinds of `key` (`LABELS`: shape, colour or the
        direction it moves). The dense labels that teach a vision tower what the scenes show (`vcflash.pretrain`)."""
        maps = []
        for kind in LABELS[key]:
            sprites = [s for s in self.sprites if s.visible(t) and getattr(s, key) == kind]
            if not sprites:  # most kinds are absent from a frame: no full-size mask to draw and shrink
                maps.append(np.zeros((grid, grid), np.float32))
                continue
            mask = Image.new("F", self.size, 0.0)
            draw = ImageDraw.Draw(mask)
            for s in sprites:
                _draw(draw, s, t, 1.0)
            maps.append(np.asarray(mask.resize((grid, grid), Image.Resampling.BOX)))  # the mean over each cell
        covered = np.stack(maps)
        return np.concatenate([np.clip(1.0 - covered.sum(0, keepdims=True), 0.0, 1.0), covered])

    def frames(self) -> Iterator[np.ndarray]:
        background = self.background.render(*self.size)
        for i in range(round(self.seconds * self.fps)):
            yield self.frame(i / self.fps, background)

    def write(self, path: str | os.PathLike[str]) -> Path:
        return write_video(path, self.frames(), self.fps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(
            seconds=d["seconds"],
            fps=d["fps"],
            background=Background(**{**d["background"], "base": tuple(d["background"]["base"])}),
            sprites=tuple(Sprite(**s) for s in d["sprites"]),
            size=tuple(d["size"]),
        )


# -- random scenes ----------------------------------------------------------------------------------------------


def random_background(rng: np.random.Generator) -> Background:
    grey = rng.uniform(70, 165)
    base = tuple(int(np.clip(grey + rng.uniform(-12, 12), 0, 255)) for _ in range(3))
    kind = str(rng.choice(["stripes", "checker", "noise", "plain"]))
    period = float(rng.uniform(6, 14)) if kind == "noise" else float(rng.uniform(14, 48))
    return Background(
        kind=kind,
        base=base,  # type: ignore[arg-type]
        contrast=float(rng.uniform(8, 22)),
        period=period,
        angle=float(rng.uniform(0, math.pi)),
        seed=int(rng.integers(2**31)),
    )


def _overlap(a: Sprite, b: Sprite, seconds: float) -> bool:
    for t in np.arange(0, seconds, 0.25):
        if a.visible(t) and b.visible(t):
            (ax, ay), (bx, by) = a.centre(t), b.centre(t)
            if abs(ax - bx) < (a.size + b.size) / 2 + 6 and abs(ay - by) < (a.size + b.size) / 2 + 6:
                return True
    return False


def _random_sprite(
    rng: np.random.Generator, colour: str, shape: str, appear_s: float, seconds: float, size: tuple[int, int]
) -> Sprite:
    width, height = size
    leave_s = seconds if rng.random() < 0.6 else float(rng.uniform(appear_s + MIN_STAY_S, seconds))
    if leave_s - appear_s < MIN_STAY_S:
        leave_s = seconds
    side = int(rng.integers(64, 88))
    direction = str(rng.choice(list(DIRECTIONS)))
    dx, dy = DIRECTIONS[direction]
    extent = width if dx else height
    stay = leave_s - appear_s
    travel = float(rng.uniform(MIN_TRAVEL_PX, min(150.0, extent - side - 24)))
    margin = side / 2 + 6
    # the whole path stays inside the frame
    lo_x, hi_x = margin + max(0.0, -dx * travel), width - margin - max(0.0, dx * travel)
    lo_y, hi_y = margin + max(0.0, -dy * travel), height - margin - max(0.0, dy * travel)
    return Sprite(
        colour=colour,
        shape=shape,
        size=side,
        x=float(rng.uniform(lo_x, hi_x)),
        y=float(rng.uniform(lo_y, hi_y)),
        direction=direction,
        speed=travel / stay,
        appear_s=appear_s,
        leave_s=leave_s,
    )


def random_scene(rng: np.random.Generator, seconds: float, fps: int, size: tuple[int, int] = SIZE) -> Scene:
    """One to three shapes of distinct colours and distinct kinds; the first is there from the start, the others
    pop in later (half a second past a whole second) and may leave before the end."""
    count = int(rng.integers(1, 4))
    colours = rng.permutation(list(COLOURS))[:count]
    shapes = rng.permutation(list(SHAPES))[:count]
    sprites: list[Sprite] = []
    for i, (colour, shape) in enumerate(zip(colours, shapes, strict=True)):
        for _ in range(200):
            appear = 0.0 if i == 0 else float(rng.integers(0, int(seconds - MIN_STAY_S) + 1)) + 0.5
            appear = min(appear, seconds - MIN_STAY_S)
            sprite = _random_sprite(rng, str(colour), str(shape), appear, seconds, size)
            if not any(_overlap(sprite, other, seconds) for other in sprites):
                sprites.append(sprite)
                break
    return Scene(seconds=float(seconds), fps=int(fps), background=random_background(rng), sprites=tuple(sprites))


def staggered_scene(rng: np.random.Generator, seconds: float, fps: int, size: tuple[int, int] = SIZE) -> Scene:
    """Three shapes of distinct colours and kinds popping in at least `ORDER_GAP_S` apart, the first not always from
    the start: `make-dataset order`'s scenes."""
    if seconds < ORDER_MIN_SECONDS:
        raise ValueError(f"staggered scenes need at least {ORDER_MIN_SECONDS:g} s, got {seconds:g}")
    grid = [0.0, *(k + 0.5 for k in range(int(seconds - MIN_STAY_S)))]
    while True:
        times = sorted(float(t) for t in rng.choice(grid, size=3, replace=False))
        if min(b - a for a, b in pairwise(times)) >= ORDER_GAP_S:
            break
    colours = rng.permutation(list(COLOURS))[:3]
    shapes = rng.permutation(list(SHAPES))
    sprites: list[Sprite] = []
    for colour, shape, appear in zip(colours, shapes, times, strict=True):
        for _ in range(200):
            sprite = _random_sprite(rng, str(colour), str(shape), appear, seconds, size)
            if not any(_overlap(sprite, other, seconds) for other in sprites):
                break
        sprites.append(sprite)  # after 200 tries, overlapping: the order is still right
    return Scene(seconds=float(seconds), fps=int(fps), background=random_background(rng), sprites=tuple(sprites))


def reshaped(scene: Scene, shapes: Sequence[str], rng: np.random.Generator) -> Scene:
    """The scene with each sprite's shape drawn from `shapes`: distractors that never show a shape left out."""
    return replace(scene, sprites=tuple(replace(s, shape=str(rng.choice(list(shapes)))) for s in scene.sprites))


def demo_scene(seconds: float = 16.0, fps: int = 25) -> Scene:
    """`vcflash make-test-video`: a red circle drifting right over stripes the whole time, and a blue square that
    rises from a quarter of the way in."""
    background = Background("stripes", (120, 124, 118), 14.0, 32.0, 0.6, 0)
    width, height = SIZE
    circle = Sprite("red", "circle", 72, 60.0, 70.0, "right", 120.0 / seconds, 0.0, seconds)
    appear = round(seconds / 4) + 0.5 if seconds >= 8 else 0.0
    square = Sprite("blue", "square", 68, 262.0, 190.0, "up", 90.0 / max(seconds - appear, 1.0), appear, seconds)
    return Scene(float(seconds), int(fps), background, (circle, square), (width, height))


# -- questions --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QA:
    category: str
    question: str
    answer: str
    choices: tuple[str, ...]  # the answers a guess picks from: 1 / len(choices) is chance
    # where the answer is seen, [start, end) seconds on the video's clock (the JSON line's `moments`); empty: unstated
    moments: tuple[tuple[float, float], ...] = ()


def first_seen(sprite: Sprite) -> float:
    return sprite.appear_s


def order_question(a: Sprite, b: Sprite, rng: np.random.Generator, moments: bool = False) -> QA:
    """Which of two shapes first shows up, the two named in a random order; `moments`: both sprites' spans."""
    first = a if first_seen(a) < first_seen(b) else b
    x, y = (a, b) if rng.random() < 0.5 else (b, a)
    return QA(
        "order",
        f"Which appears first, the {x.name} or the {y.name}?",
        f"the {first.name}",
        (f"the {x.name}", f"the {y.name}"),
        (span(a), span(b)) if moments else (),
    )


def span(sprite: Sprite) -> tuple[float, float]:
    return (sprite.appear_s, sprite.leave_s)


def questions(scene: Scene, rng: np.random.Generator) -> list[QA]:
    """Every templated question the scene answers: per shape its colour, its kind and its direction; the count; one
    present and one absent shape; the order of first appearance of shapes that show up 4 s or more apart; the
    colours and the kinds of shape in the video; and a description of the whole scene."""
    sprites = scene.sprites
    qas: list[QA] = []
    colours, shapes, directions = tuple(COLOURS), SHAPES, tuple(DIRECTIONS)
    for s in sprites:
        qas.append(QA("colour", f"What colour is the {s.shape}?", s.colour, colours))
        qas.append(QA("shape", f"What shape is the {s.colour} object?", s.shape, shapes))
        qas.append(QA("direction", f"Which way does the {s.name} move?", s.direction, directions))
    qas.append(QA("count", "How many shapes appear in the video?", str(len(sprites)), ("1", "2", "3")))
    present = sprites[int(rng.integers(len(sprites)))]
    qas.append(QA("presence", f"Is there a {present.name} in the video?", "yes", ("yes", "no")))
    names = {s.name for s in sprites}
    absent = [f"{c} {k}" for c in colours for k in shapes if f"{c} {k}" not in names]
    qas.append(
        QA("presence", f"Is there a {absent[int(rng.integers(len(absent)))]} in the video?", "no", ("yes", "no"))
    )
    for i, a in enumerate(sprites):
        for b in sprites[i + 1 :]:
            if abs(first_seen(a) - first_seen(b)) < ORDER_GAP_S:
                continue
            qas.append(order_question(a, b, rng))
    # What the whole video holds, each in a fixed order: no binding of colour to shape needed, so the tower gets a
    # direct signal for what a shape looks like before the binding questions can use it.
    qas.append(
        QA(
            "list",
            "Which colours appear in the video?",
            ", ".join(c for c in colours if c in {s.colour for s in sprites}),
            (),
        )
    )
    qas.append(
        QA(
            "list",
            "Which shapes appear in the video?",
            ", ".join(k for k in shapes if k in {s.shape for s in sprites}),
            (),
        )
    )
    qas.append(QA("describe", "Describe the video.", describe(scene), ()))
    return qas


def describe(scene: Scene) -> str:
    """Every shape with its colour and where it moves, in a fixed colour order: 'red circle moving right, blue
    square moving up'. One answer that supervises every shape at once."""
    order = list(COLOURS)
    return ", ".join(
        f"{s.name} moving {s.direction}" for s in sorted(scene.sprites, key=lambda s: order.index(s.colour))
    )


def corpus(repeat: int = 20) -> Iterator[str]:
    """Every question form and answer, for a tokenizer that keeps their words whole. Answers come alone on a line
    too, as the model writes them (a word at the start, with no space before it); `repeat` weighs the lines
    against the tokenizer's built-in corpus."""
    answers = [*COLOURS, *SHAPES, *DIRECTIONS, "yes", "no", "1", "2", "3", "Describe the video."]
    answers += [f"the {c} {s}" for c in COLOURS for s in SHAPES]
    for _ in range(repeat):
        yield from answers
        yield from _question_lines()


def _question_lines() -> Iterator[str]:
    for colour in COLOURS:
        for shape in SHAPES:
            yield f"What colour is the {shape}? {colour}"
            yield f"What shape is the {colour} object? {shape}"
            for direction in DIRECTIONS:
                yield f"Which way does the {colour} {shape} move? {direction}"
            yield f"Is there a {colour} {shape} in the video? yes no"
            yield f"Which appears first, the {colour} {shape} or the {colour} {shape}? the {colour} {shape}"
    yield "How many shapes appear in the video? 1 2 3"
    yield "Which colours appear in the video? " + ", ".join(COLOURS)
    yield "Which shapes appear in the video? " + ", ".join(SHAPES)
    yield ", ".join(f"{c} {s} moving {d}" for c, s, d in zip(COLOURS, SHAPES * 2, DIRECTIONS, strict=False))


# -- the dataset ------------------------------------------------------------------------------------------------


def record(video: str, qa: QA, ident: str) -> dict:
    """One JSON line in the LLaVA / VideoChat-Flash format, plus `category` and `choices` for `eval qa` and, where
    known, `moments` for the relevance loss of `vcflash train` (`hico.train`)."""
    line = {
        "id": ident,
        "video": video,
        "conversations": [{"from": "human", "value": f"<image>\n{qa.question}"}, {"from": "gpt", "value": qa.answer}],
        "category": qa.category,
        "choices": list(qa.choices),
    }
    return line | ({"moments": [list(m) for m in qa.moments]} if qa.moments else {})


# -- long videos with brief events among distractors ----------------------------------------------------------

BRIEF_S = 4.0  # a brief event is on screen this long: one 4-frame clip's worth at 1 fps
# video lengths (seconds) a data set draws from, per kind
DATASET_SECONDS = {
    "shapes": (8.0, 8.0, 8.0, 8.0, 16.0, 24.0),
    "order": (16.0, 24.0),
    "brief": (32.0, 48.0, 64.0, 96.0, 128.0),
}
BRIEF_SCENE_SECONDS = (8, 24)  # the distractor scenes a long video is made of, whole seconds


@dataclass(frozen=True)
class LongVideo:
    """Scenes back to back at 1 fps (scene i from `starts[i]` s) and the brief events drawn into them."""

    scenes: tuple[Scene, ...]
    starts: tuple[float, ...]
    briefs: tuple[Sprite, ...]  # on the video's clock

    @property
    def seconds(self) -> float:
        return self.starts[-1] + self.scenes[-1].seconds

    def frames(self) -> Iterator[np.ndarray]:
        for scene in self.scenes:
            yield from scene.frames()

    def write(self, path: str | os.PathLike[str]) -> Path:
        return write_video(path, self.frames(), 1)

    def to_dict(self) -> dict:
        return asdict(self)


def long_video(rng: np.random.Generator, seconds: float, size: tuple[int, int] = SIZE) -> LongVideo:
    """`seconds` of random 8-24 s scenes at 1 fps, with one or two brief events (`BRIEF_S` on screen) of shapes the
    rest of the video never shows: the moment a question about them must find among distractors."""
    count = 1 if rng.random() < 0.5 else 2
    brief_shapes = [str(k) for k in rng.permutation(list(SHAPES))[:count]]
    others = [k for k in SHAPES if k not in brief_shapes]
    scenes: list[Scene] = []
    starts: list[float] = []
    t = 0.0
    while t < seconds:
        length = float(min(rng.integers(BRIEF_SCENE_SECONDS[0], BRIEF_SCENE_SECONDS[1] + 1), seconds - t))
        if length < MIN_STAY_S and scenes:  # too short a tail: the last scene takes it
            last = scenes.pop()
            length += last.seconds
            t = starts.pop()
        scenes.append(reshaped(random_scene(rng, max(length, MIN_STAY_S), 1, size), others, rng))
        starts.append(t)
        t += scenes[-1].seconds
    briefs: list[Sprite] = []
    for shape in brief_shapes:
        colour = str(rng.choice(list(COLOURS)))
        for _ in range(200):
            appear = float(rng.integers(0, int(seconds - BRIEF_S) + 1)) + 0.5 if seconds > BRIEF_S + 1 else 0.0
            i = int(np.searchsorted(starts, appear, side="right")) - 1
            local = appear - starts[i]
            if local + BRIEF_S > scenes[i].seconds:
                continue  # straddles two scenes
            sprite = replace(_random_sprite(rng, colour, shape, local, local + BRIEF_S, size), leave_s=local + BRIEF_S)
            if any(_overlap(sprite, other, scenes[i].seconds) for other in scenes[i].sprites):
                continue
            if any(abs(b.appear_s - appear) < ORDER_GAP_S for b in briefs):
                continue
            scenes[i] = replace(scenes[i], sprites=(*scenes[i].sprites, sprite))
            briefs.append(replace(sprite, appear_s=appear, leave_s=appear + BRIEF_S))
            break
    return LongVideo(tuple(scenes), tuple(starts), tuple(briefs))


def balanced_order_questions(scene: Scene, rng: np.random.Generator) -> list[QA]:
    """Two order questions about a staggered scene's shapes A, B, C (in order of appearance): B or C, and A against
    one of them. The shape seen first in the whole video answers half, not the two thirds (or, in `questions`, the
    85%) that asking every pair gives, so naming the shape there from the start is no shortcut."""
    a, b, c = sorted(scene.sprites, key=first_seen)
    return [order_question(b, c, rng), order_question(a, b if rng.random() < 0.5 else c, rng)]


def brief_questions(video: LongVideo, rng: np.random.Generator) -> list[QA]:
    """What only the brief events answer: each one's colour (its shape is named, and is nowhere else), its presence
    and the absence of the same shape in another colour, and which of two came first. Each question's moments are
    the spans of the events it is about (for an absence, the one event of that shape: where to look to say no)."""
    colours = tuple(COLOURS)
    qas: list[QA] = []
    for b in video.briefs:
        at = (span(b),)
        qas.append(QA("colour", f"What colour is the {b.shape}?", b.colour, colours, at))
        qas.append(QA("presence", f"Is there a {b.name} in the video?", "yes", ("yes", "no"), at))
        other = [c for c in colours if c != b.colour]
        qas.append(
            QA(
                "presence",
                f"Is there a {other[int(rng.integers(len(other)))]} {b.shape} in the video?",
                "no",
                ("yes", "no"),
                at,
            )
        )
    if len(video.briefs) == 2:
        qas.append(order_question(*video.briefs, rng, moments=True))
    return qas


def make_dataset(
    out: str | os.PathLike[str],
    videos: int = 1000,
    test_videos: int | None = None,
    seconds: tuple[float, ...] | None = None,
    fps: tuple[int, ...] = (1, 1, 1, 1, 1, 1, 1, 1, 1, 10),
    seed: int = 0,
    progress: bool = False,
    kind: str = "shapes",
    jobs: int | None = None,
) -> dict[str, Path]:
    """Write `videos` training scenes and `test_videos` (default a fifth as many, at least 10) held-out ones under
    OUT/videos/{train,test}/, their questions in OUT/train.jsonl and OUT/test.jsonl (video paths relative to OUT)
    and each scene's log in OUT/scenes.jsonl. Each scene's length and frame rate are drawn from `seconds` and `fps`.
    Default lengths per kind: `DATASET_SECONDS`. The two splits draw from independent streams of the seed.
    `kind` "order": staggered three-shape scenes asked only which of two came first (`balanced_order_questions`);
    "brief": long videos (`long_video`, 1 fps, lengths from `seconds`) asked only about their brief events
    (`brief_questions`). Scenes are drawn in order and encoded by `jobs` processes (default: one per CPU), so the
    files are the same for any `jobs`."""
    if kind not in DATASET_SECONDS:
        raise ValueError(f"unknown dataset kind {kind!r}")
    seconds = DATASET_SECONDS[kind] if seconds is None else seconds
    if kind == "order" and min(seconds) < ORDER_MIN_SECONDS:
        raise ValueError(f"make-dataset order needs videos of at least {ORDER_MIN_SECONDS:g} s, got {min(seconds):g}")
    out = Path(out)
    test_videos = max(10, videos // 5) if test_videos is None else test_videos
    train_seq, test_seq = np.random.SeedSequence(seed).spawn(2)
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl"}
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    jobs = jobs or os.cpu_count() or 1
    # encoding is most of the time (libx264 per frame): a pool of processes does it while scenes are drawn in order
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) if jobs > 1 else None
    written: list[Future] = []
    with contextlib.ExitStack() as stack, open(out / "scenes.jsonl", "w") as scenes:
        if pool is not None:
            stack.callback(pool.shutdown, cancel_futures=True)
        for split, count, seq in (("train", videos, train_seq), ("test", test_videos, test_seq)):
            (out / "videos" / split).mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(seq)
            with open(paths[split], "w") as lines:
                for i in tqdm(range(count), desc=f"{split} videos", disable=not progress or pool is not None):
                    video = f"videos/{split}/{i:05d}.mp4"
                    if kind == "brief":
                        scene: Scene | LongVideo = long_video(rng, float(rng.choice(seconds)))
                        qas = brief_questions(scene, rng)
                    elif kind == "order":
                        scene = staggered_scene(rng, float(rng.choice(seconds)), int(rng.choice(fps)))
                        qas = balanced_order_questions(scene, rng)
                    else:
                        scene = random_scene(rng, float(rng.choice(seconds)), int(rng.choice(fps)))
                        qas = questions(scene, rng)
                    if pool is None:
                        scene.write(out / video)
                    else:
                        written.append(pool.submit(scene.write, out / video))
                    scenes.write(json.dumps({"video": video, "scene": scene.to_dict()}) + "\n")
                    for j, qa in enumerate(qas):
                        lines.write(json.dumps(record(video, qa, f"{split}-{i:05d}-{j:02d}")) + "\n")
        for done in tqdm(as_completed(written), total=len(written), desc="videos", disable=not progress):
            done.result()  # an encoding error surfaces here
    return paths
