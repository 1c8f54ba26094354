"""Time ranges on the command line (issue 8, item 8): `--from/--to` take media seconds or ISO date-times on the wall
clock (no zone: UTC, whatever this machine's zone), a range on two clocks is an error, and offline `ask` takes only
seconds. Nothing here needs a server: every error comes before a connection."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from vcflash.cli import build_parser, main, parse_range, parse_time
from vcflash.client import resolve_range

T = datetime(2026, 11, 21, 14, 0, tzinfo=UTC).timestamp()


@pytest.fixture
def away_from_utc(monkeypatch: pytest.MonkeyPatch):
    """This process in a zone far from UTC, so a naive time read as local would be off by hours."""
    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_parse_time_reads_seconds_or_date_times(away_from_utc) -> None:
    assert parse_time("12.5") == (12.5, False)
    assert parse_time("2026-11-21T14:00") == (T, True)  # naive: UTC, not the machine's zone
    assert parse_time("2026-11-21T14:00:00Z") == (T, True)
    assert parse_time("2026-11-21T15:30+01:30") == (T, True)
    for bad, match in [("yesterday", "neither seconds nor an ISO date-time"), ("nan", "finite"), ("1e999", "finite")]:
        with pytest.raises(ValueError, match=match):
            parse_time(bad)


def test_parse_range_keeps_one_clock() -> None:
    assert parse_range(None, None) == (None, None, False)
    assert parse_range("4", None) == (4.0, None, False)
    assert parse_range("2026-11-21T14:00", "2026-11-21T14:05") == (T, T + 300, True)
    assert parse_range(None, "2026-11-21T14:05") == (None, T + 300, True)
    assert parse_range("1763733600", "1763733900", wall=True) == (1763733600.0, 1763733900.0, True)
    assert parse_range("2026-11-21T14:00", str(T + 300), wall=True) == (T, T + 300, True)  # Unix seconds: one clock
    for start, end in [("2026-11-21T14:00", "30"), ("30", "2026-11-21T14:00")]:
        with pytest.raises(ValueError, match="mixes clocks"):
            parse_range(start, end)


def test_client_ranges_take_date_times(away_from_utc) -> None:
    naive = datetime(2026, 11, 21, 14, 0)
    assert resolve_range(naive, None) == (T, None, True)
    assert resolve_range(3.0, 6.0) == (3.0, 6.0, False)
    assert resolve_range(3.0, 6.0, wall_clock=True) == (3.0, 6.0, True)
    with pytest.raises(ValueError, match="mixes clocks"):
        resolve_range(naive, 6.0)


def test_ask_live_refuses_a_range_on_two_clocks(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["ask-live", "--stream", "cam", "What moved?", "--from", "2026-11-21T14:00", "--to", "30"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("vcflash: error: time range mixes clocks") and "--wall" in err


def test_ask_live_help_says_how_times_are_read(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ask-live", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "no zone: UTC" in help_text and "overlapping" in help_text


def test_offline_ask_takes_from_to_in_seconds_only(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["ask", "v.mp4", "q", "--from", "2", "--to", "10.5"])
    assert (args.start, args.end) == (2.0, 10.5)
    args = parser.parse_args(["ask", "v.mp4", "q", "--start", "2", "--end", "10.5"])  # the older names still work
    assert (args.start, args.end) == (2.0, 10.5)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["ask", "v.mp4", "q", "--from", "2026-11-21T14:00"])
    assert e.value.code == 2
    assert "a video file has no wall clock" in capsys.readouterr().err
