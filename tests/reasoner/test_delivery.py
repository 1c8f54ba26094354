"""Alert delivery against real peers on loopback: an aiohttp receiver that fails its first attempts, and a mosquitto
broker each test starts on a free port (skipped, saying why, where Debian's `mosquitto` is not installed)."""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import math
import queue
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry

from reasoner.delivery import (
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Delivery,
    Target,
    check_mqtt_topic,
    check_webhook_url,
    sign,
    verify_signature,
)
from tests.conftest import free_port
from vcflash.serve.errors import Invalid
from vcflash.serve.settings import Backoff, DeliverySettings, Settings

SECRET = "whsec-0123456789abcdef"
FAST = Backoff(initial_s=0.05, max_s=0.1, jitter=0.0)


def record(n: int, kind: str = "start") -> dict[str, Any]:
    return {"id": n, "key": f"door/cam1/{n}/{kind}", "kind": kind, "alert": "door", "stream": "cam1", "peak": 0.9}


def count(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


# --- webhooks ---


@dataclass
class Receiver:
    """An HTTP receiver on 127.0.0.1 answering each request with the next scripted reply (an HTTP status, or
    "hang": answer only after the sender's timeout), then 200. It verifies nothing itself: the tests do."""

    script: list[int | str] = field(default_factory=list)
    hang_s: float = 3.0
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)  # (path, headers, body)
    accepted: list[str] = field(default_factory=list)  # X-Vcflash-Event of each request answered 200
    port: int = 0

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((request.path, dict(request.headers), body))
        reply = self.script.pop(0) if self.script else 200
        if reply == "hang":
            await asyncio.sleep(self.hang_s)
            return web.Response(status=503)
        if reply == 200:
            self.accepted.append(request.headers[EVENT_HEADER])
        if 300 <= int(reply) < 400:
            return web.Response(status=int(reply), headers={"Location": "/elsewhere"})
        return web.Response(status=int(reply), text="x" * 200_000)  # a long body: read only up to the cap


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rx = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", rx.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)  # the receiver's log is not ours to check
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rx.port = runner.addresses[0][1]
    yield rx
    await runner.cleanup()


@pytest_asyncio.fixture
async def open_delivery() -> AsyncIterator[Callable[..., Any]]:
    """Deliveries on their own registries, closed at the end."""
    made: list[Delivery] = []

    async def make(**settings: Any) -> tuple[Delivery, CollectorRegistry]:
        registry = CollectorRegistry()
        delivery = Delivery(DeliverySettings(**settings), registry)
        await delivery.start()
        made.append(delivery)
        return delivery, registry

    yield make
    for delivery in made:
        await delivery.close()


