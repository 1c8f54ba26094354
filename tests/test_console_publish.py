"""The web console's two guards and its WHIP publish (issue 13): publishing the browser's own camera through
``/v1/console/whip/{name}`` (the session and CSRF header in place of the bearer token, the WHIP endpoint's own
checks), first without a browser (an aiortc sender), then from Debian's headless Chromium with a fake camera; and
failed sign-ins limited per client address."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiortc import RTCSessionDescription

from hico import VideoChatFlash
from hico.checkpoint import make_tiny_checkpoint
from tests.ingest.test_webrtc import sender
from tests.test_app import TOKEN, LoopThread, Served, free_port, start_app, wait_for
from tests.test_console import CHROMIUM, Browser, _playwright
from vcflash.console.sessions import MAX_SIGNIN_FAILURES, SignInLimit

SDP = "application/sdp"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, str]]:
    """`vcflash up` on the tiny model, with recordings; yields it and its HTTP base URL."""
    model = VideoChatFlash.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))
    port = free_port()
    runner = LoopThread()
    s = start_app(runner, model, http_port=port, data_dir=tmp_path_factory.mktemp("data"), record_segment_s=2.0)
    try:
        yield s, f"http://127.0.0.1:{port}"
    finally:
        s.stop()
        runner.close()


def an_offer() -> str:
    """A real sender's SDP offer (video, sendonly, candidates on 127.0.0.1); the sender is closed."""

    async def offer() -> str:
        async with sender() as peer:
            return await peer.offer()

    return asyncio.run(offer())


# ---------------------------------------------------------------- publish, without a browser


def test_publish_needs_a_session_and_its_csrf_header(served: tuple[Served, str]) -> None:
    _, base = served
    anonymous = Browser(base)
    path = "/v1/console/whip/web"
    for method in ("POST", "DELETE"):
        status, _, body = anonymous.call(method, path, raw=b"v=0\r\n", headers={"Content-Type": SDP})
        assert status == 401 and b"sign in" in body, (method, status, body)
    b = Browser(base)
    b.sign_in()
    for headers in ({}, {"X-CSRF-Token": ""}, {"X-CSRF-Token": "x" * 43}):
        assert b.call("POST", path, raw=b"v=0\r\n", headers={"Content-Type": SDP} | headers)[0] == 403
        assert b.call("DELETE", path, headers=headers)[0] == 403
    # the cookie, even with its CSRF header, never authorizes the bearer-only WHIP routes
    csrf = {"Content-Type": SDP, "X-CSRF-Token": b.csrf}
    assert b.call("POST", "/whip/web", raw=b"v=0\r\n", headers=csrf)[0] == 401
    assert b.call("DELETE", "/whip/web", headers=csrf)[0] == 401


def test_publish_checks_names_and_offers_as_whip_does(served: tuple[Served, str]) -> None:
    s, base = served
    b = Browser(base)
    b.sign_in()

    def post(name: str, offer: str | bytes, query: str = "", kind: str = SDP) -> tuple[int, dict[str, Any]]:
        raw = offer.encode() if isinstance(offer, str) else offer
        path = f"/v1/console/whip/{urllib.parse.quote(name)}{query}"
        status, headers, body = b.call("POST", path, raw=raw, headers={"Content-Type": kind, "X-CSRF-Token": b.csrf})
        assert headers["Content-Type"].startswith("application/json"), (status, body)  # the console's errors
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        return status, json.loads(body)

    offer = an_offer()
    for name, sdp, query, kind, status, words in [
        ("a b", offer, "", SDP, 400, "stream name"),
        ("..", offer, "", SDP, 400, "dots"),
        ("x" * 65, offer, "", SDP, 400, "name"),
        ("web", "hello, not sdp", "", SDP, 400, "not an SDP offer"),
        ("web", "v=0\r\nm=video notaport RTP/AVP x\r\n", "", SDP, 400, "malformed SDP"),
        ("web", offer.replace(" 127.0.0.1 ", " 192.0.2.1 "), "", SDP, 400, "no usable ICE candidates"),
        ("web", "", "", SDP, 400, "empty body"),
        ("web", offer, "", "application/json", 415, "application/sdp"),
        ("web", offer, "?fps=0", SDP, 400, "fps"),
        ("web", offer, "?record=yes", SDP, 400, "record"),
        ("web", "v=0\r\n" + "a=x\r\n" * 20_000, "", SDP, 413, "larger than"),
    ]:
        got, body = post(name, sdp, query, kind)
        assert got == status and words in body["error"], (name, query, got, body)
    assert b.write("DELETE", "/v1/console/whip/nobody")[0] == 404
    assert b.write("DELETE", "/v1/console/whip/a%20b")[0] == 400
    assert "web" not in [x.stream_id for x in s.client.list_streams()]


