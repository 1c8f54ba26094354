"""Issue 11: what an Ask, a write and an index catch-up cost does not grow with the memory.

Costs are counted, not timed: Redis commands from the server's own INFO commandstats (commands run inside scripts
included), SQLite virtual-machine steps from a progress handler, FAISS passes over an index, vectors fetched.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import faiss
import numpy as np
import pytest
import redis

import memory.index as index_module
import memory.redis_store as redis_store
from memory import ClipIndex, EmbeddedStore, MemoryStore, RedisStore, Retention
from memory.embedded import SCHEMA_VERSION as EMBEDDED_SCHEMA
from memory.retention import follow
from tests.memory.conftest import make_clip


def fill(store: MemoryStore, n: int, stream_id: str = "cam", first: int = 0) -> None:
    for seq in range(first, first + n):
        store.put(make_clip(seq, stream_id, dim=8))


def uniform(k: int) -> Callable[[int], list[int]]:
    return lambda n: sorted({int(x) for x in np.linspace(0, n - 1, min(k, n))}) if n else []


@contextmanager
def redis_commands(store: RedisStore) -> Iterator[dict[str, int]]:
    """Commands the server ran inside the block, by name (INFO commandstats; this test's session server is shared
    by tests that run one at a time)."""
    client = redis.Redis.from_url(_url(store))
    client.config_resetstat()
    counts: dict[str, int] = {}
    yield counts
    stats = client.info("commandstats")
    counts.update({k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items() if k != "cmdstat_info"})
    client.close()


def _url(store: RedisStore) -> str:
    kw = store._redis.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def sqlite_steps(store: EmbeddedStore, call: Callable[[], object]) -> int:
    """SQLite virtual-machine instructions `call` runs: rows read show up in proportion."""
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    store._conn.set_progress_handler(count, 1)
    try:
        call()
    finally:
        store._conn.set_progress_handler(None, 0)
    return steps[0]


@pytest.mark.parametrize("clock", ["media", "wall"])
def test_pick_equals_clips_at_the_positions(store: MemoryStore, clock: str) -> None:
    for seq in [5, 2, 9, 0, 7, 1, 8, 3, 6, 4]:  # out of order
        store.put(make_clip(seq))
    t0 = 0.0 if clock == "media" else make_clip(0).meta.wall_start
    for start, end in [(None, None), (t0 + 9, t0 + 31), (t0 + 8, None), (None, t0 + 8), (t0 + 39.5, None)]:
        every = store.clips("cam", start, end, clock=clock)
        picked = store.pick("cam", start, end, uniform(3), clock=clock, with_seqs=True)
        assert picked.count == len(every)
        assert picked.clips == [every[i] for i in uniform(3)(len(every))]
        assert (picked.first, picked.last) == (every[0], every[-1])
        assert picked.seqs.tolist() == [m.seq for m in every]
    empty = store.pick("cam", t0 + 40, None, uniform(3), clock=clock, with_seqs=True)
    assert (empty.count, empty.clips, empty.first, empty.last, empty.seqs.tolist()) == (0, [], None, None, [])
    assert store.clips("cam", clock=clock, limit=3) == store.clips("cam", clock=clock)[:3]
    with pytest.raises(ValueError, match="ascend strictly within"):
        store.pick("cam", None, None, lambda n: [2, 1], clock=clock)
    with pytest.raises(ValueError, match=r"within \[0, 10\)"):
        store.pick("cam", None, None, lambda n: [n], clock=clock)


def test_pick_follows_writes_and_evictions(store: MemoryStore) -> None:
    """The embedded store's in-RAM times stay in step: a pick after writes, evictions and a delete is right."""
    fill(store, 20)
    assert store.pick("cam", None, None, uniform(2)).count == 20  # loaded
    store.put(make_clip(25, dim=8))
    store.put(make_clip(21, dim=8))  # out of order
    store.set_retention("cam", Retention(max_age_s=60.0))
    store.enforce_retention(now=make_clip(0).meta.wall_start + 80)  # clips 0-3 go
    want = [m.seq for m in store.clips("cam")]
    assert want == [*range(4, 20), 21, 25]
    picked = store.pick("cam", None, None, lambda n: range(n), with_seqs=True)
    assert [m.seq for m in picked.clips] == want and picked.seqs.tolist() == want
    store.delete_stream("cam")
    fill(store, 3)
    assert store.pick("cam", None, None, uniform(8)).count == 3


