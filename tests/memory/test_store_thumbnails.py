"""Thumbnails in memory: kept with their clip, counted in its bytes, evicted and deleted with it, on both backends."""

from __future__ import annotations

import io
import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import memory.server
from memory import EmbeddedStore, MemoryStore, Retention, UnknownStream
from memory.embedded import SCHEMA
from memory.server import thumbnails_in_range
from tests.memory.conftest import WALL0, make_clip


def jpeg(seq: int, size: tuple[int, int] = (32, 18)) -> bytes:
    """A small real JPEG whose grey level names the clip."""
    out = io.BytesIO()
    Image.new("RGB", size, (seq * 10 % 256,) * 3).save(out, format="JPEG", quality=80)
    return out.getvalue()


def with_thumbnail(seq: int, stream_id: str = "cam", thumbnail: bytes | None = None):  # noqa: ANN201
    return replace(make_clip(seq, stream_id), thumbnail=jpeg(seq) if thumbnail is None else thumbnail)


def test_a_clip_keeps_its_thumbnail_and_counts_its_bytes(store: MemoryStore) -> None:
    plain = make_clip(0)
    store.put(plain)
    before = store.stats("cam").bytes
    clip = with_thumbnail(1)
    assert store.put(clip)
    assert store.stats("cam").bytes - before == before + len(clip.thumbnail)  # same token bytes, plus the JPEG
    assert not store.put(replace(clip, thumbnail=jpeg(99)))  # idempotent: the first write stands
    assert store.thumbnails("cam", [0, 1, 2]) == {1: clip.thumbnail}  # none for 0, nothing held for 2
    assert store.stats("cam").bytes == 2 * before + len(clip.thumbnail)
    with pytest.raises(UnknownStream):
        store.thumbnails("nope", [0])


def test_thumbnails_go_with_their_clips(store: MemoryStore) -> None:
    clips = [with_thumbnail(seq) for seq in range(6)]
    per_clip = store.put(clips[0]) and store.stats("cam").bytes
    store.set_retention("cam", Retention(max_bytes=3 * per_clip + 100))  # the thumbnails differ by a few bytes
    for c in clips[1:]:
        store.put(c)
    held = store.held_seqs("cam").tolist()
    assert len(held) == 3 and held[-1] == 5
    assert sorted(store.thumbnails("cam", range(6))) == held  # the evicted clips' thumbnails went with them
    store.set_retention("cam", Retention(max_age_s=10.0))
    store.enforce_retention(now=WALL0 + 4 * 5 + 10 + 1)  # clips 0-4 end before the cutoff (clip 4 at +20 s)
    assert store.held_seqs("cam").tolist() == [5] and list(store.thumbnails("cam", range(6))) == [5]
    store.delete_stream("cam")
    with pytest.raises(UnknownStream):
        store.thumbnails("cam", [5])


def test_a_thumbnail_too_large_or_not_a_jpeg_is_refused(store: MemoryStore) -> None:
    big = jpeg(0) + bytes(262_144)
    with pytest.raises(ValueError, match="more than 262144.*VCFLASH_MAX_THUMBNAIL_BYTES"):
        store.put(with_thumbnail(0, thumbnail=big))
    with pytest.raises(ValueError, match="not a JPEG"):
        store.put(with_thumbnail(0, thumbnail=b"\x89PNG\r\n\x1a\n" + bytes(16)))
    assert "cam" not in store.streams()  # nothing written
    store.put(with_thumbnail(0))
    assert list(store.thumbnails("cam", [0])) == [0]


def test_the_limit_is_a_setting(tmp_path: Path) -> None:
    with EmbeddedStore(tmp_path / "m.sqlite3", max_thumbnail_bytes=100) as store:
        with pytest.raises(ValueError, match="more than 100"):
            store.put(with_thumbnail(0))


def test_an_embedded_file_from_before_thumbnails_gains_them(tmp_path: Path) -> None:
    path = tmp_path / "memory.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(SCHEMA.replace("    thumbnail BLOB,\n", ""))
    old.close()
    with EmbeddedStore(path) as store:
        clip = with_thumbnail(0)
        store.put(clip)
    with EmbeddedStore(path) as store:  # and it survives a reopen
        assert store.thumbnails("cam", [0]) == {0: clip.thumbnail}
        assert np.array_equal(store.tokens("cam", [0])[0], clip.tokens)


def test_thumbnails_in_range_pages_by_clips_and_by_bytes(store: MemoryStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.put(make_clip(0))  # no thumbnail: left out, but looked at
    for seq in range(1, 7):
        store.put(with_thumbnail(seq))

    def pages(limit: int) -> list[list[int]]:
        out, start = [], None
        while True:
            found, start = thumbnails_in_range(store, "cam", start, None, "media", limit)
            out.append([c.seq for c, _ in found])
            if start is None:
                return out

    assert pages(32) == [[1, 2, 3, 4, 5, 6]]
    assert pages(3) == [[1, 2], [3, 4, 5], [6]]
    monkeypatch.setattr(memory.server, "MAX_THUMBNAIL_ANSWER_BYTES", 2 * len(jpeg(1)) + 10)
    assert pages(32) == [[1, 2], [3, 4], [5, 6]]
    found, more = thumbnails_in_range(store, "cam", 8.0, 16.0, "wall", 32)  # wall clock: none before WALL0
    assert (found, more) == ([], None)
