"""The settlement benchmark: a sale's floor, and sales against it, in one run.

On a mosquitto this benchmark starts itself (one plain listener on a free loopback port,
anonymous, ``set_tcp_nodelay true``, no persistence, its config in a temp dir), each round runs:

1. bare QoS 1 request/response with the daemon's client library (aiomqtt, MQTT 5, TCP_NODELAY on
   every client): requesters publish ~300-byte requests carrying Response Topic, Correlation Data
   and Message Expiry (:func:`sscardd.mqtt.publish_properties`); one responder (its own process by
   default, as the backend is) answers each, in a task of its own, to the Response Topic with the
   Correlation Data echoed, QoS 1 both ways. Concurrency 1: one requester, sequential round trips
   (p50/p90). Concurrency 50: 50 requester clients, each doing sequential round trips, all at once
   (aggregate round trips/s);
2. one durable SQLite commit: WAL, ``synchronous=FULL``, a single-row INSERT + COMMIT, in the
   journal directory (``--journal-dir``, default the temp dir; its filesystem is printed); and
   :meth:`sscardd.journal.Journal.begin` on the real journal (one commit, which it no longer
   syncs: ``received`` is a lazy state);
3. the sale's APDUs in-process: an emulated card and PSAM (``EmulatedReader`` over issued
   images), ``CardSession`` with ``PsamClient``: ``read_basic``, ``authorise_sale`` (identity,
   PIN, two INTERNAL AUTHENTICATEs over sale challenges) when the session has it,
   ``record_settlement``;
4. sales through the daemon (:func:`measure_sales`): one backend simulator process (its own
   ledger; a generated seed: one pharmacy holding the bench's terminals, a card holder per
   terminal, the example policy and catalogue) and C + 1 daemons (:class:`sscardd.service.Daemon`,
   each with its own config, MQTT client, journal, emulated card and PSAM), each with a POS client
   sending ``sale`` requests with a PIN block. Sale p50: one terminal in this process,
   ``--sales`` sales one after the other (POS publish to reply); sales/s: the other C terminals
   at once, ``--sales-each`` sales each, run by N (``--workers``, default 3) worker processes of
   this script, C/N daemons and their POS clients in each worker's own event loop (each terminal
   is a host of its own in a deployment; in one process they would share one core and one GIL);
   then replies, journals and the ledger are compared for lost and doubled sales. Set up in the
   first round, stopped at the end (also on Ctrl-C or SIGTERM: workers, backend, responder and
   broker are stopped, the temp dirs removed).

Card store: the emulated cards and PSAMs of the APDU floor and of the sales are the same kind,
by default images in memory (``--card-store memory``). ``--card-store file`` writes every change
of an image back to disk with an fsync, as ``emulated:IMAGE`` does: that is the emulator's tear
safety, which a real card does not cost the host, not the daemon's work.

Floor = 3 × bare p50 at concurrency 1 (POS, 2101, 2102) + APDU p50 + 4 × durable commit p50 (two
in the daemon, one per backend transaction). Targets: sale p50 ≤ 2 × floor; with 50 terminals and
one backend, 3 × sales/s ≥ 25 % of the bare request/response rate at concurrency 50; no sale lost
or doubled. The phases alternate within every round, so that drift on a shared machine hits all
of them; figures are medians over rounds of the per-round p50s (and rates).

    .venv/bin/python bench/bench_settle.py [--rounds R] [--quick] [--sales N] [--sales-each N]
                                           [--workers N] [--card-store memory|file] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Final, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiomqtt

from apdu_specs import crypto, keyfile
from apdu_specs.sale_auth import sale_challenge
from backend_sim import seed as backend_seed
from firmware_sim.image import CardImage, PsamImage
from firmware_sim.lab import stop_process, tail_file, wait_listening
from firmware_sim.loader import load_card, load_psam
from firmware_sim.personalise import CardParams, Holder, default_card_no, default_ssn, issue_card, issue_psam
from firmware_sim.psam import Psam
from firmware_sim.sscard import SocialSecurityCard
from firmware_sim.store import TearSafeStore
from sscardd.broker import cmd_topic, reply_prefix
from sscardd.config import Config
from sscardd.config import parse as parse_config
from sscardd.journal import Journal
from sscardd.log import configure as configure_logging
from sscardd.mqtt import publish_properties
from sscardd.psam import PsamClient
from sscardd.readers.emulated import EmulatedReader
from sscardd.service import Daemon
from sscardd.session import CardSession, TxnRecord

HOST: Final = "127.0.0.1"
NODELAY: Final = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
REQUEST_PREFIX: Final = "bench/settle/req/"
RESPONSE_PREFIX: Final = "bench/settle/resp/"
PAYLOAD_BYTES: Final = 300
ROUND_TRIP_TIMEOUT: Final = 10.0
REQUEST_EXPIRY: Final = 30  # s, Message Expiry on requests (the daemon sets one too)
TERMINAL_NO: Final = "370212000001"  # the PSAM's terminal number
PIN: Final = "246810"  # the issued cards' PIN (not the initial one: a sale with it is refused)
SALE_TOTAL: Final = "12.50"
_BEIJING: Final = timezone(timedelta(hours=8))

# Processes for the throughput phase's terminals (--workers). Measured on 2 cores, 3 × sales/s
# over the bare rate at 50, medians of 6 to 8 rounds: 0 (all in the bench process) 0.10, 1 0.11,
# 2 0.165, 3 0.18, 4 0.18, 5 0.16.
DEFAULT_WORKERS: Final = 3
# Iteration counts: (full run, --quick).
DEFAULTS: Final = {"rounds": (5, 1), "rr": (1000, 30), "rr_each": (100, 5), "commits": (500, 20),
                   "apdu": (100, 3), "sales": (200, 10), "sales_each": (10, 2)}


CARD_STORES: Final = {"memory": "card and PSAM images in memory, as a real card costs the host no fsync",
                      "file": "images written back and fsynced on every change: the emulator's tear safety"}


class BrokerUnavailable(Exception):
    """No mosquitto here, or it did not come up (the message says why)."""


def _payload(kind: str) -> bytes:
    """A JSON document of exactly PAYLOAD_BYTES bytes (a settlement message's order of size)."""
    head = f'{{"infno":"{kind}","input":{{"data":"'.encode()
    return head + b"0" * (PAYLOAD_BYTES - len(head) - 3) + b'"}}'


REQUEST: Final = _payload("2101")
ANSWER: Final = _payload("0000")


_PR_SET_PDEATHSIG: Final = 1


def _helper_preexec() -> None:
    """In a helper process before exec: a process group of its own, so that Ctrl-C (SIGINT to the
    terminal's foreground group) reaches only the bench process, which then stops its helpers in
    order (the daemons before the backend and the broker); SIGTERM when the bench process dies."""
    os.setpgid(0, 0)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def start_helper(argv: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    """A helper process (broker, responder, backend) as :func:`firmware_sim.lab.start_process`
    starts one, in a process group of its own (:func:`_helper_preexec`)."""
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=_helper_preexec)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def filesystem_of(path: Path) -> str:
    """``"fstype on mountpoint"`` for ``path`` (from /proc/mounts; "?" where that cannot tell)."""
    target = str(path.resolve())
    best = ("", "?")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1].replace("\\040", " ")
            inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best[0]):
                best = (mnt, parts[2])
    return f"{best[1]} on {best[0] or '?'}"


async def cancel_task(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended, whatever it raised, without swallowing a
    cancellation of the caller (awaiting the task under ``suppress(CancelledError)`` would: Ctrl-C
    would then go unnoticed)."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: nobody waits for it


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# -- the broker ------------------------------------------------------------------------------------


class Mosquitto:
    """mosquitto with one anonymous plaintext listener on 127.0.0.1 (TCP_NODELAY, no persistence),
    its config and log in ``workdir``; :meth:`client` makes MQTT 5 clients with TCP_NODELAY."""

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
                             "log_type notice\n")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = start_helper([exe, "-c", str(self.conf)], log=self._log)
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

    def client(self, name: str, **kwargs: Any) -> aiomqtt.Client:
        return mqtt_client(self.host, self.port, name, **kwargs)


