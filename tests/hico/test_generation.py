"""Streaming detokenization: the pieces join to exactly the decoded answer, never splitting a character."""

from pathlib import Path

import pytest

from hico.generation import detokenize
from hico.tokenizer import load_tokenizer, train_tiny_tokenizer


@pytest.mark.parametrize(
    "text", ["The white van left the loading bay at 14:03. 🚐 café ✓", "a  b\n\nc", "日本語のテキスト", ""]
)
def test_pieces_join_to_the_decoded_text(tmp_path: Path, text: str) -> None:
    train_tiny_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = tok(text).input_ids + [tok.convert_tokens_to_ids("<|im_end|>")]
    pieces = list(detokenize(tok, ids))
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert all(p and "\ufffd" not in p for p in pieces)
    if any(ord(c) > 127 for c in text):
        assert len(pieces) < len(ids)  # multi-byte characters were held back until whole
