"""The key index: each clip's keys at the scoring layer (`hico.relevance.clip_keys`), kept in RAM per stream.

A clip's keys depend on nothing but its tokens, so they are computed once: ahead, as clips are written
(`KeyIndexer` follows memory in the background), or else the first time a question needs them (built lazily and
counted, never an error). A question then costs one short prefill for its query and one product with the range's
keys (`hico.relevance.block_scores`).

Persisted: with `StoredKeys`, memory keeps each clip's keys beside its tokens (`MemoryStore.put_keys`, float16,
under a tag naming the model, layer and dtype that made them, `key_tag`). What memory holds for the tag is loaded
before anything is computed, so a restarted reasoner, or another replica, fills its blocks from memory and computes
only the clips nobody has; what it computes it writes back. Keys are a cache and tokens the truth: a memory that
fails to read or keep them is logged and counted (`store_failures`), and the keys are built, or kept in RAM only.

Layout: each stream's keys are one growable block [Hkv, hd, rows * T] (`hico.relevance.key_block`: each kv head's
keys one [hd, tokens] matrix, which is what the product with the query reads without a transpose; measured on
this VM's CPU, 9.5 ms against 12.6 ms for [Hkv, tokens, hd] over 7,500 clips), rows ascending by seq. A range
whose clips are all held is a run of rows, so its keys are a view of the block: no stack, no copy, no conversion
per question. The block is float32 on a CPU (its half-precision GEMM is ~3x slower than float32 here) and the
model's dtype on an accelerator: Hkv x hd x T values per clip, 2 x 32 x 64 x 4 B = 16 KB for the tiny model and
2 x 128 x 64 x 2 B = 32 KB (16.7% of the clip's tokens) for the 2B on a GPU (64 KB in float32 on a CPU).

Bounded: past `max_clips` clips in all, the oldest clips (lowest seqs) of the least recently used stream are dropped
first, never the clips of the question being answered (which may exceed the cap alone); `KeyIndexer` also drops the
keys of clips retention evicted (always a stream's oldest). Dropping the oldest rows only moves the block's start;
the block is copied when it grows, when it holds under a quarter of its capacity, or when keys older than its newest
arrive (a gap built lazily), so a copy is amortised, never per question. A view handed out stays valid: nothing
writes rows it covers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hico.model import VideoChatFlashModel
from hico.relevance import context_prefix, default_layer, key_block
from memory.store import MemoryStore, UnknownStream

log = logging.getLogger(__name__)

GROWTH = 1.5  # a full block grows to this many times its rows
LOAD_BATCH = 256  # clips' keys `KeyIndexer` reads from memory at once (8 MB for the 2B): no model time, so not sized
KEYS_LAYOUT = 1  # in every tag: raised when `clip_keys` computes other keys from the same weights, so old ones miss
SAMPLED = 4096  # values of each LLM tensor a tag digests


def key_tag(model: VideoChatFlashModel, layer: int) -> str:
    """The tag memory keeps keys under (`MemoryStore.put_keys`): a digest of what makes them: the LLM's config, the
    scoring layer, the model's dtype, the context a clip is spliced into, and the weights (each LLM tensor's name,
    shape and `SAMPLED` evenly spaced values: a fine-tune changes them everywhere, and hashing all of a 2B's weights
    would cost seconds at every start). Keys of another model, layer or dtype are then misses, never used."""
    h = hashlib.blake2b(digest_size=8)
    made_by = [KEYS_LAYOUT, layer, str(model.dtype), dataclasses.asdict(model.config.text), context_prefix(model)]
    h.update(json.dumps(made_by, sort_keys=True).encode())
    for name, p in model.llm.named_parameters():
        flat = p.detach().reshape(-1)
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(flat[:: max(1, len(flat) // SAMPLED)][:SAMPLED].float().cpu().numpy().tobytes())
    return f"k{KEYS_LAYOUT}-{h.hexdigest()}"


@dataclass(frozen=True)
class StoredKeys:
    """Memory keeping each clip's keys beside its tokens, under `tag` (`key_tag` of the model that makes them)."""

    store: MemoryStore
    tag: str

    @classmethod
    def of(cls, store: MemoryStore, model: VideoChatFlashModel) -> StoredKeys:
        """For the keys `reasoner.engine.Reasoner.clip_keys` makes: at the model's default scoring layer."""
        return cls(store, key_tag(model, default_layer(model.config.text)))