def mqtt_client(host: str, port: int, name: str, **kwargs: Any) -> aiomqtt.Client:
    """An MQTT 5 client of the bench broker with TCP_NODELAY (also in a worker process)."""
    return aiomqtt.Client(host, port, identifier=f"bench-{name}-{uuid.uuid4().hex[:8]}",
                          protocol=aiomqtt.ProtocolVersion.V5, socket_options=[NODELAY], **kwargs)


# -- bare request/response -------------------------------------------------------------------------


async def serve_responder(host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Answer every request on ``bench/settle/req/+``: ANSWER to its Response Topic, Correlation
    Data echoed, QoS 1; one task per request (as the backend simulator dispatches). Runs until
    cancelled."""
    client = aiomqtt.Client(host, port, identifier=f"bench-responder-{uuid.uuid4().hex[:8]}",
                            protocol=aiomqtt.ProtocolVersion.V5, socket_options=[NODELAY])
    tasks: set[asyncio.Task[None]] = set()

    async def answer(msg: aiomqtt.Message) -> None:
        topic = getattr(msg.properties, "ResponseTopic", None)
        corr = getattr(msg.properties, "CorrelationData", None)
        if not topic:
            return
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(topic, ANSWER, qos=1, properties=publish_properties(correlation=corr))

    async with client:
        await client.subscribe(REQUEST_PREFIX + "+", qos=1)
        if ready is not None:
            ready.set()
        try:
            async for msg in client.messages:
                task = asyncio.create_task(answer(msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in list(tasks):
                task.cancel()


def responder_main(address: str) -> int:
    """``--serve-responder HOST:PORT``: the responder as a process, until SIGTERM."""
    host, _, port = address.rpartition(":")

    async def run() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve_responder(host, int(port))

    asyncio.run(run())
    return 0


class Requester:
    """One requester client: its own response topic, a reader task that matches answers by
    Correlation Data (counting answers nobody waits for: ``doubled`` if that correlation was
    answered before, ``stray`` otherwise)."""

    def __init__(self, broker: Mosquitto, name: str) -> None:
        self.client = broker.client(name)
        self.name = name
        self.request_topic = REQUEST_PREFIX + name
        self.response_topic = RESPONSE_PREFIX + name
        self._pending: dict[bytes, asyncio.Future[None]] = {}
        self._answered: set[bytes] = set()
        self._seq = 0
        self._reader: asyncio.Task[None] | None = None
        self.lost = self.doubled = self.stray = 0

    async def __aenter__(self) -> Requester:
        await self.client.__aenter__()
        await self.client.subscribe(self.response_topic, qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            if self._reader is not None:
                await cancel_task(self._reader)
        finally:
            await self.client.__aexit__(et, e, tb)

    async def _read(self) -> None:
        async for msg in self.client.messages:
            corr = getattr(msg.properties, "CorrelationData", None)
            if not isinstance(corr, bytes):
                self.stray += 1
                continue
            fut = self._pending.pop(corr, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
                self._answered.add(corr)
            elif corr in self._answered:
                self.doubled += 1
            else:
                self.stray += 1

    async def round_trip(self, timeout: float = ROUND_TRIP_TIMEOUT) -> float | None:
        """One request and its answer: milliseconds, or None (counted lost) after ``timeout``."""
        self._seq += 1
        corr = f"{self.name}/{self._seq}".encode()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[corr] = fut
        props = publish_properties(response_topic=self.response_topic, correlation=corr,
                                   expiry=REQUEST_EXPIRY)
        t0 = time.perf_counter_ns()
        await self.client.publish(self.request_topic, REQUEST, qos=1, properties=props)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            self._pending.pop(corr, None)
            self.lost += 1
            return None
        return (time.perf_counter_ns() - t0) / 1e6


class Responder:
    """The bare responder: a child process (``process``, as the backend runs) or a task in this
    event loop (``inline``)."""

    def __init__(self, broker: Mosquitto, mode: str) -> None:
        self.broker, self.mode = broker, mode
        self.log_path = broker.workdir / "responder.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 20.0) -> None:
        if self.mode == "process":
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            self._proc = start_helper([sys.executable, str(Path(__file__).resolve()), "--serve-responder",
                                        f"{self.broker.host}:{self.broker.port}"], log=self._log)
        else:
            self._task = asyncio.create_task(serve_responder(self.broker.host, self.broker.port))
        # Ready when a request gets its answer (one published before it subscribed is lost).
        deadline = time.monotonic() + timeout
        async with Requester(self.broker, "ping") as ping:
            while await ping.round_trip(timeout=0.5) is None:
                if (self._proc is not None and self._proc.poll() is not None) or time.monotonic() > deadline:
                    raise RuntimeError(f"the bare responder does not answer{tail_file(self.log_path)}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_task(task)
        proc, self._proc = self._proc, None
        if proc is not None:
            await asyncio.to_thread(stop_process, proc)
        if self._log is not None:
            self._log.close()
            self._log = None


async def bare_sequential(broker: Mosquitto, n: int, warmup: int) -> dict[str, float]:
    """Concurrency 1: one requester, ``n`` sequential round trips."""
    async with Requester(broker, f"c1-{uuid.uuid4().hex[:6]}") as req:
        for _ in range(warmup):
            await req.round_trip()
        times = [t for _ in range(n) if (t := await req.round_trip()) is not None]
        await asyncio.sleep(0.05)  # a doubled answer would arrive by now
        return {"p50": statistics.median(times) if times else float("nan"),
                "p90": pct(times, 0.9) if times else float("nan"),
                "lost": req.lost, "doubled": req.doubled}


async def bare_concurrent(broker: Mosquitto, clients: int, each: int, warmup: int) -> dict[str, float]:
    """Concurrency ``clients``: that many requester clients, each ``each`` sequential round trips,
    all started together; the rate is all round trips over the time until the last one ends."""
    tag = uuid.uuid4().hex[:6]
    async with contextlib.AsyncExitStack() as stack:
        reqs = [await stack.enter_async_context(Requester(broker, f"c{clients}-{tag}-{i:03d}"))
                for i in range(clients)]
        for _ in range(warmup):
            await asyncio.gather(*(r.round_trip() for r in reqs))
        go = asyncio.Event()

        async def work(r: Requester) -> list[float]:
            await go.wait()
            return [t for _ in range(each) if (t := await r.round_trip()) is not None]

        tasks = [asyncio.create_task(work(r)) for r in reqs]
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        go.set()
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(0.05)
        times = [t for ts in results for t in ts]
        return {"rate": len(times) / elapsed, "p50": statistics.median(times) if times else float("nan"),
                "lost": sum(r.lost for r in reqs), "doubled": sum(r.doubled for r in reqs)}


# -- durable commits ----------------------------------------------------------------------------


class RawCommits:
    """Single-row INSERT + COMMIT in WAL mode with ``synchronous=FULL`` (what every journal write
    costs at least)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{path}: SQLite cannot use WAL here (journal_mode {mode})")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, at REAL NOT NULL, body BLOB)")
        self.body = os.urandom(200)

    def measure(self, n: int, warmup: int) -> list[float]:
        db, body, clock = self.db, self.body, time.perf_counter_ns
        out = []
        for i in range(warmup + n):
            t0 = clock()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t (at, body) VALUES (?, ?)", (time.time(), body))
            db.execute("COMMIT")
            if i >= warmup:
                out.append((clock() - t0) / 1e6)
        return out

    def close(self) -> None:
        self.db.close()


def journal_begins(journal: Journal, n: int, warmup: int, tag: str) -> list[float]:
    """``Journal.begin`` of a new sale (one transaction: lookup by request id + INSERT; not synced now)."""
    args = {"request_id": "", "total": SALE_TOTAL, "insutype": "310", "med_type": "41",
            "items": [{"code": "X", "qty": 1, "price": SALE_TOTAL}]}
    out = []
    for i in range(warmup + n):
        t0 = time.perf_counter_ns()
        journal.begin(f"bench-{tag}-{i}", "sale", args, terminal_id=TERMINAL_NO)
        if i >= warmup:
            out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


