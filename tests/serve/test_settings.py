"""The settings tree: VCFLASH_* names, parsing by declared type, bounds, overrides, and the README table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vcflash.serve.settings import Backoff, ClientSettings, Settings, variables

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_variables_keep_their_names_and_parse_by_type(tmp_path: Path) -> None:
    env = {
        "VCFLASH_QUEUE_CLIPS": "7",
        "VCFLASH_MAX_WAIT_MS": "12.5",
        "VCFLASH_DATA_DIR": str(tmp_path),
        "VCFLASH_RETENTION_MAX_AGE_S": "none",
        "VCFLASH_RECONNECT_MAX_S": "3",
        "VCFLASH_STORE_RETRY_MAX_S": "2",
        "VCFLASH_REDIS_URL": "",  # empty means unset
    }
    s = Settings.from_env(env)
    assert s.ingest.queue_clips == 7 and s.encoder.max_wait_ms == 12.5 and s.server.data_dir == tmp_path
    assert s.memory.retention_max_age_s is None and s.memory.redis_url is None
    assert s.ingest.reconnect == Backoff(initial_s=0.5, max_s=3.0, jitter=0.2, reset_after_s=60.0)
    # a nested group starts from its field's own default, not the class's
    assert s.encoder.store_retry == Backoff(initial_s=0.2, max_s=2.0, jitter=0.0, reset_after_s=60.0)


def test_overrides_win_over_the_environment_and_unknown_names_are_refused() -> None:
    s = Settings.from_env({"VCFLASH_MAX_BATCH": "4", "VCFLASH_MODEL": "x"}, max_batch=16, model=None)
    assert s.encoder.max_batch == 16 and s.model.model == "x"  # None means: not given
    with pytest.raises(TypeError, match="bogus"):
        Settings.from_env({}, bogus=1)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("VCFLASH_MAX_BATCH", "0", "VCFLASH_MAX_BATCH must be >= 1, got 0"),
        ("VCFLASH_HTTP_PORT", "70000", "VCFLASH_HTTP_PORT must be in [0, 65535]"),
        ("VCFLASH_TOKEN_FORMAT", "fp8", "VCFLASH_TOKEN_FORMAT must be one of fp16, int8"),
        ("VCFLASH_QUEUE_CLIPS", "many", "VCFLASH_QUEUE_CLIPS='many' is not a int"),
        ("VCFLASH_FPS", "nan", "must be a finite number"),
        ("VCFLASH_FPS", "40", "VCFLASH_FPS must be in [0.001, 30]"),
    ],
)
def test_bad_values_fail_at_start_naming_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Settings.from_env({name: value})


def test_backoff_doubles_to_its_cap() -> None:
    assert [Backoff(jitter=0).delay(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    with pytest.raises(ValueError, match="max_s"):
        Backoff(initial_s=2, max_s=1)


def test_client_settings_resolve_the_token_like_the_cli(tmp_path: Path) -> None:
    assert ClientSettings.from_env({"VCFLASH_API_TOKEN": "t0ken"}).token() == "t0ken"
    with pytest.raises(ValueError, match="no API token"):
        ClientSettings.from_env({"VCFLASH_DATA_DIR": str(tmp_path)}).token()
    (tmp_path / "api_token").write_text("from-file-0123456789\n")
    assert ClientSettings.from_env({"VCFLASH_DATA_DIR": str(tmp_path)}).token() == "from-file-0123456789"


def test_every_variable_is_documented_in_the_readme() -> None:
    documented = set(re.findall(r"VCFLASH_[A-Z0-9_]+", README))
    # grouped rows write `VCFLASH_RECONNECT_INITIAL_S` / `_MAX_S`: expand the suffixes
    for head, tails in re.findall(r"`(VCFLASH_[A-Z0-9]+(?:_[A-Z0-9]+)*?)_INITIAL_S` / ((?:`_[A-Z_]+` ?/? ?)+)", README):
        documented |= {head + t.strip("` ") for t in tails.split("/")}
    missing = [name for name, _ in variables() if name not in documented]
    missing += [name for name, _ in variables(ClientSettings) if name not in documented]
    assert not missing, missing
