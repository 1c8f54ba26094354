"""Bad video bytes under the media root, each added as a stream: empty, zeros, random, truncated and spliced MP4s,
bit-flipped ones, garbage H.264 and TS, a playlist posing as a video. Each stream ends (finished, or failed with a
reason) within a bound, every clip it emitted is stored, the server lives, and the other streams carry on."""

from __future__ import annotations

import random

import grpc

from protos.vcflash.v1 import vcflash_pb2 as pb
from vcflash.media import write_test_video

from . import gen
from .harness import AUTH, KEEP, LIVE, TALLY, FuzzServer, check_invariants, leaks, wait_for

SEED = 8_5
VARIANTS = 4  # bit-flipped and spliced copies of a good file, each
RUNNING = ("starting", "running")


def test_broken_files_end_with_a_reason(fuzz_server: FuzzServer) -> None:
    ts = write_test_video(fuzz_server.work / "keep.ts", seconds=8, fps=25, size=(64, 48)).read_bytes()
    files = gen.broken_videos((fuzz_server.media / "keep.mp4").read_bytes(), ts, random.Random(SEED), VARIANTS)
    (fuzz_server.media / "bad").mkdir(exist_ok=True)
    (fuzz_server.media / "bad" / "dir.mp4").mkdir(exist_ok=True)  # a directory posing as a file
    names = {}
    for i, (filename, data) in enumerate(sorted(files.items())):
        (fuzz_server.media / "bad" / filename).write_bytes(data)
        names[f"bad-{i}"] = f"bad/{filename}"
    names[f"bad-{len(names)}"] = "bad/dir.mp4"
    live_before = len(fuzz_server.seqs(LIVE))
    for name, path in names.items():
        try:
            status = fuzz_server.add(name, path, fps=4, realtime=False, live=False)
            assert not leaks(str(status))
        except grpc.RpcError as e:  # refused at once (a file that cannot be opened) is fine, with a reason
            TALLY.add("video/files", f"refused {e.code().name}")  # type: ignore[attr-defined]
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details(), (path, e)  # type: ignore[attr-defined]
            names[name] = ""

    started = {n: p for n, p in names.items() if p}

    def ended() -> dict[str, pb.StreamStatus] | None:
        statuses = {n: fuzz_server.status(n) for n in started}
        done = all(s.state not in RUNNING and s.clips_stored == s.clips_emitted for s in statuses.values())
        return statuses if done else None

    statuses = wait_for(ended, "every broken file's stream to end", 60, 0.2)
    failures = []
    for name, s in statuses.items():
        TALLY.add("video/files", s.state)
        if s.state == "failed" and not s.error:
            failures.append(f"{started[name]}: failed without a reason")
        elif s.state not in ("failed", "finished"):
            failures.append(f"{started[name]}: ended {s.state!r} ({s.error})")
        elif leaks(s.error) or len(s.error) > 2000:
            failures.append(f"{started[name]}: error {s.error[:200]!r}")
    assert not failures, "\n".join(failures)
    assert sum(s.state == "failed" for s in statuses.values()) >= 8  # the hopeless ones say so
    assert sum(s.clips_stored > 0 for s in statuses.values()) >= VARIANTS  # damaged frames, not a dead stream
    assert fuzz_server.health() == 1
    wait_for(lambda: len(fuzz_server.seqs(LIVE)) > live_before, "the live stream to store another clip", 20)

    with_clips = [n for n, s in statuses.items() if s.clips_stored]
    for name in with_clips[:2] + list(KEEP[:1]):  # what survived the damage can be asked about, like any stream
        request = pb.AskRequest(stream_ids=[name], question="What moves?", generation=pb.Generation(max_new_tokens=2))
        call = fuzz_server.channel.unary_stream("/vcflash.v1.Reasoner/Ask")
        events = [pb.AskResponse.FromString(r) for r in call(request.SerializeToString(), metadata=AUTH, timeout=60)]
        TALLY.add("video/ask", grpc.StatusCode.OK)
        assert events[-1].WhichOneof("event") == "result" and events[-1].result.frames > 0, events[-1]


def test_a_damaged_ts_is_a_decode_error_not_a_crash(fuzz_server: FuzzServer) -> None:
    assert "stream crashed" not in fuzz_server.log_text()


def test_server_intact_after_this_module(fuzz_server: FuzzServer) -> None:
    check_invariants(fuzz_server)
