"""End-to-end helpers for the backend simulator: a broker endpoint, backend processes, a terminal.

The broker is behind a small interface so the tests do not care how it is secured:

* ``backend_args(instance)``: the ``sscard-backend run`` arguments that reach it (broker address,
  credentials, TLS);
* ``client(identity)``: an ``aiomqtt.Client`` (MQTT 5, TCP_NODELAY) for a terminal id or a backend.

:class:`PlainMosquitto` is a plain mosquitto on a free loopback port (anonymous, no TLS,
``set_tcp_nodelay true``). :class:`HarnessBroker` adapts the shared harness
(``tests/mqtt_harness.py``: TLS and the dynamic-security file of ``sscardd broker-provision``).
Processes are started with :func:`firmware_sim.lab.start_process` from the test's own thread and
stopped by the fixtures.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any, Protocol

import aiomqtt
from paho.mqtt.properties import Properties

from firmware_sim.lab import start_process, stop_process, tail_file, wait_listening
from sscardd.mqtt import publish_properties

HOST = "127.0.0.1"
NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class BrokerUnavailable(Exception):
    """No mosquitto here, or it did not come up (the message says why)."""


class Broker(Protocol):
    host: str
    port: int

    def backend_args(self, instance: str) -> list[str]: ...

    def client(self, identity: str, **kwargs: Any) -> aiomqtt.Client: ...


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class PlainMosquitto:
    """mosquitto with one anonymous plaintext listener on 127.0.0.1 (no TLS, no ACL)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.host = HOST
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise BrokerUnavailable("mosquitto is not installed (Debian package mosquitto)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"listener {self.port} {HOST}\nallow_anonymous true\nset_tcp_nodelay true\n"
                             "persistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n"
                             "log_type notice\nlog_type information\n")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = start_process([exe, "-c", str(self.conf)], log=self._log)
        try:
            wait_listening(self.proc, HOST, self.port, timeout=timeout, log_path=self.log_path)
        except TimeoutError as exc:
            self.stop()
            raise BrokerUnavailable(f"mosquitto did not start: {exc}") from None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def backend_args(self, instance: str) -> list[str]:
        return ["--broker", f"{HOST}:{self.port}"]

    def client(self, identity: str, **kwargs: Any) -> aiomqtt.Client:
        return aiomqtt.Client(HOST, self.port, identifier=f"t-{identity}-{uuid.uuid4().hex[:8]}",
                              protocol=aiomqtt.ProtocolVersion.V5, socket_options=[NODELAY], **kwargs)


class HarnessBroker:
    """The shared harness's broker (TLS, dynamic security) behind the same interface.

    ``backend_user`` is a provisioned backend account; terminals log in as their terminal id's
    daemon account (``terminal_user(terminal_id)``).
    """

    def __init__(self, mosq: Any, backend_user: str, terminal_user: Any) -> None:
        self.mosq = mosq
        self.host = HOST
        self.port = int(mosq.port)
        self.backend_user = backend_user
        self.terminal_user = terminal_user

    def backend_args(self, instance: str) -> list[str]:
        pw_file = Path(self.mosq.workdir) / f"{instance}.password"
        pw_file.write_text(self.mosq.passwords[self.backend_user] + "\n")
        pw_file.chmod(0o600)
        return ["--broker", f"{HOST}:{self.port}", "--username", self.backend_user,
                "--password-file", str(pw_file), "--tls-ca", str(self.mosq.ca.ca_cert)]

    def client(self, identity: str, **kwargs: Any) -> aiomqtt.Client:
        user = self.backend_user if identity == "backend" else self.terminal_user(identity)
        return self.mosq.client(user, **kwargs)  # type: ignore[no-any-return]


class BackendProcess:
    """``sscard-backend run`` as a process, logging (JSON lines) into ``log_path``."""

    def __init__(self, workdir: Path, broker: Broker, db: Path, seed: Path, instance: str, *,
                 control: bool = False, extra: list[str] | None = None) -> None:
        self.instance = instance
        self.log_path = workdir / f"{instance}.log"
        self.argv = [sys.executable, "-m", "backend_sim", "run", "--seed", str(seed), "--db", str(db),
                     "--instance", instance, *broker.backend_args(instance), *(extra or [])]
        if control:
            self.argv.append("--control")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = start_process(self.argv, log=self._log)
        self.wait_ready(1, timeout)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict):
                out.append(ev)
        return out

    def wait_event(self, event: str, count: int = 1, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events() if e.get("event") == event
                     and all(e.get(k) == v for k, v in match.items())]
            if len(found) >= count:
                return found[count - 1]
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.instance}: no {event!r} ({match}) in its log{tail_file(self.log_path)}")
            time.sleep(0.01)

    async def async_wait_event(self, event: str, count: int = 1, timeout: float = 10.0,
                               **match: Any) -> dict[str, Any]:
        return await asyncio.to_thread(self.wait_event, event, count, timeout, **match)

    def wait_ready(self, count: int = 1, timeout: float = 15.0) -> None:
        self.wait_event("ready", count, timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        proc, self.proc = self.proc, None
        status = stop_process(proc) if proc is not None else None
        if self._log is not None:
            self._log.close()
            self._log = None
        return status


def request_properties(response_topic: str | None, correlation: bytes | None,
                       expiry: int | None = None) -> Properties:
    """A peer's PUBLISH properties: the daemon's own builder, without a content type."""
    return publish_properties(response_topic=response_topic, correlation=correlation, expiry=expiry,
                              content_type=None)


def user_properties(msg: aiomqtt.Message) -> dict[str, str]:
    return dict(getattr(msg.properties, "UserProperty", None) or [])


class Terminal:
    """A terminal's MQTT client: publishes requests, collects the answers on its response topic."""

    def __init__(self, broker: Broker, terminal_id: str) -> None:
        self.terminal_id = terminal_id
        self.client = broker.client(terminal_id)
        self.response_topic = f"sscard/v1/term/{terminal_id}/settle/resp"
        self.request_topic = f"sscard/v1/settle/req/{terminal_id}"

    async def __aenter__(self) -> Terminal:
        await self.client.__aenter__()
        await self.client.subscribe(self.response_topic, qos=1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.__aexit__(None, None, None)

    async def publish(self, doc: dict[str, Any] | bytes, *, correlation: bytes | None = None,
                      response_topic: str | type[Ellipsis] | None = ..., topic: str | None = None,
                      expiry: int | None = 30) -> bytes:
        corr = correlation if correlation is not None else uuid.uuid4().bytes
        rt = self.response_topic if response_topic is ... else response_topic
        payload = doc if isinstance(doc, bytes) else json.dumps(doc, ensure_ascii=False).encode()
        await self.client.publish(topic or self.request_topic, payload, qos=1,
                                  properties=request_properties(rt, corr, expiry))  # type: ignore[arg-type]
        return corr

    async def answer(self, timeout: float = 10.0) -> tuple[dict[str, Any], aiomqtt.Message]:
        async with asyncio.timeout(timeout):
            msg = await anext(self.client.messages)
        body = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload).encode()
        return json.loads(body), msg

    async def request(self, doc: dict[str, Any],
                      timeout: float = 10.0) -> tuple[dict[str, Any], aiomqtt.Message]:
        corr = await self.publish(doc)
        ans, msg = await self.answer(timeout)
        assert getattr(msg.properties, "CorrelationData", None) == corr
        return ans, msg
