"""The shipped `tiny` model answers right: the README's first command, the held-out accuracy targets, and the same
answers offline (`vcflash ask`'s path) and through `vcflash up` + `ask-live` on the same videos streamed in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from hico import VideoChatFlash
from hico.checkpoint import resolve_checkpoint
from hico.dataset import FrameCache, read_samples
from hico.relevance import default_layer
from hico.train import Batcher, TrainConfig, chunk_by_video, moment_scores
from tests.conftest import free_port
from vcflash.shapes import make_dataset

ROOT = Path(__file__).resolve().parents[2]
# What the shipped model must answer right on the held-out split: issue 10's targets (measured 2026-12-03, stage 4e:
# colour 99.7%, shape 99.7%, presence 99.2%, count 100%, order 87.8%; README, Fine-tuning). Direction and the
# free-text description are reported, not targeted: the shipped model does not know which way a shape moves.
TARGETS = {"colour": 0.95, "shape": 0.95, "presence": 0.95, "count": 0.90, "order": 0.85}
# How often the key index ranks an answering clip first among a long video's 8-32 clips (README, Fine-tuning,
# --relevance); the model before its relevance stage: 36% on the held-out brief set (chance about 10%).
RANKED_VIDEOS, RANKED_TOP1 = 20, 0.70


def vcflash(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "vcflash.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_readme_first_command_answers_right(tmp_path: Path) -> None:
    made = vcflash("make-test-video", "demo.mp4", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    for question, answer in [
        ("What colour is the circle?", "red"),
        ("What shape is the blue object?", "square"),
        ("How many shapes appear in the video?", "2"),
        ("Which appears first, the blue square or the red circle?", "the red circle"),
    ]:
        run = vcflash("ask", "demo.mp4", question, "--model", "tiny", "--json", cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        record = json.loads(run.stdout)
        assert (record["answer"], record["stop"]) == (answer, "eos"), question


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recipe's held-out split (seed 0's test stream: no training scene), every video written."""
    out = tmp_path_factory.mktemp("held_out")
    make_dataset(out, videos=0, test_videos=200, seed=0)
    return out / "test.jsonl"


@pytest.mark.slow
def test_held_out_accuracy_meets_the_targets(held_out: Path) -> None:
    run = vcflash("eval", "qa", str(held_out), "--model", "tiny", "--json", cwd=held_out.parent, timeout=1800)
    assert run.returncode == 0, run.stderr
    rows = {r["category"]: r for r in json.loads(run.stdout)["categories"]}
    for category, target in TARGETS.items():
        assert rows[category]["accuracy"] >= target, (category, rows[category])
        assert rows[category]["accuracy"] > rows[category]["chance"] + 0.2


def test_the_key_index_finds_the_brief_event(tmp_path: Path) -> None:
    """The shipped model's relevance (what Ask's `index` selection ranks clips by) puts a clip that answers first among
    each video's clips, on long videos held out from its training (seed 0's test stream of the brief set)."""
    make_dataset(tmp_path, videos=0, test_videos=RANKED_VIDEOS, seed=0, kind="brief")
    model = VideoChatFlash.from_pretrained(resolve_checkpoint("tiny"))
    batcher = Batcher(model, TrainConfig(data="-", model="-", out="-"), FrameCache(model.config.vision.image_size, 512))
    samples = read_samples(tmp_path / "test.jsonl")
    first = []
    with torch.no_grad():
        for chunk in chunk_by_video(samples, 16):
            [batch] = batcher.build([chunk], np.random.default_rng(0))
            scores = moment_scores(model, batch, default_layer(model.config.text), grad=False)
            first += [int(s.argmax()) in clips for s, (_, clips) in zip(scores, batch.moments, strict=True)]
    assert len(first) >= 3 * RANKED_VIDEOS and np.mean(first) >= RANKED_TOP1, np.mean(first)


@pytest.fixture(scope="module")
def streamed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out scenes at 1 fps, so that streaming at 1 fps samples the very frames `ask` samples."""
    out = tmp_path_factory.mktemp("streamed")
    make_dataset(out, videos=0, test_videos=6, fps=(1,), seed=0)
    return out / "test.jsonl"


@pytest.fixture(scope="module")
def server(streamed: Path) -> Iterator[dict[str, str]]:
    tmp = streamed.parent
    env = {k: v for k, v in os.environ.items() if k != "VCFLASH_API_TOKEN"} | {
        "VCFLASH_DATA_DIR": str(tmp / "data"),
        "VCFLASH_ADDRESS": f"127.0.0.1:{free_port()}",
        "VCFLASH_METRICS_PORT": "0",
        "VCFLASH_HTTP_PORT": "0",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "2",
    }
    with open(tmp / "up.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vcflash.cli", "up", "--model", "tiny", "--media-root", str(tmp)],
            cwd=tmp,
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        wait = vcflash("wait", "--timeout", "120", cwd=tmp, env=env)
        assert wait.returncode == 0, (wait.stderr, (tmp / "up.log").read_text())
        yield env
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_offline_and_live_give_the_same_answers(streamed: Path, server: dict[str, str]) -> None:
    tmp = streamed.parent
    offline = vcflash("eval", "qa", str(streamed), "--model", "tiny", "--json", cwd=tmp)
    # The shipped model was trained without ask-live's wall-clock span in the prompt (README, Fine-tuning): asked
    # live without it, it must see exactly what `ask` shows it.
    live = vcflash("eval", "qa", str(streamed), "--live", "--no-anchors", "--json", cwd=tmp, env=server)
    assert offline.returncode == 0, offline.stderr
    assert live.returncode == 0, live.stderr
    a, b = json.loads(offline.stdout), json.loads(live.stdout)
    answers = [(x["where"], x["answer"]) for x in a["answers"]]
    assert answers == [(x["where"], x["answer"]) for x in b["answers"]]
    assert len(answers) == len(read_samples(streamed)) and all(x for _, x in answers)
    rows = {r["category"]: r for r in a["categories"]}
    targeted = [rows[c] for c in ("colour", "shape", "presence", "count") if c in rows]
    right = sum(r["right"] for r in targeted) / sum(r["questions"] for r in targeted)
    assert right >= 0.9, a["categories"]
