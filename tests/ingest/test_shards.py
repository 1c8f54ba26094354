"""Sharded ingest: the documented hash, the shard from a StatefulSet pod's name, and a registry that runs only
its own streams."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ingest.pipeline import IngestManager
from ingest.shards import Shard, resolve_shard, shard_of
from ingest.spec import StreamSpec
from ingest.streams import Streams
from memory.embedded import EmbeddedStore
from memory.records import Retention
from vcflash.serve.errors import FailedPrecondition, NotFound
from vcflash.serve.settings import IngestSettings, Settings


def test_the_owner_is_the_documented_stable_hash() -> None:
    for name in ("cam", "door-1", "ünïcode", "x" * 200):
        digest = hashlib.sha256(name.encode()).digest()
        assert shard_of(name, 7) == int.from_bytes(digest[:8], "big") % 7
    # fixed values: a change of the hash would move every stream to another shard
    assert [shard_of(f"cam{i}", 2) for i in range(8)] == [0, 1, 1, 0, 0, 1, 1, 1]
    assert [shard_of(f"cam{i}", 3) for i in range(8)] == [0, 1, 2, 1, 1, 0, 2, 1]
    assert shard_of("cam", 1) == 0
    names = [f"cam{i}" for i in range(400)]
    counts = [sum(shard_of(n, 4) == i for n in names) for i in range(4)]
    assert min(counts) > 70  # spread: ~100 each


def test_the_hash_does_not_depend_on_the_process() -> None:
    import subprocess
    import sys

    code = "from ingest.shards import shard_of; print([shard_of(f'cam{i}', 3) for i in range(20)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONHASHSEED": "7"})
    assert out.stdout.strip() == str([shard_of(f"cam{i}", 3) for i in range(20)])


def test_the_shard_comes_from_the_pod_ordinal() -> None:
    assert resolve_shard("auto", 3, "vcflash-ingest-2") == Shard(2, 3, "vcflash-ingest")
    assert resolve_shard("auto", 3, "vcflash-ingest-0.vcflash-ingest.ns.svc") == Shard(0, 3, "vcflash-ingest")
    assert resolve_shard("auto", 1, "laptop") == Shard(0, 1)  # one shard needs no ordinal
    assert resolve_shard("1", 2, "anything") == Shard(1, 2)
    with pytest.raises(ValueError, match="VCFLASH_INGEST_SHARDS is 2"):  # scaled up without raising the shards
        resolve_shard("auto", 2, "vcflash-ingest-2")
    with pytest.raises(ValueError, match="ending in -<ordinal>"):
        resolve_shard("auto", 2, "laptop")
    with pytest.raises(ValueError, match="0..1"):
        resolve_shard("2", 2)


def test_the_settings_check_the_shard() -> None:
    s = Settings.from_env({"VCFLASH_INGEST_SHARD": "auto", "VCFLASH_INGEST_SHARDS": "4"})
    assert (s.ingest.ingest_shard, s.ingest.ingest_shards) == ("auto", 4)
    assert Settings.from_env({}, ingest_shard="1", ingest_shards=2).ingest.ingest_shard == "1"
    for env in ({"VCFLASH_INGEST_SHARD": "2", "VCFLASH_INGEST_SHARDS": "2"}, {"VCFLASH_INGEST_SHARD": "-1"}):
        with pytest.raises(ValueError, match="VCFLASH_INGEST_SHARD must be"):
            Settings.from_env(env)
    with pytest.raises(ValueError, match="VCFLASH_INGEST_SHARDS"):
        Settings.from_env({"VCFLASH_INGEST_SHARDS": "0"})


def test_the_wrong_shard_names_the_owner() -> None:
    name = next(n for n in (f"cam{i}" for i in range(100)) if shard_of(n, 3) == 2)
    with pytest.raises(FailedPrecondition, match=r"shard 2 \(vcflash-ingest-2\) of 3.*\(shard 0\)"):
        Shard(0, 3, "vcflash-ingest").check(name)
    Shard(2, 3).check(name)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EmbeddedStore]:
    with EmbeddedStore(tmp_path / "memory.sqlite3") as store:
        yield store


def shard_registry(store: EmbeddedStore, shard: Shard) -> Streams:
    manager = IngestManager(IngestSettings(media_root=Path("/")), registry=CollectorRegistry())
    return Streams(manager, store, Retention(), shard=shard)


@pytest.mark.asyncio
async def test_a_shard_runs_resumes_and_removes_only_its_own_streams(
    store: EmbeddedStore, videos: dict[str, Path]
) -> None:
    names = [f"cam{i}" for i in range(8)]
    config = {"source": str(videos["20s"]), "fps": 1.0, "realtime": True, "active": True}
    for name in names:
        store.put_stream_config(name, config)
    shards = [shard_registry(store, Shard(i, 2)) for i in range(2)]
    resumed = [await s.resume() for s in shards]
    assert sorted(resumed[0] + resumed[1]) == names  # each stream resumed once, by its owner
    for i, s in enumerate(shards):
        assert resumed[i] == [n for n in names if shard_of(n, 2) == i] == s.manager.names()

    theirs = resumed[1][0]
    spec = StreamSpec(str(videos["20s"]), fps=1.0)
    for call in (
        shards[0].add(theirs, spec),
        shards[0].remove(theirs),
        shards[0].delete_memory(theirs),
        shards[0].restart(theirs),
    ):
        with pytest.raises(FailedPrecondition, match="belongs to ingest shard 1"):
            await call
    with pytest.raises(FailedPrecondition):
        shards[0].status(theirs)
    assert store.stream_configs()[theirs]["active"]  # untouched by the wrong shard
    mine = next(n for n in (f"new{i}" for i in range(100)) if shard_of(n, 2) == 0)
    await shards[0].add(mine, spec)
    with pytest.raises(NotFound):
        shards[0].status(next(n for n in (f"x{i}" for i in range(100)) if shard_of(n, 2) == 0))
    for s in shards:
        await s.manager.close()
