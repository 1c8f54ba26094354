"""A single-file memory on the stdlib's SQLite, for deployments without Redis.

WAL with synchronous=NORMAL survives a process crash and costs no fsync per clip (a power cut may lose the
last few commits, never corrupt the file). One connection behind a lock serialises writers of this process;
blobs come last in each row so range scans never read their overflow pages.

A clip row is ~8 KB (its tokens inline), so at 1M clips the table's pages outgrow any cache. Metadata reads by seq
(a pick) go to a covering index (clips_meta, ~40 clips a page) instead; only the tokens an Ask uses come from the
rows. The reasoner's keys of a clip (`put_keys`: 8 KB tiny, 32 KB 2B) sit in its row after the tokens: they go with it.
The file records its layout's version (PRAGMA user_version): an older file is brought up to date on open,
in one transaction, and one from a newer version is refused.

Picks (an Ask's clips) never scan a stream: each stream's clip times sit in RAM (memory.timeline, loaded from the
file on first use, then kept in step by every write and eviction of this process), so a pick finds its positions
in O(log n) and reads only the picked rows by primary key. A write by another process on the same file (`PRAGMA
data_version` changes) makes this one reload the times on its next read. Counts come from the streams table.

The file and its -wal/-shm are the owner's alone (0600); stream and alert configs are sealed (memory.secrets), and
a replaced or deleted config leaves no copy in the file or the WAL (secure_delete, then a truncating checkpoint).
Alert events are rows of their own table, found by id (the primary key) or by alert (an index).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

import memory.codec as codec
from memory.records import ClipMeta, ClipRecord, Clock, Retention, StreamStats, TokenFormat
from memory.secrets import KEY_FILE, ConfigCipher
from memory.store import (
    MAX_EVENTS,
    MemoryStore,
    Picked,
    Positions,
    UnknownStream,
    check_alert_name,
    check_positions,
    event_row,
    scan_from,
)
from memory.timeline import Timeline

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    stream_id TEXT PRIMARY KEY,
    shape TEXT,
    bytes INTEGER NOT NULL DEFAULT 0,
    evicted INTEGER NOT NULL DEFAULT 0,
    max_age_s REAL,
    max_bytes INTEGER,
    config TEXT,
    media_span REAL NOT NULL DEFAULT 0,
    wall_span REAL NOT NULL DEFAULT 0,
    clips INTEGER NOT NULL DEFAULT 0,
    generation TEXT
);
CREATE TABLE IF NOT EXISTS clips (
    stream_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    media_start REAL NOT NULL,
    media_end REAL NOT NULL,
    wall_start REAL NOT NULL,
    wall_end REAL NOT NULL,
    frame_media_times TEXT NOT NULL,
    token_format TEXT NOT NULL,
    n_tokens INTEGER NOT NULL,
    dim INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    vector BLOB NOT NULL,
    tokens BLOB NOT NULL,
    thumbnail BLOB,
    key_tag TEXT,
    key_shape TEXT,
    key_blob BLOB,
    PRIMARY KEY (stream_id, seq)
);
CREATE INDEX IF NOT EXISTS clips_media ON clips (stream_id, media_start, seq);
CREATE INDEX IF NOT EXISTS clips_wall ON clips (stream_id, wall_start, seq);
CREATE INDEX IF NOT EXISTS clips_meta ON clips (stream_id, seq, wall_start, wall_end, media_start, media_end,
    frame_media_times);
CREATE TABLE IF NOT EXISTS alerts (
    name TEXT PRIMARY KEY,
    config TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS alert_states (
    name TEXT NOT NULL,
    stream_id TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (name, stream_id)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    alert TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_alert ON events (alert, id);
"""
# PRAGMA user_version of the layout above. 0: a file from before versions (no clips_meta), brought up on open;
# 1: before alerts (their tables are made on open). AUTOINCREMENT: an event id is never reused, even after the
# newest were evicted, so a reader resuming from an id never takes a new event for one it has seen.
SCHEMA_VERSION = 2
# Per connection. A pick's few hundred pages (meta index leaves, token rows and their overflow pages) and every
# B-tree's interior pages stay cached at any stream size; the default 2 MB is evicted by one Ask at 1M clips.
CACHE_KIB = 65_536

