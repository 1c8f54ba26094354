"""Clip payloads as bytes, shared by both backends so a clip is stored identically wherever it lives.

Both formats keep blobs little-endian and self-described by (format, n_tokens, dim):

- "fp16": tokens float16 [T, D]; vector float16 [D].
- "int8": tokens int8 [T, D] then one float16 scale per token [T]; vector int8 [D] then one float16 scale.
  Symmetric per-row quantization (scale = max|x| / 127), so each value is off by at most scale / 2 before
  the float16 cast on the way out.

The vector follows the token format (not float32) because it is 3% of a 2B clip in fp16 and 6% in int8, which
is the margin between meeting and missing the issue's bytes-per-camera-hour targets; a float16 or int8 unit vector
still ranks neighbours the same to ~1e-3 in score.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import get_args

import numpy as np

from memory.records import ClipMeta, ClipRecord, TokenFormat

log = logging.getLogger(__name__)

F16 = np.dtype("<f2")
INT8_MAX = 127
MAX_THUMBNAIL_BYTES = 262_144  # VCFLASH_MAX_THUMBNAIL_BYTES: a 320-px JPEG is 5-30 KB
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class EncodedClip:
    meta: ClipMeta
    token_format: TokenFormat
    n_tokens: int
    dim: int
    tokens: bytes
    vector: bytes
    thumbnail: bytes = b""

    @property
    def nbytes(self) -> int:
        """Bytes held for the clip, as counted in StreamStats.bytes (and against retention's max_bytes)."""
        return len(self.tokens) + len(self.vector) + len(self.thumbnail)

    @property
    def shape(self) -> str:
        """The token shape as 'TxD'; a stream keeps one so its clips stack and its index has one dimension."""
        return f"{self.n_tokens}x{self.dim}"


def check_format(token_format: str) -> TokenFormat:
    if token_format not in get_args(TokenFormat):
        raise ValueError(f"token_format must be one of {get_args(TokenFormat)}, got {token_format!r}")
    return token_format  # type: ignore[return-value]


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row of the last axis: (int8 values, float16 scales); x ≈ values * scales[..., None]."""
    x = np.asarray(x, dtype=np.float32)
    scales = (np.abs(x).max(axis=-1) / INT8_MAX).astype(F16)
    s = scales.astype(np.float32)[..., None]
    q = np.divide(x, s, out=np.zeros_like(x), where=s > 0)
    return np.clip(np.rint(q), -INT8_MAX, INT8_MAX).astype(np.int8), scales


def dequantize_int8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    out = q.astype(np.float32)
    out *= scales.astype(np.float32)[..., None]  # in place: the same products, a third faster than q * s
    return out


def check_thumbnail(thumbnail: bytes, max_bytes: int, where: str) -> bytes:
    """`thumbnail` if it is empty or a JPEG of at most `max_bytes`; else ValueError naming the sizes."""
    thumbnail = bytes(thumbnail)
    if len(thumbnail) > max_bytes:
        raise ValueError(
            f"clip {where}: thumbnail is {len(thumbnail)} bytes, more than {max_bytes} (VCFLASH_MAX_THUMBNAIL_BYTES)"
        )
    if thumbnail and not thumbnail.startswith(JPEG_MAGIC):
        raise ValueError(f"clip {where}: thumbnail is not a JPEG (starts {thumbnail[:4].hex()})")
    return thumbnail


def encode(
    record: ClipRecord, token_format: TokenFormat, max_thumbnail_bytes: int = MAX_THUMBNAIL_BYTES
) -> EncodedClip:
    """Validate a record and turn its tokens and vector into blobs in `token_format`; the thumbnail is kept as is."""
    meta = normalize_meta(record.meta)
    thumbnail = check_thumbnail(record.thumbnail, max_thumbnail_bytes, f"{meta.stream_id!r}/{meta.seq}")
    tokens, vector = np.asarray(record.tokens), np.asarray(record.vector)
    if tokens.ndim != 2 or vector.shape != tokens.shape[1:]:
        raise ValueError(
            f"clip {meta.stream_id!r}/{meta.seq}: tokens must be [T, D] and vector [D], "
            f"got tokens {tokens.shape} and vector {vector.shape}"
        )
    t16, v16 = tokens.astype(F16), vector.astype(F16)
    if not (np.isfinite(t16).all() and np.isfinite(v16).all()):
        raise ValueError(f"clip {meta.stream_id!r}/{meta.seq}: tokens or vector not finite in float16")
    n, d = tokens.shape
    if token_format == "fp16":
        return EncodedClip(meta, "fp16", n, d, t16.tobytes(), v16.tobytes(), thumbnail)
    tq, ts = quantize_int8(t16)
    vq, vs = quantize_int8(v16)
    return EncodedClip(meta, "int8", n, d, tq.tobytes() + ts.tobytes(), vq.tobytes() + vs.tobytes(), thumbnail)


def decode_tokens(blob: bytes, token_format: str, n_tokens: int, dim: int) -> np.ndarray:
    """Float16 [n_tokens, dim]."""
    if token_format == "fp16":
        return np.frombuffer(blob, dtype=F16).reshape(n_tokens, dim)
    q = np.frombuffer(blob, dtype=np.int8, count=n_tokens * dim).reshape(n_tokens, dim)
    scales = np.frombuffer(blob, dtype=F16, offset=n_tokens * dim)
    return dequantize_int8(q, scales).astype(np.float16)


def decode_vector(blob: bytes, token_format: str, dim: int) -> np.ndarray:
    """Float32 [dim]."""
    if token_format == "fp16":
        return np.frombuffer(blob, dtype=F16).astype(np.float32)
    q = np.frombuffer(blob, dtype=np.int8, count=dim)
    return dequantize_int8(q, np.frombuffer(blob, dtype=F16, offset=dim).reshape(()))


def stack_tokens(
    stream_id: str, seqs: Sequence[int], shape: str | None, blobs: Mapping[int, tuple[bytes, str, int, int]]
) -> np.ndarray:
    """Float16 [len(seqs), T, D] from `blobs` (seq -> decode_tokens arguments), in the order of `seqs`.

    `shape` is the stream's 'TxD' (None before its first clip); KeyError names the seqs missing from `blobs`.
    """
    missing = sorted(set(seqs) - blobs.keys())
    if missing:
        raise KeyError(f"stream {stream_id!r} holds no clips with seqs {missing}")
    n, d = map(int, shape.split("x")) if shape else (0, 0)
    out = np.empty((len(seqs), n, d), dtype=np.float16)
    for i, seq in enumerate(seqs):
        out[i] = decode_tokens(*blobs[seq])
    return out


def check_stream_id(stream_id: str) -> None:
    if not isinstance(stream_id, str) or not stream_id:
        raise ValueError(f"stream_id must be a non-empty string, got {stream_id!r}")


def normalize_meta(meta: ClipMeta) -> ClipMeta:
    """Check a clip's identity and times, as plain Python numbers (numpy scalars bind to neither SQL nor JSON)."""
    check_stream_id(meta.stream_id)
    if meta.seq < 0:
        raise ValueError(f"clip {meta.stream_id!r}: seq must be >= 0, got {meta.seq}")
    times = (meta.wall_start, meta.wall_end, meta.media_start, meta.media_end)
    if not np.isfinite(times).all():
        raise ValueError(f"clip {meta.stream_id!r}/{meta.seq}: times must be finite, got {times}")
    return ClipMeta(
        meta.stream_id, int(meta.seq), *map(float, times), frame_media_times=tuple(map(float, meta.frame_media_times))
    )


def meta_to_json(meta: ClipMeta) -> str:
    return json.dumps(dataclasses.asdict(meta), separators=(",", ":"))


def meta_from_json(text: str | bytes) -> ClipMeta:
    fields = json.loads(text)
    return ClipMeta(**{**fields, "frame_media_times": tuple(fields["frame_media_times"])})


# -- a clip's keys at the reasoner's scoring layer (reasoner.keys), kept beside its tokens ------------------------

KEY_TAG = re.compile(r"[0-9A-Za-z_.-]{1,32}")  # the reasoner's digest of the model and layer that made the keys


@dataclass(frozen=True)
class EncodedKeys:
    """Clips' keys as float16 blobs, one a clip, all of one shape 'HkvxTxhd' under one tag."""

    tag: str
    shape: str
    tokens: int  # T: the clip's tokens, one key each
    width: int  # Hkv * hd: one token's keys
    seqs: list[int]
    blobs: list[bytes]


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not KEY_TAG.fullmatch(tag):
        raise ValueError(f"a key tag must be 1-32 characters of [0-9A-Za-z_.-], got {tag!r}")
    return tag


def encode_keys(stream_id: str, tag: str, seqs: Sequence[int], keys: np.ndarray) -> EncodedKeys:
    """Validate clips' keys [n, Hkv, T, hd] for `seqs` (distinct, >= 0) and turn each clip's into float16 bytes."""
    check_stream_id(stream_id)
    check_tag(tag)
    keys = np.asarray(keys)
    seqs = [int(s) for s in seqs]
    if keys.ndim != 4 or len(keys) != len(seqs) or 0 in keys.shape[1:]:
        raise ValueError(f"stream {stream_id!r}: keys must be [{len(seqs)}, Hkv, T, hd], got {keys.shape}")
    if len(set(seqs)) != len(seqs) or any(s < 0 for s in seqs):
        raise ValueError(f"stream {stream_id!r}: key seqs must be distinct and >= 0, got {seqs[:8]}")
    with np.errstate(over="ignore"):  # out of float16's range becomes inf, refused just below
        k16 = keys.astype(F16)
    if not np.isfinite(k16).all():
        raise ValueError(f"stream {stream_id!r}: keys not finite in float16")
    _, hkv, t, hd = keys.shape
    return EncodedKeys(tag, f"{hkv}x{t}x{hd}", t, hkv * hd, seqs, [k.tobytes() for k in k16])


def check_keys_fit(stream_id: str, enc: EncodedKeys, shape: str | None) -> None:
    """ValueError unless the keys are of clips of the stream's token shape 'TxD' (None: no clip yet): one key per
    token, no wider than a token, so a clip's keys never outweigh its tokens in float16."""
    if shape is None:
        return
    n, d = map(int, shape.split("x"))
    if enc.tokens != n or enc.width > d:
        raise ValueError(
            f"stream {stream_id!r} holds {shape} tokens: keys {enc.shape} must have {n} tokens and Hkv * hd <= {d}"
        )


def decode_keys(blob: bytes | None, shape: str | bytes | None) -> np.ndarray | None:
    """Float16 [Hkv, T, hd] from a stored blob, or None where blob and shape disagree (a damaged value)."""
    try:
        dims = tuple(int(x) for x in (shape.decode() if isinstance(shape, bytes) else shape or "").split("x"))
    except ValueError:
        return None
    if blob is None or len(dims) != 3 or min(dims) < 1 or len(blob) != 2 * int(np.prod(dims)):
        return None
    return np.frombuffer(blob, dtype=F16).reshape(dims)


KeyRow = tuple[
    str | bytes | None, str | bytes | None, bytes | None
]  # a clip's (tag, shape, blob) as a backend reads it


def stack_keys(
    stream_id: str, seqs: Sequence[int], rows: Mapping[int, KeyRow], tag: str
) -> tuple[np.ndarray, np.ndarray]:
    """(found seqs int64 [m], float16 keys [m, Hkv, T, hd]) of those of `seqs` whose row (tag, shape, blob) holds
    keys under `tag`, in the order asked. A damaged row, or one of another shape than the first found, is left
    out (a miss: keys are a cache, rebuilt from the tokens), with a warning."""
    found: list[int] = []
    out: list[np.ndarray] = []
    for seq in seqs:
        row = rows.get(int(seq))
        if row is None or (row[0].decode() if isinstance(row[0], bytes) else row[0]) != tag:
            continue
        keys = decode_keys(row[2], row[1])
        if keys is None or (out and keys.shape != out[0].shape):
            log.warning("event=keys_damaged stream=%r seq=%d shape=%r: left out", stream_id, seq, row[1])
            continue
        found.append(int(seq))
        out.append(keys)
    stacked = np.stack(out) if out else np.empty((0, 0, 0, 0), dtype=F16)
    return np.array(found, dtype=np.int64), stacked
