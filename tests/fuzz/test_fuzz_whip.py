"""SDP and HTTP abuse against the WHIP port, over raw sockets on 127.0.0.1: missing and wrong tokens, wrong content
types, garbage and oversized offers, broken framing, absurd paths and methods, oversized and malformed headers,
slowloris heads, more connections than the cap, and mutated offers. Every answer is a 4xx (or 201 for an offer that
really is one), never a 5xx, never a secret; the server keeps answering /healthz."""

from __future__ import annotations

import random
import socket
import time

import pytest

from . import gen
from .harness import HTTP_MAX_CONNECTIONS, HTTP_TIMEOUT_S, KEEP, TALLY, TOKEN, FuzzServer, check_invariants, leaks

SEED = 8_4
GARBAGE_OFFERS = 60
MUTATED_OFFERS = 40
AUTH = ("Authorization", f"Bearer {TOKEN}")
SDP = ("Content-Type", "application/sdp")


def exchange(server: FuzzServer, raw: bytes, timeout: float = 10.0, to_close: bool = False) -> tuple[int | None, bytes]:
    """Send `raw`, read the answer (or until the server closes, `to_close`); (status or None if it closed without
    answering, the whole response)."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=timeout) as s:
        try:
            s.sendall(raw)
        except OSError:  # it may answer and close before taking a large body
            pass
        data = bytearray()
        try:  # to the end of the answer: after one, aiohttp may linger (up to 10 s) for a body that never comes
            while (to_close or not answered(data)) and (chunk := s.recv(65536)):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return final_status(bytes(data)), bytes(data)


def answered(data: bytearray) -> bool:
    """Whether `data` holds a whole final answer (its head and, by Content-Length, its body)."""
    end = 0
    while (head_end := data.find(b"\r\n\r\n", end)) >= 0:
        head = bytes(data[end:head_end]).lower()
        status = head.split(b"\r\n", 1)[0].split()
        if len(status) > 1 and status[1].startswith(b"1"):  # 100 Continue: the answer follows
            end = head_end + 4
            continue
        length = [line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.startswith(b"content-length:")]
        return bool(length) and len(data) - head_end - 4 >= int(length[0])
    return False


def final_status(response: bytes) -> int | None:
    """The status of the last response head in `response` (after any 100 Continue), or None if there is none."""
    status = None
    for head in response.split(b"\r\n\r\n"):
        line = head.split(b"\r\n", 1)[0].split()
        if len(line) > 1 and line[0].startswith(b"HTTP/") and line[1].isdigit():
            status = int(line[1])
            if status >= 200:
                return status
    return status


def request(server: FuzzServer, method: str, path: str, headers=(), body: bytes = b"", length: bool = True):  # type: ignore[no-untyped-def]
    return exchange(server, gen.http_request(method, path, headers, body, length))


def offer(port: int = 9) -> bytes:
    return gen.SDP_OFFER.format(port=port).encode()


def check(cls: str, label: str, got: tuple[int | None, bytes], allowed: set[int | None], failures: list[str]) -> None:
    status, response = got
    TALLY.add(f"whip/{cls}", status)
    if status not in allowed:
        failures.append(f"{label}: got {status}, expected {sorted(allowed, key=str)}: {response[:200]!r}")
    elif found := leaks(response):
        failures.append(f"{label}: secrets {found} in {response[:200]!r}")
    elif b"Traceback" in response:
        failures.append(f"{label}: a traceback in the answer")


def healthy(server: FuzzServer) -> bool:
    return request(server, "GET", "/healthz")[0] == 200


def test_auth_and_content_type(fuzz_server: FuzzServer) -> None:
    failures: list[str] = []
    cases = [
        ("no token", [SDP], {401}),
        ("wrong token", [("Authorization", "Bearer wrong-token-0123456789"), SDP], {401}),
        ("token prefix", [("Authorization", f"Bearer {TOKEN[:-1]}"), SDP], {401}),
        ("token suffix", [("Authorization", f"Bearer {TOKEN}x"), SDP], {401}),
        ("basic", [("Authorization", "Basic " + TOKEN), SDP], {401}),
        ("bearer alone", [("Authorization", "Bearer"), SDP], {401}),
        ("two tokens", [("Authorization", "Bearer x"), AUTH, SDP], {401}),
        ("text/plain", [AUTH, ("Content-Type", "text/plain")], {415}),
        ("no content type", [AUTH], {415}),
        ("multipart", [AUTH, ("Content-Type", "multipart/form-data; boundary=x")], {415}),
        ("json", [AUTH, ("Content-Type", "application/json")], {415}),
        ("sdp with charset, garbage", [AUTH, ("Content-Type", "application/sdp; charset=utf-8")], {400}),
    ]
    for label, headers, allowed in cases:
        body = b"garbage" if "garbage" in label else offer()
        check("auth_and_type", label, request(fuzz_server, "POST", "/whip/fz-auth", headers, body), allowed, failures)
    got = request(fuzz_server, "POST", "/whip/fz?token=not-the-token-0123", [SDP], offer())  # see the last test
    check("auth_and_type", "token in query", got, {401}, failures)
    for method in ("GET", "DELETE"):
        check("auth_and_type", f"{method} no token", request(fuzz_server, method, "/whip/fz-auth"), {401}, failures)
        got = request(fuzz_server, method, "/whip/fz-auth", [("Authorization", "Bearer nope")])
        check("auth_and_type", f"{method} wrong token", got, {401}, failures)
    assert not failures, "\n".join(failures)


def test_garbage_and_oversized_offers(fuzz_server: FuzzServer) -> None:
    rng = random.Random(SEED)
    failures: list[str] = []
    for i in range(GARBAGE_OFFERS):
        body = gen.garbage_sdp(rng)
        check(
            "garbage_sdp",
            f"garbage {i} {body[:40]!r}",
            request(fuzz_server, "POST", f"/whip/fz-g{i}", [AUTH, SDP], body),
            {400},
            failures,
        )
    limit = 64 * 1024
    big = b"v=0\r\n" + b"a=x\r\n" * (limit // 5)
    cases = [
        ("empty", [AUTH, SDP], b"", True, {400}),
        ("blank", [AUTH, SDP], b" \r\n\t", True, {400}),
        ("over the limit", [AUTH, SDP], big, True, {413}),
        ("claims a terabyte", [AUTH, SDP, ("Content-Length", str(10**12))], b"v=0\r\n", False, {413}),
        ("chunked over the limit", [AUTH, SDP, ("Transfer-Encoding", "chunked")], None, False, {413}),
        ("negative length", [AUTH, SDP, ("Content-Length", "-1")], b"v=0\r\n", False, {400}),
        ("length abc", [AUTH, SDP, ("Content-Length", "abc")], b"v=0\r\n", False, {400}),
        (
            "length and chunked",
            [AUTH, SDP, ("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
            b"v=0\r\n",
            False,
            {400},
        ),
        ("two lengths", [AUTH, SDP, ("Content-Length", "5"), ("Content-Length", "6")], b"v=0\r\n", False, {400}),
        ("gzip encoding", [AUTH, SDP, ("Transfer-Encoding", "gzip")], b"v=0\r\n", False, {400, 501}),
        ("bad chunk", [AUTH, SDP, ("Transfer-Encoding", "chunked")], b"zz\r\nv=0\r\n0\r\n\r\n", False, {400}),
    ]
    for label, headers, body, length, allowed in cases:
        if body is None:  # chunks of 16 KiB past the limit
            chunk = b"a=x\r\n" * 3277
            body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(6)) + b"0\r\n\r\n"
        got = request(fuzz_server, "POST", "/whip/fz-big", headers, body, length)
        check("oversized_and_framing", label, got, allowed, failures)
    # A body that never arrives: 408 after VCFLASH_HTTP_TIMEOUT_S. (aiohttp then lingers up to 10 s more reading the
    # rest of the body before it closes; only the answer is timed here.)
    raw = gen.http_request("POST", "/whip/fz-slow", [AUTH, SDP, ("Content-Length", "100")], b"v=0\r\n", False)
    with socket.create_connection(("127.0.0.1", fuzz_server.http_port), timeout=HTTP_TIMEOUT_S + 5) as s:
        t0 = time.monotonic()
        s.sendall(raw)
        answer = s.recv(4096)
        waited = time.monotonic() - t0
    check("oversized_and_framing", "short body", (final_status(answer), answer), {408}, failures)
    assert HTTP_TIMEOUT_S * 0.5 < waited < HTTP_TIMEOUT_S + 3, waited
    assert not failures, "\n".join(failures)
    assert healthy(fuzz_server)


def test_absurd_paths_methods_and_headers(fuzz_server: FuzzServer) -> None:
    failures: list[str] = []
    auth = [AUTH]
    cases: list[tuple[str, bytes, set[int | None]]] = [
        ("traversal", gen.http_request("GET", "/whip/../../etc/passwd", auth), {404}),
        ("dot dot name", gen.http_request("GET", "/whip/%2e%2e", auth), {404}),
        ("encoded slash", gen.http_request("POST", "/whip/a%2Fb", [AUTH, SDP], offer()), {400, 404}),
        ("NUL in name", gen.http_request("POST", "/whip/cam%00", [AUTH, SDP], offer()), {400}),
        ("CRLF in name", gen.http_request("POST", "/whip/cam%0d%0aX:1", [AUTH, SDP], offer()), {400}),
        ("unicode name", gen.http_request("POST", "/whip/%E6%91%84", [AUTH, SDP], offer()), {400}),
        ("10 KB name", gen.http_request("POST", "/whip/" + "a" * 10_000, [AUTH, SDP], offer()), {400, 414}),
        ("65-char name", gen.http_request("POST", "/whip/" + "a" * 65, [AUTH, SDP], offer()), {400}),
        ("bad utf-8", gen.http_request("GET", "/%ff%fe", auth), {404}),
        ("no stream", gen.http_request("POST", "/whip/", [AUTH, SDP], offer()), {404, 405}),
        ("deeper", gen.http_request("POST", "/whip/a/b", [AUTH, SDP], offer()), {404, 405}),
        ("unknown", gen.http_request("GET", "/admin", auth), {404}),
        ("PUT", gen.http_request("PUT", "/whip/fz", [AUTH, SDP], offer()), {405}),
        ("PATCH", gen.http_request("PATCH", "/whip/fz", [AUTH, SDP], b"a=x"), {405}),
        ("FOO", gen.http_request("FOO", "/whip/fz", auth), {400, 405}),
        ("TRACE", gen.http_request("TRACE", "/whip/fz", auth), {405}),
        ("CONNECT", b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", {400, 404, 405}),
        (
            "absolute URI",
            b"GET http://127.0.0.1/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            {200, 400, 404},
        ),
        ("asterisk", b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", {400, 404, 405}),
        ("OPTIONS preflight", gen.http_request("OPTIONS", "/whip/fz"), {204}),
        ("GET unknown stream", gen.http_request("GET", "/whip/fz-none", auth), {404}),
        ("DELETE unknown stream", gen.http_request("DELETE", "/whip/fz-none", auth), {404}),
        ("DELETE a gRPC stream", gen.http_request("DELETE", f"/whip/{KEEP[0]}", auth), {404}),
        ("POST a taken name", gen.http_request("POST", f"/whip/{KEEP[0]}", [AUTH, SDP], offer()), {409}),
        ("fps nan", gen.http_request("POST", "/whip/fz?fps=nan", [AUTH, SDP], offer()), {400}),
        ("fps inf", gen.http_request("POST", "/whip/fz?fps=1e400", [AUTH, SDP], offer()), {400}),
        ("fps -1", gen.http_request("POST", "/whip/fz?fps=-1", [AUTH, SDP], offer()), {400}),
        ("fps 5e-324", gen.http_request("POST", "/whip/fz?fps=5e-324", [AUTH, SDP], offer()), {400}),
        ("fps abc", gen.http_request("POST", "/whip/fz?fps=abc", [AUTH, SDP], offer()), {400}),
        ("fps 1000", gen.http_request("POST", "/whip/fz?fps=1000", [AUTH, SDP], offer()), {400}),
        ("HTTP/9.9", b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", {400, 505}),
        ("HTTP/0.9", b"GET /healthz\r\n\r\n", {200, 400, None}),  # aiohttp answers it (with a 1.1 head)
        ("h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400, None}),
        ("TLS hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64), {400, None}),
        ("binary", bytes(range(256)) * 4, {400, None}),
        ("LF only", b"GET /healthz HTTP/1.1\nHost: x\nConnection: close\n\n", {200, 400}),
        ("header without colon", b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n", {400}),
        ("NUL in header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", {400}),
        ("folded header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", {400}),
        ("space before colon", b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n", {400}),
        ("16 KB header", gen.http_request("GET", "/healthz", [("X-Big", "a" * 16_384)]), {400, 431}),
        ("1000 headers", gen.http_request("GET", "/healthz", [(f"X-{i}", "a") for i in range(1000)]), {400, 431}),
        ("8 KB request line", gen.http_request("GET", "/healthz?" + "a" * 9000), {400, 414}),
        ("bad Host", b"GET /healthz HTTP/1.1\r\nHost: \xff\xfe\r\nConnection: close\r\n\r\n", {200, 400}),
        (
            "Expect 100",
            gen.http_request("POST", "/whip/fz-e", [AUTH, SDP, ("Expect", "100-continue")], b"garbage"),
            {400},
        ),
        (
            "Expect bogus",
            gen.http_request("POST", "/whip/fz-e", [AUTH, SDP, ("Expect", "bogus")], b"garbage"),
            {400, 417},
        ),
    ]
    for label, raw, allowed in cases:
        check("paths_methods_headers", label, exchange(fuzz_server, raw), allowed, failures)
    assert not failures, "\n".join(failures)
    assert healthy(fuzz_server)


def test_a_real_offer_then_mutated_offers(fuzz_server: FuzzServer) -> None:
    """The offer template is accepted (201), so the mutations around it reach the WebRTC code."""
    failures: list[str] = []
    check("offers", "valid", request(fuzz_server, "POST", "/whip/fz-real", [AUTH, SDP], offer()), {201}, failures)
    check("offers", "again", request(fuzz_server, "POST", "/whip/fz-real", [AUTH, SDP], offer()), {409}, failures)
    check("offers", "GET", request(fuzz_server, "GET", "/whip/fz-real", [AUTH]), {200}, failures)
    check("offers", "DELETE", request(fuzz_server, "DELETE", "/whip/fz-real", [AUTH]), {200}, failures)
    check("offers", "DELETE again", request(fuzz_server, "DELETE", "/whip/fz-real", [AUTH]), {404}, failures)
    rng = random.Random(SEED + 1)
    template = offer().decode()
    for i in range(MUTATED_OFFERS):
        body = gen.mutate_text(template, rng).encode("utf-8", "surrogatepass")
        got = request(fuzz_server, "POST", f"/whip/fz-m{i}", [AUTH, SDP], body)
        check("mutated_sdp", f"mutated {i}", got, {201, 400}, failures)
        if got[0] == 201:
            request(fuzz_server, "DELETE", f"/whip/fz-m{i}", [AUTH])
    assert not failures, "\n".join(failures)


def test_slowloris_and_too_many_connections(fuzz_server: FuzzServer) -> None:
    """Heads that never finish are closed after the timeout; connections over the cap are closed at once; the port
    serves again when they go."""
    addr = ("127.0.0.1", fuzz_server.http_port)
    slow = [socket.create_connection(addr, timeout=10) for _ in range(8)]
    head = b"POST /whip/fz-slow HTTP/1.1\r\nHost: x\r\n"
    t0 = time.monotonic()
    closed = set()
    for i in range(len(head)):  # one byte per socket every 0.1 s, until the server gives up on them
        for j, s in enumerate(slow):
            if j in closed:
                continue
            try:
                s.sendall(head[i : i + 1])
                s.setblocking(False)
                if s.recv(1) == b"":
                    closed.add(j)
            except BlockingIOError:
                pass
            except OSError:
                closed.add(j)
            finally:
                s.setblocking(True)
        if len(closed) == len(slow) or time.monotonic() - t0 > HTTP_TIMEOUT_S + 3:
            break
        time.sleep(0.1)
    for s in slow:
        s.close()
    for j in range(len(slow)):
        TALLY.add("whip/slowloris", "closed" if j in closed else "open")
    assert len(closed) == len(slow), (
        f"{len(slow) - len(closed)} slow heads still open after {time.monotonic() - t0:.1f} s"
    )

    held = [socket.create_connection(addr, timeout=5) for _ in range(HTTP_MAX_CONNECTIONS + 10)]
    time.sleep(0.2)
    refused = 0
    for s in held:
        s.setblocking(False)
        try:
            closed_at_once = s.recv(1) == b""
        except BlockingIOError:
            closed_at_once = False
        except OSError:
            closed_at_once = True
        refused += closed_at_once
        TALLY.add("whip/connections", "closed at once" if closed_at_once else "held")
    for s in held:
        s.close()
    assert refused >= 10, refused
    time.sleep(0.3)
    assert healthy(fuzz_server)


@pytest.mark.parametrize("path", ["/healthz"])
def test_healthz_after_abuse(fuzz_server: FuzzServer, path: str) -> None:
    status, body = request(fuzz_server, "GET", path)
    assert (status, body.endswith(b"ok\n")) == (200, True)


def test_server_intact_after_this_module(fuzz_server: FuzzServer) -> None:
    check_invariants(fuzz_server)


def test_a_token_in_the_query_string_stays_out_of_the_log(fuzz_server: FuzzServer) -> None:
    """Runs last: once the token is in the log, every later check of the log would fail on it. (Read to the close:
    aiohttp writes the access log line after the answer, and not at all if the client has gone.)"""
    raw = gen.http_request("POST", f"/whip/fz?token={TOKEN}", [SDP], offer())
    status, _ = exchange(fuzz_server, raw, timeout=5, to_close=True)
    TALLY.add("whip/auth_and_type", status)
    assert status == 401
    assert not leaks(fuzz_server.log_text())


def test_malformed_http_is_not_logged_as_an_error(fuzz_server: FuzzServer) -> None:
    assert request(fuzz_server, "GET", "/healthz", [("Content-Length", "abc")])[0] == 400
    assert "ERROR aiohttp.server" not in fuzz_server.log_text()