META_COLUMNS = "stream_id, seq, wall_start, wall_end, media_start, media_end, frame_media_times"
# Per clock: a clip's start and end columns, and the stream's column holding its longest clip on that clock.
TIME_COLUMNS: dict[Clock, tuple[str, str, str]] = {
    "media": ("media_start", "media_end", "media_span"),
    "wall": ("wall_start", "wall_end", "wall_span"),
}
NEW_GENERATION = "lower(hex(randomblob(16)))"  # SQL: a stream's generation, made when it is registered


def _meta(row: tuple[Any, ...]) -> ClipMeta:
    return ClipMeta(*row[:6], frame_media_times=tuple(json.loads(row[6])))


def _owner_only(path: Path) -> None:
    """Create `path` as 0600, or tighten it if an older version left it readable by others. SQLite gives the
    -wal and -shm files it creates the mode of the database file."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists() and stat.S_IMODE(file.stat().st_mode) & 0o077:
            file.chmod(0o600)


class EmbeddedStore(MemoryStore):
    def __init__(
        self,
        path: Path,
        token_format: TokenFormat = "fp16",
        busy_timeout_s: float = 5.0,
        cipher: ConfigCipher | None = None,
        max_thumbnail_bytes: int = codec.MAX_THUMBNAIL_BYTES,
        max_events: int = MAX_EVENTS,
    ) -> None:
        """`cipher` seals stream and alert configs; by default with the key file next to the database. A clip whose
        thumbnail is larger than `max_thumbnail_bytes` is refused (ValueError). The newest `max_events` event
        records are kept."""
        self.path = Path(path)
        self.max_events = max_events
        self.token_format = codec.check_format(token_format)
        self.max_thumbnail_bytes = max_thumbnail_bytes
        self.cipher = cipher or ConfigCipher(key_file=self.path.parent / KEY_FILE)
        self._lock = threading.RLock()  # held around each transaction and the timelines it keeps in step
        self._timelines: dict[str, dict[Clock, Timeline]] = {}  # per stream, loaded on first use
        _owner_only(self.path)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA secure_delete = FAST")  # zero deleted rows where it costs no extra I/O
        self._conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        with self._tx() as db:
            self._migrate(db)
        self._data_version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        log.info("embedded memory at %s (%s tokens)", self.path, self.token_format)

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock: IMMEDIATE for writes (no upgrade deadlocks), DEFERRED for reads.

        Timelines are updated inside write transactions; one that fails forgets them all (reloaded when next used).
        """
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                self._timelines.clear()
                raise

    def _timeline(self, db: sqlite3.Connection, stream_id: str) -> dict[Clock, Timeline]:
        """The stream's timelines (UnknownStream if it is not registered), loaded on first use: one scan of the
        time columns, by index, without the blobs. Under the lock."""
        version = db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:  # another connection wrote the file: what is in RAM may be stale
            self._timelines.clear()
            self._data_version = version
        if stream_id in self._timelines:
            return self._timelines[stream_id]
        self._stream(db, stream_id)
        rows = db.execute(
            "SELECT seq, media_start, media_end, wall_start, wall_end FROM clips WHERE stream_id = ?", (stream_id,)
        ).fetchall()
        a = np.array(rows, dtype=np.float64).reshape(-1, 5)
        seqs = a[:, 0].astype(np.int64)
        timelines: dict[Clock, Timeline] = {
            "media": Timeline(a[:, 1], a[:, 2], seqs),
            "wall": Timeline(a[:, 3], a[:, 4], seqs),
        }
        self._timelines[stream_id] = timelines
        return timelines

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Create the layout, or bring an older file up to it, in the caller's one transaction: a crash or an error
        part way leaves the file as it was. Each step is idempotent and only does work on a file that lacks it."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        older = version < SCHEMA_VERSION and db.execute("SELECT 1 FROM sqlite_master WHERE name = 'clips'").fetchone()
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"memory at {self.path} has schema version {version}; this vcflash reads up to {SCHEMA_VERSION}"
            )
        for statement in SCHEMA.split(";"):  # not executescript: it commits first
            db.execute(statement)
        self._add_spans(db)
        self._add_counters(db)
        self._add_thumbnails(db)
        self._add_keys(db)
        if version < SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if older:
            log.info("memory at %s: migrated from schema version %d to %d", self.path, version, SCHEMA_VERSION)

    def _add_spans(self, db: sqlite3.Connection) -> None:
        """Give a file written before streams kept their longest clip (media_span, wall_span) those columns."""
        if "media_span" in {row[1] for row in db.execute("PRAGMA table_info(streams)")}:
            return
        for start, end, span in TIME_COLUMNS.values():
            db.execute(f"ALTER TABLE streams ADD COLUMN {span} REAL NOT NULL DEFAULT 0")
            db.execute(
                f"UPDATE streams SET {span} = (SELECT COALESCE(MAX(MAX({end} - {start}, 0)), 0) FROM clips "
                "WHERE clips.stream_id = streams.stream_id)"
            )
        log.info("memory at %s: added each stream's longest clip, which bounds time-range scans", self.path)

    def _add_counters(self, db: sqlite3.Connection) -> None:
        """Give a file written before streams counted their clips (clips, generation) those columns, once."""
        if "clips" in {row[1] for row in db.execute("PRAGMA table_info(streams)")}:
            return
        db.execute("ALTER TABLE streams ADD COLUMN clips INTEGER NOT NULL DEFAULT 0")
        db.execute("ALTER TABLE streams ADD COLUMN generation TEXT")
        db.execute("UPDATE streams SET clips = (SELECT COUNT(*) FROM clips WHERE clips.stream_id = streams.stream_id)")
        db.execute(f"UPDATE streams SET generation = {NEW_GENERATION}")
        log.info("memory at %s: added each stream's clip counter", self.path)

    def _add_thumbnails(self, db: sqlite3.Connection) -> None:
        """Give a file written before clips kept a thumbnail that column (NULL in the clips it holds)."""
        if "thumbnail" in {row[1] for row in db.execute("PRAGMA table_info(clips)")}:
            return
        db.execute("ALTER TABLE clips ADD COLUMN thumbnail BLOB")
        log.info("memory at %s: clips keep a thumbnail from now on", self.path)

    def _add_keys(self, db: sqlite3.Connection) -> None:
        """Give a file written before clips kept the reasoner's keys (reasoner.keys) those columns (NULL: none)."""
        if "key_blob" in {row[1] for row in db.execute("PRAGMA table_info(clips)")}:
            return
        for column in ("key_tag TEXT", "key_shape TEXT", "key_blob BLOB"):
            db.execute(f"ALTER TABLE clips ADD COLUMN {column}")
        log.info("memory at %s: clips keep the reasoner's keys from now on", self.path)

    @staticmethod
    def _stream(db: sqlite3.Connection, stream_id: str) -> tuple[Any, ...]:
        row = db.execute(
            "SELECT shape, bytes, evicted, max_age_s, max_bytes, clips, generation FROM streams WHERE stream_id = ?",
            (stream_id,),
        ).fetchone()
        if row is None:
            raise UnknownStream(stream_id)
        return row

    @staticmethod
    def _register(db: sqlite3.Connection, stream_id: str) -> None:
        codec.check_stream_id(stream_id)
        db.execute(f"INSERT OR IGNORE INTO streams (stream_id, generation) VALUES (?, {NEW_GENERATION})", (stream_id,))

    def put(self, record: ClipRecord) -> bool:
        enc = codec.encode(record, self.token_format, self.max_thumbnail_bytes)
        m = enc.meta
        with self._tx() as db:
            self._register(db, m.stream_id)
            shape = self._stream(db, m.stream_id)[0]
            if shape is not None and shape != enc.shape:
                raise ValueError(f"stream {m.stream_id!r} holds {shape} tokens, clip {m.seq} has {enc.shape}")
            inserted = db.execute(
                "INSERT OR IGNORE INTO clips (stream_id, seq, media_start, media_end, wall_start, wall_end, "
                "frame_media_times, token_format, n_tokens, dim, nbytes, vector, tokens, thumbnail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    m.stream_id,
                    m.seq,
                    m.media_start,
                    m.media_end,
                    m.wall_start,
                    m.wall_end,
                    json.dumps(m.frame_media_times),
                    enc.token_format,
                    enc.n_tokens,
                    enc.dim,
                    enc.nbytes,
                    enc.vector,
                    enc.tokens,
                    enc.thumbnail or None,
                ),
            ).rowcount
            if not inserted:
                return False
            total, max_bytes = db.execute(
                "UPDATE streams SET shape = ?, bytes = bytes + ?, clips = clips + 1, media_span = MAX(media_span, ?), "
                "wall_span = MAX(wall_span, ?) WHERE stream_id = ? RETURNING bytes, max_bytes",
                (enc.shape, enc.nbytes, m.media_end - m.media_start, m.wall_end - m.wall_start, m.stream_id),
            ).fetchone()
            if (timelines := self._timelines.get(m.stream_id)) is not None:
                timelines["media"].add(m.seq, m.media_start, m.media_end)
                timelines["wall"].add(m.seq, m.wall_start, m.wall_end)
            if max_bytes is not None and total > max_bytes:
                evicted = self._evict_oldest(db, m.stream_id, total - max_bytes)
                log.debug("stream %r over %d bytes: evicted seqs %s on put", m.stream_id, max_bytes, evicted)
        return True

    def _evict_oldest(self, db: sqlite3.Connection, stream_id: str, excess: int) -> list[int]:
        """Evict clips oldest-first (by wall_start, seq) until at least `excess` bytes are freed."""
        seqs, freed = [], 0
        rows = db.execute("SELECT seq, nbytes FROM clips WHERE stream_id = ? ORDER BY wall_start, seq", (stream_id,))
        for seq, nbytes in rows:
            if freed >= excess:
                break
            seqs.append(seq)
            freed += nbytes
        rows.close()
        self._delete(db, stream_id, seqs)
        return seqs

    def _delete(self, db: sqlite3.Connection, stream_id: str, seqs: list[int]) -> None:
        if not seqs:
            return
        freed = db.execute(
            "DELETE FROM clips WHERE stream_id = ? AND seq IN (SELECT value FROM json_each(?)) RETURNING nbytes",
            (stream_id, json.dumps(seqs)),
        ).fetchall()
        db.execute(
            "UPDATE streams SET bytes = bytes - ?, evicted = evicted + ?, clips = clips - ? WHERE stream_id = ?",
            (sum(n for (n,) in freed), len(freed), len(freed), stream_id),
        )
        for timeline in self._timelines.get(stream_id, {}).values():
            timeline.remove(seqs)

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
        with self._tx(write=False) as db:
            timeline = self._timeline(db, stream_id)[clock]
            run = timeline.overlapping(start, end)
            n = len(run)
            wanted = check_positions(positions(n), n)
            if not n:
                return Picked(0, [], None, None, np.empty(0, dtype=np.int64) if with_seqs else None)
            seqs = timeline.seqs_at(run, wanted).tolist()
            first, last = timeline.seqs_at(run, [0, n - 1]).tolist()
            metas = self._metas(db, stream_id, [*seqs, first, last])
            every = timeline.all_seqs(run) if with_seqs else None
        return Picked(n, [metas[s] for s in seqs if s in metas], metas.get(first), metas.get(last), every)

    def clips(
        self,
        stream_id: str,
        start: float | None = None,
        end: float | None = None,
        *,
        clock: Clock = "media",
        limit: int | None = None,
    ) -> list[ClipMeta]:
        """A listing reads the range in index order (one range scan), faster than a pick of every position."""
        start_col, end_col, span_col = TIME_COLUMNS[clock]
        with self._tx(write=False) as db:
            row = db.execute(f"SELECT {span_col} FROM streams WHERE stream_id = ?", (stream_id,)).fetchone()
            if row is None:
                raise UnknownStream(stream_id)
            # The index scans from scan_from(start, the longest clip), bounded; the test on the end is exact.
            rows = db.execute(
                f"SELECT {META_COLUMNS} FROM clips WHERE stream_id = ? AND {start_col} >= ? AND {start_col} < ? "
                f"AND {end_col} > ? ORDER BY {start_col}, seq LIMIT ?",
                (
                    stream_id,
                    scan_from(start, row[0]),
                    math.inf if end is None else end,
                    -math.inf if start is None else start,
                    -1 if limit is None else limit,
                ),
            ).fetchall()
        return [_meta(r) for r in rows]

    @staticmethod
    def _metas(db: sqlite3.Connection, stream_id: str, seqs: Sequence[int]) -> dict[int, ClipMeta]:
        rows = db.execute(
            # covering: ~40 clips a page, never the ~8 KB rows (whose pages outgrow any cache at 1M clips)
            f"SELECT {META_COLUMNS} FROM clips INDEXED BY clips_meta "
            "WHERE stream_id = ? AND seq IN (SELECT value FROM json_each(?))",
            (stream_id, json.dumps(sorted({int(s) for s in seqs}))),
        ).fetchall()
        return {r[1]: _meta(r) for r in rows}

    def metas(self, stream_id: str, seqs: Sequence[int]) -> dict[int, ClipMeta]:
        with self._tx(write=False) as db:
            self._stream(db, stream_id)
            return self._metas(db, stream_id, seqs)

    def tokens(self, stream_id: str, seqs: Sequence[int]) -> np.ndarray:
        seqs = [int(s) for s in seqs]
        with self._tx(write=False) as db:
            shape = self._stream(db, stream_id)[0]
            rows = db.execute(
                "SELECT seq, tokens, token_format, n_tokens, dim FROM clips "
                "WHERE stream_id = ? AND seq IN (SELECT value FROM json_each(?))",
                (stream_id, json.dumps(seqs)),
            ).fetchall()
        return codec.stack_tokens(stream_id, seqs, shape, {r[0]: r[1:] for r in rows})

    def put_keys(
        self, stream_id: str, tag: str, seqs: Sequence[int], keys: np.ndarray, *, generation: str | None = None
    ) -> int:
        enc = codec.encode_keys(stream_id, tag, seqs, keys)
        with self._tx() as db:
            shape, _, _, _, _, _, held_generation = self._stream(db, stream_id)
            if generation is not None and held_generation != generation:
                return 0
            codec.check_keys_fit(stream_id, enc, shape)
            held = dict(  # seq -> the bytes of the keys it holds now, which the new ones replace
                db.execute(
                    "SELECT seq, COALESCE(LENGTH(key_blob), 0) FROM clips "
                    "WHERE stream_id = ? AND seq IN (SELECT value FROM json_each(?))",
                    (stream_id, json.dumps(enc.seqs)),
                ).fetchall()
            )
            rows = [(seq, blob) for seq, blob in zip(enc.seqs, enc.blobs, strict=True) if seq in held]
            db.executemany(
                "UPDATE clips SET key_tag = ?, key_shape = ?, key_blob = ?, nbytes = nbytes + ? "
                "WHERE stream_id = ? AND seq = ?",
                [(tag, enc.shape, blob, len(blob) - held[seq], stream_id, seq) for seq, blob in rows],
            )
            total, max_bytes = db.execute(
                "UPDATE streams SET bytes = bytes + ? WHERE stream_id = ? RETURNING bytes, max_bytes",
                (sum(len(blob) - held[seq] for seq, blob in rows), stream_id),
            ).fetchone()
            if max_bytes is not None and total > max_bytes:
                evicted = self._evict_oldest(db, stream_id, total - max_bytes)
                log.debug("stream %r over %d bytes: evicted seqs %s on put_keys", stream_id, max_bytes, evicted)
        return len(rows)

    def keys(self, stream_id: str, tag: str, seqs: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        codec.check_tag(tag)
        seqs = [int(s) for s in seqs]
        with self._tx(write=False) as db:
            self._stream(db, stream_id)
            rows = db.execute(
                "SELECT seq, key_tag, key_shape, key_blob FROM clips "
                "WHERE stream_id = ? AND seq IN (SELECT value FROM json_each(?)) AND key_tag = ?",
                (stream_id, json.dumps(seqs), tag),
            ).fetchall()
        return codec.stack_keys(stream_id, seqs, {r[0]: r[1:] for r in rows}, tag)

    def thumbnails(self, stream_id: str, seqs: Sequence[int]) -> dict[int, bytes]:
        with self._tx(write=False) as db:
            self._stream(db, stream_id)
            rows = db.execute(
                "SELECT seq, thumbnail FROM clips WHERE stream_id = ? AND seq IN (SELECT value FROM json_each(?)) "
                "AND thumbnail IS NOT NULL",
                (stream_id, json.dumps(sorted({int(s) for s in seqs}))),
            ).fetchall()
        return {seq: bytes(blob) for seq, blob in rows}

    def vectors(self, stream_id: str, after: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        with self._tx(write=False) as db:
            shape = self._stream(db, stream_id)[0]
            rows = db.execute(
                "SELECT seq, vector, token_format, dim FROM clips WHERE stream_id = ? AND seq > ? ORDER BY seq",
                (stream_id, -1 if after is None else int(after)),
            ).fetchall()
        dim = int(shape.split("x")[1]) if shape else 0
        vectors = np.empty((len(rows), dim), dtype=np.float32)
        for i, (_, blob, fmt, d) in enumerate(rows):
            vectors[i] = codec.decode_vector(blob, fmt, d)
        return np.array([r[0] for r in rows], dtype=np.int64), vectors

    def held_seqs(self, stream_id: str) -> np.ndarray:
        with self._tx(write=False) as db:
            return np.sort(self._timeline(db, stream_id)["media"].seqs)

    def streams(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT stream_id FROM streams ORDER BY stream_id")]

    def stats(self, stream_id: str) -> StreamStats:
        with self._tx(write=False) as db:
            _, nbytes, evicted, max_age_s, max_bytes, count, generation = self._stream(db, stream_id)
            ends = [
                db.execute(
                    f"SELECT {META_COLUMNS} FROM clips WHERE stream_id = ? ORDER BY wall_start {o}, seq {o} LIMIT 1",
                    (stream_id,),
                ).fetchone()
                for o in ("ASC", "DESC")
            ]
        first, last = (None if r is None else _meta(r) for r in ends)
        retention = Retention(max_age_s, max_bytes)
        return StreamStats(stream_id, count, nbytes, first, last, retention, evicted, generation or "")

    def delete_stream(self, stream_id: str) -> None:
        with self._tx() as db:
            self._stream(db, stream_id)
            db.execute("DELETE FROM clips WHERE stream_id = ?", (stream_id,))
            db.execute("DELETE FROM streams WHERE stream_id = ?", (stream_id,))
            self._timelines.pop(stream_id, None)
        self._purge()
        log.info("deleted stream %r", stream_id)

    def set_retention(self, stream_id: str, retention: Retention) -> None:
        with self._tx() as db:
            self._register(db, stream_id)
            db.execute(
                "UPDATE streams SET max_age_s = ?, max_bytes = ? WHERE stream_id = ?",
                (retention.max_age_s, retention.max_bytes, stream_id),
            )

    def enforce_retention(self, now: float | None = None) -> dict[str, list[int]]:
        now = time.time() if now is None else now
        with self._lock:
            limited = self._conn.execute(
                "SELECT stream_id FROM streams WHERE max_age_s IS NOT NULL OR max_bytes IS NOT NULL"
            ).fetchall()
        evicted: dict[str, list[int]] = {}
        for (stream_id,) in limited:
            with self._tx() as db:  # one transaction per stream, so puts to other streams are not held up
                seqs = self._enforce(db, stream_id, now)
            if seqs:
                evicted[stream_id] = seqs
                log.info("retention evicted %d clips of stream %r", len(seqs), stream_id)
        return evicted

    def _enforce(self, db: sqlite3.Connection, stream_id: str, now: float) -> list[int]:
        try:
            _, _, _, max_age_s, max_bytes, _, _ = self._stream(db, stream_id)
        except UnknownStream:  # deleted since it was listed
            return []
        seqs: list[int] = []
        if max_age_s is not None:
            cutoff = now - max_age_s
            seqs = [
                seq
                for (seq,) in db.execute(
                    "SELECT seq FROM clips WHERE stream_id = ? AND wall_start < ? AND wall_end < ?",
                    (stream_id, cutoff, cutoff),
                )
            ]
            self._delete(db, stream_id, seqs)
        if max_bytes is not None:
            (total,) = db.execute("SELECT bytes FROM streams WHERE stream_id = ?", (stream_id,)).fetchone()
            if total > max_bytes:
                seqs += self._evict_oldest(db, stream_id, total - max_bytes)
        return seqs

    def put_stream_config(self, stream_id: str, config: dict[str, Any]) -> None:
        sealed = self.cipher.seal(config)
        with self._tx() as db:
            self._register(db, stream_id)
            db.execute("UPDATE streams SET config = ? WHERE stream_id = ?", (sealed, stream_id))
        self._purge()  # the config it replaced may be plain JSON from an older version

    def stream_configs(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute("SELECT stream_id, config FROM streams WHERE config IS NOT NULL").fetchall()
        return self.cipher.unseal_all(dict(rows))

    def put_alert(self, name: str, config: dict[str, Any]) -> None:
        sealed = self.cipher.seal(config)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM alerts WHERE name = ?", (check_alert_name(name),)).fetchone() is None:
                db.execute("DELETE FROM alert_states WHERE name = ?", (name,))  # left by a write racing a delete
            db.execute("INSERT OR REPLACE INTO alerts (name, config) VALUES (?, ?)", (name, sealed))
        self._purge()  # the config it replaced may hold another webhook secret

    def alert_configs(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute("SELECT name, config FROM alerts").fetchall()
        return self.cipher.unseal_all(dict(rows))

    def delete_alert(self, name: str) -> bool:
        with self._tx() as db:
            deleted = db.execute("DELETE FROM alerts WHERE name = ?", (name,)).rowcount
            db.execute("DELETE FROM alert_states WHERE name = ?", (name,))
        self._purge()
        return bool(deleted)

    @staticmethod
    def _put_state(db: sqlite3.Connection, name: str, stream_id: str, state: dict[str, Any]) -> None:
        db.execute(
            "INSERT OR REPLACE INTO alert_states (name, stream_id, state) VALUES (?, ?, ?)",
            (check_alert_name(name), stream_id, json.dumps(state)),
        )

    def put_alert_state(self, name: str, stream_id: str, state: dict[str, Any]) -> None:
        with self._tx() as db:
            self._put_state(db, name, stream_id, state)

    def alert_state(self, name: str, stream_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT state FROM alert_states WHERE name = ? AND stream_id = ?", (name, stream_id)
            ).fetchone()
        return None if row is None else json.loads(row[0])

    def append_event(
        self, record: dict[str, Any], state: tuple[str, str, dict[str, Any]] | None = None
    ) -> tuple[int, bool]:
        key, alert, text = event_row(record)
        with self._tx() as db:
            held = db.execute("SELECT id FROM events WHERE key = ?", (key,)).fetchone()
            if held is not None:
                return held[0], False
            event_id = db.execute(
                "INSERT INTO events (key, alert, record) VALUES (?, ?, ?)", (key, alert, text)
            ).lastrowid
            if state is not None:
                self._put_state(db, *state)
            # keep the newest max_events: by the primary key, O(log n) a write
            db.execute(
                "DELETE FROM events WHERE id <= (SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (self.max_events,),
            )
        return int(event_id), True

    def events(self, after: int = 0, limit: int = 1000, alert: str | None = None) -> list[dict[str, Any]]:
        where = "id > ?" + ("" if alert is None else " AND alert = ?")
        args = (int(after), *(() if alert is None else (alert,)), int(limit))
        with self._lock:
            rows = self._conn.execute(
                f"SELECT id, record FROM events WHERE {where} ORDER BY id LIMIT ?", args
            ).fetchall()
        return [{"id": event_id} | json.loads(text) for event_id, text in rows]

    def _purge(self) -> None:
        """Copy the WAL into the file and empty it, so no old page (an old config) outlives its replacement; rare
        (config writes, stream deletes), so the checkpoint's cost does not matter."""
        with self._lock:
            busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            log.warning("event=wal_checkpoint_busy path=%s: old pages stay in the WAL until the next one", self.path)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
