"""The reasoner engine: clip selection, the prompt it builds, and exactness against the offline model."""

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from encoder_svc.worker import encode, to_record
from hico import VideoChatFlash
from hico.checkpoint import make_tiny_checkpoint
from hico.prompt import chat_prompt, time_message
from ingest import IngestManager, StreamSpec
from ingest.clips import Clip
from memory import ClipIndex, ClipMeta, ClipRecord, Clock, EmbeddedStore, RedisStore
from reasoner.engine import (
    AskError,
    AskParams,
    AskResult,
    Evidence,
    Reasoner,
    backbone_size,
    select_clips,
    uniform_pick,
)
from vcflash.media import write_test_video
from vcflash.serve.settings import IngestSettings

# Ingest mechanics read local test videos: any file is allowed (the file policy has its own tests).
ROOT = Path("/")
FILES = IngestSettings(media_root=ROOT)

QUESTION = "When does the red square reach the middle?"


def meta(seq: int) -> ClipMeta:
    return ClipMeta("cam", seq, 1000.0 + 4 * seq, 1004.0 + 4 * seq, 4.0 * seq, 4.0 * seq + 4, (4.0 * seq,) * 4)


def test_uniform_pick_is_the_official_middle_sampler() -> None:
    assert uniform_pick(5, 8) == [0, 1, 2, 3, 4]
    assert uniform_pick(10, 5) == [0, 2, 4, 6, 8]
    assert uniform_pick(100, 4) == [12, 37, 62, 87]
    picks = uniform_pick(1000, 128)
    assert len(picks) == 128 and picks == sorted(set(picks))


def test_retrieval_keeps_a_uniform_backbone_and_adds_hits_in_time_order() -> None:
    available = [meta(i) for i in range(20)]
    assert backbone_size(20, 4, retrieval=True) == 2 and backbone_size(20, 4, retrieval=False) == 4
    assert backbone_size(3, 4, retrieval=True) == 4  # all fit: no retrieval
    backbone = [available[i] for i in uniform_pick(20, 2)]
    chosen = select_clips(backbone, 4, hits=[(meta(7), 0.9), (backbone[0], 0.8), (meta(13), 0.5), (meta(15), 0.4)])
    seqs = [e.clip.seq for e in chosen]
    assert seqs == sorted(seqs) and len(seqs) == 4
    assert set(uniform_pick(20, 2)) <= set(seqs)  # backbone: half the budget
    assert [e.clip.seq for e in chosen if e.retrieved] == [7, 13]  # the backbone clip is not a hit; 15 is over budget
    assert select_clips(available[:3], 4) == [Evidence(m) for m in available[:3]]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> VideoChatFlash:
    return VideoChatFlash.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


async def ingest_clips(path: Path) -> list[Clip]:
    manager = IngestManager(FILES, registry=CollectorRegistry())
    manager.add("cam", StreamSpec(str(path), realtime=False))
    await manager.wait("cam")
    clips = []
    while not manager.clips.empty():
        clips.append(manager.clips.get_nowait())
    await manager.close()
    return clips


@pytest.fixture(scope="module")
def stored(model: VideoChatFlash, tmp_path_factory: pytest.TempPathFactory) -> tuple[Reasoner, list[Clip]]:
    tmp = tmp_path_factory.mktemp("mem")
    clips = asyncio.run(ingest_clips(write_test_video(tmp / "v.mp4", seconds=24, fps=10, size=(96, 64))))
    store = EmbeddedStore(tmp / "memory.sqlite3")
    index = ClipIndex()
    for clip, tokens in zip(clips, encode(model, clips), strict=True):
        record = to_record(clip, tokens)
        store.put(record)
        index.add("cam", np.array([clip.seq]), record.vector[None])
    return Reasoner(model, store, index), clips


