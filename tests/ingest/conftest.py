"""Small real videos, written once per test session by PyAV."""

from __future__ import annotations

from pathlib import Path

import pytest

from vcflash.media import write_test_video

SIZE = (64, 48)  # width, height: small, so writing and decoding take milliseconds


@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {
        "20s": write_test_video(root / "20s.mp4", seconds=20, fps=25, size=SIZE),
        "2s": write_test_video(root / "2s.mp4", seconds=2, fps=25, size=SIZE),
        "2s_ts": write_test_video(root / "2s.ts", seconds=2, fps=25, size=SIZE),
    }
