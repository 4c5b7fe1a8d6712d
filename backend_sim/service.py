"""The MQTT side: consume the shared request subscription, answer to the requesting terminal.

* Requests: ``sscard/v1/settle/req/{terminal_id}`` through ``$share/settle/sscard/v1/settle/req/+``
  (MQTT 5, QoS 1, TCP_NODELAY). The terminal id is the topic's last level.
* The answer goes only to the request's Response Topic, which must be exactly
  ``sscard/v1/term/{terminal_id}/settle/resp`` for that terminal; anything else (or none) is
  dropped with a log line, nothing processed. Correlation Data is echoed. QoS 1.
* Each request runs in its own task (a held request does not stop the others); the ledger runs in
  one worker thread per instance. The MQTT session is clean: an instance that goes away leaves its
  share of the subscription to the others.
* Optional (``--control``), for tests: fault controls over ``sscard/v1/settle/ctl`` (shared group
  ``settle-ctl``), answered on a Response Topic under ``sscard/v1/settle/ctl/resp/``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import json
import os
import random
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from backend_sim import envelope as env_mod
from backend_sim.errors import Refusal
from backend_sim.faults import Faults
from backend_sim.ledger import Ledger, Result

REQUEST_FILTER = "$share/settle/sscard/v1/settle/req/+"
REQUEST_PREFIX = "sscard/v1/settle/req/"
CONTROL_TOPIC = "sscard/v1/settle/ctl"
CONTROL_FILTER = "$share/settle-ctl/" + CONTROL_TOPIC
CONTROL_REPLY_PREFIX = "sscard/v1/settle/ctl/resp/"
MAX_IN_FLIGHT = 256
HOLD_POLL_S = 0.01
_ANSWER_PROPERTIES = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
# An answer whose connection was lost waits this long for the next one (the request's own expiry
# is long past by then for any sane configuration; the daemon then reverses).
ANSWER_RECONNECT_WAIT_S = 10.0

log = structlog.get_logger("backend_sim")
T = TypeVar("T")


def response_topic_for(terminal_id: str) -> str:
    return f"sscard/v1/term/{terminal_id}/settle/resp"


def terminal_of(topic: str) -> str | None:
    """The terminal id of a request topic, or None when the topic is not one."""
    if not topic.startswith(REQUEST_PREFIX):
        return None
    tid = topic[len(REQUEST_PREFIX):]
    return tid if tid and "/" not in tid else None


def check_response_topic(terminal_id: str, response_topic: str | None) -> bool:
    return response_topic is not None and response_topic == response_topic_for(terminal_id)


@dataclass(frozen=True)
class BrokerSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    client_id: str | None = None

    def tls_context(self) -> ssl.SSLContext | None:
        if self.tls_ca is None and self.tls_cert is None:
            return None
        ctx = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx


class Backend:
    """One backend instance: an MQTT client in front of the shared ledger."""

    def __init__(self, ledger: Ledger, broker: BrokerSettings, *, instance: str, control: bool = False,
                 on_ready: Callable[[], None] | None = None) -> None:
        self.ledger = ledger
        self.faults = Faults(ledger.path)
        self.broker = broker
        self.instance = instance
        self.control = control
        self.on_ready = on_ready
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._sem = asyncio.Semaphore(MAX_IN_FLIGHT)
        # The live connection: answers go out on it, also for requests that came in on an earlier
        # one (a held or slow request outlives a broker restart).
        self._live: aiomqtt.Client | None = None
        self._live_changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def _client(self) -> aiomqtt.Client:
        b = self.broker
        return aiomqtt.Client(
            b.host, b.port, username=b.username, password=b.password,
            identifier=b.client_id or f"sscard-backend-{self.instance}",
            protocol=aiomqtt.ProtocolVersion.V5, clean_start=True, keepalive=30,
            tls_context=b.tls_context(),
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )

    async def run(self) -> None:
        """Serve until cancelled; reconnects with jittered exponential backoff."""
        backoff = 0.1
        try:
            while True:
                try:
                    async with self._client() as client:
                        await client.subscribe(REQUEST_FILTER, qos=1)
                        if self.control:
                            await client.subscribe(CONTROL_FILTER, qos=1)
                        backoff = 0.1
                        await self._set_live(client)
                        log.info("ready", instance=self.instance, control=self.control,
                                 broker=f"{self.broker.host}:{self.broker.port}")
                        if self.on_ready is not None:
                            self.on_ready()
                        async for msg in client.messages:
                            await self._sem.acquire()
                            task = asyncio.create_task(self._dispatch(client, msg))
                            self._tasks.add(task)
                            task.add_done_callback(self._done)
                except aiomqtt.MqttError as exc:
                    await self._set_live(None)
                    delay = backoff * (0.5 + random.random())
                    log.warning("broker connection lost", error=str(exc), retry_in_s=round(delay, 2))
                    await asyncio.sleep(delay)
                    backoff = min(backoff * 2, 10.0)
        finally:
            for t in list(self._tasks):
                t.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self._pool.shutdown(wait=True)
            self.faults.close()

    async def _set_live(self, client: aiomqtt.Client | None) -> None:
        async with self._live_changed:
            self._live = client
            self._live_changed.notify_all()

    async def _live_client(self, failed: aiomqtt.Client | None) -> aiomqtt.Client | None:
        """The live connection other than ``failed``, waiting for a reconnect if need be."""
        try:
            async with asyncio.timeout(ANSWER_RECONNECT_WAIT_S), self._live_changed:
                await self._live_changed.wait_for(lambda: self._live is not None and self._live is not failed)
                return self._live
        except TimeoutError:
            return None

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._sem.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("request task failed", error=repr(task.exception()))

    async def _dispatch(self, client: aiomqtt.Client, msg: aiomqtt.Message) -> None:
        topic = str(msg.topic)
        raw = msg.payload
        payload = raw if isinstance(raw, bytes | bytearray) else str(raw or "").encode()
        props = msg.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        if topic == CONTROL_TOPIC:
            await self._control(client, bytes(payload), response_topic, correlation)
            return
        terminal_id = terminal_of(topic)
        if terminal_id is None:
            log.warning("dropped: not a request topic", topic=topic[:120])
            return
        if not check_response_topic(terminal_id, response_topic):
            log.warning("dropped: response topic is not the terminal's", terminal_id=terminal_id,
                        response_topic=(response_topic or "")[:120], expected=response_topic_for(terminal_id))
            return
        await self._request(client, terminal_id, bytes(payload), str(response_topic), correlation)

    async def _request(self, client: aiomqtt.Client, terminal_id: str, payload: bytes, response_topic: str,
                       correlation: bytes | None) -> None:
        infno, msgid = _peek(payload)
        try:
            # One hop to the ledger thread in the usual case (no fault armed): the check, the
            # transaction and the check for answer faults together.
            armed, quick = await self._db(self._quick_handle, terminal_id, payload)
            if armed:
                fault = await self._db(self.faults.take, "fail", infno, terminal_id)
                if fault is not None:
                    now = env_mod.now_beijing()
                    ans = env_mod.answer(msgid=msgid, infno=infno, refmsgid="INJECTED", now=now,
                                         refusal=Refusal("INJECTED_FAILURE", f"fault {fault.id}"),
                                         final=False)
                    log.info("request", instance=self.instance, terminal_id=terminal_id, infno=infno,
                             msgid=msgid, infcode=-1, err_code="INJECTED_FAILURE")
                    await self._publish(client, response_topic, json.dumps(ans, ensure_ascii=False).encode(),
                                        correlation, replayed=False)
                    return
                if await self._db(self.faults.take, "hold", infno, terminal_id) is not None:
                    await self._hold("hold", terminal_id, msgid, infno)
                result: Result = await self._db(self.ledger.handle, terminal_id, payload)
                answer_faults = True
            else:
                assert quick is not None
                result, answer_faults = quick
        except Exception as exc:  # a ledger failure: nothing was committed, the sender may resend
            log.error("request failed", terminal_id=terminal_id, infno=infno, msgid=msgid,
                      error=repr(exc)[:200])
            refusal = Refusal("INTERNAL_ERROR", "nothing was booked; the request may be resent")
            ans = env_mod.answer(msgid=msgid, infno=infno, refmsgid="ERROR", now=env_mod.now_beijing(),
                                 refusal=refusal, final=False)
            await self._publish(client, response_topic, json.dumps(ans, ensure_ascii=False).encode(),
                                correlation, replayed=False)
            return
        self._log_result(terminal_id, result)
        if answer_faults:
            await self._answer_faults(client, terminal_id, infno, msgid, result, response_topic, correlation)
        else:
            await self._publish(client, response_topic, result.answer, correlation, replayed=result.replayed)

    def _quick_handle(self, terminal_id: str, payload: bytes) -> tuple[bool, tuple[Result, bool] | None]:
        """(ledger thread) With no fault armed: the transaction, and whether an answer fault was
        armed meanwhile. With one armed: nothing done, the caller takes the slow path."""
        if self.faults.armed():
            return True, None
        result = self.ledger.handle(terminal_id, payload)
        return False, (result, self.faults.armed())

    def _log_result(self, terminal_id: str, result: Result) -> None:
        level = "warning" if result.alarm else "info"
        getattr(log, level)(
            "ALARM: msgid reused with a different body" if result.alarm else "request",
            instance=self.instance, terminal_id=terminal_id, infno=result.infno, msgid=result.msgid,
            infcode=result.infcode, err_code=result.err_code, replayed=result.replayed)

    async def _answer_faults(self, client: aiomqtt.Client, terminal_id: str, infno: str | None,
                             msgid: str | None, result: Result, response_topic: str,
                             correlation: bytes | None) -> None:
        if await self._db(self.faults.armed):
            if await self._db(self.faults.take, "hold_answer", infno, terminal_id) is not None:
                await self._hold("hold_answer", terminal_id, msgid, infno)
            delay = await self._db(self.faults.take, "delay", infno, terminal_id)
            if delay is not None:
                log.info("answer delayed", terminal_id=terminal_id, msgid=msgid, seconds=delay.seconds)
                await asyncio.sleep(delay.seconds)
            if await self._db(self.faults.take, "drop", infno, terminal_id) is not None:
                log.info("answer dropped (fault)", terminal_id=terminal_id, msgid=msgid, infno=infno)
                return
        await self._publish(client, response_topic, result.answer, correlation, replayed=result.replayed)

    async def _hold(self, kind: str, terminal_id: str, msgid: str | None, infno: str | None) -> None:
        held_id = await self._db(self.faults.hold, kind, terminal_id, msgid, infno, self.instance)
        log.info("held (fault)", kind=kind, terminal_id=terminal_id, msgid=msgid, infno=infno,
                 held_id=held_id)
        while not await self._db(self.faults.is_released, held_id):
            await asyncio.sleep(HOLD_POLL_S)
        log.info("released", kind=kind, terminal_id=terminal_id, msgid=msgid, held_id=held_id)

    async def _publish(self, client: aiomqtt.Client, topic: str, body: bytes, correlation: bytes | None,
                       *, replayed: bool) -> None:
        # A shallow copy of one template, values set past paho's setters: paho builds two tables
        # per Properties() and scans every property name per set, a good part of the answer path.
        props = copy.copy(_ANSWER_PROPERTIES)
        put = object.__setattr__
        if correlation is not None:
            put(props, "CorrelationData", bytes(correlation))
        put(props, "UserProperty", [("sscard-backend", self.instance),
                                    ("sscard-replayed", "1" if replayed else "0")])
        put(props, "ContentType", "application/json")
        current = self._live or client
        for attempt in range(2):
            try:
                await current.publish(topic, body, qos=1, properties=props)
                return
            except aiomqtt.MqttError as exc:
                error = str(exc)
            nxt = await self._live_client(current) if attempt == 0 else None
            if nxt is None:
                break
            current = nxt
        log.warning("answer not published", topic=topic, error=error)

    async def _control(self, client: aiomqtt.Client, payload: bytes, response_topic: str | None,
                       correlation: bytes | None) -> None:
        if response_topic is not None and not response_topic.startswith(CONTROL_REPLY_PREFIX):
            log.warning("dropped control message: response topic outside the control namespace")
            return
        doc: Any = None
        try:
            doc = json.loads(payload)
            if not isinstance(doc, dict):
                raise ValueError("the control message must be a JSON object")
            result = await self._db(control_command, self.faults, doc)
            reply: dict[str, Any] = {"ok": True, "result": result}
        except (ValueError, TypeError, KeyError) as exc:
            reply = {"ok": False, "error": str(exc)}
        log.info("control", op=str(doc.get("op")) if isinstance(doc, dict) else None, ok=reply["ok"])
        if response_topic is not None:
            await self._publish(client, response_topic, json.dumps(reply).encode(), correlation,
                                replayed=False)


def control_command(faults: Faults, doc: dict[str, Any]) -> Any:
    """One control command (the MQTT control topic and ``sscard-backend fault`` share it)."""
    op = doc.get("op")
    opt = {k: doc[k] for k in ("infno", "terminal_id") if doc.get(k) is not None}
    for k, v in opt.items():
        if not isinstance(v, str):
            raise ValueError(f"{k} must be a string")
    if op == "arm":
        count, seconds = doc.get("count", 1), doc.get("seconds", 0)
        if not isinstance(count, int) or isinstance(count, bool) or not isinstance(seconds, int | float):
            raise ValueError("count must be an integer and seconds a number")
        return {"id": faults.arm(str(doc.get("kind")), count=count, seconds=float(seconds), **opt)}
    if op == "release":
        msgid, kind = doc.get("msgid"), doc.get("kind")
        return {"released": faults.release(msgid=msgid if isinstance(msgid, str) else None,
                                           kind=kind if isinstance(kind, str) else None, **opt)}
    if op == "clear":
        return {"released": faults.clear()}
    if op == "held":
        return faults.held()
    if op == "list":
        return faults.faults()
    raise ValueError("op must be arm, release, clear, held or list")


def _peek(payload: bytes) -> tuple[str | None, str | None]:
    """``(infno, msgid)`` for fault matching and logs; None where the payload does not say."""
    try:
        doc = json.loads(payload) if len(payload) <= env_mod.MAX_REQUEST_BYTES else None
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        return None, None
    infno, msgid = doc.get("infno"), doc.get("msgid")
    return (infno if isinstance(infno, str) and len(infno) <= 8 else None,
            msgid if isinstance(msgid, str) and len(msgid) <= 64 else None)


def sd_notify(state: str) -> None:
    """systemd readiness (Type=notify) when NOTIFY_SOCKET is set; silent otherwise."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), addr)