@pytest.mark.asyncio
async def test_webhook_retries_through_500_and_a_timeout_then_delivers_each_record_once_signed(
    receiver: Receiver, open_delivery: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver.script = [500, "hang"]  # the first record's first two attempts fail, every later one is accepted
    delivery, registry = await open_delivery(
        webhook_allow_private=True, webhook_timeout_s=1.0, webhook_retries=3, webhook_backoff=FAST
    )
    target = Target("door", webhook_url=receiver.url("/hook?token=t0psecret"), webhook_secret=SECRET)
    delivery.submit(target, record(1))
    await asyncio.to_thread(delivery.submit, target, record(1, "end"))  # from another thread too

    await until(lambda: count(registry, "vcflash_alert_deliveries_total", channel="webhook", outcome="delivered") == 2)
    assert receiver.accepted == ["door/cam1/1/start", "door/cam1/1/end"]  # in order, each once
    assert len(receiver.requests) == 4  # 500, timeout, 200 for the start; 200 for the end
    assert count(registry, "vcflash_alert_deliveries_total", channel="webhook", outcome="retried") == 2
    assert count(registry, "vcflash_alert_delivery_dead_letters_total", channel="webhook") == 0
    assert count(registry, "vcflash_alert_delivery_queue_depth", channel="webhook") == 0

    for path, headers, body in receiver.requests:
        assert path == "/hook" and headers["Content-Type"] == "application/json"
        assert abs(int(headers[TIMESTAMP_HEADER]) - time.time()) < 60
        assert verify_signature(SECRET, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
        assert not verify_signature("another-secret", headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
        assert json.loads(body)["key"] == headers[EVENT_HEADER]
    _, headers, body = receiver.requests[-1]
    assert not verify_signature(SECRET, headers[TIMESTAMP_HEADER], body + b" ", headers[SIGNATURE_HEADER])
    stale = str(int(time.time()) - 3600)  # a replay an hour later: refused even with a valid MAC
    assert not verify_signature(SECRET, stale, body, sign(SECRET, stale, body))
    assert SECRET not in caplog.text and "t0psecret" not in caplog.text


@pytest.mark.asyncio
async def test_a_receiver_that_never_accepts_makes_a_dead_letter(
    receiver: Receiver, open_delivery: Callable[..., Any]
) -> None:
    # /fails: 3 attempts, all failing; /gone: a 404 is final; /moved: a redirect is final and not followed
    receiver.script = [500, 503, 502, 404, 307]
    delivery, registry = await open_delivery(webhook_allow_private=True, webhook_retries=2, webhook_backoff=FAST)
    for n, path in enumerate(("/fails", "/gone", "/moved"), 1):
        delivery.submit(Target("door", webhook_url=receiver.url(path)), record(n))
        await until(lambda n=n: count(registry, "vcflash_alert_delivery_dead_letters_total", channel="webhook") == n)
    assert [path for path, _, _ in receiver.requests] == ["/fails"] * 3 + ["/gone", "/moved"]
    assert receiver.accepted == []
    assert count(registry, "vcflash_alert_deliveries_total", channel="webhook", outcome="failed") == 3
    assert count(registry, "vcflash_alert_deliveries_total", channel="webhook", outcome="retried") == 2
    assert SIGNATURE_HEADER not in receiver.requests[0][1]  # no secret, no signature


@pytest.mark.asyncio
async def test_submit_never_blocks_and_overflow_is_counted(
    receiver: Receiver, open_delivery: Callable[..., Any]
) -> None:
    receiver.script = ["hang"] * 20
    receiver.hang_s = 5.0
    delivery, registry = await open_delivery(webhook_allow_private=True, webhook_timeout_s=5.0, delivery_max_queue=10)
    target = Target("door", webhook_url=receiver.url())
    start = time.perf_counter()
    for n in range(2000):
        delivery.submit(target, record(n))
    delivery.submit(target, {"key": "bad", "score": math.nan})  # not JSON: counted, not raised
    delivery.submit(target, {"key": "bad", "when": object()})
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"2002 submits took {elapsed:.3f} s"  # about 10 us each; the POSTs hang for 5 s

    dead = count(registry, "vcflash_alert_delivery_dead_letters_total", channel="webhook")
    assert count(registry, "vcflash_alert_deliveries_total", channel="webhook", outcome="overflow") == 1990
    assert count(registry, "vcflash_alert_deliveries_total", channel="webhook", outcome="failed") == 2
    assert dead == 1992 and count(registry, "vcflash_alert_delivery_queue_depth", channel="webhook") == 10
    await delivery.close()  # what is still queued is dropped, and counted: submitted = delivered + dead letters
    assert count(registry, "vcflash_alert_deliveries_total", channel="webhook", outcome="dropped") == 10
    assert count(registry, "vcflash_alert_delivery_dead_letters_total", channel="webhook") == 2002
    delivery.submit(target, record(1))  # after close: counted, not raised
    assert count(registry, "vcflash_alert_deliveries_total", channel="webhook", outcome="dropped") == 11


# --- SSRF ---

REFUSED_URLS = {
    "ftp://example.com/hook": "http or https",
    "file:///etc/passwd": "http or https",
    "gopher://example.com:70/": "http or https",
    "http://user:pass@example.com/hook": "credentials",
    "http://example.com\\@127.0.0.1/": "backslash",
    "http://127.0.0.1:8080/hook": "loopback",
    "http://127.1/": "loopback",
    "http://0x7f.0.0.1/": "loopback",
    "http://2130706433/": "loopback",
    "http://10.1.2.3/hook": "private",
    "https://192.168.0.10/": "private",
    "http://169.254.169.254/latest/meta-data/": "link-local",
    "http://0.0.0.0/": "unspecified",
    "http://224.0.0.1/": "multicast",
    "http://100.64.0.1/": "non-global",
    "http://[::1]:8080/": "loopback",
    "http://[::ffff:127.0.0.1]/": "loopback",
    "http://[::ffff:10.0.0.1]/": "private",
    "http://[fe80::1]/": "link-local",
    "http://[fe80::1%25eth0]/": "must not hold %",
    "http://[fc00::1]/": "private",
    "http://[2002:7f00:1::]/": "loopback",  # 6to4 of 127.0.0.1
    "http://localhost:8080/": "loopback",
    "http://cam.localhost/": "loopback",
    "http://localhost./": "loopback",
    "http://example.com:99999/": "bad port",
}


@pytest.mark.parametrize("url", sorted(REFUSED_URLS))
def test_webhook_urls_refused(url: str) -> None:
    # numeric hosts and *.localhost are judged without any lookup: no packet leaves this machine
    with pytest.raises(Invalid, match=REFUSED_URLS[url]):
        check_webhook_url(url, allow_private=False)


def test_webhook_urls_allowed() -> None:
    assert check_webhook_url("https://8.8.8.8/hook?x=1", allow_private=False) == "https://8.8.8.8/hook?x=1"
    assert check_webhook_url("http://[2606:4700::1]:8443/", allow_private=False)
    for url in ("http://127.0.0.1:8080/hook", "http://localhost/", "http://10.0.0.5/"):
        assert check_webhook_url(url, allow_private=True) == url
    for url in ("ftp://10.0.0.5/", "http://u:p@127.0.0.1/"):  # never, even when private receivers are allowed
        with pytest.raises(Invalid):
            check_webhook_url(url, allow_private=True)


@pytest.mark.asyncio
async def test_delivery_refuses_private_receivers_at_connect_time(
    receiver: Receiver, open_delivery: Callable[..., Any]
) -> None:
    """Targets that skipped the check (or whose name now resolves elsewhere): refused before any connection, and not
    retried. `localhost` goes through the resolver (from /etc/hosts), as a rebound name would."""
    delivery, registry = await open_delivery(webhook_timeout_s=30.0, webhook_retries=5, webhook_backoff=FAST)
    hosts = ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "10.255.255.1")
    start = time.monotonic()
    for host in hosts:
        delivery.submit(Target("door", webhook_url=receiver.url(host=host)), record(1))
    await until(lambda: count(registry, "vcflash_alert_deliveries_total", channel="webhook", outcome="refused") == 4)
    assert time.monotonic() - start < 5  # no connection was tried (10.255.255.1 would hang for the 30 s timeout)
    assert receiver.requests == []
    assert count(registry, "vcflash_alert_deliveries_total", channel="webhook", outcome="retried") == 0
    assert count(registry, "vcflash_alert_delivery_dead_letters_total", channel="webhook") == 4

    allowed, allowed_registry = await open_delivery(webhook_allow_private=True)  # the same name, allowed: delivered
    allowed.submit(Target("door", webhook_url=receiver.url(host="localhost")), record(2))
    await until(lambda: receiver.accepted == ["door/cam1/2/start"])
    assert receiver.requests[-1][1]["Host"] == f"localhost:{receiver.port}"  # connected to the address, named by name


def test_mqtt_topics() -> None:
    assert check_mqtt_topic("vcflash/alerts/door") == "vcflash/alerts/door"
    for topic in ("", "a/+/b", "a/#", "a\x00b", "a\nb", "$SYS/x", "t" * 257):
        with pytest.raises(Invalid):
            check_mqtt_topic(topic)


def test_delivery_settings_from_the_environment() -> None:
    env = {
        "VCFLASH_WEBHOOK_ALLOW_PRIVATE": "true",
        "VCFLASH_WEBHOOK_BACKOFF_MAX_S": "5",
        "VCFLASH_MQTT_URL": "mqtts://broker.example",
        "VCFLASH_MQTT_USERNAME": "vcflash",
        "VCFLASH_MQTT_PASSWORD": "mqtt-pa55word",
    }
    s = Settings.from_env(env).delivery
    assert s.webhook_allow_private and s.webhook_backoff.max_s == 5 and s.mqtt_password == "mqtt-pa55word"
    assert "mqtt-pa55word" not in repr(s)
    for url in ("http://broker", "mqtt://user:pw@broker", "mqtt://broker/topic", "mqtt://broker:http"):
        with pytest.raises(ValueError, match="VCFLASH_MQTT_URL") as e:
            DeliverySettings(mqtt_url=url)
        assert "pw" not in str(e.value)
    with pytest.raises(ValueError, match="VCFLASH_MQTT_USERNAME"):
        DeliverySettings(mqtt_password="x")


# --- MQTT, against a real mosquitto ---


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)
    if found is None:
        pytest.skip("mosquitto is not installed (Debian: apt-get install mosquitto; .ci/run installs it)")
    return found


class Mosquitto:
    """A mosquitto broker on 127.0.0.1:`port`, configured by the test (optionally with a password file)."""

    def __init__(self, directory: Path, port: int, users: dict[str, str] | None = None) -> None:
        self.binary, self.directory, self.port = mosquitto_binary(), directory, port
        lines = [f"listener {port} 127.0.0.1", "persistence false", f"user {getpass.getuser()}"]  # root stays root
        if users:
            passwords = directory / "passwords"
            for n, (user, password) in enumerate(users.items()):
                make = ["-c"] if n == 0 else []
                subprocess.run(["mosquitto_passwd", "-b", *make, str(passwords), user, password], check=True)
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.directory / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError as e:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = (self.directory / "mosquitto.log").read_text()
                    raise RuntimeError(f"mosquitto did not start:\n{log}") from e
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path, free_port())
    b.start()
    yield b
    b.stop()


