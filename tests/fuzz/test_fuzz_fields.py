"""Hostile field values in well-formed requests, each with the status it must get: stream names (path traversal,
control characters, unicode, 10 KB), sampling rates (NaN, inf, 5e-324), retention limits, time ranges (NaN, inverted,
negative), frame and token budgets, generation settings, prompt markers in questions and history, history bombs,
and clips with impossible shapes and times. Every refusal is short and names no secret."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import grpc

from protos.vcflash.v1 import vcflash_pb2 as pb

from . import gen
from .harness import (
    AUTH,
    KEEP,
    SERVICES,
    TALLY,
    FuzzServer,
    Method,
    Outcome,
    call,
    check_invariants,
    leaks,
    methods,
)

C = grpc.StatusCode
NAN, INF = math.nan, math.inf
BY_PATH = {m.path: m for m in methods(SERVICES)}
REFUSED_NAME = {C.INVALID_ARGUMENT, C.NOT_FOUND}  # a name that cannot exist may be either
VALID_NAMES = {"x" * 64}  # [A-Za-z0-9_.-]{1,64}, not only dots
BAD_NAMES = [n for n in gen.HOSTILE_NAMES if n not in VALID_NAMES]
Q = "What moves across the screen?"


def send(server: FuzzServer, path: str, request: Any, timeout: float = 60.0) -> Outcome:
    method: Method = BY_PATH[path]
    return call(server.channel, method, [request.SerializeToString()], AUTH, timeout=timeout)


def check(
    server: FuzzServer,
    cls: str,
    cases: list[tuple[str, str, Any, set[grpc.StatusCode]]],
    then: Callable[[str, Outcome], str | None] | None = None,
) -> None:
    """Send each (label, path, request, allowed codes); collect every mismatch, then fail with all of them."""
    failures = []
    for label, path, request, allowed in cases:
        outcome = send(server, path, request)
        TALLY.add(f"fields/{cls}", outcome.code)
        problem = None
        if outcome.code not in allowed:
            problem = f"got {outcome.code.name} ({outcome.details[:160]!r}), expected {sorted(c.name for c in allowed)}"
        elif found := leaks(*outcome.texts()):
            problem = f"secrets {found}"
        elif len(outcome.details) > 600:
            problem = f"a {len(outcome.details)}-character message"
        elif then is not None:
            problem = then(label, outcome)
        if problem:
            failures.append(f"{label}: {problem}")
    assert not failures, f"{len(failures)} of {len(cases)} failed:\n" + "\n".join(failures)


def add(name: str = "fld", source: str = "keep.mp4", **kw: Any) -> pb.AddStreamRequest:
    return pb.AddStreamRequest(stream_id=name, source=source, **{"realtime": False} | kw)


def ask(streams: list[str] | None = None, question: str = Q, **kw: Any) -> pb.AskRequest:
    generation = kw.pop("generation", {})
    return pb.AskRequest(
        stream_ids=KEEP[:1] if streams is None else streams,
        question=question,
        generation=pb.Generation(**{"max_new_tokens": 1} | generation),
        **kw,
    )


def test_stream_names(fuzz_server: FuzzServer) -> None:
    cases: list[tuple[str, str, Any, set[grpc.StatusCode]]] = []
    for name in BAD_NAMES:
        label = repr(name[:20])
        cases += [
            (f"AddStream {label}", "/vcflash.v1.Ingest/AddStream", add(name), {C.INVALID_ARGUMENT}),
            (f"GetStream {label}", "/vcflash.v1.Ingest/GetStream", pb.GetStreamRequest(stream_id=name), REFUSED_NAME),
            (
                f"RemoveStream {label}",
                "/vcflash.v1.Ingest/RemoveStream",
                pb.RemoveStreamRequest(stream_id=name, delete_memory=True),
                REFUSED_NAME,
            ),
            (
                f"GetStats {label}",
                "/vcflash.v1.Memory/GetStats",
                pb.GetStatsRequest(stream_id=name),
                REFUSED_NAME | {C.OK},
            ),
            (f"ListClips {label}", "/vcflash.v1.Memory/ListClips", pb.ListClipsRequest(stream_id=name), REFUSED_NAME),
            (f"Ask {label}", "/vcflash.v1.Reasoner/Ask", ask([name]), REFUSED_NAME),
        ]
        for path, request in [
            ("/vcflash.v1.Ingest/RestartStream", "RestartStreamRequest"),
            ("/vcflash.v1.Memory/DeleteStream", "DeleteStreamRequest"),
        ]:
            if path in BY_PATH:  # methods added while this suite was written
                cases.append((f"{path} {label}", path, getattr(pb, request)(stream_id=name), REFUSED_NAME))
    for name in sorted(VALID_NAMES):
        cases.append((f"AddStream {name[:8]!r}", "/vcflash.v1.Ingest/AddStream", add(name), {C.OK}))
    cases += [
        ("AddStream taken", "/vcflash.v1.Ingest/AddStream", add(KEEP[0]), {C.ALREADY_EXISTS}),
        ("GetStream unknown", "/vcflash.v1.Ingest/GetStream", pb.GetStreamRequest(stream_id="fld-none"), {C.NOT_FOUND}),
        ("GetStats unknown", "/vcflash.v1.Memory/GetStats", pb.GetStatsRequest(stream_id="fld-none"), {C.NOT_FOUND}),
        ("Ask unknown", "/vcflash.v1.Reasoner/Ask", ask(["fld-none"]), {C.NOT_FOUND}),
        ("Ask one unknown", "/vcflash.v1.Reasoner/Ask", ask([KEEP[0], "fld-none"]), {C.NOT_FOUND}),
    ]
    check(fuzz_server, "names", cases)


def test_stream_options(fuzz_server: FuzzServer) -> None:
    path = "/vcflash.v1.Ingest/AddStream"
    bad, ok = {C.INVALID_ARGUMENT}, {C.OK}
    cases: list[tuple[str, str, Any, set[grpc.StatusCode]]] = [
        (f"fps {fps!r}", path, add(f"fld-fps{i}", fps=fps), bad)
        for i, fps in enumerate([NAN, INF, -INF, -1.0, 5e-324, 1e-4, 30.000001, 31.0, 1e308, -0.0 - 1e-9])
    ]
    cases += [(f"fps {fps!r}", path, add(f"fld-fps-ok{i}", fps=fps), ok) for i, fps in enumerate([0.0, 1e-3, 30.0])]
    cases += [
        (f"max_age {v!r}", path, add(f"fld-age{i}", retention_max_age_s=v), bad)
        for i, v in enumerate([NAN, INF, -INF, -1.0, 0.0, -5e-324])
    ]
    cases += [
        (f"max_bytes {v}", path, add(f"fld-bytes{i}", retention_max_bytes=v), bad)
        for i, v in enumerate([-1, 0, -(1 << 63)])
    ]
    cases += [
        ("max_age 5e-324", path, add("fld-age-tiny", retention_max_age_s=5e-324), ok),
        ("max_bytes 2**63-1", path, add("fld-bytes-big", retention_max_bytes=(1 << 63) - 1), ok),
    ]
    cases += [
        (f"transport {t[:12]!r}", path, add(f"fld-tr{i}", transport=t), bad)
        for i, t in enumerate(["quic", "TCP", "tcp\x00", "udp\n", "x" * 1000])
    ]
    cases += [
        ("transport ''", path, add("fld-tr-empty", transport=""), ok),
        ("listen on a file", path, add("fld-listen", listen=True), bad),
        ("source 4097 chars", path, add("fld-long", source="rtsp://127.0.0.1/" + "a" * 4080), bad),
        ("source 70000 chars", path, add("fld-vlong", source="a" * 70_000), bad),
        ("source missing file", path, add("fld-missing", source="missing.mp4"), ok | bad),
        ("source a directory", path, add("fld-dir", source="."), ok | bad),
        ("live file", path, add("fld-live", live=True), ok),
    ]
    check(fuzz_server, "stream_options", cases)


def test_time_ranges_and_limits(fuzz_server: FuzzServer) -> None:
    path = "/vcflash.v1.Memory/ListClips"
    name = KEEP[0]
    clips = len(fuzz_server.baseline[name])

    def clips_of(request: pb.ListClipsRequest, n: int | None, truncated: bool | None = None) -> Callable[..., Any]:
        def then(label: str, outcome: Outcome) -> str | None:
            if outcome.code != C.OK:
                return None
            response = pb.ListClipsResponse.FromString(outcome.responses[0])
            if n is not None and len(response.clips) != n:
                return f"{len(response.clips)} clips, expected {n}"
            if truncated is not None and response.truncated != truncated:
                return f"truncated={response.truncated}"
            return None

        return then

    def r(**kw: Any) -> pb.ListClipsRequest:
        return (
            pb.ListClipsRequest(stream_id=name, range=pb.TimeRange(**kw)) if kw else pb.ListClipsRequest(stream_id=name)
        )

    table: list[tuple[str, pb.ListClipsRequest, set[grpc.StatusCode], int | None, bool | None]] = [
        ("everything", r(), {C.OK}, clips, False),
        ("limit 1", pb.ListClipsRequest(stream_id=name, limit=1), {C.OK}, 1, True),
        ("limit 2**31-1", pb.ListClipsRequest(stream_id=name, limit=(1 << 31) - 1), {C.OK}, clips, False),
        ("limit -1", pb.ListClipsRequest(stream_id=name, limit=-1), {C.INVALID_ARGUMENT}, None, None),
        ("limit -2**31", pb.ListClipsRequest(stream_id=name, limit=-(1 << 31)), {C.INVALID_ARGUMENT}, None, None),
        ("start nan", r(start=NAN), {C.INVALID_ARGUMENT}, None, None),
        ("end nan", r(end=NAN), {C.INVALID_ARGUMENT}, None, None),
        ("start nan wall", r(start=NAN, end=1.0, clock=pb.CLOCK_WALL), {C.INVALID_ARGUMENT}, None, None),
        ("inverted", r(start=5.0, end=1.0), {C.INVALID_ARGUMENT}, None, None),
        ("-inf..inf", r(start=-INF, end=INF), {C.OK}, clips, None),
        ("negative", r(start=-1e308, end=-1.0), {C.OK}, 0, None),
        ("far future", r(start=1e308), {C.OK}, 0, None),
        ("5e-324 wide", r(start=0.0, end=5e-324), {C.OK}, None, None),
        ("wall clock 1e308", r(start=1e308, clock=pb.CLOCK_WALL), {C.OK}, 0, None),
        ("clock 7", r(start=0.0, clock=7), {C.INVALID_ARGUMENT}, None, None),  # proto3 enums are open
    ]
    failures = []
    for label, request, allowed, n, truncated in table:
        outcome = send(fuzz_server, path, request)
        TALLY.add("fields/time_ranges", outcome.code)
        if outcome.code not in allowed:
            failures.append(f"{label}: got {outcome.code.name} {outcome.details[:120]!r}")
        elif (problem := clips_of(request, n, truncated)(label, outcome)) is not None:
            failures.append(f"{label}: {problem}")
    assert not failures, "\n".join(failures)


def test_ask_values(fuzz_server: FuzzServer) -> None:
    path = "/vcflash.v1.Reasoner/Ask"
    bad, ok = {C.INVALID_ARGUMENT}, {C.OK}
    cases: list[tuple[str, str, Any, set[grpc.StatusCode]]] = []
    for marker in gen.MARKERS[:4]:
        cases += [
            (f"question {marker}", path, ask(question=f"What {marker} moves?"), bad),
            (f"history question {marker}", path, ask(history=[pb.Turn(question=marker, answer="a")]), bad),
            (f"history answer {marker}", path, ask(history=[pb.Turn(question="q", answer=f"x{marker}")]), bad),
        ]
    cases += [
        ("question ''", path, ask(question=""), bad),
        ("question blank", path, ask(question=" \n\t "), bad),
        ("question 4001", path, ask(question="q" * 4001), bad),
        ("question 70000", path, ask(question="q" * 70_000), bad),
        ("question 4000", path, ask(question="q " * 2000), ok),
        ("question control", path, ask(question="\x00\x01\x1b[31m what?"), ok),
        ("question bidi", path, ask(question="\u202e\u200b\ufeff what?"), ok),
        ("question format", path, ask(question="%s%n{0}{__class__}"), ok),
        ("no streams", path, ask([]), bad),
        ("9 streams", path, ask([f"s{i}" for i in range(9)]), bad),
        ("duplicate streams", path, ask([KEEP[0], KEEP[0]]), bad),
        ("two streams", path, ask(list(KEEP)), ok),
        ("start nan", path, ask(range=pb.TimeRange(start=NAN)), bad),
        ("end nan", path, ask(range=pb.TimeRange(end=NAN)), bad),
        ("inverted", path, ask(range=pb.TimeRange(start=9.0, end=1.0)), bad),
        ("-inf..inf", path, ask(range=pb.TimeRange(start=-INF, end=INF)), ok),
        ("negative range", path, ask(range=pb.TimeRange(start=-1e308, end=-1.0)), ok),
        ("wall 1e308", path, ask(range=pb.TimeRange(start=1e308, clock=pb.CLOCK_WALL)), ok),
        ("clock 7", path, ask(range=pb.TimeRange(start=0.0, clock=7)), bad),
        ("selection 9", path, ask(selection=9), bad),
        ("retrieval", path, ask(selection=pb.SELECTION_RETRIEVAL, max_frames=4), ok),
        ("max_frames 2**31-1", path, ask(max_frames=(1 << 31) - 1), bad),
        ("max_frames -4", path, ask(max_frames=-4), bad),
        ("max_frames 3", path, ask(max_frames=3), bad),
        ("max_frames 4", path, ask(max_frames=4), ok),
        ("max_frames 2048", path, ask(max_frames=2048), ok),
        ("max_new_tokens 2**31-1", path, ask(generation={"max_new_tokens": (1 << 31) - 1}), bad),
        ("max_new_tokens -1", path, ask(generation={"max_new_tokens": -1}), bad),
        ("dropout 1000", path, ask(dropout="x" * 1000), bad),
        ("dropout bogus", path, ask(dropout="bogus"), bad),
        ("dropout NUL", path, ask(dropout="\x00"), bad),
        ("dropout off", path, ask(dropout="off"), ok),
    ]
    sampling = [
        ({"temperature": NAN}, bad),
        ({"temperature": INF}, bad),
        ({"temperature": -1.0}, bad),
        ({"temperature": 0.0}, bad),
        ({"temperature": 1e-45}, bad),
        ({"temperature": 1e-3}, ok),
        ({"top_p": NAN}, bad),
        ({"top_p": -0.5}, bad),
        ({"top_p": 0.0}, ok),
        ({"top_p": 2.0}, bad),
        ({"top_p": 0.9}, ok),
        ({"top_k": -5}, bad),
        ({"top_k": (1 << 31) - 1}, ok),
        ({"repetition_penalty": 0.0}, bad),
        ({"repetition_penalty": -1.0}, bad),
        ({"repetition_penalty": NAN}, bad),
        ({"repetition_penalty": INF}, bad),
        ({"repetition_penalty": 1.3}, ok),
        ({"seed": -1}, ok | bad),
        ({"seed": (1 << 63) - 1}, ok),
        ({"seed": -(1 << 63)}, ok | bad),
    ]
    for settings, allowed in sampling:
        label = ", ".join(f"{k} {v!r}" for k, v in settings.items())
        cases.append((f"sampling {label}", path, ask(generation={"do_sample": True} | settings), allowed))
        if "temperature" not in settings and "top_p" not in settings and "top_k" not in settings:
            cases.append((f"greedy {label}", path, ask(generation=settings), allowed))
    turn = pb.Turn(question="q" * 2000, answer="a" * 2000)
    cases += [
        ("history 17 turns", path, ask(history=[pb.Turn(question="q", answer="a")] * 17), bad),
        ("history 300 turns", path, ask(history=[pb.Turn(question="q", answer="a")] * 300), bad),
        ("history turn 8001", path, ask(history=[pb.Turn(question="q" * 8001, answer="a")]), bad),
        ("history 64000 chars", path, ask(history=[turn] * 16), bad),
        ("history 16 short turns", path, ask(history=[pb.Turn(question="q?", answer="a.")] * 16), ok),
    ]

    def answered(label: str, outcome: Outcome) -> str | None:
        if outcome.code != C.OK:
            return None
        events = [pb.AskResponse.FromString(raw) for raw in outcome.responses]
        results = [e for e in events if e.WhichOneof("event") == "result"]
        if len(results) != 1 or events[-1] is not results[0]:
            return f"expected text then one result, got {[e.WhichOneof('event') for e in events]}"
        return None

    check(fuzz_server, "ask", cases, answered)


def test_clips_with_impossible_values(fuzz_server: FuzzServer) -> None:
    """EncodeClips acknowledges every clip: a bad one with an error (and stored=False), a good one once stored."""
    method = BY_PATH["/vcflash.v1.Encoder/EncodeClips"]

    def clip(seq: int, h: int = 2, w: int = 2, **kw: Any) -> pb.EncodeClipRequest:
        values = {
            "stream_id": "fld-clip",
            "seq": seq,
            "media_times": [0.0, 0.5, 1.0, 1.5],
            "wall_times": [1.7e9, 1.7e9 + 0.5, 1.7e9 + 1, 1.7e9 + 1.5],
            "height": h,
            "width": w,
            "frames": bytes(4 * max(h, 0) * max(w, 0) * 3) if h * w < 1 << 20 else b"",
            "fps": 2.0,
        }
        return pb.EncodeClipRequest(**values | kw)

    bad = [
        ("seq -1", clip(-1)),
        ("height 0", clip(1, h=0)),
        ("width -1", clip(2, w=-1)),
        ("height 4097", clip(3, h=4097, frames=b"")),
        ("height 2**31-1", clip(4, h=(1 << 31) - 1, w=(1 << 31) - 1, frames=b"")),
        ("frames short", clip(5, frames=b"\x00" * 47)),
        ("frames long", clip(6, frames=b"\x00" * 49)),
        ("3 media times", clip(7, media_times=[0.0, 1.0, 2.0])),
        ("5 wall times", clip(8, wall_times=[1.0] * 5)),
        ("media nan", clip(9, media_times=[0.0, NAN, 1.0, 1.5])),
        ("wall inf", clip(10, wall_times=[1.7e9, INF, 1.7e9, 1.7e9])),
        ("fps 5e-324", clip(11, fps=5e-324)),
        ("fps nan", clip(12, fps=NAN)),
        ("fps 0", clip(13, fps=0.0)),
        ("name ../x", clip(14, stream_id="../x")),
        ("name 10 KB", clip(15, stream_id="x" * 10_240)),
        ("name empty", clip(16, stream_id="")),
    ]
    good = [("2x2", clip(100)), ("seq 2**63-1", clip((1 << 63) - 1)), ("1x4096", clip(101, h=1, w=4096))]
    failures = []
    for label, request in bad + good:
        expect_stored = (label, request) in good
        key = (request.stream_id, request.seq)
        outcome = call(
            fuzz_server.encoder_channel,
            method,
            [request.SerializeToString()],
            AUTH,
            timeout=30,
            until=lambda rs, key=key: any((a.stream_id, a.seq) == key for a in map(pb.EncodeClipAck.FromString, rs)),
        )
        TALLY.add("fields/encode_clips", f"{outcome.code.name} ({'stored' if expect_stored else 'error ack'})")
        acks = [pb.EncodeClipAck.FromString(r) for r in outcome.responses]
        if outcome.code != C.OK or not acks:
            failures.append(f"{label}: {outcome.code.name} {outcome.details[:100]!r}, no ack")
        elif acks[-1].stored != expect_stored or (not expect_stored and not acks[-1].error):
            failures.append(f"{label}: ack {acks[-1]}")
        elif len(acks[-1].error) > 600 or leaks(acks[-1].error):
            failures.append(f"{label}: a {len(acks[-1].error)}-character error")
    assert not failures, "\n".join(failures)


def test_server_intact_after_this_module(fuzz_server: FuzzServer) -> None:
    check_invariants(fuzz_server)
