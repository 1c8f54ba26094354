"""The key index's contiguous per-stream blocks (`reasoner.keys.KeyIndex`) and the keys built as clips are written
(`KeyIndexer`, and the Reasoner service running it): scores equal to the per-clip computation, growth, eviction,
generations, and a Search over indexed memory that builds nothing lazily; keys kept in memory beside the tokens
(`StoredKeys`), which a restarted reasoner loads instead of building, and which a failing memory never breaks."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from hico import VideoChatFlash
from hico.checkpoint import make_tiny_checkpoint
from hico.relevance import block_scores, clip_keys, default_layer, key_block, key_scores, question_query
from memory import ClipMeta, ClipRecord, EmbeddedStore, MemoryStore, MemoryUnavailable, open_redis
from memory.records import Retention, clip_vector
from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from reasoner.engine import AskParams, Reasoner
from reasoner.keys import KeyIndex, StoredKeys, batch_size, key_tag
from reasoner.server import ReasonerService
from vcflash import niah
from vcflash.serve.settings import ReasonerSettings, Settings

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


def write(store: MemoryStore, stream: str, seqs: range, width: int) -> None:
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
        # the same scores from keys a question built (not loaded: this one does not keep keys in memory)
        lazily = Reasoner(model, store, limits=ReasonerSettings(keys_stored=False))
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
    # a restarted service on the same memory loads the keys the first one stored beside the tokens: it builds none
    registry = CollectorRegistry()
    service = ReasonerService(settings, registry=registry)
    service.model = model
    await service.start()
    try:
        keys = service.reasoner.keys
        deadline = time.monotonic() + 20
        while len(keys) < 30 and ahead and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert (keys.loaded, keys.built_ahead, keys.built) == ((30, 0, 0) if ahead else (0, 0, 0))
        assert registry.get_sample_value("vcflash_key_index_built_clips_total", {"when": "loaded"}) == keys.loaded
    finally:
        await service.stop(0)


# -- keys kept in memory beside the tokens (StoredKeys): a restart loads them, a failing memory breaks nothing ----


@pytest.fixture(params=["embedded", "redis"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], MemoryStore]]:
    """Opens the test's memory again at each call, as a restarted reasoner does: the same SQLite file, or a new
    client on the same Redis keys."""
    opened: list[MemoryStore] = []
    if request.param == "embedded":
        opener = lambda: EmbeddedStore(tmp_path / "memory.sqlite3")  # noqa: E731
    else:
        url, prefix = request.getfixturevalue("redis_server").url, f"test-{uuid.uuid4().hex}"
        opener = lambda: open_redis(url, prefix=prefix)  # noqa: E731

    def open_() -> MemoryStore:
        opened.append(opener())
        return opened[-1]

    yield open_
    for store in opened:
        store.close()


def persisted(model: VideoChatFlash, store: MemoryStore, max_clips: int = 100_000) -> Reasoner:
    reasoner = Reasoner(model, store)
    reasoner.keys = KeyIndex(max_clips, stored=StoredKeys.of(store, model))
    return reasoner


def index_all(reasoner: Reasoner) -> None:
    indexer = reasoner.key_indexer()
    while indexer.step():
        pass


def search(reasoner: Reasoner) -> list[tuple[str, int, int, float]]:
    found = reasoner.search(AskParams(["cam", "door"], Q, selection="index"), limit=8)
    return [(m.stream_id, m.first.seq, m.last.seq, m.score) for m in found.moments]


def test_a_restarted_reasoner_loads_its_keys_from_memory_builds_none_and_searches_the_same(
    model: VideoChatFlash, reopen: Callable[[], MemoryStore]
) -> None:
    store = reopen()
    width = model.config.text.hidden_size
    write(store, "cam", range(300), width)  # more than a LOAD_BATCH: the indexer loads in several
    write(store, "door", range(5), width)
    first = persisted(model, store)
    index_all(first)
    assert (first.keys.built_ahead, first.keys.loaded, first.keys.store_failures) == (305, 0, 0)
    before = search(first)
    tokens_bytes = 64 * width * 2 + width * 2  # float16 tokens and vector of a clip
    assert store.stats("door").bytes == 5 * (tokens_bytes + 2 * 64 * 16 * 2)  # and the tiny model's keys [2, 64, 16]

    restarted = persisted(model, reopen())
    index_all(restarted)
    assert (restarted.keys.built_ahead, restarted.keys.built, restarted.keys.loaded) == (0, 0, 305)
    assert search(restarted) == before  # identical: float16 keys whether built here or loaded
    seqs = list(range(300))
    np.testing.assert_array_equal(restarted.index_scores("cam", seqs, Q), first.index_scores("cam", seqs, Q))

    lazily = persisted(model, reopen())  # no indexer: a question loads what it needs, builds nothing
    assert search(lazily) == before and (lazily.keys.built, lazily.keys.loaded) == (0, 305)

    other = Reasoner(model, store)  # keys of another model (tag) are a miss: built, and they replace them
    other.keys = KeyIndex(stored=StoredKeys(store, "another-model"))
    assert search(other) == before and (other.keys.built, other.keys.loaded) == (305, 0)


def test_a_question_over_more_than_the_cap_loads_all_its_keys_and_builds_none(tmp_path: Path) -> None:
    keys = random_keys(40)
    with EmbeddedStore(tmp_path / "memory.sqlite3") as store:
        for seq in range(40):  # clips of T tokens, wider than a token's keys (Hkv * hd)
            tokens = np.zeros((T, 2 * HKV * HD), np.float16)
            store.put(ClipRecord(meta(seq), tokens, clip_vector(tokens + 1)))
        stored = StoredKeys(store, "test-tag")
        writer = KeyIndex(stored=stored)
        assert writer.add("cam", list(range(40)), keys) == 40 and writer.store_failures == 0
        reader = KeyIndex(max_clips=10, stored=stored)
        got = reader.get("cam", range(40), lambda seqs: pytest.fail(f"built {seqs}"))
        assert (reader.loaded, reader.built, len(reader)) == (40, 0, 40)  # a question's own clips stay, over the cap
        q = torch.randn(H, HD)
        rounded = keys.half().float()  # as memory keeps them, and as the writer holds them too
        torch.testing.assert_close(block_scores(q, got, T), reference(q, rounded), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(writer.get("cam", range(40), pytest.fail), got)


def test_damaged_keys_in_memory_are_rebuilt_and_written_again(model: VideoChatFlash, tmp_path: Path) -> None:
    with EmbeddedStore(tmp_path / "memory.sqlite3") as store:
        write(store, "cam", range(12), model.config.text.hidden_size)
        index_all(persisted(model, store))
        with store._lock:  # a torn value and a shape that does not parse: misses, never an error
            store._conn.execute("UPDATE clips SET key_blob = substr(key_blob, 1, 1000) WHERE seq = 3")
            store._conn.execute("UPDATE clips SET key_shape = '2x64' WHERE seq = 7")
        restarted = persisted(model, store)
        index_all(restarted)
        assert (restarted.keys.loaded, restarted.keys.built_ahead) == (10, 2)
        assert store.keys("cam", restarted.keys.stored.tag, range(12))[0].tolist() == list(range(12))  # repaired


class NoKeys(EmbeddedStore):
    """A real memory that fails every read and write of keys, as a Redis out of memory or down for a moment would."""

    def put_keys(self, *args: Any, **kwargs: Any) -> int:
        raise MemoryUnavailable("redis at 127.0.0.1:6379/0 unreachable: Connection refused")

    def keys(self, *args: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        raise MemoryUnavailable("redis at 127.0.0.1:6379/0 unreachable: Connection refused")


def test_a_memory_that_fails_to_keep_keys_breaks_no_search(model: VideoChatFlash, tmp_path: Path) -> None:
    with NoKeys(tmp_path / "memory.sqlite3") as store:
        write(store, "cam", range(20), model.config.text.hidden_size)
        write(store, "door", range(3), model.config.text.hidden_size)
        reasoner = persisted(model, store)
        assert search(reasoner)  # lazily: built, kept in RAM, memory's failures logged and counted
        assert (reasoner.keys.built, reasoner.keys.loaded) == (23, 0) and reasoner.keys.store_failures == 4
        index_all(reasoner)  # the indexer too goes on
        write(store, "cam", range(20, 22), model.config.text.hidden_size)
        index_all(reasoner)
        assert reasoner.keys.built_ahead == 2 and reasoner.keys.held("cam").tolist() == list(range(22))


def test_a_redis_out_of_memory_refuses_the_keys_and_the_search_goes_on(model: VideoChatFlash, own_redis_server) -> None:
    """A real failure: Redis at its maxmemory (noeviction) refuses every write, keys included; reads go on."""
    with open_redis(own_redis_server.url) as store:
        write(store, "cam", range(20), model.config.text.hidden_size)
        write(store, "door", range(3), model.config.text.hidden_size)
        store._redis.config_set("maxmemory-policy", "noeviction")
        store._redis.config_set("maxmemory", store._redis.info("memory")["used_memory"])
        reasoner = persisted(model, store)
        before = search(reasoner)
        assert (reasoner.keys.built, reasoner.keys.loaded) == (23, 0) and reasoner.keys.store_failures == 2
        assert search(reasoner) == before and reasoner.keys.built == 23  # held in RAM all the same
        store._redis.config_set("maxmemory", 0)
        assert store.keys("cam", reasoner.keys.stored.tag, range(20))[0].size == 0  # nothing half-written


def test_the_tag_names_the_model_layer_and_dtype_the_keys_come_from(model: VideoChatFlash) -> None:
    layer = default_layer(model.config.text)
    tag = key_tag(model, layer)
    assert tag == key_tag(model, layer) and len(tag) <= 32 and key_tag(model, layer + 1) != tag
    weight = model.llm.model.layers[0].self_attn.k_proj.weight
    with torch.no_grad():
        saved = weight[5, 3].item()
        weight[5, 3] += 0.01  # a fine-tune: other weights, other keys
        try:
            assert key_tag(model, layer) != tag
        finally:
            weight[5, 3] = saved
    assert key_tag(model, layer) == tag


def test_float16_keys_rank_the_same_top_clips_as_float32() -> None:
    """Memory keeps keys in float16: on the shipped (trained) tiny model the top 10 clips come in the same order (up
    to near ties) and the scores stay within 0.5% of float32's (measured 0.07-0.16% at most), over 300 clips of
    rendered scenes (the needle evaluation's haystack, float16 tokens as memory holds them) and three questions."""
    model = VideoChatFlash.from_pretrained("tiny")
    layer = default_layer(model.config.text)
    tokens = torch.from_numpy(niah.encode_haystack(model, niah.make_haystack(1200, 0))).float()  # [300, 64, D]
    keys = clip_keys(model, tokens, layer)  # float32 [300, Hkv, T, hd]
    for question in [Q, niah.question("circle"), "Is there a person at the door?"]:
        query = question_query(model, question, layer)
        exact, rounded = key_scores(query, keys), key_scores(query, keys.half())
        assert exact.max() > 20 * exact.min()  # scores that rank: far from uniform
        # the same top 10 in the same order, up to near ties: the i-th clip by rounded keys is within 0.5% of the i-th
        # best exact score (two of these clips' exact scores are 0.004% apart)
        best, picked = torch.topk(exact, 10).values, exact[torch.topk(rounded, 10).indices]
        assert (picked >= best * (1 - 5e-3)).all(), (best, picked)
        torch.testing.assert_close(rounded, exact, rtol=5e-3, atol=0)
