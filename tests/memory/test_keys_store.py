"""The reasoner's keys kept beside the clips' tokens (MemoryStore.put_keys / keys) on each backend (embedded, Redis,
Redis Cluster): a round trip in float16, a tag that is a miss, limits, bytes counted with the clip, and keys that go
with their clip (eviction on write, retention, delete_stream) leaving no bytes behind; damaged values are misses."""

from __future__ import annotations

import numpy as np
import pytest

from memory import EmbeddedStore, MemoryStore, RedisStore, Retention, UnknownStream
from tests.memory.conftest import WALL0, StoreFactory, make_clip

TAG, OTHER = "qwen2-l2-f32-0123abcd", "another-model"
HKV, T, HD = 2, 64, 8  # make_clip's clips are 64 tokens of width 64: keys 2 x 8 = 16 wide


def random_keys(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, HKV, T, HD)).astype(np.float32)  # [n, Hkv, T, hd]


def key_bytes(n: int = 1) -> int:
    return n * HKV * T * HD * 2  # float16


def held_key_blobs(store: MemoryStore) -> int:
    """Key values the backend holds anywhere, read from the storage itself (not through the store's API)."""
    if isinstance(store, EmbeddedStore):
        return store._conn.execute("SELECT COUNT(*) FROM clips WHERE key_blob IS NOT NULL").fetchone()[0]
    assert isinstance(store, RedisStore)
    clips = [k for k in store._redis.scan_iter(match=f"{store.prefix}:*", count=1000) if b":c:" in k]
    return sum(1 for k in clips if store._redis.hexists(k, "keys"))


def stored_bytes(store: MemoryStore, stream_id: str = "cam") -> int:
    """What each held clip weighs: tokens, vector and keys, summed from the storage itself."""
    if isinstance(store, EmbeddedStore):
        return store._conn.execute(
            "SELECT COALESCE(SUM(LENGTH(tokens) + LENGTH(vector) + COALESCE(LENGTH(key_blob), 0)), 0) FROM clips "
            "WHERE stream_id = ?",
            (stream_id,),
        ).fetchone()[0]
    assert isinstance(store, RedisStore)
    prefix = store._keys(stream_id).clip_prefix
    return sum(
        sum(store._redis.hstrlen(prefix + m.decode(), f) for f in ("tokens", "vector", "keys"))
        for m in store._redis.zrange(store._keys(stream_id).wall, 0, -1)
    )


def test_keys_round_trip_in_float16_beside_their_clips_and_count_in_its_bytes(
    store: MemoryStore, make_store: StoreFactory
) -> None:
    for seq in range(5):
        store.put(make_clip(seq))
    before = store.stats("cam").bytes
    keys = random_keys(3)
    assert store.put_keys("cam", TAG, [1, 3, 9], keys) == 2  # 9 was never written: skipped
    found, got = store.keys("cam", TAG, [3, 0, 1, 9])
    assert found.tolist() == [3, 1] and got.dtype == np.float16 and got.shape == (2, HKV, T, HD)
    np.testing.assert_array_equal(got, keys[[1, 0]].astype(np.float16))
    assert store.stats("cam").bytes == before + key_bytes(2) == stored_bytes(store)
    again = make_store()  # another client, or the file reopened: the keys are in memory, not in a process
    found, got = again.keys("cam", TAG, range(5))
    assert found.tolist() == [1, 3] and np.array_equal(got[1], keys[1].astype(np.float16))
    assert store.put_keys("cam", TAG, [1], keys[2:]) == 1  # replaced, not added
    assert store.stats("cam").bytes == before + key_bytes(2) == stored_bytes(store)
    found, got = store.keys("cam", TAG, [1])
    assert np.array_equal(got[0], keys[2].astype(np.float16))
    empty_found, empty = store.keys("cam", TAG, [])
    assert empty_found.size == 0 and empty.shape[0] == 0


def test_keys_of_another_tag_are_a_miss_and_replaced_by_it(store: MemoryStore) -> None:
    for seq in range(3):
        store.put(make_clip(seq))
    store.put_keys("cam", TAG, [0, 1, 2], random_keys(3))
    found, keys = store.keys("cam", OTHER, [0, 1, 2])
    assert found.size == 0 and keys.shape[0] == 0  # another model's keys are never used: a miss, not an error
    store.put_keys("cam", OTHER, [1], random_keys(1, seed=5))  # one set a clip: the other model's replaces it
    assert store.keys("cam", OTHER, [0, 1, 2])[0].tolist() == [1]
    assert store.keys("cam", TAG, [0, 1, 2])[0].tolist() == [0, 2]
    assert held_key_blobs(store) == 3 and store.stats("cam").bytes == stored_bytes(store)