def test_ask_over_memory_equals_the_offline_model_on_the_same_frames(
    model: VideoChatFlash, stored: tuple[Reasoner, list[Clip]]
) -> None:
    reasoner, clips = stored
    assert [c.seq for c in clips] == list(range(6))  # 24 s at 1 fps: 6 clips of 4 frames
    params = AskParams(["cam"], QUESTION, anchors=False)
    segments = reasoner.select(params)
    embeds, visual = reasoner.prompt(params, segments)
    assert segments[0].duration_s == 24.0 and segments[0].frames == 24

    # Offline: the same 24 sampled frames, encoded in one go, with the same time message.
    frames = np.concatenate([c.frames for c in clips])
    offline_tokens = model.encode_clips(model.preprocess(frames))
    memory_tokens = segments[0].tokens.float()
    torch.testing.assert_close(memory_tokens, offline_tokens, rtol=0, atol=2e-3)  # stored as fp16
    with torch.no_grad():
        ours = model.llm(embeds, visual=visual, last_only=False)[0]
    # Bit-exact given the fp16 storage rounding; close to the unrounded offline path.
    torch.testing.assert_close(
        ours, model.logits(offline_tokens.half().float(), QUESTION, duration_s=24.0), rtol=0, atol=0
    )
    torch.testing.assert_close(ours, model.logits(offline_tokens, QUESTION, duration_s=24.0), rtol=1e-2, atol=1e-2)

    events = list(reasoner.ask(AskParams(["cam"], QUESTION, anchors=False, max_new_tokens=6)))
    result = events[-1]
    assert isinstance(result, AskResult) and all(isinstance(e, str) for e in events[:-1])
    offline = model.answer(offline_tokens.half().float(), QUESTION, duration_s=24.0, max_new_tokens=6)
    assert result.answer == offline.text and result.new_tokens == len(offline.token_ids)
    assert [e.clip.seq for e in result.evidence] == list(range(6)) and result.visual_tokens == 6 * 64


def test_prompt_with_anchors_and_several_cameras(model: VideoChatFlash, stored: tuple[Reasoner, list[Clip]]) -> None:
    reasoner, _ = stored
    segments = reasoner.select(AskParams(["cam"], QUESTION, start=4, end=12))
    assert [e.clip.seq for e in segments[0].evidence] == [1, 2] and segments[0].duration_s == 8.0
    first = segments[0].evidence[0].clip
    described = segments[0].describe(anchors=True, label=False)
    assert described.startswith(time_message(8.0, 8))
    assert described.endswith(" UTC.") and "It runs from " in described and str(int(first.wall_start)) not in described

    two = [segments[0], segments[0]]
    embeds, visual = reasoner.prompt(AskParams(["cam", "cam2"], QUESTION, anchors=False), two)
    assert len(visual) == 2 * 2 * 64 and visual.diff().max() > 1  # two spans with a label between them
    tok = model.tokenizer
    label = tok('\nCamera "cam":').input_ids
    one, _ = reasoner.prompt(AskParams(["cam"], QUESTION, anchors=False), segments[:1])
    assert embeds.shape[1] > one.shape[1] + 128 + len(label)
    msg = 'Camera "cam": the video lasts for 8.00 seconds, and 8 frames are uniformly sampled from it.'
    assert msg in chat_prompt(QUESTION, segments[0].describe(False, True))


def test_ask_errors(stored: tuple[Reasoner, list[Clip]]) -> None:
    reasoner, _ = stored
    for params, match in [
        (AskParams([], QUESTION), "at least one stream"),
        (AskParams(["cam", "cam"], QUESTION), "distinct"),
        (AskParams(["cam"], "  "), "empty"),
        (AskParams(["cam"], "x" * 5000), "5000 characters"),
        (AskParams(["cam"], QUESTION, start=10, end=5), "inverted"),
        (AskParams(["cam"], QUESTION, max_frames=6), "multiple of 4"),
        (AskParams(["cam"], QUESTION, dropout="recommended"), "out of range"),
        (AskParams(["cam"], QUESTION, dropout="bogus"), "TYPE:LAYERS:RATIOS"),
    ]:
        with pytest.raises(AskError, match=match):
            list(reasoner.ask(params))
    with pytest.raises(KeyError, match="unknown stream"):
        list(reasoner.ask(AskParams(["nope"], QUESTION)))
    events = list(reasoner.ask(AskParams(["cam"], QUESTION, start=1000, end=2000)))
    assert events[0] == "There is no video from cam in that time range."
    assert isinstance(events[-1], AskResult) and events[-1].evidence == [] and "no clips" in events[-1].note


