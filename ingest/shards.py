"""Sharded ingest: which of N ingest processes runs which stream.

Shard i of N owns the streams whose name hashes to i: the first 8 bytes of the SHA-256 of the stream name (UTF-8),
read as a big-endian unsigned integer, mod N (`shard_of`). The hash is stable across processes, machines and
Python versions (unlike `hash()`), so every shard, and any client, computes the same owner from the name alone;
no registry or election is needed. A shard starts, resumes and removes only the streams it owns, and refuses
the others with FAILED_PRECONDITION naming the owner, so a client retries there.

On Kubernetes the shard comes from the StatefulSet pod's ordinal: `VCFLASH_INGEST_SHARD=auto` reads the trailing
`-<i>` of the host name (`vcflash-ingest-1` is shard 1), and `VCFLASH_INGEST_SHARDS` must equal the replicas.
Changing N moves streams between shards: stop every shard, then start them all with the new N (shards of the old
and the new N side by side would both run the streams that move); each resumes the active streams it now owns.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass

from vcflash.serve.errors import FailedPrecondition, excerpt

AUTO = "auto"


def shard_of(stream_id: str, shards: int) -> int:
    """The shard (0 .. shards-1) that owns `stream_id`."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    digest = hashlib.sha256(stream_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shards


@dataclass(frozen=True)
class Shard:
    """This process's part of the streams. `host_base`: with a shard from the host name (`auto`), the name
    without its ordinal (`vcflash-ingest`), so errors can name the owner's pod."""

    index: int = 0
    count: int = 1
    host_base: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"ingest shard {self.index} is not in 0..{self.count - 1} (VCFLASH_INGEST_SHARDS)")

    def owner(self, stream_id: str) -> int:
        return shard_of(stream_id, self.count)

    def owns(self, stream_id: str) -> bool:
        return self.count == 1 or self.owner(stream_id) == self.index

    def check(self, stream_id: str) -> None:
        """`FailedPrecondition` naming the owning shard when this one does not own `stream_id`."""
        if self.owns(stream_id):
            return
        owner = self.owner(stream_id)
        where = f" ({self.host_base}-{owner})" if self.host_base else ""
        raise FailedPrecondition(
            f"stream {excerpt(stream_id)} belongs to ingest shard {owner}{where} of {self.count}, "
            f"not to this one (shard {self.index}): send it there"
        )

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def resolve_shard(setting: str, count: int, hostname: str | None = None, role: str = "ingest") -> Shard:
    """The shard `VCFLASH_INGEST_SHARD` (`setting`: a number, or `auto`) and `VCFLASH_INGEST_SHARDS` (`count`) name;
    `role` names the service in errors (`reasoner`: VCFLASH_REASONER_SHARD, the alerts' partition).

    `auto`: the trailing `-<i>` of `hostname` (default: $HOSTNAME, else the system's host name), as a StatefulSet
    names its pods; with one shard a host name without an ordinal is shard 0. An ordinal of N or more fails:
    replicas scaled up without raising VCFLASH_INGEST_SHARDS would otherwise run streams twice."""
    var = f"VCFLASH_{role.upper()}_SHARD"
    if setting.strip().lower() != AUTO:
        return Shard(parse_index(setting, count, var), count)
    host = hostname or os.environ.get("HOSTNAME") or socket.gethostname()
    match = re.fullmatch(r"(.+)-(\d+)", host.split(".")[0])
    if match is None:
        if count == 1:
            return Shard(0, 1)
        raise ValueError(f"{var}=auto needs a host name ending in -<ordinal> (a StatefulSet pod), got {host!r}")
    index = int(match[2])
    if index >= count:
        raise ValueError(f"host {host!r} is {role} shard {index} but {var}S is {count}: set it to the replicas")
    return Shard(index, count, match[1])


def parse_index(setting: str, count: int, var: str = "VCFLASH_INGEST_SHARD") -> int:
    """A `VCFLASH_INGEST_SHARD` (`var`) other than `auto`: a number in 0..count-1."""
    try:
        index = int(setting)
    except ValueError:
        raise ValueError(f"{var} must be a number or 'auto', got {setting!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"{var} must be in 0..{count - 1} ({var}S={count}), got {index}")
    return index
