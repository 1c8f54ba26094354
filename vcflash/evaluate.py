"""`vcflash eval qa`: exact-match accuracy per question category, offline (`vcflash ask`'s path) or through a
running server (`vcflash up` + `ask-live`, each video streamed in at 1 fps), with chance beside each category.

The data is the training format (`hico.dataset`): each line's last answer is the reference, earlier turns are
history. Lines written by `vcflash make-dataset` carry a `category` and the answer `choices` (chance is one over
their number); other lines count under "all" with chance unknown.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hico.chat import VideoChatFlash
    from hico.dataset import Sample
    from vcflash.client import Client


@dataclass(frozen=True)
class Graded:
    sample: Sample
    answer: str | None  # None: the video could not be used
    right: bool

    @property
    def category(self) -> str:
        return str(self.sample.extra.get("category", "all"))

    @property
    def chance(self) -> float | None:
        choices = self.sample.extra.get("choices")
        return 1 / len(choices) if isinstance(choices, list) and choices else None


def grade(samples: Sequence[Sample], answers: Sequence[str | None]) -> list[Graded]:
    from hico.train import normalize_answer

    return [
        Graded(s, a, a is not None and normalize_answer(a) == normalize_answer(s.turns[-1][1]))
        for s, a in zip(samples, answers, strict=True)
    ]


def table(graded: Sequence[Graded]) -> list[dict[str, object]]:
    """One row per category (in first-seen order) and a total: questions, right, accuracy, chance."""
    order: dict[str, list[Graded]] = {}
    for g in graded:
        order.setdefault(g.category, []).append(g)
    rows = []
    for name, items in [*order.items(), ("total", list(graded))]:
        chances = [g.chance for g in items]
        right = sum(g.right for g in items)
        rows.append(
            {
                "category": name,
                "questions": len(items),
                "right": right,
                "accuracy": right / len(items) if items else 0.0,
                "chance": None if None in chances else sum(chances) / len(chances),  # type: ignore[arg-type]
                "unusable": sum(g.answer is None for g in items),
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, object]]) -> str:
    lines = [f"{'category':<12}{'questions':>10}{'right':>8}{'accuracy':>10}{'chance':>9}"]
    for r in rows:
        chance = "-" if r["chance"] is None else f"{r['chance']:.1%}"
        lines.append(
            f"{r['category']:<12}{r['questions']:>10}{r['right']:>8}{r['accuracy']:>10.1%}{chance:>9}"
            + (f"  ({r['unusable']} unusable)" if r["unusable"] else "")
        )
    return "\n".join(lines)


def answer_offline(
    model: VideoChatFlash, samples: Sequence[Sample], max_frames: int, progress: bool
) -> list[str | None]:
    from hico.train import answer_samples

    return answer_samples(model, samples, max_frames=max_frames, progress=progress)


def answer_live(
    client: Client,
    samples: Sequence[Sample],
    max_frames: int,
    fps: float = 1.0,
    timeout_s: float = 300.0,
    progress: bool = False,
    anchors: bool = True,
) -> list[str | None]:
    """Stream each distinct video into the server (as fast as it decodes, sampled at `fps`), wait until every clip
    is in memory, ask its questions with `ask-live`'s defaults (wall-clock anchors on unless `anchors` is off:
    then the prompt is the offline one), then remove the stream and its memory. The server must read the videos
    (`--media-root` above them)."""
    from tqdm.auto import tqdm

    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        if s.start_s is not None or s.end_s is not None:
            raise ValueError(f"{s.where}: sub-ranges (start/end) are not streamed; evaluate it offline")
        groups.setdefault(s.video_key, []).append(i)
    answers: list[str | None] = [None] * len(samples)
    for n, indices in enumerate(tqdm(list(groups.values()), desc="streaming", unit="video", disable=not progress)):
        name = f"eval-{n}-{int(time.time() * 1000) % 1_000_000}"
        client.add_stream(name, str(Path(samples[indices[0]].video).resolve()), fps=fps, realtime=False)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                status = client.stream(name)
                if status.state in ("finished", "failed", "stopped") and status.clips_stored >= status.clips_emitted:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{samples[indices[0]].video}: not in memory after {timeout_s:g} s")
                time.sleep(0.05)
            if status.state != "finished" or not status.clips_stored:
                continue  # unusable here; counted as such
            for i in indices:
                *history, (question, _) = samples[i].turns
                pieces = [
                    e
                    for e in client.ask([name], question, max_frames=max_frames, history=history, anchors=anchors)
                    if isinstance(e, str)
                ]
                answers[i] = "".join(pieces).strip()
        finally:
            client.remove_stream(name, delete_memory=True)
    return answers


def report(graded: Sequence[Graded], as_json: bool, path: str) -> str:
    rows = table(graded)
    if as_json:
        return json.dumps(
            {
                "data": path,
                "categories": rows,
                "answers": [
                    {"where": g.sample.where, "id": g.sample.id, "answer": g.answer, "right": g.right} for g in graded
                ],
            },
            indent=2,
        )
    return format_table(rows)
