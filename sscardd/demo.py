"""``sscardd demo``: the whole settlement path on one machine, as a readable transcript.

    sscardd demo [--keep] [-v]

Starts, in a temporary directory:

- mosquitto on a free 127.0.0.1 port with the dynamic-security file of
  :func:`sscardd.broker.provision` (the pharmacy terminal 370212000001 and the hospital terminal
  370202000001 of ``config/backend-seed.example.toml``, each with its daemon and POS account, and
  one backend). The listener is plaintext on loopback: the demo shows the access control and the
  flow, not certificate handling (the shipped broker config and the tests use TLS);
- the backend simulator (``python -m backend_sim run``) with the example seed and its own ledger;
- a social security card and two PSAMs issued with ``sscard-emu issue`` (the seed's holder 张三
  with the region's issuing PIN), in emulated readers;
- one daemon per terminal, in this process (:class:`sscardd.service.Daemon`), each with its own
  journal and its own AES key for ISO 9564-1 format 4 PIN blocks; the pharmacy's also serves the
  local JSON-RPC 2.0 socket for self-service kiosks (:mod:`sscardd.kiosk`) at
  ``pharmacy-kiosk.sock`` in the temporary directory, mode 0600 (root and the daemon's own user,
  i.e. the demo, are always allowed);
- a POS client per terminal (the provisioned POS account; requests with Response Topic and
  Correlation Data).

Then it plays the main scenarios — the POS reads the card and the account, the holder replaces
the issuing PIN, a pharmacy sale with the PIN, a wrong PIN, a refused sale containing daily goods,
the card taken to the hospital for a sale without PIN, the void of the first sale — and then the
holder at the pharmacy's self-service kiosk, over the local socket (one JSON object a line): the
card back in the pharmacy's reader, ``account.query`` (the balance after the void),
``records.list`` with the PIN (the chip's settlement log: the pharmacy sale and the hospital's),
``pin.change`` (old PIN, new PIN, new PIN again, in clear over the local socket only) and
``pin.verify`` with the new PIN. It checks each outcome, prints the journals of both terminals,
and stops everything it started (also on Ctrl-C or SIGTERM; the processes get SIGTERM from the
kernel if the demo itself is killed). The transcript never shows a PIN or a PIN block, nor a full
ID number.

The card is one image file; each daemon's emulated reader holds its own copy of the chip, loaded
from the file and written back to it as the card changes. The hospital's reader loads it when the
card is first used there (after the pharmacy's reader gave it up); putting the card back into the
pharmacy's reader loads the file again, as the hospital left it. The hospital's copy is not used
after that.

Exit status: 0 every step gave the expected outcome, 1 a step did not (or a part failed to start),
2 the demo cannot run here (no mosquitto, no dynamic-security plugin, no seed file), 130/143
interrupted (SIGINT/SIGTERM), 70 a bug (logged).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiomqtt
import structlog

from apdu_specs import crypto
from apdu_specs.identifiers import mask_name, mask_ssn
from sscardd import broker, config, log
from sscardd.mqtt import NODELAY, publish_properties
from sscardd.readers.emulated import EmulatedReader
from sscardd.service import Daemon

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "config" / "backend-seed.example.toml"
DYNSEC_PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
PHARMACY, HOSPITAL = "370212000001", "370202000001"
BACKEND = "backend-1"
INITIAL_PIN = "123456"  # what `sscard-emu issue` personalises, and the daemons' initial_pins
HOLDER_PIN = "246810"  # the holder's own PIN, set in the demo
WRONG_PIN = "975310"
KIOSK_PIN = "135790"  # the holder's next PIN, set at the pharmacy's kiosk
OPERATOR = {"id": "0001", "name": "王药师"}
MEDICINES = [{"code": "A0001", "qty": 2, "price": "12.50"}, {"code": "B0001", "qty": 1, "price": "30.00"},
             {"code": "C0001", "qty": 1, "price": "8.00"}]
WITH_DAILY_GOODS = [{"code": "A0002", "qty": 1, "price": "6.00"},
                    {"code": "G0001", "qty": 1, "price": "25.00"}]  # G0001: shampoo, daily goods
AT_HOSPITAL = [{"code": "A0001", "qty": 1, "price": "12.50"}]
PIN_BLOCK_SHOWN = "PIN block (ISO 9564-1 format 4)"
START_TIMEOUT = 15.0
REQUEST_TIMEOUT = 20.0
KIOSK_MODE = 0o600  # the kiosk socket: root and the daemon's own user (the demo's) only
KIOSK_ANSWER_MAX = 1 << 20  # the longest answer line the demo's kiosk client reads
CLEAR_PINS = "clear, over the local socket only"
_PR_SET_PDEATHSIG = 1


class DemoUnavailable(Exception):
    """The demo cannot run on this machine (the message says what is missing)."""


class DemoError(Exception):
    """A part of the demo did not start or stop as it should (the message says which)."""


def say(text: str = "") -> None:
    print(text, flush=True)


def fen(money: str) -> int:
    whole, _, cents = money.partition(".")
    return int(whole) * 100 + int(cents or 0)


def yuan(value: int) -> str:
    return f"{value // 100}.{value % 100:02d}"


# -- helper processes -----------------------------------------------------------------------------


# Looked up here, not in the forked child (no dynamic loading between fork and exec).
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the demo dies, so nothing outlives a SIGKILL."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """A process the demo started (its output in ``log_path``)."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        # Its own session: a Ctrl-C reaches the demo only, which then stops everything in order.
        # Started from the main thread: PR_SET_PDEATHSIG fires when the starting *thread* ends.
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                     start_new_session=True)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def exited(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 12) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return ("\n    " + "\n    ".join(tail)) if tail else ""

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, SIGKILL after ``timeout``; idempotent. Returns the exit status."""
        proc, self.proc = self.proc, None
        status = None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
            status = proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return status


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _secret_file(path: Path, text: str) -> Path:
    """A file only its owner can read (the daemon refuses password and key files others can read)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return path