class Subscriber:
    """A paho client subscribed (QoS 1) to `topics`; messages land in a thread-safe queue."""

    def __init__(self, port: int, *topics: str, auth: tuple[str, str] | None = None) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        if auth:
            self.client.username_pw_set(*auth)
        subscribed = queue.Queue[int]()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda c, u, mid, codes, p: subscribed.put(mid)
        self.client.on_message = lambda c, u, message: self.messages.put(message)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        subscribed.get(timeout=10)

    def take(self, n: int, timeout: float = 10.0) -> list[mqtt.MQTTMessage]:
        return [self.messages.get(timeout=timeout) for _ in range(n)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def mqtt_settings(port: int, **more: Any) -> dict[str, Any]:
    reconnect = Backoff(initial_s=0.05, max_s=0.2, jitter=0.0)
    return {"mqtt_url": f"mqtt://127.0.0.1:{port}", "mqtt_timeout_s": 1.0, "mqtt_reconnect": reconnect, **more}


@pytest.mark.asyncio
async def test_mqtt_publishes_records_at_qos1_and_a_retained_state(
    broker: Mosquitto, open_delivery: Callable[..., Any]
) -> None:
    delivery, registry = await open_delivery(**mqtt_settings(broker.port))
    await until(lambda: delivery.mqtt_connected)
    sub = await asyncio.to_thread(Subscriber, broker.port, "alerts/door", "alerts/door/state")
    try:
        target = Target("door", mqtt_topic="alerts/door")
        for n in range(3):
            delivery.submit(target, record(n))
        delivery.publish_state(target, {"active": True, "score": 0.9})
        got = await asyncio.to_thread(sub.take, 4)
    finally:
        sub.close()
    records = [m for m in got if m.topic == "alerts/door"]
    assert [json.loads(m.payload) for m in records] == [record(n) for n in range(3)]
    assert all(m.qos == 1 for m in got)
    await until(lambda: count(registry, "vcflash_alert_deliveries_total", channel="mqtt", outcome="delivered") == 4)

    late = await asyncio.to_thread(Subscriber, broker.port, "alerts/door/state")  # retained: a late one gets it
    try:
        (state,) = await asyncio.to_thread(late.take, 1)
    finally:
        late.close()
    assert state.retain and json.loads(state.payload) == {"active": True, "score": 0.9}
    assert count(registry, "vcflash_alert_delivery_dead_letters_total", channel="mqtt") == 0


@pytest.mark.asyncio
async def test_mqtt_broker_down_at_first_counts_failures_then_delivers(
    tmp_path: Path, open_delivery: Callable[..., Any]
) -> None:
    broker = Mosquitto(tmp_path, free_port())  # not started yet
    delivery, registry = await open_delivery(**mqtt_settings(broker.port))
    target = Target("door", mqtt_topic="alerts/door")
    delivery.submit(target, record(1))
    delivery.submit(target, record(2))
    delivery.submit(Target("door", webhook_url=None), record(3))  # no channel: nothing to do
    await until(lambda: count(registry, "vcflash_alert_delivery_dead_letters_total", channel="mqtt") == 2, 5)
    assert count(registry, "vcflash_alert_deliveries_total", channel="mqtt", outcome="failed") == 2
    assert not delivery.mqtt_connected

    broker.start()
    try:
        await until(lambda: delivery.mqtt_connected)
        sub = await asyncio.to_thread(Subscriber, broker.port, "alerts/door")
        try:
            delivery.submit(target, record(4))
            delivery.submit(target, record(5))
            got = await asyncio.to_thread(sub.take, 2)
            await asyncio.sleep(0.2)
            assert sub.messages.empty()  # the failed records are not sent late
        finally:
            sub.close()
    finally:
        broker.stop()
    assert [json.loads(m.payload)["id"] for m in got] == [4, 5]
    assert count(registry, "vcflash_alert_deliveries_total", channel="mqtt", outcome="delivered") == 2


@pytest.mark.asyncio
async def test_mqtt_with_a_password_and_bad_topics(
    tmp_path: Path, open_delivery: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    broker = Mosquitto(tmp_path, free_port(), users={"vcflash": "right-pa55word", "watcher": "watch-pa55word"})
    broker.start()
    try:
        good, good_registry = await open_delivery(
            **mqtt_settings(broker.port, mqtt_username="vcflash", mqtt_password="right-pa55word")
        )
        bad, bad_registry = await open_delivery(
            **mqtt_settings(broker.port, mqtt_username="vcflash", mqtt_password="wrong-pa55word")
        )
        await until(lambda: good.mqtt_connected)
        sub = await asyncio.to_thread(Subscriber, broker.port, "alerts/#", auth=("watcher", "watch-pa55word"))
        try:
            good.submit(Target("door", mqtt_topic="alerts/door"), record(1))
            good.submit(Target("door", mqtt_topic="alerts/+"), record(2))  # a wildcard: refused, counted
            bad.submit(Target("door", mqtt_topic="alerts/door"), record(3))
            (got,) = await asyncio.to_thread(sub.take, 1)
        finally:
            sub.close()
        await until(lambda: count(bad_registry, "vcflash_alert_delivery_dead_letters_total", channel="mqtt") == 1)
    finally:
        broker.stop()
    assert json.loads(got.payload)["id"] == 1
    assert count(good_registry, "vcflash_alert_deliveries_total", channel="mqtt", outcome="refused") == 1
    assert not bad.mqtt_connected
    assert "pa55word" not in caplog.text


@pytest.mark.asyncio
async def test_mqtt_topic_without_a_broker_configured_is_counted(open_delivery: Callable[..., Any]) -> None:
    delivery, registry = await open_delivery()
    delivery.submit(Target("door", mqtt_topic="alerts/door"), record(1))
    delivery.publish_state(Target("door", mqtt_topic="alerts/door"), {"active": False})
    await until(lambda: count(registry, "vcflash_alert_deliveries_total", channel="mqtt", outcome="refused") == 2)
