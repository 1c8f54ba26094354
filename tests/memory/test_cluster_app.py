"""`vcflash up --redis <a cluster node>` end to end: the all-in-one App (tests/test_app.py's helpers, tiny model)
ingests two file streams into a 3-master Redis Cluster, answers an Ask over both, and after a restart of the
process answers the same from what the cluster kept, with the stream configs read back from it."""

from __future__ import annotations

from pathlib import Path

import tests.test_app as app_tests
from hico import VideoChatFlash
from memory import RedisClusterStore, open_store
from tests.test_app import LoopThread, ask, seqs, start_app, wait_done

model, videos, runner = app_tests.model, app_tests.videos, app_tests.runner  # its module-scoped fixtures
STREAMS = ["cam", "door"]  # hash slots 12349 and 8324: two masters apart (redis-cli splits 16384 slots in thirds)


def test_the_app_on_a_cluster_answers_over_two_masters_and_after_a_restart(
    redis_cluster, runner: LoopThread, model: VideoChatFlash, videos: dict[str, Path], tmp_path: Path
) -> None:
    settings = {"data_dir": tmp_path, "redis_url": redis_cluster.url}
    first = start_app(runner, model, **settings)
    try:
        c = first.client
        for name in STREAMS:
            c.add_stream(name, str(videos["12s"]), fps=1, realtime=False)
        for name in STREAMS:
            wait_done(c, name)
        _, before = ask(c, STREAMS, anchors=False)
        assert {e.clip.stream_id for e in before.evidence} == set(STREAMS)
        stats = {name: c.stats(name) for name in STREAMS}
    finally:
        first.stop()
    with open_store(redis_cluster.url, tmp_path) as store:
        assert isinstance(store, RedisClusterStore)
        assert len({redis_cluster.node_of(store._keys(s).info).port for s in STREAMS}) == 2
        assert set(store.stream_configs()) == set(STREAMS)

    second = start_app(runner, model, **settings)
    try:
        c = second.client
        for name in STREAMS:
            assert c.stats(name) == stats[name], name
        _, after = ask(c, STREAMS, anchors=False)
        assert after.answer == before.answer and seqs(after.evidence) == seqs(before.evidence)
    finally:
        second.stop()
