"""The web console (issue 13) on `vcflash up`'s HTTP port: its security without a browser (sessions, CSRF, CSP,
input checks, redacted camera URLs), then the whole console driven in Debian's headless Chromium through Playwright:
sign in, add a recorded file stream and a camera that is down, see thumbnails, ask and see the answer stream in with
evidence, click the evidence and check the recording plays that moment, search and click a moment to the same end,
stop a live camera's server and see its state while the other pages work on, remove the cameras, sign out. The browser
test writes a screenshot of each page to $VCFLASH_SCREENSHOTS (default: a temp dir); docs/console/ holds a set."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hico import VideoChatFlash
from hico.checkpoint import make_tiny_checkpoint
from tests.ingest.test_rtsp import RtspServer
from tests.ingest.test_rtsp import missing as gstreamer_missing
from tests.test_app import TOKEN, Served, free_port, serving_stream, wait_done, wait_for
from vcflash.console.server import ASSETS
from vcflash.media import write_test_video

CHROMIUM = "/usr/bin/chromium"
CLIPS = 3  # the 12 s video at 1 fps


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> VideoChatFlash:
    return VideoChatFlash.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_video(tmp_path_factory.mktemp("videos") / "12s.mp4", seconds=12, fps=25, size=(320, 180))


@pytest.fixture(scope="module")
def served(
    model: VideoChatFlash, video: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Served, str]]:
    """An App with recordings, holding stream `stored` (3 clips); yields it and its HTTP base URL."""
    with serving_stream(model, video, tmp_path_factory.mktemp("data"), "stored", record_segment_s=2.0) as served:
        yield served


# ---------------------------------------------------------------- the API, without a browser


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


class Browser:
    """A cookie-keeping HTTP client: what a browser sends, without running the page."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), NoRedirect)
        self.csrf = ""

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        headers = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with self.opener.open(request, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def sign_in(self, token: str = TOKEN) -> tuple[int, dict[str, str], bytes]:
        form = urllib.parse.urlencode({"token": token}).encode()
        answer = self.call(
            "POST", "/console/signin", raw=form, headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        if answer[0] == 303:
            self.csrf = json.loads(self.call("GET", "/v1/console/session")[2])["csrf"]
        return answer

    def write(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], bytes]:
        return self.call(method, path, body, {"X-CSRF-Token": self.csrf})


def test_every_api_needs_a_session_or_the_token(served: tuple[Served, str]) -> None:
    _, base = served
    anonymous = Browser(base)
    for method, path in [
        ("GET", "/v1/console/session"),
        ("GET", "/v1/console/streams"),
        ("GET", "/v1/console/streams/stored/clips"),
        ("POST", "/v1/console/streams"),
        ("DELETE", "/v1/console/streams/stored"),
        ("POST", "/v1/console/ask"),
        ("POST", "/v1/console/search"),
        ("POST", "/console/signout"),
        ("GET", "/v1/streams/stored/thumbnails/0.jpg"),
    ]:
        status, headers, body = anonymous.call(method, path, body={} if method != "GET" else None)
        assert status == 401, (method, path, status, body)
    status, headers, _ = anonymous.call("GET", "/console/")
    assert (status, headers["Location"]) == (303, "/console/signin")

    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert anonymous.call("GET", "/v1/console/streams", headers=bearer)[0] == 200
    assert (
        anonymous.call("GET", "/v1/console/streams", headers={"Authorization": "Bearer wrong-token-0123456789"})[0]
        == 401
    )
    # a bearer header is never sent by a browser on its own: no CSRF token needed with it
    status, _, body = anonymous.call("POST", "/v1/console/streams", {"name": "x"}, headers=bearer)
    assert status == 400 and b"url" in body


def test_sign_in_sets_a_strict_httponly_session_cookie_never_the_token(served: tuple[Served, str]) -> None:
    _, base = served
    b = Browser(base)
    status, _, body = b.sign_in("not-the-token-0123456789")
    assert status == 401 and b"not this server" in body and not list(b.jar)
    status, headers, _ = b.sign_in()
    assert (status, headers["Location"]) == (303, "/console/")
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert TOKEN not in cookie
    (session,) = list(b.jar)
    assert len(session.value) >= 40 and session.value != TOKEN
    status, headers, page = b.call("GET", "/console/")
    assert status == 200 and b'<script type="module" src="/console/static/main.js">' in page
    # a session reads thumbnails (what an <img> asks), but never writes to the WHIP endpoints
    assert b.call("GET", "/v1/streams/stored/thumbnails/0.jpg")[0] == 200
    sdp = {"Content-Type": "application/sdp", "X-CSRF-Token": b.csrf}
    assert b.call("POST", "/whip/w", raw=b"v=0\r\n", headers=sdp)[0] == 401

    assert b.call("POST", "/console/signout")[0] == 403  # no CSRF header
    assert b.write("POST", "/console/signout")[0] == 200
    assert b.call("GET", "/v1/console/streams")[0] == 401  # the session is gone, even with the old cookie
    b.jar.set_cookie(session)
    assert b.call("GET", "/v1/console/streams")[0] == 401


def test_state_changing_calls_need_the_session_csrf_header(served: tuple[Served, str], video: Path) -> None:
    _, base = served
    b = Browser(base)
    b.sign_in()
    body = {"name": "csrf", "url": str(video), "realtime": False}
    for headers in ({}, {"X-CSRF-Token": ""}, {"X-CSRF-Token": "x" * 43}):
        assert b.call("POST", "/v1/console/streams", body, headers)[0] == 403
        assert b.call("DELETE", "/v1/console/streams/stored", headers=headers)[0] == 403
        assert b.call("POST", "/v1/console/ask", {"streams": ["stored"], "question": "q"}, headers)[0] == 403
        assert b.call("POST", "/v1/console/search", {"streams": ["stored"], "question": "q"}, headers)[0] == 403
    other = Browser(base)
    other.sign_in()
    assert b.call("POST", "/v1/console/streams", body, {"X-CSRF-Token": other.csrf})[0] == 403  # another session's
    status, _, answer = b.write("POST", "/v1/console/streams", body)
    assert status == 201 and json.loads(answer)["name"] == "csrf"
    assert b.write("DELETE", "/v1/console/streams/csrf")[0] == 200


def test_pages_carry_a_strict_csp_and_never_the_token(served: tuple[Served, str]) -> None:
    _, base = served
    b = Browser(base)
    status, headers, signin = b.call("GET", "/console/signin")
    assert status == 200
    b.sign_in()
    pages = {"/console/signin": signin, "/console/": b.call("GET", "/console/")[2]}
    for path, page in pages.items():
        assert not re.search(rb"<script(?![^>]*\bsrc=)", page), path  # no inline script
        assert b"style=" not in page and b"<style" not in page and not re.search(rb"\son[a-z]+=", page), path
    for path in ["/console/signin", "/console/", "/v1/console/streams", "/console/static/main.js", "/console/nope"]:
        headers = b.call("GET", path)[1]
        csp = headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp, path
        assert "frame-ancestors 'none'" in csp and headers["X-Content-Type-Options"] == "nosniff", path
    for name, kind in ASSETS.items():
        status, headers, text = b.call("GET", f"/console/static/{name}")
        assert status == 200 and headers["Content-Type"].startswith(kind), name
        assert not re.search(rb"https?://", text), name  # everything the page needs is served from here
        pages[name] = text
    assert b.call("GET", "/console/static/..%2Fserver.py")[0] == 404
    assert b.call("GET", "/console/static/index.html")[0] == 404  # only the listed assets
    for name, text in pages.items():
        assert TOKEN.encode() not in text, name


def test_bad_input_is_a_clear_4xx(served: tuple[Served, str], video: Path) -> None:
    _, base = served
    b = Browser(base)
    b.sign_in()
    add = "/v1/console/streams"
    for body, status, words in [
        ({"name": "a b", "url": str(video)}, 400, b"stream name"),
        ({"name": "x" * 65, "url": str(video)}, 400, b"name"),
        ({"name": "..", "url": str(video)}, 400, b"dots"),
        ({"name": "ok", "url": "file:///etc/passwd"}, 400, b"scheme"),
        ({"name": "ok", "url": "gopher://127.0.0.1/x"}, 400, b"scheme"),
        ({"name": "ok", "url": "rtsp://h/" + "a" * 5000}, 400, b"longer than"),
        ({"name": "ok", "url": str(video), "fps": "fast"}, 400, b"fps"),
        ({"name": "ok", "url": str(video), "fps": 1000}, 400, b"fps"),
        ({"name": "ok", "url": str(video), "record": "yes"}, 400, b"record"),
        ({"name": "ok", "url": str(video), "owner": "me"}, 400, b"unknown fields: 'owner'"),
        ({"name": "stored", "url": str(video)}, 409, b"already exists"),
    ]:
        got, _, answer = b.write("POST", add, body)
        assert got == status and words in answer, (body, got, answer)
        assert b"Traceback" not in answer
    bad = {"Content-Type": "text/plain", "X-CSRF-Token": b.csrf}
    assert b.call("POST", add, raw=b"{}", headers=bad)[0] == 415
    assert b.call("POST", add, raw=b"{", headers={"Content-Type": "application/json", "X-CSRF-Token": b.csrf})[0] == 400
    assert b.write("POST", add, {"name": "ok", "url": "x" * 70_000})[0] == 413
    assert b.write("POST", add, ["a"])[0] == 400
    assert b.write("DELETE", "/v1/console/streams/nope")[0] == 404
    assert b.write("DELETE", "/v1/console/streams/a%20b")[0] == 400

    clips = "/v1/console/streams/stored/clips"
    assert b.call("GET", "/v1/console/streams/nope/clips")[0] == 404
    for query in ("start=5&end=1", "start=nan", "end=inf", "start=x", "limit=0", "limit=1001", "limit=2.5"):
        status, _, answer = b.call("GET", f"{clips}?{query}")
        assert status == 400 and b"Traceback" not in answer, query

    # ask and search take the same question, with the same checks
    questions = [
        ({"streams": ["nope"], "question": "q"}, 404, b"unknown stream"),
        ({"streams": ["stored"], "question": ""}, 400, b"question"),
        ({"streams": ["stored"], "question": "   "}, 400, b"question is empty"),
        ({"streams": ["stored"], "question": "q" * 5000}, 400, b"longer than"),
        ({"streams": "stored", "question": "q"}, 400, b"list of stream names"),
        ({"streams": [], "question": "q"}, 400, b"at least one stream"),
        ({"streams": ["a b"], "question": "q"}, 400, b"stream name"),
        ({"streams": ["stored"], "question": "q", "start": 10, "end": 5}, 400, b"inverted time range"),
        ({"streams": ["stored"], "question": "q", "start": "noon"}, 400, b"start must be a finite number"),
        ({"streams": ["stored"] * 9, "question": "q"}, 400, b"distinct streams"),
        ({"streams": ["stored"], "question": "q", "who": 1}, 400, b"unknown fields: 'who'"),
    ]
    for path in ("/v1/console/ask", "/v1/console/search"):
        for body, status, words in questions:
            got, headers, answer = b.write("POST", path, body)
            assert got == status and words in answer, (path, body, got, answer)
            assert headers["Content-Type"].startswith("application/json") and b"Traceback" not in answer
    for limit in (0, 101, 2.5, "ten", True):
        got, _, answer = b.write("POST", "/v1/console/search", {"streams": ["stored"], "question": "q", "limit": limit})
        assert got == 400 and b"limit must be an integer in [1, 100]" in answer, (limit, got, answer)


def test_camera_passwords_never_reach_the_browser(served: tuple[Served, str]) -> None:
    _, base = served
    b = Browser(base)
    b.sign_in()
    url = f"rtsp://admin:hunter2-secret@127.0.0.1:{free_port()}/live?token=abc123secret"
    status, _, answer = b.write("POST", "/v1/console/streams", {"name": "door", "url": url})
    try:
        assert status == 201
        listed = b.call("GET", "/v1/console/streams")[2]
        (door,) = [s for s in json.loads(listed)["streams"] if s["name"] == "door"]
        assert door["url"].startswith("rtsp://***@127.0.0.1")
        for text in (answer, listed, b.write("POST", "/v1/console/streams", {"name": "door", "url": url})[2]):
            assert b"hunter2" not in text and b"abc123secret" not in text
    finally:
        b.write("DELETE", "/v1/console/streams/door")


def test_ask_streams_text_lines_then_the_result(served: tuple[Served, str]) -> None:
    s, base = served
    b = Browser(base)
    b.sign_in()
    status, headers, body = b.write("POST", "/v1/console/ask", {"streams": ["stored"], "question": "What moves?"})
    assert status == 200 and headers["Content-Type"].startswith("application/x-ndjson")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    lines = [json.loads(line) for line in body.splitlines()]
    assert all("text" in line for line in lines[:-1]) and len(lines) >= 2
    result = lines[-1]["result"]
    assert result["answer"] == "".join(line["text"] for line in lines[:-1]).strip()
    clips = s.client.clips("stored")
    assert [(e["stream_id"], e["seq"], e["wall_start"]) for e in result["evidence"]] == [
        ("stored", c.seq, c.wall_start) for c in clips
    ]
    # a wall-clock range picks the clips it overlaps
    status, _, body = b.write(
        "POST",
        "/v1/console/ask",
        {"streams": ["stored"], "question": "What moves?", "start": clips[1].wall_start, "end": clips[1].wall_end},
    )
    assert [e["seq"] for e in json.loads(body.splitlines()[-1])["result"]["evidence"]] == [1]


def test_search_answers_the_moments_of_reasoner_search(served: tuple[Served, str]) -> None:
    s, base = served
    b = Browser(base)
    b.sign_in()
    question = "Where does the square go?"
    status, headers, body = b.write("POST", "/v1/console/search", {"streams": ["stored"], "question": question})
    assert status == 200 and headers["Content-Type"].startswith("application/json"), body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    found = json.loads(body)
    expected = s.client.search(["stored"], question)  # over gRPC: the same ranking
    assert found["clips_scored"] == expected.clips_scored == CLIPS and found["note"] == ""
    keys = ("stream_id", "first_seq", "last_seq", "wall_start", "wall_end", "media_start", "media_end")
    assert [tuple(m[k] for k in keys) for m in found["moments"]] == [
        tuple(getattr(m, k) for k in keys) for m in expected.moments
    ]
    assert [m["score"] for m in found["moments"]] == pytest.approx([m.score for m in expected.moments])
    # the limit and a wall-clock range pass through: the best clip alone, then only the last clip's moment
    (best,) = json.loads(
        b.write("POST", "/v1/console/search", {"streams": ["stored"], "question": question, "limit": 1})[2]
    )["moments"]
    top = s.client.search(["stored"], question, limit=1).moments[0]
    assert (best["first_seq"], best["last_seq"]) == (top.first_seq, top.last_seq)
    last = s.client.clips("stored")[-1]
    ranged = {"streams": ["stored"], "question": question, "start": last.wall_start, "end": last.wall_end}
    found = json.loads(b.write("POST", "/v1/console/search", ranged)[2])
    assert found["clips_scored"] == 1 and [(m["first_seq"], m["last_seq"]) for m in found["moments"]] == [
        (last.seq, last.seq)
    ]


# ---------------------------------------------------------------- the console in headless Chromium


def _playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    return sync_playwright


@pytest.mark.skipif(_playwright() is None, reason="playwright is not installed (pip install -e '.[test]')")
@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} is missing (apt-get install chromium)")
def test_the_console_in_headless_chromium(served: tuple[Served, str], video: Path, tmp_path: Path) -> None:
    s, base = served
    camera = None  # a live RTSP camera (the GStreamer test server) when this machine has GStreamer
    if not gstreamer_missing:
        camera = RtspServer(free_port(), auth="viewer:hunter2-live")
        camera.start()
    try:
        drive_the_console(s, base, video, tmp_path, camera)
    finally:
        if camera is not None:
            camera.kill()


