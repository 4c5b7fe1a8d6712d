"""``sscardd.mqtt.DaemonLink`` against a real mosquitto configured as shipped (TLS, dynamic
security with the provisioned daemon, POS and backend accounts of terminal A)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiomqtt
import pytest
from structlog.testing import capture_logs

from sscardd import broker
from sscardd.config import MqttConfig, Secret, TlsConfig
from sscardd.mqtt import AnswerTimeout, Command, DaemonLink, LateAnswer, valid_reply_topic
from tests.backend_lab import request_properties
from tests.mqtt_harness import (
    BACKEND,
    TERMINAL_A,
    TERMINAL_B,
    Mosquitto,
    next_message,
    payload_is,
    receive_until,
)

A, B = TERMINAL_A, TERMINAL_B
DA, PA = broker.daemon_username(A), broker.pos_username(A)
WAIT = 10.0


def link_config(mosq: Mosquitto, **overrides: Any) -> MqttConfig:
    values: dict[str, Any] = dict(
        host="127.0.0.1", port=mosq.port, tls=TlsConfig(enabled=True, ca=mosq.ca.ca_cert),
        username=DA, password=Secret(mosq.passwords[DA]), password_file=None,
        # A client id per test: the module's tests share a broker, and a persistent session
        # would carry one test's queued messages into the next.
        client_id=f"{A}-t{uuid.uuid4().hex[:8]}", session_expiry=600, keepalive=30,
        answer_timeout=5.0, message_expiry=4, reconnect_backoff_min=0.05, reconnect_backoff_max=0.5,
        max_payload=65536)
    values.update(overrides)
    return MqttConfig(**values)


@contextlib.asynccontextmanager
async def running(link: DaemonLink) -> AsyncIterator[DaemonLink]:
    task = asyncio.create_task(link.run())
    try:
        await link.wait_connected(WAIT)
        yield link
    finally:
        link.stop()
        async with asyncio.timeout(WAIT):
            await task


class FakeBackend:
    """A backend on the shared subscription that answers each request to its Response Topic with
    its Correlation Data: ``b"echo:" + payload``. With ``hold`` set, requests are only recorded."""

    def __init__(self, mosq: Mosquitto, *, hold: bool = False) -> None:
        self.mosq = mosq
        self.hold = hold
        self.requests: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
        self.client = mosq.client(BACKEND)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FakeBackend:
        await self.client.__aenter__()
        await self.client.subscribe(broker.SETTLE_SHARED_FILTER, qos=1)
        self._task = asyncio.create_task(self._serve())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._task
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)

    async def _serve(self) -> None:
        async for msg in self.client.messages:
            await self.requests.put(msg)
            if not self.hold:
                await self.answer(msg)

    async def answer(self, msg: aiomqtt.Message, *, correlation: bytes | None = None,
                     payload: bytes | None = None) -> None:
        await answer(self.client, msg, correlation=correlation, payload=payload)

    async def next_request(self) -> aiomqtt.Message:
        async with asyncio.timeout(WAIT):
            return await self.requests.get()


async def answer(client: aiomqtt.Client, msg: aiomqtt.Message, *, correlation: bytes | None = None,
                 payload: bytes | None = None) -> None:
    props = msg.properties
    body = payload if payload is not None else b"echo:" + bytes(msg.payload)
    await client.publish(props.ResponseTopic, body, qos=1,  # type: ignore[union-attr]
                         properties=request_properties(None, correlation or props.CorrelationData))  # type: ignore[union-attr]


async def status_until(pos: aiomqtt.Client, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The next status delivery satisfying ``pred`` (earlier ones are skipped)."""
    async with asyncio.timeout(WAIT):
        async for msg in pos.messages:
            if str(msg.topic) == broker.status_topic(A):
                doc: dict[str, Any] = json.loads(bytes(msg.payload))
                if pred(doc):
                    return doc
    raise AssertionError("unreachable")


# -- presence ---------------------------------------------------------------------------------------