def test_an_aiortc_sender_publishes_through_the_console_and_stops(served: tuple[Served, str]) -> None:
    s, base = served
    b = Browser(base)
    b.sign_in()

    async def publish() -> None:
        async with sender() as peer:
            offer = await peer.offer()
            headers = {"Content-Type": SDP, "X-CSRF-Token": b.csrf}
            status, answer_headers, answer = await asyncio.to_thread(
                b.call, "POST", "/v1/console/whip/api?record=1", raw=offer.encode(), headers=headers
            )
            assert status == 201, answer
            assert answer_headers["Content-Type"] == SDP and answer_headers["Location"] == "/v1/console/whip/api"
            await peer.pc.setRemoteDescription(RTCSessionDescription(sdp=answer.decode(), type="answer"))
            stored = await asyncio.to_thread(wait_for, lambda: s.client.stream("api").clips_stored, "a clip", 30)
            assert stored >= 1 and s.client.stream("api").state == "running"
            status, _, body = await asyncio.to_thread(
                b.call, "POST", "/v1/console/whip/api", raw=offer.encode(), headers=headers
            )
            assert status == 409 and "already exists" in json.loads(body)["error"]
            status, _, body = await asyncio.to_thread(b.write, "DELETE", "/v1/console/whip/api")
            assert status == 200 and json.loads(body)["stream"]["state"] == "stopped"

    asyncio.run(publish())
    assert "api" not in [x.stream_id for x in s.client.list_streams()]
    assert s.client.clips("api")  # its memory stays
    assert b.write("DELETE", "/v1/console/whip/api")[0] == 404


# ---------------------------------------------------------------- publish from headless Chromium


@pytest.mark.skipif(_playwright() is None, reason="playwright is not installed (pip install -e '.[test]')")
@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} is missing (apt-get install chromium)")
def test_chromium_publishes_its_fake_camera_from_the_cameras_page(served: tuple[Served, str], tmp_path: Path) -> None:
    s, base = served
    shots = Path(os.environ.get("VCFLASH_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--use-fake-device-for-media-stream",  # a moving test picture as the camera
        "--use-fake-ui-for-media-stream",
        "--allow-loopback-in-peer-connection",  # the server offers candidates on 127.0.0.1 only
    ]
    errors: list[str] = []
    with _playwright()() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, permissions=["camera"])
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
        page.set_default_timeout(30_000)
        page.goto(f"{base}/console/signin")
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_url(f"{base}/console/")

        form = page.locator("#publish")
        form.locator("input[name=name]").fill("webcam")
        form.locator("input[name=record]").check()
        form.locator("button.start").click()
        page.wait_for_selector("#publish[data-state=publishing]")
        page.wait_for_function("() => document.querySelector('#publish .status').textContent.includes('connected')")
        card = '.camera[data-name="webcam"]'
        page.wait_for_selector(f'{card}[data-state="running"][data-seq]', timeout=60_000)  # a clip, its thumbnail
        page.wait_for_function(
            f"""() => {{ const i = document.querySelector('{card} img.thumb');
                        return i && i.complete && i.naturalWidth > 0; }}"""
        )
        page.wait_for_function("() => document.querySelector('#publish video.preview').videoWidth > 0")
        status = s.client.stream("webcam")
        assert status.source == "whip://webcam" and status.frames_in > 0 and status.clips_stored >= 1
        wait_for(lambda: s.client.stream("webcam").recording_bytes > 0, "its recording", 30)  # record was checked
        page.wait_for_function(f"() => !document.querySelector('{card} .stats').textContent.includes('0.0 MB')")
        page.screenshot(path=shots / "publish.png", full_page=True)

        # the publication goes on while another page is shown; back on the cameras page, the control shows it
        page.click("nav a[data-page=chat]")
        page.wait_for_selector("#ask")
        page.click("nav a[data-page=cameras]")
        page.wait_for_selector("#publish[data-state=publishing]")
        assert form.locator("input[name=name]").input_value() == "webcam"
        assert s.client.stream("webcam").state == "running"

        form.locator("button.stop").click()
        page.wait_for_selector("#publish[data-state=idle]")
        page.locator(card).wait_for(state="detached")
        assert form.locator(".status").inner_text() == "Stopped webcam."
        browser.close()
    assert not errors, errors
    assert "webcam" not in [x.stream_id for x in s.client.list_streams()]
    assert s.client.clips("webcam")  # the stream ended; what it sent stays in memory


