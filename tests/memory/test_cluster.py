"""What only the Redis Cluster backend has: hash-tagged streams spread over the masters, listings that fan out,
finding out that a URL names a cluster, a writer process killed and a failover, all on real processes on loopback.

The MemoryStore contract itself runs on the cluster through the `store` fixture (conftest.py, param "cluster").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
from cryptography.fernet import Fernet
from redis.cluster import RedisCluster

from memory import (
    ConfigCipher,
    MemoryUnavailable,
    RedisClusterStore,
    RedisStore,
    Retention,
    UnknownStream,
    open_redis,
    open_store,
)
from tests.conftest import free_port
from tests.memory.cluster_server import RedisClusterServer, cluster, make_tls_files

REPO = Path(__file__).resolve().parents[2]
STREAMS = [f"cam{i}" for i in range(12)]  # enough that each of 3 masters gets some


def cipher() -> ConfigCipher:
    return ConfigCipher(Fernet.generate_key().decode())


def prefixed() -> str:
    return f"test-{uuid.uuid4().hex}"


def test_each_stream_sits_in_one_slot_and_the_streams_spread_over_the_masters(redis_cluster, clip) -> None:
    prefix = prefixed()
    with open_redis(redis_cluster.url, prefix=prefix, cipher=cipher()) as store:
        for stream_id in STREAMS:
            store.put(clip(0, stream_id))
            store.put(clip(1, stream_id))
            store.put_stream_config(stream_id, {"fps": 1.0})
        with RedisCluster.from_url(redis_cluster.url) as client:
            for stream_id in STREAMS:
                keys = list(client.scan_iter(match=f"{prefix}:{{s:{stream_id}}}:*"))  # braces are literal in MATCH
                assert len(keys) == 8  # info, media, wall, seq, streams, configs, 2 clips
                assert {client.keyslot(k) for k in keys} == {client.keyslot(store._keys(stream_id).info)}
        masters = {redis_cluster.node_of(store._keys(s).info).port for s in STREAMS}
        assert masters == {n.port for n in redis_cluster.masters()}


def test_listing_every_stream_reads_each_master(redis_cluster, clip) -> None:
    with open_redis(redis_cluster.url, prefix=prefixed(), cipher=cipher()) as store:
        for stream_id in STREAMS:
            store.put(clip(0, stream_id))
            store.put_stream_config(stream_id, {"source": f"/videos/{stream_id}.mp4"})
        masters = redis_cluster.masters()
        for node in masters:
            with node.client() as c:
                c.config_resetstat()
        assert store.streams() == sorted(STREAMS)
        assert store.stream_configs() == {s: {"source": f"/videos/{s}.mp4"} for s in STREAMS}
        for node in masters:  # one pipelined batch per node and listing: a SISMEMBER, then an HGET per stream there
            stats = node.info("commandstats")
            assert stats["cmdstat_sismember"]["calls"] > 0 and stats["cmdstat_hget"]["calls"] > 0
        assert all([m.seq for m in store.clips(s)] == [0] for s in STREAMS)  # each from its own master


def test_any_stream_id_keeps_its_keys_in_one_slot(redis_cluster, clip) -> None:
    """The tag is `{s:` + id + the first `}`: never empty, so even an id with braces keeps one slot."""
    odd = ["}x", "{a}", "a}b", "{}", "with space:and:colons"]
    with open_redis(redis_cluster.url, prefix=prefixed(), cipher=cipher()) as store:
        for stream_id in odd:
            assert store.put(clip(0, stream_id)) and store.put(clip(1, stream_id))
            store.set_retention(stream_id, Retention(max_bytes=10**9))
            assert [m.seq for m in store.clips(stream_id)] == [0, 1]
        assert store.streams() == sorted(odd)
        for stream_id in odd:
            store.delete_stream(stream_id)
        assert store.streams() == []


def test_a_listing_left_by_a_crash_or_a_delete_shows_no_stream(redis_cluster, clip) -> None:
    with open_redis(redis_cluster.url, prefix=prefixed(), cipher=cipher()) as store:
        store.put(clip(0, "cam"))
        store._redis.sadd(f"{store.prefix}:streams", "ghost")  # as if a writer died between listing and writing
        assert store.streams() == ["cam"]
        with pytest.raises(UnknownStream):
            store.stats("ghost")
        store.delete_stream("cam")
        assert store.streams() == [] and store.stream_configs() == {}
        store.put(clip(1, "cam"))  # written again after its delete: listed again
        assert store.streams() == ["cam"]


def test_deleting_every_stream_leaves_no_keys_on_any_node(redis_cluster, clip) -> None:
    prefix = prefixed()
    with open_redis(redis_cluster.url, prefix=prefix, cipher=cipher()) as store:
        for stream_id in STREAMS[:6]:
            store.put(clip(0, stream_id))
            store.put_stream_config(stream_id, {"fps": 1.0})
        for stream_id in store.streams():
            store.delete_stream(stream_id)
        store._redis.delete(f"{prefix}:streams")  # the listing itself goes when empty (SREM of its last member)
        for node in redis_cluster.masters():
            with node.client() as c:
                assert c.keys(f"{prefix}:*") == []


def test_the_url_says_or_the_node_tells_whether_it_is_a_cluster(redis_cluster, redis_server, caplog) -> None:
    with open_redis(redis_cluster.url) as store:
        assert isinstance(store, RedisClusterStore)
    with open_redis(redis_cluster.url.replace("/0", "/0?cluster=yes")) as store:
        assert isinstance(store, RedisClusterStore)
    with open_redis(redis_server.url) as store:
        assert type(store) is RedisStore
    with open_redis(f"{redis_server.url}?cluster=no") as store:
        assert type(store) is RedisStore
    with pytest.raises(ValueError, match="cluster='1'"):
        open_redis(f"{redis_server.url}?cluster=1")
    with pytest.raises(ValueError, match="hash tag"):
        open_redis(redis_cluster.url, prefix="a{b}")
    down = f"redis://127.0.0.1:{free_port()}/0"
    with open_redis(down) as store:  # nothing there yet: a plain client, connecting once Redis is up
        assert type(store) is RedisStore
    assert "?cluster=yes" in caplog.text
    with pytest.raises(MemoryUnavailable, match="redis cluster at 127.0.0.1"):
        open_redis(f"{down}?cluster=yes")


def test_a_single_redis_keeps_its_key_layout(redis_server, clip) -> None:
    """Data written before the cluster backend existed reads as before: the single-node layout is unchanged."""
    prefix = prefixed()
    with open_redis(redis_server.url, prefix=prefix, cipher=cipher()) as store:
        store.put(clip(0, "cam"))
        store.put_stream_config("cam", {"fps": 1.0})
    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = {k.decode() for k in client.keys(f"{prefix}:*")}
    finally:
        client.close()
    s = f"{prefix}:s:cam"
    assert keys == {f"{prefix}:streams", f"{prefix}:configs", f"{s}:info", f"{s}:media", f"{s}:wall", f"{s}:seq"} | {
        f"{s}:c:{0:020d}"
    }


def test_a_cluster_over_tls(tmp_path, clip) -> None:
    """`rediss://` to one node: clients, the cluster bus and replication all over TLS; plaintext is refused."""
    (tmp_path / "tls").mkdir()
    tls = make_tls_files(tmp_path / "tls")
    with cluster(tmp_path / "cluster", tls=tls) as server:
        with open_redis(server.url, prefix="tls", cipher=cipher()) as store:  # asked over TLS
            assert isinstance(store, RedisClusterStore)
        with open_redis(f"{server.url}&cluster=yes", prefix="tls", cipher=cipher()) as store:
            for stream_id in STREAMS:
                store.put(clip(0, stream_id))
            assert store.streams() == sorted(STREAMS)
            assert all(store.tokens(s, [0]).shape == (1, 64, 64) for s in STREAMS)
        with pytest.raises(MemoryUnavailable):
            open_redis(f"redis://127.0.0.1:{server.nodes[0].port}/0?cluster=yes")


WRITER = """
import sys
import numpy as np
from memory import ClipMeta, ClipRecord, clip_vector, open_store