# -- the sale's APDUs --------------------------------------------------------------------------------


def issue_images(workdir: Path, name: str, *, generation: int = 3, serial: bytes = bytes.fromhex("12345678"),
                 terminal_no: str = TERMINAL_NO, pin: str = PIN) -> tuple[Path, Path]:
    """A card image and its PSAM image, ``{name}-card.json`` / ``{name}-psam.json`` in ``workdir``
    (as tests/rigs.write_images issues them; ``serial`` makes the card number)."""
    roots = keyfile.load(keyfile.DEFAULT_TEST_KEYFILE)
    card = issue_card(CardParams(generation=generation, pin=pin, serial=serial), roots)
    psam = issue_psam(roots, terminal_no=terminal_no)
    card_path, psam_path = workdir / f"{name}-card.json", workdir / f"{name}-psam.json"
    TearSafeStore(card_path).save(card.to_json())
    TearSafeStore(psam_path).save(psam.to_json())
    return card_path, psam_path


def open_readers(card_path: Path, psam_path: Path,
                 store: str = "file") -> tuple[EmulatedReader, EmulatedReader]:
    """Card and PSAM readers over the images: ``file`` writes every change back, durably, as
    ``emulated:IMAGE`` does; ``memory`` keeps the images in memory only."""
    if store == "file":
        return EmulatedReader(load_card(card_path), name=f"emulated:{card_path}"), \
            EmulatedReader(load_psam(psam_path), name=f"emulated:{psam_path}")
    card = SocialSecurityCard(CardImage.from_json(TearSafeStore(card_path).load()))
    psam = Psam(PsamImage.from_json(TearSafeStore(psam_path).load()))
    return EmulatedReader(card, name="emulated:memory"), EmulatedReader(psam, name="emulated:memory-psam")


