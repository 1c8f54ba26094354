"""Tests for the tiny Qwen2-format tokenizer used by generated test checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from hico.tokenizer import (
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    TokenizerLoadError,
    load_tokenizer,
    train_tiny_tokenizer,
)

VOCAB = 512
ENDOFTEXT, IM_START, IM_END = SPECIAL_TOKENS
EXPECTED_FILES = {
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
}

# Copied verbatim from the Qwen2 tokenizer.json, independently of hico.tokenizer.
QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ROUND_TRIP_TEXTS = [
    "The video lasts for 12.34 seconds, and 64 frames are uniformly sampled from it.",
    "A white van reverses into loading bay 3 at 14:05:59.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\r\nand blank lines\n\n\n",
    "Unicode: café naïve Größe Ελληνικά русский 東京 監視カメラ 한국어 עברית العربية",
    "Emoji: 🚐📹✅ 👩‍👩‍👧 🏳️‍🌈 and flags 🇬🇧",
    "never-seen words: xylophone quizzical zephyr {[<>]} ~`^ \\ \x00\x7f",
    "",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny_tok")
    train_tiny_tokenizer(d, vocab_size=VOCAB)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir: Path):
    return load_tokenizer(tok_dir)


def test_files_present(tok_dir: Path) -> None:
    assert EXPECTED_FILES <= {p.name for p in tok_dir.iterdir()}
    assert (tok_dir / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")


def test_tokenizer_config_matches_qwen_layout(tok_dir: Path) -> None:
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert cfg["add_bos_token"] is False
    assert cfg["bos_token"] is None
    assert cfg["unk_token"] is None
    assert cfg["eos_token"] == IM_END
    assert cfg["pad_token"] == ENDOFTEXT
    assert cfg["model_max_length"] == 32768
    assert cfg["padding_side"] == "right"
    assert cfg["split_special_tokens"] is False
    assert cfg["clean_up_tokenization_spaces"] is False
    assert cfg["errors"] == "replace"
    decoder = cfg["added_tokens_decoder"]
    assert {int(k): v["content"] for k, v in decoder.items()} == {
        VOCAB - 3: ENDOFTEXT,
        VOCAB - 2: IM_START,
        VOCAB - 1: IM_END,
    }
    assert all(v["special"] is True and v["normalized"] is False for v in decoder.values())
    stm = json.loads((tok_dir / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert stm["eos_token"]["content"] == IM_END
    assert stm["pad_token"]["content"] == ENDOFTEXT


def test_tokenizer_json_pipeline_is_qwen2(tok_dir: Path) -> None:
    tj = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert tj["model"]["type"] == "BPE"
    assert tj["normalizer"] == {"type": "NFC"}
    split, byte_level = tj["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["behavior"] == "Isolated"
    assert split["pattern"]["Regex"] == QWEN2_REGEX
    assert byte_level == {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    assert tj["decoder"]["type"] == "ByteLevel"
    # vocab.json excludes the specials, like the real checkpoints (151,643 entries there).
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == VOCAB - 3
    assert sorted(vocab.values()) == list(range(VOCAB - 3))


def test_loads_with_autotokenizer(tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(tok_dir))
    assert type(auto).__name__ == "Qwen2Tokenizer"
    assert auto.is_fast
    assert len(auto) == VOCAB
    assert auto.model_max_length == 32768
    assert auto.padding_side == "right"


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB_SIZE, 300, 1024])
def test_special_token_ids_are_last(tmp_path: Path, vocab_size: int) -> None:
    train_tiny_tokenizer(tmp_path, vocab_size=vocab_size)
    t = load_tokenizer(tmp_path)
    assert t.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [vocab_size - 3, vocab_size - 2, vocab_size - 1]
    assert len(t) == vocab_size
    assert max(t.get_vocab().values()) == vocab_size - 1


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS, ids=[f"text{i}" for i in range(len(ROUND_TRIP_TEXTS))])
def test_round_trip(tok, text: str) -> None:
    ids = tok(text).input_ids
    assert all(0 <= i < VOCAB - 3 for i in ids)  # plain text never produces special ids
    assert tok.decode(ids) == text


def test_loaded_encodings_match_tokenizer_json(tok, tok_dir: Path) -> None:
    """transformers rebuilds the Qwen2 pipeline from the files; it must agree with tokenizer.json itself."""
    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    for text in [*ROUND_TRIP_TEXTS, f"{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n"]:
        assert tok(text).input_ids == raw.encode(text).ids


def test_corpus_words_are_merged(tok) -> None:
    """Training really happened: frequent domain words become few tokens rather than one per byte."""
    assert len(tok(" video").input_ids) <= 2
    assert len(tok("The video lasts for").input_ids) < len("The video lasts for") // 2


def test_special_tokens_are_single_ids_and_not_split(tok) -> None:
    text = f"{IM_START}user\nhi{IM_END}"
    ids = tok(text).input_ids
    assert ids[0] == VOCAB - 2 and ids[-1] == VOCAB - 1
    assert ids.count(VOCAB - 2) == 1 and ids.count(VOCAB - 1) == 1
    assert tok.convert_ids_to_tokens(ids)[0] == IM_START
    assert ids[1:-1] == tok("user\nhi").input_ids
    for special in SPECIAL_TOKENS:
        assert tok(special).input_ids == [tok.convert_tokens_to_ids(special)]
        assert tok.tokenize(f"a{special}b") == [*tok.tokenize("a"), special, *tok.tokenize("b")]


def test_no_bos_or_eos_added(tok) -> None:
    ids = tok("hello").input_ids
    assert ids == tok("hello", add_special_tokens=False).input_ids
    assert not set(ids) & {VOCAB - 3, VOCAB - 2, VOCAB - 1}
    assert tok.decode(ids) == "hello"
    assert tok.bos_token is None and tok.bos_token_id is None


def test_decode_skip_special_tokens(tok) -> None:
    ids = tok(f"{IM_START}user\nhi there{IM_END}{ENDOFTEXT}").input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi there"
    assert tok.decode(ids) == f"{IM_START}user\nhi there{IM_END}{ENDOFTEXT}"


def test_eos_and_pad(tok) -> None:
    assert tok.eos_token == IM_END and tok.eos_token_id == VOCAB - 1
    assert tok.pad_token == ENDOFTEXT and tok.pad_token_id == VOCAB - 3
    batch = tok(["a", "a longer text"], padding=True)
    short, long_ = batch.input_ids
    assert len(short) == len(long_) > 1
    assert short[0] != VOCAB - 3 and short[1:] == [VOCAB - 3] * (len(short) - 1)  # right padding
    assert batch.attention_mask[0] == [1] + [0] * (len(short) - 1)


def test_loads_from_vocab_and_merges_only(tok, tok_dir: Path, tmp_path: Path) -> None:
    """Without tokenizer.json, vocab.json + merges.txt + config must give the same tokenizer."""
    for name in EXPECTED_FILES - {"tokenizer.json"}:
        shutil.copy(tok_dir / name, tmp_path / name)
    slow = load_tokenizer(tmp_path)
    for text in [*ROUND_TRIP_TEXTS, f"{IM_START}user\nhi{IM_END}"]:
        assert slow(text).input_ids == tok(text).input_ids
    assert slow.eos_token_id == VOCAB - 1 and slow.pad_token_id == VOCAB - 3


def test_training_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    train_tiny_tokenizer(a, vocab_size=VOCAB)
    train_tiny_tokenizer(b, vocab_size=VOCAB)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    for name in EXPECTED_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_load_empty_dir_names_dir_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError) as info:
        load_tokenizer(tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg
    assert "tokenizer_config.json" in msg and "tokenizer.json" in msg


def test_load_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(TokenizerLoadError, match="nope"):
        load_tokenizer(missing)


def test_load_broken_tokenizer_json(tok_dir: Path, tmp_path: Path) -> None:
    for name in EXPECTED_FILES:
        shutil.copy(tok_dir / name, tmp_path / name)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerLoadError) as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("vocab_size", [0, 256, MIN_VOCAB_SIZE - 1])
def test_vocab_size_too_small(tmp_path: Path, vocab_size: int) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tiny_tokenizer(tmp_path, vocab_size=vocab_size)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_vocab_size_beyond_corpus(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tiny_tokenizer(tmp_path, vocab_size=1_000_000)
