"""Degenerate output ends early (issue 8 item 11): whitespace-only or one repeated token, never real text."""

import json
from pathlib import Path

import pytest

from hico.generation import DEFAULT_MAX_NEW_TOKENS, Degenerate, GenerationSettings
from hico.tokenizer import load_tokenizer, train_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("tok")
    train_tiny_tokenizer(d)
    return load_tokenizer(d)


def first_stop(rule: Degenerate, ids: list[int]) -> tuple[int, str] | None:
    for i, t in enumerate(ids):
        if reason := rule(t):
            return i + 1, reason
    return None


def test_blank_and_repeated_tokens_stop(tok) -> None:
    newline, space = tok("\n").input_ids[0], tok(" ").input_ids[0]
    assert first_stop(Degenerate(tok, 32, 64), [newline, space] * 40) == (32, "blank")
    word = tok("van").input_ids[0]
    assert first_stop(Degenerate(tok, 32, 64), [word] * 100) == (64, "repeat")
    assert first_stop(Degenerate(tok, 0, 0), [newline] * 200) is None  # 0 turns the rules off


def test_real_text_never_stops(tok) -> None:
    text = ("The white van left the loading bay at 14:03.\n\n    Then a red square moved left.  " * 40).strip()
    ids = tok(text).input_ids
    assert len(ids) > 256
    assert first_stop(Degenerate(tok, 32, 64), ids) is None


def test_max_new_tokens_from_generation_config(tmp_path: Path) -> None:
    assert GenerationSettings.from_file(tmp_path / "none.json").max_new_tokens == DEFAULT_MAX_NEW_TOKENS == 512
    (tmp_path / "g.json").write_text(json.dumps({"max_new_tokens": 77}))
    assert GenerationSettings.from_file(tmp_path / "g.json").max_new_tokens == 77


def test_tiny_model_stops_early(tmp_path: Path) -> None:
    from hico.chat import VideoChatFlash
    from hico.checkpoint import make_tiny_checkpoint

    model = VideoChatFlash.from_pretrained(make_tiny_checkpoint(tmp_path / "tiny"))
    import numpy as np

    frames = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    answer = model.answer(frames, "What happens?")
    assert answer.stop in {"eos", "blank", "repeat"} and len(answer.token_ids) < 512, answer.stop