@dataclass
class SaleCard:
    """The card work of one sale, in-process: read_basic, authorise_sale (when the session has
    it: identity + PIN + INTERNAL AUTHENTICATE for the 2101 and the 2102), record_settlement."""

    card: EmulatedReader
    psam: EmulatedReader
    session: CardSession
    seq: int = 0

    @classmethod
    def open(cls, card_path: Path, psam_path: Path, store: str) -> SaleCard:
        card, psam = open_readers(card_path, psam_path, store)
        return cls(card, psam, CardSession(card, PsamClient(psam)))

    @property
    def authorises(self) -> bool:
        return hasattr(self.session, "authorise_sale")

    def steps(self) -> str:
        return " + ".join(["read_basic", *(["authorise_sale"] if self.authorises else []),
                           "record_settlement"])

    async def sale(self) -> None:
        self.seq += 1
        info = await self.session.read_basic()
        # HOOK: CardSession.authorise_sale (being added) — included whenever the session has it.
        authorise = getattr(self.session, "authorise_sale", None)
        if authorise is not None:
            msgids = [f"{TERMINAL_NO}{self.seq:010d}{infno}" for infno in ("2101", "2102")]
            challenges = [sale_challenge(m, SALE_TOTAL, TERMINAL_NO) for m in msgids]
            await authorise(info.card_id, challenges, pin=PIN)
        now = datetime.now(_BEIJING).strftime("%Y%m%d%H%M%S")
        if not await self.session.record_settlement(TxnRecord(self.seq, TERMINAL_NO, now, 1000, 250, 0)):
            raise RuntimeError("the card refused the settlement record")

    async def count_apdus(self) -> dict[str, int]:
        counts: dict[str, int] = {}

        def count(label: str, _c: bytes, _r: bytes) -> None:
            counts[label] = counts.get(label, 0) + 1

        assert self.session.psam is not None
        self.session.trace = self.session.psam.trace = count
        try:
            await self.sale()
        finally:
            self.session.trace = self.session.psam.trace = None
        return counts

    async def measure(self, n: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            await self.sale()
        out = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            await self.sale()
            out.append((time.perf_counter_ns() - t0) / 1e6)
        return out

    async def close(self) -> None:
        await self.card.close()
        await self.psam.close()


# -- sales through the daemon -----------------------------------------------------------------------
#
# One backend simulator process (its own ledger, a generated seed: one pharmacy with the bench's
# terminals, one card holder per terminal, the example catalogue and policy) and ``concurrency`` + 1
# daemons (sscardd.service.Daemon, each with its own config, MQTT client id, journal, emulated card
# and PSAM), each with a POS client of its own (aiomqtt, MQTT 5, TCP_NODELAY) that sends ``sale``
# requests with a PIN block, Response Topic and Correlation Data. The latency terminal runs in this
# event loop; the ``concurrency`` terminals of the throughput phase in ``--workers`` worker
# processes (``--worker SPEC``: each its share of the daemons and their POS clients in an event loop
# of its own, as each terminal is a host of its own in a deployment), or here with ``--workers 0``.
# Set up on the first call of measure_sales, torn down by close_sales.

SALE_INSTITUTION: Final = {"code": "P37021200001", "name": "崂山康泰大药房", "type": "pharmacy",
                           "region": "370212"}
SALE_TERMINAL_BASE: Final = 370212100000  # terminal i (1-based) is 370212100000 + i
HOLDER_REGION: Final = "370202"  # the cards' and the holders' insured region (the pharmacy's area, 3702)
INITIAL_PIN: Final = "123456"
SALE_ITEMS: Final = ({"code": "A0001", "qty": 1, "price": SALE_TOTAL},)  # class a: from the account
SALE_OPERATOR: Final = {"id": "0001", "name": "王药师"}
SALE_BALANCE: Final = "10000000.00"  # never runs out
ANSWER_TIMEOUT: Final = 15  # s, the daemons' mqtt.answer_timeout (message_expiry 10)
SALE_TIMEOUT: Final = 2 * ANSWER_TIMEOUT + 10.0  # s, a POS waits this long for a reply
WARMUP_SALES: Final = 5  # sequential sales before the timed ones (one terminal)
EXAMPLE_SEED: Final = Path(__file__).resolve().parent.parent / "config" / "backend-seed.example.toml"
_SEED_HEADER = re.compile(r"\s*\[\[?\s*([A-Za-z0-9_-]+)")


@dataclass(frozen=True)
class SalePerson:
    """A card holder: in the seed (with a balance) and on the card the bench issues."""

    ssn: str
    card_no: str
    serial: bytes
    name: str = "测试员"

    @classmethod
    def number(cls, i: int) -> SalePerson:
        """Holder ``i`` (1-based): ID number and card number with valid check characters."""
        ssn = default_ssn(HOLDER_REGION, f"{1960 + i // 1000:04d}0101", i % 1000)
        serial = (0x30000000 + i).to_bytes(4, "big")
        return cls(ssn=ssn, card_no=default_card_no(serial), serial=serial)


def _example_sections(text: str, wanted: tuple[str, ...]) -> list[str]:
    """The lines of the tables ``wanted`` (``[name]``, ``[name.sub]``, ``[[name]]``) in seed text."""
    out, keep = [], False
    for line in text.splitlines():
        m = _SEED_HEADER.match(line)
        if m:
            keep = m.group(1) in wanted
        if keep:
            out.append(line)
    return out


def sale_seed(terminals: list[str], persons: list[SalePerson]) -> str:
    """The backend seed: the example's policy and catalogue, one pharmacy holding ``terminals``
    and ``persons`` with large balances."""
    example = EXAMPLE_SEED.read_text(encoding="utf-8")
    inst = SALE_INSTITUTION
    out = ['format = "sscard-backend-seed/1"',
           'description = "bench_settle: one pharmacy, its terminals and their card holders"', ""]
    out += _example_sections(example, ("policy",))
    out += ["", "[[institution]]", f'code = "{inst["code"]}"', f'name = "{inst["name"]}"',
            f'type = "{inst["type"]}"', f'region = "{inst["region"]}"', 'status = "active"',
            "terminals = [" + ", ".join(f'"{t}"' for t in terminals) + "]"]
    for p in persons:
        out += ["", "[[person]]", f'ssn = "{p.ssn}"', f'name = "{p.name}"', f'card_no = "{p.card_no}"',
                f'balance = "{SALE_BALANCE}"', 'status = "normal"', f'insured_region = "{HOLDER_REGION}"',
                "activated = true"]
    out += ["", *_example_sections(example, ("item",)), ""]
    return "\n".join(out)


def issue_sale_images(workdir: Path, terminal_id: str, person: SalePerson,
                      generation: int) -> tuple[Path, Path]:
    """The card of ``person`` (PIN :data:`PIN`) and a PSAM for ``terminal_id``."""
    roots = keyfile.load(keyfile.DEFAULT_TEST_KEYFILE)
    card = issue_card(CardParams(holder=Holder(name=person.name, ssn=person.ssn), region=HOLDER_REGION,
                                 card_no=person.card_no, serial=person.serial, pin=PIN,
                                 generation=generation), roots)
    psam = issue_psam(roots, terminal_no=terminal_id)
    card_path, psam_path = workdir / f"{terminal_id}-card.json", workdir / f"{terminal_id}-psam.json"
    TearSafeStore(card_path).save(card.to_json())
    TearSafeStore(psam_path).save(psam.to_json())
    return card_path, psam_path


def daemon_config(terminal_id: str, host: str, port: int, journal: Path, key_file: Path,
                  client_id: str) -> str:
    """A daemon's config: the bench broker (plain, anonymous), PIN blocks, no kiosk, no monitor."""
    inst = SALE_INSTITUTION
    return f"""
[terminal]
id = "{terminal_id}"
[institution]
code = "{inst['code']}"
name = "{inst['name']}"
type = "{inst['type']}"
region = "{inst['region']}"
[readers]
monitor = false
[pin]
initial_pins = ["{INITIAL_PIN}"]
pin_block_key_file = "{key_file}"
[mqtt]
host = "{host}"
port = {port}
client_id = "{client_id}"
answer_timeout = {ANSWER_TIMEOUT}
message_expiry = {ANSWER_TIMEOUT - 5}
reconnect_backoff_min = 0.05
reconnect_backoff_max = 0.5
[mqtt.tls]
enabled = false
[journal]
path = "{journal}"
[kiosk]
enabled = false
"""


@dataclass
class SaleOutcome:
    terminal_id: str
    request_id: str
    ms: float
    reply: dict[str, Any] | None  # None: no reply within SALE_TIMEOUT

    @property
    def ok(self) -> bool:
        return self.reply is not None and self.reply.get("ok") is True

    @property
    def code(self) -> str:
        if self.reply is None:
            return "NO_REPLY"
        if self.ok:
            return "ok"
        err = self.reply.get("error")
        return str(err.get("code")) if isinstance(err, dict) else "?"

    def result(self, key: str) -> str | None:
        res = self.reply.get("result") if self.reply is not None else None
        value = res.get(key) if isinstance(res, dict) else None
        return value if isinstance(value, str) else None

    def encode(self) -> list[Any]:
        """As a worker sends it to the bench process (JSON)."""
        return [self.terminal_id, self.request_id, self.ms, self.reply]

    @classmethod
    def decode(cls, doc: list[Any]) -> SaleOutcome:
        tid, rid, ms, reply = doc
        return cls(str(tid), str(rid), float(ms), reply if isinstance(reply, dict) else None)


class SaleTerminal:
    """One terminal: its daemon (in this event loop) with emulated card and PSAM, and its POS."""

    def __init__(self, terminal_id: str, person: SalePerson, cfg: Config, readers: tuple[EmulatedReader,
                 EmulatedReader], host: str, port: int, pin_key: bytes) -> None:
        self.terminal_id = terminal_id
        self.person = person
        self.cfg = cfg
        self.card, self.psam = readers
        self.pin_key = pin_key
        self.daemon: Daemon | None = None
        self.task: asyncio.Task[None] | None = None
        self.pos = mqtt_client(host, port, f"pos-{terminal_id}")
        self.pos_open = False
        self.reply_topic = f"{reply_prefix(terminal_id)}bench-{uuid.uuid4().hex[:8]}"
        self.cmd_topic = cmd_topic(terminal_id)
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self._answered: set[bytes] = set()
        self.seq = 0
        self.doubled_replies = self.stray_replies = 0

    async def start(self) -> None:
        self.daemon = Daemon(self.cfg, card_reader=self.card, psam_reader=self.psam)
        self.task = asyncio.create_task(self.daemon.run(), name=f"daemon-{self.terminal_id}")
        await self.pos.__aenter__()
        self.pos_open = True
        await self.pos.subscribe(self.reply_topic, qos=1)
        self._reader = asyncio.create_task(self._read())
        async with asyncio.timeout(30):
            ready = asyncio.create_task(self.daemon.ready.wait())
            await asyncio.wait({ready, self.task}, return_when=asyncio.FIRST_COMPLETED)
            if self.task.done():
                ready.cancel()
                self.task.result()  # raises why the daemon ended
                raise RuntimeError(f"daemon {self.terminal_id} ended before it was ready")
            await self.daemon.link.wait_connected(30)
        if self.daemon.psam_state.state != "ok":
            raise RuntimeError(f"daemon {self.terminal_id}: PSAM {self.daemon.psam_state.state}")

    async def _read(self) -> None:
        async for msg in self.pos.messages:
            raw_corr = getattr(msg.properties, "CorrelationData", None)
            corr = bytes(raw_corr) if isinstance(raw_corr, bytes | bytearray) else b""
            fut = self._pending.pop(corr, None)
            if fut is not None:
                if not fut.done():
                    p = msg.payload
                    raw = p if isinstance(p, bytes | bytearray) else str(p).encode()
                    try:
                        fut.set_result(json.loads(raw))
                    except ValueError:
                        fut.set_result({"ok": False, "error": {"code": "UNREADABLE_REPLY"}})
                    self._answered.add(corr)
            elif corr in self._answered:
                self.doubled_replies += 1
            else:
                self.stray_replies += 1

    def _body(self) -> tuple[str, bytes]:
        self.seq += 1
        request_id = f"s{self.seq}-{uuid.uuid4().hex[:8]}"
        block = crypto.iso9564_format4_encipher(self.pin_key, PIN, self.person.ssn[:17]).hex().upper()
        doc = {"id": request_id, "op": "sale",
               "args": {"operator": SALE_OPERATOR, "items": list(SALE_ITEMS),
                        "pin": {"source": "block", "block": block}}}
        return request_id, json.dumps(doc, ensure_ascii=False).encode()

    async def sale(self) -> SaleOutcome:
        """One sale: POS request (a fresh PIN block, as a POS makes one per sale) to its reply."""
        request_id, body = self._body()
        corr = f"{self.terminal_id}/{self.seq}".encode()
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[corr] = fut
        props = publish_properties(response_topic=self.reply_topic, correlation=corr, expiry=REQUEST_EXPIRY)
        t0 = time.perf_counter_ns()
        await self.pos.publish(self.cmd_topic, body, qos=1, properties=props)
        reply: dict[str, Any] | None
        try:
            async with asyncio.timeout(SALE_TIMEOUT):
                reply = await fut
        except TimeoutError:
            self._pending.pop(corr, None)
            reply = None
        return SaleOutcome(self.terminal_id, request_id, (time.perf_counter_ns() - t0) / 1e6, reply)

    async def stop(self) -> None:
        if self.daemon is not None and self.task is not None:
            self.daemon.stop()
            try:
                await asyncio.wait_for(self.task, 15)
            except Exception as exc:  # reported; the teardown goes on
                print(f"bench_settle: daemon {self.terminal_id} did not stop cleanly: {exc!r}",
                      file=sys.stderr)
        if self._reader is not None:
            await cancel_task(self._reader)
        if self.pos_open:
            self.pos_open = False
            with contextlib.suppress(Exception):
                await self.pos.__aexit__(None, None, None)
        for reader in (self.card, self.psam):  # the daemon closes them too; closing twice is harmless
            with contextlib.suppress(Exception):
                await reader.close()


@dataclass(frozen=True)
class TerminalSpec:
    """Terminal ``number`` (1-based: id SALE_TERMINAL_BASE + number, holder SalePerson.number):
    its issued images, journal and MQTT client id."""

    number: int
    card: str
    psam: str
    journal: str
    client_id: str

    @property
    def terminal_id(self) -> str:
        return str(SALE_TERMINAL_BASE + self.number)


@dataclass(frozen=True)
class HostSpec:
    """What one process needs to run a set of terminals (a worker reads it as JSON)."""

    host: str
    port: int
    key_file: str
    workdir: str
    card_store: str
    log_level: str
    terminals: tuple[TerminalSpec, ...]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> HostSpec:
        doc = json.loads(text)
        return cls(**{**doc, "terminals": tuple(TerminalSpec(**t) for t in doc["terminals"])})

    def build(self) -> list[SaleTerminal]:
        """The terminals, not started: config parsed, card and PSAM opened."""
        key_file, workdir = Path(self.key_file), Path(self.workdir)
        pin_key = bytes.fromhex(key_file.read_text().strip())
        out = []
        for t in self.terminals:
            tid = t.terminal_id
            text = daemon_config(tid, self.host, self.port, Path(t.journal), key_file, t.client_id)
            cfg = parse_config(text, f"<bench daemon {tid}>", workdir)
            out.append(SaleTerminal(tid, SalePerson.number(t.number), cfg,
                                    open_readers(Path(t.card), Path(t.psam), self.card_store),
                                    self.host, self.port, pin_key))
        return out


class TerminalHost(Protocol):
    """Where a set of terminals runs: this event loop (:class:`LocalTerminals`) or a worker
    process (:class:`WorkerTerminals`)."""

    @property
    def doubled_replies(self) -> int: ...

    async def start(self) -> None: ...

    async def sales(self, rounds: int) -> list[SaleOutcome]: ...

    async def run(self, each: int, at: float) -> tuple[list[SaleOutcome], float]: ...

    async def stop(self) -> None: ...


class LocalTerminals:
    """Terminals whose daemons and POS clients run in this process's event loop."""

    def __init__(self, terminals: list[SaleTerminal]) -> None:
        self.terminals = terminals

    @property
    def doubled_replies(self) -> int:
        return sum(t.doubled_replies for t in self.terminals)

    async def start(self) -> None:
        await asyncio.gather(*(t.start() for t in self.terminals))

    async def sales(self, rounds: int) -> list[SaleOutcome]:
        """``rounds`` times one sale at every terminal at once."""
        out: list[SaleOutcome] = []
        for _ in range(rounds):
            out += await asyncio.gather(*(t.sale() for t in self.terminals))
        return out

    async def run(self, each: int, at: float) -> tuple[list[SaleOutcome], float]:
        """From ``at`` (time.monotonic, the same clock in every process here) every terminal does
        ``each`` sales one after the other, all at once: the outcomes, and when the last ended."""

        go = asyncio.Event()

        async def work(t: SaleTerminal) -> list[SaleOutcome]:
            await go.wait()
            return [await t.sale() for _ in range(each)]

        tasks = [asyncio.create_task(work(t)) for t in self.terminals]
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        go.set()
        results = await asyncio.gather(*tasks)
        end = time.monotonic()
        await asyncio.sleep(0.05)  # a doubled reply would arrive by now
        return [o for r in results for o in r], end

    async def stop(self) -> None:
        await asyncio.gather(*(t.stop() for t in self.terminals), return_exceptions=True)


WORKER_PIPE_LIMIT: Final = 1 << 24  # bytes: a worker's answer is one JSON line with its sales' replies
class WorkerTerminals:
    """Terminals in a worker process (this script with ``--worker SPEC``, its own interpreter and
    event loop, as every terminal is a host of its own): the calls of :class:`LocalTerminals` as
    JSON lines on the worker's stdin, answered on its stdout; its stderr is ours."""

    def __init__(self, index: int, spec: HostSpec, spec_path: Path) -> None:
        self.index = index
        self.spec_path = spec_path
        spec_path.write_text(spec.to_json(), encoding="utf-8")
        self.proc: asyncio.subprocess.Process | None = None
        self._doubled = 0
        self._busy = True  # a command (or the start) is under way: stop() then terminates the worker

    @property
    def doubled_replies(self) -> int:
        return self._doubled

    async def start(self, timeout: float = 120.0) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "--worker", str(self.spec_path),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None,
            preexec_fn=_helper_preexec, limit=WORKER_PIPE_LIMIT)
        await self._answer(timeout)  # {"ready": n}: daemons ready, POS clients subscribed
        self._busy = False

    async def _answer(self, timeout: float) -> dict[str, Any]:
        proc = self.proc
        if proc is None or proc.stdout is None:
            raise RuntimeError(f"sales worker {self.index} is not running")
        async with asyncio.timeout(timeout):
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError(f"sales worker {self.index} ended (exit status {await proc.wait()})")
        msg: dict[str, Any] = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"sales worker {self.index}: {msg['error']}")
        self._doubled = int(msg.get("doubled_replies", self._doubled))
        return msg

    async def _call(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self.proc is None or self.proc.stdin is None:
            raise RuntimeError(f"sales worker {self.index} is not running")
        self._busy = True
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        await self.proc.stdin.drain()
        msg = await self._answer(timeout)
        self._busy = False
        return msg

    async def sales(self, rounds: int) -> list[SaleOutcome]:
        msg = await self._call({"cmd": "sales", "rounds": rounds}, rounds * SALE_TIMEOUT + 30)
        return [SaleOutcome.decode(o) for o in msg["outcomes"]]

    async def run(self, each: int, at: float) -> tuple[list[SaleOutcome], float]:
        msg = await self._call({"cmd": "run", "each": each, "at": at}, each * SALE_TIMEOUT + 30)
        return [SaleOutcome.decode(o) for o in msg["outcomes"]], float(msg["end"])

    async def stop(self, timeout: float = 30.0) -> None:
        """End of input (or SIGTERM, when a command is under way): the worker stops its daemons and
        exits; SIGTERM, then SIGKILL, if it does not within ``timeout`` s (or if we are cancelled
        meanwhile)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            if self._busy and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                print(f"bench_settle: sales worker {self.index} did not stop; terminating it",
                      file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 5)
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(proc.wait(), 5)


def worker_main(spec_path: str) -> int:
    """``--worker SPEC``: run the terminals of SPEC (a :class:`HostSpec`), answering the bench
    process's commands (JSON lines on stdin) on stdout, until stdin ends or SIGTERM."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")  # the answers; anything else printed goes to stderr
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec = HostSpec.from_json(Path(spec_path).read_text(encoding="utf-8"))
    configure_logging(spec.log_level)

    def send(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg, ensure_ascii=False) + "\n")
        out.flush()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        # One thread per daemon for its journal calls, as the daemons' own processes would have.
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(
            max_workers=len(spec.terminals) + 8, thread_name_prefix="bench-daemons"))
        commands = asyncio.StreamReader(limit=WORKER_PIPE_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
        host = LocalTerminals(spec.build())
        try:
            await host.start()
            send({"ready": len(host.terminals)})
            while line := await commands.readline():
                cmd = json.loads(line)
                if cmd["cmd"] == "sales":
                    outcomes = await host.sales(int(cmd["rounds"]))
                    send({"outcomes": [o.encode() for o in outcomes],
                          "doubled_replies": host.doubled_replies})
                elif cmd["cmd"] == "run":
                    outcomes, end = await host.run(int(cmd["each"]), float(cmd["at"]))
                    send({"outcomes": [o.encode() for o in outcomes], "end": end,
                          "doubled_replies": host.doubled_replies})
                else:
                    send({"error": f"unknown command {cmd!r}"})
        except Exception as exc:
            with contextlib.suppress(OSError):
                send({"error": "".join(traceback.format_exception_only(exc)).strip()})
            raise
        finally:
            await host.stop()

    try:
        asyncio.run(serve())
    except asyncio.CancelledError:  # SIGTERM
        return 128 + signal.SIGTERM
    except Exception:
        traceback.print_exc()
        return 1
    return 0


class SalesRig:
    """The backend process and the terminals, set up once for all rounds: the latency terminal in
    this event loop; the ``concurrency`` terminals of the throughput phase in ``--workers`` worker
    processes (or in this event loop too with ``--workers 0``)."""

    def __init__(self, args: argparse.Namespace, broker: Mosquitto) -> None:
        self.args, self.broker = args, broker
        self.workdir = broker.workdir / "sales"
        self.jdir = Path(tempfile.mkdtemp(prefix="bench_settle-sales-", dir=args.journal_dir))
        self.ledger_path = self.jdir / "ledger.sqlite3"  # on the journals' filesystem, as the floor's commits
        self.backend_log = self.workdir / "backend.log"
        self.backend: subprocess.Popen[bytes] | None = None
        self._backend_log: IO[bytes] | None = None
        self.latency: SaleTerminal | None = None  # one sale after the other, for the p50
        self.hosts: list[TerminalHost] = []  # the terminals of the throughput phase
        self.journals: dict[str, Path] = {}  # terminal id -> journal, every terminal
        self.setup_outcomes: list[SaleOutcome] = []
        self.flagged: set[str] = set()  # discrepancies counted already
        self.ok_seen: dict[tuple[str, str], str] = {}  # (terminal, msgid) -> request id of its ok reply

    def _all_hosts(self) -> list[TerminalHost]:
        return [*([LocalTerminals([self.latency])] if self.latency is not None else []), *self.hosts]

    async def start(self) -> None:
        args, n, workers = self.args, self.args.concurrency, self.args.workers
        self.workdir.mkdir(parents=True, exist_ok=True)
        t_setup = time.perf_counter()
        # One thread per daemon here for its journal calls (asyncio.to_thread), as the daemons' own
        # processes would have: the default pool (min(32, cpus + 4) threads) would be shared.
        local_daemons = 1 + (n if workers == 0 else 0)
        asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(
            max_workers=local_daemons + 8, thread_name_prefix="bench-daemons"))
        numbers = list(range(1, n + 2))  # 1..n: throughput; n + 1: latency
        terminals = [str(SALE_TERMINAL_BASE + i) for i in numbers]
        persons = [SalePerson.number(i) for i in numbers]
        seed_path = self.workdir / "seed.toml"
        seed_path.write_text(sale_seed(terminals, persons), encoding="utf-8")
        backend_seed.load(seed_path)  # a bad seed fails here, with the backend's own message
        self._backend_log = open(self.backend_log, "ab")  # noqa: SIM115 - closed in close()
        self.backend = start_helper(
            [sys.executable, "-m", "backend_sim", "run", "--seed", str(seed_path),
             "--db", str(self.ledger_path), "--reset", "--broker", f"{self.broker.host}:{self.broker.port}",
             "--instance", "bench",
             "--client-id", f"bench-backend-{uuid.uuid4().hex[:8]}"], log=self._backend_log)
        key_file = self.workdir / "pin-block.key"
        key_file.write_text(os.urandom(16).hex() + "\n")
        key_file.chmod(0o600)
        images = await asyncio.to_thread(
            lambda: [issue_sale_images(self.workdir, t, p, args.generation)
                     for t, p in zip(terminals, persons, strict=True)])
        specs = [TerminalSpec(i, str(card), str(psam), str(self.jdir / f"journal-{tid}.sqlite3"),
                              f"bench-{tid}-{uuid.uuid4().hex[:6]}")
                 for i, tid, (card, psam) in zip(numbers, terminals, images, strict=True)]
        self.journals = {s.terminal_id: Path(s.journal) for s in specs}

        def host_spec(ts: list[TerminalSpec]) -> HostSpec:
            return HostSpec(self.broker.host, self.broker.port, str(key_file), str(self.workdir),
                            args.card_store, args.log_level, tuple(ts))

        self.latency = host_spec(specs[-1:]).build()[0]
        conc = specs[:-1]
        if workers == 0:
            self.hosts = [LocalTerminals(host_spec(conc).build())]
        else:
            self.hosts = [WorkerTerminals(k, host_spec(conc[k::workers]), self.workdir / f"worker-{k}.json")
                          for k in range(workers)]
        await asyncio.gather(*(h.start() for h in self._all_hosts()))
        await self._backend_ready()
        # Warm-up: every terminal's first sales (card, PSAM, journal, connections), all at once.
        for outcomes in await asyncio.gather(*(h.sales(2) for h in self._all_hosts())):
            self.setup_outcomes += outcomes
        bad = [o for o in self.setup_outcomes if not o.ok]
        if bad:
            raise RuntimeError(f"warm-up sales failed: {Counter(o.code for o in bad)}"
                               f"{tail_file(self.backend_log)}")
        where = "this process" if workers == 0 else f"{workers} worker process{'es' * (workers > 1)}"
        print(f"  sales: backend and {n} + 1 daemons up in {time.perf_counter() - t_setup:.1f} s "
              f"({n} in {where})", file=sys.stderr)

    async def _backend_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while '"ready"' not in self.backend_log.read_text(errors="replace"):
            if self.backend is None or self.backend.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the backend simulator did not come up{tail_file(self.backend_log)}")
            await asyncio.sleep(0.05)

    async def measure(self) -> dict[str, float]:
        args, first = self.args, self.latency
        assert first is not None
        outcomes, self.setup_outcomes = self.setup_outcomes, []
        # Sale latency: one terminal, one sale after the other.
        for _ in range(min(WARMUP_SALES, args.sales)):
            outcomes.append(await first.sale())
        seq: list[SaleOutcome] = []
        for _ in range(args.sales):
            seq.append(await first.sale())
        outcomes += seq
        times = [o.ms for o in seq if o.ok]
        # Throughput: every terminal, each its sales one after the other, all at once (from `at`, by
        # the monotonic clock that all processes here share).
        at = time.monotonic() + (0.1 if args.workers else 0.0)
        results = await asyncio.gather(*(h.run(args.sales_each, at) for h in self.hosts))
        elapsed = max(end for _, end in results) - at
        conc = [o for r, _ in results for o in r]
        outcomes += conc
        lost, doubled, info = await self.reconcile(outcomes)
        codes = Counter(o.code for o in outcomes if not o.ok)
        conc_ok = [o.ms for o in conc if o.ok]
        print(f"  sales: p50 {_median(times):.3f} ms (1 terminal, {len(times)}/{len(seq)} ok); "
              f"{len(conc_ok) / elapsed:.1f} sales/s ({len(conc_ok)}/{len(conc)} ok in {elapsed:.2f} s, p50 "
              f"{_median(conc_ok):.1f} ms); ledger {info['ledger']} / journals {info['journal']} settled"
              + (f"; failed: {dict(codes)}" if codes else ""), file=sys.stderr, flush=True)
        return {"sale_p50_ms": _median(times), "sale_p90_ms": pct(times, 0.9) if times else float("nan"),
                "sales_per_s": len(conc_ok) / elapsed, "sales_conc_p50_ms": _median(conc_ok),
                "sales": len(outcomes), "lost": lost, "doubled": doubled}

    def _ledger(self) -> dict[tuple[str, str], tuple[str, str]]:
        """(terminal, msgid) → (setl_id, state) of every settlement in the backend's ledger."""
        with contextlib.closing(sqlite3.connect(self.ledger_path, timeout=30)) as db:
            rows = db.execute("SELECT terminal_id, msgid, setl_id, state FROM settlement").fetchall()
        return {(str(r[0]), str(r[1])): (str(r[2]), str(r[3])) for r in rows}

    def _journals(self) -> dict[tuple[str, str], tuple[str, str]]:
        """(terminal, msgid) → (request id, setl_id) of every settled sale in the journals."""
        out: dict[tuple[str, str], tuple[str, str]] = {}
        for tid, path in self.journals.items():
            with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
                rows = db.execute("SELECT msgid, request_id, setl_id FROM txn "
                                  "WHERE op = 'sale' AND state = 'settled'").fetchall()
            out.update({(tid, str(r[0])): (str(r[1]), str(r[2])) for r in rows})
        return out

    async def reconcile(self, outcomes: list[SaleOutcome]) -> tuple[int, int, dict[str, int]]:
        """Lost and doubled sales of this round: replies, journals and the ledger compared.

        Lost: a sale without an ok reply; an ok reply whose settlement the ledger (settled, same
        setl_id) or the journal lacks; a journal settlement the ledger lacks. Doubled: a ledger
        settlement at the bench's terminals that no journal row settled; two settled rows for one
        POS request id; one settlement in the ok replies of two requests. Compared cumulatively
        (all rounds so far), each discrepancy counted once, in the round that shows it."""
        ledger, journal = await asyncio.gather(asyncio.to_thread(self._ledger),
                                               asyncio.to_thread(self._journals))
        ours = set(self.journals)
        ledger = {k: v for k, v in ledger.items() if k[0] in ours}
        lost = doubled = 0

        def first_time(kind: str, key: tuple[str, str]) -> bool:
            flag = f"{kind} {key[0]} {key[1]}"
            if flag in self.flagged:
                return False
            self.flagged.add(flag)
            return True

        for o in outcomes:
            if not o.ok:
                lost += 1
                continue
            key = (o.terminal_id, o.result("msgid") or f"?{o.request_id}")
            if self.ok_seen.setdefault(key, o.request_id) != o.request_id and first_time("twice", key):
                doubled += 1
            if (ledger.get(key) != (o.result("setl_id"), "settled") or key not in journal) \
                    and first_time("missing", key):
                lost += 1
        for key in journal.keys() - ledger.keys():
            lost += first_time("missing", key)
        for key in {k for k, v in ledger.items() if v[1] == "settled"} - journal.keys():
            doubled += first_time("unjournaled", key)
        for (tid, rid), count in Counter((k[0], v[0]) for k, v in journal.items()).items():
            if count > 1 and first_time("request", (tid, rid)):
                doubled += count - 1
        replies = sum(h.doubled_replies for h in self._all_hosts())
        if replies:
            print(f"  sales: {replies} POS replies delivered twice (not sales)", file=sys.stderr)
        settled = sum(1 for v in ledger.values() if v[1] == "settled")
        return lost, doubled, {"ledger": settled, "journal": len(journal)}

    async def close(self) -> None:
        try:
            hosts, self.latency, self.hosts = self._all_hosts(), None, []
            await asyncio.gather(*(h.stop() for h in hosts), return_exceptions=True)
        finally:
            proc, self.backend = self.backend, None
            if proc is not None:
                await asyncio.to_thread(stop_process, proc)
            if self._backend_log is not None:
                self._backend_log.close()
                self._backend_log = None
            shutil.rmtree(self.jdir, ignore_errors=True)


