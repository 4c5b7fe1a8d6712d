"""The daemon's MQTT layer (MQTT 5, aiomqtt 2.x): one connection to the broker for the POS side and
the backend side (architecture.md, "MQTT, POS side" / "MQTT, backend side").

:class:`DaemonLink` keeps a persistent session (stable client id, clean start off, the configured
session expiry), TLS and username/password from ``[mqtt]``, TCP_NODELAY on its socket. Its
:meth:`~DaemonLink.run` loop connects, subscribes, publishes the retained presence and serves
until :meth:`~DaemonLink.stop` or cancellation; a lost or refused connection is retried with
jittered exponential backoff (``reconnect_backoff_min`` doubling to ``reconnect_backoff_max``;
a connection that stayed up that long resets it). The loop never raises on broker outages: the
state is observable through :attr:`~DaemonLink.connected`, :attr:`~DaemonLink.connected_event`,
:attr:`~DaemonLink.last_error` and :meth:`~DaemonLink.status`.

Topics (``{id}`` the terminal id):

- presence: retained ``sscard/v1/term/{id}/status`` ``{"state": "online", ...}`` on every
  connect, a retained Last Will ``{"state": "offline"}``, and ``{"state": "offline", "reason":
  "shutdown"}`` published on a clean stop;
- events: :meth:`~DaemonLink.publish_event` on ``.../events`` (best effort, never queued);
- POS commands: ``.../cmd`` (subscribed at QoS 0, so that none is queued for the daemon while it
  is away and run later against another card; the POS retries under the same id) handed to the
  async ``on_command`` handler as a
  :class:`Command`; each runs in its own task. Answers go through :meth:`~DaemonLink.reply`, which
  refuses (logs, publishes nothing) a Response Topic outside ``sscard/v1/term/{id}/reply/``;
- backend: :meth:`~DaemonLink.request` publishes to ``sscard/v1/settle/req/{id}`` with Response
  Topic ``.../settle/resp``, unique Correlation Data and a Message Expiry shorter than the
  answer timeout, and waits for the answer carrying that Correlation Data.

Correlation Data is ``sscardd/{client_id}/{ref}/{nonce}`` (ASCII): ``ref`` is the caller's
reference (the settlement's ``msgid``) or ``-``. An answer whose Correlation Data starts with this
client's prefix but that no request waits for any more — it timed out, or was asked before a
restart — is a *late answer*, handed to ``on_late_answer`` (the journal records it; it is never
acted on). A duplicate of an answer already delivered is dropped; answers with any other
Correlation Data (the operator CLI's ``{id}-cli`` client reads the same response topic with its
own) are ignored.

A request survives reconnects: it stays registered while the connection is down, a publish cut
off before its PUBACK is published again on the next connection (same Correlation Data, a
Message Expiry shortened to the time left; the backend deduplicates by ``msgid``), and an answer
that arrives after a broker restart — or was queued in the persistent session while the daemon
was away — is matched as usual. If the time runs out first, :class:`AnswerTimeout` (a
``TimeoutError``) is raised and the correlation is remembered as late.

Incoming payloads over ``mqtt.max_payload`` (commands) or ``max_answer_payload`` (backend
answers) are dropped with a log line and never processed; so are retained deliveries on the cmd
and response topics (a retained command would be replayed on every subscribe). Payloads, PINs,
ID numbers and names are never logged: log lines carry topics, sizes, references and error types.

aiomqtt acknowledges QoS 1 before the application processes a message, so correctness rests on
the journal and retries, not on redelivery (architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import math
import random
import re
import secrets
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Final

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sscardd import __version__, broker
from sscardd.config import MqttConfig

log = structlog.get_logger("sscardd.mqtt")

NODELAY: Final = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
JSON_CONTENT_TYPE: Final = "application/json"
# The shipped broker's message_size_limit (config/mosquitto.conf.example): backend answers up to it.
DEFAULT_MAX_ANSWER_PAYLOAD: Final = 262144
MAX_CONCURRENT_COMMANDS: Final = 32
# How many timed-out and answered correlations are remembered (late answers, duplicates).
REMEMBERED_CORRELATIONS: Final = 4096
# A clean stop publishes the offline presence within this time, then disconnects.
STOP_PUBLISH_TIMEOUT: Final = 2.0
_REF = re.compile(r"[0-9A-Za-z_-]{1,64}")
_BEIJING = timezone(timedelta(hours=8))


class LinkError(Exception):
    """A publish that could not be completed (not connected within the time given)."""


class AnswerTimeout(TimeoutError):
    """No answer to a backend request in time. ``published``: the broker acknowledged the request
    (when False it may still have reached the broker: the PUBACK can be what was lost)."""

    def __init__(self, ref: str | None, correlation: bytes, timeout: float, published: bool) -> None:
        self.ref = ref
        self.correlation = correlation
        self.timeout = timeout
        self.published = published
        what = f"request {ref}" if ref else "request"
        state = "published" if published else "not acknowledged by the broker"
        super().__init__(f"no answer from the backend to {what} within {timeout:g} s ({state})")


@dataclass(frozen=True)
class Command:
    """One POS message on the cmd topic.

    ``properties_present``: the message carried MQTT 5 properties. A 3.1.1 publisher cannot send
    any, so without a ``response_topic`` the service may take ``reply_to`` from the payload (the
    same namespace rule applies; :meth:`DaemonLink.reply` checks it).
    """

    payload: bytes
    topic: str
    response_topic: str | None
    correlation_data: bytes | None
    content_type: str | None
    user_properties: tuple[tuple[str, str], ...]
    properties_present: bool
    qos: int


@dataclass(frozen=True)
class LateAnswer:
    """A backend answer for a request of this client that no longer waits (timed out, or asked
    before a restart). ``ref`` is the request's reference (``None`` if it had none)."""

    ref: str | None
    correlation: bytes
    payload: bytes


