"""The settlement lab: a real mosquitto configured as shipped (TLS, the dynamic-security file of
``sscardd broker-provision``), backend simulator processes on one ledger, and daemons with an
emulated card and PSAM — in-process (:class:`sscardd.service.Daemon`, for fault control) or as
``sscardd run`` processes (for SIGKILL).

Terminals, institutions and card holders come from ``config/backend-seed.example.toml``. POS
clients log in as the terminal's provisioned POS account.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiomqtt

from apdu_specs import crypto
from backend_sim.faults import Faults
from firmware_sim.keypad import KeypadConfig, ScriptedKeypad
from firmware_sim.lab import start_process, stop_process, tail_file
from firmware_sim.personalise import CardParams, Holder, issue_card, issue_psam
from firmware_sim.store import TearSafeStore
from sscardd import broker, config
from sscardd.journal import Journal
from sscardd.readers.emulated import EmulatedReader
from sscardd.service import Daemon
from tests.backend_helpers import EXAMPLE_SEED
from tests.backend_lab import BackendProcess, HarnessBroker, request_properties
from tests.emu import roots
from tests.mqtt_harness import BACKEND, Mosquitto, MosquittoFactory, next_message

ROOT = Path(__file__).resolve().parent.parent
INITIAL = "123456"
GOOD = "246810"
PIN_KEY = bytes.fromhex("000102030405060708090A0B0C0D0E0F")


@dataclass(frozen=True)
class Inst:
    code: str
    name: str
    type: str
    region: str


@dataclass(frozen=True)
class Person:
    ssn: str
    name: str
    card_no: str
    serial: str
    region: str = "370202"


PHARMACY = Inst("P37021200001", "崂山康泰大药房", "pharmacy", "370212")
CLINIC = Inst("C37020300001", "市北仁和诊所", "clinic", "370203")
HOSPITAL = Inst("H37020200001", "青岛市市南区人民医院", "hospital", "370202")
SUSPENDED = Inst("P37021300001", "李沧百姓药房", "pharmacy", "370213")
BLACKLISTED = Inst("P37021100001", "黄岛惠民药店", "pharmacy", "370211")
TERMINALS = {"370212000001": PHARMACY, "370212000002": PHARMACY, "370203000001": CLINIC,
             "370202000001": HOSPITAL, "370213000001": SUSPENDED, "370211000001": BLACKLISTED}
A, B = "370212000001", "370212000002"

ZHANG = Person("370202199001011237", "张三", "Q54198963", "12345678")
LI = Person("370202198503151235", "李四", "Q10000011", "10000011")
WANG_LOST = Person("37020319781120234X", "王五", "Q1000002X", "10000021", "370203")
ZHAO_BLACKLISTED = Person("370212199206073450", "赵六", "Q10000038", "10000031", "370212")
QIAN_NOT_ACTIVATED = Person("370213199509094562", "钱七", "Q10000046", "10000041", "370213")
SUN_FILED = Person("370102198001015676", "孙八", "Q10000054", "10000051", "370102")
ZHOU_NOT_FILED = Person("370102198808086782", "周九", "Q10000062", "10000061", "370102")


def pin_block(pin: str, ssn: str, key: bytes = PIN_KEY) -> dict[str, str]:
    """A POS's ISO 9564-1 format 4 PIN block for ``pin`` on the card of ``ssn``."""
    return {"source": "block", "block": crypto.iso9564_format4_encipher(key, pin, ssn[:17]).hex().upper()}


def issue_images(directory: Path, person: Person = ZHANG, *, terminal_id: str = A, pin: str = GOOD,
                 **params: Any) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    card = issue_card(CardParams(holder=Holder(name=person.name, ssn=person.ssn), card_no=person.card_no,
                                 serial=bytes.fromhex(person.serial), region=person.region, pin=pin,
                                 **params), roots())
    psam = issue_psam(roots(), terminal_no=terminal_id)
    cp, pp = directory / "card.json", directory / "psam.json"
    TearSafeStore(cp).save(card.to_json())
    TearSafeStore(pp).save(psam.to_json())
    return cp, pp


