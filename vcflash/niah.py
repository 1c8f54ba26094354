"""`vcflash eval niah`: needle in a haystack over live memory (issue 12), as the paper's Figure 6 does it.

Haystacks are synthetic shapes scenes (`vcflash.shapes`) played back to back at 1 fps with circles only; a needle
is a shape the haystack never holds, on screen for exactly one clip (4 s) at a logged depth. Single hop: a triangle
of some colour, asked "What colour is the triangle?". Two hops (a chain with 3 decoys): the triangle's colour
names the quarter of the memory to look in next (red, green, blue, yellow: first to last quarter, `QUARTERS`); that
quarter holds the target, a square, and each other quarter a decoy square of another colour; the second question,
"What colour is the square?", is asked over the quarter the first answer names. Both hops must be right (needle
found and question answered): a wrong first answer leads to a decoy whose colour is wrong. The tiny model answers
one templated question per Ask, so the evaluator follows the chain; every hop is an Ask through the real system.

Builders are pure functions of the seed. The runner encodes each haystack once through the encoder's path
(`encoder_svc.worker.encode`, batched), then for each needle encodes only the clips the needles fill and writes the
haystack's tokens with those clips replaced into a real memory: each clip is encoded alone, so this equals encoding
the whole video with the needles drawn in (`tests/reasoner/test_niah.py` checks it). It then asks the Reasoner
with every selection on the same memory and scores answer accuracy (exact match, as `eval qa`), moment accuracy
(the top moment within `tolerance_s` of the needle), needle recall (the needle's clip among the clips the Ask
looked at) and Ask latency.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import zlib
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from protos.clip import CLIP_FRAMES
from vcflash.shapes import COLOURS, Scene, Sprite, _overlap, _random_sprite, random_scene

if TYPE_CHECKING:
    from hico.model import VideoChatFlashModel
    from memory.store import MemoryStore
    from reasoner.engine import Reasoner

log = logging.getLogger(__name__)

HAYSTACK_SHAPE = "circle"  # the only shape haystacks hold
NEEDLE_SHAPE = "triangle"  # the single-hop needle and the two-hop chain's first indicator
TARGET_SHAPE = "square"  # the two-hop chain's target and its decoys
QUARTERS = tuple(COLOURS)  # the first indicator's colour -> the quarter of the memory the target is in
SCENE_SECONDS = (20, 40)  # haystack scenes, whole clips long so that no clip straddles two
ORACLE = "oracle"  # a diagnostic beside the selections: each hop asked over the needle's own neighbourhood
ORACLE_CLIPS = 4  # clips either side of the needle the oracle asks over (36 s: a training scene's length)
PLACEMENT_TRIES = 200  # draws of a needle's place before a crowded scene keeps one that overlaps a shape
WALL0 = 1_796_256_000.0  # 2026-12-03 00:00 UTC: the wall clock of the haystack's first frame


def question(shape: str) -> str:
    return f"What colour is the {shape}?"


# -- builders (pure) ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Haystack:
    """Scenes back to back at 1 fps; scene i starts at `starts[i]` seconds, a multiple of the clip length."""

    scenes: tuple[Scene, ...]
    starts: tuple[int, ...]

    @property
    def frames(self) -> int:
        return self.starts[-1] + round(self.scenes[-1].seconds)

    @property
    def clips(self) -> int:
        return self.frames // CLIP_FRAMES

    def scene_at(self, second: int) -> int:
        return bisect_right(self.starts, second) - 1

    def clip_frames(self, clip: int) -> np.ndarray:
        """uint8 [4, H, W, 3]: the frames of clip `clip` (seconds 4 clip .. 4 clip + 3)."""
        i = self.scene_at(clip * CLIP_FRAMES)
        scene, t0 = self.scenes[i], clip * CLIP_FRAMES - self.starts[i]
        background = scene.background.render(*scene.size)
        return np.stack([scene.frame(float(t0 + f), background) for f in range(CLIP_FRAMES)])

    def all_clips(self) -> Iterator[np.ndarray]:
        """Every clip's frames in order, each scene's background rendered once."""
        for scene in self.scenes:
            frames = list(scene.frames())
            for a in range(0, len(frames), CLIP_FRAMES):
                yield np.stack(frames[a : a + CLIP_FRAMES])


def rng_for(seed: int, *parts: object) -> np.random.Generator:
    """An independent stream per (seed, parts): the same case draws the same needles whatever else is run."""
    return np.random.default_rng([seed, zlib.crc32(repr(parts).encode())])


def make_haystack(frames: int, seed: int) -> Haystack:
    """`frames` seconds at 1 fps of random shapes scenes (20-40 s each, whole clips) whose shapes are all circles."""
    if frames < CLIP_FRAMES or frames % CLIP_FRAMES:
        raise ValueError(f"a haystack is a whole number of {CLIP_FRAMES}-frame clips, got {frames} frames")
    rng = rng_for(seed, "haystack", frames)
    scenes, starts, t = [], [], 0
    lo, hi = (s // CLIP_FRAMES for s in SCENE_SECONDS)
    while t < frames:
        seconds = min(int(rng.integers(lo, hi + 1)) * CLIP_FRAMES, frames - t)
        scene = random_scene(rng, seconds, 1)
        scenes.append(replace(scene, sprites=tuple(replace(s, shape=HAYSTACK_SHAPE) for s in scene.sprites)))
        starts.append(t)
        t += seconds
    return Haystack(tuple(scenes), tuple(starts))


@dataclass(frozen=True)
class Needle:
    role: str  # "needle" (single hop), "indicator", "target" or "decoy" (two hops)
    clip: int  # the clip it is on screen for, whole
    colour: str
    shape: str

    def span(self) -> tuple[float, float]:
        """Media seconds [start, end) it is on screen (1 fps)."""
        return float(self.clip * CLIP_FRAMES), float((self.clip + 1) * CLIP_FRAMES)


@dataclass(frozen=True)
class Hop:
    question: str
    answer: str
    needle: Needle  # what answers it


@dataclass(frozen=True)
class Case:
    frames: int
    depth: float
    hops: int
    trial: int
    needles: tuple[Needle, ...]
    chain: tuple[Hop, ...]  # the questions, in order

    @property
    def name(self) -> str:
        return f"niah-{self.frames}-d{round(self.depth * 1000)}-h{self.hops}-t{self.trial}"


def depth_clip(clips: int, depth: float) -> int:
    """The clip at a depth in [0, 1] of `clips`: 0 the first, 1 the last."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return round(depth * (clips - 1))


