"""Tiny Qwen2-format tokenizer for generated test checkpoints.

The real VideoChat-Flash checkpoints ship a Qwen2 byte-level BPE tokenizer (151,643 merged tokens plus the
``<|endoftext|>``/``<|im_start|>``/``<|im_end|>`` specials).  Test checkpoints need a tokenizer that is small
(so a tiny embedding matrix covers every id) but laid out on disk exactly like the real one, so the very same
loading code -- ``transformers.AutoTokenizer.from_pretrained(dir)`` -- is exercised offline on both.

``train_tiny_tokenizer`` trains such a tokenizer on a built-in deterministic corpus and writes the HF layout;
``load_tokenizer`` loads any tokenizer directory with a clear error when the files are absent or broken.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers as tk_trainers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "SPECIAL_TOKENS",
    "QWEN2_PRETOKENIZE_REGEX",
    "TokenizerLoadError",
    "train_tiny_tokenizer",
    "load_tokenizer",
    "tiny_corpus",
]

# Same order as Qwen2, where these are ids 151643, 151644, 151645 (right after the merged vocab).
SPECIAL_TOKENS: tuple[str, str, str] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Pre-tokenizer split regex of the Qwen2 / Qwen2.5 tokenizers (digits are split one by one).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
MODEL_MAX_LENGTH = 32768

TOKENIZER_JSON = "tokenizer.json"
VOCAB_JSON = "vocab.json"
MERGES_TXT = "merges.txt"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_JSON = "special_tokens_map.json"


class TokenizerLoadError(OSError):
    """Raised when a tokenizer directory is missing files or its files cannot be loaded.

    Subclasses ``OSError`` because that is what ``from_pretrained`` raises for missing files, so callers
    that already catch it keep working.
    """


# --------------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------------

_SCAFFOLDING = (
    "system",
    "user",
    "assistant",
    "You are a helpful assistant.",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    "<|im_start|>user\n",
    "<|im_start|>assistant\n",
    "<image>\n",
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
    "movement of objects, and the action and pose of persons. Based on your observations, select the best "
    "option that accurately addresses the question.",
    "Answer with the option's letter from the given choices directly.",
    "Please answer the following questions related to this video.",
    "Question: What happens in the video?",
    "Options:\n(A) A van arrives.\n(B) A van leaves.\n(C) Nothing happens.\n(D) The camera moves.",
    "Best option: (A)",
    "Describe this video in detail.",
    "When did the van arrive at the loading bay?",
    "How many people are visible on camera 2?",
    "What colour is the truck parked in bay 4?",
    "I can't see it, but it's there; they're sure we've missed it, so I'll check what they'd seen.",
)

_SUBJECTS = (
    "A white van",
    "The delivery truck",
    "A forklift",
    "The driver",
    "A worker in a yellow vest",
    "Two people",
    "A red car",
    "The security guard",
    "A cyclist",
    "The courier",
    "A small dog",
    "The manager",
)
_ACTIONS = (
    "arrives at",
    "leaves",
    "reverses into",
    "waits near",
    "walks past",
    "stops in front of",
    "unloads boxes at",
    "drives slowly through",
    "is parked at",
    "turns left at",
)
_PLACES = (
    "loading bay {n}",
    "the main gate",
    "the warehouse door",
    "the car park",
    "the north entrance",
    "dock {n}",
    "the back alley",
    "the parking lot",
)
_CAMERAS = ("camera", "front camera", "rear camera", "gate camera", "dashcam", "CCTV feed", "stream")
_EVENTS = (
    "motion detected",
    "person detected",
    "vehicle entered",
    "vehicle exited",
    "door opened",
    "door closed",
    "package delivered",
    "scene change",
)
_WORDS = (
    "video frames clip segment timestamp second seconds minute minutes hour hours morning afternoon evening "
    "night today yesterday camera cameras lens zoom focus recording stream live feed memory token tokens "
    "sampled uniformly located duration lasts start end before after during between while then first last "
    "next previous van vans truck trucks car cars bay bays loading unloading warehouse gate door dock "
    "parking person people man woman driver worker guard box boxes pallet package packages delivery arrival "
    "departure "
    "left right front back inside outside near far slowly quickly again still moving stopped parked open "
    "closed light dark rain sunny cloudy shadow colour color white black red blue green yellow grey silver "
    "count number total one two three four five six seven eight nine ten twenty hundred thousand answer "
    "question option describe detail summary event events action actions object objects scene scenes "
    "monday tuesday wednesday thursday friday saturday sunday january february march april may june july "
    "august september october november december weekend weekday midnight noon dawn dusk sunrise sunset "
    "vehicle vehicles lorry trailer container forklift pallet jack ramp barrier fence wall roof window "
    "corridor entrance exit staircase elevator platform shelf rack aisle office reception checkpoint "
    "pedestrian visitor employee operator supervisor technician courier passenger cyclist motorcycle "
    "bicycle helmet jacket uniform backpack suitcase trolley cart parcel envelope crate barrel bucket "
    "walking running standing sitting carrying lifting pushing pulling opening closing entering exiting "
    "arriving departing waiting loading unloaded reversing turning stopping starting looking pointing "
    "holding dropping picking talking signing scanning checking counting driving parking overtaking "
    "highlight thumbnail keyframe resolution framerate bitrate codec buffer latency bandwidth encoder "
    "decoder compression pixel pixels width height aspect ratio brightness contrast exposure blur noise "
    "motion tracking detection recognition classification segmentation caption captions transcript "
    "subtitle narration audio sound silence alarm siren horn engine headlights taillights indicator "
    "license plate registration serial label barcode sticker sign arrow marking lane crossing junction "
    "roundabout intersection street road avenue highway motorway bridge tunnel depot terminal yard "
    "incident accident collision damage spill delay queue traffic congestion schedule shift handover "
    "beginning middle ending earlier later soon recently meanwhile afterwards suddenly gradually briefly "
    "clearly partially visible hidden blocked empty crowded busy quiet normal unusual suspicious "
    "approximately exactly roughly about around nearly almost several many few most least more less "
    "because therefore however although whereas unless until since whether which whose whom where when"
).split()


def _fmt_clock(seconds: int) -> str:
    """Format seconds as HH:MM:SS, the way surveillance overlays and prompts show times."""
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:02d}:{m:02d}:{s:02d}"


def tiny_corpus() -> Iterator[str]:
    """Yield the built-in training corpus.

    Pure function of the code (no RNG, no clock, no files), so training on it is reproducible byte for byte.
    It covers the chat-template scaffolding and the vocabulary of the surveillance-video domain the tests use.
    """
    yield from _SCAFFOLDING
    for i in range(48):
        duration = (i * 731 % 9000) / 100 + 1.0
        frames = (8, 16, 32, 64, 128, 256)[i % 6]
        stamps = ",".join(f"{duration * k / frames:.1f}s" for k in range(min(frames, 8)))
        yield (
            f"The video lasts for {duration:.2f} seconds, and {frames} frames are uniformly sampled from it. "
            f"These frames are located at {stamps}."
            "Please answer the following questions related to this video."
        )
    combos = itertools.product(range(len(_SUBJECTS)), range(len(_ACTIONS)), range(len(_PLACES)))
    for idx, (si, ai, pi) in enumerate(combos):
        if idx % 3:  # a deterministic third of the 960 combinations is plenty
            continue
        place = _PLACES[pi].format(n=idx % 9 + 1)
        clock = _fmt_clock((idx * 97) % 86400)
        cam = _CAMERAS[idx % len(_CAMERAS)]
        yield f"At {clock}, {_SUBJECTS[si].lower()} {_ACTIONS[ai]} {place}, as seen on the {cam}."
        yield f"{_SUBJECTS[si]} {_ACTIONS[ai]} {place} at {clock}."
    for i, event in enumerate(_EVENTS * 6):
        cam = _CAMERAS[i % len(_CAMERAS)]
        yield f"[{_fmt_clock(i * 413 % 86400)}] {cam} {i % 16}: {event} (score {i * 7 % 100}%)"
    for i in range(0, len(_WORDS) - 8, 3):
        yield " ".join(_WORDS[i : i + 9]).capitalize() + "."
    for i in range(0, len(_WORDS), 6):  # glossary lines: title-case and upper-case forms are distinct tokens
        chunk = _WORDS[i : i + 6]
        yield ", ".join(w.title() for w in chunk) + "; " + " / ".join(w.upper() for w in chunk)
    for i in range(60):
        vans, trucks, people = i, i * 3 % 17, i * 7 % 23
        yield f"There are {vans} vans, {trucks} trucks and {people} people; total {vans + trucks} vehicles."
    yield "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 128 256 512 1024 3.14 12.34 99.5%"
    yield "Punctuation: ... -- ; : ! ? ( ) [ ] { } < > / \\ | @ # $ % ^ & * _ + = ~ ` \" '"
    yield "Line one\nLine two\r\nLine three\n\n\tIndented line\n"
    yield "Unicode: café, naïve, Größe, 東京, 監視カメラ, видео, 🚐 📹 ✅"


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------


def _byte_level_bpe(vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None) -> Tokenizer:
    """Build an (untrained) tokenizer with the exact Qwen2 pipeline: NFC, regex split, byte-level BPE."""
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def _train_core(vocab_size: int, extra_corpus: tuple[str, ...] = ()) -> Tokenizer:
    """Train the BPE merges so the model vocab (without specials) has exactly ``vocab_size - 3`` entries."""
    target = vocab_size - len(SPECIAL_TOKENS)
    tok = _byte_level_bpe()
    trainer = tk_trainers.BpeTrainer(
        vocab_size=target,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        continuing_subword_prefix="",
        end_of_word_suffix="",
    )
    tok.train_from_iterator(itertools.chain(tiny_corpus(), extra_corpus), trainer=trainer)
    got = tok.get_vocab_size(with_added_tokens=False)
    if got != target:
        raise ValueError(
            f"the built-in corpus only supports {got + len(SPECIAL_TOKENS)} tokens, "
            f"vocab_size={vocab_size} is too large"
        )
    # Re-wrap the trained vocab/merges in a freshly built pipeline: the trainer rewrites some model options
    # (e.g. continuing_subword_prefix -> null) and we want tokenizer.json to match the Qwen2 layout exactly.
    trained = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    return _byte_level_bpe(vocab=dict(trained["vocab"]), merges=merges)  # type: ignore[arg-type]


def _tokenizer_config(first_special_id: int) -> dict[str, Any]:
    """``tokenizer_config.json`` with the keys/values of the Qwen2(.5) checkpoints (except max length)."""
    added = {
        str(first_special_id + i): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, tok in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _special_tokens_map() -> dict[str, Any]:
    """``special_tokens_map.json`` as in the Qwen2 checkpoints (older transformers versions read it)."""

    def entry(tok: str) -> dict[str, Any]:
        return {"content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "eos_token": entry("<|im_end|>"),
        "pad_token": entry("<|endoftext|>"),
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def train_tiny_tokenizer(
    out_dir: str | os.PathLike[str], *, vocab_size: int = 512, extra_corpus: Iterable[str] = ()
) -> None:
    """Train a small byte-level BPE tokenizer with the Qwen special tokens and save it in the HF layout.

    ``extra_corpus`` lines are trained on after the built-in corpus (a domain's words, so they become whole
    tokens); without it the result is the same as it always was.

    Total vocab (merged tokens + the 3 specials) is exactly ``vocab_size``, so a model with ``vocab_size``
    embedding rows covers every id.  The specials get the last three ids, in Qwen order.  The built-in corpus
    supports ``vocab_size`` up to ~3,200 (ValueError beyond).  Files written: ``tokenizer.json``,
    ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``; byte-identical
    across runs.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 byte tokens + {len(SPECIAL_TOKENS)} specials), "
            f"got {vocab_size}"
        )
    tok = _train_core(vocab_size, tuple(extra_corpus))
    first_special_id = tok.get_vocab_size(with_added_tokens=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    expected = list(range(first_special_id, first_special_id + len(SPECIAL_TOKENS)))
    if ids != expected or tok.get_vocab_size(with_added_tokens=True) != vocab_size:  # pragma: no cover
        raise RuntimeError(f"special token ids {ids} != {expected}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / TOKENIZER_JSON), pretty=True)
    tok.model.save(str(out))  # vocab.json + merges.txt (specials excluded, as in the real checkpoints)
    _write_json(out / TOKENIZER_CONFIG_JSON, _tokenizer_config(first_special_id))
    _write_json(out / SPECIAL_TOKENS_MAP_JSON, _special_tokens_map())


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def _missing_files(d: Path) -> list[str]:
    """Names of the files a Qwen2-style tokenizer dir lacks (tokenizer.json OR vocab.json + merges.txt)."""
    missing = [] if (d / TOKENIZER_CONFIG_JSON).is_file() else [TOKENIZER_CONFIG_JSON]
    if not (d / TOKENIZER_JSON).is_file():
        slow = [n for n in (VOCAB_JSON, MERGES_TXT) if not (d / n).is_file()]
        if slow:
            missing.append(f"{TOKENIZER_JSON} (or {' + '.join(slow)})")
    return missing


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(path)``, offline, with an error naming the dir and what is wrong.

    Raises :class:`TokenizerLoadError` if ``path`` is not a directory, lacks the tokenizer files, fails to
    load, or lacks the Qwen chat special tokens (which the prompt builder relies on).
    """
    d = Path(path)
    if not d.is_dir():
        raise TokenizerLoadError(f"tokenizer directory {str(d)!r} does not exist or is not a directory")
    missing = _missing_files(d)
    if missing:
        raise TokenizerLoadError(f"tokenizer directory {str(d)!r} is missing: {', '.join(missing)}")

    from transformers import AutoTokenizer  # deferred: importing transformers is slow
    from transformers.utils import logging as transformers_logging

    try:
        # AutoTokenizer peeks at config.json and warns that `videochat_flash_qwen` is not a
        # transformers model type; the tokenizer class comes from tokenizer_config.json anyway.
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            # trust_remote_code=False: the released config.json names remote code in `auto_map` (the model's),
            # which would otherwise make transformers ask on stdin; the tokenizer itself is the stock Qwen2 one.
            tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
        finally:
            transformers_logging.set_verbosity(verbosity)
    except Exception as exc:
        raise TokenizerLoadError(f"failed to load tokenizer from {str(d)!r} ({type(exc).__name__}: {exc})") from exc
    vocab = tok.get_vocab()
    absent = [t for t in SPECIAL_TOKENS if t not in vocab]
    if absent:
        raise TokenizerLoadError(f"tokenizer in {str(d)!r} lacks special tokens {absent}")
    return tok