# -- the demo's parts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """A terminal of the seed and its institution."""

    label: str
    terminal_id: str
    code: str
    name: str
    type: str
    region: str


def seed_site(seed: Mapping[str, Any], label: str, terminal_id: str) -> Site:
    for inst in seed.get("institution", []):
        if terminal_id in inst.get("terminals", []):
            return Site(label, terminal_id, inst["code"], inst["name"], inst["type"], inst["region"])
    raise DemoUnavailable(f"{SEED} names no institution with terminal {terminal_id}")


@dataclass
class Pos:
    """A POS client of one terminal: requests on ``.../cmd``, replies by Correlation Data."""

    site: Site
    client: aiomqtt.Client
    reply_topic: str
    seq: int = 0
    waiting: dict[bytes, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)

    async def read_replies(self) -> None:
        async for msg in self.client.messages:
            corr = getattr(msg.properties, "CorrelationData", None)
            fut = self.waiting.get(bytes(corr)) if corr is not None else None
            if fut is not None and not fut.done():
                body = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload).encode()
                try:
                    doc = json.loads(body)
                except ValueError:
                    doc = None
                if isinstance(doc, dict):
                    fut.set_result(doc)
                else:
                    fut.set_exception(DemoError(f"{self.site.label}: a reply that is not a JSON object"))

    async def request(self, op: str, args: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """Send ``op`` and wait for its reply; returns (request id, reply)."""
        self.seq += 1
        rid = f"demo-{self.site.label}-{self.seq}"
        corr = uuid.uuid4().bytes
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[corr] = fut
        body = json.dumps({"id": rid, "op": op, "args": dict(args)}, ensure_ascii=False).encode()
        try:
            await self.client.publish(broker.cmd_topic(self.site.terminal_id), body, qos=1,
                                      properties=publish_properties(response_topic=self.reply_topic,
                                                                    correlation=corr))
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return rid, await fut
        except TimeoutError:
            raise DemoError(f"{self.site.label}: no reply to {op} within {REQUEST_TIMEOUT:.0f} s") from None
        finally:
            self.waiting.pop(corr, None)


@dataclass
class Kiosk:
    """A self-service kiosk on a daemon's local socket (:mod:`sscardd.kiosk`): JSON-RPC 2.0, one
    JSON object a line each way, requests answered in order on one connection."""

    path: Path
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    seq: int = 0

    @classmethod
    async def connect(cls, path: Path) -> Kiosk:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(str(path), limit=KIOSK_ANSWER_MAX)
        except TimeoutError:
            raise DemoError(f"the kiosk socket {path}: no connection within {REQUEST_TIMEOUT:.0f} s"
                            ) from None
        except OSError as exc:
            raise DemoError(f"the kiosk socket {path}: {exc.strerror or exc}") from None
        return cls(path, reader, writer)

    async def call(self, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Send ``method`` and return its answer (with ``result`` or ``error``). ``params`` may hold
        PINs: they go over the socket only, never into a message of the demo's own."""
        self.seq += 1
        rid = f"demo-kiosk-{self.seq}"
        line = json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": dict(params)},
                          ensure_ascii=False).encode() + b"\n"
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                self.writer.write(line)
                await self.writer.drain()
                while True:
                    raw = await self.reader.readline()
                    if not raw.endswith(b"\n"):
                        raise DemoError(f"kiosk: the daemon closed the connection before answering {method}")
                    doc = json.loads(raw)
                    if isinstance(doc, dict) and "method" in doc and "id" not in doc:
                        continue  # a notification (events): not ours to answer
                    if not isinstance(doc, dict) or doc.get("id") != rid or \
                            ("result" in doc) == ("error" in doc):
                        raise DemoError(f"kiosk: an answer to {method} that is not a JSON-RPC answer to it")
                    return doc
        except TimeoutError:
            raise DemoError(f"kiosk: no answer to {method} within {REQUEST_TIMEOUT:.0f} s") from None
        except (OSError, ValueError) as exc:  # the connection broke; not JSON; a line over the limit
            raise DemoError(f"kiosk: {method}: {type(exc).__name__}") from None

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass
class Terminal:
    """A running daemon of the demo and what the POS needs to know of it."""

    site: Site
    daemon: Daemon
    task: asyncio.Task[None]
    pin_key: bytes
    journaled: list[str] = field(default_factory=list)  # request ids of sales and voids


class Demo:
    """One run: :meth:`run` starts everything, plays the scenarios and stops what it started."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[Child] = []
        self.failures: list[str] = []
        self.passwords: dict[str, str] = {}
        self.port = 0
        self.seed: dict[str, Any] = {}
        self.card_image = workdir / "card.json"
        self.terminals: dict[str, Terminal] = {}
        self.pos: dict[str, Pos] = {}
        self.pharmacy_card: EmulatedReader | None = None
        self.kiosk_socket = workdir / "pharmacy-kiosk.sock"

    # -- checks

    def expect(self, ok: bool, what: str) -> bool:
        if ok:
            say(f"    [as expected] {what}")
        else:
            self.failures.append(what)
            say(f"    [NOT AS EXPECTED] {what}")
        return ok

    # -- set-up

    def _check_tools(self) -> tuple[str, str]:
        exe = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)
        if exe is None:
            raise DemoUnavailable("mosquitto is not installed (Debian package mosquitto)")
        plugin = next((p for p in DYNSEC_PLUGIN_PATHS if os.path.exists(p)), None)
        if plugin is None:
            raise DemoUnavailable("mosquitto's dynamic-security plugin is not installed "
                                  f"(looked for {', '.join(DYNSEC_PLUGIN_PATHS)})")
        try:
            with open(SEED, "rb") as f:
                self.seed = tomllib.load(f)
        except OSError as exc:
            raise DemoUnavailable(f"the demo data {SEED}: {exc.strerror} (run it from a source checkout)"
                                  ) from None
        if len(os.fsencode(self.kiosk_socket)) > config.MAX_UNIX_PATH_BYTES:
            raise DemoUnavailable(f"the kiosk socket's path {self.kiosk_socket} is longer than a Unix "
                                  f"socket's {config.MAX_UNIX_PATH_BYTES} bytes (set TMPDIR to a shorter "
                                  "directory)")
        return exe, plugin

    def _issue(self, *args: str) -> None:
        """``sscard-emu issue`` as a process (the daemon never imports the emulator's issuing)."""
        argv = [sys.executable, "-m", "firmware_sim.cli", "issue", *args]
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise DemoError(f"sscard-emu issue {' '.join(args)}: {(done.stderr or done.stdout).strip()}")

    def _mosquitto_config(self, plugin: str, dynsec: Path) -> str:
        lines = [
            "# sscardd demo: config/mosquitto.conf.example's access control on a plaintext loopback listener",
            f"listener {self.port} {HOST}",
            "per_listener_settings false",
            "allow_anonymous false",
            "set_tcp_nodelay true",
            "persistence false",
            "message_size_limit 262144",
            f"plugin {plugin}",
            f"plugin_opt_config_file {dynsec}",
            "log_dest stderr",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            # As root mosquitto drops to the user `mosquitto`, who cannot read this private
            # directory (and a credential change clears PR_SET_PDEATHSIG): stay root, on loopback.
            lines.append("user root")
        return "\n".join(lines) + "\n"

    async def _login_ok(self, username: str) -> tuple[bool, str]:
        client = aiomqtt.Client(HOST, self.port, username=username, password=self.passwords[username],
                                identifier=f"demo-probe-{uuid.uuid4().hex[:8]}",
                                protocol=aiomqtt.ProtocolVersion.V5, timeout=2.0)
        try:
            async with client:
                return True, "ready"
        except aiomqtt.MqttError as exc:
            return False, str(exc)

    async def start_broker(self, exe: str, plugin: str) -> Child:
        sites = [broker.TerminalSpec(PHARMACY), broker.TerminalSpec(HOSPITAL)]
        result = broker.provision(sites, [broker.BackendSpec(BACKEND)])
        self.passwords = dict(result.passwords)
        dynsec = self.workdir / "dynsec.json"
        broker.write_dynsec(dynsec, result.config)
        conf = self.workdir / "mosquitto.conf"
        for attempt in range(3):
            self.port = _free_port()
            conf.write_text(self._mosquitto_config(plugin, dynsec))
            child = Child("mosquitto", [exe, "-c", str(conf)], self.workdir / f"mosquitto-{attempt}.log")
            self.children.append(child)
            child.start()
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                ready, what = await self._login_ok(BACKEND)
                if ready:
                    return child
                if child.exited() is not None or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            child.stop()
            # Someone may have taken the free port between the probe and the bind: another port.
            if "Address already in use" not in child.log_text():
                raise DemoError(f"mosquitto did not become ready: {what}{child.log_tail()}")
        raise DemoError("mosquitto found no free port")

    async def start_backend(self) -> Child:
        password_file = _secret_file(self.workdir / "backend.password", self.passwords[BACKEND])
        child = Child("backend", [sys.executable, "-m", "backend_sim", "run", "--seed", str(SEED),
                                  "--db", str(self.workdir / "ledger.sqlite3"), "--instance", "demo",
                                  "--broker", f"{HOST}:{self.port}", "--username", BACKEND,
                                  "--password-file", str(password_file)],
                      self.workdir / "backend.log")
        self.children.append(child)
        child.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not any(_is_event(line, "ready") for line in child.log_text().splitlines()):
            if child.exited() is not None or time.monotonic() > deadline:
                raise DemoError(f"the backend simulator did not become ready{child.log_tail()}")
            await asyncio.sleep(0.05)
        return child

    def _config_text(self, site: Site, key_file: Path, *, card: str = "", kiosk: Path | None = None) -> str:
        user = broker.daemon_username(site.terminal_id)
        password_file = _secret_file(self.workdir / f"{user}.password", self.passwords[user])
        # The kiosk socket: mode 0600, so only root and this process's user (always allowed) connect.
        kiosk_table = "enabled = false" if kiosk is None else \
            f'enabled = true\nsocket = "{kiosk}"\nmode = "{KIOSK_MODE:04o}"'
        return f"""
[terminal]
id = "{site.terminal_id}"
[institution]
code = "{site.code}"
name = "{site.name}"
type = "{site.type}"
region = "{site.region}"
[readers]
card = "{card}"
monitor = false
[pin]
initial_pins = ["{INITIAL_PIN}"]
pin_block_key_file = "{key_file}"
[mqtt]
host = "{HOST}"
port = {self.port}
username = "{user}"
password_file = "{password_file}"
answer_timeout = 10.0
message_expiry = 8
reconnect_backoff_min = 0.1
reconnect_backoff_max = 2.0
[mqtt.tls]
enabled = false
[journal]
path = "{self.workdir / f'journal-{site.terminal_id}.sqlite3'}"
[kiosk]
{kiosk_table}
"""

    async def start_terminal(self, site: Site, psam_image: Path, *, card_reader: EmulatedReader | None,
                             card: str = "", kiosk: Path | None = None) -> Terminal:
        pin_key = secrets.token_bytes(16)
        key_file = _secret_file(self.workdir / f"pin-block-{site.terminal_id}.key", pin_key.hex())
        source = str(self.workdir / f"sscardd-{site.terminal_id}.toml")
        cfg = config.parse(self._config_text(site, key_file, card=card, kiosk=kiosk), source)
        daemon = Daemon(cfg, card_reader=card_reader, psam_reader=EmulatedReader.from_image(psam_image))
        task = asyncio.create_task(daemon.run(), name=f"daemon-{site.terminal_id}")
        term = Terminal(site, daemon, task, pin_key)
        self.terminals[site.label] = term
        ready = asyncio.create_task(daemon.ready.wait())
        done, _ = await asyncio.wait({ready, task}, timeout=START_TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task in done:
            task.result()
            raise DemoError(f"the {site.label} daemon stopped while starting")
        if ready not in done:
            raise DemoError(f"the {site.label} daemon was not ready within {START_TIMEOUT:.0f} s")
        try:
            await daemon.link.wait_connected(START_TIMEOUT)
        except TimeoutError:
            raise DemoError(f"the {site.label} daemon did not reach the broker: "
                            f"{daemon.link.last_error}") from None
        if daemon.psam_state.state != "ok":
            raise DemoError(f"the {site.label} daemon sees no usable PSAM ({daemon.psam_state.state})")
        if kiosk is not None and daemon.kiosk is None:  # the daemon logged why
            raise DemoError(f"the {site.label} daemon's kiosk socket {kiosk} did not start")
        return term

    async def start_pos(self, site: Site, stack: contextlib.AsyncExitStack) -> Pos:
        user = broker.pos_username(site.terminal_id)
        client = aiomqtt.Client(HOST, self.port, username=user, password=self.passwords[user],
                                identifier=f"{user}-demo-{uuid.uuid4().hex[:6]}",
                                protocol=aiomqtt.ProtocolVersion.V5, socket_options=[NODELAY], timeout=10.0)
        await stack.enter_async_context(client)
        pos = Pos(site, client, broker.reply_prefix(site.terminal_id) + f"demo-{uuid.uuid4().hex[:8]}")
        await client.subscribe(pos.reply_topic, qos=1)
        reader = asyncio.create_task(pos.read_replies())

        async def stop_reader() -> None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader

        stack.push_async_callback(stop_reader)
        self.pos[site.label] = pos
        return pos

    # -- the run

    async def run(self) -> int:
        exe, plugin = self._check_tools()
        pharmacy = seed_site(self.seed, "pharmacy", PHARMACY)
        hospital = seed_site(self.seed, "hospital", HOSPITAL)
        psam_images = {s.label: self.workdir / f"psam-{s.terminal_id}.json" for s in (pharmacy, hospital)}
        self._issue("--out", str(self.card_image))
        for s in (pharmacy, hospital):
            self._issue("--psam", "--terminal-no", s.terminal_id, "--out", str(psam_images[s.label]))
        try:
            async with contextlib.AsyncExitStack() as stack:
                mosquitto = await self.start_broker(exe, plugin)
                backend = await self.start_backend()
                self.pharmacy_card = EmulatedReader.from_image(self.card_image)
                await self.start_terminal(pharmacy, psam_images["pharmacy"], card_reader=self.pharmacy_card,
                                          kiosk=self.kiosk_socket)
                # The hospital opens the card image only when the card is put into its reader.
                await self.start_terminal(hospital, psam_images["hospital"], card_reader=None,
                                          card=f"emulated:{self.card_image}")
                for s in (pharmacy, hospital):
                    await self.start_pos(s, stack)
                self.header(mosquitto, backend, pharmacy, hospital)
                await self.play()
                await self.show_journals()
        finally:
            await self.stop_terminals()
            self.stop_children()
        return 1 if self.failures else 0

    def header(self, mosquitto: Child, backend: Child, pharmacy: Site, hospital: Site) -> None:
        say("sscardd demo: POS → daemon → MQTT → settlement backend, with an emulated card and PSAMs")
        say(f"  work directory  {self.workdir}")
        say(f"  mosquitto       pid {mosquitto.pid}, {HOST}:{self.port}, dynamic-security file with "
            f"terminals {PHARMACY} and {HOSPITAL} and backend {BACKEND}")
        say("                  (plaintext on loopback for the demo; the shipped broker config and the "
            "tests use TLS)")
        say(f"  backend         pid {backend.pid}, backend simulator, seed {_shown_path(SEED)}, "
            "its own ledger")
        for s in (pharmacy, hospital):
            rule = "PIN required" if self.terminals[s.label].daemon.cfg.requires_pin() else "no PIN required"
            say(f"  {s.label:<15} terminal {s.terminal_id} {s.name} ({s.type}: {rule}); daemon in this "
                "process, emulated PSAM, own journal and PIN-block key")
        say(f"  kiosk           the pharmacy daemon's local socket {self.kiosk_socket} (JSON-RPC 2.0, one "
            f"JSON object a line; mode {KIOSK_MODE:04o}: root and the daemon's own user)")
        say("  card            the seed's holder, issued with the region's initial PIN, in the pharmacy's "
            "reader")
        say("  PINs go to the daemons over MQTT only as ISO 9564-1 format 4 PIN blocks, in clear only to the "
            "kiosk over the local socket; this transcript never shows a PIN or a PIN block.")

    def step(self, n: int, site: Site, op: str, what: str) -> None:
        say()
        say(f"[{n}] {site.label} {site.terminal_id}  {op}: {what}")

    def pin_block(self, label: str, pin: str, ssn: str) -> str:
        key = self.terminals[label].pin_key
        return crypto.iso9564_format4_encipher(key, pin, ssn[:17]).hex().upper()

    async def request(self, label: str, op: str, args: Mapping[str, Any]) -> dict[str, Any]:
        rid, reply = await self.pos[label].request(op, args)
        if op in ("sale", "sale.void"):
            self.terminals[label].journaled.append(rid)
        if reply.get("ok") is True and isinstance(reply.get("result"), dict):
            return reply
        err = reply.get("error")
        if not isinstance(err, dict):
            raise DemoError(f"{label}: a reply to {op} that is neither a result nor an error")
        say(f"    ← refused: {err.get('code')} ({err.get('compat_code')}) {err.get('message')} / "
            f"{err.get('message_zh')}")
        for k in ("tries_left", "backend_code", "backend_message"):
            if k in err:
                say(f"      {k}: {err[k]}")
        for ln in err.get("lines") or []:
            if isinstance(ln, dict):
                say(f"      offending line {ln.get('feedetl_sn')}: {ln.get('medins_list_codg')} "
                    f"{ln.get('item_name', '')}")
        return reply

    async def play(self) -> None:
        ph, ho = self.terminals["pharmacy"].site, self.terminals["hospital"].site

        self.step(1, ph, "card.read_basic",
                  "the POS reads the card (the SSN is the PIN block's account field)")
        r = await self.request("pharmacy", "card.read_basic", {})
        if not r["ok"]:
            self.expect(False, "the card is read")
            return
        info = r["result"]
        ssn = str(info["ssn"])
        say(f"    ← ok: card {info['card_no']}, holder {mask_name(str(info['name']))}, SSN {mask_ssn(ssn)}, "
            f"generation {info['generation']} ({info['algorithm']}), valid until {info['expiry_date']}")
        holder = next((p for p in self.seed.get("person", [])
                       if p.get("card_no") == info["card_no"] and p.get("ssn") == ssn), None)
        self.expect(holder is not None, "a holder of the demo data")

        self.step(2, ph, "account.query", "identity and personal account (1101)")
        r = await self.request("pharmacy", "account.query", {})
        opening = None
        if r["ok"]:
            a = r["result"]
            opening = fen(a["balc"])
            say(f"    ← ok: {a['psn_name']}, insurance {a['insutype']}, card status {a['card_stas']}, "
                f"activated {'yes' if a['activated'] else 'no'}, balance {a['balc']}")
        seeded = fen(holder["balance"]) if holder is not None else None
        self.expect(r["ok"] and r["result"]["activated"] is True and opening == seeded,
                    "an activated account with the seed's balance")

        self.step(3, ph, "pin.change", "the holder replaces the issuing PIN; old, new, new again: "
                  "three PIN blocks (ISO 9564-1 format 4)")
        r = await self.request("pharmacy", "pin.change", {"pin": {
            "source": "block", "old": self.pin_block("pharmacy", INITIAL_PIN, ssn),
            "new": self.pin_block("pharmacy", HOLDER_PIN, ssn),
            "new_again": self.pin_block("pharmacy", HOLDER_PIN, ssn)}})
        if r["ok"]:
            say("    ← ok: PIN changed on the chip")
        self.expect(r["ok"], "PIN changed (an initial PIN verifies but cannot pay)")

        sale_args = {"operator": OPERATOR, "items": MEDICINES,
                     "pin": {"source": "block", "block": self.pin_block("pharmacy", HOLDER_PIN, ssn)}}
        self.step(4, ph, "sale", f"{_items(MEDICINES)}; PIN: {PIN_BLOCK_SHOWN}")
        r = await self.request("pharmacy", "sale", sale_args)
        first: dict[str, Any] | None = r["result"] if r["ok"] else None
        if first is not None:
            _print_receipt(first)
        self.expect(first is not None and first["pin_verified"] is True and first["chip_record"] == "written"
                    and fen(first["medfee_sumamt"]) == _total(MEDICINES)
                    and (opening is None or fen(first["balc"]) == opening - fen(first["acct_pay"])),
                    "settled with the PIN verified, the account debited, the chip record written")

        self.step(5, ph, "sale", f"{_items(MEDICINES)}; PIN: {PIN_BLOCK_SHOWN} of a wrong PIN")
        r = await self.request("pharmacy", "sale", {
            **sale_args, "pin": {"source": "block", "block": self.pin_block("pharmacy", WRONG_PIN, ssn)}})
        if r["ok"]:
            _print_receipt(r["result"])
        err = r.get("error") or {}
        self.expect(not r["ok"] and err.get("code") == "PIN_WRONG" and err.get("compat_code") == -51
                    and err.get("tries_left") == 2, "PIN_WRONG (-51), 2 tries left, nothing booked")

        self.step(6, ph, "sale", f"{_items(WITH_DAILY_GOODS)}; PIN: {PIN_BLOCK_SHOWN}")
        r = await self.request("pharmacy", "sale", {
            "operator": OPERATOR, "items": WITH_DAILY_GOODS,
            "pin": {"source": "block", "block": self.pin_block("pharmacy", HOLDER_PIN, ssn)}})
        if r["ok"]:
            _print_receipt(r["result"])
        err = r.get("error") or {}
        lines = [ln.get("medins_list_codg") for ln in err.get("lines") or [] if isinstance(ln, dict)]
        self.expect(not r["ok"] and err.get("code") == "NON_MEDICAL_ITEM" and lines == ["G0001"],
                    "NON_MEDICAL_ITEM naming the daily goods line G0001, nothing booked")

        say()
        say("    (the holder takes the card out of the pharmacy's reader and goes to the hospital)")
        assert self.pharmacy_card is not None
        self.pharmacy_card.remove()

        self.step(7, ho, "sale", f"{_items(AT_HOSPITAL)}; no PIN (a hospital does not require it)")
        r = await self.request("hospital", "sale", {"operator": {"id": "D01", "name": "李医生"},
                                                    "items": AT_HOSPITAL})
        second: dict[str, Any] | None = r["result"] if r["ok"] else None
        if second is not None:
            _print_receipt(second)
        self.expect(second is not None and second["pin_verified"] is False,
                    "settled without PIN (pin_verified false)")

        if first is None:
            self.expect(False, "the void of the first sale (there is no first sale)")
            return
        self.step(8, ph, "sale.void", f"settlement {first['setl_id']} (step 4), operator "
                  f"{OPERATOR['id']} {OPERATOR['name']}; no card needed")
        r = await self.request("pharmacy", "sale.void", {"setl_id": first["setl_id"], "operator": OPERATOR})
        if r["ok"]:
            v = r["result"]
            say(f"    ← ok: voided {v['setl_id']} at {v['void_time']}: total {v['medfee_sumamt']} = fund "
                f"{v['fund_pay_sumamt']} + account {v['acct_pay']} + cash {v['psn_cash_pay']}; "
                f"account balance {v['balc']}")
        before = fen(second["balc"]) if second is not None else None
        self.expect(r["ok"] and r["result"]["acct_pay"] == first["acct_pay"]
                    and (before is None or fen(r["result"]["balc"]) == before + fen(first["acct_pay"])),
                    f"the account gets its {first['acct_pay']} back")
        after_void = fen(r["result"]["balc"]) if r["ok"] else None

        say()
        say("    (the holder takes the card out of the hospital's reader and comes back to the pharmacy's")
        say("     self-service kiosk: the card goes into the pharmacy's reader again, the reader of the")
        say("     pharmacy daemon, whose local socket the kiosk uses)")
        self.card_back_to_pharmacy()
        kiosk = await Kiosk.connect(self.kiosk_socket)
        try:
            await self.play_kiosk(kiosk, ph, str(info["card_no"]), first, second, after_void)
        finally:
            await kiosk.close()

    def card_back_to_pharmacy(self) -> None:
        """Put the card into the pharmacy's reader again. Each daemon's emulated reader holds its own
        copy of the chip, loaded from the one image file and written back to it as the card changes:
        the pharmacy's reader loads the image again, as the hospital left it (its chip record); the
        hospital's copy is not used again."""
        assert self.pharmacy_card is not None
        chip = EmulatedReader.from_image(self.card_image).card
        with self.pharmacy_card.state_lock:
            self.pharmacy_card.card = chip
        self.pharmacy_card.insert()

    def kiosk_answer(self, doc: Mapping[str, Any]) -> dict[str, Any] | None:
        """The ``result`` of a kiosk answer, or None after printing its error."""
        result = doc.get("result")
        if "error" not in doc and isinstance(result, dict):
            return result
        err = doc.get("error")
        err = err if isinstance(err, dict) else {}
        data = err.get("data")
        if isinstance(data, dict) and "compat_code" in data:  # -32000: the named error, as on MQTT
            say(f"    ← refused: {data.get('code')} ({data.get('compat_code')}) {data.get('message')} / "
                f"{data.get('message_zh')}")
            if "tries_left" in data:
                say(f"      tries_left: {data['tries_left']}")
        else:
            say(f"    ← refused: JSON-RPC error {err.get('code')} {err.get('message')}")
        return None

    async def play_kiosk(self, kiosk: Kiosk, ph: Site, card_no: str, first: Mapping[str, Any],
                         second: Mapping[str, Any] | None, after_void: int | None) -> None:
        """The holder at the pharmacy's self-service kiosk: the local socket, not the POS."""
        self.step(9, ph, "kiosk account.query", "the holder's own query over the pharmacy daemon's local "
                  "socket (JSON-RPC 2.0): identity and personal account (1101)")
        a = self.kiosk_answer(await kiosk.call("account.query", {}))
        if a is not None:
            say(f"    ← ok: card {a['card_no']}, {a['psn_name']}, card status {a['card_stas']}, "
                f"balance {a['balc']}")
        self.expect(a is not None and a["card_no"] == card_no
                    and (after_void is None or fen(str(a["balc"])) == after_void),
                    "the same card, the balance after the void")

        self.step(10, ph, "kiosk records.list", f"the chip's settlement log (DF04/EF08); PIN: the holder's "
                  f"({CLEAR_PINS})")
        rl = self.kiosk_answer(await kiosk.call("records.list", {"pin": HOLDER_PIN}))
        records: list[dict[str, Any]] = []
        if rl is not None:
            records = [rec for rec in rl.get("records") or [] if isinstance(rec, dict)]
            say(f"    ← ok: {len(records)} record(s) on the chip, newest first "
                "(seq: the terminal's journal row)")
            for rec in records:
                where = {PHARMACY: "pharmacy", HOSPITAL: "hospital"}.get(str(rec.get("terminal")), "?")
                say(f"      {rec.get('time')} terminal {rec.get('terminal')} ({where}) seq {rec.get('seq')} "
                    f"type {rec.get('txn_type')}: account {rec.get('account')}, "
                    f"self-pay {rec.get('self_pay')}, fund {rec.get('fund')}")
            say("      (the void of step 8 was booked by the backend without the card: the chip keeps "
                "the sale)")

        def on_chip(terminal: str, sale: Mapping[str, Any]) -> bool:
            return any(rec.get("terminal") == terminal and rec.get("account") == sale["acct_pay"]
                       and rec.get("self_pay") == sale["psn_cash_pay"]
                       and rec.get("fund") == sale["fund_pay_sumamt"] for rec in records)

        self.expect(rl is not None and on_chip(PHARMACY, first)
                    and (second is None or on_chip(HOSPITAL, second)),
                    f"the pharmacy sale of step 4 on the chip (account {first['acct_pay']}), and the "
                    "hospital's")

        self.step(11, ph, "kiosk pin.change", f"old PIN, new PIN, new PIN again ({CLEAR_PINS})")
        ch = self.kiosk_answer(await kiosk.call("pin.change", {"old": HOLDER_PIN, "new": KIOSK_PIN,
                                                              "new_again": KIOSK_PIN}))
        if ch is not None:
            say("    ← ok: PIN changed on the chip")
        self.expect(ch == {"changed": True}, "PIN changed at the kiosk")

        self.step(12, ph, "kiosk pin.verify", f"the new PIN ({CLEAR_PINS})")
        v = self.kiosk_answer(await kiosk.call("pin.verify", {"pin": KIOSK_PIN}))
        if v is not None:
            say("    ← ok: the chip verified the PIN")
        self.expect(v == {"verified": True}, "the new PIN verifies")

    async def show_journals(self) -> None:
        say()
        say("journals (one SQLite journal per terminal; every settlement is written before it is sent)")
        expected = {"pharmacy": ["settled", "refused", "refused", "settled"], "hospital": ["settled"]}
        for label, term in self.terminals.items():
            journal = term.daemon.journal
            say(f"  {label} {term.site.terminal_id}: {_shown_path(Path(term.daemon.cfg.journal.path))}")
            states = []
            for rid in term.journaled:
                e = await asyncio.to_thread(journal.get_by_request_id, term.site.terminal_id, rid)
                if e is None:
                    say(f"    {rid:<18} (no row)")
                    states.append("missing")
                    continue
                states.append(str(e.state))
                what = e.error_code or ""
                if e.amounts is not None and e.state == "settled":
                    a = e.amounts
                    what = f"{e.setl_id} total {yuan(a.medfee_sumamt)} account {yuan(a.acct_pay)}"
                    what += f", chip record {e.chip_record}" if e.op == "sale" else " refunded"
                say(f"    {rid:<18} {e.op:<9} {e.state!s:<9} {what}")
            counts = await asyncio.to_thread(journal.counts)
            say(f"    rows by state: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}")
            self.expect(states == expected[label], f"{label} journal: {', '.join(expected[label])}")

    # -- tear-down

    async def stop_terminals(self) -> None:
        """Stop the daemons (each closes its readers and its journal)."""
        tasks = [term.task for term in self.terminals.values()]
        for term in self.terminals.values():
            term.daemon.stop()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=START_TIMEOUT)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                say(f"the daemon {task.get_name()} failed: {task.exception()!r}")

    def stop_children(self) -> None:
        # The backend first (it drains), then the broker.
        for child in reversed(self.children):
            pid = child.pid
            if pid is not None:
                child.stop()
                say(f"stopped {child.name} (pid {pid})")


def _is_event(line: str, event: str) -> bool:
    try:
        doc = json.loads(line)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("event") == event


def _shown_path(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(ROOT))
    return str(path)


def _total(items: Sequence[Mapping[str, Any]]) -> int:
    return sum(int(it["qty"]) * fen(str(it["price"])) for it in items)


def _items(items: Sequence[Mapping[str, Any]]) -> str:
    lines = ", ".join(f"{it['code']} ×{it['qty']} @ {it['price']}" for it in items)
    return f"{lines} (total {yuan(_total(items))})"


def _print_receipt(r: Mapping[str, Any]) -> None:
    say(f"    ← ok: settlement {r['setl_id']} at {r['setl_time']}, {r['fixmedins_name']}, "
        f"{r['psn_name']} card {r['card_no']}")
    say(f"      total {r['medfee_sumamt']} = fund {r['fund_pay_sumamt']} + account {r['acct_pay']} + cash "
        f"{r['psn_cash_pay']}; account balance {r['balc']}")
    for ln in r.get("lines") or []:
        say(f"      {ln['code']} {ln.get('item_name') or ''} (class {ln.get('class') or '-'}) ×{ln['qty']} "
            f"{ln['amount']}: fund {ln['fund_pay']}, account {ln['acct_pay']}, cash {ln['psn_cash_pay']}")
    say(f"      PIN verified on the chip: {'yes' if r['pin_verified'] else 'no'}; "
        f"chip record (DF04/EF08): {r['chip_record']}")


# -- entry point ----------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    """``sscardd demo``; ``args``: ``keep``, ``verbose``, ``log_json``."""
    verbose = int(getattr(args, "verbose", 0) or 0)
    # The daemons' own log lines (redacted) go to stderr: warnings only, unless -v.
    log.configure(["WARNING", "INFO", "DEBUG"][min(verbose, 2)], json=True if args.log_json else None)
    workdir = Path(tempfile.mkdtemp(prefix="sscardd-demo-"))
    demo = Demo(workdir)

    async def runner() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await demo.run()

    status = 1
    try:
        status = asyncio.run(runner())
    except DemoUnavailable as exc:
        print(f"sscardd demo: cannot run: {exc}", file=sys.stderr)
        status = 2
    except DemoError as exc:
        print(f"sscardd demo: FAILED: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("sscardd demo: interrupted", file=sys.stderr)
        status = 130
    except asyncio.CancelledError:
        print("sscardd demo: terminated", file=sys.stderr)
        status = 128 + signal.SIGTERM
    except Exception:  # a bug: logged through the redacting chain, never printed raw
        structlog.get_logger("sscardd.demo").exception("demo failed")
        status = 70
    finally:
        demo.stop_children()  # already done unless the loop itself was torn down
        if args.keep:
            say(f"kept {workdir} (logs, journals, ledger, images)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if status == 0:
        say("\nsscardd demo: OK, every step as expected")
    elif demo.failures:
        say(f"\nsscardd demo: FAILED, {len(demo.failures)} check(s) not as expected: "
            f"{'; '.join(demo.failures)}")
    return status
