"""A real mosquitto for the tests, configured as shipped (``config/mosquitto.conf.example``).

:class:`Mosquitto` runs ``mosquitto -c`` with its own config in a temporary directory, on a free
loopback port: one TLS listener (a test CA and a server certificate for 127.0.0.1/localhost made
here with ``cryptography``), the dynamic-security plugin with a file from
:func:`sscardd.broker.provision` (what ``sscardd broker-provision`` writes), ``set_tcp_nodelay
true``, persistence on, no anonymous access and no plaintext listener. It is ready when an
authenticated login succeeds — a broker whose dynamic-security file is unreadable starts and accepts
TCP, then refuses every login. :meth:`Mosquitto.restart` keeps the port, the files and the persisted
sessions (for tests of broker restarts).

The configuration *is* the shipped example with the port, paths and log destination replaced
(and ``user root`` when the tests run as root), so a change to the example is tested here.

Processes are started with :func:`firmware_sim.lab.start_process` (they get SIGTERM when the
starting *thread* ends), so start and restart brokers from the test's own thread, never from
``asyncio.to_thread``. :class:`MosquittoUnavailable` says why a broker cannot run here; the
fixtures in ``tests/conftest.py`` turn it into a skip.

Clients: :meth:`Mosquitto.client` builds an ``aiomqtt.Client`` (MQTT 5, TLS against the test CA,
TCP_NODELAY) for a provisioned username, and :func:`receive_until` collects deliveries up to a
marker message, so a test shows that something was *not* delivered without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiomqtt
import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from firmware_sim.lab import start_process, stop_process, tail_file
from sscardd import broker

DYNSEC_PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
HOST = "127.0.0.1"
SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / "config" / "mosquitto.conf.example"

TERMINAL_A = "370212000001"
TERMINAL_B = "370212000002"
BACKEND = "backend-1"

# MQTT 5 reason codes the tests look for.
RC_SUCCESS = 0x00
RC_GRANTED_QOS1 = 0x01
RC_NOT_AUTHORIZED = 0x87
RC_BAD_USERNAME_OR_PASSWORD = 0x86


class MosquittoUnavailable(Exception):
    """No mosquitto with the dynamic-security plugin here, or it did not become ready (why: the
    message, with the broker's log tail)."""


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )


def find_dynsec_plugin() -> str | None:
    return next((p for p in DYNSEC_PLUGIN_PATHS if os.path.exists(p)), None)


def check_mosquitto() -> None:
    """:class:`MosquittoUnavailable` unless mosquitto and its dynamic-security plugin are installed."""
    if find_mosquitto() is None:
        raise MosquittoUnavailable("mosquitto is not installed (Debian package mosquitto)")
    if find_dynsec_plugin() is None:
        raise MosquittoUnavailable(
            f"mosquitto's dynamic-security plugin is not installed (looked for {DYNSEC_PLUGIN_PATHS})"
        )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the broker start retries if someone takes it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