CommandHandler = Callable[[Command], Awaitable[None]]
LateAnswerHandler = Callable[[LateAnswer], Awaitable[None]]


@dataclass
class _Conn:
    client: aiomqtt.Client
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    since: float = field(default_factory=time.monotonic)


def _now_text() -> str:
    return datetime.now(_BEIJING).strftime("%Y-%m-%d %H:%M:%S")


def tls_context(cfg: MqttConfig) -> ssl.SSLContext | None:
    """The TLS context ``[mqtt.tls]`` describes (TLS 1.2 or later), or None without TLS."""
    t = cfg.tls
    if not t.enabled:
        return None
    ctx = ssl.create_default_context(cafile=str(t.ca) if t.ca is not None else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if t.cert is not None and t.key is not None:
        ctx.load_cert_chain(str(t.cert), str(t.key))
    if t.insecure:
        ctx.check_hostname = False
    return ctx


# paho builds two tables in every Properties() and scans every property name on each attribute set:
# under load that was a quarter of the daemon's event-loop time (bench/bench_settle.py). A shallow
# copy of one template shares the (read-only) tables, and the four values are checked here.
_PUBLISH_TEMPLATE: Final = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


def publish_properties(*, response_topic: str | None = None, correlation: bytes | None = None,
                       expiry: int | None = None, content_type: str | None = JSON_CONTENT_TYPE) -> Properties:
    """MQTT 5 PUBLISH properties (Response Topic, Correlation Data, Message Expiry, content type);
    packs exactly as paho's own attribute setting would (tests/test_mqtt_props.py)."""
    props = copy.copy(_PUBLISH_TEMPLATE)
    put = object.__setattr__
    if content_type is not None:
        if not isinstance(content_type, str):
            raise TypeError("content_type must be a string")
        put(props, "ContentType", content_type)
    if response_topic is not None:
        if not isinstance(response_topic, str):
            raise TypeError("response_topic must be a string")
        put(props, "ResponseTopic", response_topic)
    if correlation is not None:
        if not isinstance(correlation, bytes | bytearray):
            raise TypeError("correlation must be bytes")
        put(props, "CorrelationData", bytes(correlation))
    if expiry is not None:
        if isinstance(expiry, bool) or not isinstance(expiry, int) or not 0 <= expiry <= 0xFFFFFFFF:
            raise ValueError("expiry must be 0..4294967295 seconds")
        put(props, "MessageExpiryInterval", expiry)
    return props


def _payload_bytes(msg: aiomqtt.Message) -> bytes:
    p = msg.payload
    if isinstance(p, bytes | bytearray):
        return bytes(p)
    if p is None:
        return b""
    return str(p).encode()


def valid_reply_topic(terminal_id: str, topic: str) -> bool:
    """Whether ``topic`` may receive a POS reply: under ``sscard/v1/term/{id}/reply/``, no
    wildcards, no NUL, no empty level, at most 65535 bytes."""
    prefix = broker.reply_prefix(terminal_id)
    if not topic.startswith(prefix) or len(topic) == len(prefix):
        return False
    rest = topic[len(prefix):]
    if any(c in topic for c in "+#\x00") or "" in rest.split("/"):
        return False
    return len(topic.encode("utf-8")) <= 65535


class DaemonLink:
    """The daemon's MQTT connection. Create it inside the event loop, run :meth:`run` as a task."""

    def __init__(
        self,
        cfg: MqttConfig,
        terminal_id: str,
        *,
        on_command: CommandHandler | None = None,
        on_late_answer: LateAnswerHandler | None = None,
        client_id: str | None = None,
        presence: bool = True,
        max_answer_payload: int | None = None,
        max_concurrent_commands: int = MAX_CONCURRENT_COMMANDS,
    ) -> None:
        if not broker.TERMINAL_ID_RE.fullmatch(terminal_id):
            raise ValueError("the terminal id must be 12 digits")
        self.cfg = cfg
        self.terminal_id = terminal_id
        self.client_id = client_id or cfg.client_id
        self.on_command = on_command
        self.on_late_answer = on_late_answer
        self.presence = presence
        self.max_payload = cfg.max_payload
        self.max_answer_payload = max_answer_payload or max(cfg.max_payload, DEFAULT_MAX_ANSWER_PAYLOAD)
        self.cmd_topic = broker.cmd_topic(terminal_id)
        self.status_topic = broker.status_topic(terminal_id)
        self.events_topic = broker.events_topic(terminal_id)
        self.request_topic = broker.settle_req_topic(terminal_id)
        self.response_topic = broker.settle_resp_topic(terminal_id)
        self._tls = tls_context(cfg)
        self._corr_prefix = f"sscardd/{self.client_id}/".encode()
        self._conn: _Conn | None = None
        self._stop = asyncio.Event()
        self._changed = asyncio.Condition()
        self._pending: dict[bytes, asyncio.Future[bytes]] = {}
        self._timed_out: OrderedDict[bytes, None] = OrderedDict()
        self._answered: OrderedDict[bytes, None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._cmd_sem = asyncio.Semaphore(max_concurrent_commands)
        self.connected_event = asyncio.Event()
        self.last_error: str | None = None
        self.connect_count = 0
        self.dropped_count = 0
        self.connected_since: str | None = None

    # -- state -----------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def message_expiry(self) -> int:
        """The Message Expiry (s) on requests; the envelope's ``exp_time`` should match it."""
        return self.cfg.message_expiry

    def status(self) -> dict[str, Any]:
        """For ``daemon.status``: no secrets."""
        return {"connected": self.connected, "broker": f"{self.cfg.host}:{self.cfg.port}",
                "client_id": self.client_id, "connected_since": self.connected_since,
                "connects": self.connect_count, "last_error": self.last_error,
                "pending_requests": len(self._pending), "dropped_messages": self.dropped_count}

    async def wait_until(self, predicate: Callable[[DaemonLink], bool], timeout: float) -> None:
        """Wait until ``predicate(self)`` holds (checked at every state change); TimeoutError."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def wait_connected(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            await self.connected_event.wait()

    def abort_connection(self) -> bool:
        """Fault injection: shut the socket down without a DISCONNECT, as a crash or a cut cable
        would (the broker then publishes the Last Will); the loop reconnects. False if not connected."""
        conn = self._conn
        sock = conn.client._client.socket() if conn is not None else None
        if not isinstance(sock, socket.socket):
            return False
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        return True

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- the loop --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to publish the offline presence, disconnect cleanly and return."""
        self._stop.set()

    async def run(self) -> None:
        """Connect and serve until :meth:`stop` (returns) or cancellation (re-raised); reconnects
        with jittered exponential backoff and never raises on broker outages."""
        backoff = self.cfg.reconnect_backoff_min
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    await self._session()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # any failure of a connection is retried
                    self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                    log.warning("broker connection lost or refused", error=self.last_error,
                                broker=f"{self.cfg.host}:{self.cfg.port}")
                    await self._notify()
                if self._stop.is_set():
                    break
                if time.monotonic() - started >= self.cfg.reconnect_backoff_max:
                    backoff = self.cfg.reconnect_backoff_min
                delay = min(backoff * random.uniform(0.5, 1.5), self.cfg.reconnect_backoff_max)
                backoff = min(backoff * 2, self.cfg.reconnect_backoff_max)
                log.info("reconnecting", retry_in_s=round(delay, 3))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    def _client(self) -> aiomqtt.Client:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.cfg.session_expiry
        will = None
        if self.presence:
            doc = {"state": "offline", "terminal_id": self.terminal_id}
            will = aiomqtt.Will(self.status_topic, json.dumps(doc).encode(), qos=1, retain=True,
                                properties=publish_properties())
        pw = self.cfg.password.value if self.cfg.password is not None else None
        return aiomqtt.Client(
            self.cfg.host, self.cfg.port,
            username=self.cfg.username,
            password=pw.decode() if isinstance(pw, bytes) else pw,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=props,
            keepalive=self.cfg.keepalive,
            will=will,
            tls_context=self._tls,
            socket_options=[NODELAY],
            timeout=10.0,
        )

    async def _session(self) -> None:
        """One connection: subscribe, announce, serve until lost (raises) or stop (returns)."""
        client = self._client()
        async with client:
            conn = _Conn(client)
            # Commands at QoS 0 on purpose: the broker then queues none for the daemon while it is
            # away (mosquitto's queue_qos0_messages is off), so a sale published meanwhile is never
            # run minutes later against whatever card is in the reader by then. The POS times out
            # and sends it again under the same id, which the journal makes harmless.
            filters = [(self.response_topic, 1)]
            if self.on_command is not None:
                filters.append((self.cmd_topic, 0))
            for topic, qos in filters:
                codes = await client.subscribe(topic, qos=qos)
                for code in codes:
                    value = int(code.value) if hasattr(code, "value") else int(code)
                    if value >= 0x80:
                        raise aiomqtt.MqttError(f"subscription to {topic} refused ({value:#04x})")
            if self.presence:
                doc = {"state": "online", "terminal_id": self.terminal_id, "client_id": self.client_id,
                       "since": _now_text(), "version": __version__}
                await client.publish(self.status_topic, json.dumps(doc).encode(), qos=1, retain=True,
                                     properties=publish_properties())
            self._conn = conn
            self.connect_count += 1
            self.connected_since = _now_text()
            self.last_error = None
            self.connected_event.set()
            log.info("broker connected", broker=f"{self.cfg.host}:{self.cfg.port}",
                     client_id=self.client_id, connects=self.connect_count)
            await self._notify()
            reader = asyncio.create_task(self._read(client))
            stopper = asyncio.create_task(self._stop.wait())
            cancelled = False
            try:
                await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                cancelled = True  # a cancelled run stops cleanly too, then re-raises
            finally:
                stopper.cancel()
                if not reader.done():
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reader
                self._conn = None
                conn.lost.set()
                self.connected_event.clear()
                self.connected_since = None
                await self._notify()
            if (self._stop.is_set() or cancelled) and not client._disconnected.done():
                if self.presence:
                    doc = {"state": "offline", "terminal_id": self.terminal_id, "reason": "shutdown"}
                    with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                        await client.publish(self.status_topic, json.dumps(doc).encode(), qos=1,
                                             retain=True, properties=publish_properties(),
                                             timeout=STOP_PUBLISH_TIMEOUT)
                log.info("broker disconnected (stop)")
            if cancelled:
                raise asyncio.CancelledError
            if self._stop.is_set():
                return
            reader.result()  # raises what ended the connection
            raise aiomqtt.MqttError("message stream ended")

    async def _read(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            try:
                self._dispatch(msg)
            except Exception as exc:  # one bad message must not end the connection
                log.error("message dispatch failed", topic=str(msg.topic), error=type(exc).__name__)

    # -- incoming --------------------------------------------------------------------------------

    def _drop(self, topic: str, reason: str, **kw: Any) -> None:
        self.dropped_count += 1
        log.warning(f"dropped: {reason}", topic=topic, **kw)

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def wrapped() -> None:
            await coro

        task = asyncio.create_task(wrapped())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _dispatch(self, msg: aiomqtt.Message) -> None:
        topic = str(msg.topic)
        payload = _payload_bytes(msg)
        if topic == self.cmd_topic and self.on_command is not None:
            if len(payload) > self.max_payload:
                self._drop(topic, "payload too large", size=len(payload), limit=self.max_payload)
            elif msg.retain:
                self._drop(topic, "retained command", size=len(payload))
            else:
                self._spawn(self._run_command(self._command(msg, topic, payload)))
        elif topic == self.response_topic:
            if len(payload) > self.max_answer_payload:
                self._drop(topic, "payload too large", size=len(payload), limit=self.max_answer_payload)
            elif msg.retain:
                self._drop(topic, "retained answer", size=len(payload))
            else:
                self._on_answer(getattr(msg.properties, "CorrelationData", None), payload)
        else:
            self._drop(topic, "unexpected topic", size=len(payload))

    @staticmethod
    def _command(msg: aiomqtt.Message, topic: str, payload: bytes) -> Command:
        props = msg.properties
        present = props is not None and not props.isEmpty()  # type: ignore[no-untyped-call]
        rt = getattr(props, "ResponseTopic", None) if present else None
        corr = getattr(props, "CorrelationData", None) if present else None
        ct = getattr(props, "ContentType", None) if present else None
        ups = getattr(props, "UserProperty", None) if present else None
        return Command(payload=payload, topic=topic, response_topic=rt if isinstance(rt, str) else None,
                       correlation_data=bytes(corr) if isinstance(corr, bytes | bytearray) else None,
                       content_type=ct if isinstance(ct, str) else None,
                       user_properties=tuple((str(k), str(v)) for k, v in (ups or [])),
                       properties_present=present, qos=msg.qos)

    async def _run_command(self, cmd: Command) -> None:
        assert self.on_command is not None
        async with self._cmd_sem:
            try:
                await self.on_command(cmd)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the handler's failure must not stop the link
                log.error("command handler failed", error=type(exc).__name__)

    @staticmethod
    def _remember(store: OrderedDict[bytes, None], key: bytes) -> None:
        store[key] = None
        store.move_to_end(key)
        while len(store) > REMEMBERED_CORRELATIONS:
            store.popitem(last=False)

    def _ref_of(self, corr: bytes) -> str | None:
        parts = corr[len(self._corr_prefix):].decode("ascii", "replace").split("/")
        return parts[0] if len(parts) == 2 and parts[0] != "-" else None

    def _on_answer(self, corr: object, payload: bytes) -> None:
        if not isinstance(corr, bytes | bytearray):
            log.info("ignored: answer without correlation data", topic=self.response_topic)
            return
        corr = bytes(corr)
        fut = self._pending.get(corr)
        if fut is not None:
            if not fut.done():
                fut.set_result(payload)
            return
        if not corr.startswith(self._corr_prefix):
            log.debug("ignored: answer to another client's request")
            return
        if corr in self._answered:
            log.info("ignored: duplicate answer", ref=self._ref_of(corr))
            return
        self._remember(self._answered, corr)
        ref = self._ref_of(corr)
        log.warning("late answer", ref=ref, after_timeout=corr in self._timed_out)
        self._timed_out.pop(corr, None)
        if self.on_late_answer is not None:
            handler = self.on_late_answer
            late = LateAnswer(ref=ref, correlation=corr, payload=payload)

            async def call() -> None:
                try:
                    await handler(late)
                except Exception as exc:
                    log.error("late-answer handler failed", ref=ref, error=type(exc).__name__)

            self._spawn(call())

    # -- outgoing --------------------------------------------------------------------------------

    async def _current(self) -> _Conn:
        while True:
            conn = self._conn
            if conn is not None:
                return conn
            await self.connected_event.wait()

    async def _publish_on(self, conn: _Conn, topic: str, payload: bytes, *, qos: int = 1,
                          retain: bool = False, properties: Properties | None = None) -> bool:
        """Publish on ``conn``; True once acknowledged, False if the connection was lost first or
        the publish failed (then after waiting a little, so a caller's retry loop cannot spin)."""
        pub = asyncio.create_task(conn.client.publish(topic, payload, qos=qos, retain=retain,
                                                      properties=properties, timeout=math.inf))
        lost = asyncio.create_task(conn.lost.wait())
        try:
            await asyncio.wait({pub, lost}, return_when=asyncio.FIRST_COMPLETED)
            if pub.done() and pub.exception() is None:
                return True
            if pub.done():
                log.info("publish failed", topic=topic, error=type(pub.exception()).__name__)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.cfg.reconnect_backoff_min):
                        await conn.lost.wait()
            return False
        finally:
            for t in (pub, lost):
                if not t.done():
                    t.cancel()
            await asyncio.gather(pub, lost, return_exceptions=True)

    async def _publish(self, topic: str, payload: bytes, timeout: float, **kw: Any) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not await self._publish_on(await self._current(), topic, payload, **kw):
                    pass
        except TimeoutError:
            raise LinkError(f"could not publish to {topic} within {timeout:g} s "
                            f"(last error: {self.last_error})") from None

    async def reply(self, response_topic: str, correlation_data: bytes | None, payload: bytes, *,
                    timeout: float | None = None) -> bool:
        """Publish a POS reply (QoS 1, Correlation Data echoed). False, with a log line and nothing
        published, when ``response_topic`` lies outside this terminal's reply namespace; True once
        the broker acknowledged it; :class:`LinkError` if that took longer than ``timeout``."""
        if not valid_reply_topic(self.terminal_id, response_topic):
            log.warning("refused: response topic outside the terminal's reply namespace",
                        response_topic=response_topic[:200])
            return False
        props = publish_properties(correlation=correlation_data)
        await self._publish(response_topic, payload, timeout or self.cfg.answer_timeout, properties=props)
        return True

    async def publish_event(self, kind: str, payload: Mapping[str, Any], *, timeout: float = 5.0) -> bool:
        """Publish ``{"event": kind, "at": ..., **payload}`` on the events topic (QoS 1, not
        retained). Best effort: False (logged) if not connected or not acknowledged in time."""
        doc = {"event": kind, "at": _now_text(), **payload}
        conn = self._conn
        if conn is None:
            log.info("event not published: not connected", event_kind=kind)
            return False
        try:
            async with asyncio.timeout(timeout):
                ok = await self._publish_on(conn, self.events_topic,
                                            json.dumps(doc, ensure_ascii=False).encode(),
                                            properties=publish_properties())
        except TimeoutError:
            ok = False
        if not ok:
            log.info("event not published", event_kind=kind)
        return ok

    async def request(self, payload: bytes, timeout: float | None = None, *, ref: str | None = None) -> bytes:
        """Send a settlement request to the backend and return its answer's payload.

        ``ref`` (the ``msgid``; ``[0-9A-Za-z_-]{1,64}``) becomes part of the Correlation Data, so a
        late answer can be tied to its journal row. Raises :class:`AnswerTimeout` after ``timeout``
        (default ``mqtt.answer_timeout``) — also when the broker stayed unreachable all along.
        """
        if ref is not None and not _REF.fullmatch(ref):
            raise ValueError("ref must be 1-64 of [0-9A-Za-z_-]")
        timeout = self.cfg.answer_timeout if timeout is None else timeout
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        corr = self._corr_prefix + f"{ref or '-'}/{secrets.token_hex(8)}".encode()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        fut: asyncio.Future[bytes] = loop.create_future()
        self._pending[corr] = fut
        published = False
        try:
            async with asyncio.timeout_at(deadline):
                while not published:
                    conn = await self._current()
                    # The broker must drop the request before the daemon stops waiting for it.
                    expiry = min(self.cfg.message_expiry, math.ceil(deadline - loop.time()) - 1)
                    if expiry < 1:
                        break
                    props = publish_properties(response_topic=self.response_topic, correlation=corr,
                                           expiry=expiry)
                    published = await self._publish_on(conn, self.request_topic, payload, properties=props)
                    if not published and not fut.done():
                        log.info("request not acknowledged; publishing again on the next connection",
                                 ref=ref)
                answer = await asyncio.shield(fut)
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                answer = fut.result()  # arrived in the very last moment
            else:
                self._remember(self._timed_out, corr)
                log.warning("no answer in time", ref=ref, timeout_s=timeout, published=published)
                raise AnswerTimeout(ref, corr, timeout, published) from None
        finally:
            self._pending.pop(corr, None)
        self._remember(self._answered, corr)
        return answer