def quarter(clips: int, q: int) -> tuple[int, int]:
    """Clips [a, b) of quarter q (0-3) of the memory."""
    return round(q * clips / 4), round((q + 1) * clips / 4)


def make_case(clips: int, depth: float, hops: int, trial: int = 0, seed: int = 0) -> Case:
    """The needles and questions of one haystack of `clips` clips: the needle (or the chain's first indicator) at
    `depth`; for two hops the target somewhere in the quarter the indicator's colour names and one decoy in each
    other quarter, every needle at least 2 clips from the others."""
    if hops not in (1, 2):
        raise ValueError(f"hops must be 1 or 2, got {hops}")
    if hops == 2 and clips < 32:
        raise ValueError(f"two hops need at least 32 clips (4 quarters of 8), got {clips}")
    rng = rng_for(seed, "case", clips, depth, hops, trial)
    role = "needle" if hops == 1 else "indicator"
    first = Needle(role, depth_clip(clips, depth), str(rng.choice(QUARTERS)), NEEDLE_SHAPE)
    chain = [Hop(question(NEEDLE_SHAPE), first.colour, first)]
    needles = [first]
    if hops == 2:
        colours = [str(c) for c in rng.permutation(QUARTERS)]  # the target's, then the decoys'
        pointed = QUARTERS.index(first.colour)
        for q in [pointed] + [q for q in range(4) if q != pointed]:
            a, b = quarter(clips, q)
            free = [c for c in range(a, b) if all(abs(c - n.clip) > 2 for n in needles)]
            role = "target" if q == pointed else "decoy"
            needles.append(Needle(role, int(rng.choice(free)), colours.pop(0), TARGET_SHAPE))
        chain.append(Hop(question(TARGET_SHAPE), needles[1].colour, needles[1]))
    return Case(clips * CLIP_FRAMES, depth, hops, trial, tuple(needles), tuple(chain))