def test_dropout_and_retrieval_through_the_engine(stored: tuple[Reasoner, list[Clip]]) -> None:
    reasoner, _ = stored
    plain = list(reasoner.ask(AskParams(["cam"], QUESTION, max_new_tokens=1)))[-1]
    dropped = list(reasoner.ask(AskParams(["cam"], QUESTION, max_new_tokens=1, dropout="uniform:1:1,0.5")))[-1]
    assert isinstance(plain, AskResult) and isinstance(dropped, AskResult)
    assert plain.visual_tokens == dropped.visual_tokens == 6 * 64  # counted before the drop
    retrieved = list(reasoner.ask(AskParams(["cam"], QUESTION, max_frames=8, selection="retrieval", max_new_tokens=1)))
    result = retrieved[-1]
    assert isinstance(result, AskResult) and len(result.evidence) == 2
    assert sum(e.retrieved for e in result.evidence) == 1


def test_retrieval_in_a_range_cites_only_clips_of_the_range(stored: tuple[Reasoner, list[Clip]]) -> None:
    reasoner, _ = stored
    params = AskParams(["cam"], QUESTION, start=4, end=20, max_frames=8, selection="retrieval", max_new_tokens=1)
    (segment,) = reasoner.select(params)  # clips 1-4 overlap [4, 20): over the budget of 2, so one is retrieved
    assert len(segment.evidence) == 2 and sum(e.retrieved for e in segment.evidence) == 1
    assert {e.clip.seq for e in segment.evidence} <= {1, 2, 3, 4} and segment.duration_s == 16.0


@pytest.fixture(params=["embedded", "redis"])
def reasoner_on(request: pytest.FixtureRequest, stored: tuple[Reasoner, list[Clip]]) -> Iterator[Reasoner]:
    """The stored clips' reasoner, on either backend: Redis gets a copy of the embedded memory."""
    reasoner, _ = stored
    if request.param == "embedded":
        yield reasoner
        return
    store = RedisStore(request.getfixturevalue("redis_server").url, prefix=f"test-{uuid.uuid4().hex}")
    metas = reasoner.store.clips("cam")
    tokens = reasoner.store.tokens("cam", [m.seq for m in metas])
    seqs, vectors = reasoner.store.vectors("cam")
    assert seqs.tolist() == [m.seq for m in metas]
    for meta, t, v in zip(metas, tokens, vectors, strict=True):
        store.put(ClipRecord(meta, t, v))
    yield Reasoner(reasoner.model, store, reasoner.index)
    store.close()


@pytest.mark.parametrize("clock", ["media", "wall"])
def test_a_range_inside_one_clip_asks_about_that_clip(reasoner_on: Reasoner, clock: Clock) -> None:
    """Issue 8: a 3 s range inside a clip answered 'no video'; the clips that overlap a range are asked about."""
    clip = reasoner_on.store.clips("cam")[2]  # media [8, 12)
    start, end = clip.span(clock)

    def evidence(a: float, b: float | None) -> list[int]:
        result = list(reasoner_on.ask(AskParams(["cam"], QUESTION, start=a, end=b, clock=clock, max_new_tokens=1)))
        assert isinstance(result[-1], AskResult)
        return [e.clip.seq for e in result[-1].evidence]

    assert evidence(start + 0.5, start + 3.5) == [2]
    assert evidence(end - 0.001, end + 0.001) == [2, 3]
    assert evidence(end, end + 3) == [3]  # clip 2 ends where the range starts
    assert evidence(end + 11.5, None) == [5]  # open end, inside the last clip


def test_the_warm_up_touches_neither_memory_nor_the_answers(stored: tuple[Reasoner, list[Clip]]) -> None:
    reasoner, _ = stored
    params = AskParams(["cam"], QUESTION, anchors=False, max_new_tokens=6, selection="index")
    before = [e for e in reasoner.ask(params)][-1]
    keys = (reasoner.keys.built, reasoner.keys.built_ahead, reasoner.keys.loaded, len(reasoner.keys))
    stats = reasoner.store.stats("cam")
    assert reasoner.warm_up() > 0
    assert (reasoner.keys.built, reasoner.keys.built_ahead, reasoner.keys.loaded, len(reasoner.keys)) == keys
    assert reasoner.store.stats("cam") == stats  # nothing written, nothing evicted
    after = [e for e in reasoner.ask(params)][-1]
    assert (after.answer, after.evidence, after.moments) == (before.answer, before.evidence, before.moments)
    assert not reasoner.model_lock.locked()
