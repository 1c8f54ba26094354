"""Service settings: one tree of sections, read from `VCFLASH_*` environment variables in this one place.

Every leaf field `name` is the variable `VCFLASH_<NAME>` (section names do not appear in it; a nested group such
as `reconnect: Backoff` prefixes its fields: `VCFLASH_RECONNECT_MAX_S`). Values are parsed by the field's declared
type, bounds live in the field's metadata and each section checks itself, so a bad value fails at start with the
variable's name. CLI flags override the environment. The README's Settings table documents every variable.
"""

from __future__ import annotations

import logging
import math
import os
import random
import secrets
import stat
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

PREFIX = "VCFLASH_"
DEFAULT_ADDRESS = "127.0.0.1:50051"
MIN_TOKEN_CHARS = 16


def setting(default: Any, *, lo: float | None = None, hi: float | None = None, choices: tuple[Any, ...] = ()) -> Any:
    """A field with bounds (inclusive) or choices, checked by `Section.__post_init__`."""
    kwargs: dict[str, Any] = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"lo": lo, "hi": hi, "choices": choices}, **kwargs)


class Section:
    """A frozen dataclass of settings that checks its fields' bounds; subclasses add cross-field checks."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value, meta = getattr(self, f.name), f.metadata
            if value is None or not meta:
                continue
            name = PREFIX + f.name.upper()
            if meta["choices"] and value not in meta["choices"]:
                raise ValueError(f"{name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            lo, hi = meta["lo"], meta["hi"]
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                bounds = f"in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else f">= {lo:g}"
                raise ValueError(f"{name} must be {bounds}, got {value!r}")


@dataclass(frozen=True)
class Backoff(Section):
    """Waits between retries: `initial_s` doubling up to `max_s`, each spread by +-`jitter` (a fraction) so that
    peers that failed together do not all come back in the same instant. After a connection that stayed healthy
    for `reset_after_s` the waits start again from `initial_s`."""

    initial_s: float = setting(0.5, lo=1e-3)
    max_s: float = setting(30.0, lo=1e-3)
    jitter: float = setting(0.2, lo=0.0, hi=0.99)
    reset_after_s: float = setting(60.0, lo=1e-3)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_s < self.initial_s:
            raise ValueError(f"backoff max_s ({self.max_s!r}) must be >= initial_s ({self.initial_s!r})")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry `attempt` (0 for the first after a healthy spell)."""
        base = min(self.max_s, self.initial_s * 2.0 ** min(attempt, 64))
        return base * (1 + self.jitter * random.uniform(-1, 1))


@dataclass(frozen=True)
class ServerSettings(Section):
    address: str = DEFAULT_ADDRESS  # gRPC listen address
    http_port: int = setting(8080, lo=0, hi=65535)  # WHIP; 0 turns it off
    metrics_port: int = setting(9464, lo=0, hi=65535)  # Prometheus; 0 turns it off
    api_token: str | None = field(default=None, repr=False)
    data_dir: Path = field(default_factory=lambda: Path.home() / ".local" / "share" / "vcflash")
    max_message_bytes: int = setting(8 * 1024 * 1024, lo=1)
    http_max_connections: int = setting(256, lo=1)  # open WHIP/HTTP connections; more are closed at once
    http_timeout_s: float = setting(10.0, lo=1e-3)  # an HTTP request's head, and its body, must arrive within this
    tls_cert: Path | None = None  # PEM certificate chain for gRPC and WHIP; with tls_key, or neither
    console_session_s: float = setting(12 * 3600.0, lo=60.0, hi=30 * 24 * 3600.0)  # a web console sign-in lasts this
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.api_token is not None:
            check_token(self.api_token, "VCFLASH_API_TOKEN")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("VCFLASH_TLS_CERT and VCFLASH_TLS_KEY go together: set both or neither")

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0].strip("[]") or "0.0.0.0"

    def with_token(self) -> Self:
        """These settings with an API token: the configured one, or one kept in the data dir."""
        return self if self.api_token else replace(self, api_token=read_or_create_token(self.data_dir))


