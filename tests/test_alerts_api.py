"""Issue 14, the API: alerts and their event log through a real all-in-one server (gRPC over loopback, the CLI, the
Python client), on the embedded memory and on Redis.

The API tests drive the event log by appending records to the server's store directly (as the alert runner does),
under an alert name no runner evaluates, so what WatchEvents must send is known exactly. The end-to-end test uses
the trained tiny model on the demo scene, where a blue square is on screen from a quarter of the way in.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from hico import VideoChatFlash
from ingest.shards import shard_of
from protos.vcflash.v1 import vcflash_pb2 as pb
from tests.test_app import TOKEN, LoopThread, Served, code_of, start_app, wait_done, wait_for
from tests.test_cli_first_hour import test_grpc_commands_start_without_torch as starts_without_torch
from vcflash.app import alert_shard
from vcflash.cli import main
from vcflash.client import event_record
from vcflash.serve.settings import Settings
from vcflash.shapes import demo_scene

Q = "Is there a blue square?"
SYNTHETIC = "synthetic"  # the alert of the records the tests append themselves
# a public address, so no name is looked up; alerts with a webhook are never due here (every_clips), so nothing is sent
PUBLIC = "https://93.184.215.14"


def record(seq: int, kind: str = "start", alert: str = SYNTHETIC, stream: str = "cam") -> dict[str, Any]:
    return {
        "key": f"{alert}/{stream}/{seq}/{kind}",
        "kind": kind,
        "alert": alert,
        "stream": stream,
        "event": f"{alert}/{stream}/{seq}",
        "start_media_s": 4.0 * seq,
        "end_media_s": 4.0 * seq + 8 if kind == "end" else None,
        "start_wall": 1_800_000_000.0 + 4 * seq,
        "end_wall": 1_800_000_008.0 + 4 * seq if kind == "end" else None,
        "peak": 0.9,
        "score": 0.8 if kind == "start" else 0.1,
        "clips": [seq, seq + 1],
        "emitted_wall": 1_800_000_100.0 + seq,
    }


@pytest.fixture(scope="module")
def model() -> VideoChatFlash:
    return VideoChatFlash.from_pretrained("tiny")  # the shipped model, trained on shapes scenes


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_scene(seconds=16.0, fps=5).write(tmp_path_factory.mktemp("video") / "demo.mp4")


@pytest.fixture(scope="module")
def runner() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


def serve(runner: LoopThread, model: VideoChatFlash, data_dir: Path, **settings: Any) -> Served:
    return start_app(runner, model, data_dir=data_dir, **settings)


@pytest.fixture(scope="module", params=["embedded", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Settings for a memory of its own: a data dir and, for Redis, a database of the session's server."""
    redis_url = request.getfixturevalue("redis_server").fresh_url() if request.param == "redis" else None
    return {"data_dir": tmp_path_factory.mktemp("data"), "redis_url": redis_url}


@pytest.fixture(scope="module")
def served(runner: LoopThread, model: VideoChatFlash, video: Path, backend: dict[str, Any]) -> Iterator[Served]:
    """A server whose memory holds the finished stream "cam" (the demo scene: 4 clips)."""
    s = serve(runner, model, **backend)
    try:
        s.client.add_stream("cam", str(video), fps=1, realtime=False)
        wait_done(s.client, "cam")
        yield s
    finally:
        s.stop()


def cli(served: Served, *argv: str) -> int:
    return main([*argv, "--address", served.address, "--token", TOKEN])


# ---------------------------------------------------------------- add, list, remove


