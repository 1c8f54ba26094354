"""The stream registry: every stream a server runs comes and goes here, whether AddStream or WHIP started it.

Beside the running streams (an `IngestManager`) it keeps their durable side in memory: each stream's spec
(so a restarted server resumes the active ones), its retention, and where it left off: a stream continues
its clip numbering and media clock after its last stored clip, so a clip's `(stream, seq)` is never reused
and its media time never goes back. Removing a stream reaches that durable side too, whether or not the
stream still runs here: a stream stopped earlier, a WHIP sender that left, or one known only from memory
after a restart.

With sharded ingest (`ingest.shards`) a registry holds one shard's part of the streams: it starts, resumes,
restarts and removes only the streams its shard owns, and refuses the others with `FailedPrecondition` naming
the owning shard; listing shows its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

from ingest.clock import MediaClock
from ingest.pipeline import ENDED, FrameSource, IngestManager, StreamState, StreamStatus
from ingest.recording import Recordings
from ingest.shards import Shard
from ingest.spec import StreamSpec
from memory.index import ClipIndex
from memory.records import Retention
from memory.store import MemoryStore, MemoryUnavailable, UnknownStream
from vcflash.serve.errors import Exhausted, FailedPrecondition, Invalid, NotFound, Unavailable, excerpt

log = logging.getLogger(__name__)

RESUME_BACKOFF_MAX_S = 5.0  # memory unreachable at start: retried at most this far apart


class Streams:
    """Add, resume and remove streams, with their configs, retention and stored-clip counts.

    Errors: an unknown stream is `NotFound`, a taken name `AlreadyExists`, a full server `Exhausted`, a bad
    spec `Invalid` (all raised by `IngestManager.add`, the one place a stream is admitted), a memory that
    cannot be reached `Unavailable`.
    """

    def __init__(
        self,
        manager: IngestManager,
        store: MemoryStore,
        default_retention: Retention,
        index: ClipIndex | None = None,
        recordings: Recordings | None = None,
        shard: Shard | None = None,
    ) -> None:
        self.manager, self.store, self.index = manager, store, index
        self.shard = shard or Shard()  # which streams this registry may run: all of them unless sharded
        self.recordings = recordings  # where streams with `spec.record` keep their video; None: nowhere
        self.default_retention = default_retention
        self.stored: Counter[str] = Counter()  # clips stored per stream, since this process started it
        self.drain: Callable[[str], Awaitable[None]] | None = None  # waits out clips still at a remote encoder
        self._watchers: dict[str, asyncio.Task[None]] = {}

    def on_stored(self, stream_id: str, seq: int) -> None:
        self.stored[stream_id] += 1

    def accepts(self, stream_id: str) -> bool:
        """Whether clips of this stream are still wanted (not removed while they waited for the encoder)."""
        return stream_id in self.manager.names()

    def status(self, stream_id: str) -> StreamStatus:
        """`NotFound` if this server does not hold the stream, `FailedPrecondition` naming the owning shard if
        another shard owns it."""
        if stream_id not in self.manager.names():
            self.shard.check(stream_id)
        return self.manager.worker(stream_id).status()

    async def memory_error(self) -> str:
        """Why the memory cannot be reached right now, '' when it can: listing streams never depends on it, so
        `streams ls` shows this beside the streams instead of failing while Redis is down."""
        try:
            await asyncio.to_thread(self.store.streams)
        except Unavailable as e:
            return str(e)
        except Exception:  # noqa: BLE001 - reported beside the streams, not raised
            log.exception("event=memory_probe_failed")
            return "memory error (see the server log)"
        return ""

    async def add(
        self,
        stream_id: str,
        spec: StreamSpec,
        retention: Retention | None = None,
        *,
        source: FrameSource | None = None,
        replace: bool = False,
    ) -> StreamStatus:
        """Start a stream and keep its spec, so a restarted server resumes it (if `spec.resume`).

        `replace`: an ended stream of this name (a WHIP sender that left and publishes again) is replaced
        and continued; otherwise the name must be free. `source` gives the frames (a WebRTC session).
        `FailedPrecondition` naming the owner when another shard owns the name.
        """
        self.shard.check(stream_id)
        status = await self._start(stream_id, spec, source, replace)
        await asyncio.to_thread(self.store.set_retention, stream_id, retention or self.default_retention)
        return status

    async def resume(self, max_wait_s: float = RESUME_BACKOFF_MAX_S) -> list[str]:
        """Restart the streams that were active when the server last stopped; a stored config that no longer
        passes (a lower limit, a bad value) leaves its stream stopped, not the server. A shard resumes only the
        streams it owns. Memory that cannot be reached (Redis restarting, a Cluster master failing over) is
        waited for, logged and retried with backoff up to `max_wait_s` apart: the server is not SERVING meanwhile,
        and goes on from the streams already resumed."""
        started: list[str] = []
        delay = 0.25
        while True:
            try:
                await self._resume(started)
                return started
            except MemoryUnavailable as e:
                log.warning("event=resume_waiting_for_memory retry_in_s=%.2f error=%s", delay, e)
                await asyncio.sleep(delay)
                delay = min(2 * delay, max_wait_s)

    async def _resume(self, started: list[str]) -> None:
        configs = await asyncio.to_thread(self.store.stream_configs)
        for stream_id, config in sorted(configs.items()):
            if not config.get("active") or stream_id in self.manager.names() or not self.shard.owns(stream_id):
                continue
            try:
                await self._start(stream_id, StreamSpec.from_config(config))
            except (Invalid, Exhausted) as e:
                log.warning("event=stream_not_resumed stream=%s error=%s", stream_id, e)
                continue
            started.append(stream_id)

    async def restart(self, stream_id: str) -> StreamStatus:
        """Start an ended stream again with its spec and retention, continuing its clip numbering and media clock:
        the retry an operator asks for once a camera that refused its credentials is fixed (a live source gives
        up after `refused_tries`). `FailedPrecondition` while the stream still runs (it retries by itself) and
        for a WHIP stream (its sender publishes again instead)."""
        self.shard.check(stream_id)
        worker = self.manager.worker(stream_id)
        state = worker.status().state
        if state not in ENDED:
            raise FailedPrecondition(f"stream {stream_id!r} is {state.value}: only an ended stream can be restarted")
        if worker.hooked:
            raise FailedPrecondition(f"stream {stream_id!r} is a WebRTC stream: its sender publishes again instead")
        return await self._start(stream_id, worker.spec, replace=True)

    async def remove(self, stream_id: str, delete_memory: bool = False) -> StreamStatus | None:
        """Stop the stream if this server holds it (in any state), and keep it from being resumed; its memory
        stays unless `delete_memory`, which forgets its clips, retention, config and index entries.

        A stream this server does not hold (removed earlier, a WHIP sender that was deleted, one of an earlier
        run that was not resumed) is still reached in memory: its config is marked inactive, or with
        `delete_memory` everything memory holds of it is deleted. `NotFound` only when the stream is neither
        held here nor in memory (without `delete_memory`: has no config). Returns the last status of the
        stream it stopped, None when there was none. `FailedPrecondition` for a stream another shard owns (it
        may be running there).
        """
        self.shard.check(stream_id)
        status, spec = None, None
        if stream_id in self.manager.names():
            spec = self.manager.worker(stream_id).spec
            status = await self._stop(stream_id)  # from here on `accepts` refuses its queued clips
            self.stored.pop(stream_id, None)
        if delete_memory:
            await self._delete_memory(stream_id, held=status is not None)
        elif spec is not None:
            await asyncio.to_thread(self.store.put_stream_config, stream_id, spec.to_config(active=False))
        else:
            await self._deactivate(stream_id)
        return status

    async def delete_memory(self, stream_id: str) -> None:
        """Memory.DeleteStream on a server that runs streams: refused (`FailedPrecondition`) while the stream
        is live here, since its next clips would bring it back; an ended stream is removed and deleted. Another
        shard's stream is refused too: only its owner knows whether it runs."""
        self.shard.check(stream_id)
        if stream_id in self.manager.names():
            state = self.status(stream_id).state
            if state not in ENDED:
                raise FailedPrecondition(
                    f"stream {stream_id!r} is {state.value}; stop it and delete its memory with "
                    f"`vcflash streams rm --delete-memory {stream_id}` (Ingest.RemoveStream with delete_memory)"
                )
        await self.remove(stream_id, delete_memory=True)

    async def _delete_memory(self, stream_id: str, held: bool) -> None:
        if self.drain is not None:  # clips still at a remote encoder would write the stream again
            await self.drain(stream_id)
        try:
            await asyncio.to_thread(self.store.delete_stream, stream_id)
        except UnknownStream:
            if not held:
                raise NotFound(f"no stream named {excerpt(stream_id)}: not running here and not in memory") from None
        if self.index is not None:
            self.index.drop_stream(stream_id)
        if self.recordings is not None:
            await asyncio.to_thread(self.recordings.delete, stream_id)

    async def _deactivate(self, stream_id: str) -> None:
        """A configured stream that does not run here is not resumed any more; its config and memory stay."""
        config = (await asyncio.to_thread(self.store.stream_configs)).get(stream_id)
        if config is None:
            raise NotFound(
                f"no stream named {excerpt(stream_id)} runs here or is configured in memory "
                "(--delete-memory deletes any clips memory holds of it)"
            )
        if config.get("active"):
            await asyncio.to_thread(self.store.put_stream_config, stream_id, config | {"active": False})

    async def _start(
        self, stream_id: str, spec: StreamSpec, source: FrameSource | None = None, replace: bool = False
    ) -> StreamStatus:
        first_seq, clock = await self._continuation(stream_id, replace)
        recorder = None
        if spec.record:
            if self.recordings is None:
                raise Invalid("this server keeps no recordings")
            recorder = await asyncio.to_thread(self.recordings.stream, stream_id)  # reads its index from disk
        status = self.manager.add(stream_id, spec, first_seq=first_seq, clock=clock, source=source, recorder=recorder)
        spec = self.manager.worker(stream_id).spec  # as admitted: the server's default fps filled in
        await asyncio.to_thread(self.store.put_stream_config, stream_id, spec.to_config(active=spec.resume))
        self._watchers[stream_id] = asyncio.create_task(self._retire_when_done(stream_id, spec))
        return status

    async def _continuation(self, stream_id: str, replace: bool) -> tuple[int, MediaClock | None]:
        """Where a starting stream goes on from: the first clip number and the media clock."""
        if replace and stream_id in self.manager.names():
            worker = self.manager.worker(stream_id)
            if worker.status().state in ENDED:
                status = await self._stop(stream_id)
                return status.next_seq, worker.clock  # clips still on their way to memory count too
        try:
            last = (await asyncio.to_thread(self.store.stats, stream_id)).last
        except KeyError:  # a new stream
            return 0, None
        return (last.seq + 1, MediaClock.after(last.media_end, last.wall_end)) if last else (0, None)

    async def _stop(self, stream_id: str) -> StreamStatus:
        status = await self.manager.remove(stream_id)
        watcher = self._watchers.pop(stream_id, None)
        if watcher is not None:
            watcher.cancel()
        return status

    def recording(self) -> set[str]:
        """The streams being recorded now: retention leaves them their recording even before memory holds a clip."""
        return {name for name in self.manager.names() if self.manager.worker(name).spec.record}

    async def sweep_recordings(self) -> None:
        """Recording retention, one pass: segments go with their clips (see `Recordings.enforce`)."""
        if self.recordings is None:
            return
        try:
            first: dict[str, float | None] = {}
            for stream_id in await asyncio.to_thread(self.store.streams):
                with contextlib.suppress(UnknownStream):
                    stats = await asyncio.to_thread(self.store.stats, stream_id)
                    first[stream_id] = stats.first.wall_start if stats.first else None
            await asyncio.to_thread(self.recordings.enforce, first, self.recording())
        except Exception as e:  # noqa: BLE001 - retried at the next pass
            log.warning("event=recording_retention_failed error=%s", e)

    async def sweep_recordings_forever(self, every_s: float = 60.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self.sweep_recordings()

    async def _retire_when_done(self, stream_id: str, spec: StreamSpec) -> None:
        """A source that ended by itself (a file played out, a camera that refused us) is not restarted with the
        server: a failed stream comes back only on request (RestartStream), so a restart never locks an account.
        A stream closed with the manager (the server stopping) is left as it is: it resumes with the server."""
        try:
            status = await self.manager.wait(stream_id)
        except NotFound:
            return
        if status.state in (StreamState.FINISHED, StreamState.FAILED) and spec.resume:
            await asyncio.to_thread(self.store.put_stream_config, stream_id, spec.to_config(active=False))
