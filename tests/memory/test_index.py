"""ClipIndex: nearest clips per stream, kept in step with the store."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from memory import ClipIndex, MemoryStore, Retention


def unit_vectors(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_search_returns_the_nearest_seq_first() -> None:
    index, v = ClipIndex(), unit_vectors(50)
    index.add("cam", np.arange(100, 150), v)
    hits = index.search("cam", v[17] + 0.01 * unit_vectors(1, seed=1)[0], k=5)
    assert hits[0][0] == 117 and hits[0][1] == pytest.approx(1.0, abs=0.02)
    scores = [s for _, s in hits]
    assert len(hits) == 5 and scores == sorted(scores, reverse=True)
    assert len(index.search("cam", v[0], k=500)) == 50


def test_remove_and_re_add() -> None:
    index, v = ClipIndex(), unit_vectors(10)
    index.add("cam", range(10), v)
    index.remove("cam", [3, 99])
    assert 3 not in dict(index.search("cam", v[3], k=10))
    index.add("cam", [3, 4], v[[3, 4]])
    index.add("cam", [4], v[[4]])  # replaces, no duplicate
    hits = index.search("cam", v[3], k=20)
    assert hits[0][0] == 3 and sorted(seq for seq, _ in hits) == list(range(10))


def test_streams_are_separate() -> None:
    index, v = ClipIndex(), unit_vectors(4)
    index.add("cam", [0, 1], v[:2])
    index.add("door", [0, 1], v[2:])
    assert index.search("door", v[2], k=1) == [(0, pytest.approx(1.0))]
    index.drop_stream("cam")
    assert index.search("cam", v[0], k=1) == []
    assert index.search("never", v[0], k=1) == []


def test_shapes_are_checked() -> None:
    index = ClipIndex()
    index.add("cam", [0], unit_vectors(1))
    with pytest.raises(ValueError, match="D=64.*D=32"):
        index.add("cam", [1], unit_vectors(1, dim=32))
    with pytest.raises(ValueError, match="D=64.*D=32"):
        index.search("cam", unit_vectors(1, dim=32)[0], k=1)
    with pytest.raises(ValueError, match=r"\[2, D\]"):
        index.add("cam", [1, 2], unit_vectors(3))
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search("cam", unit_vectors(1)[0], k=0)


def test_rebuild_from_the_store_equals_incremental_adds(store: MemoryStore, clip) -> None:
    incremental, rebuilt = ClipIndex(), ClipIndex()
    for stream_id in ("cam", "door"):
        for seq in range(20):
            r = clip(seq, stream_id)
            if store.put(r):
                incremental.add(stream_id, [seq], r.vector[None])
    store.set_retention("cam", Retention(max_age_s=60.0))
    for stream_id, seqs in store.enforce_retention(now=clip(0).meta.wall_start + 80).items():
        incremental.remove(stream_id, seqs)
    rebuilt.rebuild(store)
    for stream_id in ("cam", "door"):
        for seq in (5, 12, 19):
            query = clip(seq).vector
            want, got = incremental.search(stream_id, query, k=20), rebuilt.search(stream_id, query, k=20)
            assert got[0][0] == want[0][0]
            assert dict(got).keys() == dict(want).keys()
            scores = [dict(got)[s] for s, _ in want]
            np.testing.assert_allclose(scores, [s for _, s in want], atol=2e-3)  # vectors are stored as float16
    assert len(rebuilt.search("cam", clip(5).vector, k=20)) == 16


def test_concurrent_adds_and_searches() -> None:
    index, v = ClipIndex(), unit_vectors(400)

    def add(i: int) -> None:
        index.add("cam", [i], v[i : i + 1])
        index.search("cam", v[i], k=3)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(400)))
    assert len(index.search("cam", v[0], k=1000)) == 400