def test_bad_tags_shapes_and_streams_are_refused_with_the_values(store: MemoryStore) -> None:
    store.put(make_clip(0))
    one = random_keys(1)
    for tag in ["", "x" * 33, "a b", "k{s}", "ключ", 7]:
        with pytest.raises(ValueError, match="key tag"):
            store.put_keys("cam", tag, [0], one)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="key tag"):
            store.keys("cam", tag, [0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"must have 64 tokens"):  # one key per token of the clip
        store.put_keys("cam", TAG, [0], np.zeros((1, HKV, 32, HD)))
    with pytest.raises(ValueError, match=r"Hkv \* hd <= 64"):  # never wider than the tokens they come from
        store.put_keys("cam", TAG, [0], np.zeros((1, 4, T, 32)))
    with pytest.raises(ValueError, match=r"must be \[2, Hkv, T, hd\]"):
        store.put_keys("cam", TAG, [0, 1], one)
    with pytest.raises(ValueError, match="distinct"):
        store.put_keys("cam", TAG, [0, 0], random_keys(2))
    with pytest.raises(ValueError, match="not finite"):
        store.put_keys("cam", TAG, [0], np.full((1, HKV, T, HD), 1e6))  # past float16's range
    with pytest.raises(UnknownStream):
        store.put_keys("nowhere", TAG, [0], one)
    with pytest.raises(UnknownStream):
        store.keys("nowhere", TAG, [0])
    generation = store.stats("cam").generation
    assert store.put_keys("cam", TAG, [0], one, generation="another") == 0  # deleted and made again meanwhile
    assert held_key_blobs(store) == 0
    assert store.put_keys("cam", TAG, [0], one, generation=generation) == 1


def test_keys_go_with_their_clips_and_leave_no_bytes(store: MemoryStore) -> None:
    for seq in range(10):
        store.put(make_clip(seq))
        store.put(make_clip(seq, "door"))
    per_clip = store.stats("cam").bytes // 10
    store.put_keys("cam", TAG, range(10), random_keys(10))
    store.put_keys("door", TAG, range(10), random_keys(10))
    assert held_key_blobs(store) == 20
    # a cap met on the write of keys: the oldest go, with their keys, as on a write of tokens
    store.set_retention("cam", Retention(max_bytes=8 * (per_clip + key_bytes())))
    store.put_keys("cam", TAG, [9], random_keys(1, seed=9))  # a write of keys applies the cap
    held = [m.seq for m in store.clips("cam")]
    assert held == list(range(2, 10)) and store.keys("cam", TAG, range(10))[0].tolist() == held
    assert store.stats("cam").bytes == stored_bytes(store) <= 8 * (per_clip + key_bytes())
    assert held_key_blobs(store) == 18
    # retention by age
    store.set_retention("cam", Retention(max_age_s=100.0))
    evicted = store.enforce_retention(now=WALL0 + 20.5 + 100.0)  # clips up to 4 ended before the cutoff
    assert evicted["cam"] == [2, 3, 4] and held_key_blobs(store) == 15
    assert store.stats("cam").bytes == stored_bytes(store)
    store.delete_stream("door")
    assert held_key_blobs(store) == 5
    store.delete_stream("cam")
    assert held_key_blobs(store) == 0
    if isinstance(store, RedisStore):  # nothing of either stream is left, keys included
        assert not [k for k in store._redis.scan_iter(match=f"{store.prefix}:*s:*", count=1000)]


def test_damaged_key_values_are_a_miss_never_an_error(store: MemoryStore) -> None:
    for seq in range(4):
        store.put(make_clip(seq))
    store.put_keys("cam", TAG, range(4), random_keys(4))
    if isinstance(store, EmbeddedStore):
        with store._lock:
            store._conn.execute("UPDATE clips SET key_blob = substr(key_blob, 1, 100) WHERE seq = 1")
            store._conn.execute("UPDATE clips SET key_shape = 'x2' WHERE seq = 2")
    else:
        assert isinstance(store, RedisStore)
        prefix = store._keys("cam").clip_prefix
        store._redis.hset(prefix + f"{1:020d}", "keys", b"\x00" * 100)
        store._redis.hset(prefix + f"{2:020d}", "kshape", "two by three")
    found, keys = store.keys("cam", TAG, range(4))
    assert found.tolist() == [0, 3] and keys.shape == (2, HKV, T, HD)
    store.put_keys("cam", TAG, [1, 2], random_keys(2))  # built again: written over the damaged ones
    assert store.keys("cam", TAG, range(4))[0].tolist() == [0, 1, 2, 3]
