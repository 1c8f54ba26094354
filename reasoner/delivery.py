"""Alert event records sent out by webhook (a signed POST) and MQTT (QoS 1), off the evaluation path.

`Delivery.submit` serialises the record and puts it on its channel's bounded queue: it never blocks and never
raises, and a full queue counts the record as a dead letter (`vcflash_alert_deliveries_total{outcome="overflow"}`).
Every record accepted ends as exactly one of delivered or dead letter (retries exhausted, refused, dropped at
close), so `submitted = delivered + dead letters + queue depth`. The durable log of events is the store
(WatchEvents, `vcflash events`); webhooks and MQTT are best effort on top of it.

Webhooks: one lane per URL, so a receiver sees an event's start before its end and a dead receiver holds up no
other. Each attempt POSTs the record as JSON with
    X-Vcflash-Event: the record's key (`alert/stream/start_seq/kind`, percent-encoded beyond [A-Za-z0-9/._:~+-]):
        the same on every retry, for idempotent receivers
    X-Vcflash-Timestamp: Unix seconds of this attempt
    X-Vcflash-Signature: sha256=<hex HMAC-SHA256 over "<timestamp>.<body>" under the alert's secret>
A receiver recomputes the HMAC over the raw body, compares in constant time and refuses timestamps more than a
few minutes old (replays): see `verify_signature`. 2xx is delivered; 408, 425, 429 and 5xx, timeouts and
connection errors are retried with `webhook_backoff`; any other status (a redirect included: none is followed)
is final.

SSRF: `check_webhook_url` refuses, unless `webhook_allow_private`, hosts that are or resolve to non-public
addresses. Names are resolved once more at delivery, by the connector's resolver, and the connection goes to
exactly the addresses that passed (TLS and Host still name the host), so a name that rebinds to a private
address between the check and the POST is refused too.

MQTT: one client per process (paho's thread); records go at QoS 1 to the alert's topic, states retained to
`<topic>/state`, and count as delivered at the broker's PUBACK. While the broker is unreachable a record waits at most
`mqtt_timeout_s` from the moment it was lost, then is a dead letter: a long outage costs no queue time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import paho.mqtt.client as mqtt
from aiohttp.abc import AbstractResolver, ResolveResult
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from vcflash.serve.errors import Invalid, excerpt
from vcflash.serve.settings import DeliverySettings, mqtt_address

log = logging.getLogger(__name__)

WEBHOOK, MQTT = "webhook", "mqtt"
WEBHOOK_SCHEMES = ("http", "https")
EVENT_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER = "X-Vcflash-Event", "X-Vcflash-Timestamp", "X-Vcflash-Signature"
MAX_URL_CHARS = 2048
MAX_TOPIC_CHARS = 256
MAX_RESPONSE_BYTES = 64 * 1024  # read of a receiver's answer (only to keep the connection); the rest is dropped
RETRY_STATUS = frozenset({408, 425, 429})  # and every 5xx
STATE_SUFFIX = "/state"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class Target:
    """Where one alert's records go."""

    alert: str
    webhook_url: str | None = None
    webhook_secret: str | None = None
    mqtt_topic: str | None = None


