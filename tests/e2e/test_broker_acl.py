"""The shipped broker security, against a real mosquitto (TLS + dynamic security, as shipped).

Terminals A and B and one backend are provisioned by :func:`sscardd.broker.provision` (what
``sscardd broker-provision`` writes). Every allowed flow of architecture.md works; every forbidden one
achieves nothing: the broker refuses it (SUBACK/PUBACK 0x87) *and* nothing is delivered. Non-delivery
is shown without sleeping: the forbidden message is published with QoS 1 and its PUBACK awaited (the
broker routes before it acknowledges), then an allowed publisher sends a marker to the same receiver,
which must receive the marker and nothing before it (``receive_until``).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sscardd import broker
from sscardd.broker import (
    SETTLE_SHARED_FILTER,
    cli_client_id,
    cmd_topic,
    events_topic,
    reply_prefix,
    settle_req_topic,
    settle_resp_topic,
    status_topic,
)
from tests.mqtt_harness import (
    BACKEND,
    HOST,
    RC_NOT_AUTHORIZED,
    TERMINAL_A,
    TERMINAL_B,
    Mosquitto,
    MosquittoFactory,
    PubackLog,
    login,
    next_message,
    payload_is,
    receive_until,
)

A, B = TERMINAL_A, TERMINAL_B
DA, DB = broker.daemon_username(A), broker.daemon_username(B)
PA, PB = broker.pos_username(A), broker.pos_username(B)


def code(reason: object) -> int:
    return int(getattr(reason, "value", reason))  # type: ignore[call-overload]


def unique(label: str) -> bytes:
    return f"{label}-{uuid.uuid4().hex}".encode()


async def subscribe(client: aiomqtt.Client, topic: str) -> int:
    """The SUBACK reason code of one subscription (QoS 1 asked)."""
    (reason,) = await client.subscribe(topic, qos=1)
    return code(reason)


async def subscribed(client: aiomqtt.Client, topic: str) -> aiomqtt.Client:
    assert await subscribe(client, topic) == 1, f"subscription to {topic} not granted"
    return client


@contextlib.asynccontextmanager
async def clients(mosq: Mosquitto, *usernames: str) -> AsyncIterator[list[aiomqtt.Client]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(mosq.client(u)) for u in usernames]


def request_properties(response_topic: str, correlation: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = response_topic
    props.CorrelationData = correlation
    props.MessageExpiryInterval = 30
    return props


# -- allowed flows --------------------------------------------------------------------------------


async def test_pos_request_reaches_its_daemon(mqtt_broker: Mosquitto) -> None:
    async with clients(mqtt_broker, DA, PA) as (daemon, pos):
        await subscribed(daemon, cmd_topic(A))
        pubacks = PubackLog(pos)
        body = unique("card.status")
        await pos.publish(cmd_topic(A), body, qos=1,
                          properties=request_properties(reply_prefix(A) + "till-1", b"\x01corr"))
        assert pubacks.last == 0
        msg = await next_message(daemon)
        assert (str(msg.topic), msg.payload) == (cmd_topic(A), body)
        assert msg.properties is not None
        assert msg.properties.ResponseTopic == reply_prefix(A) + "till-1"
        assert msg.properties.CorrelationData == b"\x01corr"


async def test_daemon_reply_status_and_events_reach_its_pos(mqtt_broker: Mosquitto) -> None:
    async with clients(mqtt_broker, DA, PA) as (daemon, pos):
        status = unique("online")
        await daemon.publish(status_topic(A), status, qos=1, retain=True)
        try:
            await subscribed(pos, reply_prefix(A) + "#")
            await subscribed(pos, events_topic(A))
            await subscribed(pos, status_topic(A))
            retained = await next_message(pos)  # the retained presence, on subscribing
            assert (str(retained.topic), retained.payload, retained.retain) == (status_topic(A), status, True)
            reply, event = unique("reply"), unique("card inserted")
            await daemon.publish(reply_prefix(A) + "till-1", reply, qos=1)
            await daemon.publish(events_topic(A), event, qos=1)
            got = [await next_message(pos), await next_message(pos)]
            assert [(str(m.topic), m.payload) for m in got] == [
                (reply_prefix(A) + "till-1", reply), (events_topic(A), event)]
        finally:
            await daemon.publish(status_topic(A), b"", qos=1, retain=True)  # clear the retained message


async def test_pos_may_subscribe_to_one_reply_topic(mqtt_broker: Mosquitto) -> None:
    async with clients(mqtt_broker, DA, PA) as (daemon, pos):
        await subscribed(pos, reply_prefix(A) + "till-7")
        body = unique("reply")
        await daemon.publish(reply_prefix(A) + "till-7", body, qos=1)
        assert (await next_message(pos)).payload == body


async def test_settlement_request_reaches_the_backend_through_the_shared_group(
    mqtt_broker: Mosquitto,
) -> None:
    async with clients(mqtt_broker, BACKEND, DA) as (backend, daemon):
        await subscribed(backend, SETTLE_SHARED_FILTER)
        body = unique("2102")
        await daemon.publish(settle_req_topic(A), body, qos=1,
                             properties=request_properties(settle_resp_topic(A), b"msgid-1"))
        msg = await next_message(backend)
        assert (str(msg.topic), msg.payload) == (settle_req_topic(A), body)
        assert msg.properties is not None
        assert msg.properties.ResponseTopic == settle_resp_topic(A)
        assert msg.properties.CorrelationData == b"msgid-1"


async def test_backend_answer_reaches_the_daemon(mqtt_broker: Mosquitto) -> None:
    async with clients(mqtt_broker, DA, BACKEND) as (daemon, backend):
        await subscribed(daemon, settle_resp_topic(A))
        body = unique("answer")
        await backend.publish(settle_resp_topic(A), body, qos=1)
        msg = await next_message(daemon)
        assert (str(msg.topic), msg.payload) == (settle_resp_topic(A), body)


async def test_cli_uses_the_daemon_credentials_under_its_own_client_id(mqtt_broker: Mosquitto) -> None:
    """``{id}-cli`` logs in with the daemon's password beside the running daemon, which stays."""
    async with clients(mqtt_broker, DA, PA, BACKEND) as (daemon, pos, backend):
        await subscribed(daemon, cmd_topic(A))
        await subscribed(backend, SETTLE_SHARED_FILTER)
        async with mqtt_broker.client(DA, identifier=cli_client_id(A)) as cli:
            await subscribed(cli, settle_resp_topic(A))
            body = unique("3201")
            await cli.publish(settle_req_topic(A), body, qos=1)
            assert (await next_message(backend)).payload == body
            answer = unique("3201 answer")
            await backend.publish(settle_resp_topic(A), answer, qos=1)
            assert (await next_message(cli)).payload == answer
        # The daemon's own connection was not taken over.
        body = unique("cmd")
        await pos.publish(cmd_topic(A), body, qos=1)
        assert (await next_message(daemon)).payload == body


