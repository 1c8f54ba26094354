"""The `vcflash` console script, run as a user would run it.

Each real process costs a few seconds (torch and transformers imports), so every command runs once, in a
module fixture, in two waves of concurrent processes (the second needs the video and the checkpoint
the first writes). Every `--model tiny` process gets its own VCFLASH_CACHE so none races another
building the tiny checkpoint. Further variations and error paths call `vcflash.cli.main` in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import av
import pytest

QUESTION = "What happens?"
SECONDS = 12
FPS = 25


@dataclass
class Run:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        assert self.returncode == 0, self.stderr
        return json.loads(self.stdout)

    def error(self) -> str:
        """The one-line error a failing command must print, checked for the exit status and no traceback."""
        assert self.returncode == 2, (self.stdout, self.stderr)
        assert "Traceback" not in self.stderr
        lines = self.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("vcflash: error: "), self.stderr
        return lines[-1]


def vcflash() -> list[str]:
    script = Path(sys.executable).parent / "vcflash"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vcflash.cli"]


def run_concurrently(commands: dict[str, tuple[list[str], Path]], tmp: Path) -> dict[str, Run]:
    """Start every command at once (each with VCFLASH_CACHE set to its own dir), then collect them."""
    procs = {}
    for name, (args, cache) in commands.items():
        env = os.environ | {"VCFLASH_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        procs[name] = subprocess.Popen(
            [*vcflash(), *args], cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    runs = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        runs[name] = Run(proc.args, proc.returncode, out, err)
    return runs


@dataclass
class Paths:
    tmp: Path
    video: Path
    hd_model: Path
    not_a_video: Path
    no_config: Path

    def cache(self, name: str) -> Path:
        return self.tmp / f"cache-{name}"


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    tmp = tmp_path_factory.mktemp("cli")
    not_a_video = tmp / "notes.mp4"
    not_a_video.write_text("this is a text file, not an MP4\n" * 20)
    no_config = tmp / "empty-model"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    return Paths(tmp, tmp / "clip.mp4", tmp / "tiny-hd", not_a_video, no_config)


@pytest.fixture(scope="module")
def runs(paths: Paths) -> dict[str, Run]:
    p = paths
    ask = ["ask", "--json", "--max-new-tokens", "4"]
    first = run_concurrently(
        {
            "make_video": (["make-test-video", str(p.video), "--seconds", str(SECONDS)], p.cache("make_video")),
            "make_tiny": (["make-tiny-checkpoint", str(p.hd_model), "--res", "448"], p.cache("make_tiny")),
            "no_config": ([*ask, str(p.not_a_video), QUESTION, "--model", str(p.no_config)], p.cache("no_config")),
        },
        p.tmp,
    )
    tiny = [*ask, "--model", "tiny"]
    second = run_concurrently(
        {
            "basic": ([*tiny, str(p.video), QUESTION], p.cache("basic")),
            "hd": ([*ask, str(p.video), QUESTION, "--model", str(p.hd_model), "--start", "2", "--end", "10"], p.tmp),
        },
        p.tmp,
    )
    return first | second


@pytest.fixture
def main_in_process(
    runs: dict[str, Run], paths: Paths, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """`vcflash.cli.main` in this process, for the variations and error paths past the first real runs (a
    process each would cost seconds). An exception escaping `main` fails the test, so exit status 2 here
    means no traceback there."""
    from vcflash.cli import main

    monkeypatch.setenv("VCFLASH_CACHE", str(paths.cache("basic")))  # the tiny checkpoint `basic` made

    def call(*args: str) -> Run:
        code = main(list(args))
        out, err = capsys.readouterr()
        return Run(list(args), code, out, err)

    return call


def test_make_test_video(runs: dict[str, Run], paths: Paths) -> None:
    run = runs["make_video"]
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(paths.video)
    with av.open(str(paths.video)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert (stream.width, stream.height) == (320, 240)
        assert float(stream.average_rate) == FPS
        assert stream.frames == SECONDS * FPS


def test_ask_tiny_json(runs: dict[str, Run], paths: Paths) -> None:
    record = runs["basic"].json()
    assert isinstance(record["answer"], str)
    # 12 s at 25 fps = 300 frames: one frame per second would be 8 (whole 8-frame windows), raised to the
    # 64-frame floor; 16 clips of 4 frames, 16 tokens per frame after merging.
    assert record["frames"] == 64
    assert record["duration_s"] == 12.0
    assert record["visual_tokens"] == 64 * 16
    assert record["prompt_tokens"] > record["visual_tokens"]
    assert 1 <= record["new_tokens"] <= 4
    assert record["stop"] in {"eos", "length", "blank", "repeat"}  # why generation ended (issue 8 item 11)
    assert record["dropout"] is None  # the tiny checkpoint ships with compression off, like the release
    assert {"decode_video", "encode", "prefill", "generate"} <= record["timings_s"].keys()
    assert all(v >= 0 for v in record["timings_s"].values())
    # --model tiny is the trained tiny model shipped in the package: nothing is made under VCFLASH_CACHE
    assert not paths.cache("basic").exists() or not any(paths.cache("basic").iterdir())


def test_ask_max_frames_and_compress_spec(main_in_process, runs: dict[str, Run], paths: Paths) -> None:
    run = main_in_process(
        "ask",
        str(paths.video),
        QUESTION,
        "--model",
        "tiny",
        "--json",
        "--max-new-tokens",
        "4",
        "--max-frames",
        "16",
        "--compress",
        "uniform0_attention:1,2:1,0.5,0.25",
    )
    record = run.json()
    # --max-frames 16 lowers the floor to 16 too: 8 frames at 1 fps, raised to 16.
    assert record["frames"] == 16
    assert record["duration_s"] == 12.0
    assert record["visual_tokens"] == 16 * 16
    assert record["dropout"] == {"type": "uniform0_attention", "layers": [1, 2], "ratios": [1.0, 0.5, 0.25]}
    assert 1 <= record["new_tokens"] <= 4
    # same text ("16" and "64" are two digit tokens each), 48 frames fewer at 16 tokens each
    assert record["prompt_tokens"] == runs["basic"].json()["prompt_tokens"] - (64 - 16) * 16


def test_make_tiny_checkpoint_448_and_ask_a_range(runs: dict[str, Run], paths: Paths) -> None:
    made = runs["make_tiny"]
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == str(paths.hd_model)
    config = json.loads((paths.hd_model / "config.json").read_text())
    assert config["mm_vision_tower"] == "umt-hd-large"
    assert config["mm_vision_config"]["image_size"] == 448
    record = runs["hd"].json()
    # 2..10 s is 200 frames: still raised to the 64-frame floor; the time message covers 8 s.
    assert record["frames"] == 64
    assert record["duration_s"] == 8.0
    assert record["visual_tokens"] == 64 * 16  # 16 tokens per frame whatever the resolution
    assert 1 <= record["new_tokens"] <= 4


def test_recommended_compression_does_not_fit_four_layers(main_in_process, paths: Paths) -> None:
    run = main_in_process("ask", str(paths.video), QUESTION, "--model", "tiny", "--compress", "recommended")
    message = run.error()
    assert "drop layer 18" in message
    assert "4 layers" in message
    assert run.stdout == ""


def test_bogus_compression(main_in_process, paths: Paths) -> None:
    run = main_in_process("ask", str(paths.video), QUESTION, "--model", "tiny", "--compress", "bogus")
    message = run.error()
    assert "'bogus'" in message
    assert "TYPE:LAYERS:RATIOS" in message
    assert run.stdout == ""


def test_missing_video_file(main_in_process, paths: Paths) -> None:
    missing = paths.tmp / "nope.mp4"
    run = main_in_process("ask", str(missing), QUESTION, "--model", "tiny")
    message = run.error()
    assert str(missing) in message
    assert "not found" in message
    assert run.stdout == ""


def test_text_file_named_mp4(main_in_process, paths: Paths) -> None:
    run = main_in_process("ask", str(paths.not_a_video), QUESTION, "--model", "tiny")
    message = run.error()
    assert str(paths.not_a_video) in message
    assert "not a readable video" in message
    assert run.stdout == ""


def test_bad_dtype(main_in_process, paths: Paths) -> None:
    run = main_in_process("ask", str(paths.video), QUESTION, "--model", "tiny", "--dtype", "int8")
    assert "'int8'" in run.error()
    assert run.stdout == ""


def test_model_dir_without_config(runs: dict[str, Run], paths: Paths) -> None:
    run = runs["no_config"]  # a real process: exit status 2, one line, no traceback
    message = run.error()
    assert str(paths.no_config) in message
    assert "config.json" in message
    assert run.stdout == ""


def test_usage_errors_exit_2(paths: Paths) -> None:
    """argparse errors (no traceback either); cheap, no model import."""
    result = subprocess.run(
        [*vcflash(), "make-tiny-checkpoint", str(paths.tmp / "x"), "--res", "336"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "invalid choice: 336" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (paths.tmp / "x").exists()