store = open_store(sys.argv[1], sys.argv[2], secret_key=sys.argv[3])
for seq in range(10_000):
    tokens = np.full((16, 32), seq % 1000, dtype=np.float16)
    meta = ClipMeta(f"cam{seq % 4}", seq, 1e9 + seq, 1e9 + seq + 1, float(seq), seq + 1.0, (float(seq),))
    store.put(ClipRecord(meta, tokens, clip_vector(tokens)))
    print(seq, flush=True)  # acknowledged
"""


def test_a_writer_process_killed_mid_stream_loses_no_acknowledged_clip(redis_cluster, tmp_path) -> None:
    url, key = f"{redis_cluster.url}?cluster=yes", Fernet.generate_key().decode()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, url, str(tmp_path), key], stdout=subprocess.PIPE, env=env, cwd=REPO
    )
    acked = []
    try:
        assert proc.stdout is not None
        while len(acked) < 60:
            line = proc.stdout.readline()
            assert line, f"the writer exited with {proc.wait()}"
            acked.append(int(line))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with open_store(url, tmp_path, secret_key=key) as store:  # the restarted process
        held = np.concatenate([store.held_seqs(s) for s in store.streams()])
        assert set(acked) <= set(held.tolist())
        last = max(held.tolist())
        assert store.tokens(f"cam{last % 4}", [last])[0, 0, 0] == last % 1000
        assert store.clips("cam0")[0].seq == 0


def test_a_dead_master_is_reported_fast_and_the_store_recovers(tmp_path, clip) -> None:
    with cluster(tmp_path) as server, open_redis(server.url, prefix="outage", cipher=cipher()) as store:
        for stream_id in STREAMS:
            store.put(clip(0, stream_id))
        node = server.node_of(store._keys("cam0").info)
        node.stop()
        t0 = time.monotonic()
        with pytest.raises(MemoryUnavailable, match="redis cluster at 127.0.0.1"):
            store.put(clip(1, "cam0"))
        with pytest.raises(MemoryUnavailable):
            store.clips("cam0")
        assert time.monotonic() - t0 < 3.0
        node.start()  # same port, nodes.conf and append-only file: back in its place with its data
        server.wait_ok()
        assert store.put(clip(1, "cam0"))
        assert [m.seq for m in store.clips("cam0")] == [0, 1]
        assert store.streams() == sorted(STREAMS)


def primary_and_replica(server: RedisClusterServer, key: str):
    master = server.node_of(key)
    replica = next(
        n
        for n in server.running()
        if n.info("replication")["role"] == "slave" and n.info("replication")["master_port"] == master.port
    )
    return master, replica


def test_a_failover_loses_no_acknowledged_clip(tmp_path, clip) -> None:
    """A replica takes over its master (CLUSTER FAILOVER: the master stops writes and the replica catches up first)
    while a writer keeps writing; every put that returned is held by the new master."""
    with (
        cluster(tmp_path, masters=3, replicas=1) as server,
        open_redis(server.url, prefix="fo", cipher=cipher()) as store,
    ):
        master, replica = primary_and_replica(server, store._keys("cam").info)
        acked: list[int] = []
        failed = [0]
        stop = threading.Event()

        def write() -> None:
            seq = 0
            while not stop.is_set():
                try:
                    store.put(clip(seq, "cam"))
                except MemoryUnavailable:
                    failed[0] += 1  # as the encoder does: the same clip again, shortly
                    time.sleep(0.01)
                    continue
                acked.append(seq)
                seq += 1

        writer = threading.Thread(target=write)
        writer.start()
        try:
            while len(acked) < 30:
                time.sleep(0.01)
            subprocess.run(["redis-cli", "-p", str(replica.port), "CLUSTER", "FAILOVER"], check=True, timeout=10)
            deadline = time.monotonic() + 20
            while replica.info("replication")["role"] != "master":
                assert time.monotonic() < deadline, "the replica was not promoted"
                time.sleep(0.05)
            written = len(acked)
            while len(acked) < written + 30:  # writes go on, to the new master
                time.sleep(0.01)
        finally:
            stop.set()
            writer.join()
        deadline = time.monotonic() + 10  # every node's slot map shows the promotion once gossip has spread it
        while server.node_of(store._keys("cam").info) is not replica:
            assert time.monotonic() < deadline, "the cluster does not show the replica serving the slot"
            time.sleep(0.05)
        assert store.held_seqs("cam").tolist() == acked
        with RedisCluster.from_url(server.url) as client:  # what the new master itself holds
            assert client.zcard(store._keys("cam").wall) == len(acked)
        assert master.info("replication")["role"] == "slave"
