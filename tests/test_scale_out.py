"""Scale-out as real processes on loopback: a 3-master Redis Cluster (a replica each), 3 `vcflash encoder`s,
2 `vcflash ingest` shards and 2 `vcflash reasoner`s; each shard sends its 4 streams' clips to all three encoders
(sticky per stream, spread across them).

One encoder and one ingest shard are killed with SIGKILL in the middle of the streams, a Redis master is failed
over to its replica, and the shard is started again. The other shard's streams lose nothing and store nothing
twice: every clip 0..11, once. The killed shard resumes its own streams from memory (and only those), each going
on after its last stored clip; every clip it had acknowledged before it died is still there. Then an Ask through
each reasoner answers from all 8 streams.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hico.checkpoint import make_tiny_checkpoint
from ingest.shards import shard_of
from tests.conftest import free_port
from tests.memory.cluster_server import RedisClusterServer, cluster
from tests.memory.test_cluster import primary_and_replica
from tests.test_split import TOKEN, VCFLASH, Deployment, serving, wait_for
from vcflash.client import Client
from vcflash.media import write_test_video

ENCODERS, SHARDS, REASONERS, STREAMS_PER_SHARD = 3, 2, 2, 4
CLIPS = 12  # a 12 s file sampled at 4 fps, realtime: a clip a second


class ScaleOut(Deployment):
    """test_split's deployment (kill, stop, client) with N encoders and ingest shards on a Redis Cluster."""

    def __init__(self, tmp: Path, redis: RedisClusterServer) -> None:
        self.tmp, self.redis = tmp, redis
        self.checkpoint = make_tiny_checkpoint(tmp / "tiny")
        self.ports = {f"encoder{i}": free_port() for i in range(ENCODERS)}
        self.ports |= {f"ingest{i}": free_port() for i in range(SHARDS)}
        self.ports |= {f"reasoner{i}": free_port() for i in range(REASONERS)}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        encoders = ",".join(f"127.0.0.1:{self.ports[f'encoder{i}']}" for i in range(ENCODERS))
        self.env = os.environ | {
            "VCFLASH_API_TOKEN": TOKEN,
            "VCFLASH_REDIS_URL": redis.url,
            "VCFLASH_ENCODER_ADDRESS": encoders,
            "VCFLASH_DATA_DIR": str(tmp / "data"),
            "VCFLASH_METRICS_PORT": "0",
            "VCFLASH_MAX_WAIT_MS": "10",
            "VCFLASH_HTTP_PORT": "0",
            "VCFLASH_MEDIA_ROOT": "/",
            "VCFLASH_LINK_BACKOFF_MAX_S": "1",
        }

    def start(self, *names: str) -> None:
        for name in names:
            log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
            command, port = name.rstrip("0123456789"), str(self.ports[name])
            if command == "ingest":  # -v: INFO logs, where the link says which encoder takes each stream
                shard = name[len(command) :]
                args = [VCFLASH, "-v", command, "--port", port, "--frame-size", "224", "--shard", shard]
                args += ["--shards", str(SHARDS)]
            else:
                args = [VCFLASH, command, "--port", port, "--model", str(self.checkpoint)]
            self.procs[name] = subprocess.Popen(args, env=self.env, stdout=log, stderr=log)
        for name in names:  # started side by side: each loads its model or resumes its streams meanwhile
            wait_for(lambda name=name: self.up(name), 90, f"{name} to serve")

    def up(self, name: str) -> bool:
        if self.procs[name].poll() is not None:
            raise RuntimeError(f"{name} exited: {self.log(name)[-2000:]}")
        return serving(self.ports[name])

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def scale_out(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaleOut]:
    tmp = tmp_path_factory.mktemp("scale_out")
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (.ci/run installs it)")
    with cluster(tmp / "redis", replicas=1) as redis:
        d = ScaleOut(tmp, redis)
        try:
            d.start(
                *(f"encoder{i}" for i in range(ENCODERS)),
                *(f"ingest{i}" for i in range(SHARDS)),
                *(f"reasoner{i}" for i in range(REASONERS)),
            )
            yield d
        finally:
            d.stop()


def stored_seqs(client: Client, stream: str) -> list[int]:
    try:
        return [c.seq for c in client.clips(stream)]
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return []
        raise


