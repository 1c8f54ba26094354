"""The periodic sweep: age limits are enforced here (byte limits on every write), and a clip index is kept in step
with the store: evicted clips leave it in one batch per stream, and clips another process wrote join it."""

from __future__ import annotations

import asyncio
import logging

from memory.index import ClipIndex
from memory.store import MemoryStore, UnknownStream

log = logging.getLogger(__name__)


async def sweep_forever(store: MemoryStore, index: ClipIndex | None, every_s: float = 60.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        await sweep(store, index)


async def sweep(store: MemoryStore, index: ClipIndex | None) -> None:
    """One retention pass; the store's calls and the index's batched removals run in worker threads."""
    try:
        evicted = await asyncio.to_thread(store.enforce_retention)
    except Exception as e:  # noqa: BLE001 - a failed sweep is retried at the next one
        log.warning("event=retention_failed error=%s", e)
        return
    for stream_id, seqs in evicted.items():
        log.info("event=retention stream=%s evicted=%d", stream_id, len(seqs))
        if index is not None:
            await asyncio.to_thread(index.remove, stream_id, seqs)
    if index is not None:
        await follow(store, index)


async def follow_forever(store: MemoryStore, index: ClipIndex, every_s: float = 60.0) -> None:
    """Keep an index that nobody in this process writes (the split deployment's reasoner) in step."""
    while True:
        await asyncio.sleep(every_s)
        await follow(store, index)


async def follow(store: MemoryStore, index: ClipIndex) -> None:
    """Catch every stream's index up with the store (ClipIndex.sync_stream: the clips after the last indexed, and a
    batched prune of the clips evicted on write or by another process); forget the streams deleted elsewhere."""
    try:
        streams = set(await asyncio.to_thread(store.streams))
    except Exception as e:  # noqa: BLE001 - retried at the next pass
        log.warning("event=index_follow_failed error=%s", e)
        return
    for stream_id in sorted(streams | set(index.streams())):
        try:
            if stream_id not in streams:
                raise UnknownStream(stream_id)
            await asyncio.to_thread(index.sync_stream, store, stream_id)
        except UnknownStream:
            index.drop_stream(stream_id)
        except Exception as e:  # noqa: BLE001 - retried at the next pass
            log.warning("event=index_follow_failed stream=%s error=%s", stream_id, e)
