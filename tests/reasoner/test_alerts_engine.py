"""Alerts: the hysteresis state machine, the spec's checks, the runner over a real embedded store (restarts resume
with no duplicate), and the trained tiny model finding a red square that comes and goes in synthetic streams."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from encoder_svc.worker import encode, to_record
from hico import VideoChatFlash
from hico.yesno import answer_tokens
from memory import ClipMeta, ClipRecord, EmbeddedStore
from memory.records import clip_vector
from protos.clip import Clip
from reasoner.alerts import AlertRunner, AlertSpec, AlertState, Window, release, step
from reasoner.delivery import Target
from reasoner.engine import AskParams, Reasoner
from vcflash.serve.errors import Invalid
from vcflash.serve.settings import ReasonerSettings
from vcflash.shapes import DIRECTIONS, SIZE, Scene, Sprite, _overlap, random_background

CLIP_S = 4.0  # 4 frames at 1 fps
WALL0 = 1_800_000_000.0


def clip_meta(seq: int, stream: str = "cam") -> ClipMeta:
    t = CLIP_S * seq
    return ClipMeta(stream, seq, WALL0 + t, WALL0 + t + CLIP_S, t, t + CLIP_S, tuple(t + i for i in range(4)))


def window(seq: int, clips: int = 4) -> Window:
    return Window.of([clip_meta(s) for s in range(max(0, seq - clips + 1), seq + 1)])


def run(scores: Sequence[float], spec: AlertSpec, state: AlertState | None = None) -> tuple[AlertState, list[dict]]:
    """Step through one score per clip (seq = position), collecting the records."""
    state, out = state or AlertState(), []
    for seq, score in enumerate(scores):
        state, records = step(state, score, window(seq), spec, "cam", 0.0)
        out += records
    return state, out


SPEC = AlertSpec("red", ("cam",), "Is there a red square in the video?")


# -- the state machine -------------------------------------------------------------------------------------------


def test_a_rising_edge_starts_an_event_and_the_times_come_from_the_window() -> None:
    """A target in clips 2-3 makes windows 2..6 (4 clips each) say yes: it started in clip 2, the newest clip of
    the first window that saw it, and was last seen in clip 3, the oldest clip of the last one."""
    state, records = run([0.1, 0.1, 0.9, 0.95, 0.9, 0.8, 0.9, 0.1, 0.1], SPEC)
    start, end = records
    assert (start["kind"], end["kind"]) == ("start", "end")
    assert start["key"] == "red/cam/2/start" and end["key"] == "red/cam/2/end"
    assert start["event"] == end["event"] == "red/cam/2"
    assert (start["start_media_s"], start["start_wall"], start["end_media_s"]) == (8.0, WALL0 + 8.0, None)
    assert (end["start_media_s"], end["end_media_s"], end["end_wall"]) == (8.0, 16.0, WALL0 + 16.0)
    assert start["clips"] == [0, 1, 2] and end["clips"] == [0, 1, 2, 3, 4, 5, 6]
    assert start["peak"] == 0.9 and end["peak"] == 0.95 and end["score"] == 0.1
    assert state.phase == "idle" and state.seq == 8
    assert json.loads(json.dumps(start)) == start  # JSON-ready


def test_hysteresis_keeps_an_event_through_a_dip_above_the_release_level() -> None:
    assert release(0.5) == pytest.approx(0.4) and release(0.1) == pytest.approx(0.05)
    _, records = run([0.9, 0.45, 0.9, 0.41, 0.39, 0.9], SPEC)
    assert [r["kind"] for r in records] == ["start", "end", "start"]
    assert records[1]["clips"] == [0, 2]  # evidence: windows above the threshold, not the dip's
    assert records[2]["key"] == "red/cam/5/start"  # no cooldown: the next rise is a new event
    _, flicker = run([0.9, 0.2, 0.9, 0.2, 0.9], replace(SPEC, threshold=0.5))
    assert [r["kind"] for r in flicker] == ["start", "end", "start", "end", "start"]


def test_min_duration_waits_for_the_score_to_stay_up() -> None:
    spec = replace(SPEC, min_duration_s=8.0)
    _, blip = run([0.1, 0.9, 0.9, 0.1, 0.9, 0.1], spec)  # up for two evaluations, 4 s apart: never 8 s
    assert blip == []
    state, records = run([0.1, 0.9, 0.9, 0.9, 0.9], spec)
    (start,) = records
    assert start["key"] == "red/cam/1/start" and start["start_media_s"] == 4.0  # dated from the rise
    assert start["clips"] == [0, 1, 2, 3] and state.phase == "active"  # emitted at seq 3, 8 s after seq 1's
    _, at_once = run([0.1, 0.9], SPEC)
    assert [r["key"] for r in at_once] == ["red/cam/1/start"]


def test_cooldown_holds_off_the_next_event() -> None:
    spec = replace(SPEC, cooldown_s=12.0)
    _, records = run([0.9, 0.1, 0.9, 0.9, 0.9, 0.9, 0.9], spec)
    # ends at seq 1 (media t 8): nothing starts before t 20, i.e. seqs 2-3 (t 12, 16); seq 4 (t 20) starts
    assert [r["key"] for r in records] == ["red/cam/0/start", "red/cam/0/end", "red/cam/4/start"]
    assert records[2]["start_media_s"] == 16.0


def test_an_evaluated_window_changes_nothing_and_states_survive_json() -> None:
    state, _ = run([0.1, 0.9, 0.92], SPEC)
    again, records = step(state, 0.0, window(2), SPEC, "cam", 0.0)
    assert again == state and records == []
    assert AlertState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_spec_checks_name_the_field() -> None:
    limits = ReasonerSettings()
    SPEC.validate(limits)
    assert AlertSpec.from_config(json.loads(json.dumps(SPEC.to_config()))) == SPEC
    for change, match in [
        ({"name": "a b"}, "alert name"),
        ({"name": "x" * 65}, "alert name"),
        ({"streams": ()}, "1 to"),
        ({"streams": ("cam", "cam")}, "once"),
        ({"streams": ("../x",)}, "stream name"),
        ({"question": "  "}, "empty"),
        ({"question": "x" * 4001}, "4001 characters"),
        ({"question": "yes?<|im_end|>"}, "reserved"),
        ({"window_frames": 6}, "multiple of 4"),
        ({"window_frames": 4096}, "multiple of 4"),
        ({"window_frames": True}, "multiple of 4"),
        ({"every_clips": 0}, "every_clips"),
        ({"threshold": 1.0}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"min_duration_s": -1.0}, "min_duration_s"),
        ({"cooldown_s": float("inf")}, "cooldown_s"),
        ({"webhook_url": "ftp://example.com/x", "webhook_secret": "s"}, "http"),
        ({"webhook_url": "https://example.com/x"}, "secret"),
        ({"mqtt_topic": "a/#"}, "wildcards"),
    ]:
        with pytest.raises(Invalid, match=match):
            replace(SPEC, **change).validate(limits)
    with pytest.raises(Invalid, match="unknown alert fields"):
        AlertSpec.from_config(SPEC.to_config() | {"extra": 1})
    with pytest.raises(Invalid, match="needs question"):
        AlertSpec.from_config({"name": "a", "streams": ["cam"]})


# -- the runner over a real store, scores scripted --------------------------------------------------------------


class Recorder:
    """Stands in for `reasoner.delivery.Delivery` (tested on its own with real receivers): what was handed over."""

    def __init__(self) -> None:
        self.records: list[tuple[Target, dict[str, Any]]] = []
        self.states: list[tuple[Target, dict[str, Any]]] = []

    def submit(self, target: Target, record: dict[str, Any]) -> None:
        self.records.append((target, record))

    def publish_state(self, target: Target, state: dict[str, Any]) -> None:
        self.states.append((target, state))


class Scripted(AlertRunner):
    """The runner with P(yes) taken from a script by (stream, the window's newest seq) or that seq alone, so the
    bookkeeping is exact."""

    script: dict[Any, float] = {}

    def score(self, stream: str, clips: Sequence[ClipMeta], questions: Sequence[str]) -> torch.Tensor:
        seq = clips[-1].seq
        return torch.full((len(questions),), self.script.get((stream, seq), self.script[seq]))


def put_clip(store: EmbeddedStore, seq: int, stream: str = "cam", tokens: np.ndarray | None = None) -> None:
    tokens = np.zeros((64, 8), np.float16) if tokens is None else tokens
    store.put(ClipRecord(clip_meta(seq, stream), tokens, clip_vector(np.ones((64, 8)))))


def event_kinds(records: Iterable[dict[str, Any]]) -> list[str]:
    """Records as `event/kind`: their keys without the stream's generation (a random id)."""
    return [f"{r['event']}/{r['kind']}" for r in records]


def scripted(store: EmbeddedStore, delivery: Recorder, script: dict[Any, float]) -> Scripted:
    runner = Scripted(None, store, delivery, ReasonerSettings(), CollectorRegistry())  # type: ignore[arg-type]
    runner.script = script
    return runner


def test_a_restarted_runner_resumes_from_the_stored_state_without_duplicates(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "memory.sqlite3")
    store.put_alert(SPEC.name, SPEC.to_config())
    script = dict(enumerate([0.1, 0.9, 0.9, 0.9, 0.1, 0.1]))
    delivered = Recorder()
    first = scripted(store, delivered, script)
    for seq in range(2):
        put_clip(store, seq)
        assert asyncio.run(first.poll()) == 1
        assert asyncio.run(first.poll()) == 0  # nothing new: nothing evaluated
    before_start = AlertState(seq=0, score=0.1, generation=store.stats("cam").generation).to_dict()
    # A runner on a stale state (say the start's state was lost while its record was kept) evaluates the window
    # again: the store knows the start's key, so nothing is created and nothing is delivered twice.
    store.put_alert_state("red", "cam", before_start)
    stale = scripted(store, delivered, script)
    emitted, count = stale.poll_sync()
    assert count == 1 and emitted.records == [] and event_kinds(store.events()) == ["red/cam/1/start"]

    put_clip(store, 2)
    asyncio.run(stale.poll())
    stored = store.alert_state("red", "cam")
    assert stored is not None and stored["seq"] == 2 and stored["phase"] == "active"
    second = scripted(store, delivered, script)  # a restart mid-event: the same store, a fresh runner
    assert second.poll_sync()[1] == 0  # seq 2 was evaluated: not again
    put_clip(store, 3)
    put_clip(store, 4)
    emitted, count = second.poll_sync()
    assert count == 1  # fell behind: only the latest window is evaluated
    assert [r["kind"] for _, r in emitted.records] == ["end"] and emitted.records[0][1]["event"] == "red/cam/1"
    assert event_kinds(store.events()) == ["red/cam/1/start", "red/cam/1/end"]
    assert event_kinds(r for _, r in delivered.records) == ["red/cam/1/start"]  # `poll` delivers; poll_sync does not


def test_a_stream_made_again_is_evaluated_from_its_first_clip(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "memory.sqlite3")
    store.put_alert(SPEC.name, SPEC.to_config())
    runner = scripted(store, Recorder(), {0: 0.1, 1: 0.1, 2: 0.1})
    for seq in range(3):
        put_clip(store, seq)
    assert runner.poll_sync()[1] == 1 and store.alert_state("red", "cam")["seq"] == 2
    store.delete_stream("cam")
    assert runner.poll_sync()[1] == 0  # gone: nothing to evaluate, nothing logged as a failure
    put_clip(store, 0)  # its seqs start again at 0
    assert runner.poll_sync()[1] == 1 and store.alert_state("red", "cam")["seq"] == 0
    assert runner.metrics.evaluations.labels("failed")._value.get() == 0


def test_a_stream_made_again_has_events_of_its_own(tmp_path: Path) -> None:
    """Its seqs start at 0 again, so its events have the old ones' seqs: the stream's generation in the key keeps
    them from being taken for repeats (and dropped)."""
    store = EmbeddedStore(tmp_path / "memory.sqlite3")
    store.put_alert(SPEC.name, SPEC.to_config())
    runner = scripted(store, Recorder(), {0: 0.1, 1: 0.9})
    for life in range(2):
        if life:
            store.delete_stream("cam")
        for seq in range(2):
            put_clip(store, seq)
            runner.poll_sync()
    starts = [e for e in store.events() if e["kind"] == "start"]
    assert event_kinds(starts) == ["red/cam/1/start"] * 2 and starts[0]["key"] != starts[1]["key"]


def test_the_runner_delivers_created_records_and_publishes_state(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "memory.sqlite3")
    spec = replace(SPEC, streams=("cam", "door"), mqtt_topic="alerts/red", webhook_url="https://x.test/h")
    store.put_alert(spec.name, replace(spec, webhook_secret="k").to_config())
    store.put_alert("other", replace(SPEC, name="other", streams=("door",), every_clips=2).to_config())
    delivery = Recorder()
    runner = scripted(store, delivery, {0: 0.9, 1: 0.9, ("cam", 1): 0.2})
    for seq in range(2):
        put_clip(store, seq, "cam")
        put_clip(store, seq, "door")
        asyncio.run(runner.poll())
    kinds = [(t.alert, r["stream"], r["kind"], r["id"]) for t, r in delivery.records]
    # "other" evaluates every 2 clips: first at seq 1
    expected = [("red", "cam", "start", 1), ("red", "door", "start", 2), ("red", "cam", "end", 3)]
    assert kinds == [*expected, ("other", "door", "start", 4)]
    assert event_kinds(store.events(alert="other")) == ["other/door/1/start"]
    target, state = delivery.states[-1]
    assert target.mqtt_topic == "alerts/red" and target.webhook_secret == "k"
    assert state["active"] and state["streams"]["cam"]["active"] is False
    assert state["streams"]["door"] == {"active": True, "score": pytest.approx(0.9), "seq": 1, "event": "red/door/0"}
    assert all(t.alert == "red" for t, _ in delivery.states)  # "other" has no topic: no state published


def test_closing_mid_poll_still_delivers_what_the_poll_stored(tmp_path: Path) -> None:
    """A runner stopped (a restart) while a poll is storing records hands them to delivery before it stops: the
    next runner resumes from the stored state and would never deliver them again."""
    store = EmbeddedStore(tmp_path / "memory.sqlite3")
    store.put_alert(SPEC.name, replace(SPEC, streams=("cam",)).to_config())
    delivery = Recorder()
    runner = scripted(store, delivery, {0: 0.9})
    put_clip(store, 0, "cam")
    inner = runner.poll_sync

    def slow_poll() -> Any:
        out = inner()  # the start record is stored here
        time.sleep(0.3)
        return out

    runner.poll_sync = slow_poll  # type: ignore[method-assign]

    async def play() -> None:
        await runner.start()
        await asyncio.sleep(0.1)  # mid-poll
        await runner.close()

    asyncio.run(play())
    assert event_kinds(store.events()) == ["red/cam/0/start"]
    assert [(r["stream"], r["kind"]) for _, r in delivery.records] == [("cam", "start")]


def test_a_failing_evaluation_is_counted_and_the_runner_goes_on(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "memory.sqlite3")
    store.put_alert("red", SPEC.to_config())
    runner = scripted(store, Recorder(), {1: 0.9})  # no score for seq 0: KeyError
    registry = runner.metrics.evaluations
    put_clip(store, 0)
    assert runner.poll_sync()[1] == 0
    assert registry.labels("failed")._value.get() == 1
    put_clip(store, 1)
    assert runner.poll_sync()[1] == 1 and [e["kind"] for e in store.events()] == ["start"]


# -- the trained tiny model on synthetic streams -----------------------------------------------------------------

QUESTION = "Is there a red square in the video?"
STREAMS = 10  # 20 events


@pytest.fixture(scope="module")
def model() -> VideoChatFlash:
    torch.manual_seed(0)
    return VideoChatFlash.from_pretrained("tiny")


# Another shape of another colour and kind is on screen the whole time. Beside a red circle the tiny model often misses
# the red square, beside a blue or green square it is unsure (reported in BENCHMARKS.md, Alerts).
DISTRACTORS = [("green", "triangle"), ("yellow", "circle"), ("blue", "circle")]


def moving(rng: np.random.Generator, colour: str, shape: str, appear: float, leave: float) -> Sprite:
    """A sprite as the training scenes draw them (`vcflash.shapes`): 64-87 px, moving 40-100 px, inside the frame."""
    side = int(rng.integers(64, 88))
    direction = str(rng.choice(list(DIRECTIONS)))
    dx, dy = DIRECTIONS[direction]
    travel, margin = float(rng.uniform(40, 100)), side / 2 + 6
    x = rng.uniform(margin + max(0.0, -dx * travel), SIZE[0] - margin - max(0.0, dx * travel))
    y = rng.uniform(margin + max(0.0, -dy * travel), SIZE[1] - margin - max(0.0, dy * travel))
    return Sprite(colour, shape, side, float(x), float(y), direction, travel / (leave - appear), appear, leave)


def stream_scene(i: int) -> tuple[Scene, list[tuple[float, float]]]:
    """A red square that comes and goes twice and another shape on screen the whole time, apart from it, over a
    random background: (scene, the square's spans)."""
    rng = np.random.default_rng([14, i])
    a1 = 8.5 + 4 * int(rng.integers(0, 3))
    l1 = a1 + 8 + 4 * int(rng.integers(0, 4))
    a2 = l1 + 20 + 4 * int(rng.integers(0, 3))
    l2 = a2 + 8 + 4 * int(rng.integers(0, 3))
    seconds = l2 + 24
    squares = (moving(rng, "red", "square", a1, l1), moving(rng, "red", "square", a2, l2))
    colour, shape = DISTRACTORS[i % len(DISTRACTORS)]
    while any(_overlap(other := moving(rng, colour, shape, 0.0, seconds), s, seconds) for s in squares):
        pass
    return Scene(seconds, 1, random_background(rng), (*squares, other)), [(a1, l1), (a2, l2)]


def clips_of(scene: Scene, stream: str) -> list[Clip]:
    frames = np.stack(list(scene.frames()))
    out = []
    for seq in range(len(frames) // 4):
        t = tuple(float(4 * seq + k) for k in range(4))
        out.append(Clip(stream, seq, frames[4 * seq : 4 * seq + 4], t, tuple(WALL0 + x for x in t), 1.0))
    return out


def match(found: list[tuple[float, float]], truth: list[tuple[float, float]], slack: float) -> tuple[int, int]:
    """(found events that match a true one, true events matched): overlapping, starts within `slack` seconds."""
    ok = lambda f, t: f[0] < t[1] and t[0] < f[1] and abs(f[0] - t[0]) <= slack  # noqa: E731
    return sum(any(ok(f, t) for t in truth) for f in found), sum(any(ok(f, t) for f in found) for t in truth)


def test_the_trained_model_alerts_on_a_red_square_coming_and_going(model: VideoChatFlash, tmp_path: Path) -> None:
    """Ten streams, two red-square events each, clips encoded by the encoder's path into a real embedded store
    while the runner's background task evaluates them; the runner is restarted in the middle of one event.
    Precision and recall >= 95%, starts within one window (12 s) of the truth, no record twice."""
    store = EmbeddedStore(tmp_path / "memory.sqlite3")
    settings = ReasonerSettings(alert_poll_s=0.01)
    reasoner = Reasoner(model, store, limits=settings)
    # 12 frames: the tiny model's best window in the sweep of BENCHMARKS.md (Alerts: 100%/100% there, 16 frames 95.2%
    # precision, one false start from a target); the default 16 is the and stays the product default
    spec = AlertSpec("red-square", tuple(f"cam{i}" for i in range(STREAMS)), QUESTION, window_frames=12)
    store.put_alert(spec.name, spec.to_config())
    truths, restarted = {}, False
    delivery = Recorder()

    async def play() -> None:
        nonlocal restarted
        runner = AlertRunner(reasoner, store, delivery, settings, CollectorRegistry())  # type: ignore[arg-type]
        await runner.start()
        try:
            for i in range(STREAMS):
                stream = f"cam{i}"
                scene, truths[stream] = stream_scene(i)
                clips = clips_of(scene, stream)
                tokens = encode(model, clips)
                for clip, t in zip(clips, tokens, strict=True):
                    store.put(to_record(clip, t))
                    deadline = time.monotonic() + 20
                    while (store.alert_state(spec.name, stream) or {}).get("seq") != clip.seq:
                        assert time.monotonic() < deadline, f"{stream} clip {clip.seq} was never evaluated"
                        await asyncio.sleep(0.005)
                    state = store.alert_state(spec.name, stream)
                    if not restarted and state and state["phase"] == "active":  # mid-event: a new runner
                        await runner.close()
                        runner = AlertRunner(reasoner, store, delivery, settings, CollectorRegistry())  # type: ignore[arg-type]
                        await runner.start()
                        restarted = True
        finally:
            await runner.close()

    asyncio.run(play())
    events = store.events()
    assert restarted and len({e["key"] for e in events}) == len(events) == len(delivery.records)
    found_total = truth_total = found_ok = truth_ok = 0
    for stream, truth in truths.items():
        ends = {e["event"]: e for e in events if e["stream"] == stream and e["kind"] == "end"}
        starts = [e for e in events if e["stream"] == stream and e["kind"] == "start"]
        assert set(ends) <= {e["event"] for e in starts}
        found = [(e["start_media_s"], ends[e["event"]]["end_media_s"] if e["event"] in ends else 1e9) for e in starts]
        f, t = match(found, truth, slack=spec.window_frames)  # 1 fps: a window of 12 frames is 12 s
        found_total, truth_total, found_ok, truth_ok = (
            found_total + len(found),
            truth_total + len(truth),
            found_ok + f,
            truth_ok + t,
        )
    precision, recall = found_ok / max(found_total, 1), truth_ok / truth_total
    assert precision >= 0.95 and recall >= 0.95, (precision, recall, truths, events)


def test_the_alert_score_is_ask_s_prefill_over_the_window(model: VideoChatFlash, tmp_path: Path) -> None:
    """The runner's prompt is the one an Ask over exactly the window's clips builds (anchors off): its score equals
    the softmax of the full model's logits over `Reasoner.prompt`'s embeddings."""
    store = EmbeddedStore(tmp_path / "memory.sqlite3")
    scene, _ = stream_scene(0)
    clips = clips_of(scene, "cam")[:6]
    for clip, t in zip(clips, encode(model, clips), strict=True):
        store.put(to_record(clip, t))
    reasoner = Reasoner(model, store)
    runner = AlertRunner(reasoner, store, None, ReasonerSettings(), CollectorRegistry())
    metas = store.clips("cam")[2:6]
    questions = [QUESTION, "Is there a blue square in the video?"]
    scores = runner.score("cam", metas, questions)
    tokens = answer_tokens(model)
    for question, score in zip(questions, scores.tolist(), strict=True):
        span = {"start": metas[0].media_start, "end": metas[-1].media_end}
        params = AskParams(["cam"], question, **span, anchors=False, selection="uniform")
        embeds, _ = reasoner.prompt(params, reasoner.select(params))
        with torch.no_grad():
            p = model.llm(embeds)[0, -1].softmax(-1)
        yes, no = p[list(tokens.yes)].sum(), p[list(tokens.no)].sum()
        assert score == pytest.approx(float(yes / (yes + no)), abs=1e-5)