_SALES: SalesRig | None = None


async def measure_sales(args: argparse.Namespace, broker: Mosquitto) -> dict[str, float] | None:
    """One round of sales through the daemon.

    Returns, for this round:

    - ``sale_p50_ms`` (and ``sale_p90_ms``): POS ``sale`` request to reply, one terminal (its
      daemon and POS in this event loop), sales one after the other (``--sales`` of them after a
      few warm-up ones; the POS publishes to the daemon's cmd topic and waits for the reply; the
      daemon reads the card, 2101, authorises, 2102, journals, answers);
    - ``sales_per_s``: completed sales per second with ``args.concurrency`` other terminals at
      once, each doing ``--sales-each`` sales one after the other (separate daemon instances, each
      with its own MQTT client, journal and emulated card, in ``args.workers`` worker processes)
      and one backend process: the sales that ended ok over the time from the common start until
      the last worker's last sale ended;
    - ``sales``: sales attempted; ``lost``: sales without a settled outcome (no ok reply, or the
      backend ledger and the journals disagree); ``doubled``: a sale settled twice (the ledger
      has a settlement no journal row settled, or two for one POS request) — see
      :meth:`SalesRig.reconcile`.

    The backend and the daemons are set up on the first call (its warm-up sales count in that
    round) and stopped by :func:`close_sales`.
    """
    global _SALES
    if _SALES is None:
        _SALES = SalesRig(args, broker)
        await _SALES.start()
    return await _SALES.measure()


