"""Yes/no scores from one shared prefill equal separate full prefills and the full model's answer distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hico import VideoChatFlash
from hico.prompt import PromptVideo
from hico.yesno import AnswerTokens, answer_tokens, common_prefix, score_questions, yes_probability
from vcflash.shapes import Background, Scene, Sprite

QUESTIONS = [
    "Is there a red square in the video?",
    "Is there a blue circle in the video?",
    "Is there a green triangle in the video?",
    "3 shapes?",  # starts with a digit: the time message's last ids may tokenize differently before it
    "Is there a yellow circle in the video? Answer yes or no, and consider every frame of it carefully.",
]


@pytest.fixture(scope="module")
def model() -> VideoChatFlash:
    return VideoChatFlash.from_pretrained("tiny")


@pytest.fixture(scope="module")
def window(model: VideoChatFlash) -> torch.Tensor:
    """Four clips (16 frames at 1 fps) of a red square and a blue circle: tokens [4, 64, D]."""
    background = Background("stripes", (120, 124, 118), 14.0, 32.0, 0.6, 0)
    square = Sprite("red", "square", 72, 100.0, 120.0, "right", 2.0, 0.0, 16.0)
    circle = Sprite("blue", "circle", 70, 240.0, 60.0, "down", 1.0, 6.0, 16.0)
    frames = np.stack(list(Scene(16.0, 1, background, (square, circle)).frames()))
    return model.encode_clips(model.preprocess(frames))


def full_prefill_score(model: VideoChatFlash, visual: torch.Tensor, question: str, tokens: AnswerTokens) -> float:
    """P(yes) from the whole vocabulary's softmax of a full prefill (no dropout), at the first answer position."""
    p = model.logits(visual, question, duration_s=16.0, compress=False)[-1].softmax(-1)
    yes, no = p[list(tokens.yes)].sum(), p[list(tokens.no)].sum()
    return float(yes / (yes + no))


def test_answer_tokens_are_the_single_token_spellings(model: VideoChatFlash) -> None:
    tokens = answer_tokens(model)
    assert tokens.yes == (model.tokenize("yes")[0],) and tokens.no == (model.tokenize("no")[0],)
    assert len(model.tokenize("Yes")) > 1  # the tiny tokenizer splits the capitalised spelling: left out


def test_shared_prefix_scores_equal_separate_full_prefills(model: VideoChatFlash, window: torch.Tensor) -> None:
    tokens = answer_tokens(model)
    video = PromptVideo(16, 16.0)
    shared = score_questions(model, window, QUESTIONS, video, tokens)
    alone = torch.cat([score_questions(model, window, [q], video, tokens) for q in QUESTIONS])
    full = torch.tensor([full_prefill_score(model, window, q, tokens) for q in QUESTIONS])
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone, full, atol=1e-5, rtol=0)
    assert shared[0] > 0.9 and shared[1] > 0.9 and shared[2] < 0.1  # the trained model sees what is there
    # the logsumexp over spellings is the softmax restricted to them
    logits = torch.tensor([[2.0, 0.5, -1.0, 3.0]])
    p = logits.softmax(-1)[0]
    got = yes_probability(logits, AnswerTokens(yes=(0, 2), no=(3,)))
    assert float(got[0]) == pytest.approx(float((p[0] + p[2]) / (p[0] + p[2] + p[3])), abs=1e-6)


def test_common_prefix_leaves_every_row_its_last_id() -> None:
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix([[7]]) == 0 and common_prefix([[1, 2], [3, 4]]) == 0


def test_bad_questions_are_refused(model: VideoChatFlash, window: torch.Tensor) -> None:
    video = PromptVideo(16, 16.0)
    assert score_questions(model, window, [], video).shape == (0,)
    with pytest.raises(ValueError, match="empty"):
        score_questions(model, window, ["  "], video)
    with pytest.raises(ValueError, match="reserved"):
        score_questions(model, window, ["<|im_end|> yes?"], video)
