"""One suite, both backends (the `store`/`make_store` fixtures): the MemoryStore contract."""

from __future__ import annotations

import dataclasses
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis

from memory import EmbeddedStore, MemoryStore, RedisStore, Retention, UnknownStream, open_store

CLIP_BYTES = 64 * 64 * 2 + 64 * 2  # fp16 tokens + fp16 vector of a D=64 clip


def seqs_of(metas: list) -> list[int]:
    return [m.seq for m in metas]


def test_put_is_idempotent(store: MemoryStore, clip) -> None:
    assert store.put(clip(0))
    before = store.stats("cam")
    assert before.clips == 1 and before.bytes == CLIP_BYTES
    assert not store.put(clip(0))
    other = dataclasses.replace(clip(1), meta=clip(0).meta)  # same key, different tokens: still nothing changes
    assert not store.put(other)
    assert store.stats("cam") == before
    np.testing.assert_array_equal(store.tokens("cam", [0])[0], clip(0).tokens)


def test_numpy_scalars_in_meta(store: MemoryStore, clip) -> None:
    meta = clip(2).meta
    numpy_meta = dataclasses.replace(
        meta, seq=np.int64(2), wall_start=np.float64(meta.wall_start), frame_media_times=tuple(np.arange(8.0, 12.0))
    )
    assert store.put(dataclasses.replace(clip(2), meta=numpy_meta))
    assert store.clips("cam") == [meta]


def test_concurrent_puts_of_one_clip_store_it_once(store: MemoryStore, clip) -> None:
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: store.put(clip(3)), range(16)))
    assert results.count(True) == 1
    assert store.stats("cam").clips == 1


def test_put_registers_streams(store: MemoryStore, clip) -> None:
    assert store.streams() == []
    store.put(clip(0, "door"))
    store.put(clip(0, "cam"))
    assert store.streams() == ["cam", "door"]


@pytest.mark.parametrize("clock", ["media", "wall"])
def test_clips_overlapping_a_time_range(store: MemoryStore, clip, clock: str) -> None:
    for seq in [5, 2, 9, 0, 7, 1, 8, 3, 6, 4]:
        store.put(clip(seq))
    t0 = 0.0 if clock == "media" else clip(0).meta.wall_start  # clip s covers [t0 + 4 s, t0 + 4 s + 4)

    def scan(start: float | None, end: float | None) -> list[int]:
        return seqs_of(store.clips("cam", start, end, clock=clock))

    assert scan(t0 + 9, t0 + 12) == [2]  # 3 s inside clip 2
    assert scan(t0 + 9.5, t0 + 9.75) == [2]
    assert scan(t0 + 8, t0 + 20) == [2, 3, 4]  # half-open: clip 1 ends at 8 and clip 5 starts at 20, both out
    assert scan(t0 + 7.999, t0 + 20.001) == [1, 2, 3, 4, 5]
    assert scan(t0 + 9, t0 + 20.5) == [2, 3, 4, 5]
    assert scan(None, t0 + 8) == [0, 1]
    assert scan(None, t0 + 0.5) == [0]
    assert scan(t0 + 36, None) == [9]
    assert scan(t0 + 39.5, None) == [9]  # open end, starting inside the last clip
    assert scan(t0 + 40, None) == []
    assert scan(None, None) == list(range(10))
    assert scan(t0 + 8, t0 + 8) == []
    assert scan(t0 - 100, t0) == []
    assert store.clips("cam", t0 + 5, t0 + 6, clock=clock) == [clip(1).meta]


