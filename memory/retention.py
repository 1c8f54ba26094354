"""The periodic retention sweep: age limits are enforced here, byte limits on every write."""

from __future__ import annotations

import asyncio
import logging

from memory.index import ClipIndex
from memory.store import MemoryStore

log = logging.getLogger(__name__)


async def sweep_forever(store: MemoryStore, index: ClipIndex | None, every_s: float = 60.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            evicted = await asyncio.to_thread(store.enforce_retention)
        except Exception as e:  # noqa: BLE001 - a failed sweep is retried at the next one
            log.warning("event=retention_failed error=%s", e)
            continue
        for stream_id, seqs in evicted.items():
            log.info("event=retention stream=%s evicted=%d", stream_id, len(seqs))
            if index is not None:
                index.remove(stream_id, seqs)