def drive_the_console(s: Served, base: str, video: Path, tmp_path: Path, camera: RtspServer | None) -> None:
    shots = Path(os.environ.get("VCFLASH_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    urls: list[str] = []
    down = f"rtsp://admin:hunter2-secret@127.0.0.1:{free_port()}/live"

    with _playwright()() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.on("request", lambda r: urls.append(r.url))
        page.on("dialog", lambda d: d.accept())  # "Remove camera ...?"
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.set_default_timeout(30_000)

        # sign in: the console sends us to the form, the form's POST sets the cookie
        page.goto(f"{base}/console/")
        assert page.url == f"{base}/console/signin"
        page.fill("input[name=token]", TOKEN)
        page.screenshot(path=shots / "signin.png")
        page.click("button[type=submit]")
        page.wait_for_url(f"{base}/console/")
        page.wait_for_selector("#add-camera")

        # cameras: a recorded file and a camera that is down; thumbnails appear, the page stays usable
        add_camera(page, "cam", str(video), record=True, realtime=False)
        add_camera(page, "door", down, record=False, realtime=True)
        if camera is not None:
            add_camera(page, "live", camera.url("viewer:hunter2-live@"), record=True, realtime=True)
        page.wait_for_selector(f'.camera[data-name="cam"][data-seq="{CLIPS - 1}"]')  # its last clip's thumbnail
        page.wait_for_function(
            """() => { const i = document.querySelector('.camera[data-name="cam"] img.thumb');
                       return i && i.complete && i.naturalWidth === 320; }"""
        )
        door = page.locator('.camera[data-name="door"]')
        page.wait_for_selector('.camera[data-name="door"][data-state="reconnecting"]')
        assert door.locator(".url").inner_text().startswith("rtsp://***@127.0.0.1")
        if camera is not None:  # a live camera's pictures come in as its clips are stored
            page.wait_for_selector('.camera[data-name="live"][data-state="running"][data-seq]', timeout=60_000)
            page.wait_for_function(
                "() => document.querySelector('.camera[data-name=\"live\"] img.thumb').naturalWidth === 320"
            )
            assert page.locator('.camera[data-name="live"] .url').inner_text().startswith("rtsp://***@127.0.0.1")
        wait_done(s.client, "cam")
        page.wait_for_selector('.camera[data-name="cam"][data-state="finished"]')
        page.screenshot(path=shots / "cameras.png", full_page=True)

        # chat: the answer streams in, the evidence is every clip, as thumbnails
        page.click("nav a[data-page=chat]")
        page.check('#chat-streams input[value="cam"]')
        page.fill("textarea[name=question]", "What moves across the screen?")
        page.click("#ask button[type=submit]")
        page.wait_for_selector(".answer[data-state=done]")
        assert int(page.get_attribute(".answer", "data-pieces") or 0) >= 1  # text arrived in pieces, as generated
        evidence = page.locator(".evidence-clip")
        assert evidence.count() == CLIPS
        page.wait_for_function(
            "() => [...document.querySelectorAll('.evidence-clip img')].every(i => i.complete && i.naturalWidth > 0)"
        )
        page.screenshot(path=shots / "chat.png", full_page=True)

        # evidence -> the timeline at that moment, the recording playing it
        clips = s.client.clips("cam")
        evidence.nth(1).click()
        check_playing(page, clips[1])
        assert page.locator(".strip .clip").count() == CLIPS
        page.screenshot(path=shots / "timeline.png", full_page=True)

        # search: the best moments (as Reasoner.Search ranks them) with their thumbnails; the best one -> the
        # timeline there, the recording playing it
        question = "Where does the square go?"
        page.click("nav a[data-page=search]")
        page.check('#search-streams input[value="cam"]')
        page.fill("#search input[name=question]", question)
        page.fill("#search input[name=limit]", "2")
        page.click("#search button[type=submit]")
        page.wait_for_selector("#search-status[data-state=done]")
        expected = s.client.search(["cam"], question, limit=2).moments
        shown = page.locator(".moment")
        assert shown.count() == len(expected) >= 1
        for i, m in enumerate(expected):
            item = shown.nth(i)
            assert (item.get_attribute("data-stream"), float(item.get_attribute("data-start") or "nan")) == (
                "cam",
                m.wall_start,
            )
            assert item.locator("img").count() == m.last_seq - m.first_seq + 1  # a thumbnail per clip
        page.wait_for_function(
            "() => [...document.querySelectorAll('.moment img')].every(i => i.complete && i.naturalWidth === 320)"
        )
        page.screenshot(path=shots / "search.png", full_page=True)
        shown.first.locator("a").click()
        check_playing(page, clips[expected[0].first_seq])

        if camera is not None:  # the live camera away for a few seconds: its timeline shows the gap
            s.client.remove_stream("live")
            away = time.time()
            time.sleep(3)
            s.client.add_stream("live", camera.url("viewer:hunter2-live@"), fps=1, record=True)
            wait_for(lambda: any(c.wall_start > away for c in s.client.clips("live")), "a clip after the gap", 60)
            page.goto(f"{base}/console/#/timeline/live")
            gap = page.wait_for_selector(".strip .gap")
            assert re.fullmatch(r"gap \d+(\.\d)? s", gap.inner_text()), gap.inner_text()
            page.screenshot(path=shots / "timeline-gap.png")

            # the live camera's server goes away: its card says so (redacted), and the other pages work on
            camera.kill()
            page.click("nav a[data-page=cameras]")
            page.wait_for_selector('.camera[data-name="live"][data-state="reconnecting"]', timeout=60_000)
            assert page.locator('.camera[data-name="live"] .error').inner_text()
            assert page.locator('.camera[data-name="cam"][data-state="finished"]').count() == 1
            page.evaluate("location.hash = '#/timeline/cam'")  # in the page: no reload, so the search is kept
            page.wait_for_selector(f'.strip .clip[data-seq="{CLIPS - 1}"]')
            page.click("nav a[data-page=search]")
            page.wait_for_selector("#search-status[data-state=done]")  # the last search's moments, kept

        # remove both cameras; sign out
        page.click("nav a[data-page=cameras]")
        for name in ("cam", "door", "live") if camera is not None else ("cam", "door"):
            page.locator(f'.camera[data-name="{name}"] button.remove').click()
            page.locator(f'.camera[data-name="{name}"]').wait_for(state="detached")
        assert "cam" not in [x.stream_id for x in s.client.list_streams()]
        content = page.content()
        page.click("#signout")
        page.wait_for_url(f"{base}/console/signin")
        assert page.evaluate("async () => (await fetch('/v1/console/streams')).status") == 401
        browser.close()

    assert not errors, errors
    assert urls and not [u for u in urls if TOKEN in u or urllib.parse.quote(TOKEN) in u]
    assert TOKEN not in content and "hunter2" not in content


def check_playing(page: Any, clip: Any) -> None:
    """The timeline shows `clip` selected and its player plays the recording at the clip's moment (within its 2 s
    pad), frames decoded at the video's size."""
    page.wait_for_selector("#player[data-state=playing]")
    page.wait_for_function("() => document.querySelector('#player').getVideoPlaybackQuality().totalVideoFrames >= 5")
    played = page.evaluate(
        """() => { const v = document.querySelector('#player');
                   return {t: v.currentTime, start: Number(v.dataset.recordingStart),
                           frames: v.getVideoPlaybackQuality().totalVideoFrames, w: v.videoWidth}; }"""
    )
    wall = played["start"] + played["t"]
    assert clip.wall_start - 0.1 <= wall <= clip.wall_end + 2.0, (played, clip)  # that clip, playing (+ its pad)
    assert played["w"] == 320 and played["frames"] >= 5
    assert page.locator(f'.strip .clip.selected[data-seq="{clip.seq}"]').count() == 1


def add_camera(page: Any, name: str, url: str, *, record: bool, realtime: bool) -> None:
    form = page.locator("#add-camera")
    form.locator("input[name=name]").fill(name)
    form.locator("input[name=url]").fill(url)
    form.locator("input[name=record]").set_checked(record)
    form.locator("input[name=realtime]").set_checked(realtime)
    form.locator("button[type=submit]").click()
    page.wait_for_selector(f'.camera[data-name="{name}"]')
    assert form.locator(".status").inner_text() == f"Added {name}."
    assert form.locator("input[name=url]").input_value() == ""
