"""The fuzz suite's server and the checks every module shares.

One server process for the session (`tests/fuzz/server.py`: `vcflash up` with the tiny model, and the Encoder
service beside it), holding secrets to look for (the API token, the secret key, a camera's credentials) and streams
whose stored clips are counted before and after. Calls go through generic gRPC methods with identity serializers,
so any bytes can be sent; every outcome is tallied by class and status code, and checked for secrets on the way.
All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from ingest.source import check_source
from protos.vcflash.v1 import vcflash_pb2 as pb
from tests.listener import Listener
from vcflash.media import write_test_video

TOKEN = "fuzz-api-token-3b9e07c41d5a"
SECRET_KEY = base64.urlsafe_b64encode(b"fuzz-secret-key-never-printed-!!").decode()
CAM_USER = "fuzzcam-user-81f"
CAM_PASSWORD = "Cam-Passw0rd-7e1d9"
CAM_TOKEN = "Cam-Query-Token-55aa"
ODD_PASSWORD = "Odd-Secret-c0ffee"  # credentials in odd shapes (tests/fuzz/test_fuzz_sources.py)
SECRETS = (TOKEN, SECRET_KEY, CAM_USER, CAM_PASSWORD, CAM_TOKEN, ODD_PASSWORD)
AUTH = (("authorization", f"Bearer {TOKEN}"),)
KEEP = ("keep-alpha", "keep-bravo")  # finished file streams: their stored clips must never change
LIVE = "keep-live"  # a looping file stream that must keep running, losing no clip uncounted
CAMERA = "keep-camera"  # an RTSP camera with credentials, reconnecting to a listener that hangs up
PROTECTED = (*KEEP, LIVE, CAMERA)
MAX_MESSAGE_BYTES = 1 << 20  # the server's limit (VCFLASH_MAX_MESSAGE_BYTES), so oversized cases stay cheap
HTTP_MAX_CONNECTIONS = 24
HTTP_TIMEOUT_S = 1.0
READY_TIMEOUT_S = 120.0
T = TypeVar("T")
OK = grpc.StatusCode.OK


# ---------------------------------------------------------------- tallies


@dataclass
class Tally:
    """Cases and status codes by fuzz class, for the session summary (and BENCHMARKS.md)."""

    codes: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    not_sent: Counter[str] = field(default_factory=Counter)  # generated, but against the suite's rules
    started: float = field(default_factory=time.monotonic)

    def add(self, cls: str, code: object) -> None:
        """One case sent, and what came back: a gRPC status, an HTTP status, a stream's end state."""
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        self.codes[cls][name] += 1

    def skip(self, cls: str) -> None:
        self.not_sent[cls] += 1

    def lines(self) -> list[str]:
        total = sum(sum(c.values()) for c in self.codes.values())
        out = [f"fuzz: {total} cases in {time.monotonic() - self.started:.1f} s"]
        for cls in sorted(self.codes):
            c = self.codes[cls]
            out.append(f"  {cls}: {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in sorted(c.items()))})")
        if self.not_sent:
            out.append(f"  not sent (off loopback, or naming a protected stream): {dict(self.not_sent)}")
        return out


TALLY = Tally()


# ---------------------------------------------------------------- secrets


def leaks(*texts: str | bytes | None) -> list[str]:
    """The secrets found in `texts` (as text, and as raw bytes)."""
    found = []
    for secret in SECRETS:
        needle = secret.encode()
        for text in texts:
            if text is None:
                continue
            raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
            if needle in raw:
                found.append(secret)
                break
    return found


# ---------------------------------------------------------------- loopback listeners


# ---------------------------------------------------------------- the server