async def close_sales() -> None:
    """Stop the daemons, their POS clients and the backend; remove the journals and the ledger."""
    global _SALES
    rig, _SALES = _SALES, None
    if rig is not None:
        await rig.close()


# -- the run ------------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    """The median of the figures that are there (NaN: not measured that round)."""
    present = [v for v in values if v == v]
    return statistics.median(present) if present else float("nan")


async def run(args: argparse.Namespace, broker: Mosquitto, jdir: Path) -> dict[str, Any]:
    rounds: dict[str, list[float]] = {k: [] for k in (
        "bare_c1_p50", "bare_c1_p90", "bare_cN_rate", "bare_cN_p50", "commit_p50", "journal_p50",
        "apdu_p50", "sale_p50", "sales_per_s")}
    bad = {"bare_lost": 0, "bare_doubled": 0, "sales": 0, "sales_lost": 0, "sales_doubled": 0}
    card_path, psam_path = issue_images(broker.workdir, "apdu", generation=args.generation)
    card = SaleCard.open(card_path, psam_path, args.card_store)
    raw = RawCommits(jdir / "raw-commit.sqlite")
    journal = Journal(jdir / "journal.sqlite")
    responder = Responder(broker, args.responder)
    sales_seen = False
    try:
        await responder.start()
        apdus = await card.count_apdus()
        for i in range(args.rounds):
            print(f"  round {i + 1}/{args.rounds}", file=sys.stderr, flush=True)
            c1 = await bare_sequential(broker, args.rr, warmup=min(20, args.rr))
            rounds["bare_c1_p50"].append(c1["p50"])
            rounds["bare_c1_p90"].append(c1["p90"])
            cn = await bare_concurrent(broker, args.concurrency, args.rr_each, warmup=2)
            rounds["bare_cN_rate"].append(cn["rate"])
            rounds["bare_cN_p50"].append(cn["p50"])
            for r in (c1, cn):
                bad["bare_lost"] += int(r["lost"])
                bad["bare_doubled"] += int(r["doubled"])
            rounds["commit_p50"].append(_median(raw.measure(args.commits, warmup=10)))
            rounds["journal_p50"].append(_median(journal_begins(journal, args.commits, 10, f"r{i}")))
            rounds["apdu_p50"].append(_median(await card.measure(args.apdu, warmup=min(3, args.apdu))))
            sales = await measure_sales(args, broker)
            nan = float("nan")
            rounds["sale_p50"].append(nan if sales is None else float(sales["sale_p50_ms"]))
            rounds["sales_per_s"].append(nan if sales is None else float(sales["sales_per_s"]))
            if sales is not None:
                sales_seen = True
                bad["sales"] += int(sales.get("sales", 0))
                bad["sales_lost"] += int(sales.get("lost", 0))
                bad["sales_doubled"] += int(sales.get("doubled", 0))
    finally:
        await responder.stop()
        await card.close()
        await close_sales()
        raw.close()
        journal.close()
    floors = [3 * b + a + 4 * c for b, a, c in zip(rounds["bare_c1_p50"], rounds["apdu_p50"],
                                                    rounds["commit_p50"], strict=True)]
    return {"rounds": rounds, "floors": floors, "bad": bad, "apdus": apdus, "steps": card.steps(),
            "sales_measured": sales_seen}


