"""The memory's contract, shared by the Redis and the embedded backend so services never know which one they hold."""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
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

    @abc.abstractmethod
    def clips(
        self, stream_id: str, start: float | None = None, end: float | None = None, *, clock: Clock = "media"
    ) -> list[ClipMeta]:
        """Clips that overlap [start, end) on `clock` (None: open end), ascending by (start time, seq).

        A clip [s, e) overlaps when s < end and e > start, so a range inside one clip finds it, and a clip that
        ends exactly at `start` (or starts at `end`) is not in the range.
        """

    @abc.abstractmethod
    def tokens(self, stream_id: str, seqs: Sequence[int]) -> np.ndarray:
        """Float16 [len(seqs), T, D] tokens in the order asked; KeyError naming the seqs that are not held."""

    @abc.abstractmethod
    def vectors(self, stream_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(seqs int64 [n], vectors float32 [n, D]) of every clip held, ascending by seq, to rebuild an index."""

    @abc.abstractmethod
    def streams(self) -> list[str]:
        """Known stream ids, sorted."""

    @abc.abstractmethod
    def stats(self, stream_id: str) -> StreamStats:
        """Counts, bytes and the oldest and newest clip (by wall time) of one stream."""

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