def test_an_encoder_and_an_ingest_shard_die_and_nothing_acknowledged_is_lost(
    scale_out: ScaleOut, tmp_path: Path
) -> None:
    video = write_test_video(tmp_path / "v.mp4", seconds=CLIPS, fps=10, size=(96, 64))
    names = [f"cam{i}" for i in range(40)]
    streams = {i: [n for n in names if shard_of(n, SHARDS) == i][:STREAMS_PER_SHARD] for i in range(SHARDS)}
    shards = [scale_out.client(f"ingest{i}") for i in range(SHARDS)]
    try:
        # a stream added to the wrong shard is refused, naming its owner
        with pytest.raises(grpc.RpcError) as err:
            shards[0].add_stream(streams[1][0], str(video), fps=4)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "belongs to ingest shard 1 of 2" in (err.value.details() or "")
        for i, client in enumerate(shards):
            for name in streams[i]:
                client.add_stream(name, str(video), fps=4, realtime=True)
        every = streams[0] + streams[1]
        wait_for(lambda: all(len(stored_seqs(shards[0], n)) >= 2 for n in every), 30, "clips of every stream")

        # encoder0 holds one stream of each shard (below: the streams used all three). Stopped first, it takes
        # clips without acknowledging them; killed, those unacknowledged clips must go to another encoder.
        scale_out.procs["encoder0"].send_signal(signal.SIGSTOP)
        time.sleep(1.5)
        scale_out.kill("encoder0")
        scale_out.kill("ingest1")
        acknowledged = {n: set(stored_seqs(shards[0], n)) for n in streams[1]}  # stored before the shard died
        # and the Redis master of a running stream hands over to its replica while clips keep coming
        master, replica = primary_and_replica(scale_out.redis, f"{{s:{streams[0][0]}}}")
        before = set(stored_seqs(shards[0], streams[0][0]))
        subprocess.run(["redis-cli", "-p", str(replica.port), "CLUSTER", "FAILOVER"], check=True, timeout=10)
        wait_for(lambda: replica.info("replication")["role"] == "master", 20, "the replica to be promoted")
        time.sleep(1.0)
        scale_out.start("ingest1")  # resumes its streams from memory; encoder0 stays dead
        shards[1].close()
        shards[1] = scale_out.client("ingest1")
        assert sorted(s.stream_id for s in shards[1].list_streams()) == sorted(streams[1])
        assert sorted(s.stream_id for s in shards[0].list_streams()) == sorted(streams[0])

        for i, client in enumerate(shards):
            for name in streams[i]:
                wait_for(lambda c=client, n=name: c.stream(n).state == "finished", 40, f"{name} to finish")
        for name in streams[0]:  # an encoder died under them: every clip stored, once
            wait_for(lambda n=name: shards[0].stream(n).clips_stored == CLIPS, 20, f"{name}'s clips stored")
            status = shards[0].stream(name)
            assert status.clips_emitted == CLIPS and sum(status.frames_dropped.values()) == 0
            assert stored_seqs(shards[0], name) == list(range(CLIPS)), name
        for name in streams[1]:  # resumed after the last stored clip: the file again, numbering going on
            wait_for(lambda n=name: shards[1].stream(n).clips_stored == CLIPS, 20, f"{name}'s clips stored")
            status = shards[1].stream(name)
            seqs = stored_seqs(shards[1], name)
            assert acknowledged[name] <= set(seqs), name  # nothing acknowledged was lost
            assert status.clips_emitted == CLIPS and len(seqs) > CLIPS, name
            replay = seqs[-CLIPS:]
            assert replay == list(range(replay[0], replay[0] + CLIPS)), name  # the whole file again, none lost
            assert replay[0] == max(seqs[:-CLIPS]) + 1 > max(acknowledged[name]), name  # after the last stored
            assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs), name

        assert before <= set(stored_seqs(shards[0], streams[0][0]))  # the failover lost nothing acknowledged
        assert master.info("replication")["role"] == "slave"
        for i in range(REASONERS):  # any reasoner answers from every stream (shared memory)
            with scale_out.client(f"reasoner{i}") as reasoner:
                *_, result = reasoner.ask(every, "What happens?", max_frames=256, max_new_tokens=4)
            assert {e.clip.stream_id for e in result.evidence} == set(every), i

        placed = [line for i in range(SHARDS) for line in scale_out.log(f"ingest{i}").splitlines()]
        placed = [line for line in placed if "event=stream_placed" in line]
        ports = {p.split("encoder=")[1].strip() for p in placed}
        assert len(ports) == ENCODERS, placed  # the streams were spread over all three encoders
        moved = re.findall(r"event=encoder_unreachable address=\S+ moved=(\d+)", scale_out.log("ingest0"))
        assert moved and int(moved[0]) >= 1, moved  # clips the dead encoder held went to another
    finally:
        for client in shards:
            client.close()
