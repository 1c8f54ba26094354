"""Console sign-in: sessions behind an HttpOnly cookie, each with a CSRF token, and who may call what.

The cookie holds a random session id, never the API token: signing out (or a restart) ends the session, and a
leaked cookie does not leak the token. A cookie is sent by the browser on its own, so every state-changing call
authenticated by one must also carry the session's CSRF token in a header (a page on another site can make the
browser send the cookie, but cannot read the CSRF token). A bearer header is never sent on its own: requests that
carry one need no CSRF token. Failed sign-ins are limited per client address (:class:`SignInLimit`).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

COOKIE = "vcflash_session"
CSRF_HEADER = "X-CSRF-Token"
MAX_SESSIONS = 256  # signed-in browsers at once; the oldest session goes first
MAX_SIGNIN_FAILURES = 10  # failed sign-ins a client address may make in SIGNIN_WINDOW_S, then 429
SIGNIN_WINDOW_S = 60.0
MAX_SIGNIN_CLIENTS = 4096  # addresses whose failures are counted at once; the least recent goes first


@dataclass(frozen=True)
class Session:
    csrf: str
    expires: float  # time.monotonic()


class Sessions:
    """Sessions by id, in memory: a restarted server asks everyone to sign in again."""

    def __init__(self, token: str, ttl_s: float, *, secure: bool) -> None:
        if not token:
            raise ValueError("the console needs an API token to sign in with")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self._token = token.encode()
        self.ttl_s = ttl_s
        self.secure = secure  # served over TLS: the cookie is Secure
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def check_token(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self._token)

    def sign_in(self, response: web.StreamResponse) -> Session:
        """A new session, its cookie set on `response`."""
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        sid = secrets.token_urlsafe(32)
        session = self._sessions[sid] = Session(secrets.token_urlsafe(32), time.monotonic() + self.ttl_s)
        response.set_cookie(
            COOKIE,
            sid,
            max_age=int(self.ttl_s),
            path="/",
            secure=self.secure,
            httponly=True,
            samesite="Strict",
        )
        return session

    def sign_out(self, request: web.Request, response: web.StreamResponse) -> None:
        self._sessions.pop(request.cookies.get(COOKIE, ""), None)
        response.del_cookie(COOKIE, path="/", secure=self.secure, httponly=True, samesite="Strict")

    def session(self, request: web.Request) -> Session | None:
        """The request's live session, None when it has no cookie or one that is unknown or expired."""
        sid = request.cookies.get(COOKIE)
        session = self._sessions.get(sid) if sid else None
        if session is not None and session.expires < time.monotonic():
            del self._sessions[sid]  # type: ignore[arg-type]
            return None
        return session

    def authorize(self, request: web.Request) -> None:
        """Raise 401 unless the request holds the bearer token or a session; 403 for a state-changing call
        authenticated by the cookie without the session's CSRF token in the header."""
        if "Authorization" in request.headers:
            scheme, _, credentials = request.headers["Authorization"].partition(" ")
            if scheme.lower() == "bearer" and self.check_token(credentials.strip()):
                return
            raise error(web.HTTPUnauthorized, "invalid bearer token")
        session = self.session(request)
        if session is None:
            raise error(web.HTTPUnauthorized, "sign in first (or send Authorization: Bearer <token>)")
        if request.method not in ("GET", "HEAD"):
            sent = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
                raise error(web.HTTPForbidden, f"missing or wrong {CSRF_HEADER} header")

    def reads(self, request: web.Request) -> bool:
        """Whether a session may read this request (the thumbnail and recording GETs an <img> or a fetch makes)."""
        return request.method in ("GET", "HEAD") and self.session(request) is not None


class SignInLimit:
    """Failed sign-ins per client address: at most `max_failures` in any `window_s`, then refused until the oldest
    of them is `window_s` old. A success resets nothing (behind a shared address, one user signing in must not
    let another carry on guessing). IPv6 clients count per /64, the block one host usually holds. At most
    `max_clients` addresses are tracked: expired ones go first, then the least recently failing."""

    def __init__(
        self,
        max_failures: int = MAX_SIGNIN_FAILURES,
        window_s: float = SIGNIN_WINDOW_S,
        max_clients: int = MAX_SIGNIN_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 1 or window_s <= 0 or max_clients < 1:
            raise ValueError(
                f"max_failures and max_clients must be >= 1 and window_s > 0, got {max_failures}, {max_clients}, "
                f"{window_s}"
            )
        self.max_failures, self.window_s, self.max_clients, self.clock = max_failures, window_s, max_clients, clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()  # least recently failing first

    def retry_after(self, address: str | None) -> int:
        """Whole seconds until `address` may try again; 0 when it may now."""
        failures = self._failures.get(_client(address))
        if failures is None or len(failures) < self.max_failures:
            return 0
        wait = failures[0] + self.window_s - self.clock()
        return math.ceil(wait) if wait > 0 else 0

    def failed(self, address: str | None) -> None:
        key, now = _client(address), self.clock()
        failures = self._failures.pop(key, None)
        if failures is None:
            while self._failures and next(iter(self._failures.values()))[-1] + self.window_s <= now:
                self._failures.popitem(last=False)  # expired: every failure older than the window
            while len(self._failures) >= self.max_clients:
                self._failures.popitem(last=False)
            failures = deque(maxlen=self.max_failures)
        failures.append(now)
        self._failures[key] = failures

    def __len__(self) -> int:
        return len(self._failures)


def _client(address: str | None) -> str:
    """The key an address is counted under: itself, or its /64 for IPv6."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address or ""
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        return str(mapped) if mapped is not None else str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def error(kind: type[web.HTTPException], message: str, **kwargs: Any) -> web.HTTPException:
    """An HTTP error whose body is `{"error": message}`."""
    return kind(text=json.dumps({"error": message}), content_type="application/json", **kwargs)