def capacity_for(rows: int) -> int:
    """Rows to allocate for a block that must hold `rows`: room to grow, 16 at least."""
    return max(rows, int(rows * GROWTH), 16)


@dataclass
class _Block:
    """One stream's keys: rows lo..hi-1 of `keys` [Hkv, hd, capacity * T] hold the clips `seqs[lo:hi]`, ascending."""

    keys: torch.Tensor
    seqs: np.ndarray  # int64 [capacity]
    tokens: int  # T, key columns per clip
    generation: str | None
    lo: int = 0
    hi: int = 0

    @property
    def held(self) -> np.ndarray:
        return self.seqs[self.lo : self.hi]

    def rows(self, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row of each seq, whether it is held)."""
        held = self.held
        at = np.searchsorted(held, seqs)
        found = at < len(held)
        found[found] = held[at[found]] == seqs[found]
        return self.lo + at, found

    def reallocate(self, size: int) -> None:
        """Copy the held rows to the start of a new block of `size` rows (views handed out keep the old one)."""
        t, n = self.tokens, self.hi - self.lo
        keys = self.keys.new_empty(*self.keys.shape[:2], size * t)
        keys[:, :, : n * t] = self.keys[:, :, self.lo * t : self.hi * t]
        seqs = np.empty(size, np.int64)
        seqs[:n] = self.held
        self.keys, self.seqs, self.lo, self.hi = keys, seqs, 0, n

    def shrink(self) -> None:
        """A block holding under a quarter of its capacity (its oldest rows dropped) is copied to a smaller one,
        so a stream that stopped growing gives its memory back."""
        n, size = self.hi - self.lo, capacity_for(self.hi - self.lo)
        if 4 * n < self.keys.shape[2] // self.tokens and size * self.tokens < self.keys.shape[2]:
            self.reallocate(size)

    def columns(self, rows: np.ndarray) -> torch.Tensor:
        """The keys [Hkv, hd, len(rows) * T] of the clips at `rows`, in that order: a view when they are a run."""
        t, n = self.tokens, len(rows)
        if n and rows[-1] - rows[0] == n - 1 and (n == 1 or bool((np.diff(rows) == 1).all())):
            return self.keys[:, :, rows[0] * t : (rows[-1] + 1) * t]
        hkv, hd, _ = self.keys.shape
        picked = self.keys.view(hkv, hd, -1, t).index_select(2, torch.from_numpy(rows).to(self.keys.device))
        return picked.reshape(hkv, hd, n * t)


class KeyIndex:
    """Per-stream key blocks (see the module docstring). Thread-safe; `build` callbacks run outside its lock."""

    def __init__(
        self,
        max_clips: int = 100_000,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        stored: StoredKeys | None = None,
    ) -> None:
        """Keys are kept on `device` in `dtype`; by default where they were built, in float32 on a CPU (no fast half
        GEMM there) and in their own dtype (the model's) on an accelerator. With `stored`, keys are read from and
        written to memory, and those built are rounded to float16 as memory keeps them (so an index filled from
        memory scores exactly as the one that built them; on an accelerator the block is then float16)."""
        if max_clips < 1:
            raise ValueError(f"max_clips must be >= 1, got {max_clips}")
        self.max_clips = max_clips
        self.device, self.dtype = None if device is None else torch.device(device), dtype
        self.stored = stored
        self.built = 0  # clips whose keys a question built (lazily), since start
        self.built_ahead = 0  # clips whose keys were built as they were written (`KeyIndexer`), since start
        self.loaded = 0  # clips whose keys were read from memory (`stored`), since start
        self.store_failures = 0  # reads or writes of keys that memory failed (logged; the keys built or kept in RAM)
        self._blocks: OrderedDict[str, _Block] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return sum(b.hi - b.lo for b in self._blocks.values())

    def bytes(self) -> int:
        """Bytes of the keys held (a block's spare capacity, up to `GROWTH` - 1 of it, is not counted)."""
        with self._lock:
            return sum((b.hi - b.lo) * b.keys[:, :, : b.tokens].nbytes for b in self._blocks.values())

    def held(self, stream_id: str, generation: str | None = None) -> np.ndarray:
        """The seqs whose keys are held for the stream (int64, ascending); none for another generation."""
        with self._lock:
            block = self._blocks.get(stream_id)
            if block is None or (generation is not None and block.generation not in (None, generation)):
                return np.empty(0, np.int64)
            return block.held.copy()

    def forget_before(self, stream_id: str, seq: int) -> None:
        """Drop the stream's keys of clips before `seq` (evicted from memory by retention)."""
        with self._lock:
            block = self._blocks.get(stream_id)
            if block is not None:
                block.lo += int(np.searchsorted(block.held, seq))
                if block.lo == block.hi:
                    del self._blocks[stream_id]
                else:
                    block.shrink()

    def drop_stream(self, stream_id: str) -> None:
        with self._lock:
            self._blocks.pop(stream_id, None)

    def streams(self) -> list[str]:
        with self._lock:
            return list(self._blocks)

    def get(
        self,
        stream_id: str,
        seqs: Sequence[int],
        build: Callable[[list[int]], torch.Tensor],
        generation: str | None = None,
    ) -> torch.Tensor:
        """The keys [Hkv, hd, n * T] of the stream's clips `seqs`, in that order (`hico.relevance.block_scores`
        reads them); `build(missing seqs)` computes those not held yet ([m, Hkv, T, hd]; the caller holds the model;
        counted in `built`). A `generation` other than the one the stream's keys were built under (the stream was
        deleted and made again: its seqs restarted) drops them first."""
        want = np.asarray(seqs, dtype=np.int64)
        with self._lock:
            block = self._block(stream_id, generation)
            found = block.rows(want)[1] if block is not None else np.zeros(len(want), bool)
        missing = np.unique(want[~found]).tolist()
        if missing:
            loaded = set(self._load(stream_id, missing, generation, evict=False).tolist())
            if rest := [s for s in missing if s not in loaded]:
                self.add(stream_id, rest, build(rest), generation, ahead=False)
        with self._lock:
            block = self._block(stream_id, generation)
            assert block is not None or not len(want)
            if block is None:
                return torch.empty(0, 0, 0)
            rows, found = block.rows(want)
            if not found.all():  # dropped by a concurrent caller's overflow: build those again, alone
                lost = want[~found].tolist()
                self._insert(block, stream_id, lost, self._rounded(build(lost)))
                self.built += len(lost)
                rows, found = block.rows(want)
            self._blocks.move_to_end(stream_id)
            self._evict(keep=stream_id, keep_from=int(rows.min()) if len(rows) else None)
            rows, _ = block.rows(want)
            return block.columns(rows)

    def add(
        self,
        stream_id: str,
        seqs: Sequence[int],
        keys: torch.Tensor,
        generation: str | None = None,
        ahead: bool = True,
    ) -> int:
        """Hold the keys [m, Hkv, T, hd] built for the stream's clips `seqs` (those already held are skipped), and
        write the new ones to memory with `stored`; counted in `built_ahead`, or `built` when a question built them
        (`ahead=False`). Returns how many were new."""
        if len(seqs) != len(keys):
            raise ValueError(f"{len(seqs)} seqs for {len(keys)} clips' keys")
        if self.stored is not None:
            keys, want = self._rounded(keys), np.asarray(seqs, dtype=np.int64)
            fresh = ~np.isin(want, self.held(stream_id, generation)) & ~_repeated(want)
            self._save(stream_id, want[fresh].tolist(), keys[torch.from_numpy(fresh).to(keys.device)], generation)
        return self._hold(stream_id, seqs, keys, generation, "ahead" if ahead else "lazily", evict=ahead)

    def load(self, stream_id: str, seqs: Sequence[int], generation: str | None = None) -> np.ndarray:
        """Hold the keys memory keeps for those of the stream's clips `seqs` not held yet (none without `stored`);
        their seqs (int64), counted in `loaded`. A memory that fails to read them loads none (logged, counted)."""
        return self._load(stream_id, seqs, generation, evict=True)

    def _load(self, stream_id: str, seqs: Sequence[int], generation: str | None, evict: bool) -> np.ndarray:
        """`load`; `evict` False for a question's own clips (`get` evicts after, knowing which to keep)."""
        if self.stored is None or not len(seqs):
            return np.empty(0, np.int64)
        try:
            found, keys = self.stored.store.keys(stream_id, self.stored.tag, seqs)
        except UnknownStream:
            return np.empty(0, np.int64)
        except Exception as e:  # noqa: BLE001 - keys are a cache: built from the tokens instead
            with self._lock:
                self.store_failures += 1
            log.warning("event=keys_load_failed stream=%r clips=%d error=%s", stream_id, len(seqs), e)
            return np.empty(0, np.int64)
        if len(found):
            self._hold(stream_id, found.tolist(), torch.from_numpy(keys), generation, "loaded", evict)
        return found

    def _save(self, stream_id: str, seqs: list[int], keys: torch.Tensor, generation: str | None) -> None:
        """Write built keys to memory beside their clips' tokens; a failure is logged and counted, never raised."""
        if not seqs or self.stored is None:
            return
        try:
            self.stored.store.put_keys(
                stream_id, self.stored.tag, seqs, keys.cpu().numpy(), generation=generation or None
            )
        except Exception as e:  # noqa: BLE001 - keys are a cache: this process keeps them in RAM all the same
            with self._lock:
                self.store_failures += 1
            log.warning("event=keys_store_failed stream=%r clips=%d error=%s", stream_id, len(seqs), e)

    def _rounded(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys as memory keeps them (float16) when it does and they fit; else as built (memory then refuses them)."""
        if self.stored is None:
            return keys
        k16 = keys.to(torch.float16)
        return k16 if bool(torch.isfinite(k16).all()) else keys

    def _hold(
        self, stream_id: str, seqs: Sequence[int], keys: torch.Tensor, generation: str | None, when: str, evict: bool
    ) -> int:
        """`add` without memory: hold the keys, count the new ones under `when` (ahead, lazily, loaded), and past
        `max_clips` evict (not for a question's own clips: `get` evicts after, knowing which to keep)."""
        with self._lock:
            block = self._block(stream_id, generation)
            if block is None:
                _, hkv, t, hd = keys.shape
                device = self.device or keys.device
                dtype = self.dtype or (torch.float32 if device.type == "cpu" else keys.dtype)
                empty = torch.empty(hkv, hd, 0, dtype=dtype, device=device)
                block = self._blocks[stream_id] = _Block(empty, np.empty(0, np.int64), t, generation)
            new = self._insert(block, stream_id, list(seqs), keys)
            if when == "ahead":
                self.built_ahead += new
            elif when == "lazily":
                self.built += new
            else:
                self.loaded += new
            self._blocks.move_to_end(stream_id)
            if evict:
                self._evict(keep=stream_id)
            return new

    def _block(self, stream_id: str, generation: str | None) -> _Block | None:
        """The stream's block, dropped first when it was built under another generation (lock held)."""
        block = self._blocks.get(stream_id)
        if block is not None and generation is not None and block.generation not in (None, generation):
            del self._blocks[stream_id]
            return None
        if block is not None and block.generation is None:
            block.generation = generation
        return block

    def _insert(self, block: _Block, stream_id: str, seqs: list[int], keys: torch.Tensor) -> int:
        """Add clips' keys to the block (lock held): appended in place when they all come after its newest clip
        and fit, else a new block, merged in seq order. Returns how many were new."""
        want = np.asarray(seqs, dtype=np.int64)
        _, found = block.rows(want)
        fresh = ~found & ~_repeated(want)
        if not fresh.any():
            return 0
        device, dtype = block.keys.device, block.keys.dtype
        keys = keys.to(device)
        want, keys = want[fresh], keys[torch.from_numpy(fresh).to(device)]
        order = np.argsort(want, kind="stable")
        want, keys = want[order], keys[torch.from_numpy(order).to(device)]
        cols = key_block(keys, dtype)  # [Hkv, hd, m * T]
        t, m, n = block.tokens, len(want), block.hi - block.lo
        capacity = block.keys.shape[2] // t
        if n == 0 or want[0] > block.seqs[block.hi - 1]:
            if block.hi + m > capacity:  # grow: the held rows and the new ones at the start of a larger block
                block.reallocate(capacity_for(n + m))
            block.keys[:, :, block.hi * t : (block.hi + m) * t] = cols
            block.seqs[block.hi : block.hi + m] = want
            block.hi += m
            return m
        # keys older than the newest held (a gap built lazily): one merged copy, in seq order
        merged_seqs = np.concatenate([block.held, want])
        order = np.argsort(merged_seqs, kind="stable")
        hkv, hd, _ = block.keys.shape
        old = block.keys[:, :, block.lo * t : block.hi * t].reshape(hkv, hd, n, t)
        both = torch.cat([old, cols.reshape(hkv, hd, m, t)], dim=2)  # [Hkv, hd, n + m, T]
        size = capacity_for(n + m)
        keys_new = block.keys.new_empty(hkv, hd, size * t)
        keys_new[:, :, : (n + m) * t] = both.index_select(2, torch.from_numpy(order).to(device)).reshape(
            hkv, hd, (n + m) * t
        )
        seqs_new = np.empty(size, np.int64)
        seqs_new[: n + m] = merged_seqs[order]
        block.keys, block.seqs, block.lo, block.hi = keys_new, seqs_new, 0, n + m
        return m

    def _evict(self, keep: str, keep_from: int | None = None) -> None:
        """Past `max_clips`, drop the oldest rows of the least recently used streams first, then of `keep`, of which
        rows from `keep_from` on (a question's own clips) stay, even over the cap. Lock held."""
        over = sum(b.hi - b.lo for b in self._blocks.values()) - self.max_clips
        for stream_id in [*(s for s in self._blocks if s != keep), keep]:
            block = self._blocks.get(stream_id)
            if over <= 0 or block is None:
                continue
            limit = block.hi if stream_id != keep or keep_from is None else min(keep_from, block.hi)
            drop = min(over, max(0, limit - block.lo))
            block.lo, over = block.lo + drop, over - drop
            if block.lo == block.hi:
                del self._blocks[stream_id]
            elif drop:
                block.shrink()


def _repeated(seqs: np.ndarray) -> np.ndarray:
    """True where a seq already appeared earlier in `seqs`."""
    _, first = np.unique(seqs, return_index=True)
    out = np.ones(len(seqs), bool)
    out[first] = False
    return out


# -- building keys as clips are written ---------------------------------------------------------------------------


class KeyIndexer:
    """Keeps a `KeyIndex` up to date with memory in the background, as `reasoner.alerts.AlertRunner` follows new
    clips: every `poll_s` it looks at every stream and builds the keys of the clips written since it last looked
    (at start, of each stream's newest clips, its share of `index.max_clips`), one batch per stream in turn until all
    are caught up, so a question over a long memory finds them built. A batch's tokens are read before the model
    lock is taken, and a batch is sized to take about `batch_s` of model time (from the last batch's time per clip),
    so an Ask waits about that long for the model at most (one clip at least: the 2B on a CPU takes longer).
    It feeds the index it was given (replacing `Reasoner.keys` afterwards leaves it feeding the old one).

    `keys_of(tokens [m, T, D])` computes keys [m, Hkv, T, hd] (`hico.relevance.clip_keys` at the scoring layer);
    it runs under `lock`, the model's.
    """

    def __init__(
        self,
        index: KeyIndex,
        store: MemoryStore,
        keys_of: Callable[[torch.Tensor], torch.Tensor],
        lock: threading.Lock,
        poll_s: float = 0.5,
        batch_s: float = 0.03,
    ) -> None:
        self.index, self.store, self.keys_of, self.lock = index, store, keys_of, lock
        self.poll_s, self.batch_s = poll_s, batch_s
        self._next: dict[str, tuple[str, int]] = {}  # stream -> (its generation, the next seq to index)
        self._per_clip_s = 0.0

    async def run(self) -> None:
        """Index until cancelled (the service stopping)."""
        while True:
            try:
                while await asyncio.to_thread(self.step):  # a thread hop per round: the lock is free in between
                    pass
            except Exception:  # noqa: BLE001 - the memory down, a bug: logged, the loop goes on
                log.exception("event=key_index_failed")
            await asyncio.sleep(self.poll_s)

    def step(self) -> int:
        """One batch of keys for every stream with clips not indexed yet; how many clips were built or loaded from
        memory (0: every stream is caught up). Blocking."""
        streams = self.store.streams()
        for gone in set(self._next) - set(streams):  # deleted: its keys go too
            del self._next[gone]
            self.index.drop_stream(gone)
        built, share = 0, max(1, self.index.max_clips // max(1, len(streams)))  # a new stream's backlog: its share
        for stream_id in streams:
            try:
                built += self._batch(stream_id, share)
            except UnknownStream:  # deleted meanwhile
                self._next.pop(stream_id, None)
        return built

    def _batch(self, stream_id: str, backlog: int) -> int:
        """One batch of the stream's clips not indexed yet (at first sight, of its newest `backlog` clips): the keys
        memory holds for the next `LOAD_BATCH` of them loaded, then a batch of the others built."""
        stats = self.store.stats(stream_id)
        if stats.first is None or stats.last is None:
            return 0
        generation, start = self._next.get(stream_id, (None, -1))
        if generation != stats.generation:  # new here, or deleted and made again (its seqs restarted)
            start = stats.last.seq - backlog + 1
        start = max(start, stats.first.seq)  # clips retention evicted meanwhile are not indexed, and their keys go
        self.index.forget_before(stream_id, stats.first.seq)
        todo = np.arange(start, stats.last.seq + 1, dtype=np.int64)
        todo = todo[~np.isin(todo, self.index.held(stream_id, stats.generation))]  # a question may have built some
        window = todo[:LOAD_BATCH]
        loaded = self.index.load(stream_id, window.tolist(), stats.generation)  # nothing to build for those
        seqs = window[~np.isin(window, loaded)][: batch_size(self._per_clip_s, self.batch_s)].tolist()
        done = seqs[-1] + 1 if seqs else int(window[-1]) + 1 if len(window) else stats.last.seq + 1
        self._next[stream_id] = (stats.generation, max(start, done))
        if not seqs:
            return len(loaded)
        held = self.store.metas(stream_id, seqs)
        seqs = [s for s in seqs if s in held]  # a seq never written, or evicted since
        if not seqs:
            return len(loaded)
        try:
            tokens = torch.from_numpy(self.store.tokens(stream_id, seqs))
        except KeyError:  # evicted between the two reads: this batch again at the next round
            self._next[stream_id] = (stats.generation, start)
            return len(loaded)
        t0 = time.perf_counter()
        with self.lock:
            keys = self.keys_of(tokens)
        self._per_clip_s = (time.perf_counter() - t0) / len(seqs)
        return len(loaded) + self.index.add(stream_id, seqs, keys, stats.generation)


def batch_size(per_clip_s: float, batch_s: float, most: int = 256) -> int:
    """Clips in the next batch so that it takes about `batch_s`, from the last batch's time per clip (1 before any
    was measured)."""
    if per_clip_s <= 0:
        return 1
    return max(1, min(most, int(batch_s / per_clip_s)))
