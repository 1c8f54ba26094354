"""Nearest-clip search per stream, kept in RAM and rebuilt from the store's vectors at start-up.

Exact inner product (IndexFlatIP) because a stream holds at most tens of thousands of clips, where brute force
takes milliseconds and needs no training; IndexIDMap2 keys it by seq so retention can remove clips.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import faiss
import numpy as np

from memory.store import MemoryStore, UnknownStream

log = logging.getLogger(__name__)


def _new(dim: int) -> faiss.IndexIDMap2:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def _ids(seqs: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(seqs, dtype=np.int64).reshape(-1)


class ClipIndex:
    """Thread-safe: one lock around every index, as FAISS does not allow adds or removes during a search."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._indexes: dict[str, faiss.IndexIDMap2] = {}

    def add(self, stream_id: str, seqs: Sequence[int] | np.ndarray, vectors: np.ndarray) -> None:
        """Index float32 [n, D] vectors under their seqs; a seq already indexed is replaced."""
        ids, x = _ids(seqs), np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2 or len(x) != len(ids):
            raise ValueError(f"stream {stream_id!r}: need vectors [{len(ids)}, D] for {len(ids)} seqs, got {x.shape}")
        if not len(ids):
            return
        with self._lock:
            index = self._indexes.get(stream_id)
            if index is None:
                index = self._indexes[stream_id] = _new(x.shape[1])
            elif index.d != x.shape[1]:
                raise ValueError(f"stream {stream_id!r} is indexed with D={index.d}, got vectors of D={x.shape[1]}")
            index.remove_ids(ids)
            index.add_with_ids(x, ids)

    def remove(self, stream_id: str, seqs: Sequence[int] | np.ndarray) -> None:
        """Drop seqs from the stream's index; seqs (or a stream) not indexed are ignored."""
        with self._lock:
            index = self._indexes.get(stream_id)
            if index is not None:
                index.remove_ids(_ids(seqs))

    def drop_stream(self, stream_id: str) -> None:
        """Forget a stream's index, after MemoryStore.delete_stream."""
        with self._lock:
            self._indexes.pop(stream_id, None)

    def search(
        self, stream_id: str, query: np.ndarray, k: int, among: Sequence[int] | None = None
    ) -> list[tuple[int, float]]:
        """Up to k (seq, inner product) pairs, best first; [] for a stream with nothing indexed.

        `among` restricts the search to those seqs (a time range's clips). Stored vectors are
        L2-normalised, so an L2-normalised query gives cosine similarities.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        with self._lock:
            index = self._indexes.get(stream_id)
            if index is None or index.ntotal == 0:
                return []
            if q.shape[1] != index.d:
                raise ValueError(f"stream {stream_id!r} is indexed with D={index.d}, got a query of D={q.shape[1]}")
            params = None if among is None else faiss.SearchParameters(sel=faiss.IDSelectorBatch(_ids(among)))
            scores, ids = index.search(q, min(k, index.ntotal), params=params)
        return [(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i != -1]

    def sync_stream(self, store: MemoryStore, stream_id: str) -> None:
        """Reload one stream's vectors when its clip count differs from the store's: another process
        (the split deployment's encoder) writes the clips, and retention evicts some on write."""
        clips = store.stats(stream_id).clips
        with self._lock:
            index = self._indexes.get(stream_id)
            if (index.ntotal if index is not None else 0) == clips:
                return
        seqs, vectors = store.vectors(stream_id)
        with self._lock:
            self._indexes.pop(stream_id, None)
        self.add(stream_id, seqs, vectors)

    def rebuild(self, store: MemoryStore) -> None:
        """Replace every index with the store's vectors; holds the lock throughout so no add is lost."""
        with self._lock:
            indexes: dict[str, faiss.IndexIDMap2] = {}
            for stream_id in store.streams():
                try:
                    seqs, vectors = store.vectors(stream_id)
                except UnknownStream:  # deleted since it was listed
                    continue
                if len(seqs):
                    indexes[stream_id] = _new(vectors.shape[1])
                    indexes[stream_id].add_with_ids(vectors, seqs)
            self._indexes = indexes
        log.info("rebuilt clip index: %d streams, %d clips", len(indexes), sum(i.ntotal for i in indexes.values()))