def insert(haystack: Haystack, needles: Sequence[Needle], seed: int = 0) -> Haystack:
    """The haystack with each needle drawn into its scene for exactly its clip: a random size, place and motion,
    as the training scenes' shapes, and, as theirs, clear of every other shape on screen. A needle drawn over a
    shape of its own colour would merge with it into one blob that no model (nor person) could call a triangle;
    training scenes never overlap shapes, so such a needle also tests nothing the model was taught. Placement is
    retried `PLACEMENT_TRIES` times; a scene too crowded for that takes the first try that overlaps only shapes
    of other colours (drawn on top, its outline whole), else the last."""
    scenes = list(haystack.scenes)
    for n in needles:
        i = haystack.scene_at(n.clip * CLIP_FRAMES)
        scene, t0 = scenes[i], float(n.clip * CLIP_FRAMES - haystack.starts[i])
        rng = rng_for(seed, "needle", n)
        fallback: Sprite | None = None
        for _ in range(PLACEMENT_TRIES):
            # the training scenes' own sprite draw, its stay cut to the one clip
            sprite: Sprite = _random_sprite(rng, n.colour, n.shape, t0, t0 + CLIP_FRAMES, scene.size)
            hit = [other for other in scene.sprites if _overlap(sprite, other, scene.seconds)]
            if not hit:
                break
            if fallback is None and all(other.colour != n.colour for other in hit):
                fallback = sprite
        else:
            sprite = fallback or sprite
        scenes[i] = replace(scene, sprites=(*scene.sprites, sprite))  # drawn last: on top
    return replace(haystack, scenes=tuple(scenes))


# -- encoding and memory ------------------------------------------------------------------------------------------


def encode_frames(model: VideoChatFlashModel, clips: Sequence[np.ndarray]) -> np.ndarray:
    """float16 tokens [C, 64, D] of clips' frames, through the encoder service's own path (one batch). A clip's
    tokens depend on its frames alone, so the clocks given here do not matter (`write_stream` states the real ones)."""
    from encoder_svc.worker import encode
    from protos.clip import Clip

    times = tuple(float(f) for f in range(CLIP_FRAMES))
    batch = [Clip("niah", i, f, media_times=times, wall_times=times, fps=1.0) for i, f in enumerate(clips)]
    return encode(model, batch)


def encode_haystack(model: VideoChatFlashModel, haystack: Haystack, batch: int = 32) -> np.ndarray:
    """float16 tokens [clips, 64, D] of the whole haystack, `batch` clips at a time."""
    out, pending = [], []
    for frames in haystack.all_clips():
        pending.append(frames)
        if len(pending) == batch:
            out.append(encode_frames(model, pending))
            pending = []
    if pending:
        out.append(encode_frames(model, pending))
    return np.concatenate(out)


def needle_tokens(model: VideoChatFlashModel, haystack: Haystack, case: Case, seed: int = 0) -> dict[int, np.ndarray]:
    """The tokens of the clips the case's needles fill: {clip: [64, D]}. The rest of the video is unchanged."""
    full = insert(haystack, case.needles, seed)
    clips = sorted({n.clip for n in case.needles})
    return dict(zip(clips, encode_frames(model, [full.clip_frames(c) for c in clips]), strict=True))


def write_stream(store: MemoryStore, stream_id: str, tokens: np.ndarray, replaced: dict[int, np.ndarray]) -> None:
    """The clips into memory as the encoder writes them (1 fps, wall clock from WALL0), `replaced` in place of the
    haystack's tokens at those clips."""
    from memory.records import ClipMeta, ClipRecord, clip_vector

    for seq in range(len(tokens)):
        t = float(seq * CLIP_FRAMES)
        row = replaced.get(seq, tokens[seq])
        meta = ClipMeta(
            stream_id, seq, WALL0 + t, WALL0 + t + CLIP_FRAMES, t, t + CLIP_FRAMES, tuple(t + f for f in range(4))
        )
        store.put(ClipRecord(meta, row, clip_vector(row)))