def report(args: argparse.Namespace, res: dict[str, Any], fs: str) -> int:
    rounds: dict[str, list[float]] = res["rounds"]
    med = {k: _median(v) for k, v in rounds.items()}
    bad, apdus, n = res["bad"], res["apdus"], args.concurrency
    floor = 3 * med["bare_c1_p50"] + med["apdu_p50"] + 4 * med["commit_p50"]
    where = ("in this process" if args.workers == 0 else
             f"in {args.workers} worker process{'es' * (args.workers > 1)}, ~{n / args.workers:.0f} each")
    print(f"\ncard store: {args.card_store} ({CARD_STORES[args.card_store]}), for the APDU floor and the "
          "sales alike")
    print(f"sales: the latency terminal's daemon + POS in this process; the {n} terminals' daemons + POS "
          f"clients {where}")
    print(f"\n{args.rounds} round(s), medians over rounds of per-round p50s (ms unless stated):")
    print(f"  bare QoS 1 request/response, 1 requester    p50 {med['bare_c1_p50']:.3f}  "
          f"p90 {med['bare_c1_p90']:.3f}  ({args.rr} round trips/round, responder: {args.responder})")
    print(f"  bare QoS 1 request/response, {n} requesters  {med['bare_cN_rate']:.0f} round trips/s  "
          f"(p50 {med['bare_cN_p50']:.3f}; {n} × {args.rr_each}/round)")
    print(f"  durable SQLite commit (WAL, FULL)          p50 {med['commit_p50']:.3f}  ({fs})")
    print(f"  Journal.begin (one commit, not synced)     p50 {med['journal_p50']:.3f}")
    print(f"  sale APDUs in-process                      p50 {med['apdu_p50']:.3f}  ({res['steps']}: "
          f"{apdus.get('card', 0)} card + {apdus.get('psam', 0)} PSAM APDUs; card image in "
          f"{args.card_store})")
    if "authorise_sale" not in res["steps"]:
        print("    (CardSession.authorise_sale is not there yet: the floor lacks its PIN and "
              "INTERNAL AUTHENTICATEs)")
    print(f"  floor = 3 × {med['bare_c1_p50']:.3f} + {med['apdu_p50']:.3f} + 4 × {med['commit_p50']:.3f}"
          f" = {floor:.3f}  (per round: {', '.join(f'{f:.3f}' for f in res['floors'])})")
    print(f"  sales/s needed at {n} terminals (3 × sales/s >= 25 % of the bare rate): "
          f">= {med['bare_cN_rate'] / 12:.0f}")
    status = 0
    if bad["bare_lost"] or bad["bare_doubled"]:
        print(f"bare request/response: {bad['bare_lost']} lost, {bad['bare_doubled']} doubled answers")
        status = 1
    print()
    if not res["sales_measured"]:
        print("sales: not measured (measure_sales returned None: the daemon's sale service is not "
              "plugged in yet)")
        return status
    print(f"  sale end to end, 1 terminal               p50 {med['sale_p50']:.3f}")
    print(f"  sales, {n} terminals, one backend          {med['sales_per_s']:.1f} sales/s")
    print()
    ratio = med["sale_p50"] / floor
    print(f"sale p50 / floor: {ratio:.2f}  (target <= 2: {'met' if ratio <= 2 else 'MISSED'}); per round "
          + ", ".join(f"{s / f:.2f}" for s, f in zip(rounds["sale_p50"], res["floors"], strict=True)))
    share = 3 * med["sales_per_s"] / med["bare_cN_rate"]
    print(f"3 × sales/s / bare rate at {n}: {share:.3f}  (target >= 0.25: "
          f"{'met' if share >= 0.25 else 'MISSED'}); per round "
          + ", ".join(f"{3 * s / b:.3f}" for s, b in zip(rounds["sales_per_s"], rounds["bare_cN_rate"],
                                                          strict=True)))
    clean = not (bad["sales_lost"] or bad["sales_doubled"])
    print(f"sales lost / doubled: {bad['sales_lost']} / {bad['sales_doubled']} of {bad['sales']}  "
          f"(target 0 / 0: {'met' if clean else 'MISSED'})")
    return status if clean else 1


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwind so that every process started here is stopped