@dataclass
class FuzzServer:
    """The running server process, its addresses, and what was stored before the fuzzing began."""

    proc: subprocess.Popen[bytes]
    work: Path
    media: Path
    grpc_port: int
    encoder_port: int
    http_port: int
    sink: Listener  # where accepted camera URLs point (the camera with credentials among them)
    channel: grpc.Channel
    encoder_channel: grpc.Channel
    baseline: dict[str, list[int]] = field(default_factory=dict)  # stream -> stored seqs

    @property
    def stderr(self) -> Path:
        return self.work / "server.stderr"

    @property
    def data_dir(self) -> Path:
        return self.work / "data"

    def log_text(self) -> str:
        return self.stderr.read_text("utf-8", "replace")

    def channel_for(self, path: str) -> grpc.Channel:
        return self.encoder_channel if path.startswith("/vcflash.v1.Encoder/") else self.channel

    # -- typed calls for setup and checks

    def unary(self, path: str, request: object, response: type[T], timeout: float = 10.0) -> T:
        raw = self.channel.unary_unary(path)(request.SerializeToString(), metadata=AUTH, timeout=timeout)  # type: ignore[attr-defined]
        return response.FromString(raw)  # type: ignore[attr-defined]

    def status(self, name: str) -> pb.StreamStatus:
        return self.unary("/vcflash.v1.Ingest/GetStream", pb.GetStreamRequest(stream_id=name), pb.StreamStatus)

    def streams(self) -> list[pb.StreamStatus]:
        return list(
            self.unary("/vcflash.v1.Ingest/ListStreams", pb.ListStreamsRequest(), pb.ListStreamsResponse).streams
        )

    def add(self, name: str, source: str, **kw: object) -> pb.StreamStatus:
        request = pb.AddStreamRequest(stream_id=name, source=source, **kw)  # type: ignore[arg-type]
        return self.unary("/vcflash.v1.Ingest/AddStream", request, pb.StreamStatus)

    def remove(self, name: str, delete_memory: bool = True) -> None:
        request = pb.RemoveStreamRequest(stream_id=name, delete_memory=delete_memory)
        self.unary("/vcflash.v1.Ingest/RemoveStream", request, pb.RemoveStreamResponse, timeout=20)

    def seqs(self, name: str) -> list[int]:
        request = pb.ListClipsRequest(stream_id=name)
        return [c.seq for c in self.unary("/vcflash.v1.Memory/ListClips", request, pb.ListClipsResponse).clips]

    def stored(self, name: str) -> int:
        response = self.unary("/vcflash.v1.Memory/GetStats", pb.GetStatsRequest(stream_id=name), pb.GetStatsResponse)
        return response.streams[0].clips

    def health(self, channel: grpc.Channel | None = None, service: str = "") -> int:
        raw = (channel or self.channel).unary_unary("/grpc.health.v1.Health/Check")(
            health_pb2.HealthCheckRequest(service=service).SerializeToString(), timeout=10
        )
        return health_pb2.HealthCheckResponse.FromString(raw).status

    def remove_fuzz_streams(self) -> None:
        """Every stream a fuzz case added (all but the protected ones), memory included."""
        for s in self.streams():
            if s.stream_id not in PROTECTED:
                try:
                    self.remove(s.stream_id)
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                        raise