# -- the runner ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NiahConfig:
    frames: tuple[int, ...] = (512, 2000, 10000, 30000)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    hops: tuple[int, ...] = (1, 2)
    selections: tuple[str, ...] = ("uniform", "retrieval", "scan", "index", ORACLE)
    trials: int = 1  # needles per (frames, depth, hops)
    max_frames: int = 512  # the Ask's frame budget
    max_new_tokens: int = 8
    tolerance_s: float = 4.0  # a moment within this of the needle counts
    seed: int = 0
    batch: int = 32  # clips per encoder batch
    two_hop_frames: tuple[int, ...] | None = None  # the lengths two hops are run at (None: every one in `frames`)

    def __post_init__(self) -> None:
        from reasoner.engine import SELECTIONS

        if not self.frames or any(f < CLIP_FRAMES or f % CLIP_FRAMES for f in self.frames):
            raise ValueError(f"frames must be positive multiples of {CLIP_FRAMES}, got {list(self.frames)}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be in [0, 1], got {list(self.depths)}")
        if not self.hops or any(h not in (1, 2) for h in self.hops):
            raise ValueError(f"hops must be 1 or 2, got {list(self.hops)}")
        if not self.selections or any(s not in (*SELECTIONS, ORACLE) for s in self.selections):
            raise ValueError(f"selections must be among {[*SELECTIONS, ORACLE]}, got {list(self.selections)}")
        from vcflash.serve.settings import ReasonerSettings

        limit = ReasonerSettings().max_ask_frames
        if not 4 <= self.max_frames <= limit or self.max_frames % 4:
            raise ValueError(f"max_frames must be a multiple of 4 in [4, {limit}], got {self.max_frames}")
        if self.trials < 1 or self.batch < 1:
            raise ValueError(f"trials and batch must be >= 1, got {self.trials} and {self.batch}")

    def hops_at(self, frames: int) -> list[int]:
        """The hop counts run on a haystack of `frames` frames."""
        two = self.two_hop_frames is None or frames in self.two_hop_frames
        return [h for h in self.hops if h == 1 or two]


@dataclass
class Row:
    """One (case, selection): the chain's hops asked in order."""

    frames: int
    depth: float
    hops: int
    trial: int
    selection: str
    answers: list[str] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)
    answer_right: bool = False  # every hop's answer right: needle found and question answered
    moment_right: bool | None = None  # every hop's top moment at its needle; None: the selection ranks none
    recall: bool = False  # every hop's needle among the clips its Ask looked at
    ask_s: float = 0.0  # all hops
    select_s: float = 0.0
    top_moment: list[float] | None = None  # the last hop's, media seconds
    needle: list[float] = field(default_factory=list)  # the last hop's needle, media seconds


def near(moment: tuple[float, float], needle: tuple[float, float], tolerance_s: float) -> bool:
    return moment[0] < needle[1] + tolerance_s and needle[0] - tolerance_s < moment[1]


def ask_chain(reasoner: Reasoner, stream_id: str, case: Case, selection: str, cfg: NiahConfig) -> Row:
    """Ask the case's hops in order with one selection: the first over the whole memory, the second over the
    quarter the first answer names (none: the chain is lost). `ORACLE` asks each hop over only the clips around the
    needle it leads to (the second hop's: the square of the quarter the first answer names), uniform: how well the
    model answers once a perfect search has found the needle."""
    from hico.train import normalize_answer
    from reasoner.engine import AskParams, AskResult

    row = Row(case.frames, case.depth, case.hops, case.trial, selection)
    start = end = None
    rights, moments, recalls = [], [], []
    clips = case.frames // CLIP_FRAMES
    lead = case.chain[0].needle  # what the oracle looks around
    for hop in case.chain:
        if selection == ORACLE:
            start, end = (
                float(max(0, lead.clip - ORACLE_CLIPS) * CLIP_FRAMES),
                float((lead.clip + ORACLE_CLIPS + 1) * CLIP_FRAMES),
            )
        params = AskParams(
            [stream_id],
            hop.question,
            start=start,
            end=end,
            max_frames=cfg.max_frames,
            selection="uniform" if selection == ORACLE else selection,  # type: ignore[arg-type]
            max_new_tokens=cfg.max_new_tokens,
            anchors=False,  # the prompt the model was trained on (the offline one)
        )
        t0 = time.perf_counter()
        result = [e for e in reasoner.ask(params) if isinstance(e, AskResult)][0]
        row.ask_s += time.perf_counter() - t0
        row.select_s += result.timings.get("select", 0.0)
        answer = normalize_answer(result.answer)
        row.answers.append(answer)
        row.expected.append(hop.answer)
        rights.append(answer == normalize_answer(hop.answer))
        recalls.append(hop.needle.clip in {e.clip.seq for e in result.evidence})
        top = result.moments[0] if result.moments else None
        row.top_moment = [top.first.media_start, top.last.media_end] if top else None
        row.needle = list(hop.needle.span())
        moments.append(
            top is not None and near((top.first.media_start, top.last.media_end), hop.needle.span(), cfg.tolerance_s)
        )
        if answer not in QUARTERS:  # the chain points nowhere: the next hop cannot be asked
            break
        q = QUARTERS.index(answer)
        a, b = quarter(clips, q)
        start, end = float(a * CLIP_FRAMES), float(b * CLIP_FRAMES)
        lead = next((n for n in case.needles if n.shape == TARGET_SHAPE and a <= n.clip < b), lead)
    asked = len(rights) == len(case.chain)
    row.answer_right = asked and all(rights)
    row.recall = asked and all(recalls)
    if selection not in ("uniform", ORACLE):
        row.moment_right = asked and all(moments)
    return row