# -- TLS ------------------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sscardd tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class TestCA:
    """A throw-away CA and a server certificate for 127.0.0.1 and localhost, as PEM files."""

    __test__ = False  # not a pytest test class

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def create(cls, directory: Path, *, cn: str = "sscardd test CA") -> TestCA:
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2))
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (
            x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(validity[0]).not_valid_after(validity[1])
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        server = (
            x509.CertificateBuilder()
            .subject_name(_name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(validity[0]).not_valid_after(validity[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        out = cls(directory / "ca.crt", directory / "server.crt", directory / "server.key")
        out.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        out.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
        out.server_key.touch(mode=0o600)
        out.server_key.write_bytes(_pem_key(key))
        return out

    def client_context(self) -> ssl.SSLContext:
        """Verifies the broker against this CA (hostname/IP checked), TLS 1.2 at least."""
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx


# -- the broker -----------------------------------------------------------------------------------

NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def login(port: int, username: str | None, password: str | None, *, context: ssl.SSLContext | None,
          client_id: str | None = None, timeout: float = 5.0,
          will: tuple[str, bytes, bool] | None = None, vanish: bool = False) -> int:
    """One synchronous MQTT 5 login; returns the CONNACK reason code (0 = accepted).

    ``will``: (topic, payload, retain) of a QoS 1 Last Will. ``vanish``: after an accepted login,
    drop the TCP connection without DISCONNECT (the broker then publishes the Will).
    Raises ``OSError`` (``ssl.SSLError`` included) when no MQTT session comes up at all, and
    ``TimeoutError`` when no CONNACK arrives in time.
    """
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id or f"probe-{uuid.uuid4().hex}",
                         protocol=paho.MQTTv5)
    if context is not None:
        client.tls_set_context(context)
    if username is not None:
        client.username_pw_set(username, password)
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=will[2])
    result: list[int] = []

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        result.append(int(reason.value))

    client.on_connect = on_connect
    client.connect(HOST, port, keepalive=10)
    try:
        deadline = time.monotonic() + timeout
        while not result:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no CONNACK within {timeout} s")
            rc = client.loop(timeout=0.05)
            if rc not in (paho.MQTT_ERR_SUCCESS,) and not result:
                raise ConnectionError(f"connection lost before CONNACK ({paho.error_string(rc)})")
        return result[0]
    finally:
        if result and result[0] == 0 and not vanish:
            client.disconnect()
            client.loop(timeout=0.05)
        sock = client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


class Mosquitto:
    """One mosquitto with its config, certificates, dynamic-security file and log in ``workdir``.

    ``passwords`` maps every provisioned username to its password (what the tests log in with);
    ``ready_user`` is the account whose login proves readiness.
    """

    def __init__(self, workdir: Path, ca: TestCA, *, passwords: dict[str, str], ready_user: str,
                 port: int | None = None, dynsec: Path | None = None,
                 extra_config: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.ca = ca
        self.passwords = passwords
        self.ready_user = ready_user
        self.port = port or free_port()
        self.dynsec = dynsec or workdir / "dynsec.json"
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.persistence_dir = workdir / "data"
        self.extra_config = list(extra_config)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- configuration

    def config_text(self) -> str:
        """``config/mosquitto.conf.example`` with this broker's port, paths and log destination."""
        overrides = {
            "listener": f"{self.port} {HOST}",
            "cafile": str(self.ca.ca_cert),
            "certfile": str(self.ca.server_cert),
            "keyfile": str(self.ca.server_key),
            "plugin": str(find_dynsec_plugin()),
            "plugin_opt_config_file": str(self.dynsec),
            "persistence_location": f"{self.persistence_dir}/",
            "log_dest": "stderr",  # unbuffered, into log_path: tests can wait for a line
        }
        lines = [f"# {SHIPPED_CONFIG} as run by tests/mqtt_harness.py"]
        # Started as root, mosquitto drops to its own user before it reads the plugin's file and
        # the TLS key, and pytest's temporary directories are private to root.
        if os.geteuid() == 0:
            lines.append("user root")
        seen = set()
        for line in SHIPPED_CONFIG.read_text().splitlines():
            words = line.split(None, 1)
            if not words or words[0].startswith("#"):
                continue
            if words[0] in overrides:
                seen.add(words[0])
                lines.append(f"{words[0]} {overrides[words[0]]}")
            else:
                lines.append(line)
        missing = set(overrides) - seen
        if missing:
            raise MosquittoUnavailable(f"{SHIPPED_CONFIG} lacks {sorted(missing)}; the harness expects them")
        return "\n".join([*lines, *self.extra_config]) + "\n"

    # -- process

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = 15.0) -> None:
        """Start it (no-op if running) and wait until :attr:`ready_user` can log in."""
        if self.running:
            return
        exe = find_mosquitto()
        if exe is None:
            raise MosquittoUnavailable("mosquitto is not installed (Debian package mosquitto)")
        self.persistence_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = start_process([exe, "-c", str(self.config_path)], log=self._log)
        self.wait_ready(timeout)

    def _ready_probe(self) -> tuple[bool, str]:
        """(ready, what happened) after one login attempt."""
        try:
            rc = login(self.port, self.ready_user, self.passwords[self.ready_user],
                       context=self.ca.client_context(), timeout=2.0)
        except (OSError, TimeoutError) as exc:
            return False, f"no MQTT session ({exc})"
        if rc == 0:
            return True, "ready"
        return False, f"TLS and TCP up, but the login of {self.ready_user!r} was refused ({rc:#04x})"

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            ready, what = self._ready_probe()
            if ready:
                return
            assert self.proc is not None
            status = self.proc.poll()
            if status is not None or time.monotonic() > deadline:
                self.stop()
                state = f"exited with {status}" if status is not None else "not ready"
                raise MosquittoUnavailable(
                    f"mosquitto on port {self.port} {state}: {what}; "
                    f"log {self.log_path}{tail_file(self.log_path)}"
                )
            time.sleep(0.05)

    async def async_wait_ready(self, timeout: float = 15.0) -> None:
        """:meth:`wait_ready` without blocking the event loop (the probe runs in a worker thread)."""
        deadline = time.monotonic() + timeout
        while True:
            ready, what = await asyncio.to_thread(self._ready_probe)
            if ready:
                return
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise MosquittoUnavailable(f"mosquitto not ready: {what}{tail_file(self.log_path)}")
            await asyncio.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM (mosquitto then saves its persistence file), SIGKILL after ``timeout``."""
        proc, self.proc = self.proc, None
        status = stop_process(proc, timeout) if proc is not None else None
        if self._log is not None:
            self._log.close()
            self._log = None
        return status

    def kill(self) -> None:
        """SIGKILL: no persistence save, as after a crash or power loss."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.stop()

    def restart(self, timeout: float = 15.0) -> None:
        """Stop and start on the same port with the same files (blocks until ready)."""
        self.stop()
        self.start(timeout)

    async def async_restart(self, timeout: float = 15.0) -> None:
        """:meth:`restart` for async tests: the process starts in this thread, readiness is awaited."""
        self.stop()
        exe = find_mosquitto()
        assert exe is not None
        self.config_path.write_text(self.config_text())
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = start_process([exe, "-c", str(self.config_path)], log=self._log)
        await self.async_wait_ready(timeout)

    def listening_ports(self) -> set[int]:
        """TCP ports the broker process listens on (from /proc; Linux only)."""
        if self.pid is None:
            return set()
        inodes = set()
        fd_dir = Path(f"/proc/{self.pid}/fd")
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        ports = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError), open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                        ports.add(int(cols[1].rsplit(":", 1)[1], 16))
        return ports

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 5.0) -> None:
        """Wait until ``text`` appears in the broker's log (mosquitto flushes each line)."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{text!r} not in the broker log after {timeout} s{tail_file(self.log_path)}"
                )
            time.sleep(0.02)

    # -- clients

    def client(
        self,
        username: str | None,
        *,
        password: str | None = None,
        identifier: str | None = None,
        tls: bool = True,
        context: ssl.SSLContext | None = None,
        clean_start: bool = True,
        session_expiry: int | None = None,
        timeout: float = 10.0,
        **kwargs: Any,
    ) -> aiomqtt.Client:
        """An ``aiomqtt.Client`` (not yet connected) for ``username`` with its provisioned password.

        MQTT 5, TLS against the test CA unless ``tls=False``, TCP_NODELAY, a unique client id
        unless ``identifier``. ``clean_start=False`` with a ``session_expiry`` (seconds) keeps a
        persistent session, as the daemon does.
        """
        if password is None and username is not None:
            password = self.passwords[username]
        properties = None
        if session_expiry is not None:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = session_expiry
        return aiomqtt.Client(
            HOST,
            self.port,
            username=username,
            password=password,
            identifier=identifier or f"t-{username or 'anon'}-{uuid.uuid4().hex[:12]}",
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=(context or self.ca.client_context()) if tls else None,
            clean_start=paho.MQTT_CLEAN_START_FIRST_ONLY if clean_start else False,
            properties=properties,
            socket_options=[NODELAY],
            timeout=timeout,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"Mosquitto(port={self.port}, pid={self.pid}, workdir={str(self.workdir)!r})"


def make_broker(
    workdir: Path,
    ca: TestCA,
    *,
    terminals: Sequence[str | broker.TerminalSpec] = (TERMINAL_A, TERMINAL_B),
    backends: Sequence[str | broker.BackendSpec] = (BACKEND,),
    iterations: int = broker.DEFAULT_ITERATIONS,
    extra_config: Sequence[str] = (),
    start: bool = True,
) -> Mosquitto:
    """Provision ``terminals`` and ``backends`` (all passwords generated) and start a broker."""
    check_mosquitto()
    workdir.mkdir(parents=True, exist_ok=True)
    specs = [t if isinstance(t, broker.TerminalSpec) else broker.TerminalSpec(t) for t in terminals]
    bspecs = [b if isinstance(b, broker.BackendSpec) else broker.BackendSpec(b) for b in backends]
    result = broker.provision(specs, bspecs, iterations=iterations)
    dynsec = workdir / "dynsec.json"
    broker.write_dynsec(dynsec, result.config)
    mosq = Mosquitto(workdir, ca, passwords=dict(result.passwords), ready_user=bspecs[0].name,
                     dynsec=dynsec, extra_config=extra_config)
    if start:
        for attempt in range(3):
            try:
                mosq.start()
                break
            except MosquittoUnavailable:
                # Someone may have taken the free port between the probe and the bind.
                if attempt == 2 or "Address already in use" not in mosq.log_text():
                    raise
                mosq.port = free_port()
    return mosq


class MosquittoFactory:
    """Makes brokers in subdirectories of ``base``; :meth:`close` stops every one still running."""

    def __init__(self, base: Path, ca: TestCA) -> None:
        self.base = base
        self.ca = ca
        self.brokers: list[Mosquitto] = []

    def __call__(self, name: str = "broker", **kwargs: Any) -> Mosquitto:
        workdir = self.base / f"{name}-{len(self.brokers)}"
        mosq = make_broker(workdir, self.ca, **kwargs)
        self.brokers.append(mosq)
        return mosq

    def close(self) -> None:
        for mosq in self.brokers:
            mosq.stop()


@contextlib.contextmanager
def running_broker(workdir: Path, ca: TestCA, **kwargs: Any) -> Iterator[Mosquitto]:
    """:func:`make_broker` for the block; stopped afterwards."""
    mosq = make_broker(workdir, ca, **kwargs)
    try:
        yield mosq
    finally:
        mosq.stop()


# -- receiving ------------------------------------------------------------------------------------


async def next_message(client: aiomqtt.Client, timeout: float = 5.0) -> aiomqtt.Message:
    """The next delivery to ``client``; ``TimeoutError`` after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        return await anext(client.messages)


async def receive_until(
    client: aiomqtt.Client, is_marker: Callable[[aiomqtt.Message], bool], timeout: float = 5.0
) -> list[aiomqtt.Message]:
    """Everything delivered to ``client`` before the first message for which ``is_marker`` holds.

    To show that a message was *not* delivered: publish it with QoS 1 and await the PUBACK (the
    broker routes a message before it acknowledges it), then have an allowed publisher send a
    marker to the same receiver. mosquitto delivers to one client in the order it queued, so
    anything the forbidden message produced arrives before the marker.
    """
    got: list[aiomqtt.Message] = []
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            if is_marker(message):
                return got
            got.append(message)
    raise AssertionError("unreachable: the message iterator ended")


def payload_is(payload: bytes) -> Callable[[aiomqtt.Message], bool]:
    return lambda message: message.payload == payload


class PubackLog:
    """Records the reason code of every PUBACK a client receives (aiomqtt drops them).

    Publish one message at a time and read :attr:`last` after the ``await``.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self.codes: list[int] = []
        inner = client._client  # the paho client aiomqtt drives
        previous = inner.on_publish

        def on_publish(c: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
            self.codes.append(int(reason.value) if hasattr(reason, "value") else int(reason))
            previous(c, userdata, mid, reason, properties)

        inner.on_publish = on_publish

    @property
    def last(self) -> int:
        return self.codes[-1]
