"""Nearest-clip search per stream, kept in RAM: built from the store's vectors at start-up, then kept up to date.

Exact inner product (IndexFlatIP) because brute force over a stream's clips takes milliseconds and needs no
training; IndexIDMap2 keys it by seq so retention can remove clips. Writes stay O(1): a clip whose seq is above
every seq the stream's index has seen is appended without looking for an older copy (FAISS `remove_ids` is a
pass over the whole index), and removals come in batches (a retention sweep's, or a prune). An index kept in
another process than the writer (the split deployment's reasoner) catches up by asking the store for the clips
after the last seq it holds (`sync_stream`), never by reloading the stream.

FAISS threads: `set_threads` (VCFLASH_FAISS_THREADS, default 1). One query searches one stream, which FAISS runs
on one thread anyway below 20 queries; more OpenMP threads only spin against torch's on the same cores. OpenMP
keeps the thread count per calling thread, and services call the index from worker threads, so every call sets
it in the thread it runs in (torch, with its own OpenMP runtime and pool, is not affected).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np

from memory.store import MemoryStore, UnknownStream

log = logging.getLogger(__name__)

PRUNE_MIN = 1024  # stale entries (clips evicted by another process) tolerated before a batched prune...
PRUNE_FRACTION = 8  # ...or an eighth of the stream's index, whichever is more: pruning stays O(1) per eviction


_threads = 1


def set_threads(n: int) -> None:
    """FAISS's OpenMP threads for every index call of this process, from now on."""
    global _threads
    if n < 1:
        raise ValueError(f"FAISS threads must be >= 1, got {n}")
    _threads = n


@contextmanager
def _locked(lock: threading.Lock) -> Iterator[None]:
    """The index lock, with FAISS's threads set for the calling thread."""
    with lock:
        faiss.omp_set_num_threads(_threads)
        yield