def test_embedded_reads_follow_another_writer(tmp_path) -> None:
    with EmbeddedStore(tmp_path / "m.sqlite3") as a, EmbeddedStore(tmp_path / "m.sqlite3") as b:
        fill(a, 5)
        assert a.pick("cam", None, None, uniform(2)).count == 5
        fill(b, 5, first=5)
        assert a.pick("cam", None, None, uniform(2)).count == 10  # b's writes seen: the times are reloaded


@pytest.fixture
def redis_only(redis_server) -> Iterator[RedisStore]:
    with RedisStore(redis_server.url, prefix=f"test-{uuid.uuid4().hex}") as store:
        yield store


def test_redis_pick_costs_commands_for_the_picked_clips_only(redis_only: RedisStore) -> None:
    store = redis_only
    fill(store, 400, "small")
    fill(store, 4000, "big")
    wall0 = make_clip(0).meta.wall_start
    cost = {}
    for stream_id, n in (("small", 400), ("big", 4000)):
        store.pick(stream_id, wall0 + 1.5, None, uniform(16), clock="wall")  # loads the scripts
        for label, start, end in (("all", None, None), ("range", wall0 + 4 * n * 0.4 + 1.5, wall0 + 4 * n * 0.6)):
            with redis_commands(store) as counts:
                picked = store.pick(stream_id, start, end, uniform(16), clock="wall")
            assert len(picked.clips) == 16
            cost[stream_id, label] = counts
    for label in ("all", "range"):
        assert cost["small", label] == cost["big", label], label  # the same commands at 10x the clips
        assert sum(cost["big", label].values()) <= 3 * 18 + 6  # per picked clip: a rank and a meta; a few more
    with redis_commands(store) as counts:
        store.tokens("big", [m.seq for m in picked.clips])
    assert counts["hmget"] == 16


def test_embedded_pick_reads_the_picked_rows_only(tmp_path) -> None:
    store = EmbeddedStore(tmp_path / "m.sqlite3")
    fill(store, 100, "small")
    fill(store, 2000, "big")
    steps = {}
    for stream_id, n in (("small", 100), ("big", 2000)):
        store.pick(stream_id, None, None, uniform(16))  # the first pick loads the stream's times: once
        for label, start, end in (("all", None, None), ("range", 4 * n * 0.4 + 1.5, 4 * n * 0.6)):
            pick = lambda s=stream_id, a=start, b=end: store.pick(s, a, b, uniform(16))  # noqa: E731
            steps[stream_id, label] = sqlite_steps(store, pick)
        steps[stream_id, "stats"] = sqlite_steps(store, lambda s=stream_id: store.stats(s))
    for label in ("all", "range", "stats"):
        assert steps["big", label] <= 1.2 * steps["small", label], (label, steps)
    store.close()


def test_embedded_pick_reads_metadata_from_the_covering_index(tmp_path) -> None:
    """A pick reads the narrow clips_meta index, never the clip rows (~8 KB each: their tokens are inline)."""
    with EmbeddedStore(tmp_path / "m.sqlite3") as store:
        fill(store, 10)
        store.pick("cam", None, None, uniform(4))  # loads the stream's times
        statements: list[str] = []
        store._conn.set_trace_callback(statements.append)
        store.pick("cam", None, None, uniform(4))
        store._conn.set_trace_callback(None)
        reads = [s for s in statements if "FROM clips" in s]
        assert reads
        for statement in reads:
            plan = " ".join(row[3] for row in store._conn.execute(f"EXPLAIN QUERY PLAN {statement}"))
            assert "USING COVERING INDEX clips_meta" in plan, plan


def old_layout(path) -> None:
    """Turn a store file into the layout written before schema versions: no covering index of clip metadata."""
    with sqlite3.connect(path) as db:
        db.execute("DROP INDEX clips_meta")
        db.execute("PRAGMA user_version = 0")


def schema(path) -> tuple[int, bool]:
    """(user_version, whether the covering meta index exists) of a store file."""
    with sqlite3.connect(path) as db:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        indexed = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'clips_meta'").fetchone() is not None
    return version, indexed