def config_text(lab: SettleLab, terminal_id: str, workdir: Path, *, card: str = "", psam: str = "",
                answer_timeout: float = 5.0, message_expiry: int = 4, extra: str = "",
                client_id: str | None = None, inst: Inst | None = None, monitor: bool = False) -> str:
    inst = inst or TERMINALS[terminal_id]
    user = broker.daemon_username(terminal_id)
    pw = workdir / "mqtt-password"
    pw.write_text(lab.mosq.passwords[user] + "\n")
    pw.chmod(0o600)
    key = workdir / "pin-block.key"
    key.write_text(PIN_KEY.hex() + "\n")
    key.chmod(0o600)
    return f"""
[terminal]
id = "{terminal_id}"
[institution]
code = "{inst.code}"
name = "{inst.name}"
type = "{inst.type}"
region = "{inst.region}"
[readers]
card = "{card}"
psam = "{psam}"
monitor = {str(monitor).lower()}
[pin]
initial_pins = ["{INITIAL}"]
pin_block_key_file = "{key}"
allow_clear_over_mqtt = true
[mqtt]
host = "127.0.0.1"
port = {lab.mosq.port}
username = "{user}"
password_file = "{pw}"
client_id = "{client_id or terminal_id}"
answer_timeout = {answer_timeout}
message_expiry = {message_expiry}
reconnect_backoff_min = 0.05
reconnect_backoff_max = 0.5
[mqtt.tls]
enabled = true
ca = "{lab.mosq.ca.ca_cert}"
# One journal per terminal for the whole lab, as a real terminal keeps its own: row ids (and so
# message ids) never repeat for a terminal.
[journal]
path = "{lab.workdir / f'journal-{terminal_id}.sqlite3'}"
[reversal]
backoff_min = 0.2
backoff_max = 1.0
[kiosk]
enabled = false
{extra}
"""