# -- forbidden publishes --------------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    """``publisher`` publishes to ``topic``; ``receiver`` (subscribed to ``receiver_filter``) must
    get only the marker that ``marker_from`` (allowed to) publishes afterwards to the same topic."""

    publisher: str
    topic: str
    receiver: str
    receiver_filter: str
    marker_from: str
    retain: bool = False


FORBIDDEN_PUBLISHES = {
    "daemon A to B's cmd": Publish(DA, cmd_topic(B), DB, cmd_topic(B), PB),
    "daemon A to B's reply": Publish(DA, reply_prefix(B) + "till-1", PB, reply_prefix(B) + "#", DB),
    "daemon A to B's status, retained": Publish(DA, status_topic(B), PB, status_topic(B), DB, retain=True),
    "daemon A to B's events": Publish(DA, events_topic(B), PB, events_topic(B), DB),
    "daemon A to B's settle/req": Publish(DA, settle_req_topic(B), BACKEND, SETTLE_SHARED_FILTER, DB),
    "daemon A to B's settle/resp": Publish(DA, settle_resp_topic(B), DB, settle_resp_topic(B), BACKEND),
    "daemon A forging its own settle/resp": Publish(
        DA, settle_resp_topic(A), DA, settle_resp_topic(A), BACKEND),
    "daemon A (or its CLI) posing as its POS": Publish(DA, cmd_topic(A), DA, cmd_topic(A), PA),
    "POS A to B's cmd": Publish(PA, cmd_topic(B), DB, cmd_topic(B), PB),
    "POS A to its settle/req": Publish(PA, settle_req_topic(A), BACKEND, SETTLE_SHARED_FILTER, DA),
    "POS A to B's settle/req": Publish(PA, settle_req_topic(B), BACKEND, SETTLE_SHARED_FILTER, DB),
    "POS A forging a backend answer": Publish(PA, settle_resp_topic(A), DA, settle_resp_topic(A), BACKEND),
    "POS A forging a daemon reply": Publish(PA, reply_prefix(A) + "till-2", PA, reply_prefix(A) + "#", DA),
    "POS A forging presence": Publish(PA, status_topic(A), PA, status_topic(A), DA, retain=True),
    "backend to a cmd": Publish(BACKEND, cmd_topic(A), DA, cmd_topic(A), PA),
    "backend to a settle/req": Publish(BACKEND, settle_req_topic(A), BACKEND, SETTLE_SHARED_FILTER, DA),
}


@pytest.mark.parametrize("case", FORBIDDEN_PUBLISHES.values(), ids=FORBIDDEN_PUBLISHES.keys())
async def test_forbidden_publish_is_refused_and_not_delivered(mqtt_broker: Mosquitto, case: Publish) -> None:
    async with clients(mqtt_broker, case.receiver, case.publisher, case.marker_from) as (
        receiver, publisher, marker_from
    ):
        await subscribed(receiver, case.receiver_filter)
        pubacks = PubackLog(publisher)
        forbidden = unique("forbidden")
        await publisher.publish(case.topic, forbidden, qos=1, retain=case.retain)
        assert pubacks.last == RC_NOT_AUTHORIZED
        marker = unique("marker")
        await marker_from.publish(case.topic, marker, qos=1)
        assert await receive_until(receiver, payload_is(marker)) == []
    if case.retain:
        # Nothing was retained either: a new subscriber gets no retained message, only the marker.
        async with clients(mqtt_broker, case.receiver, case.marker_from) as (receiver, marker_from):
            await subscribed(receiver, case.receiver_filter)
            marker = unique("marker")
            await marker_from.publish(case.topic, marker, qos=1)
            assert await receive_until(receiver, payload_is(marker)) == []


# -- forbidden subscriptions ----------------------------------------------------------------------

FORBIDDEN_SUBSCRIPTIONS = {
    DA: [
        cmd_topic(B), settle_resp_topic(B), reply_prefix(B) + "#", status_topic(B), events_topic(B),
        reply_prefix(A) + "#", status_topic(A),
        "sscard/v1/term/+/cmd", "sscard/v1/term/+/settle/resp", "sscard/v1/term/#", "sscard/v1/#", "#", "+/#",
        settle_req_topic(A), settle_req_topic(B), "sscard/v1/settle/req/+", "sscard/v1/settle/#",
        SETTLE_SHARED_FILTER, f"$share/settle/sscard/v1/settle/req/{B}",
        "$share/other/sscard/v1/settle/req/+",
        f"$share/x/{cmd_topic(B)}", "$SYS/#", "$CONTROL/dynamic-security/#",
    ],
    PA: [
        cmd_topic(A), cmd_topic(B), reply_prefix(B) + "#", "sscard/v1/term/+/reply/#", status_topic(B),
        settle_resp_topic(A), settle_req_topic(A), SETTLE_SHARED_FILTER, "#",
    ],
    BACKEND: [cmd_topic(A), reply_prefix(A) + "#", "sscard/v1/settle/req/+", settle_resp_topic(A), "#"],
}


@pytest.mark.parametrize("username", list(FORBIDDEN_SUBSCRIPTIONS))
async def test_forbidden_subscriptions_are_refused(mqtt_broker: Mosquitto, username: str) -> None:
    async with mqtt_broker.client(username) as client:
        refused = {topic: await subscribe(client, topic) for topic in FORBIDDEN_SUBSCRIPTIONS[username]}
    assert refused == {topic: RC_NOT_AUTHORIZED for topic in FORBIDDEN_SUBSCRIPTIONS[username]}


async def test_refused_subscriptions_deliver_nothing(mqtt_broker: Mosquitto) -> None:
    """After trying every forbidden filter, terminal A's daemon sees none of B's traffic."""
    async with clients(mqtt_broker, DA, PA, DB, PB, BACKEND) as (daemon_a, pos_a, daemon_b, pos_b, backend):
        await subscribed(daemon_a, cmd_topic(A))
        for topic in FORBIDDEN_SUBSCRIPTIONS[DA]:
            assert await subscribe(daemon_a, topic) == RC_NOT_AUTHORIZED
        await subscribed(backend, SETTLE_SHARED_FILTER)
        await pos_b.publish(cmd_topic(B), unique("B cmd"), qos=1)
        await daemon_b.publish(reply_prefix(B) + "till-1", unique("B reply"), qos=1)
        await daemon_b.publish(events_topic(B), unique("B event"), qos=1)
        await daemon_b.publish(settle_req_topic(B), unique("B 2102"), qos=1)
        await backend.publish(settle_resp_topic(B), unique("B answer"), qos=1)
        await daemon_a.publish(settle_req_topic(A), unique("A's own 2102"), qos=1)
        marker = unique("marker")
        await pos_a.publish(cmd_topic(A), marker, qos=1)
        assert await receive_until(daemon_a, payload_is(marker)) == []


@pytest.mark.parametrize("intruder", [DA, PA])
async def test_terminal_cannot_join_the_backends_shared_group(mqtt_broker: Mosquitto, intruder: str) -> None:
    """With an ACL file a terminal could join the group and take a share (measured: 5 of 10);
    dynamic security refuses the subscription, and the backend gets every request."""
    n = 20
    async with clients(mqtt_broker, BACKEND, intruder, DB, PA) as (backend, attacker, daemon_b, pos_a):
        await subscribed(backend, SETTLE_SHARED_FILTER)
        for topic in (SETTLE_SHARED_FILTER, "$share/other/sscard/v1/settle/req/+",
                      f"$share/settle/sscard/v1/settle/req/{B}"):
            assert await subscribe(attacker, topic) == RC_NOT_AUTHORIZED
        # Something the intruder may receive, for the marker.
        own = cmd_topic(A) if intruder == DA else reply_prefix(A) + "#"
        await subscribed(attacker, own)
        requests = [unique(f"2102 #{i}") for i in range(n)]
        for body in requests:
            await daemon_b.publish(settle_req_topic(B), body, qos=1)
        got = [await next_message(backend) for _ in range(n)]
        assert [m.payload for m in got] == requests
        marker = unique("marker")
        if intruder == DA:
            await pos_a.publish(cmd_topic(A), marker, qos=1)
        else:
            async with mqtt_broker.client(DA) as daemon_a:
                await daemon_a.publish(reply_prefix(A) + "till-1", marker, qos=1)
        assert await receive_until(attacker, payload_is(marker)) == []


# -- sessions and client ids ----------------------------------------------------------------------


async def test_another_terminal_taking_over_a_daemon_session_receives_nothing(mqtt_broker: Mosquitto) -> None:
    """A client id is not bound to a username (the daemon's cannot be pinned: the CLI shares its
    user). Terminal A connecting under B's daemon client id inherits B's session, but mosquitto
    re-checks the queued messages against A's ACL and drops them: A reads nothing (B loses what
    was queued — a denial of service the journal and the POS's retries absorb)."""
    session = f"daemon-{B}-{uuid.uuid4().hex[:8]}"
    async with mqtt_broker.client(DB, identifier=session, clean_start=False, session_expiry=300) as daemon_b:
        await subscribed(daemon_b, cmd_topic(B))
    async with mqtt_broker.client(PB) as pos_b:
        for i in range(3):
            await pos_b.publish(cmd_topic(B), unique(f"queued #{i}"), qos=1)
    async with mqtt_broker.client(DA, identifier=session, clean_start=False, session_expiry=300) as intruder:
        # The inherited subscription to B's cmd delivers nothing either.
        await subscribed(intruder, cmd_topic(A))
        async with mqtt_broker.client(PB) as pos_b:
            await pos_b.publish(cmd_topic(B), unique("while taken over"), qos=1)
        marker = unique("marker")
        async with mqtt_broker.client(PA) as pos_a:
            await pos_a.publish(cmd_topic(A), marker, qos=1)
        assert await receive_until(intruder, payload_is(marker)) == []
    # B takes its session back and is served again.
    async with mqtt_broker.client(DB, identifier=session, clean_start=False, session_expiry=300) as daemon_b:
        body = unique("after")
        async with mqtt_broker.client(PB) as pos_b:
            await pos_b.publish(cmd_topic(B), body, qos=1)
        # Measured on 2.0.11: what was queued for B before and during the takeover is gone.
        await receive_until(daemon_b, payload_is(body))
    async with mqtt_broker.client(DB, identifier=session, session_expiry=0):
        pass  # clean start: the session is gone


