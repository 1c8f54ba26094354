"""Stream configs hold camera URLs with their passwords, so both backends store them sealed with Fernet
(AES-128-CBC plus HMAC-SHA256, from `cryptography`) under a key kept apart from the memory itself.

The key is VCFLASH_SECRET_KEY, else `secret.key` (0600) in the data dir, made on first use. Configs written as
plain JSON by older versions still read, and are sealed when next written. A config sealed under another key is
skipped with an error in the log, not raised: one unreadable camera must not stop a server from starting.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from vcflash.serve.settings import create_private_file, private_dir

log = logging.getLogger(__name__)

KEY_FILE = "secret.key"


def fernet(key: str | bytes, source: str | Path) -> Fernet:
    try:
        return Fernet(key.strip())
    except ValueError as e:  # binascii.Error is a ValueError
        raise ValueError(
            f"secret key from {source} is not a Fernet key (32 url-safe base64-encoded bytes); make one with "
            "`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`"
        ) from e


class ConfigCipher:
    """Seals and opens stream configs. `key` wins over `key_file`, which is read (or made) only when first needed,
    so a process that never touches configs leaves no key file behind."""

    def __init__(self, key: str | None = None, key_file: Path | None = None) -> None:
        self._fernet = fernet(key, "VCFLASH_SECRET_KEY") if key else None
        self.key_file = key_file
        self.source = "VCFLASH_SECRET_KEY" if key or key_file is None else str(key_file)  # for messages

    def _key(self) -> Fernet:
        if self._fernet is None:
            if self.key_file is None:
                raise ValueError("stream configs need a secret key: set VCFLASH_SECRET_KEY")
            path = private_dir(self.key_file.parent) / self.key_file.name
            if not path.is_file():
                create_private_file(path, Fernet.generate_key().decode() + "\n")
                log.info("event=secret_key_created path=%s", path)
            self._fernet = fernet(path.read_bytes(), path)
        return self._fernet

    def seal(self, config: dict[str, Any]) -> str:
        """The config as a Fernet token (ASCII)."""
        return self._key().encrypt(json.dumps(config).encode()).decode()

    def unseal(self, stream_id: str, stored: str | bytes) -> dict[str, Any] | None:
        """The config held in `stored`, or None (logged) when it was sealed under another key."""
        blob = stored.encode() if isinstance(stored, str) else stored
        if blob.lstrip().startswith(b"{"):  # plain JSON from a version before sealing
            return json.loads(blob)
        try:
            return json.loads(self._key().decrypt(blob))
        except InvalidToken:
            log.error(
                "event=stream_config_unreadable stream=%s: its config was sealed under another secret key than the "
                "one from %s; the stream is skipped until added again",
                stream_id,
                self.source,
            )
            return None

    def unseal_all(self, stored: dict[str, str | bytes]) -> dict[str, dict[str, Any]]:
        """Every config of `stored` (stream id -> sealed config) that opens."""
        opened = {stream_id: self.unseal(stream_id, blob) for stream_id, blob in stored.items()}
        return {stream_id: config for stream_id, config in opened.items() if config is not None}
