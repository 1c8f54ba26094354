"""The key index: each clip's keys at the scoring layer (`hico.relevance.clip_keys`), kept in RAM by (stream, seq).

A clip's keys depend on nothing but its tokens, so they are computed once, the first time a question needs them
(built lazily and counted, never an error), and a question then costs one short prefill for its query and one
product with the range's keys (`hico.relevance.key_scores`). Bounded: past `max_clips` the least recently used
clips' keys are dropped (and rebuilt if asked again), which also forgets clips that retention evicted.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch


class KeyIndex:
    def __init__(self, max_clips: int = 100_000) -> None:
        self.max_clips = max_clips
        self.built = 0  # clips whose keys were computed (lazily), since start
        self._keys: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._generations: dict[str, str] = {}  # the store's stream generation the keys were built from
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys)

    def get(
        self,
        stream_id: str,
        seqs: Sequence[int],
        build: Callable[[list[int]], torch.Tensor],
        generation: str | None = None,
    ) -> torch.Tensor:
        """The keys [n, Hkv, T, hd] (float16) of the stream's clips `seqs`, in that order; `build(missing seqs)`
        computes those not held yet (the caller holds the model). A `generation` other than the one the stream's
        keys were built under (the stream was deleted and made again: its seqs restarted) drops them first."""
        with self._lock:
            if generation is not None and self._generations.setdefault(stream_id, generation) != generation:
                for key in [k for k in self._keys if k[0] == stream_id]:
                    del self._keys[key]
                self._generations[stream_id] = generation
            missing = [s for s in seqs if (stream_id, s) not in self._keys]
        if missing:
            fresh = build(missing).to("cpu", torch.float16)
            with self._lock:
                for seq, k in zip(missing, fresh, strict=True):
                    self._keys[(stream_id, seq)] = k
                self.built += len(missing)
        with self._lock:
            out = []
            for s in seqs:
                key = self._keys.get((stream_id, s))
                if key is None:  # dropped by a concurrent caller's overflow: build it again, alone
                    key = build([s]).to("cpu", torch.float16)[0]
                    self._keys[(stream_id, s)] = key
                self._keys.move_to_end((stream_id, s))
                out.append(key)
            while len(self._keys) > max(self.max_clips, len(seqs)):
                self._keys.popitem(last=False)
        return torch.stack(out) if out else torch.empty(0, dtype=torch.float16)

    def bytes(self) -> int:
        with self._lock:
            return sum(k.numel() * k.element_size() for k in self._keys.values())