@dataclass
class Terminal:
    """One daemon (in-process) with its emulated card and PSAM, and its POS client."""

    lab: SettleLab
    terminal_id: str
    workdir: Path
    cfg: config.Config
    card: EmulatedReader | None  # None: the daemon finds its readers on PC/SC
    psam: EmulatedReader | None
    keypad: ScriptedKeypad
    daemon: Daemon | None = None
    task: asyncio.Task[None] | None = None
    pos: aiomqtt.Client | None = None
    reply_topic: str = ""
    seq: int = 0
    replies: dict[bytes, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None
    images: tuple[Path, Path] = (Path(), Path())

    async def connect_pos(self) -> None:
        """The POS client: the terminal's provisioned POS account, one reply topic (kept across
        reconnects: replies to requests sent before go there)."""
        self.pos = self.lab.mosq.client(broker.pos_username(self.terminal_id),
                                        identifier=f"pos-{uuid.uuid4().hex[:8]}")
        if not self.reply_topic:
            self.reply_topic = f"sscard/v1/term/{self.terminal_id}/reply/{uuid.uuid4().hex[:8]}"
        await self.pos.__aenter__()
        await self.pos.subscribe(self.reply_topic, qos=1)
        self.reader = asyncio.create_task(self._read_replies())

    async def close_pos(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self.reader
            self.reader = None
        if self.pos is not None:
            with contextlib.suppress(Exception):
                await self.pos.__aexit__(None, None, None)
            self.pos = None

    async def reconnect_pos(self) -> None:
        await self.close_pos()
        await self.connect_pos()

    @property
    def journal(self) -> Journal:
        assert self.daemon is not None
        return self.daemon.journal

    async def start(self) -> None:
        self.daemon = Daemon(self.cfg, card_reader=self.card, psam_reader=self.psam)
        self.task = asyncio.create_task(self.daemon.run())
        async with asyncio.timeout(15):
            await self.daemon.ready.wait()
            await self.daemon.link.wait_connected(15)

    async def stop_daemon(self) -> None:
        if self.daemon is not None and self.task is not None:
            self.daemon.stop()
            await asyncio.wait_for(self.task, 15)
        self.daemon = self.task = None

    async def request(self, op: str, args: dict[str, Any] | None = None, *, request_id: str | None = None,
                      timeout: float = 20.0, payload: bytes | None = None) -> dict[str, Any]:
        """Send a POS request and wait for its reply (by Correlation Data)."""
        assert self.pos is not None
        self.seq += 1
        rid = request_id or f"r{self.seq}-{uuid.uuid4().hex[:6]}"
        body = payload if payload is not None else json.dumps(
            {"id": rid, "op": op, "args": args or {}}, ensure_ascii=False).encode()
        corr = uuid.uuid4().bytes
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.replies[corr] = fut
        await self.pos.publish(broker.cmd_topic(self.terminal_id), body, qos=1,
                               properties=request_properties(self.reply_topic, corr))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self.replies.pop(corr, None)

    async def _read_replies(self) -> None:
        assert self.pos is not None
        async for msg in self.pos.messages:
            corr = getattr(msg.properties, "CorrelationData", None)
            fut = self.replies.get(bytes(corr)) if corr is not None else None
            if fut is not None and not fut.done():
                body = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload).encode()
                fut.set_result(json.loads(body))


class SettleLab:
    """The broker, the backends on one ledger, and terminals (see the module docstring)."""

    def __init__(self, mosq: Mosquitto, workdir: Path) -> None:
        self.mosq = mosq
        self.workdir = workdir
        self.db = workdir / "ledger.sqlite3"
        self.broker = HarnessBroker(mosq, BACKEND, broker.daemon_username)
        self.backends: list[BackendProcess] = []
        self._faults: Faults | None = None

    @property
    def faults(self) -> Faults:
        """The fault controls (the ledger exists once a backend started)."""
        if self._faults is None:
            self._faults = Faults(self.db)
        return self._faults

    def start_backend(self, instance: str = "b1", *, reset: bool = False) -> BackendProcess:
        extra = ["--reset"] if reset else []
        proc = BackendProcess(self.workdir, self.broker, self.db, EXAMPLE_SEED, instance, extra=extra)
        proc.start()
        self.backends.append(proc)
        return proc

    def stop(self) -> None:
        for b in self.backends:
            b.stop()
        self.backends.clear()

    def ledger_rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import sqlite3

        with contextlib.closing(sqlite3.connect(self.db)) as db:
            return db.execute(sql, args).fetchall()

    def balance(self, ssn: str) -> str:
        rows = self.ledger_rows("SELECT balance_fen FROM person WHERE ssn = ?", (ssn,))
        fen = int(rows[0][0])
        return f"{fen // 100}.{fen % 100:02d}"

    @contextlib.asynccontextmanager
    async def terminal(self, terminal_id: str = A, person: Person = ZHANG, *, pin: str = GOOD,
                       name: str | None = None, start: bool = True, pcsc: bool = False,
                       **cfg_kw: Any) -> AsyncIterator[Terminal]:
        """A terminal with a daemon in-process: emulated readers handed in, or (``pcsc``) none, the
        daemon finding them on pcscd (serve ``term.images`` into vpcd first, ``start=False``)."""
        workdir = self.workdir / (name or f"t{terminal_id}-{uuid.uuid4().hex[:6]}")
        workdir.mkdir(parents=True)
        card_image, psam_image = issue_images(workdir, person, terminal_id=cfg_kw.pop("psam_terminal",
                                                                                    terminal_id), pin=pin)
        cfg = config.parse(config_text(self, terminal_id, workdir, **cfg_kw), str(workdir / "sscardd.toml"))
        keypad = ScriptedKeypad()
        card = EmulatedReader.from_image(card_image, keypad=keypad, keypad_config=KeypadConfig((INITIAL,)))
        psam = EmulatedReader.from_image(psam_image)
        if pcsc:
            await card.close()
            await psam.close()
            card_r: EmulatedReader | None = None
            psam_r: EmulatedReader | None = None
        else:
            card_r, psam_r = card, psam
        term = Terminal(self, terminal_id, workdir, cfg, card_r, psam_r, keypad)
        term.images = (card_image, psam_image)
        try:
            await term.connect_pos()
            if start:
                await term.start()
            yield term
        finally:
            await term.stop_daemon()
            await term.close_pos()
            await card.close()
            await psam.close()


class DaemonProcess:
    """``sscardd run -c FILE`` as a process (JSON log lines in ``log_path``)."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.log_path = config_path.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = start_process([sys.executable, "-m", "sscardd", "run", "-c", str(self.config_path)],
                                  log=self._log, env=env)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 15.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError(f"no {text!r} in the daemon log{tail_file(self.log_path)}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> int | None:
        proc, self.proc = self.proc, None
        status = stop_process(proc) if proc is not None else None
        if self._log is not None:
            self._log.close()
            self._log = None
        return status


async def pos_messages(client: aiomqtt.Client, timeout: float = 5.0) -> aiomqtt.Message:
    return await next_message(client, timeout)


def lab_for(factory: MosquittoFactory, workdir: Path) -> SettleLab:
    mosq = factory("settle", terminals=tuple(TERMINALS))
    return SettleLab(mosq, workdir)


def capture_requests(link: Any, infno: str) -> list[tuple[bytes, bytes]]:
    """``(payload, Correlation Data)`` of every backend request with this ``infno`` the daemon's
    link publishes from now on (it still publishes them): what a redelivery would carry."""
    sent: list[tuple[bytes, bytes]] = []
    original = link._publish_on
    marker = f'"infno":"{infno}"'.encode()

    async def observe(conn: Any, topic: str, payload: bytes, **kw: Any) -> bool:
        if topic == link.request_topic and marker in payload:
            sent.append((payload, kw["properties"].CorrelationData))
        return bool(await original(conn, topic, payload, **kw))

    link._publish_on = observe
    return sent


@contextlib.contextmanager
def running_lab(factory: MosquittoFactory, workdir: Path) -> Iterator[SettleLab]:
    """A broker provisioned for the seed's terminals and one backend on a fresh ledger, for the
    block; both stopped afterwards."""
    lab = lab_for(factory, workdir)
    try:
        lab.start_backend("b1", reset=True)
        yield lab
    finally:
        lab.stop()
        lab.mosq.stop()
