"""A stream's clips ordered by start time on one clock, in RAM: what a time-range pick needs, without the clips.

The embedded store keeps one per stream and clock, loaded from its file on first use and updated on every write
and eviction, so an Ask finds how many clips overlap its range and which seqs sit at the picked positions in
O(log n), then reads only those clips. Pure numpy: no SQLite, no locking (the store's lock covers it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from memory.store import scan_from


@dataclass(frozen=True)
class Run:
    """The clips overlapping a range, as positions in a Timeline: `head` (clips starting at or before the range's
    start that end after it, few: at most a longest clip's worth) then the contiguous positions [lo, hi)."""

    head: np.ndarray  # int64 positions
    lo: int
    hi: int

    def __len__(self) -> int:
        return len(self.head) + self.hi - self.lo

    def at(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """Timeline positions of the run's 0-based `positions`."""
        p = np.asarray(positions, dtype=np.int64)
        h = len(self.head)
        return np.where(p < h, self.head[np.minimum(p, max(h - 1, 0))] if h else 0, self.lo + p - h)


class Timeline:
    """(start, seq)-sorted starts, ends and seqs of one stream on one clock, in growable arrays.

    Appending in order (a live stream) and dropping the oldest (retention) are O(1) amortised; a clip written
    out of order or evicted from the middle costs O(n) once (a shift, or one compaction per batch).
    """

    def __init__(self, starts: np.ndarray, ends: np.ndarray, seqs: np.ndarray) -> None:
        order = np.lexsort((seqs, starts))  # by start, then seq
        n = len(order)
        cap = max(16, 2 * n)
        self._start, self._end, self._seq = np.empty(cap), np.empty(cap), np.empty(cap, dtype=np.int64)
        self._start[:n], self._end[:n], self._seq[:n] = starts[order], ends[order], seqs[order]
        self._lo, self._hi = 0, n  # live window of the arrays
        self.longest = float((ends - starts).max(initial=0.0))  # only grows, like the stores' spans

    def __len__(self) -> int:
        return self._hi - self._lo

    @property
    def starts(self) -> np.ndarray:
        return self._start[self._lo : self._hi]

    @property
    def seqs(self) -> np.ndarray:
        return self._seq[self._lo : self._hi]

    def _room(self) -> None:
        """Make space for one more at the end: move the window to the front, or double the arrays."""
        n = len(self)
        if self._hi < len(self._start):
            return
        if self._lo >= len(self._start) // 2:
            for a in (self._start, self._end, self._seq):
                a[:n] = a[self._lo : self._hi]
        else:
            grow = lambda a: np.concatenate([a[self._lo : self._hi], np.empty(max(16, 2 * n), dtype=a.dtype)])  # noqa: E731
            self._start, self._end, self._seq = grow(self._start), grow(self._end), grow(self._seq)
        self._lo, self._hi = 0, n

    def add(self, seq: int, start: float, end: float) -> None:
        self._room()
        self.longest = max(self.longest, end - start)
        i = self._hi
        if len(self) and (start, seq) < (self._start[i - 1], self._seq[i - 1]):  # out of order: shift the rest
            i = self._lo + int(np.searchsorted(self.starts, start, side="left"))
            i += int(np.searchsorted(self._seq[i : self._hi][self._start[i : self._hi] == start], seq))
            for a in (self._start, self._end, self._seq):
                a[i + 1 : self._hi + 1] = a[i : self._hi].copy()
        self._start[i], self._end[i], self._seq[i] = start, end, seq
        self._hi += 1

    def remove(self, seqs: Iterable[int]) -> None:
        """Drop these seqs (those not held are ignored): O(k) when they are the oldest, else one O(n) pass."""
        gone = np.fromiter(seqs, dtype=np.int64)
        if not len(gone) or not len(self):
            return
        k = min(len(gone), len(self))
        if np.isin(self._seq[self._lo : self._lo + k], gone).all() and len(np.unique(gone)) == k:
            self._lo += k
            return
        keep = ~np.isin(self.seqs, gone)
        n = int(keep.sum())
        for a in (self._start, self._end, self._seq):
            a[:n] = a[self._lo : self._hi][keep]
        self._lo, self._hi = 0, n

    def overlapping(self, start: float | None, end: float | None) -> Run:
        """The clips [s, e) with s < end and e > start (memory.store.MemoryStore.clips): O(log n + head)."""
        starts = self.starts
        hi = len(starts) if end is None else int(np.searchsorted(starts, end, side="left"))
        if start is None:
            return Run(np.empty(0, dtype=np.int64), 0, hi)
        first = int(np.searchsorted(starts, scan_from(start, self.longest), side="left"))
        j = int(np.searchsorted(starts, start, side="right"))  # clips from j start after `start`: they overlap
        head = np.arange(first, min(j, hi), dtype=np.int64)
        head = head[self._end[self._lo + head] > start]
        return Run(head, min(j, hi), hi)

    def seqs_at(self, run: Run, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        return self._seq[self._lo + run.at(positions)]

    def all_seqs(self, run: Run) -> np.ndarray:
        return np.concatenate([self._seq[self._lo + run.head], self._seq[self._lo + run.lo : self._lo + run.hi]])
