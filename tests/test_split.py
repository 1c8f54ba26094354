"""The split deployment as real processes: redis-server, `vcflash encoder`, `vcflash reasoner`, `vcflash ingest`.

The encoder is killed with SIGKILL in the middle of a stream and started again: every clip ingest made must
end up stored exactly once, refilled from ingest's unacknowledged window, and an Ask then cites them all.
"""

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from PIL import Image

from hico.checkpoint import make_tiny_checkpoint
from vcflash.client import Client
from vcflash.media import write_test_video

TOKEN = "split-secret-0c4b9e2f"
VCFLASH = str(Path(sys.executable).parent / "vcflash")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def serving(port: int) -> bool:
    result = subprocess.run([VCFLASH, "health", "--address", f"127.0.0.1:{port}"], capture_output=True, text=True)
    return result.returncode == 0


class Deployment:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.checkpoint = make_tiny_checkpoint(tmp / "tiny")
        self.ports = {name: free_port() for name in ("redis", "ingest", "encoder", "reasoner")}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = os.environ | {
            "VCFLASH_API_TOKEN": TOKEN,
            "VCFLASH_REDIS_URL": f"redis://127.0.0.1:{self.ports['redis']}/0",
            "VCFLASH_ENCODER_ADDRESS": f"127.0.0.1:{self.ports['encoder']}",
            "VCFLASH_DATA_DIR": str(tmp / "data"),
            "VCFLASH_METRICS_PORT": "0",
            "VCFLASH_MAX_WAIT_MS": "10",
            "VCFLASH_HTTP_PORT": "0",
            "VCFLASH_MEDIA_ROOT": "/",  # the test video lives in pytest's temp dir
        }

    def start(self, name: str) -> None:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        if name == "redis":
            args = ["redis-server", "--port", str(self.ports["redis"]), "--bind", "127.0.0.1", "--save", ""]
            args += ["--appendonly", "yes", "--dir", str(self.tmp)]
        else:
            args = [VCFLASH, name, "--port", str(self.ports[name])]
            args += ["--frame-size", "224"] if name == "ingest" else ["--model", str(self.checkpoint)]
        self.procs[name] = subprocess.Popen(args, env=self.env, stdout=log, stderr=log)
        if name != "redis":
            wait_for(lambda: serving(self.ports[name]), 60, f"{name} to serve")

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def client(self, name: str) -> Client:
        return Client(f"127.0.0.1:{self.ports[name]}", TOKEN)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (.ci/run installs it)")
    d = Deployment(tmp_path_factory.mktemp("split"))
    try:
        d.start("redis")
        for name in ("encoder", "reasoner", "ingest"):
            d.start(name)
        yield d
    finally:
        d.stop()


def test_split_deployment_answers_and_survives_an_encoder_crash(deployment: Deployment, tmp_path: Path) -> None:
    video = write_test_video(tmp_path / "v.mp4", seconds=12, fps=10, size=(96, 64))
    with deployment.client("ingest") as ingest:
        ingest.add_stream("cam", str(video), fps=4, realtime=True)  # 48 frames -> 12 clips over 12 s
        wait_for(lambda: ingest.stream("cam").clips_stored >= 2, 20, "the first clips to be stored")
        deployment.kill("encoder")
        time.sleep(2.5)  # clips keep coming and wait, unacknowledged, in ingest's window
        assert ingest.stream("cam").clips_stored < 12
        deployment.start("encoder")
        wait_for(lambda: ingest.stream("cam").state == "finished", 30, "the stream to finish")
        status = ingest.stream("cam")
        wait_for(lambda: ingest.stream("cam").clips_stored == status.clips_emitted, 30, "every clip to be stored")
        status = ingest.stream("cam")
        assert status.clips_emitted == 12 and sum(status.frames_dropped.values()) == 0
        seqs = [c.seq for c in ingest.clips("cam")]
        assert seqs == list(range(12))  # none lost, none duplicated
        # each clip's thumbnail came over the link with it: its middle frame, 320 px wide, the source's aspect
        thumbnails = list(ingest.thumbnails("cam"))
        assert [t.clip.seq for t in thumbnails] == seqs
        assert {Image.open(io.BytesIO(t.jpeg)).size for t in thumbnails} == {(320, 213)}

    with deployment.client("reasoner") as reasoner:
        events = list(reasoner.ask(["cam"], "What moves?", max_new_tokens=3))
        result = events[-1]
        assert [e.clip.seq for e in result.evidence] == list(range(12))
        assert result.frames == 48 and result.visual_tokens == 12 * 64
        with pytest.raises(grpc.RpcError) as err:
            list(reasoner.ask(["nope"], "What moves?"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_deleting_a_running_stream_leaves_nothing_behind(deployment: Deployment, tmp_path: Path) -> None:
    video = write_test_video(tmp_path / "v.mp4", seconds=6, fps=10, size=(96, 64))
    with deployment.client("ingest") as ingest:
        ingest.add_stream("gone", str(video), fps=8, realtime=True)  # a clip every half second
        wait_for(lambda: ingest.stream("gone").clips_stored >= 1, 20, "a clip stored")
        ingest.remove_stream("gone", delete_memory=True)
        time.sleep(1.0)  # anything still in flight would land by now
        with pytest.raises(grpc.RpcError) as err:
            ingest.clips("gone")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
