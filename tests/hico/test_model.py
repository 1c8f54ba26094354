"""The VideoChatFlash pipeline on a tiny checkpoint: prompt, splicing, streaming, chat entry points."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from hico import VideoChatFlash
from hico.checkpoint import make_tiny_checkpoint
from hico.prompt import PromptVideo, build_prompt, chat_prompt, time_message
from vcflash.media import write_test_video

QUESTION = "When does the red square reach the middle?"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> VideoChatFlash:
    return VideoChatFlash.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (16, 48, 64, 3), dtype=np.uint8)


def test_prompt_is_the_official_chatml_with_time_message() -> None:
    msg = time_message(12.345, 64)
    assert msg == "The video lasts for 12.35 seconds, and 64 frames are uniformly sampled from it."
    assert chat_prompt("Q?", msg) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<image>\n{msg} Q?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat_prompt("Q2?", msg, [("Q1?", "A1.")]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<image>\n{msg} Q1?<|im_end|>\n<|im_start|>assistant\nA1.<|im_end|>\n"
        "<|im_start|>user\nQ2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_prompt_halves_are_tokenized_separately(model: VideoChatFlash) -> None:
    before, after = (model.tokenize(p) for p in build_prompt("Q?", [PromptVideo(64, 12.0)]) if isinstance(p, str))
    tok = model.tokenizer
    assert before == tok("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n").input_ids
    assert tok.decode(after) == f"\n{time_message(12.0, 64)} Q?<|im_end|>\n<|im_start|>assistant\n"
    assert after[-2:] == tok("assistant\n").input_ids[-2:] or tok.decode(after[-1:]) == "\n"


def test_visual_tokens_are_spliced_without_separators(model: VideoChatFlash) -> None:
    visual = torch.randn(2, 64, 64)
    embeds, positions = model.embed([[1, 2, 3], visual, [4, 5]])
    assert embeds.shape == (1, 3 + 128 + 2, 64) and torch.equal(positions, torch.arange(3, 131))
    torch.testing.assert_close(embeds[0, 3:131], visual.reshape(128, 64))
    torch.testing.assert_close(embeds[0, 131], model.llm.model.embed_tokens.weight[4].detach())


def test_clip_by_clip_encoding_gives_the_whole_video_logits(model: VideoChatFlash, frames: np.ndarray) -> None:
    pixels = model.preprocess(frames)
    whole = model.encode_clips(pixels, batch_size=8)
    streamed = torch.cat([model.encode_clips(pixels[i : i + 4]) for i in range(0, 16, 4)])
    assert whole.shape == (4, 64, 64)
    a = model.logits(whole, QUESTION, duration_s=16.0)
    b = model.logits(streamed, QUESTION, duration_s=16.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_frames_tokens_and_file_give_the_same_answer(model: VideoChatFlash, frames: np.ndarray, tmp_path: Path) -> None:
    tokens = model.encode_clips(model.preprocess(frames))
    from_frames = model.answer(frames, QUESTION, duration_s=16.0, max_new_tokens=6)
    from_tokens = model.answer(tokens, QUESTION, duration_s=16.0, max_new_tokens=6)
    assert from_frames.token_ids == from_tokens.token_ids
    assert (from_frames.num_frames, from_frames.visual_tokens) == (16, 256)
    text = [p for p in build_prompt(QUESTION, [PromptVideo(16, 16.0)]) if isinstance(p, str)]
    assert from_frames.prompt_tokens == 256 + sum(len(model.tokenize(p)) for p in text)
    assert model.chat(tokens, QUESTION, duration_s=16.0, max_new_tokens=6) == from_tokens.text

    video = write_test_video(tmp_path / "v.mp4", seconds=10, fps=10, size=(64, 48))
    from_file = model.answer(video, QUESTION, max_new_tokens=3)
    assert (from_file.num_frames, from_file.duration_s) == (64, 10.0)  # the 64-frame floor
    assert {"decode_video", "encode", "prefill", "generate"} <= from_file.timings.keys()


def test_compress_changes_the_prefill_and_history_changes_the_prompt(model: VideoChatFlash, frames: np.ndarray) -> None:
    tokens = model.encode_clips(model.preprocess(frames))
    plain = model.logits(tokens, QUESTION, duration_s=16.0)
    dropped = model.logits(tokens, QUESTION, duration_s=16.0, compress="uniform0_attention:1,3:1,0.5,0.25")
    assert plain.shape[0] - dropped.shape[0] == 256 - 64  # 256 visual tokens -> 128 -> 64
    assert not torch.allclose(plain[-1], dropped[-1])
    assert model.logits(tokens, QUESTION, duration_s=16.0, compress="off").shape == plain.shape
    with_history = model.answer(tokens, "And then?", [(QUESTION, "At 8 seconds.")], 16.0, max_new_tokens=2)
    assert with_history.prompt_tokens > model.answer(tokens, "And then?", None, 16.0, max_new_tokens=2).prompt_tokens


def test_sampling_is_seeded_and_stops_at_max_new_tokens(model: VideoChatFlash, frames: np.ndarray) -> None:
    tokens = model.encode_clips(model.preprocess(frames))
    a = model.answer(tokens, QUESTION, max_new_tokens=5, do_sample=True, seed=1, temperature=1.5)
    b = model.answer(tokens, QUESTION, max_new_tokens=5, do_sample=True, seed=1, temperature=1.5)
    assert a.token_ids == b.token_ids and 1 <= len(a.token_ids) <= 5


def test_bad_inputs_raise_clear_errors(model: VideoChatFlash, frames: np.ndarray) -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        model.answer(frames[:3], QUESTION)
    with pytest.raises(ValueError, match="multiple of 4"):
        model.answer(frames[:6], QUESTION)
    with pytest.raises(ValueError, match="visual tokens must be"):
        model.answer(torch.randn(2, 64, 32), QUESTION)
    with pytest.raises(ValueError, match="question is empty"):
        model.answer(frames, "   ")
    with pytest.raises(FileNotFoundError):
        model.answer("/nonexistent/video.mp4", QUESTION)
    with pytest.raises(ValueError, match="out of range for an LLM of 4 layers"):
        model.answer(frames, QUESTION, compress="recommended")
    with pytest.raises(TypeError, match="unknown generation settings"):
        model.answer(frames, QUESTION, bogus=1)
    short = dataclasses.replace(model.config, max_length=100)
    model.config, saved = short, model.config
    try:
        with pytest.raises(ValueError, match="exceeds the model's 100"):
            model.answer(frames, QUESTION)
    finally:
        model.config = saved