async def test_presence_retained_and_last_will_on_abrupt_disconnect(mqtt_broker: Mosquitto) -> None:
    link = DaemonLink(link_config(mqtt_broker), A)
    async with running(link), mqtt_broker.client(PA) as pos:
        conn = link._conn
        assert conn is not None
        sock = conn.client._client.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        await pos.subscribe(broker.status_topic(A), qos=1)
        online = await status_until(pos, lambda d: d.get("client_id") == link.client_id)
        assert online["state"] == "online" and online["terminal_id"] == A
        # The socket dies without DISCONNECT: the broker publishes the retained Last Will...
        assert link.abort_connection()
        offline = await status_until(pos, lambda d: d["state"] == "offline")
        assert offline == {"state": "offline", "terminal_id": A}
        # ...and the loop reconnects on its own and announces itself again.
        await link.wait_until(lambda lk: lk.connect_count >= 2 and lk.connected, WAIT)
        assert (await status_until(pos, lambda d: d["state"] == "online"))["client_id"] == link.client_id
    # A late subscriber sees the retained clean-stop presence.
    async with mqtt_broker.client(PA) as pos:
        await pos.subscribe(broker.status_topic(A), qos=1)
        msg = await next_message(pos)
        assert msg.retain
        assert json.loads(bytes(msg.payload)) == {
            "state": "offline", "terminal_id": A, "reason": "shutdown"}


