"""One fuzz server for the session (see `harness.py`), and the totals printed after the run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .harness import TALLY, FuzzServer, start_server, stop_server


@pytest.fixture(scope="session")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzServer]:
    server = start_server(tmp_path_factory.mktemp("fuzz"))
    try:
        yield server
    finally:
        code = stop_server(server)
        assert code == 0, f"the fuzz server did not stop cleanly (exit status {code})"


@pytest.fixture(autouse=True)
def clean_streams(request: pytest.FixtureRequest) -> Iterator[None]:
    """Streams a test added are removed after it, so each test starts from the protected streams alone."""
    yield
    if "fuzz_server" in request.fixturenames:
        request.getfixturevalue("fuzz_server").remove_fuzz_streams()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TALLY.codes:
        for line in TALLY.lines():
            terminalreporter.write_line(line)