async def _run_until_signal(args: argparse.Namespace, broker: Mosquitto, jdir: Path) -> dict[str, Any]:
    """:func:`run`, cancelled by SIGTERM (its ``finally`` blocks stop what it started)."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run(args, broker, jdir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, metavar="R",
                    help="rounds, phases alternating within each (default 5; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="few iterations: a smoke run")
    ap.add_argument("--rr", type=int, metavar="N", help="round trips per round at concurrency 1 (1000)")
    ap.add_argument("--concurrency", type=int, default=50, metavar="C",
                    help="requester clients for the bare rate, terminals for sales (default 50)")
    ap.add_argument("--rr-each", type=int, metavar="N",
                    help="round trips per requester at concurrency C (100)")
    ap.add_argument("--commits", type=int, metavar="N",
                    help="durable commits per round, raw and Journal (500)")
    ap.add_argument("--apdu", type=int, metavar="N", help="sales' card work per round (100)")
    ap.add_argument("--sales", type=int, metavar="N",
                    help="sales per round through one terminal, one after the other, for the p50 (200)")
    ap.add_argument("--sales-each", type=int, metavar="N",
                    help="sales per terminal per round with C terminals at once, for sales/s (10)")
    ap.add_argument("--responder", choices=("process", "inline"), default="process",
                    help="bare responder in its own process (default, like the backend) or in this loop")
    ap.add_argument("--generation", type=int, choices=(2, 3), default=3, help="card generation (3: SM4)")
    ap.add_argument("--card-store", choices=("memory", "file"), default="memory",
                    help="the emulated cards and PSAMs of the APDU floor and of the sales alike: images "
                         "kept in memory (default: a real card costs the host no fsync) or written back "
                         "to disk, fsynced, on every change (the emulator's tear safety, as emulated:IMAGE)")
    ap.add_argument("--workers", type=int, metavar="N",
                    help="worker processes that run the C terminals (daemons + POS clients) of the "
                         f"throughput phase, C/N each (default {DEFAULT_WORKERS}, at most C; 0: in this "
                         "process)")
    ap.add_argument("--journal-dir", type=Path, default=Path(tempfile.gettempdir()),
                    help="where the SQLite files go (default the temp dir; use the journal's filesystem)")
    ap.add_argument("--log-level", default="WARNING",
                    help="level of the project's log chain on stderr (default WARNING)")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    ap.add_argument("--serve-responder", metavar="HOST:PORT", help=argparse.SUPPRESS)
    ap.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_responder:
        return responder_main(args.serve_responder)
    if args.worker:
        return worker_main(args.worker)
    for key, (full, quick) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if min(args.rounds, args.rr, args.rr_each, args.commits, args.apdu, args.concurrency, args.sales,
           args.sales_each) < 1:
        ap.error("counts must be positive")
    if args.workers is None:
        args.workers = min(DEFAULT_WORKERS, args.concurrency)
    if not 0 <= args.workers <= args.concurrency:
        ap.error(f"--workers must be 0 .. {args.concurrency} (the terminals)")
    signal.signal(signal.SIGTERM, _terminate)
    configure_logging(args.log_level)

    with tempfile.TemporaryDirectory(prefix="bench_settle-") as tmp, \
            tempfile.TemporaryDirectory(prefix="bench_settle-journal-", dir=args.journal_dir) as jtmp:
        broker = Mosquitto(Path(tmp))
        try:
            broker.start()
        except BrokerUnavailable as exc:
            print(f"bench_settle: {exc}", file=sys.stderr)
            return 2
        fs = filesystem_of(Path(jtmp))
        print(f"mosquitto on {broker.host}:{broker.port} (started here); SQLite files in {jtmp} ({fs}); "
              f"card store {args.card_store}; sales workers {args.workers}", file=sys.stderr)
        try:
            res = asyncio.run(_run_until_signal(args, broker, Path(jtmp)))
        except asyncio.CancelledError:
            print("bench_settle: stopped", file=sys.stderr)
            return 128 + signal.SIGTERM
        except KeyboardInterrupt:
            print("bench_settle: interrupted", file=sys.stderr)
            return 128 + signal.SIGINT
        finally:
            broker.stop()
    status = report(args, res, f"{args.journal_dir}: {fs}")
    if args.json is not None:
        doc = {"host": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": os.cpu_count()},
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "filesystem": fs, **res}
        args.json.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
