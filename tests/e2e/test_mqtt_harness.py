"""The mosquitto harness itself, and the broker behaviours architecture.md's notes rely on
(measured on mosquitto 2.0.11 with the dynamic-security plugin)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from sscardd import broker
from sscardd.cli import main
from tests.mqtt_harness import (
    RC_NOT_AUTHORIZED,
    TERMINAL_A,
    Mosquitto,
    MosquittoFactory,
    MosquittoUnavailable,
    login,
    next_message,
    payload_is,
    receive_until,
)

A = TERMINAL_A
C = "370212000003"
DA, PA = broker.daemon_username(A), broker.pos_username(A)


def can_login(mosq: Mosquitto, username: str, password: str) -> int:
    return login(mosq.port, username, password, context=mosq.ca.client_context())


def test_unreadable_dynsec_file_starts_a_broker_that_refuses_every_login(
    mosquitto_factory: MosquittoFactory,
) -> None:
    """Readiness must log in: the broker starts and accepts TLS, then refuses everyone."""
    mosq = mosquitto_factory("unreadable", start=False)
    mosq.dynsec = mosq.workdir / "missing" / "dynsec.json"
    with pytest.raises(MosquittoUnavailable, match=r"TLS and TCP up, but the login .* was refused"):
        mosq.start(timeout=1)
    assert not mosq.running
    assert "Error loading Dynamic security plugin config" in mosq.log_text()


def test_sighup_does_not_reload_the_dynsec_file(own_mqtt_broker: Mosquitto) -> None:
    mosq = own_mqtt_broker
    old = mosq.passwords[DA]
    result = broker.provision([broker.TerminalSpec(A, daemon_password="the new daemon password")],
                              [broker.BackendSpec("backend-1")], existing=json.loads(mosq.dynsec.read_text()))
    broker.write_dynsec(mosq.dynsec, result.config)
    assert mosq.pid is not None
    os.kill(mosq.pid, signal.SIGHUP)
    mosq.wait_log("Reloading config")
    assert can_login(mosq, DA, old) == 0
    assert can_login(mosq, DA, "the new daemon password") == RC_NOT_AUTHORIZED
    mosq.restart()
    assert can_login(mosq, DA, "the new daemon password") == 0
    assert can_login(mosq, DA, old) == RC_NOT_AUTHORIZED


def test_plaintext_password_in_the_file_is_refused_silently(own_mqtt_broker: Mosquitto) -> None:
    mosq = own_mqtt_broker
    config = json.loads(mosq.dynsec.read_text())
    for client in config["clients"]:
        if client["username"] == DA:
            for key in ("salt", "iterations"):
                del client[key]
            client["password"] = "plain-text-password"
    mosq.dynsec.write_text(json.dumps(config))
    mosq.restart()  # ready: other clients still log in
    assert can_login(mosq, DA, "plain-text-password") == RC_NOT_AUTHORIZED
    assert can_login(mosq, PA, mosq.passwords[PA]) == 0


async def test_restart_keeps_persistent_sessions(own_mqtt_broker: Mosquitto) -> None:
    """A daemon's persistent session (clean start off, session expiry) and a QoS 1 request queued
    for it survive a broker restart (persistence on, saved at SIGTERM)."""
    mosq = own_mqtt_broker
    session = f"{A}-daemon"
    async with mosq.client(DA, identifier=session, clean_start=False, session_expiry=600) as daemon:
        (granted,) = await daemon.subscribe(broker.cmd_topic(A), qos=1)
        assert granted.value == 1
    async with mosq.client(PA) as pos:
        await pos.publish(broker.cmd_topic(A), b"queued before the restart", qos=1)
    old_pid = mosq.pid
    await mosq.async_restart()
    assert mosq.pid != old_pid
    async with mosq.client(DA, identifier=session, clean_start=False, session_expiry=600) as daemon:
        msg = await next_message(daemon)
        assert msg.payload == b"queued before the restart"
        async with mosq.client(PA) as pos:
            await pos.publish(broker.cmd_topic(A), b"after", qos=1)
        assert await receive_until(daemon, payload_is(b"after")) == []


async def test_connected_clients_see_the_restart(own_mqtt_broker: Mosquitto) -> None:
    import aiomqtt

    mosq = own_mqtt_broker
    async with mosq.client(DA) as daemon:
        await mosq.async_restart()
        with pytest.raises(aiomqtt.MqttError):
            await next_message(daemon, timeout=10)


def test_file_written_by_the_cli_lets_exactly_its_clients_in(
    own_mqtt_broker: Mosquitto, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sscardd broker-provision`` output, loaded by the broker: supplied and generated (printed)
    passwords log in; the previous file's clients that are no longer listed do not."""
    mosq = own_mqtt_broker
    terminals = tmp_path / "terminals.toml"
    terminals.write_text(f'[[terminal]]\nid = "{C}"\ndaemon_password = "supplied daemon password"\n')
    assert main(["broker-provision", "--terminals", str(terminals), "--out", str(mosq.dynsec),
                 "--backend", "settle-1"]) == 0
    printed = dict(line.split("\t") for line in capsys.readouterr().out.splitlines()
                   if line and not line.startswith("#"))
    assert set(printed) == {broker.pos_username(C), "settle-1"}
    mosq.ready_user, mosq.passwords = "settle-1", printed
    mosq.restart()
    assert can_login(mosq, broker.daemon_username(C), "supplied daemon password") == 0
    assert can_login(mosq, broker.pos_username(C), printed[broker.pos_username(C)]) == 0
    assert can_login(mosq, DA, "supplied daemon password") == RC_NOT_AUTHORIZED
