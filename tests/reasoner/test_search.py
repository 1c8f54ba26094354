"""Coarse-to-fine selection by the model's own relevance (the windowed scan), ranked moments, and Search.

The model is the tiny one (random or trained): these tests check structure, exactness and ordering, never which
clip a question finds."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
import torch
from prometheus_client import CollectorRegistry

from hico import VideoChatFlash
from hico.checkpoint import make_tiny_checkpoint
from memory import ClipIndex, ClipMeta, ClipRecord, EmbeddedStore
from memory.records import clip_vector
from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from reasoner.engine import (
    MOMENTS,
    AskError,
    AskParams,
    AskResult,
    Reasoner,
    pack,
    rank_moments,
    uniform_pick,
)
from reasoner.keys import KeyIndex
from reasoner.server import SERVICE_NAME, ReasonerServicer
from vcflash.serve.rpc import create_server

Q = "When does the red square reach the middle?"
CLIPS = 40  # 160 s at 1 fps
TOKEN = "search-tests-token-0123456789"


def meta(seq: int, stream: str = "cam") -> ClipMeta:
    return ClipMeta(stream, seq, 1000.0 + 4 * seq, 1004.0 + 4 * seq, 4.0 * seq, 4.0 * seq + 4, (4.0 * seq,) * 4)


def test_pack_fills_the_budget_with_recent_backbone_hits_and_neighbours() -> None:
    scores = np.zeros(100)
    scores[[50, 20, 51]] = [3.0, 2.0, 1.0]
    scores[7] = np.nan  # a clip lost while scanning ranks last
    why = pack(100, 16, scores)
    assert list(why) == sorted(why) and len(why) == 16
    assert [i for i, w in why.items() if w == "recent"] == [98, 99]  # budget // 8
    assert {i for i, w in why.items() if w == "backbone"} == set(uniform_pick(100, 4))  # budget // 4
    assert why[50] == why[20] == "hit" and why[49] == why[19] == why[21] == "neighbour"
    assert why[51] == "neighbour"  # 51 came in next to 50 before its own turn as a hit
    assert 7 not in why
    assert pack(10, 16, np.zeros(10)) == dict.fromkeys(range(10), "all")  # everything fits: all, nothing else
    assert list(pack(10, 2, np.arange(10.0))) == [8, 9]  # a tiny budget: the best and a neighbour
    # a hit already in the backbone keeps that reason; its neighbours, up to 2 away, still come in
    assert pack(5, 4, np.array([0, 0, 9, 0, 0.0]), neighbours=2) == {
        0: "neighbour",
        1: "neighbour",
        2: "backbone",
        3: "neighbour",
    }


def test_moments_join_consecutive_top_clips_and_rank_best_first() -> None:
    scored = [(meta(i), s) for i, s in enumerate([0.1, 0.9, 0.8, 0.0, 0.7, float("nan")])]
    scored.append((meta(2, "door"), 0.85))
    moments = rank_moments(scored, 4)
    assert [(m.stream_id, m.first.seq, m.last.seq, m.score) for m in moments] == [
        ("cam", 1, 2, 0.9),
        ("door", 2, 2, 0.85),
        ("cam", 4, 4, 0.7),
    ]
    assert rank_moments(scored, 1)[0].first == rank_moments(scored, 1)[0].last == meta(1)
    assert rank_moments([(meta(0), float("nan"))], 3) == []


@pytest.fixture(scope="module")
def reasoner(tmp_path_factory: pytest.TempPathFactory) -> Reasoner:
    """40 clips of stand-in tokens on the scale of real ones on "cam", 3 on "door"; the heuristic index too."""
    tmp = tmp_path_factory.mktemp("search")
    model = VideoChatFlash.from_pretrained(make_tiny_checkpoint(tmp / "tiny"))
    store, index = EmbeddedStore(tmp / "memory.sqlite3"), ClipIndex()
    g = torch.Generator().manual_seed(0)
    for stream, n in [("cam", CLIPS), ("door", 3)]:
        for seq in range(n):
            tokens = (torch.randn(64, model.config.text.hidden_size, generator=g) * 0.05).half().numpy()
            record = ClipRecord(meta(seq, stream), tokens, clip_vector(tokens))
            store.put(record)
            index.add(stream, np.array([seq]), record.vector[None])
    return Reasoner(model, store, index)


def test_scan_selection_packs_in_time_order_within_the_budget(reasoner: Reasoner) -> None:
    moments: list = []
    (segment,) = reasoner.select(AskParams(["cam"], Q, max_frames=64, selection="scan"), moments)
    seqs = [e.clip.seq for e in segment.evidence]
    scores = reasoner.score_clips("cam", reasoner.store.clips("cam"), Q)
    assert scores.shape == (CLIPS,) and np.isfinite(scores).all()
    assert seqs == sorted(seqs) and len(seqs) == 16 and segment.tokens.shape[0] == 16
    assert {38, 39} <= set(seqs) and set(uniform_pick(CLIPS, 4)) <= set(seqs)  # latest window and backbone
    assert int(np.argmax(scores)) in seqs  # the best clip is always looked at
    assert all(e.score == pytest.approx(float(scores[e.clip.seq])) for e in segment.evidence)
    assert segment.duration_s == CLIPS * 4.0  # the time message states the whole range, as uniform does
    assert [m.score for m in moments] == sorted((m.score for m in moments), reverse=True) and moments
    assert moments[0].score == pytest.approx(float(scores.max()))
    assert sum(m.last.seq - m.first.seq + 1 for m in moments) == MOMENTS


def test_scan_changes_nothing_when_everything_fits(reasoner: Reasoner) -> None:
    """The range fits the budget: the same clips and the exact same prompt as uniform (the official one)."""
    for start, end in [(None, None), (40.0, 80.0)]:
        uniform = AskParams(["cam"], Q, start=start, end=end, anchors=False)
        scan = AskParams(["cam"], Q, start=start, end=end, anchors=False, selection="scan")
        a, b = reasoner.select(uniform), reasoner.select(scan)
        assert [e.clip for e in a[0].evidence] == [e.clip for e in b[0].evidence]
        assert a[0].duration_s == b[0].duration_s
        (ea, va), (eb, vb) = reasoner.prompt(uniform, a), reasoner.prompt(scan, b)
        assert torch.equal(ea, eb) and torch.equal(va, vb)


def test_search_ranks_what_ask_returns(reasoner: Reasoner) -> None:
    params = AskParams(["cam"], Q, start=20.0, end=120.0, max_frames=32, selection="scan", max_new_tokens=1)
    found = reasoner.search(params, limit=MOMENTS)
    result = list(reasoner.ask(params))[-1]
    assert isinstance(result, AskResult) and found.clips_scored == 25 and found.note == ""
    assert result.moments == found.moments
    assert all(20.0 < m.last.media_end and m.first.media_start < 120.0 for m in found.moments)
    assert [m.score for m in found.moments] == sorted((m.score for m in found.moments), reverse=True)
    assert len(reasoner.search(params, limit=3).moments) <= 3
    two = reasoner.search(AskParams(["cam", "door"], Q, selection="scan"), limit=100)
    assert two.clips_scored == CLIPS + 3 and {m.stream_id for m in two.moments} == {"cam", "door"}
    heuristic = reasoner.search(AskParams(["cam"], Q, start=20.0, end=120.0, selection="retrieval"), limit=5)
    assert 1 <= len(heuristic.moments) <= 5 and heuristic.clips_scored == 25
    empty = reasoner.search(AskParams(["cam"], Q, start=5000.0, end=6000.0, selection="scan"))
    assert empty.moments == [] and "no clips" in empty.note


def test_the_key_index_is_built_lazily_once_and_ranks_like_the_scan_packs(reasoner: Reasoner) -> None:
    reasoner.keys = KeyIndex()
    params = AskParams(["cam"], Q, start=20.0, end=120.0, max_frames=32, selection="index", max_new_tokens=1)
    first = reasoner.search(params, limit=5)
    assert reasoner.keys.built == 25 and len(reasoner.keys) == 25  # every clip of the range, once
    again = reasoner.search(params, limit=5)
    assert reasoner.keys.built == 25 and again.moments == first.moments  # nothing rebuilt, the same ranking
    whole = reasoner.search(AskParams(["cam"], Q, selection="index"), limit=5)
    assert reasoner.keys.built == CLIPS and whole.clips_scored == CLIPS  # only the clips not indexed yet
    scores = reasoner.index_scores("cam", [m.seq for m in reasoner.store.clips("cam")], Q)
    assert scores.shape == (CLIPS,) and float(scores.sum()) == pytest.approx(1.0, abs=1e-4)
    assert whole.moments[0].score == pytest.approx(float(scores.max()))
    result = list(reasoner.ask(params))[-1]
    assert isinstance(result, AskResult) and result.moments == reasoner.search(params, limit=MOMENTS).moments
    seqs = [e.clip.seq for e in result.evidence]
    assert seqs == sorted(seqs) and len(seqs) == 8 and 29 in seqs  # the budget, in time order, the newest clip
    cfg = reasoner.model.config.text
    per_clip = cfg.num_key_value_heads * 64 * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert reasoner.keys.bytes() == CLIPS * per_clip  # float32 keys on a CPU: Hkv x head_dim per token


def test_search_errors_are_asks(reasoner: Reasoner) -> None:
    with pytest.raises(KeyError, match="unknown stream"):
        reasoner.search(AskParams(["nope"], Q))
    for params, limit, match in [
        (AskParams(["cam"], "x" * 5000), 10, "5000 characters"),
        (AskParams(["cam"], Q, start=10, end=10), 10, "inverted"),
        (AskParams(["cam"], "  "), 10, "empty"),
        (AskParams(["cam"], Q), 0, "limit"),
        (AskParams(["cam"], Q), 101, "limit"),
    ]:
        with pytest.raises(AskError, match=match):
            reasoner.search(params, limit)


@pytest_asyncio.fixture
async def served(reasoner: Reasoner) -> AsyncIterator[str]:
    servicer = ReasonerServicer(reasoner, CollectorRegistry())
    entry = (pb_grpc.add_ReasonerServicer_to_server, servicer, SERVICE_NAME)
    server, port, _ = create_server("127.0.0.1:0", [entry], TOKEN, 1 << 22)
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.mark.asyncio
async def test_search_over_grpc_and_its_status_codes(served: str) -> None:
    auth = (("authorization", f"Bearer {TOKEN}"),)
    async with grpc.aio.insecure_channel(served) as channel:
        stub = pb_grpc.ReasonerStub(channel)
        ok = await stub.Search(
            pb.SearchRequest(stream_ids=["cam"], question=Q, range=pb.TimeRange(start=20, end=120), limit=4),
            metadata=auth,
        )
        assert 1 <= len(ok.moments) <= 4 and ok.clips_scored == 25
        top = ok.moments[0]
        assert top.stream_id == "cam" and top.media_start < top.media_end and top.wall_start == 1000 + top.media_start
        assert top.last_seq >= top.first_seq and list(ok.moments) == sorted(ok.moments, key=lambda m: -m.score)
        indexed = await stub.Search(
            pb.SearchRequest(stream_ids=["cam"], question=Q, selection=pb.SELECTION_INDEX, limit=4), metadata=auth
        )
        assert 1 <= len(indexed.moments) <= 4 and indexed.clips_scored == CLIPS
        for request, code in [
            (pb.SearchRequest(stream_ids=["nope"], question=Q), grpc.StatusCode.NOT_FOUND),
            (pb.SearchRequest(stream_ids=["cam"], question=Q, limit=101), grpc.StatusCode.INVALID_ARGUMENT),
            (pb.SearchRequest(stream_ids=["cam"], question="x" * 5000), grpc.StatusCode.INVALID_ARGUMENT),
            (pb.SearchRequest(stream_ids=["cam"], question=Q, selection=9), grpc.StatusCode.INVALID_ARGUMENT),
            (
                pb.SearchRequest(stream_ids=["cam"], question=Q, range=pb.TimeRange(start=9, end=3)),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Search(request, metadata=auth)
            assert e.value.code() == code
        empty = await stub.Search(
            pb.SearchRequest(stream_ids=["cam"], question=Q, range=pb.TimeRange(start=5000)), metadata=auth
        )
        assert not empty.moments and "no clips" in empty.note
        ask = pb.AskRequest(
            stream_ids=["cam"],
            question=Q,
            max_frames=32,
            selection=pb.SELECTION_SCAN,
            generation=pb.Generation(max_new_tokens=1),
        )
        events = [e async for e in stub.Ask(ask, metadata=auth)]
        result = events[-1].result
        assert len(result.evidence) == 8 and len(result.moments) >= 1
        assert [c.clip.seq for c in result.evidence] == sorted(c.clip.seq for c in result.evidence)


@pytest.mark.asyncio
async def test_cli_search(served: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from vcflash.cli import main

    monkeypatch.setenv("VCFLASH_API_TOKEN", TOKEN)
    base = ["search", "--address", served, "--stream", "cam", "--stream", "door", "--from", "0", "--to", "40", Q]
    assert await asyncio.to_thread(main, [*base, "--json", "--limit", "3"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["clips_scored"] == 13 and 1 <= len(record["moments"]) <= 3
    assert set(record["moments"][0]) >= {"stream_id", "media_start", "wall_end", "score"}
    assert await asyncio.to_thread(main, base) == 0
    out = capsys.readouterr().out
    assert "moments from 13 clips, best first" in out and " 1. " in out and "UTC  score" in out
    assert await asyncio.to_thread(main, [*base, "--selection", "index", "--limit", "2"]) == 0
    assert "moments from 13 clips" in capsys.readouterr().out
    live = ["ask-live", "--address", served, "--stream", "cam", "--selection", "scan", "--max-frames", "8", Q]
    assert await asyncio.to_thread(main, [*live, "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "evidence: 2 clips" in out and "moments:" in out and "score" in out


def test_readme_documents_search() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "vcflash search" in readme and "SELECTION_SCAN" in readme
