"""Neutral errors: domain errors subclass one of these, and `rpc.status_for` maps only these to gRPC codes.

Each also subclasses the builtin a caller would expect (`Invalid` is a ValueError, `NotFound` a KeyError), so
code that catches builtins keeps working.
"""

from __future__ import annotations


class NotFound(KeyError):
    """What was named does not exist: NOT_FOUND."""

    def __str__(self) -> str:  # KeyError's str() is the repr of its argument
        return str(self.args[0]) if self.args else "not found"


class Invalid(ValueError):
    """A request that cannot be served as posed: INVALID_ARGUMENT."""


class AlreadyExists(Exception):
    """ALREADY_EXISTS."""


class FailedPrecondition(Exception):
    """The request is fine but the system is not in a state to serve it (deleting a running stream's memory):
    FAILED_PRECONDITION; the message says what to do instead."""


class Exhausted(Exception):
    """A limit was reached (a full queue, too many streams): RESOURCE_EXHAUSTED."""


class Unavailable(Exception):
    """A backend this service needs cannot be reached right now: UNAVAILABLE (retry later)."""


def excerpt(text: object, limit: int = 48) -> str:
    """A short, printable prefix of client-supplied `text` for error messages and logs: never the whole of a long
    input (a 7 MB question must not come back in its own error), with control characters escaped."""
    s = str(text)
    return repr(s) if len(s) <= limit else f"{s[:limit]!r}... ({len(s)} characters)"