def test_an_embedded_file_from_before_schema_versions_is_migrated_on_open(tmp_path) -> None:
    path = tmp_path / "m.sqlite3"
    with EmbeddedStore(path) as store:
        fill(store, 300)
        fill(store, 7, "door")
        store.set_retention("door", Retention(max_age_s=3600.0))
        before = {s: (store.clips(s), store.stats(s), store.tokens(s, range(5))) for s in ("cam", "door")}
    old_layout(path)
    assert schema(path) == (0, False)
    with EmbeddedStore(path) as store:
        assert schema(path) == (EMBEDDED_SCHEMA, True)
        for stream_id, (clips, stats, tokens) in before.items():
            assert store.clips(stream_id) == clips and store.stats(stream_id) == stats
            picked = store.pick(stream_id, None, None, lambda n: range(n))
            assert picked.clips == clips and store.metas(stream_id, range(300)) == {m.seq: m for m in clips}
            assert np.array_equal(store.tokens(stream_id, range(5)), tokens)
        fill(store, 1, first=300)  # and it keeps working
        assert store.pick("cam", None, None, uniform(2)).count == 301


def test_a_failed_migration_leaves_the_file_as_it_was(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.sqlite3"
    with EmbeddedStore(path) as store:
        fill(store, 20)
    old_layout(path)

    def crash(self, db) -> None:  # the last step, after the covering index was built
        raise OSError("disk full")

    monkeypatch.setattr(EmbeddedStore, "_add_thumbnails", crash)
    with pytest.raises(OSError, match="disk full"):
        EmbeddedStore(path)
    assert schema(path) == (0, False)  # one transaction: the index built before the failure is gone too
    monkeypatch.undo()
    with EmbeddedStore(path) as store:
        assert schema(path) == (EMBEDDED_SCHEMA, True) and len(store.clips("cam")) == 20


def test_a_file_from_a_newer_version_is_refused(tmp_path) -> None:
    path = tmp_path / "m.sqlite3"
    EmbeddedStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {EMBEDDED_SCHEMA + 1}")
    with pytest.raises(RuntimeError, match="schema version"):
        EmbeddedStore(path)


def test_stats_come_from_counters(make_store) -> None:
    """Embedded: no COUNT(*); a file written before the counters gets them once, on opening."""
    store = make_store()
    fill(store, 10)
    store.set_retention("cam", Retention(max_bytes=5 * store.stats("cam").bytes // 10))
    store.enforce_retention()
    stats = store.stats("cam")
    assert stats.clips == len(store.clips("cam")) == 5 and stats.generation
    if isinstance(store, EmbeddedStore):
        statements: list[str] = []
        store._conn.set_trace_callback(statements.append)
        store.stats("cam")
        store._conn.set_trace_callback(None)
        assert not [s for s in statements if "COUNT(" in s.upper()]
        store.close()
        with sqlite3.connect(store.path) as db:
            db.execute("ALTER TABLE streams DROP COLUMN clips")
            db.execute("ALTER TABLE streams DROP COLUMN generation")
        store = make_store()
        again = store.stats("cam")
        assert (
            again.clips == 5
            and again.generation
            and dataclasses.replace(again, generation="") == dataclasses.replace(stats, generation="")
        )


def test_a_deleted_and_rewritten_stream_has_a_new_generation(store: MemoryStore) -> None:
    fill(store, 2)
    before = store.stats("cam").generation
    assert store.stats("cam").generation == before
    store.delete_stream("cam")
    fill(store, 2)
    assert store.stats("cam").generation not in ("", before)


@pytest.fixture
def remove_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every FAISS remove_ids on a clip index (a pass over the whole index), by the number of ids asked."""
    calls: list[int] = []
    original = faiss.IndexIDMap2.remove_ids

    def counted(self, ids) -> int:  # noqa: ANN001 - FAISS's own signature
        calls.append(len(ids))
        return original(self, ids)

    monkeypatch.setattr(faiss.IndexIDMap2, "remove_ids", counted)
    return calls


def test_index_adds_without_a_pass_unless_the_seq_may_be_indexed(remove_passes: list[int]) -> None:
    index, v = ClipIndex(), np.eye(8, dtype=np.float32)
    for seq in range(500):
        index.add("cam", [seq], v[[seq % 8]])
    assert remove_passes == [] and len(index) == 500
    index.add("cam", [7], v[[0]])  # replaces: one pass, no duplicate
    assert remove_passes == [1] and len(index) == 500
    assert index.search("cam", v[0], k=1000).count((7, pytest.approx(1.0))) == 1
    index.remove("cam", list(range(100)))  # a retention batch: one pass
    assert remove_passes == [1, 100] and len(index) == 400


def test_index_catches_up_incrementally(make_store, remove_passes: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """The split deployment: the encoder's store writes, the reasoner's index follows by fetching only what is new,
    prunes evicted clips in batches, and reloads a stream deleted and written again."""
    writer, reader = make_store(), make_store()
    fetched: list[tuple[int | None, int]] = []
    vectors = reader.vectors

    def counted(stream_id: str, after: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        seqs, x = vectors(stream_id, after)
        fetched.append((after, len(seqs)))
        return seqs, x

    monkeypatch.setattr(reader, "vectors", counted)
    monkeypatch.setattr(index_module, "PRUNE_MIN", 4)
    index = ClipIndex()
    fill(writer, 30)
    assert index.sync_stream(reader, "cam") == 0
    fill(writer, 3, first=30)
    index.sync_stream(reader, "cam")
    index.sync_stream(reader, "cam")
    assert fetched == [(None, 30), (29, 3), (32, 0)] and len(index) == 33 and remove_passes == []

    writer.set_retention("cam", Retention(max_age_s=60.0))
    writer.enforce_retention(now=make_clip(0).meta.wall_start + 80)  # 4 go: within the tolerance
    assert index.sync_stream(reader, "cam") == 4 and remove_passes == []
    hits = index.search("cam", make_clip(0, dim=8).vector, k=33)
    assert len(hits) == 33  # stale entries until pruned: Asks ask for that many more and drop them
    writer.enforce_retention(now=make_clip(0).meta.wall_start + 84)  # a fifth: over PRUNE_MIN, pruned in one pass
    assert index.sync_stream(reader, "cam") == 0 and remove_passes == [5] and len(index) == 28

    writer.delete_stream("cam")
    fill(writer, 2)
    index.sync_stream(reader, "cam")
    assert fetched[-1] == (None, 2) and len(index) == 2


def test_redis_long_work_goes_in_bounded_chunks(redis_only: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention and deletes of many clips take several short calls, never one that loops over the stream."""
    store = redis_only
    monkeypatch.setattr(redis_store, "CHUNK", 8)
    monkeypatch.setattr(redis_store, "SCAN_CHUNK", 8)
    fill(store, 50)
    fill(store, 30, "door")
    store.set_retention("cam", Retention(max_age_s=60.0))
    with redis_commands(store) as counts:
        evicted = store.enforce_retention(now=make_clip(0).meta.wall_start + 4 * 40 + 64)
    assert evicted == {"cam": list(range(40))}
    assert counts["evalsha"] >= 40 // 8 and store.stats("cam").clips == 10
    assert store.vectors("cam", after=45)[0].tolist() == [46, 47, 48, 49]
    assert store.held_seqs("door").tolist() == list(range(30))
    with redis_commands(store) as counts:
        store.delete_stream("door")
    assert counts["evalsha"] >= 30 // 8
    assert store.streams() == ["cam"]


def test_redis_memory_written_before_the_seq_index(redis_only: RedisStore, redis_server) -> None:
    store = redis_only
    fill(store, 10)
    redis.Redis.from_url(redis_server.url).delete(f"{store.prefix}:s:cam:seq")
    assert store.vectors("cam", after=6)[0].tolist() == [7, 8, 9]
    assert store.vectors("cam")[0].tolist() == list(range(10))


def test_open_store_passes_the_redis_timeout(tmp_path, redis_server) -> None:
    from memory import open_store

    with open_store(redis_server.url, tmp_path, redis_timeout_s=0.25) as store:
        assert store._redis.connection_pool.connection_kwargs["socket_timeout"] == 0.25


def test_faiss_threads_are_set_in_the_thread_that_calls_the_index() -> None:
    """OpenMP keeps the thread count per thread: a search from a worker thread runs with the configured count."""
    index = ClipIndex()
    index.add("cam", [0], np.eye(8, dtype=np.float32)[:1])
    seen: list[int] = []

    def search() -> None:
        index.search("cam", np.eye(8, dtype=np.float32)[0], k=1)
        seen.append(faiss.omp_get_max_threads())

    try:
        for n in (1, 2):
            index_module.set_threads(n)
            worker = threading.Thread(target=search)
            worker.start()
            worker.join()
        assert seen == [1, 2]
        with pytest.raises(ValueError, match="got 0"):
            index_module.set_threads(0)
    finally:
        index_module.set_threads(1)


@pytest.mark.asyncio
async def test_follow_keeps_an_index_in_step_with_the_store(store: MemoryStore) -> None:
    """What the split deployment's reasoner runs every minute: new streams and clips join, deleted streams go."""
    index = ClipIndex()
    fill(store, 5, "cam")
    fill(store, 3, "door")
    await follow(store, index)
    assert index.streams() == ["cam", "door"] and len(index) == 8
    fill(store, 2, "cam", first=5)
    store.delete_stream("door")
    await follow(store, index)
    assert index.streams() == ["cam"] and len(index) == 7