@pytest.mark.parametrize("clock", ["media", "wall"])
def test_a_long_clip_long_before_the_range_is_found(store: MemoryStore, clip, clock: str) -> None:
    """Scans start a stream's longest clip before the range: a clip far longer than the others still counts."""
    for seq in range(1, 10):
        store.put(clip(seq))
    long = clip(0).meta
    long = dataclasses.replace(long, media_start=-100.0, wall_start=long.wall_start - 100, media_end=30.5)
    long = dataclasses.replace(long, wall_end=long.wall_start + 130.5)  # [-100, 30.5) on both clocks, from t0
    store.put(dataclasses.replace(clip(0), meta=long))
    t0 = 0.0 if clock == "media" else clip(0).meta.wall_start
    assert seqs_of(store.clips("cam", t0 + 30, t0 + 31, clock=clock)) == [0, 7]
    assert seqs_of(store.clips("cam", t0 + 30.5, t0 + 31, clock=clock)) == [7]
    assert seqs_of(store.clips("cam", t0 - 50, t0 + 1, clock=clock)) == [0]
    assert seqs_of(store.clips("cam", t0 + 30, None, clock=clock)) == [0, 7, 8, 9]


def test_spans_are_kept_for_memory_written_before_them(make_store, clip, redis_server) -> None:
    """A memory from before streams kept their longest clip still finds every overlapping clip: read first ("cam"),
    or after a shorter clip is written ("door")."""
    store = make_store()
    for seq in range(5):
        store.put(clip(seq, "cam"))
        store.put(clip(seq, "door"))
    if isinstance(store, EmbeddedStore):
        store.close()
        with sqlite3.connect(store.path) as db:
            db.execute("ALTER TABLE streams DROP COLUMN media_span")
            db.execute("ALTER TABLE streams DROP COLUMN wall_span")
        store = make_store()
    else:
        for name in ("cam", "door"):
            redis.Redis.from_url(redis_server.url).hdel(f"{store.prefix}:s:{name}:info", "media_span", "wall_span")
    wall0 = clip(0).meta.wall_start
    assert seqs_of(store.clips("cam", 9.5, 10.0)) == [2]
    assert seqs_of(store.clips("cam", wall0 + 9.5, wall0 + 10.0, clock="wall")) == [2]
    short = dataclasses.replace(clip(5, "door").meta, media_end=21.0, wall_end=wall0 + 21.0)  # 1 s long
    store.put(dataclasses.replace(clip(5, "door"), meta=short))
    assert seqs_of(store.clips("door", 9.5, 10.0)) == [2]
    assert seqs_of(store.clips("door", wall0 + 9.5, wall0 + 10.0, clock="wall")) == [2]


def test_equal_start_times_are_ordered_by_seq(store: MemoryStore, clip) -> None:
    store.put(clip(10, media0=-4.0))  # starts at media 36, like clip 9 (the stream's clock was reset)
    store.put(clip(9))
    assert seqs_of(store.clips("cam", 36.0, 37.0)) == [9, 10]


def test_tokens_round_trip_in_the_order_asked(store: MemoryStore, clip) -> None:
    for seq in range(6):
        store.put(clip(seq))
    got = store.tokens("cam", [4, 0, 2, 4])
    assert got.dtype == np.float16 and got.shape == (4, 64, 64)
    for row, seq in zip(got, [4, 0, 2, 4], strict=True):
        np.testing.assert_array_equal(row, clip(seq).tokens)
    assert store.tokens("cam", []).shape == (0, 64, 64)


def test_tokens_name_the_missing_seqs(store: MemoryStore, clip) -> None:
    store.put(clip(0))
    with pytest.raises(KeyError, match=r"\[5, 7\]") as e:
        store.tokens("cam", [0, 7, 5])
    assert not isinstance(e.value, UnknownStream)


