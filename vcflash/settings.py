"""Service settings, read from `VCFLASH_*` environment variables in this one place.

Each field of `Settings` is the variable `VCFLASH_<FIELD>`; the README's Settings table documents them.
CLI flags override the environment.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Self

PREFIX = "VCFLASH_"
DEFAULT_ADDRESS = "127.0.0.1:50051"


@dataclass(frozen=True)
class Settings:
    model: str = "OpenGVLab/VideoChat-Flash-Qwen2_5-2B_res448"
    device: str = "cpu"
    dtype: str = "float32"
    data_dir: Path = Path.home() / ".local" / "share" / "vcflash"
    redis_url: str | None = None
    token_format: str = "fp16"
    address: str = DEFAULT_ADDRESS
    reasoner_address: str | None = None
    encoder_address: str = "127.0.0.1:50052"
    http_port: int = 8080
    max_unacked_clips: int = 64
    api_token: str | None = None
    metrics_port: int = 9464
    queue_clips: int = 256
    max_batch: int = 8
    max_wait_ms: float = 50.0
    retention_max_age_s: float | None = 7 * 24 * 3600.0
    retention_max_bytes: int | None = 2_000_000_000
    max_message_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.token_format not in ("fp16", "int8"):
            raise ValueError(f"VCFLASH_TOKEN_FORMAT must be fp16 or int8, got {self.token_format!r}")
        for name in ("queue_clips", "max_batch", "max_message_bytes", "max_unacked_clips"):
            if getattr(self, name) < 1:
                raise ValueError(f"VCFLASH_{name.upper()} must be >= 1, got {getattr(self, name)}")
        for name in ("metrics_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"VCFLASH_{name.upper()} must be a port number, got {getattr(self, name)}")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Self:
        """Defaults, then VCFLASH_* variables, then explicit (non-None) overrides such as CLI flags."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, raw, f.type)
        values |= {k: v for k, v in overrides.items() if v is not None}
        return cls(**values)

    def with_token(self) -> Self:
        """These settings with an API token: the configured one, or one kept in the data dir."""
        if self.api_token:
            return self
        return replace(self, api_token=read_or_create_token(self.data_dir))


def _parse(name: str, raw: str, annotation: Any) -> Any:
    kind = str(annotation)
    try:
        if "Path" in kind:
            return Path(raw).expanduser()
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError as e:
        raise ValueError(f"{PREFIX}{name.upper()}={raw!r} is not a {kind}") from e
    return raw


def token_path(data_dir: Path) -> Path:
    return data_dir / "api_token"


def read_or_create_token(data_dir: Path) -> str:
    """The server's bearer token, created (owner-readable only) on first start."""
    path = token_path(data_dir)
    if path.is_file():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token
