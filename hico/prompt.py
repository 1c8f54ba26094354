"""The prompt: the qwen_2 ChatML template and the time message the model was trained with, for one video
or several cameras. Plain text, no torch: the model tokenizes the pieces and splices in visual tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
USER, ASSISTANT, END = "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n"
# Text that the template or the tokenizer gives a meaning: in a question or an earlier turn it would split the
# prompt at a second <image> or forge a turn of the conversation.
RESERVED_MARKERS = (IMAGE_PLACEHOLDER, "<|im_start|>", "<|im_end|>", "<|endoftext|>")


def find_marker(text: str) -> str | None:
    """The first reserved marker in `text`, or None."""
    return next((m for m in RESERVED_MARKERS if m in text), None)


@dataclass(frozen=True)
class PromptVideo:
    """One video as the prompt states it."""

    num_frames: int
    duration_s: float
    camera: str | None = None  # with several cameras: named before its tokens and in its time message
    wall_span: tuple[float, float] | None = None  # UTC seconds of its start and end, stated when given


def time_message(duration_s: float, num_frames: int) -> str:
    """The official 'short' time message the model was trained with."""
    return f"The video lasts for {duration_s:.2f} seconds, and {num_frames} frames are uniformly sampled from it."


def wall_clock(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def describe(video: PromptVideo) -> str:
    """The time message, led by the camera's name and followed by the wall-clock span when known."""
    msg = time_message(video.duration_s, video.num_frames)
    if video.camera is not None:
        msg = f'Camera "{video.camera}": ' + msg[0].lower() + msg[1:]
    if video.wall_span is not None:
        start, end = video.wall_span
        msg += f" It runs from {wall_clock(start)} to {wall_clock(end)} UTC."
    return msg


def chat_prompt(question: str, time_msg: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """The qwen_2 ChatML conversation; the video and its time message open the first user turn."""
    turns = [*history, (question, None)]
    text = SYSTEM_PROMPT
    for i, (q, a) in enumerate(turns):
        content = f"{IMAGE_PLACEHOLDER}\n{time_msg} {q}" if i == 0 else q
        text += f"{USER}{content}{END}{ASSISTANT}"
        if a is not None:
            text += f"{a}{END}"
    return text


def build_prompt(
    question: str, videos: Sequence[PromptVideo], history: Sequence[tuple[str, str]] = ()
) -> list[str | int]:
    """The prompt in pieces: text (str), each to be tokenized on its own as the official
    `tokenizer_image_token` splits at `<image>`, and video i's visual tokens (int i), in prompt order.

    One video gives the official prompt, [before, 0, after]. A named camera's tokens follow its label
    ('Camera "a":', on a new line after the previous camera's tokens).
    """
    if not question.strip():
        raise ValueError("the question is empty")
    for where, text in [("the question", question)] + [
        (f"history turn {i + 1}", q + a) for i, (q, a) in enumerate(history)
    ]:
        if (marker := find_marker(text)) is not None:
            raise ValueError(f"{where} contains the reserved prompt marker {marker}")
    time_msg = " ".join(describe(v) for v in videos)
    before, after = chat_prompt(question, time_msg, history).split(IMAGE_PLACEHOLDER)
    pieces: list[str | int] = [before]
    for i, video in enumerate(videos):
        if video.camera is not None:
            pieces.append(("\n" if i else "") + f'Camera "{video.camera}":')
        pieces.append(i)
    pieces.append(after)
    return pieces
