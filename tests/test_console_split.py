"""The web console in the split deployment, as real processes (tests/test_split.py's `Deployment`): `vcflash ingest`
serves it on its HTTP port, the cameras and timeline from ingest and the memory, the chat asking `vcflash reasoner`
over gRPC (VCFLASH_REASONER_ADDRESS). Signed in over HTTP: list cameras, ask and get a streamed answer with evidence,
search and get the reasoner's ranked moments; then the reasoner stopped: chat and search are 503 with a JSON error
saying so, the cameras and timeline still 200, the health and ingest's log say so (and the search page, in Chromium),
and chat works again once the reasoner is back. Optionally the same console in Debian's headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.test_console import CHROMIUM, Browser, _playwright
from tests.test_split import TOKEN, Deployment, free_port, serving, wait_for
from vcflash.media import write_test_video

CLIPS = 4  # the 8 s video at 2 fps: 16 frames, 4 clips


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, str]]:
    """redis, encoder, reasoner and ingest (HTTP on, its console asking the reasoner), with stream `cam` stored."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (.ci/run installs it)")
    tmp = tmp_path_factory.mktemp("console-split")
    d = Deployment(tmp)
    http = free_port()
    d.env |= {"VCFLASH_HTTP_PORT": str(http), "VCFLASH_REASONER_ADDRESS": f"127.0.0.1:{d.ports['reasoner']}"}
    try:
        d.start("redis")
        for name in ("encoder", "reasoner", "ingest"):
            d.start(name)
        base = f"http://127.0.0.1:{http}"
        b = signed_in(base)
        video = write_test_video(tmp / "v.mp4", seconds=8, fps=10, size=(96, 64))
        status, _, body = b.write("POST", "/v1/console/streams", {"name": "cam", "url": str(video), "fps": 2})
        assert status == 201, body
        wait_for(lambda: stored(b) == CLIPS, 60, "the stream's clips to be stored")
        yield d, base
    finally:
        d.stop()


def signed_in(base: str) -> Browser:
    b = Browser(base)
    assert b.sign_in(TOKEN)[0] == 303
    return b


def stored(b: Browser) -> int:
    status, _, body = b.call("GET", "/v1/console/streams")
    assert status == 200, body
    (cam,) = [s for s in json.loads(body)["streams"] if s["name"] == "cam"]
    return cam["clips_stored"] if cam["state"] == "finished" else -1


def reasoner_state(b: Browser) -> dict[str, Any]:
    status, _, body = b.call("GET", "/v1/console/health")
    assert status == 200, body
    return json.loads(body)["reasoner"]