async def test_cancelled_run_announces_offline(mqtt_broker: Mosquitto) -> None:
    link = DaemonLink(link_config(mqtt_broker), A)
    task = asyncio.create_task(link.run())
    await link.wait_connected(WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not link.connected
    async with mqtt_broker.client(PA) as pos:
        await pos.subscribe(broker.status_topic(A), qos=1)
        doc = json.loads(bytes((await next_message(pos)).payload))
        assert doc["state"] == "offline" and doc["reason"] == "shutdown"


async def test_events_reach_the_pos(mqtt_broker: Mosquitto) -> None:
    link = DaemonLink(link_config(mqtt_broker), A)
    async with running(link), mqtt_broker.client(PA) as pos:
        await pos.subscribe(broker.events_topic(A), qos=1)
        assert await link.publish_event("card.inserted", {"reader": "r0"})
        doc = json.loads(bytes((await next_message(pos)).payload))
        assert doc["event"] == "card.inserted" and doc["reader"] == "r0" and "at" in doc


async def test_bad_credentials_keep_retrying_without_raising(mqtt_broker: Mosquitto) -> None:
    link = DaemonLink(link_config(mqtt_broker, password=Secret("wrong")), A)
    task = asyncio.create_task(link.run())
    try:
        await link.wait_until(lambda lk: lk.last_error is not None, WAIT)
        assert not link.connected and not task.done()
        assert "wrong" not in str(link.last_error)
        with pytest.raises(AnswerTimeout) as info:
            await link.request(b"{}", timeout=1.0)
        assert not info.value.published
    finally:
        link.stop()
        async with asyncio.timeout(WAIT):
            await task


# -- POS side ---------------------------------------------------------------------------------------


async def test_command_reaches_handler_and_reply_reaches_pos(mqtt_broker: Mosquitto) -> None:
    got: asyncio.Queue[Command] = asyncio.Queue()
    link: DaemonLink

    async def handler(cmd: Command) -> None:
        await got.put(cmd)
        assert cmd.response_topic is not None
        assert await link.reply(cmd.response_topic, cmd.correlation_data, b"pong:" + cmd.payload)

    link = DaemonLink(link_config(mqtt_broker), A, on_command=handler)
    reply_topic = broker.reply_prefix(A) + "till-1"
    async with running(link), mqtt_broker.client(PA) as pos:
        await pos.subscribe(reply_topic, qos=1)
        await pos.publish(broker.cmd_topic(A), b'{"id":"1","op":"card.status"}', qos=1,
                          properties=request_properties(reply_topic, b"corr-1"))
        cmd = await asyncio.wait_for(got.get(), WAIT)
        assert cmd.payload == b'{"id":"1","op":"card.status"}'
        assert cmd.correlation_data == b"corr-1" and cmd.properties_present and cmd.qos == 0  # see mqtt.py
        msg = await next_message(pos)
        assert str(msg.topic) == reply_topic
        assert msg.payload == b'pong:{"id":"1","op":"card.status"}'
        assert msg.properties.CorrelationData == b"corr-1"  # type: ignore[union-attr]


@pytest.mark.parametrize("topic", [
    broker.reply_prefix(B) + "till-1",            # another terminal's namespace
    broker.term_topic(A, "replyx/till-1"),        # a look-alike prefix
    broker.reply_prefix(A),                       # the prefix itself
    broker.reply_prefix(A) + "+",                 # wildcards
    broker.reply_prefix(A) + "a//b",              # an empty level
    broker.cmd_topic(A),
])
def test_reply_topic_rule(topic: str) -> None:
    assert not valid_reply_topic(A, topic)
    assert valid_reply_topic(A, broker.reply_prefix(A) + "till-1/x")


async def test_reply_to_a_foreign_topic_is_refused(mqtt_broker: Mosquitto) -> None:
    link = DaemonLink(link_config(mqtt_broker), A, on_command=lambda cmd: asyncio.sleep(0))
    foreign = broker.reply_prefix(B) + "till-1"
    async with running(link), mqtt_broker.client(broker.pos_username(B)) as pos_b:
        await pos_b.subscribe(foreign, qos=1)
        with capture_logs() as logs:
            assert not await link.reply(foreign, b"c", b"stolen reply")
        assert any("refused" in e["event"] for e in logs)
        # Nothing was published: B's POS gets only its own marker (from B's daemon account).
        async with mqtt_broker.client(broker.daemon_username(B)) as daemon_b:
            await daemon_b.publish(foreign, b"marker", qos=1)
        assert await receive_until(pos_b, payload_is(b"marker")) == []


async def test_oversize_command_is_dropped(mqtt_broker: Mosquitto) -> None:
    got: asyncio.Queue[Command] = asyncio.Queue()

    async def handler(cmd: Command) -> None:
        await got.put(cmd)

    link = DaemonLink(link_config(mqtt_broker, max_payload=1024), A, on_command=handler)
    async with running(link), mqtt_broker.client(PA) as pos:
        with capture_logs() as logs:
            await pos.publish(broker.cmd_topic(A), b"x" * 2000, qos=1)
            await pos.publish(broker.cmd_topic(A), b"small", qos=1)
            cmd = await asyncio.wait_for(got.get(), WAIT)
        assert cmd.payload == b"small" and got.empty()
        assert link.dropped_count == 1
        dropped = [e for e in logs if e["event"] == "dropped: payload too large"]
        assert dropped and dropped[0]["size"] == 2000 and dropped[0]["limit"] == 1024
        assert not any("xxxx" in repr(e) for e in logs)


# -- backend side -----------------------------------------------------------------------------------


async def test_request_round_trip(mqtt_broker: Mosquitto) -> None:
    link = DaemonLink(link_config(mqtt_broker), A)
    async with running(link), FakeBackend(mqtt_broker) as backend:
        answers = await asyncio.gather(*(link.request(f"req-{i}".encode(), ref=f"MSG{i}") for i in range(5)))
        assert answers == [f"echo:req-{i}".encode() for i in range(5)]
        msg = await backend.next_request()
        assert str(msg.topic) == broker.settle_req_topic(A) and msg.qos == 1
        props = msg.properties
        assert props.ResponseTopic == broker.settle_resp_topic(A)  # type: ignore[union-attr]
        assert props.CorrelationData.startswith(f"sscardd/{link.client_id}/MSG".encode())  # type: ignore[union-attr]
        # Message Expiry: from config, shorter than the answer timeout.
        assert 1 <= props.MessageExpiryInterval <= 4 < link.cfg.answer_timeout  # type: ignore[union-attr]
        corrs = {(await backend.next_request()).properties.CorrelationData for _ in range(4)}  # type: ignore[union-attr]
        assert len(corrs | {props.CorrelationData}) == 5  # type: ignore[union-attr]


async def test_answers_not_asked_for_are_ignored(mqtt_broker: Mosquitto) -> None:
    """The CLI's client (daemon credentials, client id ``{id}-cli``) shares the response topic with
    its own Correlation Data: each gets its answer; foreign answers reach neither the request nor
    the late-answer callback."""
    late: list[LateAnswer] = []

    async def on_late(answer: LateAnswer) -> None:
        late.append(answer)

    link = DaemonLink(link_config(mqtt_broker), A, on_late_answer=on_late)
    async with running(link), FakeBackend(mqtt_broker, hold=True) as backend, \
            mqtt_broker.client(DA, identifier=broker.cli_client_id(A)) as cli:
        await cli.subscribe(broker.settle_resp_topic(A), qos=1)
        pending = asyncio.create_task(link.request(b"daemon", ref="D1"))
        daemon_req = await backend.next_request()
        # An answer with a correlation nobody asked for, then the CLI's own request and answer.
        await backend.answer(daemon_req, correlation=b"cli/unknown", payload=b"bogus")
        await cli.publish(broker.settle_req_topic(A), b"cli", qos=1,
                          properties=request_properties(broker.settle_resp_topic(A), b"cli/1", 4))
        cli_req = await backend.next_request()
        await backend.answer(cli_req)
        got = [await next_message(cli), await next_message(cli)]
        assert [m.payload for m in got] == [b"bogus", b"echo:cli"]
        assert not pending.done()
        await backend.answer(daemon_req)
        assert await asyncio.wait_for(pending, WAIT) == b"echo:daemon"
        # A duplicate of an answer already delivered is not a late answer either.
        await backend.answer(daemon_req)
        await backend.answer(daemon_req, correlation=b"sscardd/x/y/z")
        marker_req = asyncio.create_task(link.request(b"marker"))
        await backend.answer(await backend.next_request())
        assert await asyncio.wait_for(marker_req, WAIT) == b"echo:marker"
    assert late == []


async def test_timeout_then_late_answer_is_handed_over(mqtt_broker: Mosquitto) -> None:
    late: asyncio.Queue[LateAnswer] = asyncio.Queue()
    link = DaemonLink(link_config(mqtt_broker), A, on_late_answer=late.put)
    async with running(link), FakeBackend(mqtt_broker, hold=True) as backend:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(AnswerTimeout) as info:
            await link.request(b"slow", timeout=2.0, ref="MSG-LATE")
        assert 1.9 <= loop.time() - t0 < 4
        assert isinstance(info.value, TimeoutError) and info.value.published and info.value.ref == "MSG-LATE"
        msg = await backend.next_request()
        assert msg.properties.MessageExpiryInterval == 1  # type: ignore[union-attr]  # ceil(2) - 1
        await backend.answer(msg)
        got = await asyncio.wait_for(late.get(), WAIT)
        assert got.ref == "MSG-LATE" and got.payload == b"echo:slow"
        assert got.correlation == info.value.correlation
        assert link.status()["pending_requests"] == 0


async def test_broker_restart_mid_request_answer_still_delivered(own_mqtt_broker: Mosquitto) -> None:
    """The request reached the backend; the broker restarts; the backend answers while the daemon
    is still away (its reconnect backoff is ≥ 1 s): the answer is queued in the daemon's
    persistent session (persistence on, saved at SIGTERM) and delivered on reconnect."""
    mosq = own_mqtt_broker
    link = DaemonLink(link_config(mosq, reconnect_backoff_min=2.0, reconnect_backoff_max=4.0,
                                  answer_timeout=30.0, message_expiry=10), A)
    async with running(link):
        async with FakeBackend(mosq, hold=True) as backend:
            pending = asyncio.create_task(link.request(b"across", ref="MSG-RESTART"))
            req = await backend.next_request()
        await mosq.async_restart()
        async with mosq.client(BACKEND) as backend_client:
            assert not link.connected and link.connect_count == 1
            await answer(backend_client, req)
        assert await asyncio.wait_for(pending, 20) == b"echo:across"
        assert link.connect_count == 2


async def test_request_while_broker_down_waits_for_the_connection(own_mqtt_broker: Mosquitto) -> None:
    """A request made while the broker is down is published once the daemon is back.

    The backend must be subscribed first: mosquitto 2.0.11 does not queue a shared-subscription
    message for a member that is offline, even one with a persistent session (measured: the
    request is dropped when the daemon reconnects before the backend). The daemon's reconnect
    backoff (≥ 1 s) leaves the backend, which subscribes right after the restart, ample time;
    the test checks that order instead of assuming it."""
    mosq = own_mqtt_broker
    link = DaemonLink(link_config(mosq, answer_timeout=30.0, message_expiry=10,
                                  reconnect_backoff_min=2.0, reconnect_backoff_max=4.0), A)
    async with running(link):
        mosq.stop()
        await link.wait_until(lambda lk: not lk.connected, WAIT)
        pending = asyncio.create_task(link.request(b"queued", ref="MSG-DOWN"))
        await mosq.async_restart()
        async with FakeBackend(mosq) as backend:
            assert not link.connected, "the daemon reconnected before the backend subscribed"
            assert await asyncio.wait_for(pending, 25) == b"echo:queued"
            assert (await backend.next_request()).properties.MessageExpiryInterval <= 10  # type: ignore[union-attr]
        assert link.connect_count == 2