async def test_pinning_binds_a_username_to_one_client_id(mosquitto_factory: MosquittoFactory) -> None:
    """``pos_client_id`` pins the POS user: another client id is refused. The pin binds the
    username, not the client id: another user may still log in under that client id."""
    mosq = mosquitto_factory("pinned", terminals=[broker.TerminalSpec(A, pos_client_id="till-1")])
    try:
        async with mosq.client(PA, identifier="till-1") as pos:
            await subscribed(pos, reply_prefix(A) + "#")
        with pytest.raises(aiomqtt.MqttError) as refused:
            async with mosq.client(PA, identifier="till-2"):
                pass
        assert code(getattr(refused.value, "rc", None)) == RC_NOT_AUTHORIZED
        async with mosq.client(DA, identifier="till-1"):
            pass
    finally:
        mosq.stop()


# -- authentication and transport -----------------------------------------------------------------


@pytest.mark.parametrize(("username", "password"), [
    (DA, "wrong password"),
    (DA, ""),
    (DA, "<pos>"),  # the POS's password for the daemon's user
    ("nobody", "<pos>"),
    (DA.upper(), "<daemon>"),
])
async def test_wrong_credentials_are_refused(mqtt_broker: Mosquitto, username: str, password: str) -> None:
    known = {"<pos>": mqtt_broker.passwords[PA], "<daemon>": mqtt_broker.passwords[DA]}
    password = known.get(password, password)
    with pytest.raises(aiomqtt.MqttError) as refused:
        async with mqtt_broker.client(username, password=password):
            pass
    # mosquitto 2.0.11 answers 0x87 (not 0x86, "bad user name or password") to every refused login.
    assert code(getattr(refused.value, "rc", None)) == RC_NOT_AUTHORIZED


