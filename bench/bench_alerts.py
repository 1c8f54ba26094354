"""Alert benchmark (issue 14): what an evaluation costs for 1 vs 50 alerts on one stream (one shared prefill), and
the latency from a clip stored to its event record appended, with the trained tiny model on this CPU.

    PYTHONPATH=. python bench/bench_alerts.py                 # Markdown on stdout
    PYTHONPATH=. python bench/bench_alerts.py --repeats 50 --events 8

Cost: the window is 4 clips (16 frames, the default) of a synthetic scene, encoded by the encoder's path; 1 and 50
distinct yes/no questions are scored by `hico.yesno.score_questions` (the visual prefix prefilled once, the
questions batched against its cache), and, for reference, the 50 as 50 separate full prefills. The three are
timed in turn, `repeats` rounds, and the medians reported (the VM is shared: interleaving keeps drift out of the
ratio).

Latency: a real `AlertRunner` (its background task, the default 0.2 s poll) over a real embedded store; clips of a
scene where a red square comes and goes are stored one at a time, each stamped with the wall clock at which it is
stored, and each event's latency is its record's `emitted_wall` (set as it is appended) minus the storing time of
the clip that completed it. Clips come every `--gap` seconds (not the live 4 s: it changes nothing but the wait).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from encoder_svc.worker import encode, to_record
from hico import VideoChatFlash
from hico.prompt import PromptVideo
from hico.yesno import answer_tokens, score_questions
from memory import EmbeddedStore
from protos.clip import Clip
from reasoner.alerts import AlertRunner, AlertSpec
from reasoner.engine import Reasoner
from vcflash.serve.settings import ReasonerSettings
from vcflash.shapes import COLOURS, DIRECTIONS, SHAPES, Background, Scene, Sprite

TARGET = "Is there a red square in the video?"
QUESTIONS = [f"Is there a {c} {s} in the video?" for c in COLOURS for s in SHAPES]
QUESTIONS += [f"Does the {c} {s} move {d}?" for c in COLOURS for s in SHAPES for d in DIRECTIONS]


def scene(events: int) -> Scene:
    """A blue circle the whole time and a red square that comes for 12 s and goes for 24 s (more than a window),
    `events` times."""
    background = Background("stripes", (120, 124, 118), 14.0, 32.0, 0.6, 0)
    circle = Sprite("blue", "circle", 70, 250.0, 180.0, "left", 0.5, 0.0, 36.0 * events + 24)
    squares = tuple(
        Sprite("red", "square", 72, 80.0, 80.0, "right", 4.0, 16.5 + 36.0 * i, 28.5 + 36.0 * i) for i in range(events)
    )
    return Scene(36.0 * events + 24, 1, background, (circle, *squares))


def clips(model: VideoChatFlash, s: Scene, stream: str) -> tuple[list[Clip], np.ndarray]:
    frames = np.stack(list(s.frames()))
    out = []
    for seq in range(len(frames) // 4):
        t = tuple(float(4 * seq + k) for k in range(4))
        out.append(Clip(stream, seq, frames[4 * seq : 4 * seq + 4], t, t, 1.0))
    return out, encode(model, out)


def cost(model: VideoChatFlash, repeats: int, frames: int) -> dict[str, float]:
    """Median ms of one window's evaluation: 1 alert, 50 alerts sharing the prefill, 50 separate prefills."""
    _, tokens = clips(model, scene(2), "cam")
    window = torch.from_numpy(tokens[4 : 4 + frames // 4])
    video, answers = PromptVideo(frames, float(frames)), answer_tokens(model)
    fifty = QUESTIONS[:50]
    runs = {
        "1 alert": lambda: score_questions(model, window, [TARGET], video, answers),
        "50 alerts, shared prefix": lambda: score_questions(model, window, fifty, video, answers),
        "50 alerts, 50 prefills": lambda: [score_questions(model, window, [q], video, answers) for q in fifty],
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for f in runs.values():
        f()  # warm up
    for _ in range(repeats):
        for name, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[name].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


async def latency(model: VideoChatFlash, events: int, alerts: int, gap: float) -> tuple[list[float], int]:
    """Seconds from each event's completing clip stored to its record appended, and the number of records."""
    with tempfile.TemporaryDirectory() as tmp:
        store = EmbeddedStore(Path(tmp) / "memory.sqlite3")
        settings = ReasonerSettings()
        spec = AlertSpec("red", ("cam",), TARGET)
        store.put_alert(spec.name, spec.to_config())
        for i, q in enumerate(QUESTIONS[: alerts - 1]):
            store.put_alert(f"other{i}", replace(spec, name=f"other{i}", question=q).to_config())
        runner = AlertRunner(Reasoner(model, store, limits=settings), store, None, settings, CollectorRegistry())
        all_clips, tokens = clips(model, scene(events), "cam")
        stored: dict[int, float] = {}
        seen: set[str] = set()
        out: list[float] = []
        await runner.start()
        try:
            for clip, t in zip(all_clips, tokens, strict=True):
                now = time.time()
                clip = replace(clip, wall_times=tuple(now - 4 + k for k in range(4)))  # ends now: stored live
                await asyncio.to_thread(store.put, to_record(clip, t))
                stored[clip.seq] = time.time()
                await asyncio.sleep(gap)
                for rec in store.events(alert="red"):
                    if rec["key"] not in seen:
                        seen.add(rec["key"])
                        done = max(s for s, w in stored.items() if w <= rec["emitted_wall"])
                        out.append(rec["emitted_wall"] - stored[done])
        finally:
            await runner.close()
            store.close()
    return out, len(seen)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--events", type=int, default=6)
    p.add_argument("--gap", type=float, default=1.0, help="seconds between clips stored")
    p.add_argument("--windows", default="16,32", help="window sizes (frames) to time the cost at")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model = VideoChatFlash.from_pretrained("tiny")
    costs = {frames: cost(model, args.repeats, frames) for frames in map(int, args.windows.split(","))}
    print(
        f"# Alerts, {datetime.now(UTC):%Y-%m-%d}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs (load {os.getloadavg()[0]:.1f}), torch {torch.__version__}, {torch.get_num_threads()} "
        "threads, tiny model"
    )
    print("\n| window | alerts | ms (median) | x one alert |\n|---|---|---|---|")
    for frames, ms in costs.items():
        for name, v in ms.items():
            print(f"| {frames} frames | {name} | {v:.1f} | {v / ms['1 alert']:.2f} |")
    print("\n| alerts on the stream | events | latency median s | max s |\n|---|---|---|---|")
    for alerts in (1, 50):
        lat, n = asyncio.run(latency(model, args.events, alerts, args.gap))
        print(f"| {alerts} | {n} | {statistics.median(lat):.3f} | {max(lat):.3f} |")


if __name__ == "__main__":
    main()