def test_add_list_remove_over_grpc(served: Served) -> None:
    c = served.client
    before = time.time()
    a = c.add_alert(
        "door",
        ["cam"],
        Q,
        window_frames=8,
        every_clips=2,
        threshold=0.7,
        min_duration_s=4.0,
        cooldown_s=30.0,
        webhook_url=PUBLIC + "/a/b?token=x",
        mqtt_topic="site/door",
    )
    try:
        assert (a.name, list(a.stream_ids), a.question) == ("door", ["cam"], Q)
        assert (a.window_frames, a.every_clips, a.threshold, a.min_duration_s, a.cooldown_s) == (8, 2, 0.7, 4.0, 30.0)
        assert a.webhook_url == PUBLIC + "/a/b?token=x" and a.mqtt_topic == "site/door"
        assert len(a.webhook_secret) >= 32 and before <= a.created_wall <= time.time()
        (listed,) = [x for x in c.alerts() if x.name == "door"]
        assert listed.webhook_secret == "" and listed.created_wall == a.created_wall  # the secret went out once
        a.webhook_secret = ""
        assert listed == a
        stored = served.app.store.alert_configs()["door"]  # the runner's config holds it, sealed at rest
        assert stored["webhook_secret"] and stored["threshold"] == 0.7
        plain = c.add_alert("plain", ["cam"], Q)
        assert plain.webhook_secret == "" and (plain.window_frames, plain.every_clips, plain.threshold) == (16, 1, 0.5)
        assert [x.name for x in c.alerts()] == sorted(x.name for x in c.alerts())
    finally:
        c.remove_alert("door")
        c.remove_alert("plain")
    assert {x.name for x in c.alerts()}.isdisjoint({"door", "plain"})
    assert code_of(lambda: c.remove_alert("door")) == grpc.StatusCode.NOT_FOUND


BAD = [  # (what, AddAlert kwargs, status)
    ("empty question", {"question": "  "}, grpc.StatusCode.INVALID_ARGUMENT),
    ("oversized question", {"question": "x" * 5000}, grpc.StatusCode.INVALID_ARGUMENT),
    ("bad name", {"name": "no spaces"}, grpc.StatusCode.INVALID_ARGUMENT),
    ("long name", {"name": "x" * 65}, grpc.StatusCode.INVALID_ARGUMENT),
    ("no stream", {"stream_ids": []}, grpc.StatusCode.INVALID_ARGUMENT),
    ("bad stream name", {"stream_ids": ["a/b"]}, grpc.StatusCode.INVALID_ARGUMENT),
    ("unknown stream", {"stream_ids": ["cam", "nope"]}, grpc.StatusCode.NOT_FOUND),
    ("window not x4", {"window_frames": 6}, grpc.StatusCode.INVALID_ARGUMENT),
    ("window too long", {"window_frames": 4096}, grpc.StatusCode.INVALID_ARGUMENT),
    ("threshold 1", {"threshold": 1.0}, grpc.StatusCode.INVALID_ARGUMENT),
    ("negative cooldown", {"cooldown_s": -1.0}, grpc.StatusCode.INVALID_ARGUMENT),
    ("NaN min duration", {"min_duration_s": float("nan")}, grpc.StatusCode.INVALID_ARGUMENT),
    ("webhook not http", {"webhook_url": "ftp://hooks.example.com/x"}, grpc.StatusCode.INVALID_ARGUMENT),
    ("webhook credentials", {"webhook_url": "https://u:p@hooks.example.com/"}, grpc.StatusCode.INVALID_ARGUMENT),
    ("private webhook", {"webhook_url": "http://127.0.0.1:9/hook"}, grpc.StatusCode.INVALID_ARGUMENT),
    ("link-local webhook", {"webhook_url": "http://169.254.169.254/"}, grpc.StatusCode.INVALID_ARGUMENT),
    ("mqtt wildcard", {"mqtt_topic": "site/#"}, grpc.StatusCode.INVALID_ARGUMENT),
]


@pytest.mark.parametrize("what, kwargs, code", BAD, ids=[b[0] for b in BAD])
def test_bad_alerts_are_refused_with_their_status(served: Served, what: str, kwargs: dict, code) -> None:
    c = served.client
    args = {"name": "bad", "stream_ids": ["cam"], "question": Q} | kwargs
    with pytest.raises(grpc.RpcError) as e:
        c.add_alert(args.pop("name"), args.pop("stream_ids"), args.pop("question"), **args)
    assert e.value.code() == code, e.value.details()
    assert len(e.value.details()) < 600  # an oversized input never comes back whole
    assert "bad" not in {a.name for a in c.alerts()}