# ---------------------------------------------------------------- sign-in rate limit


def test_sign_in_limit_counts_failures_per_address_in_a_window() -> None:
    now = [1000.0]
    limit = SignInLimit(max_failures=3, window_s=60, max_clients=100, clock=lambda: now[0])
    for _ in range(3):
        assert limit.retry_after("10.0.0.1") == 0
        limit.failed("10.0.0.1")
        now[0] += 1
    assert limit.retry_after("10.0.0.1") == 57  # until the first failure (at 1000) is 60 s old
    assert limit.retry_after("10.0.0.2") == 0  # another address
    now[0] += 56.5
    assert limit.retry_after("10.0.0.1") == 1
    now[0] += 0.5
    assert limit.retry_after("10.0.0.1") == 0
    limit.failed("10.0.0.1")  # the oldest failure falls out of the window: blocked until the second is 60 s old
    assert limit.retry_after("10.0.0.1") == 1
    # IPv6 hosts count per /64; an IPv4-mapped address is its IPv4 address
    for i in range(3):
        limit.failed(f"2001:db8::{i + 1}")
    assert limit.retry_after("2001:db8::ffff") > 0 and limit.retry_after("2001:db8:0:1::1") == 0
    for _ in range(3):
        limit.failed("::ffff:10.0.0.9")
    assert limit.retry_after("10.0.0.9") > 0
    with pytest.raises(ValueError, match="max_failures"):
        SignInLimit(max_failures=0)


def test_sign_in_limit_table_is_capped() -> None:
    now = [0.0]
    limit = SignInLimit(max_failures=2, window_s=10, max_clients=3, clock=lambda: now[0])
    for i in range(3):
        limit.failed(f"10.0.0.{i}")
        limit.failed(f"10.0.0.{i}")
    assert len(limit) == 3 and limit.retry_after("10.0.0.0") > 0
    limit.failed("10.0.0.3")  # full: the least recently failing address goes
    assert len(limit) == 3 and limit.retry_after("10.0.0.0") == 0 and limit.retry_after("10.0.0.1") > 0
    now[0] = 100.0  # every failure expired: they all go before anyone else must
    for i in range(1000):
        limit.failed(f"10.1.{i // 256}.{i % 256}")
    assert len(limit) == 3


def sign_in_from(base: str, source: str, token: str) -> tuple[int, dict[str, str], bytes]:
    """POST the sign-in form from a given loopback address."""
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10, source_address=(source, 0))
    try:
        body = urllib.parse.urlencode({"token": token})
        connection.request("POST", "/console/signin", body, {"Content-Type": "application/x-www-form-urlencoded"})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_failed_sign_ins_are_limited_per_client_address(served: tuple[Served, str]) -> None:
    _, base = served
    guesser, other = "127.0.0.3", "127.0.0.4"
    for i in range(MAX_SIGNIN_FAILURES):
        assert sign_in_from(base, guesser, f"guess-{i:04d}-0123456789")[0] == 401
    status, headers, page = sign_in_from(base, guesser, "guess-more-0123456789")
    assert status == 429 and 1 <= int(headers["Retry-After"]) <= 60 and b"Too many failed sign-ins" in page
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert sign_in_from(base, guesser, TOKEN)[0] == 429  # not even the right token is checked now
    assert sign_in_from(base, other, TOKEN)[0] == 303  # another address signs in
    assert sign_in_from(base, guesser, TOKEN)[0] == 429  # and its success resets no one else's count
    assert sign_in_from(base, other, "wrong-0123456789")[0] == 401