@dataclass(frozen=True)
class ModelSettings(Section):
    model: str = "OpenGVLab/VideoChat-Flash-Qwen2_5-2B_res448"  # hub id, local dir, or "tiny"
    device: str = "cpu"
    # None: bfloat16 on CUDA (as the official model), float32 on CPU
    dtype: str | None = setting(None, choices=("float32", "fp32", "bfloat16", "bf16", "float16", "fp16"))
    kernels: str = setting("exact", choices=("exact", "fast"))  # exact: the official kernels (hico.kernels)

    def load_args(self) -> tuple[str, str | None, str, str]:
        """(path or hub id, dtype, device, kernels): the arguments of `VideoChatFlash.from_pretrained`."""
        return self.model, self.dtype, self.device, self.kernels


@dataclass(frozen=True)
class MemorySettings(Section):
    redis_url: str | None = field(default=None, repr=False)  # None: embedded memory in the data dir
    secret_key: str | None = field(default=None, repr=False)  # Fernet key for stream configs; None: DATA_DIR's
    token_format: str = setting("fp16", choices=("fp16", "int8"))
    retention_max_age_s: float | None = setting(7 * 24 * 3600.0, lo=1.0)  # per stream, by default
    retention_max_bytes: int | None = setting(2_000_000_000, lo=1)
    max_list_clips: int = setting(10_000, lo=1)  # clips in one ListClips answer
    max_thumbnail_bytes: int = setting(262_144, lo=1024)  # a clip's JPEG thumbnail; larger ones are refused
    redis_timeout_s: float = setting(0.5, lo=1e-3)  # each Redis call and connection; no call runs near it
    faiss_threads: int = setting(1, lo=1)  # FAISS OpenMP threads: one query is one thread; torch keeps the cores
    max_events: int = setting(100_000, lo=1)  # alert event records kept (the newest; older ones go as new come)


@dataclass(frozen=True)
class IngestSettings(Section):
    queue_clips: int = setting(256, lo=1)  # clips waiting for the encoder, all streams together
    fps: float = setting(1.0, lo=1e-3, hi=30.0)  # default sampling rate
    max_fps: float = setting(30.0, lo=1e-3)
    max_streams: int = setting(64, lo=1)  # per server
    max_source_chars: int = setting(4096, lo=1)
    media_root: Path | None = None  # local files a stream may read (under this dir only); None: no local files
    frame_size: int | None = setting(None, lo=16, hi=4096)  # the encoder's S; None: the model's (448 alone)
    source_timeout_s: float = setting(10.0, lo=1e-3)  # opening and each network read
    first_frame_timeout_s: float = setting(15.0, lo=1e-3)  # a connection with no decoded video frame by then ends
    refused_tries: int = setting(3, lo=1)  # opens in a row a source may refuse (401, 403, 404) before it fails
    stop_timeout_s: float = setting(5.0, lo=1e-3)  # how long stopping a stream waits for its thread
    max_sdp_bytes: int = setting(64 * 1024, lo=1)  # a WHIP offer
    max_frame_pixels: int = setting(4096 * 4096, lo=256)  # decoded frames above this are scaled down at decode
    # a camera clock (StreamSpec.camera_clock) further than this from ours is ignored: this server's clock is used
    camera_clock_max_skew_s: float = setting(300.0, lo=0.0)
    # recordings (StreamSpec.record): segment length (each cut at the next keyframe after it), each stream's cap
    # (oldest segments go first), and the longest moment one GET cuts
    record_segment_s: float = setting(60.0, lo=1.0, hi=3600.0)
    record_max_bytes: int = setting(20_000_000_000, lo=1_000_000)
    max_recording_range_s: float = setting(600.0, lo=1.0)
    # live sources; waits capped at 1 s so a camera is read again within about a second of its return (a source
    # refusing its credentials gives up after `refused_tries`, so fast retries cannot lock a camera account)
    reconnect: Backoff = field(default_factory=lambda: Backoff(max_s=1.0))
    # sharded ingest (ingest/shards.py): this process runs the streams whose name hashes to `ingest_shard` of
    # `ingest_shards`; "auto" takes the shard from the host name's trailing -<ordinal> (a StatefulSet pod)
    ingest_shard: str = "0"
    ingest_shards: int = setting(1, lo=1, hi=4096)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fps > self.max_fps:
            raise ValueError(f"VCFLASH_FPS ({self.fps:g}) must be <= VCFLASH_MAX_FPS ({self.max_fps:g})")
        check_shard("VCFLASH_INGEST_SHARD", self.ingest_shard, self.ingest_shards)