def test_duplicates_limits_and_names(runner: LoopThread, model: VideoChatFlash, video: Path, tmp_path: Path) -> None:
    s = serve(runner, model, tmp_path, max_alerts=2, max_events=3)
    try:
        c = s.client
        c.add_stream("cam", str(video), fps=1, realtime=False)
        wait_done(s.client, "cam")
        c.add_alert("one", ["cam"], Q, every_clips=1000)
        assert code_of(lambda: c.add_alert("one", ["cam"], "Is there a red circle?")) == grpc.StatusCode.ALREADY_EXISTS
        assert [a.question for a in c.alerts()] == [Q]  # the first one kept
        c.add_alert("two", ["cam"], Q, every_clips=1000)
        assert code_of(lambda: c.add_alert("three", ["cam"], Q)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert code_of(lambda: c.remove_alert("bad name")) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: list(c.events(alert="bad name"))) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: list(c.events(after=-1))) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: list(c.events(start=9.0, end=3.0))) == grpc.StatusCode.INVALID_ARGUMENT
        c.remove_alert("one")
        c.add_alert("three", ["cam"], Q, every_clips=1000)  # room again
        ids = [s.app.store.append_event(record(seq))[0] for seq in range(5)]  # VCFLASH_MAX_EVENTS=3
        assert [e.id for e in c.events(alert=SYNTHETIC)] == ids[-3:]
    finally:
        s.stop()


def test_private_webhooks_pass_where_allowed(runner: LoopThread, model: VideoChatFlash, video: Path, tmp_path) -> None:
    s = serve(runner, model, tmp_path, webhook_allow_private=True)
    try:
        s.client.add_stream("cam", str(video), fps=1, realtime=False)
        wait_done(s.client, "cam")
        a = s.client.add_alert("local", ["cam"], Q, webhook_url="http://127.0.0.1:9/hook", every_clips=1000)
        assert a.webhook_secret
    finally:
        s.stop()


# ---------------------------------------------------------------- the event log


def test_watch_replays_then_follows_and_resumes_without_loss_or_repeats(served: Served) -> None:
    store, c = served.app.store, served.client
    start = max([r["id"] for r in store.events(limit=100_000)], default=0)
    first = [store.append_event(record(seq))[0] for seq in range(3)]
    replay = list(c.events(after=start, alert=SYNTHETIC))
    assert [e.id for e in replay] == first and [e.key for e in replay] == [
        f"{SYNTHETIC}/cam/{s}/start" for s in range(3)
    ]
    assert event_record(replay[0]) == {"id": first[0]} | record(0)
    assert [e.id for e in c.events(after=first[0], alert=SYNTHETIC)] == first[1:]

    # a follower: gets the replay, then records appended while it waits, in order
    got: list[pb.AlertEvent] = []
    follower = c.events(after=start, alert=SYNTHETIC, follow=True)

    def read(n: int) -> None:
        for e in follower:
            got.append(e)
            if len(got) == n:
                return

    reader = threading.Thread(target=read, args=(5,))
    reader.start()
    wait_for(lambda: len(got) == 3, "the replay")
    more = [store.append_event(record(seq))[0] for seq in (3, 4)]
    reader.join(10)
    assert [e.id for e in got] == first + more
    follower.close()  # disconnect

    # appended while nobody listens, then a resume from the last id seen: exactly the missed ones
    missed = [store.append_event(record(seq, "end"))[0] for seq in range(3)]
    resumed = c.events(after=got[-1].id, alert=SYNTHETIC, follow=True)
    seen = [next(resumed).id for _ in range(3)]
    resumed.close()
    assert seen == missed
    assert store.append_event(record(0)) == (first[0], False)  # a key held is not stored twice...
    assert [e.id for e in c.events(after=start, alert=SYNTHETIC)] == first + more + missed  # ...nor sent twice