def cameras_and_timeline_work(b: Browser) -> list[dict[str, Any]]:
    status, _, body = b.call("GET", "/v1/console/streams")
    assert status == 200 and "cam" in [s["name"] for s in json.loads(body)["streams"]], body
    assert "cam" in json.loads(body)["stored"]
    status, _, body = b.call("GET", "/v1/console/streams/cam/clips")
    assert status == 200, body
    clips = json.loads(body)["clips"]
    assert [c["seq"] for c in clips] == list(range(CLIPS))
    status, headers, jpeg = b.call("GET", "/v1/streams/cam/thumbnails/0.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and jpeg[:2] == b"\xff\xd8"
    return clips


def ask(b: Browser, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    return b.write("POST", "/v1/console/ask", body)


def search(b: Browser, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    return b.write("POST", "/v1/console/search", body)


chromium = pytest.mark.skipif(
    _playwright() is None or not os.access(CHROMIUM, os.X_OK),
    reason=f"playwright (pip install -e '.[test]') or {CHROMIUM} (apt-get install chromium) is missing",
)


@contextmanager
def console_page(base: str, tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    """Chromium signed in to the console at `base`, and the screenshot folder; no page errors allowed."""
    shots = Path(os.environ.get("VCFLASH_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with _playwright()() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.set_default_timeout(30_000)
        page.goto(f"{base}/console/")
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_url(f"{base}/console/")
        yield page, shots
        browser.close()
    assert not errors, errors


def test_the_split_console_lists_cameras_and_asks_the_reasoner(split: tuple[Deployment, str]) -> None:
    _, base = split
    b = signed_in(base)
    assert Browser(base).call("GET", "/v1/console/health")[0] == 401  # the health, too, needs a session
    clips = cameras_and_timeline_work(b)
    wait_for(lambda: reasoner_state(b)["available"] is True, 15, "the console to see the reasoner")

    status, headers, body = ask(b, {"streams": ["cam"], "question": "What moves?"})
    assert status == 200 and headers["Content-Type"].startswith("application/x-ndjson"), body
    lines = [json.loads(line) for line in body.splitlines()]
    assert len(lines) >= 2 and all("text" in line for line in lines[:-1]), lines  # streamed in pieces
    result = lines[-1]["result"]
    assert result["answer"] == "".join(line["text"] for line in lines[:-1]).strip()
    assert [(e["stream_id"], e["seq"], e["wall_start"]) for e in result["evidence"]] == [
        ("cam", c["seq"], c["wall_start"]) for c in clips
    ]
    assert result["frames"] == 4 * CLIPS
    for e in result["evidence"]:  # each piece of evidence is a thumbnail the page can show
        assert b.call("GET", f"/v1/streams/cam/thumbnails/{e['seq']}.jpg")[0] == 200

    # a wall-clock range picks the clips it overlaps, as in `vcflash up`
    status, _, body = ask(
        b, {"streams": ["cam"], "question": "What moves?", "start": clips[1]["wall_start"], "end": clips[1]["wall_end"]}
    )
    assert status == 200 and [e["seq"] for e in json.loads(body.splitlines()[-1])["result"]["evidence"]] == [1]
    # the reasoner's refusals keep their statuses across gRPC
    for question, code in [
        ({"streams": ["nope"], "question": "q"}, 404),
        ({"streams": ["cam"] * 2, "question": "q"}, 400),
        ({"streams": ["cam"], "question": "q", "start": 10, "end": 5}, 400),
    ]:
        for call in (ask, search):
            status, _, body = call(b, question)
            assert status == code and "error" in json.loads(body), (call, question, status, body)


def test_the_split_console_searches_through_the_reasoner(split: tuple[Deployment, str]) -> None:
    from vcflash.client import Client

    d, base = split
    b = signed_in(base)
    clips = cameras_and_timeline_work(b)
    status, _, body = search(b, {"streams": ["cam"], "question": "What moves?", "limit": 3})
    assert status == 200, body
    found = json.loads(body)
    with Client(f"127.0.0.1:{d.ports['reasoner']}", TOKEN) as c:  # the reasoner's own answer, straight
        expected = c.search(["cam"], "What moves?", limit=3)
    assert found["clips_scored"] == CLIPS == expected.clips_scored
    assert [(m["stream_id"], m["first_seq"], m["last_seq"], m["wall_start"]) for m in found["moments"]] == [
        (m.stream_id, m.first_seq, m.last_seq, m.wall_start) for m in expected.moments
    ]
    # a wall-clock range reaches the reasoner: only the clips it overlaps are scored
    ranged = {
        "streams": ["cam"],
        "question": "What moves?",
        "start": clips[1]["wall_start"],
        "end": clips[2]["wall_end"],
    }
    found = json.loads(search(b, ranged)[2])
    assert found["clips_scored"] == 2 and {m["first_seq"] for m in found["moments"]} <= {1, 2}


def test_the_split_ingest_serves_the_openai_chat_api_asking_the_reasoner(split: tuple[Deployment, str]) -> None:
    """Issue 15: /v1/chat/completions on ingest's HTTP port answers as `ask-live` against the reasoner."""
    import openai

    from vcflash.client import Client

    d, base = split
    with Client(f"127.0.0.1:{d.ports['reasoner']}", TOKEN) as c:
        live = list(c.ask(["cam"], "What moves?", max_new_tokens=16))[-1]
    client = openai.OpenAI(base_url=base + "/v1", api_key=TOKEN, max_retries=0, timeout=120)
    assert "vcflash/cam" in [m.id for m in client.models.list()]
    messages = [{"role": "user", "content": [{"type": "text", "text": "What moves?"}]}]
    messages[0]["content"].append({"type": "video_url", "video_url": {"url": "vcflash://cam"}})  # type: ignore[attr-defined]
    answer = client.chat.completions.create(model="vcflash", messages=messages, max_tokens=16)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == live.answer
    assert [m["seq"] for m in answer.model_extra["vcflash"]["moments"]] == [e.clip.seq for e in live.evidence]
    with pytest.raises(openai.NotFoundError):  # the reasoner's NOT_FOUND, across gRPC
        client.chat.completions.create(model="vcflash/nope", messages=[{"role": "user", "content": "q"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong-token-0123456789", max_retries=0).models.list()


@chromium
def test_the_split_console_in_headless_chromium(split: tuple[Deployment, str], tmp_path: Path) -> None:
    _, base = split
    with console_page(base, tmp_path) as (page, shots):
        page.wait_for_selector(f'.camera[data-name="cam"][data-seq="{CLIPS - 1}"]')
        page.click("nav a[data-page=chat]")
        page.check('#chat-streams input[value="cam"]')
        page.fill("textarea[name=question]", "What moves across the screen?")
        page.click("#ask button[type=submit]")
        page.wait_for_selector(".answer[data-state=done]", timeout=120_000)
        assert page.locator(".evidence-clip").count() == CLIPS
        assert page.inner_text("#reasoner-state") == ""  # the reasoner answers: no notice
        page.screenshot(path=shots / "split-chat.png", full_page=True)


def test_a_stopped_reasoner_leaves_the_cameras_and_says_so_in_chat(
    split: tuple[Deployment, str], tmp_path: Path
) -> None:
    d, base = split
    b = signed_in(base)
    address = f"127.0.0.1:{d.ports['reasoner']}"
    d.kill("reasoner")
    try:
        for call in (ask, search):
            status, headers, body = call(b, {"streams": ["cam"], "question": "What moves?"})
            assert status == 503 and headers["Content-Type"].startswith("application/json"), (call, status, body)
            message = json.loads(body)["error"]
            assert message.startswith(f"the reasoner ({address}) is unavailable"), message
            assert "Traceback" not in message and TOKEN not in message
        cameras_and_timeline_work(b)  # the cameras and the timeline do not need the reasoner
        state = wait_for_state(b, False)
        assert state["error"], state
        assert serving(d.ports["ingest"])  # ingest's own health: its cameras run on
        log = (d.tmp / "ingest.log").read_text()
        assert f"event=reasoner_unavailable address={address}" in log, log[-2000:]
        if _playwright() is not None and os.access(CHROMIUM, os.X_OK):
            search_page_without_the_reasoner(base, address, tmp_path)
    finally:
        d.start("reasoner")
    wait_for_state(b, True)  # dialled again within seconds of its return
    status, _, body = ask(b, {"streams": ["cam"], "question": "What moves?"})
    assert status == 200 and "result" in json.loads(body.splitlines()[-1]), body
    assert f"event=reasoner_available address={address}" in (d.tmp / "ingest.log").read_text()


def search_page_without_the_reasoner(base: str, address: str, tmp_path: Path) -> None:
    """The search page says the reasoner is away, and a search shows the 503's message; the timeline still works."""
    with console_page(base, tmp_path) as (page, shots):
        page.goto(f"{base}/console/#/search")
        page.wait_for_function("() => document.querySelector('#reasoner-state').textContent !== ''")
        assert page.inner_text("#reasoner-state").startswith("The reasoner is unavailable")
        page.check('#search-streams input[value="cam"]')
        page.fill("#search input[name=question]", "What moves across the screen?")
        page.click("#search button[type=submit]")
        page.wait_for_selector("#search-status[data-state=error]")
        assert page.inner_text("#search-status").startswith(f"the reasoner ({address}) is unavailable")
        page.screenshot(path=shots / "split-reasoner-down.png", full_page=True)
        page.click("nav a[data-page=timeline]")
        page.wait_for_selector(f'.strip .clip[data-seq="{CLIPS - 1}"]')


def wait_for_state(b: Browser, available: bool) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while (state := reasoner_state(b))["available"] is not available:
        assert time.monotonic() < deadline, f"the console still reports {state}"
        time.sleep(0.2)
    return state