def check_shard(name: str, shard: str, shards: int) -> None:
    """A shard setting (`name`, with `name`S its count): 'auto' or a number in 0..shards-1."""
    value = shard.strip().lower()
    if value != "auto" and not (value.isdigit() and int(value) < shards):
        raise ValueError(f"{name} must be 'auto' or a number in 0..{shards - 1} ({name}S={shards}), got {shard!r}")


@dataclass(frozen=True)
class EncoderSettings(Section):
    max_batch: int = setting(8, lo=1)  # clips per forward pass
    max_wait_ms: float = setting(50.0, lo=0.0)  # how long a partial batch waits for company
    max_frame_side: int = setting(4096, lo=16)  # pixels, for clips received over gRPC
    store_retry: Backoff = field(default_factory=lambda: Backoff(initial_s=0.2, max_s=5.0, jitter=0.0))


@dataclass(frozen=True)
class ReasonerSettings(Section):
    max_question_chars: int = setting(4000, lo=1)
    max_ask_frames: int = setting(2048, lo=4)  # per question, all streams together
    max_ask_streams: int = setting(8, lo=1)
    max_new_tokens: int = setting(2048, lo=1)
    max_history_turns: int = setting(16, lo=0)
    max_history_turn_chars: int = setting(8000, lo=1)  # each earlier question or answer
    max_history_chars: int = setting(32000, lo=1)  # all earlier turns together
    max_prompt_tokens: int = setting(32768, lo=64)  # text and visual tokens, checked before any embedding
    max_scan_clips: int = setting(2500, lo=1)  # clips a `scan` scores per stream; over it, the key index scores them
    # build the key index's keys in the background as clips are written (the default selection, index, reads them);
    # off: a question builds the keys of the clips it covers the first time (reasoner/keys.py)
    keys_ahead: bool = True
    # keep those keys in memory beside each clip's tokens (they count toward the stream's bytes): a restarted or a
    # second reasoner of the same model loads them instead of computing them (reasoner/keys.py, StoredKeys)
    keys_stored: bool = True
    max_alerts: int = setting(100, lo=1)  # standing questions (vcflash alerts add), all streams together
    alert_poll_s: float = setting(0.2, lo=0.01, hi=60.0)  # how often the alert runner looks for new clips
    # replicated reasoners share the alerts' streams as ingest shards share streams (ingest/shards.py): this one
    # evaluates the alerts on the streams whose name hashes to `reasoner_shard` of `reasoner_shards`
    reasoner_shard: str = "0"
    reasoner_shards: int = setting(1, lo=1, hi=4096)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_shard("VCFLASH_REASONER_SHARD", self.reasoner_shard, self.reasoner_shards)


@dataclass(frozen=True)
class DeliverySettings(Section):
    """Alert events sent out by webhook and MQTT (reasoner/delivery.py)."""

    # webhooks: a URL whose host is or resolves to a loopback, private, link-local, ... address is refused unless
    # this is set (SSRF: a token holder could otherwise make the server POST into its own network)
    webhook_allow_private: bool = False
    webhook_timeout_s: float = setting(10.0, lo=1e-3)  # each attempt, connect to the end of the response
    webhook_retries: int = setting(5, lo=0, hi=100)  # attempts after the first, then the record is a dead letter
    webhook_backoff: Backoff = field(default_factory=lambda: Backoff(initial_s=1.0, max_s=60.0))
    delivery_max_queue: int = setting(10_000, lo=1)  # records waiting per channel; more are counted and dropped
    # MQTT: one client per process; mqtt://host[:1883] or mqtts://host[:8883]; None: no MQTT
    mqtt_url: str | None = None
    mqtt_username: str | None = None
    mqtt_password: str | None = field(default=None, repr=False)
    mqtt_tls_ca: Path | None = None  # CA (PEM) of an mqtts broker; None: the system's CAs
    mqtt_client_id: str | None = None  # None: "vcflash-" and random hex
    mqtt_timeout_s: float = setting(5.0, lo=1e-3)  # wait for the broker (connection, then PUBACK) per record
    # reconnecting to the broker (paho's doubling wait; jitter spreads the first wait, per process)
    mqtt_reconnect: Backoff = field(default_factory=lambda: Backoff(initial_s=1.0, max_s=30.0))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mqtt_url is not None:
            mqtt_address(self.mqtt_url)
        if self.mqtt_password is not None and self.mqtt_username is None:
            raise ValueError("VCFLASH_MQTT_PASSWORD needs VCFLASH_MQTT_USERNAME")