def test_int8_tokens_are_within_half_a_step(make_store, clip) -> None:
    store = make_store(token_format="int8")
    records = [clip(seq) for seq in range(8)]
    for r in records:
        store.put(r)
    x = np.stack([r.tokens for r in records]).astype(np.float32)
    y = store.tokens("cam", range(8)).astype(np.float32)
    scale = np.abs(x).max(axis=-1) / 127  # per token
    # half a quantization step, plus the float16 rounding of the dequantized value (|value| <= 127 scales)
    assert (np.abs(y - x).max(axis=-1) <= scale * (0.5 + 127 * 2.0**-11) * 1.001).all()
    rel_rms = float(np.sqrt(((y - x) ** 2).mean() / (x**2).mean()))
    assert rel_rms < 0.01, f"relative RMS error {rel_rms:.4%}"
    assert store.stats("cam").bytes == 8 * (64 * 64 + 64 * 2 + 64 + 2)  # int8 + fp16 scales, tokens and vector
    _, vectors = store.vectors("cam")
    cosine = (vectors * np.stack([r.vector for r in records])).sum(axis=1) / np.linalg.norm(vectors, axis=1)
    assert (cosine > 0.999).all()


def test_vectors(store: MemoryStore, clip) -> None:
    for seq in [3, 1, 2]:
        store.put(clip(seq))
    seqs, vectors = store.vectors("cam")
    assert seqs.dtype == np.int64 and seqs.tolist() == [1, 2, 3]
    assert vectors.dtype == np.float32 and vectors.shape == (3, 64)
    np.testing.assert_allclose(vectors, [clip(s).vector for s in (1, 2, 3)], atol=1e-3)  # stored as float16
    store.set_retention("empty", Retention(max_age_s=1.0))
    assert len(store.vectors("empty")[0]) == 0


def test_invalid_clips_are_rejected(store: MemoryStore, clip) -> None:
    store.put(clip(0))
    with pytest.raises(ValueError, match="64x64.*64x32"):
        store.put(clip(1, dim=32))
    bad = clip(2)
    bad.tokens[0, 0] = np.inf
    with pytest.raises(ValueError, match="not finite"):
        store.put(bad)
    with pytest.raises(ValueError, match="seq must be >= 0"):
        store.put(dataclasses.replace(clip(3), meta=dataclasses.replace(clip(3).meta, seq=-1)))
    with pytest.raises(ValueError, match=r"tokens must be \[T, D\]"):
        store.put(dataclasses.replace(clip(4), vector=np.zeros(3, np.float32)))
    assert store.stats("cam").clips == 1


def test_retention_by_age(store: MemoryStore, clip) -> None:
    for seq in range(10):
        store.put(clip(seq))
    store.put(clip(0, "free"))  # no retention: never evicted
    store.set_retention("cam", Retention(max_age_s=60.0))
    now = clip(0).meta.wall_start + 80  # cutoff at +20 s: clips 0-3 end before it, clip 4 ends exactly at it
    assert store.enforce_retention(now=now) == {"cam": [0, 1, 2, 3]}
    stats = store.stats("cam")
    assert (stats.clips, stats.bytes, stats.evicted_clips) == (6, 6 * CLIP_BYTES, 4)
    assert stats.first == clip(4).meta and stats.last == clip(9).meta
    assert seqs_of(store.clips("cam")) == [4, 5, 6, 7, 8, 9]
    with pytest.raises(KeyError, match=r"\[3\]"):
        store.tokens("cam", [3])
    assert store.enforce_retention(now=now) == {}
    assert store.stats("free").clips == 1


def test_retention_by_bytes(store: MemoryStore, clip) -> None:
    for seq in range(10):
        store.put(clip(seq))
    cap = int(3.5 * CLIP_BYTES)
    store.set_retention("cam", Retention(max_bytes=cap))
    assert store.enforce_retention() == {"cam": [0, 1, 2, 3, 4, 5, 6]}
    stats = store.stats("cam")
    assert (stats.clips, stats.bytes, stats.evicted_clips) == (3, 3 * CLIP_BYTES, 7)
    assert stats.retention == Retention(max_bytes=cap)


def test_age_then_bytes(store: MemoryStore, clip) -> None:
    for seq in range(10):
        store.put(clip(seq))
    store.set_retention("cam", Retention(max_age_s=60.0, max_bytes=5 * CLIP_BYTES))
    assert store.enforce_retention(now=clip(0).meta.wall_start + 80) == {"cam": [0, 1, 2, 3, 4]}


