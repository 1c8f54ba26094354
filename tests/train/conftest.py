"""Fixtures for the training tests: a random tiny checkpoint, a few 8-second 1-fps videos and a data file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hico.checkpoint import make_tiny_checkpoint
from vcflash.media import write_test_video

VIDEOS = 3


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny", seed=0)


@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("videos")
    return [write_test_video(root / f"v{i}.mp4", seconds=8 + 4 * i, fps=1, size=(64, 48)) for i in range(VIDEOS)]


def conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture(scope="session")
def data(videos: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two questions per video, answers that depend on the video (its length), in the official format."""
    lines = []
    for i, v in enumerate(videos):
        lines.append({"id": f"{i}-a", "video": str(v), "conversations": conversation("What colour is it?", "red")})
        length = ["short", "medium", "long"][i]
        lines.append({"id": f"{i}-b", "video": str(v), "conversations": conversation("How long is it?", length)})
    return write_lines(tmp_path_factory.mktemp("data") / "train.jsonl", lines)