def test_watch_filters_by_time_range(served: Served) -> None:
    store, c = served.app.store, served.client
    start = max([r["id"] for r in store.events(limit=100_000)], default=0)
    for seq in (10, 20, 30):
        store.append_event(record(seq, alert="ranged"))
    media = [e.start_media_s for e in c.events(after=start, alert="ranged", start=75.0, end=125.0)]
    assert media == [80.0, 120.0]
    wall = c.events(after=start, alert="ranged", start=1_800_000_100.0, wall_clock=True)
    assert [e.start_media_s for e in wall] == [120.0]


def test_cli(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli(
            served,
            "alerts",
            "add",
            "clidoor",
            "--stream",
            "cam",
            Q,
            "--window-frames",
            "4",
            "--threshold",
            "0.6",
            "--every-clips",
            "1000",
            "--webhook",
            PUBLIC + "/x",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("clidoor: added (streams cam, 4-frame window every 1000 clips, threshold 0.6")
    (secret_line,) = [line for line in out.splitlines() if line.startswith("webhook secret")]
    secret = secret_line.rsplit(" ", 1)[1]
    assert served.app.store.alert_configs()["clidoor"]["webhook_secret"] == secret
    try:
        assert cli(served, "alerts", "ls") == 0
        assert "clidoor\t'Is there a blue square?'\tstreams cam" in capsys.readouterr().out
        assert cli(served, "alerts", "ls", "--json") == 0
        (row,) = [a for a in json.loads(capsys.readouterr().out) if a["name"] == "clidoor"]
        assert row["threshold"] == 0.6 and "webhook_secret" not in row and secret not in json.dumps(row)
        assert cli(served, "alerts", "add", "clidoor", "--stream", "cam", Q) == 1
        assert "ALREADY_EXISTS" in capsys.readouterr().err
        assert cli(served, "alerts", "add", "x", "--stream", "nope", Q) == 1
        assert "NOT_FOUND" in capsys.readouterr().err
    finally:
        assert cli(served, "alerts", "rm", "clidoor") == 0
    assert "clidoor: removed" in capsys.readouterr().out
    assert cli(served, "alerts", "rm", "clidoor") == 1 and "NOT_FOUND" in capsys.readouterr().err

    store = served.app.store
    start = max([r["id"] for r in store.events(limit=100_000)], default=0)
    ids = [store.append_event(record(seq, alert="clilog"))[0] for seq in (1, 2)]
    assert cli(served, "events", "--alert", "clilog", "--after", str(start), "--json") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [{"id": i} | record(seq, alert="clilog") for i, seq in zip(ids, (1, 2), strict=True)]
    assert cli(served, "events", "--alert", "clilog", "--after", str(ids[0])) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{ids[1]}\tstart\tclilog\tcam\tmedia 8.0 s  wall 2027-") and "clips #2-3" in line
    assert (
        cli(
            served, "events", "--alert", "clilog", "--from", "2027-01-15T08:00", "--to", "2027-01-15T08:00:07", "--json"
        )
        == 0
    )
    assert [json.loads(x)["id"] for x in capsys.readouterr().out.splitlines()] == [ids[0]]
    assert cli(served, "events", "--after", "-1") == 2


# ---------------------------------------------------------------- durability and the whole path


def test_alerts_and_events_survive_a_restart(
    runner: LoopThread,
    model: VideoChatFlash,
    video: Path,
    backend: dict[str, Any],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    redis_url = request.getfixturevalue("redis_server").fresh_url() if backend["redis_url"] else None
    settings = {"data_dir": tmp_path, "redis_url": redis_url}  # a memory of this test's own
    s = serve(runner, model, **settings)
    try:
        s.client.add_stream("cam", str(video), fps=1, realtime=False)
        wait_done(s.client, "cam")
        added = s.client.add_alert("kept", ["cam"], Q, every_clips=1000, webhook_url=PUBLIC + "/k")
        ids = [s.app.store.append_event(record(seq))[0] for seq in range(3)]
    finally:
        s.stop()
    again = serve(runner, model, **settings)
    try:
        (kept,) = [a for a in again.client.alerts() if a.name == "kept"]
        added.webhook_secret = ""
        assert kept == added
        assert [e.id for e in again.client.events(alert=SYNTHETIC)] == ids
        new, created = again.app.store.append_event(record(3))
        assert created and new > ids[-1]
        assert again.app.store.alert_configs()["kept"]["webhook_secret"]  # the key opened it again
    finally:
        again.stop()


def test_an_alert_on_a_stream_emits_events_seen_by_watch_and_the_cli(
    runner: LoopThread, model: VideoChatFlash, video: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The trained tiny model on the demo scene: a blue square is on screen from 4 s on, so once the alert is added
    its runner scores the latest window yes and an event starts, delivered to WatchEvents and `vcflash events`."""
    s = serve(runner, model, tmp_path)
    try:
        c = s.client
        c.add_stream("cam", str(video), fps=1, realtime=False)
        wait_done(c, "cam")
        c.add_alert("square", ["cam"], Q, window_frames=4)
        follower = c.events(alert="square", follow=True, timeout_s=60)
        first = next(follower)
        follower.close()
        assert (first.kind, first.alert, first.stream_id) == ("start", "square", "cam")
        assert first.event == f"square/cam/{first.clips[0]}" and first.key.startswith(f"{first.event}/start/")
        assert first.score >= 0.5 and first.start_media_s >= 4.0 and first.HasField("start_wall")
        assert cli(s, "events", "--alert", "square", "--json") == 0
        logged = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert logged[0] == event_record(first)
    finally:
        s.stop()


def test_a_reasoner_shard_evaluates_only_the_streams_it_owns(
    runner: LoopThread, model: VideoChatFlash, video: Path, tmp_path: Path
) -> None:
    """VCFLASH_REASONER_SHARDS=2: "cam" hashes to one shard; the other evaluates nothing of it, and the API still
    answers there. (The owning shard is the end-to-end test above, with one shard.)"""
    other = 1 - shard_of("cam", 2)
    assert alert_shard(Settings.from_env({}, reasoner_shards=2, reasoner_shard=str(other))).owns("cam") is False
    s = serve(runner, model, tmp_path, reasoner_shards=2, reasoner_shard=str(other))
    try:
        c = s.client
        c.add_stream("cam", str(video), fps=1, realtime=False)
        wait_done(c, "cam")
        c.add_alert("square", ["cam"], Q, window_frames=4)
        time.sleep(1.5)  # several of the runner's polls (VCFLASH_ALERT_POLL_S 0.2)
        assert list(c.events(alert="square")) == [] and s.app.store.alert_state("square", "cam") is None
    finally:
        s.stop()


def test_reasoner_shard_settings_name_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="VCFLASH_REASONER_SHARD must be"):
        Settings.from_env({"VCFLASH_REASONER_SHARDS": "2", "VCFLASH_REASONER_SHARD": "2"})
    auto = Settings.from_env({"VCFLASH_REASONER_SHARDS": "2", "VCFLASH_REASONER_SHARD": "auto"})
    monkeypatch.setenv("HOSTNAME", "vcflash-reasoner-1")  # a StatefulSet pod
    assert alert_shard(auto).index == 1
    monkeypatch.setenv("HOSTNAME", "vcflash-reasoner")
    with pytest.raises(ValueError, match="VCFLASH_REASONER_SHARD=auto needs"):
        alert_shard(auto)
    assert alert_shard(Settings.from_env({})).owns("anything")


def test_readme_documents_alerts() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for words in ("## Alerts", "vcflash alerts add", "vcflash events", "WatchEvents", "VCFLASH_MAX_ALERTS"):
        assert words in readme, words


@pytest.mark.parametrize("args", [["alerts", "add", "--help"], ["alerts", "ls", "--help"], ["events", "--help"]])
def test_alert_commands_start_without_torch(args: list[str]) -> None:
    starts_without_torch(args)
