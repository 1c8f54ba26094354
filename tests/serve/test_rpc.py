"""The one error mapping: neutral errors by kind, anything else INTERNAL with nothing for the client."""

from __future__ import annotations

import grpc
import pytest

from memory.store import MemoryUnavailable, UnknownStream
from vcflash.serve.errors import AlreadyExists, Exhausted, Invalid, NotFound, Unavailable
from vcflash.serve.rpc import status_for


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (NotFound("no stream named 'x'"), grpc.StatusCode.NOT_FOUND, "no stream named 'x'"),
        (UnknownStream("cam"), grpc.StatusCode.NOT_FOUND, "unknown stream 'cam'"),
        (Invalid("bad fps"), grpc.StatusCode.INVALID_ARGUMENT, "bad fps"),
        (AlreadyExists("taken"), grpc.StatusCode.ALREADY_EXISTS, "taken"),
        (Exhausted("full"), grpc.StatusCode.RESOURCE_EXHAUSTED, "full"),
        (Unavailable("down"), grpc.StatusCode.UNAVAILABLE, "down"),
        (MemoryUnavailable("redis at x unreachable"), grpc.StatusCode.UNAVAILABLE, "memory unavailable: redis"),
    ],
)
def test_neutral_errors_map_by_kind(error: Exception, code: grpc.StatusCode, message: str) -> None:
    got_code, got_message = status_for(error)
    assert got_code == code and got_message.startswith(message)


@pytest.mark.parametrize("error", [ValueError("/etc/secret"), KeyError("k"), TypeError("t"), RuntimeError("boom")])
def test_anything_else_is_internal_and_says_nothing(error: Exception) -> None:
    assert status_for(error) == (grpc.StatusCode.INTERNAL, "internal error")


def test_neutral_errors_are_still_the_builtins_callers_catch() -> None:
    assert isinstance(Invalid("x"), ValueError) and isinstance(NotFound("x"), KeyError)
    assert str(NotFound("no stream named 'x'")) == "no stream named 'x'"  # not KeyError's repr