async def test_anonymous_is_refused(mqtt_broker: Mosquitto) -> None:
    with pytest.raises(aiomqtt.MqttError) as refused:
        async with mqtt_broker.client(None):
            pass
    assert code(getattr(refused.value, "rc", None)) == RC_NOT_AUTHORIZED


def mqtt5_connect(client_id: str, username: str, password: str) -> bytes:
    def field(b: bytes) -> bytes:
        return len(b).to_bytes(2, "big") + b

    variable = field(b"MQTT") + bytes([5, 0xC2]) + (30).to_bytes(2, "big") + b"\x00"  # user, pw, clean
    body = variable + field(client_id.encode()) + field(username.encode()) + field(password.encode())
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


def test_plaintext_mqtt_is_impossible(mqtt_broker: Mosquitto) -> None:
    """The only listener is the TLS one; a plaintext CONNECT with valid credentials gets no CONNACK."""
    assert mqtt_broker.listening_ports() == {mqtt_broker.port}
    with socket.create_connection((HOST, mqtt_broker.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(mqtt5_connect("plain-1", DA, mqtt_broker.passwords[DA]))
        try:
            answer = sock.recv(16)
        except ConnectionResetError:
            answer = b""
    assert answer == b"" or answer[0] >> 4 != 2, f"a CONNACK over plaintext: {answer.hex()}"


async def test_client_verifies_the_broker_certificate(mqtt_broker: Mosquitto) -> None:
    """A client that trusts only the system CAs does not accept the test broker's certificate."""
    with pytest.raises(aiomqtt.MqttError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        async with mqtt_broker.client(DA, context=ssl.create_default_context(), timeout=5):
            pass


# -- Last Will ------------------------------------------------------------------------------------


def vanish_with_will(mosq: Mosquitto, username: str, topic: str, payload: bytes) -> None:
    """Log in with a retained Last Will on ``topic``, drop the connection, wait until the broker
    has handled the drop (the Will, if allowed, is queued by then)."""
    client_id = f"vanish-{uuid.uuid4().hex[:12]}"
    assert login(mosq.port, username, mosq.passwords[username], context=mosq.ca.client_context(),
                 client_id=client_id, will=(topic, payload, True), vanish=True) == 0
    mosq.wait_log(f"Client {client_id} closed its connection")


async def test_daemon_last_will_reaches_its_pos(mqtt_broker: Mosquitto) -> None:
    async with mqtt_broker.client(PA) as pos:
        await subscribed(pos, status_topic(A))
        offline = unique("offline")
        vanish_with_will(mqtt_broker, DA, status_topic(A), offline)
        msg = await next_message(pos)
        assert (str(msg.topic), msg.payload) == (status_topic(A), offline)
    async with mqtt_broker.client(DA) as daemon:
        await daemon.publish(status_topic(A), b"", qos=1, retain=True)


async def test_last_will_on_another_terminal_status_is_not_published(mqtt_broker: Mosquitto) -> None:
    """The Will's topic is checked when the broker would publish it: a Will on B's presence topic
    from terminal A is dropped (not delivered, not retained)."""
    async with clients(mqtt_broker, PB, DB) as (pos_b, daemon_b):
        await subscribed(pos_b, status_topic(B))
        vanish_with_will(mqtt_broker, DA, status_topic(B), unique("spoofed offline"))
        marker = unique("marker")
        await daemon_b.publish(status_topic(B), marker, qos=1)
        assert await receive_until(pos_b, payload_is(marker)) == []
    async with clients(mqtt_broker, PB, DB) as (pos_b, daemon_b):
        await subscribed(pos_b, status_topic(B))
        marker = unique("marker")
        await daemon_b.publish(status_topic(B), marker, qos=1)
        assert await receive_until(pos_b, payload_is(marker)) == []