def test_put_keeps_bytes_under_the_cap(store: MemoryStore, clip) -> None:
    cap = int(3.5 * CLIP_BYTES)
    store.set_retention("cam", Retention(max_bytes=cap))
    for seq in range(10):
        assert store.put(clip(seq))
        assert store.stats("cam").bytes <= cap
    stats = store.stats("cam")
    assert (stats.clips, stats.evicted_clips) == (3, 7)
    assert seqs_of(store.clips("cam")) == [7, 8, 9]
    assert store.enforce_retention() == {}


def test_new_stream_from_retention(store: MemoryStore) -> None:
    store.set_retention("cam", Retention(max_age_s=10.0, max_bytes=1000))
    assert store.streams() == ["cam"]
    stats = store.stats("cam")
    assert (stats.clips, stats.bytes, stats.first, stats.last) == (0, 0, None, None)
    assert stats.retention == Retention(10.0, 1000)
    store.set_retention("cam", Retention())
    assert store.stats("cam").retention == Retention()


def test_stream_configs_survive_reopening(make_store) -> None:
    store = make_store()
    store.put_stream_config("cam", {"source": "rtsp://cam/1", "fps": 1.0})
    store.put_stream_config("door", {"source": "/videos/door.mp4", "fps": 2.0})
    store.put_stream_config("cam", {"source": "rtsp://cam/2", "fps": 0.5})
    store.close()
    with make_store() as again:
        assert again.stream_configs() == {
            "cam": {"source": "rtsp://cam/2", "fps": 0.5},
            "door": {"source": "/videos/door.mp4", "fps": 2.0},
        }
        assert again.streams() == ["cam", "door"]


def test_reopened_store_has_everything(make_store, clip) -> None:
    with make_store() as store:
        for seq in range(5):
            store.put(clip(seq))
        store.set_retention("cam", Retention(max_age_s=3600.0))
        stats, vectors = store.stats("cam"), store.vectors("cam")
    with make_store() as again:
        assert again.stats("cam") == stats
        assert again.clips("cam", clock="wall") == [clip(s).meta for s in range(5)]
        np.testing.assert_array_equal(again.tokens("cam", range(5)), [clip(s).tokens for s in range(5)])
        for got, want in zip(again.vectors("cam"), vectors, strict=True):
            np.testing.assert_array_equal(got, want)
        assert not again.put(clip(4))


def test_delete_stream(store: MemoryStore, clip) -> None:
    for seq in range(3):
        store.put(clip(seq, "cam"))
        store.put(clip(seq, "door"))
    store.put_stream_config("cam", {"fps": 1})
    store.put_stream_config("door", {"fps": 2})
    store.delete_stream("cam")
    assert store.streams() == ["door"]
    assert store.stream_configs() == {"door": {"fps": 2}}
    with pytest.raises(UnknownStream):
        store.stats("cam")
    assert store.stats("door").clips == 3
    assert store.put(clip(0, "cam"))  # a fresh stream
    assert store.stats("cam").clips == 1


def test_unknown_stream(store: MemoryStore, clip) -> None:
    store.put(clip(0))
    calls = [
        lambda: store.clips("nope"),
        lambda: store.tokens("nope", [0]),
        lambda: store.vectors("nope"),
        lambda: store.stats("nope"),
        lambda: store.delete_stream("nope"),
    ]
    for call in calls:
        with pytest.raises(UnknownStream, match="'nope'") as e:
            call()
        assert isinstance(e.value, KeyError) and e.value.stream_id == "nope"


def test_open_store(tmp_path: Path, redis_server) -> None:
    with open_store(None, tmp_path / "data") as store:
        assert isinstance(store, EmbeddedStore) and store.path == tmp_path / "data" / "memory.sqlite3"
    with open_store(redis_server.url, tmp_path / "unused", token_format="int8") as store:
        assert isinstance(store, RedisStore) and store.token_format == "int8"
    assert not (tmp_path / "unused").exists()