def wait_for(check: Callable[[], T], what: str, timeout_s: float = 30.0, every_s: float = 0.05) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: Path) -> FuzzServer:
    """Start the server process, then the protected streams, and record what they stored."""
    media = work / "media"
    media.mkdir(parents=True)
    write_test_video(media / "keep.mp4", seconds=8, fps=25, size=(64, 48))
    http_port = free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("VCFLASH_")}  # no Redis URL of anyone's
    env = inherited | {
        "VCFLASH_ADDRESS": "127.0.0.1:0",
        "VCFLASH_HTTP_PORT": str(http_port),
        "VCFLASH_METRICS_PORT": "0",
        "VCFLASH_API_TOKEN": TOKEN,
        "VCFLASH_SECRET_KEY": SECRET_KEY,
        "VCFLASH_DATA_DIR": str(work / "data"),
        "VCFLASH_MEDIA_ROOT": str(media),
        "VCFLASH_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
        "VCFLASH_HTTP_MAX_CONNECTIONS": str(HTTP_MAX_CONNECTIONS),
        "VCFLASH_HTTP_TIMEOUT_S": str(HTTP_TIMEOUT_S),
        "VCFLASH_SOURCE_TIMEOUT_S": "2",
        "VCFLASH_STOP_TIMEOUT_S": "3",
        "VCFLASH_MAX_STREAMS": "48",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    script = Path(__file__).with_name("server.py")
    with open(work / "server.stdout", "wb") as out, open(work / "server.stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, str(script), str(work)], stdout=out, stderr=err, env=env)

    def ready() -> dict[str, int] | None:
        if proc.poll() is not None:
            tail = (work / "server.stderr").read_text("utf-8", "replace")[-3000:]
            raise AssertionError(f"the fuzz server exited with {proc.returncode}:\n{tail}")
        line = (work / "server.stdout").read_text()
        return json.loads(line) if line.endswith("\n") else None

    try:
        ports = wait_for(ready, "the fuzz server", READY_TIMEOUT_S, 0.1)
    except BaseException:
        proc.kill()
        raise
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    server = FuzzServer(
        proc=proc,
        work=work,
        media=media,
        grpc_port=ports["grpc"],
        encoder_port=ports["encoder"],
        http_port=http_port,
        sink=Listener(hang_up=True),
        channel=grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}", options=options),
        encoder_channel=grpc.insecure_channel(f"127.0.0.1:{ports['encoder']}", options=options),
    )
    try:
        for name in KEEP:
            server.add(name, "keep.mp4", fps=2, realtime=False)
        server.add(LIVE, "keep.mp4", fps=4, realtime=True, loop=True)
        camera = f"rtsp://{CAM_USER}:{CAM_PASSWORD}@127.0.0.1:{server.sink.port}/live/ch1?token={CAM_TOKEN}"
        server.add(CAMERA, camera, fps=1)
        for name in KEEP:
            wait_for(lambda n=name: finished_and_stored(server, n), f"{name} to be stored")
            server.baseline[name] = server.seqs(name)
            assert len(server.baseline[name]) == 4, server.baseline[name]  # 16 frames at 2 fps: 4 clips
        wait_for(lambda: server.sink.connections > 0, "the camera to try its source")
        wait_for(lambda: server.seqs(LIVE), "the live stream's first clip")
    except BaseException:
        stop_server(server)
        raise
    return server


def finished_and_stored(server: FuzzServer, name: str) -> bool:
    s = server.status(name)
    return s.state == "finished" and s.clips_stored == s.clips_emitted > 0


def stop_server(server: FuzzServer) -> int | None:
    server.channel.close()
    server.encoder_channel.close()
    server.sink.close()
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(5)
    return server.proc.returncode


# ---------------------------------------------------------------- raw gRPC calls


@dataclass(frozen=True)
class Method:
    """One RPC: its path, call shape and request type, from a service descriptor."""

    service: str
    name: str
    desc: MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def request_streaming(self) -> bool:
        return self.desc.client_streaming

    @property
    def response_streaming(self) -> bool:
        return self.desc.server_streaming


def methods(services: Iterable[ServiceDescriptor]) -> list[Method]:
    return [Method(s.full_name, m.name, m) for s in services for m in s.methods]


SERVICES = [
    *pb.DESCRIPTOR.services_by_name.values(),
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
]
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")  # no token needed


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str = ""
    responses: list[bytes] = field(default_factory=list)
    trailers: str = ""

    def texts(self) -> list[str | bytes]:
        return [self.details, self.trailers, *self.responses]


def _outcome(e: grpc.RpcError, responses: list[bytes]) -> Outcome:
    trailers = repr(e.trailing_metadata()) if hasattr(e, "trailing_metadata") else ""
    return Outcome(e.code(), e.details() or "", responses, trailers)  # type: ignore[attr-defined]


def call(
    channel: grpc.Channel,
    method: Method,
    requests: Sequence[bytes],
    metadata: Sequence[tuple[str, str]] | None = AUTH,
    timeout: float = 20.0,
    until: Callable[[list[bytes]], bool] | None = None,
) -> Outcome:
    """Send `requests` (raw bytes) to `method`; read responses to the end of the call, or until `until(responses)`
    says enough (then the call is cancelled, and the outcome is OK)."""
    path = method.path
    responses: list[bytes] = []
    try:
        if not method.request_streaming and not method.response_streaming:
            responses.append(channel.unary_unary(path)(requests[0], metadata=metadata, timeout=timeout))
            return Outcome(OK, responses=responses)
        if method.request_streaming and not method.response_streaming:  # nothing like it in vcflash yet
            responses.append(channel.stream_unary(path)(iter(requests), metadata=metadata, timeout=timeout))
            return Outcome(OK, responses=responses)
        if method.request_streaming:
            it: Iterator[bytes] = channel.stream_stream(path)(iter(requests), metadata=metadata, timeout=timeout)
        else:
            it = channel.unary_stream(path)(requests[0], metadata=metadata, timeout=timeout)
        if until is not None and until(responses):
            it.cancel()  # type: ignore[attr-defined]
            return Outcome(OK)
        for response in it:
            responses.append(response)
            if until is not None and until(responses):
                it.cancel()  # type: ignore[attr-defined]
                break
        return Outcome(OK, responses=responses)
    except grpc.RpcError as e:
        return _outcome(e, responses)


# ---------------------------------------------------------------- rules: loopback only, protected streams kept

_AUTHORITY = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)")


