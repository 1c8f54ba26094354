"""The memory's contract, shared by the Redis and the embedded backend so services never know which one they hold."""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import numpy as np

from memory.records import ClipMeta, ClipRecord, Clock, Retention, StreamStats
from vcflash.serve.errors import NotFound, Unavailable, excerpt

SCAN_MARGIN_S = 1e-3


def scan_from(start: float | None, longest: float) -> float:
    """The earliest start time a clip ending after `start` can have, for index scans by start time.

    A clip starts at most `longest` (the stream's longest clip on that clock) before it ends. The scan begins a
    millisecond earlier still, so float rounding of the subtraction never loses a clip; backends then test the
    end exactly. Bounding by the longest clip, rather than indexing ends too, keeps one index per clock and
    one range scan: a stream's clips last about the same (4 sampled frames), so it reads a clip or two more.
    """
    return -math.inf if start is None else start - longest - SCAN_MARGIN_S


Positions = Callable[[int], Sequence[int]]  # n (clips in a range) -> the 0-based positions to read, ascending


@dataclass(frozen=True)
class Picked:
    """Some of the clips that overlap a time range, read without reading the others (MemoryStore.pick)."""

    count: int  # clips overlapping the range
    clips: list[ClipMeta]  # those at the positions asked, in (start, seq) order on the clock
    first: ClipMeta | None  # the first and the last overlapping clip (None when count is 0)
    last: ClipMeta | None
    seqs: np.ndarray | None = None  # int64 [count]: every overlapping clip's seq, in order, when asked for


def check_positions(positions: Sequence[int], n: int) -> list[int]:
    """`positions` as a list, or ValueError unless they ascend strictly within [0, n)."""
    out = [int(p) for p in positions]
    if any(b <= a for a, b in zip(out, out[1:], strict=False)) or (out and not 0 <= out[0] <= out[-1] < n):
        more = "..." if len(out) > 8 else ""
        raise ValueError(f"positions must ascend strictly within [0, {n}), got {out[:8]}{more}")
    return out


class MemoryUnavailable(Unavailable):
    """The backend cannot be reached (connection refused, timeout); the gRPC layer answers UNAVAILABLE."""

    def __str__(self) -> str:
        return f"memory unavailable: {super().__str__()}"


class UnknownStream(NotFound):
    """The stream has never been written (or was deleted)."""

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"unknown stream {excerpt(stream_id)}")
        self.stream_id = stream_id


class MemoryStore(abc.ABC):
    """Durable, timestamped clip memory. All calls are blocking; services run them through asyncio.to_thread."""

    @abc.abstractmethod
    def put(self, record: ClipRecord) -> bool:
        """Store a clip atomically; False if (stream_id, seq) was already there (then nothing changes).

        Registers a new stream, and evicts the stream's oldest clips (by wall time) while it holds more than
        its retention's max_bytes, so memory stays bounded without enforce_retention.
        """

    def clips(
        self,
        stream_id: str,
        start: float | None = None,
        end: float | None = None,
        *,
        clock: Clock = "media",
        limit: int | None = None,
    ) -> list[ClipMeta]:
        """Clips that overlap [start, end) on `clock` (None: open end), ascending by (start time, seq); the first
        `limit` of them when given.

        A clip [s, e) overlaps when s < end and e > start, so a range inside one clip finds it, and a clip that
        ends exactly at `start` (or starts at `end`) is not in the range. Reads those clips only (`pick`).
        """
        first_n = lambda n: range(n if limit is None else min(n, limit))  # noqa: E731
        return self.pick(stream_id, start, end, first_n, clock=clock).clips

    @abc.abstractmethod
    def pick(
        self,
        stream_id: str,
        start: float | None,
        end: float | None,
        positions: Positions,
        *,
        clock: Clock = "media",
        with_seqs: bool = False,
    ) -> Picked:
        """The clips at `positions(n)` among the n clips that overlap [start, end) on `clock` (as `clips` orders
        them), with the first and the last; `with_seqs` adds every overlapping clip's seq.

        The cost is that of the positions asked (and with_seqs, of n seqs), not of the stream: a backend finds n
        and each position from a time index (O(log N) each), then reads only the picked clips' metadata. Clips
        evicted while the pick runs may be missing from `clips`. ValueError if the positions do not ascend
        strictly within [0, n).
        """

    @abc.abstractmethod
    def metas(self, stream_id: str, seqs: Sequence[int]) -> dict[int, ClipMeta]:
        """The metadata of those of `seqs` the stream holds, by seq (a seq not held is left out)."""

    @abc.abstractmethod
    def tokens(self, stream_id: str, seqs: Sequence[int]) -> np.ndarray:
        """Float16 [len(seqs), T, D] tokens in the order asked; KeyError naming the seqs that are not held."""

    @abc.abstractmethod
    def thumbnails(self, stream_id: str, seqs: Sequence[int]) -> dict[int, bytes]:
        """The JPEG thumbnails of those of `seqs` the stream holds with one, by seq (UnknownStream if it is not
        registered; a seq not held, or stored without a thumbnail, is left out). O(1) per seq."""

    @abc.abstractmethod
    def vectors(self, stream_id: str, after: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(seqs int64 [n], vectors float32 [n, D]) of every clip held (with `after`: of those with a greater seq),
        ascending by seq: to build an index, or to bring one up to date at the cost of the clips it lacks."""

    @abc.abstractmethod
    def held_seqs(self, stream_id: str) -> np.ndarray:
        """Every seq held, int64 ascending: for an index to drop, in one batch, the clips evicted elsewhere."""

    @abc.abstractmethod
    def streams(self) -> list[str]:
        """Known stream ids, sorted."""

    @abc.abstractmethod
    def stats(self, stream_id: str) -> StreamStats:
        """Counts, bytes and the oldest and newest clip (by wall time) of one stream, from counters and the
        time index: O(1) in the stream's size."""

    @abc.abstractmethod
    def delete_stream(self, stream_id: str) -> None:
        """Forget the stream: its clips, retention, counters and config."""

    @abc.abstractmethod
    def set_retention(self, stream_id: str, retention: Retention) -> None:
        """Set the stream's limits (registering it if new); they are applied by put and enforce_retention."""

    @abc.abstractmethod
    def enforce_retention(self, now: float | None = None) -> dict[str, list[int]]:
        """Evict, per stream, clips with wall_end < now - max_age_s, then the oldest until bytes <= max_bytes.

        Returns the evicted seqs of each stream that lost any, so the caller can drop them from its index.
        `now` defaults to time.time().
        """

    @abc.abstractmethod
    def put_stream_config(self, stream_id: str, config: dict[str, Any]) -> None:
        """Durably keep a JSON-serialisable config for the stream (registering it if new), replacing any before."""

    @abc.abstractmethod
    def stream_configs(self) -> dict[str, dict[str, Any]]:
        """Every stored stream config, by stream id."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