def constant_baseline(rows: Sequence[Row]) -> float:
    """The answer accuracy of a model that says one word whatever it sees, the best word for these rows: every hop
    expects it. The baseline beside `answer` (chance is not 1/4 when the needles' colours are not balanced)."""
    words = {e for r in rows for e in r.expected}
    return max((sum(all(e == w for e in r.expected) for r in rows) / len(rows) for w in words), default=0.0)


def summarize(rows: Sequence[Row], keys: Sequence[str]) -> list[dict[str, object]]:
    """Rows grouped by `keys` (in first-seen order): count, answer and moment accuracy, needle recall, mean and
    max Ask latency; the constant baseline and the commonest last answer with its share (a model answering one
    word whatever the needle shows stands out: its share is 100%)."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault(tuple(getattr(r, k) for k in keys), []).append(r)
    out = []
    for key, items in groups.items():
        ranked = [r.moment_right for r in items if r.moment_right is not None]
        found = [r for r in items if r.recall]
        given = Counter(r.answers[-1] if r.answers else "" for r in items)
        top = given.most_common(1)[0][0]
        out.append(
            dict(zip(keys, key, strict=True))
            | {
                "n": len(items),
                "answer": sum(r.answer_right for r in items) / len(items),
                "moment": sum(ranked) / len(ranked) if ranked else None,
                "recall": sum(r.recall for r in items) / len(items),
                # the model's part alone: answers right among the Asks that looked at the needle
                "answer_if_recalled": sum(r.answer_right for r in found) / len(found) if found else None,
                "ask_s": float(np.mean([r.ask_s for r in items])),
                "ask_max_s": max(r.ask_s for r in items),
                "constant": constant_baseline(items),
                "top_answer": top,
                "top_answer_share": given[top] / len(items),
            }
        )
    return out


def format_summary(rows: Sequence[dict[str, object]]) -> str:
    def pct(v: object) -> str:
        return "-" if v is None else f"{v:.0%}"

    lines = [
        f"{'frames':>7}{'hops':>5}{'selection':>11}{'n':>4}{'answer':>8}{'moment':>8}{'recall':>8}"
        f"{'ans|rec':>9}{'ask s':>8}{'const':>7}  commonest answer"
    ]
    for r in rows:
        lines.append(
            f"{r['frames']:>7}{r['hops']:>5}{r['selection']:>11}{r['n']:>4}{pct(r['answer']):>8}"
            f"{pct(r['moment']):>8}{pct(r['recall']):>8}{pct(r['answer_if_recalled']):>9}{r['ask_s']:>8.2f}"
            f"{pct(r['constant']):>7}  {r['top_answer'] or '-'} {pct(r['top_answer_share'])}"
        )
    return "\n".join(lines)


def run(
    model: VideoChatFlashModel,
    cfg: NiahConfig,
    store: MemoryStore | None = None,
    progress: Callable[[str], None] = log.info,
) -> dict[str, object]:
    """The whole evaluation on `store` (default: an embedded store in a temporary directory): every haystack
    length, depth, hop count and trial, every selection asked on the same memory. Returns the JSON report."""
    from memory import ClipIndex, EmbeddedStore
    from reasoner.engine import AskParams, Reasoner
    from reasoner.keys import KeyIndex

    with tempfile.TemporaryDirectory(prefix="niah-") as tmp:
        own = store is None
        store = EmbeddedStore(Path(tmp) / "memory.sqlite3") if store is None else store
        reasoner = Reasoner(model, store, ClipIndex())
        rows: list[Row] = []
        cost: list[dict[str, object]] = []
        try:
            for frames in cfg.frames:
                t0 = time.perf_counter()
                haystack = make_haystack(frames, cfg.seed)
                tokens = encode_haystack(model, haystack, cfg.batch)
                encode_s = time.perf_counter() - t0
                progress(f"{frames} frames: haystack encoded in {encode_s:.1f} s")
                per: dict[str, Any] = {"frames": frames, "clips": len(tokens), "encode_s": encode_s}
                per |= {"token_bytes_per_clip": int(tokens[0].nbytes), "key_build_s": [], "search_index_s": []}
                per["write_s"] = []
                for h in cfg.hops_at(frames):
                    for depth in cfg.depths:
                        for trial in range(cfg.trials):
                            case = make_case(len(tokens), depth, h, trial, cfg.seed)
                            stream = case.name
                            t1 = time.perf_counter()
                            write_stream(store, stream, tokens, needle_tokens(model, haystack, case, cfg.seed))
                            per["write_s"].append(time.perf_counter() - t1)
                            reasoner.keys = KeyIndex()  # keys are built once per clip: at write time, not per Ask
                            if "index" in cfg.selections:
                                t1 = time.perf_counter()
                                reasoner.index_scores(stream, list(range(len(tokens))), case.chain[0].question)
                                per["key_build_s"].append(time.perf_counter() - t1)
                                per["key_bytes_per_clip"] = reasoner.keys.bytes() // len(tokens)
                                t1 = time.perf_counter()
                                reasoner.search(AskParams([stream], case.chain[0].question, selection="index"))
                                per["search_index_s"].append(time.perf_counter() - t1)
                            for selection in cfg.selections:
                                row = ask_chain(reasoner, stream, case, selection, cfg)
                                rows.append(row)
                                progress(
                                    f"{frames} frames, depth {depth:g}, {h} hop(s), {selection}: {row.answers} "
                                    f"(expected {row.expected}) recall {row.recall} moment {row.moment_right} "
                                    f"{row.ask_s:.2f} s"
                                )
                            store.delete_stream(stream)
                            if reasoner.index is not None:
                                reasoner.index.drop_stream(stream)
                cost.append(per)
        finally:
            if own:
                store.close()
    return {
        "config": asdict(cfg),
        "summary": summarize(rows, ("frames", "hops", "selection")),
        "cells": summarize(rows, ("frames", "depth", "hops", "selection")),
        "cost": cost,
        "rows": [asdict(r) for r in rows],
    }


# -- the heatmap --------------------------------------------------------------------------------------------------


def heatmap(report: dict, path: str | Path) -> Path:
    """Answer accuracy per (haystack length, depth), one panel per (hops, selection), as the paper's Figure 6:
    red 0% to green 100%, the percentage written in each cell. PIL only."""
    from PIL import Image, ImageDraw

    cells = report["cells"]
    frames = sorted({c["frames"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    present = {(c["hops"], c["selection"]) for c in cells}
    order = list(report["config"]["selections"])
    panels = sorted(present, key=lambda p: (p[0], order.index(p[1]) if p[1] in order else len(order)))
    value = {(c["frames"], c["depth"], c["hops"], c["selection"]): c["answer"] for c in cells}
    cw, ch, left, top, gap = 44, 22, 64, 36, 16
    pw, ph = left + cw * len(depths), top + ch * len(frames) + 18
    cols = max(1, len({p[1] for p in panels}))  # a row of panels per hop count
    rows = -(-len(panels) // cols)
    image = Image.new("RGB", (cols * (pw + gap) + gap, rows * (ph + gap) + gap), "white")
    draw = ImageDraw.Draw(image)
    for p, (hops, selection) in enumerate(panels):
        x0, y0 = gap + (p % cols) * (pw + gap), gap + (p // cols) * (ph + gap)
        draw.text((x0, y0), f"{selection}, {hops} hop{'s' if hops > 1 else ''}", fill="black")
        for j, d in enumerate(depths):
            draw.text((x0 + left + j * cw + 8, y0 + 16), f"{d:g}", fill="black")
        for i, f in enumerate(frames):
            draw.text((x0, y0 + top + i * ch + 5), f"{f}", fill="black")
            for j, d in enumerate(depths):
                v = value.get((f, d, hops, selection))
                box = (x0 + left + j * cw, y0 + top + i * ch, x0 + left + (j + 1) * cw - 1, y0 + top + (i + 1) * ch - 1)
                colour = (220, 220, 220) if v is None else (int(230 * (1 - v)), int(190 * v + 30), 60)
                draw.rectangle(box, fill=colour)
                if v is not None:
                    draw.text((box[0] + 6, box[1] + 5), f"{v:.0%}", fill="white")
        draw.text((x0, y0 + top + len(frames) * ch + 4), "frames \\ depth", fill="gray")
    path = Path(path)
    image.save(path)
    return path


def write_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(report, indent=2))
    return path
