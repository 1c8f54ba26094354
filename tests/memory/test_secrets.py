"""Issue 8, item 3 (at rest): camera passwords in stream configs are sealed in both backends, leave no copy behind
when a stream is deleted, and the embedded memory's files are the owner's alone."""

from __future__ import annotations

import json
import logging
import sqlite3
import stat
from pathlib import Path

import pytest
import redis
from cryptography.fernet import Fernet

from memory import ConfigCipher, EmbeddedStore, MemoryStore, RedisStore, open_store

PASSWORD = "hunter2-c4m3ra-pa55"
CONFIG = {"source": f"rtsp://admin:{PASSWORD}@192.168.1.20:554/stream1", "fps": 1.0, "active": True}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sqlite_files(path: Path) -> list[Path]:
    return [p for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]


def raw(store: MemoryStore) -> bytes:
    """Every byte the backend holds: the SQLite file, WAL and shared memory; or each Redis key of the store's
    prefix, as DUMP (what a backup or replica gets) and as plain values (DUMP may compress them)."""
    if isinstance(store, EmbeddedStore):
        return b"".join(p.read_bytes() for p in sqlite_files(store.path))
    assert isinstance(store, RedisStore)
    client, out = store._redis, []
    for key in client.scan_iter(f"{store.prefix}:*"):
        out.append(client.dump(key))
        kind = client.type(key)
        if kind == b"hash":
            out += [b for kv in client.hgetall(key).items() for b in kv]
        elif kind == b"set":
            out += list(client.smembers(key))
        elif kind == b"zset":
            out += client.zrange(key, 0, -1)
        else:
            out.append(client.get(key) or b"")
    return b"".join(out)


def stored_config(store: MemoryStore, stream_id: str) -> bytes:
    """The config as the backend holds it."""
    if isinstance(store, EmbeddedStore):
        db = sqlite3.connect(store.path)
        (value,) = db.execute("SELECT config FROM streams WHERE stream_id = ?", (stream_id,)).fetchone()
        db.close()
        return value.encode()
    assert isinstance(store, RedisStore)
    return store._redis.hget(store._keys(stream_id).configs, stream_id)  # a cluster keeps it per stream


def write_plain_json(store: MemoryStore, stream_id: str, config: dict) -> None:
    """A config as versions before sealing stored it."""
    if isinstance(store, EmbeddedStore):
        db = sqlite3.connect(store.path)
        with db:
            db.execute("UPDATE streams SET config = ? WHERE stream_id = ?", (json.dumps(config), stream_id))
        db.close()
    else:
        assert isinstance(store, RedisStore)
        store._redis.hset(store._keys(stream_id).configs, stream_id, json.dumps(config))


def test_passwords_are_sealed_and_deleting_a_stream_leaves_no_trace(store: MemoryStore, clip) -> None:
    store.put(clip(0, "cam"))
    store.put_stream_config("cam", CONFIG)
    store.put_stream_config("door", {"source": "/videos/door.mp4", "fps": 2.0})
    assert store.stream_configs()["cam"] == CONFIG
    held = raw(store)
    assert b"door.mp4" not in held and PASSWORD.encode() not in held
    assert b"cam" in held  # we do look at the right bytes
    store.delete_stream("cam")
    assert store.stream_configs() == {"door": {"source": "/videos/door.mp4", "fps": 2.0}}
    assert PASSWORD.encode() not in raw(store)


def test_the_sealed_config_itself_is_gone_after_delete(store: MemoryStore) -> None:
    store.put_stream_config("cam", CONFIG)
    mac = stored_config(store, "cam")[-40:]  # the token's HMAC: its head (version, time) is common to all
    assert mac in raw(store)
    store.delete_stream("cam")
    assert mac not in raw(store)


def test_configs_in_plain_json_from_older_versions_still_read_and_are_sealed_when_written(store: MemoryStore) -> None:
    store.put_stream_config("cam", {"fps": 1.0})
    write_plain_json(store, "cam", CONFIG)
    assert PASSWORD.encode() in raw(store)
    assert store.stream_configs() == {"cam": CONFIG}
    store.put_stream_config("cam", CONFIG | {"active": False})
    assert store.stream_configs() == {"cam": CONFIG | {"active": False}}
    assert PASSWORD.encode() not in raw(store)


def test_a_config_sealed_under_another_key_is_skipped_not_raised(make_store, caplog) -> None:
    first = make_store(cipher=ConfigCipher(Fernet.generate_key().decode()))
    first.put_stream_config("cam", CONFIG)
    first.close()
    other = make_store(cipher=ConfigCipher(Fernet.generate_key().decode()))
    other.put_stream_config("door", {"fps": 2.0})
    with caplog.at_level(logging.ERROR):
        assert other.stream_configs() == {"door": {"fps": 2.0}}
    assert "event=stream_config_unreadable stream=cam" in caplog.text and "VCFLASH_SECRET_KEY" in caplog.text
    other.put_stream_config("cam", CONFIG)  # adding it again under this key heals it
    assert other.stream_configs()["cam"] == CONFIG


def test_embedded_memory_files_are_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with open_store(None, data_dir) as store:
        store.put_stream_config("cam", CONFIG)
        files = sqlite_files(store.path)
        assert [p.name for p in files] == ["memory.sqlite3", "memory.sqlite3-wal", "memory.sqlite3-shm"]
        assert mode(data_dir) == 0o700
        assert {p.name: mode(p) for p in [*files, data_dir / "secret.key"]} == dict.fromkeys(
            [p.name for p in files] + ["secret.key"], 0o600
        )


def test_files_left_open_by_an_older_version_are_tightened(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    path = tmp_path / "memory.sqlite3"
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.touch(mode=0o644)
        p.chmod(0o644)
    with open_store(None, tmp_path) as store:
        store.put_stream_config("cam", CONFIG)
        assert mode(tmp_path) == 0o700
        assert [mode(p) for p in sqlite_files(path)] == [0o600] * 3


def test_the_secret_key_setting(tmp_path: Path, redis_server) -> None:
    key = Fernet.generate_key().decode()
    with open_store(None, tmp_path / "a", secret_key=key) as store:
        store.put_stream_config("cam", CONFIG)
    assert not (tmp_path / "a" / "secret.key").exists()  # the key stays apart from the memory
    with open_store(None, tmp_path / "a", secret_key=key) as store:
        assert store.stream_configs() == {"cam": CONFIG}
    # Redis: every service of a deployment opens the same configs with the same key
    url = redis_server.fresh_url()
    writer = open_store(url, tmp_path / "ingest", secret_key=key)
    reader = open_store(url, tmp_path / "reasoner", secret_key=key)
    with writer, reader:
        writer.put_stream_config("cam", CONFIG)
        assert reader.stream_configs() == {"cam": CONFIG}
        writer.delete_stream("cam")
    assert not (tmp_path / "ingest").exists() and not (tmp_path / "reasoner").exists()
    with pytest.raises(ValueError, match="secret key from VCFLASH_SECRET_KEY is not a Fernet key"):
        open_store(None, tmp_path / "b", secret_key="not-a-key")


def test_redis_without_a_key_says_what_to_set(redis_server) -> None:
    url = redis_server.fresh_url()
    with RedisStore(url) as store, pytest.raises(ValueError, match="set VCFLASH_SECRET_KEY"):
        store.put_stream_config("cam", CONFIG)
    client = redis.Redis.from_url(url)
    assert client.keys("*") == []
    client.close()
