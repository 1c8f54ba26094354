"""hico.prompt: the pieces of the official prompt, with cameras and wall-clock spans, and no torch."""

import subprocess
import sys

import pytest

from hico.prompt import IMAGE_PLACEHOLDER, PromptVideo, build_prompt, chat_prompt, describe, time_message


def test_one_video_is_the_official_prompt_split_at_the_image() -> None:
    history = [("Q1?", "A1.")]
    before, video, after = build_prompt("Q2?", [PromptVideo(64, 12.0)], history)
    assert video == 0
    assert before + IMAGE_PLACEHOLDER + after == chat_prompt("Q2?", time_message(12.0, 64), history)


def test_cameras_are_labelled_before_their_tokens_and_in_the_time_message() -> None:
    a = PromptVideo(8, 8.0, camera="a", wall_span=(0.0, 8.0))
    b = PromptVideo(4, 4.0, camera="b")
    before, label_a, va, label_b, vb, after = build_prompt("Q?", [a, b])
    assert (label_a, va, label_b, vb) == ('Camera "a":', 0, '\nCamera "b":', 1)
    assert describe(a) == (
        'Camera "a": the video lasts for 8.00 seconds, and 8 frames are uniformly sampled from it.'
        " It runs from 1970-01-01 00:00:00 to 1970-01-01 00:00:08 UTC."
    )
    assert after.startswith(f"\n{describe(a)} {describe(b)} Q?")
    assert before == chat_prompt("Q?", "").split(IMAGE_PLACEHOLDER)[0]


def test_empty_question() -> None:
    with pytest.raises(ValueError, match="question is empty"):
        build_prompt("  ", [PromptVideo(4, 4.0)])


def test_prompt_and_pixels_import_without_torch() -> None:
    code = "import sys, hico.pixels, hico.prompt; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