def _new(dim: int) -> faiss.IndexIDMap2:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def _ids(seqs: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(seqs, dtype=np.int64).reshape(-1)


@dataclass
class _Stream:
    index: faiss.IndexIDMap2
    last: int = -1  # the highest seq ever added: a greater one cannot be indexed yet
    generation: str | None = None  # the store's stream generation this index follows (None: not yet known)
    stale: int = 0  # entries the store no longer holds, as of the last sync (clips evicted elsewhere)


class ClipIndex:
    """Thread-safe: one lock around every index, as FAISS does not allow adds or removes during a search."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}

    def add(self, stream_id: str, seqs: Sequence[int] | np.ndarray, vectors: np.ndarray) -> None:
        """Index float32 [n, D] vectors under their seqs; a seq already indexed is replaced. O(n) in the clips
        added, unless a seq at or below the highest already added comes (then one pass to replace it)."""
        ids, x = _ids(seqs), np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2 or len(x) != len(ids):
            raise ValueError(f"stream {stream_id!r}: need vectors [{len(ids)}, D] for {len(ids)} seqs, got {x.shape}")
        if not len(ids):
            return
        with _locked(self._lock):
            s = self._streams.get(stream_id)
            if s is None:
                s = self._streams[stream_id] = _Stream(_new(x.shape[1]))
            elif s.index.d != x.shape[1]:
                raise ValueError(f"stream {stream_id!r} is indexed with D={s.index.d}, got vectors of D={x.shape[1]}")
            old = ids[ids <= s.last]
            if len(old):  # may be indexed already: replace (a pass over the index, for re-sent or late clips only)
                s.index.remove_ids(old)
            s.index.add_with_ids(x, ids)
            s.last = max(s.last, int(ids.max()))

    def remove(self, stream_id: str, seqs: Sequence[int] | np.ndarray) -> None:
        """Drop seqs from the stream's index; seqs (or a stream) not indexed are ignored. One pass over the index
        per call, so callers remove in batches (a retention sweep's evictions per stream)."""
        ids = _ids(seqs)
        with _locked(self._lock):
            s = self._streams.get(stream_id)
            if s is not None and len(ids):
                s.index.remove_ids(ids)

    def drop_stream(self, stream_id: str) -> None:
        """Forget a stream's index, after MemoryStore.delete_stream."""
        with _locked(self._lock):
            self._streams.pop(stream_id, None)

    def streams(self) -> list[str]:
        """The streams indexed, sorted."""
        with _locked(self._lock):
            return sorted(self._streams)

    def __len__(self) -> int:
        with _locked(self._lock):
            return sum(s.index.ntotal for s in self._streams.values())

    def search(
        self, stream_id: str, query: np.ndarray, k: int, among: Sequence[int] | np.ndarray | None = None
    ) -> list[tuple[int, float]]:
        """Up to k (seq, inner product) pairs, best first; [] for a stream with nothing indexed.

        `among` restricts the search to those seqs (a time range's clips). Stored vectors are
        L2-normalised, so an L2-normalised query gives cosine similarities.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        with _locked(self._lock):
            s = self._streams.get(stream_id)
            if s is None or s.index.ntotal == 0:
                return []
            if q.shape[1] != s.index.d:
                raise ValueError(f"stream {stream_id!r} is indexed with D={s.index.d}, got a query of D={q.shape[1]}")
            params = None if among is None else faiss.SearchParameters(sel=faiss.IDSelectorBatch(_ids(among)))
            scores, ids = s.index.search(q, min(k, s.index.ntotal), params=params)
        return [(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i != -1]

    def sync_stream(self, store: MemoryStore, stream_id: str) -> int:
        """Catch up with what another process (the split deployment's encoder, a retention sweep) did to the stream:
        add the clips after the highest seq indexed, and prune the evicted ones once they are many. Returns how
        many indexed clips the store may no longer hold (searches ask for that many more hits).

        Cost: the stream's counters, then the new clips' vectors; a prune (one pass over the stream's seqs) only
        every PRUNE_MIN or 1/PRUNE_FRACTION of the stream's clips evicted. A stream deleted and written again
        (its generation changed) is reloaded.
        """
        stats = store.stats(stream_id)
        with _locked(self._lock):
            s = self._streams.get(stream_id)
            if s is not None and s.generation is not None and s.generation != stats.generation:
                del self._streams[stream_id]
                s = None
            after = None if s is None else s.last
        seqs, vectors = store.vectors(stream_id, after=after)
        self.add(stream_id, seqs, vectors)
        with _locked(self._lock):
            s = self._streams.get(stream_id)
            if s is None:
                return 0
            s.generation = stats.generation
            s.stale = max(0, s.index.ntotal - stats.clips)  # over by the clips written since `stats`: a few
            prune = s.stale > max(PRUNE_MIN, s.index.ntotal // PRUNE_FRACTION)
        if prune:
            self.prune(store, stream_id)
        with _locked(self._lock):
            return s.stale

    def prune(self, store: MemoryStore, stream_id: str) -> None:
        """Drop, in one batch, the indexed clips the store no longer holds."""
        held = store.held_seqs(stream_id)
        with _locked(self._lock):
            s = self._streams.get(stream_id)
            if s is None:
                return
            gone = np.setdiff1d(faiss.vector_to_array(s.index.id_map), held, assume_unique=True)
            if len(gone):
                s.index.remove_ids(gone)
            s.stale = 0
        log.info("event=index_pruned stream=%s removed=%d", stream_id, len(gone))

    def rebuild(self, store: MemoryStore) -> None:
        """Replace every index with the store's vectors; holds the lock throughout so no add is lost."""
        with _locked(self._lock):
            streams: dict[str, _Stream] = {}
            for stream_id in store.streams():
                try:
                    generation = store.stats(stream_id).generation
                    seqs, vectors = store.vectors(stream_id)
                except UnknownStream:  # deleted since it was listed
                    continue
                if len(seqs):
                    s = streams[stream_id] = _Stream(_new(vectors.shape[1]), int(seqs.max()), generation)
                    s.index.add_with_ids(vectors, seqs)
            self._streams = streams
        total = sum(s.index.ntotal for s in streams.values())
        log.info("rebuilt clip index: %d streams, %d clips", len(streams), total)
