"""The memory's contract, shared by the Redis and the embedded backend so services never know which one they hold."""

from __future__ import annotations

import abc
import json
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


MAX_EVENTS = 100_000  # event records a store keeps by default (VCFLASH_MAX_EVENTS)


def event_row(record: dict[str, Any]) -> tuple[str, str, str]:
    """(key, alert, the record as JSON without its "id") of an event record, as both backends store it; ValueError
    for a record without a string key and alert, or one that is not JSON-serialisable."""
    key, alert = record.get("key"), record.get("alert")
    if not isinstance(key, str) or not key or not isinstance(alert, str) or not alert:
        raise ValueError(f"an event record needs a non-empty 'key' and 'alert', got {key!r} and {alert!r}")
    return key, alert, json.dumps({k: v for k, v in record.items() if k != "id"}, allow_nan=False)


def check_alert_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"an alert name must be a non-empty string, got {name!r}")
    return name


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
    def put_keys(
        self, stream_id: str, tag: str, seqs: Sequence[int], keys: np.ndarray, *, generation: str | None = None
    ) -> int:
        """Keep clips' keys [len(seqs), Hkv, T, hd] (`reasoner.keys`) beside their tokens, as float16, under `tag`
        (the model and layer that made them, 1-32 of [0-9A-Za-z_.-]); how many clips were held to take them.

        One set a clip: keys under another tag replace it. They go with their clip (eviction, delete_stream) and
        count in its bytes, so a put may evict the stream's oldest clips as `put` does. A seq not held is skipped,
        and nothing is written unless the stream is still of `generation` when given (deleted and made again, its
        seqs name other clips). ValueError for a bad tag, seqs or shape: T must be the clip's tokens and Hkv * hd at
        most their width (keys never outweigh tokens); UnknownStream if the stream is not registered.
        """

    @abc.abstractmethod
    def keys(self, stream_id: str, tag: str, seqs: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(found seqs int64 [m], float16 keys [m, Hkv, T, hd]) of those of `seqs` held with keys under `tag`, in the
        order asked. Keys under another tag, or damaged ones, are misses, never errors; UnknownStream as `tokens`."""

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
        """Forget the stream: its clips (with their keys), retention, counters and config."""

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

    # ---- alerts (issue 14): standing questions, their per-stream evaluation state and the events they emit ----

    @abc.abstractmethod
    def put_alert(self, name: str, config: dict[str, Any]) -> None:
        """Create or replace an alert's JSON-serialisable config, sealed like stream configs (it may hold a webhook
        secret). A new alert (none of that name held) starts with no state, whatever an earlier one of the name left."""

    @abc.abstractmethod
    def alert_configs(self) -> dict[str, dict[str, Any]]:
        """Every stored alert config, by name."""

    @abc.abstractmethod
    def delete_alert(self, name: str) -> bool:
        """Forget the alert's config and its states (its event records stay); False if it was not held."""

    @abc.abstractmethod
    def put_alert_state(self, name: str, stream_id: str, state: dict[str, Any]) -> None:
        """Keep the alert's evaluation state on one stream (JSON-serialisable), replacing any before."""

    @abc.abstractmethod
    def alert_state(self, name: str, stream_id: str) -> dict[str, Any] | None:
        """The state put_alert_state (or append_event) last wrote for (alert, stream), or None."""

    @abc.abstractmethod
    def append_event(
        self, record: dict[str, Any], state: tuple[str, str, dict[str, Any]] | None = None
    ) -> tuple[int, bool]:
        """Store an event record (JSON-serialisable, with a unique `key`) and the alert state that goes with it, in
        one atomic step: if no record with `record["key"]` is held, assign the next id (strictly increasing, never
        reused, surviving restarts), store the record with it, write `state` ((name, stream_id, state)) if given,
        and return (id, True). A key already held returns (its id, False) and writes nothing, so a writer that
        crashed between emitting and saving its state, and emits again, stores the event once.

        Only the newest `max_events` records are kept (the oldest go as new ones come); a key that went with them
        is no longer recognised."""

    @abc.abstractmethod
    def events(self, after: int = 0, limit: int = 1000, alert: str | None = None) -> list[dict[str, Any]]:
        """Up to `limit` event records with id > `after` (of one alert when given), ascending by id, each with its
        "id" (a backend may return fewer than `limit` while more follow: read again from the last id until none
        come). A reader that asks again from the last id it got misses nothing and sees nothing twice."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
