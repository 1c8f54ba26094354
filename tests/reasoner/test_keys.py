"""The key index's contiguous per-stream blocks (`reasoner.keys.KeyIndex`) and the keys built as clips are written
(`KeyIndexer`, and the Reasoner service running it): scores equal to the per-clip computation, growth, eviction,
generations, and a Search over indexed memory that builds nothing lazily."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from hico import VideoChatFlash
from hico.checkpoint import make_tiny_checkpoint
from hico.relevance import block_scores, key_block, key_scores
from memory import ClipMeta, ClipRecord, EmbeddedStore
from memory.records import Retention, clip_vector
from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from reasoner.engine import AskParams, Reasoner
from reasoner.keys import KeyIndex, batch_size
from reasoner.server import ReasonerService
from vcflash.serve.settings import Settings

HKV, T, HD, H = 2, 8, 4, 4  # small random keys: 2 kv heads, 8 tokens a clip, 4 dims, 4 query heads
Q = "When does the red square reach the middle?"
TOKEN = "keys-tests-token-0123456789"


def random_keys(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, HKV, T, HD, generator=torch.Generator().manual_seed(seed))  # [n, Hkv, T, hd]


def reference(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The per-clip computation as Qwen2 attention does it: kv heads repeated, one softmax per head over every
    token of the clips together, head-mean, summed per clip."""
    k = keys.permute(1, 0, 2, 3).flatten(1, 2).repeat_interleave(H // HKV, 0)  # [H, n * T, hd]
    w = ((query[:, None] @ k.transpose(-1, -2))[:, 0] / HD**0.5).softmax(-1).mean(0)
    return w.reshape(len(keys), T).sum(-1)


def test_block_scores_equal_the_per_clip_computation_in_any_order_and_batching() -> None:
    keys, query = random_keys(50), torch.randn(H, HD, generator=torch.Generator().manual_seed(1))
    index = KeyIndex()
    order = np.random.default_rng(0).permutation(50)
    for part in np.array_split(order, 7):  # batches in any order: the block keeps seq order
        index.add("cam", part.tolist(), keys[torch.from_numpy(part)])
    assert index.held("cam").tolist() == list(range(50)) and index.built_ahead == 50 and index.built == 0
    nothing = lambda seqs: pytest.fail(f"built {seqs}")  # noqa: E731 - everything is held
    for seqs in [list(range(50)), list(range(10, 30)), [7], [40, 3, 3, 12], list(range(49, -1, -1))]:
        got = block_scores(query, index.get("cam", seqs, nothing), T)
        torch.testing.assert_close(got, reference(query, keys[seqs]), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got, key_scores(query, keys[seqs], chunk=3), rtol=1e-5, atol=1e-7)
    assert float(block_scores(query, index.get("cam", range(50), nothing), T).sum()) == pytest.approx(1.0, abs=1e-5)
    # a run of held clips is a view of the block: no stack, no copy per question
    a, b = index.get("cam", range(10, 30), nothing), index.get("cam", range(5, 45), nothing)
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert index.bytes() == 50 * HKV * T * HD * 4  # float32 on a CPU
    with pytest.raises(ValueError, match="whole number"):
        block_scores(query, index.get("cam", [1, 2], nothing)[:, :, :-1], T)


def test_missing_keys_are_built_lazily_once_and_counted_apart() -> None:
    keys = random_keys(30)
    index, built = KeyIndex(), []

    def build(seqs: list[int]) -> torch.Tensor:
        built.append(seqs)
        return keys[seqs]

    index.add("cam", list(range(20, 30)), keys[20:30])  # ahead: the newest
    got = index.get("cam", list(range(30)), build)  # a question over all: the older ones built, merged before
    assert built == [list(range(20))] and index.built == 20 and index.built_ahead == 10
    assert index.held("cam").tolist() == list(range(30))
    q = torch.randn(H, HD)
    torch.testing.assert_close(block_scores(q, got, T), reference(q, keys), rtol=1e-5, atol=1e-7)
    index.get("cam", [3, 25], build)
    assert len(built) == 1  # held: nothing rebuilt
    assert index.add("cam", [5, 6], keys[5:7]) == 0 and index.built_ahead == 10  # already held: skipped


def test_a_view_handed_out_stays_valid_while_the_block_grows_and_evicts() -> None:
    keys = random_keys(200)
    index = KeyIndex(max_clips=100)
    index.add("cam", list(range(10)), keys[:10])
    view = index.get("cam", range(10), lambda s: pytest.fail("held"))
    before = view.clone()
    for i in range(10, 200, 7):  # grows, then drops its oldest rows past the cap
        index.add("cam", list(range(i, min(i + 7, 200))), keys[i : i + 7])
    assert torch.equal(view, before)
    assert len(index) == 100 and index.held("cam").tolist() == list(range(100, 200))  # the newest kept
    index.add("door", list(range(90)), random_keys(90))  # cam keeps 10 of its rows: its block gives memory back
    kept = index.get("cam", range(190, 200), lambda s: pytest.fail("held"))
    assert index.held("cam").tolist() == list(range(190, 200)) and torch.equal(kept, key_block(keys[190:]))
    assert kept.untyped_storage().nbytes() <= 16 * HKV * T * HD * 4


def test_eviction_drops_the_least_recently_used_streams_oldest_clips_but_not_a_questions_own() -> None:
    keys = random_keys(40)
    index, built = KeyIndex(max_clips=30), []

    def build(seqs: list[int]) -> torch.Tensor:
        built.append(seqs)
        return keys[seqs]

    index.add("door", list(range(10)), keys[:10])
    index.add("cam", list(range(15)), keys[:15])
    index.get("door", [0], build)  # door used last: cam is the least recently used
    index.add("yard", list(range(10)), keys[:10])  # 35 clips: cam's 5 oldest go
    assert len(index) == 30 and index.held("cam").tolist() == list(range(5, 15))
    assert index.held("door").tolist() == list(range(10))
    got = index.get("cam", list(range(40)), build)  # a question over more than the cap keeps all of its clips
    assert got.shape == (HKV, HD, 40 * T) and index.held("cam").tolist() == list(range(40))
    assert index.streams() == ["cam"] and len(index) == 40  # the others made room
    assert built[-1] == [*range(5), *range(15, 40)]
    index.add("door", [0], keys[:1])  # written ahead past the cap: cam's oldest go, a question's only while asked
    assert len(index) == 30 and index.held("cam").tolist() == list(range(11, 40))


def test_a_stream_deleted_and_made_again_drops_its_keys() -> None:
    old, new = random_keys(5, seed=1), random_keys(5, seed=2)
    index = KeyIndex()
    index.add("cam", list(range(5)), old, generation="g1")
    assert index.held("cam", "g2").size == 0  # another generation's keys are not this one's
    q = torch.randn(H, HD)
    got = index.get("cam", range(5), lambda seqs: new[seqs], "g2")  # seq 0..4 are other clips now
    assert index.built == 5
    torch.testing.assert_close(block_scores(q, got, T), reference(q, new), rtol=1e-5, atol=1e-7)
    index.drop_stream("cam")
    assert len(index) == 0 and index.bytes() == 0


def test_batches_are_sized_to_the_time_budget() -> None:
    assert batch_size(0.0, 0.05) == 1  # nothing measured yet: one clip
    assert batch_size(0.003, 0.05) == 16
    assert batch_size(1.0, 0.05) == 1 and batch_size(1e-6, 0.05) == 256


# -- keys built as clips are written: the indexer over real memory and the tiny model ---------------------------


def meta(seq: int, stream: str = "cam") -> ClipMeta:
    return ClipMeta(stream, seq, 1000.0 + 4 * seq, 1004.0 + 4 * seq, 4.0 * seq, 4.0 * seq + 4, (4.0 * seq,) * 4)


def write(store: EmbeddedStore, stream: str, seqs: range, width: int) -> None:
    g = torch.Generator().manual_seed(len(seqs) * 7 + seqs.start)
    for seq in seqs:
        tokens = (torch.randn(64, width, generator=g) * 0.05).half().numpy()
        store.put(ClipRecord(meta(seq, stream), tokens, clip_vector(tokens)))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> VideoChatFlash:
    return VideoChatFlash.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


def test_the_indexer_builds_keys_as_clips_arrive_and_a_search_builds_none(
    model: VideoChatFlash, tmp_path: Path
) -> None:
    width = model.config.text.hidden_size
    with EmbeddedStore(tmp_path / "memory.sqlite3") as store:
        write(store, "cam", range(40), width)
        reasoner = Reasoner(model, store)
        indexer = reasoner.key_indexer()
        while indexer.step():  # what the background loop does each poll, in batches
            pass
        assert reasoner.keys.built_ahead == 40 and reasoner.keys.built == 0
        write(store, "cam", range(40, 45), width)  # new clips: only they are built
        write(store, "door", range(3), width)
        while indexer.step():
            pass
        assert reasoner.keys.built_ahead == 48 and reasoner.keys.held("cam").tolist() == list(range(45))
        found = reasoner.search(AskParams(["cam", "door"], Q, selection="index"), limit=5)
        assert reasoner.keys.built == 0 and found.clips_scored == 48 and found.moments
        lazily = Reasoner(model, store)  # the same scores from keys a question built
        seqs = list(range(45))
        torch.testing.assert_close(
            torch.from_numpy(reasoner.index_scores("cam", seqs, Q)),
            torch.from_numpy(lazily.index_scores("cam", seqs, Q)),
        )
        assert lazily.keys.built == 45
        ahead = lazily.key_indexer()  # started after a question built cam's keys: only door's are left to build
        while ahead.step():
            pass
        write(store, "cam", range(45, 46), width)  # past cam's held run, skipped at once: the new clip is next
        while ahead.step():
            pass
        assert lazily.keys.built_ahead == 4 and lazily.keys.held("cam").tolist() == list(range(46))
        per_clip = store.stats("cam").bytes // 46
        store.set_retention("cam", Retention(max_bytes=per_clip * 20))  # retention keeps the newest 20
        store.enforce_retention()
        held = sorted(m.seq for m in store.clips("cam"))
        assert len(held) < 45
        indexer.step()
        assert reasoner.keys.held("cam").tolist() == held  # the evicted clips' keys are gone too
        store.delete_stream("door")  # deleted: its keys go; made again: its new clips are indexed afresh
        indexer.step()
        assert reasoner.keys.streams() == ["cam"]
        write(store, "door", range(2), width)
        while indexer.step():
            pass
        assert reasoner.keys.held("door").tolist() == [0, 1] and reasoner.keys.built_ahead == 51  # and cam 45


def test_the_indexer_starts_each_stream_from_its_newest_clips_within_the_cap(
    model: VideoChatFlash, tmp_path: Path
) -> None:
    with EmbeddedStore(tmp_path / "memory.sqlite3") as store:
        for stream in ("cam", "door"):
            write(store, stream, range(30), model.config.text.hidden_size)
        reasoner = Reasoner(model, store)
        reasoner.keys = KeyIndex(max_clips=20)
        indexer = reasoner.key_indexer()
        while indexer.step():
            pass
        assert reasoner.keys.built_ahead == 20  # each stream's share of the cap: nothing built only to be dropped
        assert reasoner.keys.held("cam").tolist() == reasoner.keys.held("door").tolist() == list(range(20, 30))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("memory_settings", "ahead"),
    [("embedded", True), ("redis", True), ("embedded", False)],
    indirect=["memory_settings"],
)
async def test_the_reasoner_service_indexes_written_clips_in_the_background(
    model: VideoChatFlash, memory_settings: dict[str, Any], ahead: bool
) -> None:
    """Clips written to memory -> keys present without any question -> a Search over gRPC builds none lazily;
    VCFLASH_KEYS_AHEAD off leaves them to the first question. Both counts are in the metrics."""
    settings = Settings.from_env(
        {"VCFLASH_KEYS_AHEAD": "1" if ahead else "0"},
        address="127.0.0.1:0",
        api_token=TOKEN,
        metrics_port=0,
        **memory_settings,
    )
    registry = CollectorRegistry()
    service = ReasonerService(settings, registry=registry)
    service.model = model
    port = await service.start()
    try:
        await asyncio.to_thread(write, service.store, "cam", range(30), model.config.text.hidden_size)
        keys = service.reasoner.keys
        deadline = time.monotonic() + 20
        while ahead and len(keys) < 30 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert (keys.built_ahead, len(keys)) == ((30, 30) if ahead else (0, 0))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            found = await pb_grpc.ReasonerStub(channel).Search(
                pb.SearchRequest(stream_ids=["cam"], question=Q, selection=pb.SELECTION_INDEX, limit=3),
                metadata=(("authorization", f"Bearer {TOKEN}"),),
            )
        assert found.clips_scored == 30 and found.moments
        assert keys.built == (0 if ahead else 30)
        sample = registry.get_sample_value
        assert sample("vcflash_key_index_built_clips_total", {"when": "ahead"}) == (30 if ahead else 0)
        assert sample("vcflash_key_index_built_clips_total", {"when": "lazily"}) == (0 if ahead else 30)
        assert sample("vcflash_key_index_clips") == 30 and sample("vcflash_key_index_bytes") == keys.bytes()
    finally:
        await service.stop(0)