# --- signatures ---


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Vcflash-Signature value of `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str, timestamp: str, body: bytes, signature: str, *, now: float | None = None, max_age_s: float = 300.0
) -> bool:
    """What a receiver checks: the signature over the raw body, and a timestamp within `max_age_s` of `now`."""
    try:
        age = (time.time() if now is None else now) - int(timestamp)
    except ValueError:
        return False
    return abs(age) <= max_age_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


# --- what a webhook may reach ---


def address_refusal(address: str) -> str | None:
    """Why a webhook may not connect to the IP `address` ("loopback", "private", ...), or None for a public
    unicast one. IPv6 forms that carry an IPv4 address (mapped, 6to4, NAT64) are judged by that address first."""
    ip = ipaddress.ip_address(address.partition("%")[0])  # no zone id
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour]
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        candidates = [a for a in embedded if a is not None] + candidates
    for a in candidates:
        for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
            if getattr(a, f"is_{kind}"):
                return kind.replace("_", "-")
        if not a.is_global:
            return "non-global"
    return None


def check_webhook_url(url: str, *, allow_private: bool) -> str:
    """`url` if a webhook may POST to it: http(s), no credentials, and (unless `allow_private`) a host that is not
    and does not resolve to a non-public address; else `Invalid`. A name is looked up (blocking: call this from a
    thread in async code); one that does not resolve yet passes, since delivery checks again."""
    host = _webhook_host(url)
    if allow_private:
        return url
    name = host.rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always loopback, whatever DNS says
        raise Invalid(_refused_message(url, "loopback", host))
    addresses = _numeric_addresses(host)
    if addresses is None:
        try:
            addresses = [info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]
        except (OSError, UnicodeError):
            addresses = []
    for address in addresses:
        if reason := address_refusal(address):
            raise Invalid(_refused_message(url, reason, address))
    return url


def check_mqtt_topic(topic: str) -> str:
    """`topic` if records may be published to it (and its state to `topic/state`); else `Invalid`."""
    if not isinstance(topic, str) or not topic or len(topic) > MAX_TOPIC_CHARS:
        raise Invalid(f"MQTT topic must be 1-{MAX_TOPIC_CHARS} characters, got {excerpt(topic)}")
    if "+" in topic or "#" in topic:
        raise Invalid(f"MQTT topic must not hold the wildcards + or #, got {excerpt(topic)}")
    if topic.startswith("$") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in topic):
        raise Invalid(f"MQTT topic must not start with $ nor hold control characters, got {excerpt(topic)}")
    return topic


def _webhook_host(url: str) -> str:
    """The host of a syntactically acceptable webhook URL (lower case, no brackets); else `Invalid`. Messages quote
    the scheme and host at most: paths and queries of webhook URLs often hold tokens."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise Invalid(f"webhook URL must be 1-{MAX_URL_CHARS} characters")
    if any(not 0x20 < ord(c) < 0x7F or c == "\\" for c in url):
        raise Invalid("webhook URL must be printable ASCII without spaces or backslashes (percent-encode the rest)")
    parts = urlsplit(url)
    if parts.scheme.lower() not in WEBHOOK_SCHEMES:
        raise Invalid(f"webhook URL must be {' or '.join(WEBHOOK_SCHEMES)}, got scheme {excerpt(parts.scheme)}")
    if "@" in parts.netloc:
        raise Invalid("webhook URL must not hold credentials (user:password@); authenticate by its signature")
    try:
        parts.port  # noqa: B018 (raises for a bad port)
    except ValueError:
        raise Invalid(f"webhook URL has a bad port: {excerpt(parts.netloc)}") from None
    if not parts.hostname:
        raise Invalid("webhook URL has no host")
    if "%" in parts.hostname:  # an IPv6 zone or an encoded name: neither belongs in a webhook
        raise Invalid(f"webhook URL host must not hold %: {excerpt(parts.hostname)}")
    return parts.hostname


def _numeric_addresses(host: str) -> list[str] | None:
    """The address of a numeric host (any form the C library reads: "127.1", "0x7f.0.0.1"), without any lookup;
    None for a name."""
    try:
        infos = socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    return [info[4][0] for info in infos]


def _refused_message(url: str, reason: str, address: str) -> str:
    return (
        f"webhook URL {_origin(url)} leads to {address} ({reason}): private and loopback receivers are refused "
        "unless VCFLASH_WEBHOOK_ALLOW_PRIVATE=true"
    )


def _origin(url: str) -> str:
    """scheme://host[:port] of `url`: what logs and errors show of a webhook URL. (Not ingest.source.redact_url:
    reasoner may not import ingest, and a webhook's path is itself often the secret.)"""
    try:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
    except ValueError:
        return "<webhook URL>"


class _Refused(OSError):
    """A webhook host that resolved to an address it may not reach."""


class _CheckedResolver(AbstractResolver):
    """aiohttp's resolver, refusing names with a non-public address: the connector connects only to what this
    returns, so the address checked is the address connected to (no rebinding between check and connect).
    Numeric hosts skip resolvers in aiohttp: `_attempt` checks those."""

    def __init__(self, allow_private: bool) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not self._allow_private:
            for result in results:
                if reason := address_refusal(result["host"]):
                    raise _Refused(f"{host} resolves to {result['host']} ({reason})")
        return results

    async def close(self) -> None:
        await self._inner.close()


def _refusal_in(error: BaseException) -> _Refused | None:
    """The `_Refused` behind an aiohttp connection error, if any."""
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None or isinstance(seen, _Refused):
            return seen
        seen = getattr(seen, "os_error", None) or seen.__cause__ or seen.__context__
    return None


# --- MQTT ---


class _MqttLink:
    """The process's one MQTT client. paho's network thread connects and reconnects (waits doubling from
    `mqtt_reconnect.initial_s`, spread once by its jitter, to `max_s`); a record counts as delivered at its PUBACK."""

    def __init__(self, settings: DeliverySettings) -> None:
        assert settings.mqtt_url is not None
        self._host, self._port, tls = mqtt_address(settings.mqtt_url)
        self._timeout_s = settings.mqtt_timeout_s
        client_id = settings.mqtt_client_id or f"vcflash-{secrets.token_hex(4)}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        if settings.mqtt_username is not None:
            self.client.username_pw_set(settings.mqtt_username, settings.mqtt_password)
        if tls:
            self.client.tls_set(ca_certs=str(settings.mqtt_tls_ca) if settings.mqtt_tls_ca else None)
        backoff = settings.mqtt_reconnect
        self.client.reconnect_delay_set(min(backoff.delay(0), backoff.max_s), backoff.max_s)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.connected = threading.Event()
        self._down_since = time.monotonic()
        self._complained = False  # one warning per outage, not one per reconnect attempt

    def start(self) -> None:
        self._down_since = time.monotonic()
        self.client.connect_async(self._host, self._port, keepalive=30)
        self.client.loop_start()

    def close(self) -> None:
        self._complained = True  # the disconnect below is no outage
        self.client.disconnect()
        self.client.loop_stop()

    async def publish(self, topic: str, payload: bytes, retain: bool) -> str | None:
        """None once the broker acknowledged the message; else why not. While the broker is unreachable, a record
        waits at most `mqtt_timeout_s` from when it was lost, so a long outage fails records at once."""
        while not self.connected.is_set():
            if time.monotonic() >= self._down_since + self._timeout_s:
                return "broker unreachable"
            await asyncio.sleep(0.02)
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: paho resends it on reconnect
            return f"publish refused: {mqtt.error_string(info.rc)}"
        deadline = time.monotonic() + self._timeout_s
        while not info.is_published():
            if time.monotonic() >= deadline:
                return "no PUBACK in time (paho may still deliver it)"
            await asyncio.sleep(0.01)
        return None

    # paho's thread calls these
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._complain(f"broker refused the connection: {reason}")
            return
        log.info("event=mqtt_connected broker=%s:%d", self._host, self._port)
        self._complained = False
        self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self.connected.is_set():
            self._down_since = time.monotonic()
            self.connected.clear()
            self._complain(f"disconnected: {reason}")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._complain("cannot connect")

    def _complain(self, what: str) -> None:
        if not self._complained:
            log.warning("event=mqtt_down broker=%s:%d error=%s (reconnecting)", self._host, self._port, what)
        self._complained = True


# --- the queues ---


@dataclass(frozen=True)
class _Job:
    target: Target
    key: str  # X-Vcflash-Event
    body: bytes
    topic: str | None = None  # MQTT
    retain: bool = False


class Delivery:
    """Sends alert records and states by webhook and MQTT; see the module docstring."""

    def __init__(self, settings: DeliverySettings, registry: CollectorRegistry = REGISTRY) -> None:
        self.settings = settings
        self.deliveries = Counter(
            "vcflash_alert_deliveries_total",
            "Alert records by channel and outcome: delivered, retried (an attempt failed, another follows), failed "
            "(retries exhausted or a final answer), refused (a forbidden address or bad topic), overflow (queue "
            "full), dropped (still queued at shutdown).",
            ["channel", "outcome"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "vcflash_alert_delivery_dead_letters_total",
            "Alert records given up on (failed, refused, overflow, dropped).",
            ["channel"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "vcflash_alert_delivery_queue_depth", "Alert records waiting or in flight.", ["channel"], registry=registry
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._mqtt: _MqttLink | None = None
        self._lanes: dict[tuple[str, str], deque[_Job]] = {}
        self._workers: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._queued = {WEBHOOK: 0, MQTT: 0}
        self._closed = False
        self._warned_no_mqtt: set[str] = set()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(
            resolver=_CheckedResolver(self.settings.webhook_allow_private), use_dns_cache=False
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            trust_env=False,  # no proxy from the environment: the connection goes where the check said
            cookie_jar=aiohttp.DummyCookieJar(),  # one receiver's cookies never reach another
            auto_decompress=False,
            headers={"User-Agent": "vcflash-webhook/1"},
        )
        if self.settings.mqtt_url is not None:
            self._mqtt = _MqttLink(self.settings)
            self._mqtt.start()

    async def close(self) -> None:
        self._closed = True
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for (channel, _), lane in self._lanes.items():
            for _job in lane:
                self._give_up(channel, "dropped")
                self.queue_depth.labels(channel).dec()
            lane.clear()
        self._lanes.clear()
        if self._session is not None:
            await self._session.close()
        if self._mqtt is not None:
            await asyncio.to_thread(self._mqtt.close)

    @property
    def mqtt_connected(self) -> bool:
        return self._mqtt is not None and self._mqtt.connected.is_set()

    def submit(self, target: Target, record: dict[str, Any]) -> None:
        """Queue `record` for the target's webhook and MQTT topic. Never blocks, never raises; safe from any
        thread. The record is serialised now: changing it afterwards changes nothing sent."""
        try:
            channels = [c for c, on in ((WEBHOOK, target.webhook_url), (MQTT, target.mqtt_topic)) if on]
            if not channels:
                return
            try:
                body = json.dumps(record, separators=(",", ":"), allow_nan=False).encode()
            except (TypeError, ValueError) as e:
                log.error("event=delivery_unserialisable alert=%s error=%s", target.alert, e)
                for channel in channels:
                    self._give_up(channel, "failed")
                return
            key = quote(str(record.get("key", record.get("id", ""))), safe="/._-:~+")  # a safe header value
            job = _Job(target, key, body)
            if target.webhook_url:
                self._offer(WEBHOOK, target.webhook_url, job)
            if target.mqtt_topic:
                self._offer(MQTT, "", _Job(target, key, body, target.mqtt_topic))
        except Exception:  # never into the evaluation path
            log.exception("event=delivery_submit_failed alert=%s", target.alert)

    def publish_state(self, target: Target, state: dict[str, Any]) -> None:
        """Publish `state` retained on `<topic>/state` (a late subscriber gets the latest). Never blocks/raises."""
        if not target.mqtt_topic:
            return
        try:
            body = json.dumps(state, separators=(",", ":"), allow_nan=False).encode()
            self._offer(MQTT, "", _Job(target, "", body, target.mqtt_topic + STATE_SUFFIX, retain=True))
        except Exception:
            log.exception("event=delivery_state_failed alert=%s", target.alert)
            self._give_up(MQTT, "failed")

    # --- queues and workers (on the loop) ---

    def _offer(self, channel: str, lane: str, job: _Job) -> None:
        loop = self._loop
        if loop is None or self._closed:
            self._give_up(channel, "dropped")
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._put(channel, lane, job)
            return
        try:
            loop.call_soon_threadsafe(self._put, channel, lane, job)
        except RuntimeError:  # the loop is closed
            self._give_up(channel, "dropped")

    def _put(self, channel: str, lane: str, job: _Job) -> None:
        if self._closed:
            self._give_up(channel, "dropped")
            return
        if self._queued[channel] >= self.settings.delivery_max_queue:
            self._give_up(channel, "overflow")
            return
        key = (channel, lane)
        self._lanes.setdefault(key, deque()).append(job)
        self._queued[channel] += 1
        self.queue_depth.labels(channel).inc()
        if key not in self._workers:
            assert self._loop is not None
            self._workers[key] = self._loop.create_task(self._drain(key))

    async def _drain(self, key: tuple[str, str]) -> None:
        """Send a lane's jobs one after the other; a job leaves the lane (and the queue depth) once it is done."""
        channel = key[0]
        lane = self._lanes[key]
        send = self._webhook if channel == WEBHOOK else self._publish
        try:
            while lane:
                try:
                    await send(lane[0])
                except Exception:
                    log.exception("event=delivery_bug channel=%s alert=%s", channel, lane[0].target.alert)
                    self._give_up(channel, "failed")
                lane.popleft()
                self._queued[channel] -= 1
                self.queue_depth.labels(channel).dec()
        finally:
            del self._workers[key]
            if not lane:
                del self._lanes[key]

    def _count(self, channel: str, outcome: str) -> None:
        self.deliveries.labels(channel, outcome).inc()

    def _give_up(self, channel: str, outcome: str) -> None:
        self._count(channel, outcome)
        self.dead_letters.labels(channel).inc()

    # --- webhooks ---

    async def _webhook(self, job: _Job) -> None:
        s = self.settings
        url = job.target.webhook_url
        assert url is not None
        for attempt in range(s.webhook_retries + 1):
            if attempt:
                await asyncio.sleep(s.webhook_backoff.delay(attempt - 1))
            outcome = await self._attempt(job, url, attempt)
            if outcome == "delivered":
                self._count(WEBHOOK, outcome)
                return
            if outcome != "retry":
                self._give_up(WEBHOOK, outcome)
                return
            if attempt < s.webhook_retries:
                self._count(WEBHOOK, "retried")
        log.warning(
            "event=webhook_dead_letter alert=%s url=%s attempts=%d", job.target.alert, _origin(url), attempt + 1
        )
        self._give_up(WEBHOOK, "failed")

    async def _attempt(self, job: _Job, url: str, attempt: int) -> str:
        """One POST: "delivered", "retry", or a final "failed" / "refused"."""
        alert, origin = job.target.alert, _origin(url)
        try:
            host = _webhook_host(url)
            if not self.settings.webhook_allow_private:  # aiohttp connects to numeric hosts without resolving
                for address in _numeric_addresses(host) or []:
                    if reason := address_refusal(address):
                        raise _Refused(f"{address} ({reason})")
        except (Invalid, _Refused) as e:
            log.warning("event=webhook_refused alert=%s url=%s reason=%s", alert, origin, e)
            return "refused"
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", EVENT_HEADER: job.key, TIMESTAMP_HEADER: timestamp}
        if job.target.webhook_secret:
            headers[SIGNATURE_HEADER] = sign(job.target.webhook_secret, timestamp, job.body)
        assert self._session is not None
        try:
            timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s)
            async with self._session.post(
                url, data=job.body, headers=headers, allow_redirects=False, timeout=timeout
            ) as r:
                await r.content.read(MAX_RESPONSE_BYTES)
                status = r.status
        except aiohttp.InvalidURL as e:  # aiohttp's own URL rules (e.g. no legacy numeric IPv4): retrying won't help
            log.warning("event=webhook_invalid_url alert=%s url=%s error=%s", alert, origin, type(e).__name__)
            return "failed"
        except Exception as e:  # aiohttp's errors, timeouts, and the resolver's refusal inside them
            if refused := _refusal_in(e):
                log.warning("event=webhook_refused alert=%s url=%s reason=%s", alert, origin, refused)
                return "refused"
            error = (str(e) or type(e).__name__).replace(url, origin)
            log.info("event=webhook_attempt_failed alert=%s url=%s attempt=%d error=%s", alert, origin, attempt, error)
            return "retry"
        if 200 <= status < 300:
            return "delivered"
        retry = status in RETRY_STATUS or status >= 500
        log.info("event=webhook_attempt_failed alert=%s url=%s attempt=%d status=%d", alert, origin, attempt, status)
        return "retry" if retry else "failed"

    # --- MQTT ---

    async def _publish(self, job: _Job) -> None:
        assert job.topic is not None
        alert = job.target.alert
        if self._mqtt is None:
            if alert not in self._warned_no_mqtt:  # once per alert: every record would say the same
                self._warned_no_mqtt.add(alert)
                log.warning("event=mqtt_not_configured alert=%s (set VCFLASH_MQTT_URL)", alert)
            self._give_up(MQTT, "refused")
            return
        try:
            check_mqtt_topic(job.topic.removesuffix(STATE_SUFFIX) if job.retain else job.topic)
        except Invalid as e:
            log.warning("event=mqtt_refused alert=%s reason=%s", alert, e)
            self._give_up(MQTT, "refused")
            return
        why = await self._mqtt.publish(job.topic, job.body, job.retain)
        if why is None:
            self._count(MQTT, "delivered")
        else:
            log.info("event=mqtt_failed alert=%s topic=%s error=%s", alert, excerpt(job.topic), why)
            self._give_up(MQTT, "failed")