def loopback_only(source: str, media_root: object) -> bool:
    """Whether the server would open nothing but loopback for `source`: refused, a local file, or a URL whose host is a
    loopback address literal. Mutated cases that fail this are not sent (DNS names would be resolved)."""
    try:
        checked = check_source(source, media_root=media_root)  # type: ignore[arg-type]
    except ValueError:
        return True
    if checked.is_file:
        return True
    match = _AUTHORITY.match(checked.target)
    host = match[1].rpartition("@")[2] if match else ""
    host = host[1 : host.find("]")] if host.startswith("[") else host.partition(":")[0]
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def sources_in(msg: Message) -> list[str]:
    found = []
    for f, value in msg.ListFields():
        if f.name in ("source", "url", "uri") and isinstance(value, str):
            found.append(value)
        elif f.message_type is not None and not f.message_type.GetOptions().map_entry:
            for sub in value if f.is_repeated else [value]:
                found += sources_in(sub)
    return found


def names_in(msg: Message) -> list[str]:
    found = []
    for f, value in msg.ListFields():
        if f.name in ("stream_id", "stream_ids"):
            found += list(value) if f.is_repeated else [value]
    return found


def parse(method: Method, raw: bytes) -> Message | None:
    try:
        return message_factory.GetMessageClass(method.desc.input_type).FromString(raw)
    except DecodeError:
        return None


def sendable(method: Method, batch: Sequence[bytes], media_root: object) -> bool:
    """Whether sending `batch` respects the suite's rules: only loopback, and the protected streams untouched."""
    for raw in batch:
        msg = parse(method, raw)
        if msg is None:
            continue
        if not all(loopback_only(s, media_root) for s in sources_in(msg)):
            return False
        if set(names_in(msg)) & set(PROTECTED):
            return False
    return True


# ---------------------------------------------------------------- invariants


MAX_LOG_LINE = 4096
FORGED_LINE_STARTS = ("FLUSHALL", "X-Injected", "Host: evil", "QUIT", "Set-Cookie", "X:1")
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", re.M)  # the server's log line format


def tracebacks(log: str) -> list[str]:
    """The log records (a line with a timestamp and every line up to the next) that hold a traceback."""
    starts = [m.start() for m in RECORD.finditer(log)] + [len(log)]
    records = [log[a:b] for a, b in zip(starts, starts[1:], strict=False)]
    return [r for r in records if "Traceback (most recent call last)" in r]


def check_invariants(server: FuzzServer) -> None:
    """After a module: the process lives and serves, the protected streams lost nothing, no secret in any log or at
    rest unencrypted, no traceback logged."""
    assert server.proc.poll() is None, f"the server exited with {server.proc.returncode}"
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ["", *pb.DESCRIPTOR.services_by_name]:
        name = f"vcflash.v1.{service}" if service else ""
        if service != "Encoder":
            assert server.health(service=name) == serving, name
    assert server.health(server.encoder_channel, "vcflash.v1.Encoder") == serving
    for name, seqs in server.baseline.items():
        assert server.seqs(name) == seqs, f"{name}'s stored clips changed"
        assert server.stored(name) == len(seqs)
    live = server.status(LIVE)
    seqs = server.seqs(LIVE)
    missing = len(set(range(seqs[-1] + 1)) - set(seqs)) if seqs else 0
    dropped = sum(n for reason, n in live.frames_dropped.items() if reason != "decode_error")
    assert live.state == "running" and seqs, live
    assert missing * 4 <= dropped, f"{LIVE} lost {missing} clips that no drop counter accounts for: {seqs}"
    assert not leaks(str(server.streams()), str(server.status(CAMERA)))
    log = server.log_text()
    found = leaks(log, (server.work / "server.stdout").read_bytes())
    assert not found, f"secrets in the server's output: {found}"
    unexpected = tracebacks(log)
    assert not unexpected, f"{len(unexpected)} tracebacks in the server's log, the first:\n{unexpected[0][:4000]}"
    long_lines = [line[:200] for line in log.splitlines() if len(line) > MAX_LOG_LINE]
    assert not long_lines, f"log lines over {MAX_LOG_LINE} characters (client input logged whole?): {long_lines[:3]}"
    forged = [line for line in log.splitlines() if line.startswith(FORGED_LINE_STARTS)]
    assert not forged, f"log lines that start with client input (a CR/LF logged raw): {forged[:5]}"
    for path in server.data_dir.rglob("*"):
        if path.is_file():
            assert not leaks(path.read_bytes()), f"a secret in plain text at rest: {path}"