def mqtt_address(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) of an `mqtt://host[:port]` or `mqtts://host[:port]` URL; credentials go in their own
    settings, never in the URL (which is logged)."""
    if "@" in url:  # checked first: no message below may quote a password
        raise ValueError("VCFLASH_MQTT_URL must not hold credentials: set VCFLASH_MQTT_USERNAME/_PASSWORD")
    wrong = f"VCFLASH_MQTT_URL must be mqtt://host[:port] or mqtts://host[:port], got {url!r}"
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ValueError(wrong) from None
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ValueError(wrong)
    return parts.hostname, port or (8883 if scheme == "mqtts" else 1883), scheme == "mqtts"


@dataclass(frozen=True)
class LinkSettings(Section):
    """Ingest's links to the remote encoder and, for its web console's chat, the reasoner (split deployment)."""

    # one encoder (host:port), every address a name resolves to (dns:///name:port, resolved again every
    # `encoder_resolve_s`), or a comma-separated list of either: see ingest/encoder_link.py
    encoder_address: str = "127.0.0.1:50052"
    encoder_resolve_s: float = setting(30.0, lo=0.1)
    # an encoder holding clips that acknowledges none for this long is treated as dead (hung): its clips move on
    encoder_ack_timeout_s: float = setting(60.0, lo=0.1)
    reasoner_address: str = "127.0.0.1:50053"  # where the console's chat asks (VCFLASH_REASONER_ADDRESS, as clients)
    tls_ca: Path | None = None  # CA of the encoder's and the reasoner's certificates; None: plaintext
    max_unacked_clips: int = setting(64, lo=1)  # clips kept for resending until stored
    link_backoff: Backoff = field(default_factory=lambda: Backoff(max_s=10.0))

    def __post_init__(self) -> None:
        super().__post_init__()
        parts = [p.strip() for p in self.encoder_address.split(",")]
        for part in parts:
            name = part.removeprefix("dns:///")
            if not part or (part != name and not name.rpartition(":")[2].isdigit()):
                raise ValueError(
                    "VCFLASH_ENCODER_ADDRESS must be host:port, dns:///name:port or a comma-separated list of them, "
                    f"got {self.encoder_address!r}"
                )


@dataclass(frozen=True)
class Settings:
    """Every service's settings; each service reads the sections it needs."""

    server: ServerSettings = field(default_factory=ServerSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    encoder: EncoderSettings = field(default_factory=EncoderSettings)
    reasoner: ReasonerSettings = field(default_factory=ReasonerSettings)
    link: LinkSettings = field(default_factory=LinkSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Defaults, then VCFLASH_* variables, then explicit (non-None) overrides by leaf field name (CLI flags,
        tests): `Settings.from_env(model="tiny", redis_url=url)`; an unknown name is a TypeError."""
        return from_env(cls, env, overrides)

    def with_token(self) -> Self:
        return replace(self, server=self.server.with_token())


@dataclass(frozen=True)
class ClientSettings(Section):
    """What the CLI and the Python client read: where the servers are and the token to present. Apart from the
    service tree: a client never needs a service's settings."""

    address: str = DEFAULT_ADDRESS
    reasoner_address: str | None = None  # where Ask goes; None: `address` (all-in-one)
    api_token: str | None = field(default=None, repr=False)
    data_dir: Path = field(default_factory=lambda: ServerSettings().data_dir)
    tls_ca: Path | None = None  # CA certificate (PEM) to verify the servers' TLS certificate; None: plaintext
    http_url: str | None = None  # the HTTP API (recordings); None: the address's host, port 8080 (https with tls_ca)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        return from_env(cls, env, overrides)

    def token(self) -> str:
        """The configured token, else the one a server on this machine keeps in the data dir."""
        if self.api_token:
            return self.api_token
        path = token_path(self.data_dir)
        if not path.is_file():
            raise ValueError(
                f"no API token: pass --token, set VCFLASH_API_TOKEN, or run the server once to create {path}"
            )
        return read_token(path)


def variables(cls: type = None, prefix: str = PREFIX) -> Iterator[tuple[str, Any]]:  # type: ignore[assignment]
    """(environment variable, declared type) of every leaf of the settings tree."""
    cls = cls or Settings
    for f in fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        if cls is Settings:
            yield from variables(kind, prefix)
        elif is_dataclass(kind):
            yield from variables(kind, f"{prefix}{f.name.upper()}_")
        else:
            yield prefix + f.name.upper(), kind


def from_env(cls: type, env: Mapping[str, str] | None, overrides: dict[str, Any]) -> Any:
    """`cls` from defaults, then VCFLASH_* variables, then the non-None `overrides` by leaf field name."""
    left = {k: v for k, v in overrides.items() if v is not None}
    settings = read(cls, os.environ if env is None else env, left)
    if left:
        raise TypeError(f"unknown settings: {', '.join(sorted(left))}")
    return settings


def read(cls: type, env: Mapping[str, str], overrides: dict[str, Any], prefix: str = PREFIX, base: Any = None) -> Any:
    """An instance of the settings class `cls` (or `base`, with its values replaced) from `env` and `overrides`
    (leaf name -> value), recursively."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):
        kind, name = hints[f.name], prefix + f.name.upper()
        if cls is Settings:  # sections are transparent: their leaves' variables do not name them
            values[f.name] = read(kind, env, overrides, prefix)
        elif f.name in overrides:
            values[f.name] = overrides.pop(f.name)
        elif is_dataclass(kind):  # a group such as `reconnect: Backoff`: its variables carry its name
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            values[f.name] = read(kind, env, {}, name + "_", default)
        elif (raw := env.get(name)) is not None and raw != "":
            values[f.name] = parse(name, raw, kind)
    return cls(**values) if base is None else replace(base, **values)


def parse(name: str, raw: str, kind: Any) -> Any:
    """`raw` as the declared type: str, int, float, bool, Path, or `X | None` ("none" gives None)."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        if raw.strip().lower() == "none":
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    try:
        if kind is bool:
            if raw.strip().lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if kind is Path:
            return Path(raw).expanduser()
        return kind(raw)
    except ValueError as e:
        raise ValueError(f"{name}={raw!r} is not a {getattr(kind, '__name__', kind)}") from e


def check_token(token: str, source: str | Path) -> str:
    """`token`, if long enough to be a secret: an empty one would make `Bearer ` with nothing after it a valid
    credential. `source` (a variable or a file) goes in the error so the operator knows what to fix."""
    if len(token.strip()) < MIN_TOKEN_CHARS or token != token.strip():
        raise ValueError(
            f"API token from {source} must be at least {MIN_TOKEN_CHARS} characters without surrounding whitespace "
            f"(got {len(token.strip())}); e.g. `openssl rand -hex 24`"
        )
    return token


def token_path(data_dir: Path) -> Path:
    return data_dir / "api_token"


def read_token(path: Path) -> str:
    return check_token(path.read_text().strip(), path)


def read_or_create_token(data_dir: Path) -> str:
    """The server's bearer token, created (owner-readable only) on first start."""
    path = token_path(private_dir(data_dir))
    if not path.is_file():
        create_private_file(path, secrets.token_urlsafe(32) + "\n")
    return read_token(path)


def private_dir(path: Path) -> Path:
    """`path`, created or tightened to mode 0700: data dirs hold the API token, the secret key and camera passwords.

    A dir left 0755 by an older version is tightened (with a warning) rather than refused, so upgrades keep working;
    one this user cannot chmod is refused."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        try:
            path.chmod(0o700)
        except PermissionError as e:
            raise PermissionError(
                f"data dir {path} is open to other users (mode {mode:o}) and cannot be made 0700"
            ) from e
        log.warning("event=data_dir_tightened path=%s from=%o to=700", path, mode)
    return path


def create_private_file(path: Path, text: str) -> None:
    """Write `text` to a new file of mode 0600, atomically: a process starting at the same moment finds either no
    file or the whole of one (the first writer wins; a later one keeps the existing file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.link(tmp, path)  # fails if `path` exists, unlike rename
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
