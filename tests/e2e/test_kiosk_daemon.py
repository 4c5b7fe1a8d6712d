"""The kiosk socket in front of the real daemon: :class:`sscardd.kiosk.KioskServer` over the
in-process :class:`sscardd.service.Daemon` of the settlement lab (emulated card and PSAM, real
mosquitto as shipped, the backend simulator on one ledger), driven through the socket by asyncio
clients, sscardctl and socat; and ``sscardd run`` serving the socket itself.

The socket mechanics (framing, every error code, limits, peers) are tested in tests/test_kiosk.py;
here every method reaches the card, the PSAM or the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from apdu_specs.psam import SERVICE_HALL_KEYS
from firmware_sim.personalise import issue_psam
from firmware_sim.store import TearSafeStore
from sscardd import kiosk
from sscardd.config import KioskConfig, KioskLimits
from sscardd.kiosk import KioskServer
from sscardd.readers.base import ReaderEvent, ReaderEventKind
from sscardd.readers.emulated import EmulatedReader
from tests.daemon_lab import (
    GOOD,
    INITIAL,
    QIAN_NOT_ACTIVATED,
    ZHANG,
    A,
    DaemonProcess,
    SettleLab,
    Terminal,
    config_text,
    issue_images,
    pin_block,
    running_lab,
)
from tests.emu import roots
from tests.mqtt_harness import MosquittoFactory
from tests.test_kiosk import Client

pytestmark = pytest.mark.mosquitto

NEW = "97531086"
WRONG = "135790"
SMALL = [{"code": "A0002", "qty": 1, "price": "6.00"}]
OPERATOR = {"id": "0001", "name": "王药师"}
BEIJING = timezone(timedelta(hours=8))
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lab(mosquitto_factory: MosquittoFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SettleLab]:
    with running_lab(mosquitto_factory, tmp_path_factory.mktemp("kiosk")) as lab:
        yield lab


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sscardd-kiosk-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def kiosk_for(t: Terminal, sockdir: Path, **limits: Any) -> AsyncIterator[KioskServer]:
    """The kiosk server over the terminal's running daemon (the lab's config has it disabled)."""
    assert t.daemon is not None
    lim = {"pin_attempts_per_card": 100, "pin_attempts_per_client": 100, **limits}
    server = KioskServer(t.daemon, KioskConfig(socket=sockdir / "kiosk.sock", limits=KioskLimits(**lim)))
    await server.start()
    try:
        yield server
    finally:
        await server.close(call_wait=10.0)


@contextlib.asynccontextmanager
async def client(path: Path) -> AsyncIterator[Client]:
    c = await Client.connect(path)
    try:
        yield c
    finally:
        c.close()


def result(doc: dict[str, Any]) -> dict[str, Any]:
    assert "result" in doc, doc
    return doc["result"]  # type: ignore[no-any-return]


def app_error(doc: dict[str, Any]) -> dict[str, Any]:
    assert "error" in doc and doc["error"]["code"] == kiosk.APPLICATION_ERROR, doc
    return doc["error"]["data"]  # type: ignore[no-any-return]


async def test_kiosk_methods_reach_the_card_and_the_backend(lab: SettleLab, sockdir: Path) -> None:
    async with lab.terminal(A, ZHANG) as t, kiosk_for(t, sockdir) as server, client(server.path) as c:
        st = result(await c.call("card.status"))
        assert st["card_no"] == ZHANG.card_no and st["on_hold"] is False
        rb = result(await c.call("card.read_basic"))
        assert rb["compat"].split("|")[1] == ZHANG.ssn
        rd = result(await c.call("card.read", {"address": "SSSEEF05|07|$"}))
        assert rd["value"] == f"SSSEEF05|{ZHANG.card_no}|$"
        rd = result(await c.call("card.read", {"address": "DF04EF05|84|$", "auth": "pin", "pin": GOOD}))
        assert rd["value"] == f"DF04EF05|{ZHANG.region}|$"
        assert result(await c.call("pin.verify", {"pin": GOOD})) == {"verified": True}
        wrong = app_error(await c.call("pin.verify", {"pin": WRONG}))
        assert wrong["code"] == "PIN_WRONG" and wrong["tries_left"] == 2
        t.keypad.type(GOOD)
        assert result(await c.call("pin.verify")) == {"verified": True}  # the keypad; the count is reset
        q = result(await c.call("account.query"))
        assert q["balc"] == lab.balance(ZHANG.ssn) and q["activated"] is True and q["psn_name"] == "张*"

        # A sale over MQTT writes the chip's log; the kiosk lists it (the PIN is an argument).
        sale = await t.request("sale", {"operator": OPERATOR, "items": SMALL,
                                        "pin": pin_block(GOOD, ZHANG.ssn)})
        assert sale["ok"] and sale["result"]["chip_record"] == "written", sale
        records = result(await c.call("records.list", {"pin": GOOD}))["records"]
        assert records[0]["terminal"] == A
        assert (records[0]["account"], records[0]["self_pay"], records[0]["fund"]) == \
            (sale["result"]["acct_pay"], sale["result"]["psn_cash_pay"], sale["result"]["fund_pay_sumamt"])
        assert app_error(await c.call("records.list", {"pin": WRONG}))["code"] == "PIN_WRONG"

        changed = await c.call("pin.change", {"old": GOOD, "new": NEW, "new_again": NEW})
        assert result(changed) == {"changed": True}
        assert app_error(await c.call("pin.verify", {"pin": GOOD}))["code"] == "PIN_WRONG"
        assert result(await c.call("pin.verify", {"pin": NEW})) == {"verified": True}
        to_initial = await c.call("pin.change", {"old": NEW, "new": INITIAL, "new_again": INITIAL})
        assert app_error(to_initial)["code"] == "PIN_TO_INITIAL"

        # Operator methods (root is an operator).
        status = result(await c.call("daemon.status"))
        assert status["terminal_id"] == A and status["psam"]["state"] == "ok"
        assert status["mqtt"]["connected"] is True and status["journal"]["pending_reversals"] == 0
        assert status["card"]["card_no"] == ZHANG.card_no and "version" in status
        today = datetime.now(BEIJING).date().isoformat()
        rec = result(await c.call("daemon.reconcile", {"begin": today, "end": today}))
        assert rec["terminal_id"] == A and rec["agree"] is True, rec
        # The lab's PSAM is a terminal's: no PUK rights.
        assert app_error(await c.call("pin.unblock"))["code"] == "PSAM_KEY_LEVEL"
        assert app_error(await c.call("pin.reload", {"new_pin": GOOD}))["code"] == "PSAM_KEY_LEVEL"


async def test_service_hall_unblock_and_reload(lab: SettleLab, sockdir: Path) -> None:
    hall = sockdir / "hall-psam.json"
    TearSafeStore(hall).save(issue_psam(roots(), terminal_no=A, key_names=SERVICE_HALL_KEYS).to_json())
    psam = EmulatedReader.from_image(hall)
    try:
        async with lab.terminal(A, ZHANG, start=False) as t:
            t.psam = psam
            await t.start()
            async with kiosk_for(t, sockdir) as server, client(server.path) as c:
                for left in (2, 1):
                    assert app_error(await c.call("pin.verify", {"pin": WRONG}))["tries_left"] == left
                last = app_error(await c.call("pin.verify", {"pin": WRONG}))
                assert last["code"] in ("PIN_WRONG", "PIN_BLOCKED")
                assert app_error(await c.call("pin.verify", {"pin": GOOD}))["code"] == "PIN_BLOCKED"
                assert result(await c.call("pin.unblock")) == {"unblocked": True}
                assert result(await c.call("pin.verify", {"pin": GOOD})) == {"verified": True}
                assert result(await c.call("pin.reload", {"new_pin": NEW})) == {"reloaded": True}
                assert result(await c.call("pin.verify", {"pin": NEW})) == {"verified": True}
                assert app_error(await c.call("pin.reload", {"new_pin": INITIAL}))["code"] == "PIN_TO_INITIAL"
    finally:
        await psam.close()


async def test_card_activation(lab: SettleLab, sockdir: Path) -> None:
    person = QIAN_NOT_ACTIVATED
    async with lab.terminal("370212000002", person) as t, kiosk_for(t, sockdir) as server, \
            client(server.path) as c:
        assert result(await c.call("account.query"))["activated"] is False
        refused = app_error(await c.call("card.activate", {"certno": person.ssn, "password": "NotTheOne1"}))
        assert refused["code"] != "INTERNAL_ERROR"
        # The initial portal password is the card number; the first activation sets a new one.
        done = result(await c.call("card.activate", {"certno": person.ssn, "password": person.card_no,
                                                     "new_password": "Qian2025pw"}))
        assert done["activated"] is True and done["password_changed"] is True
        assert result(await c.call("account.query"))["activated"] is True


async def test_pin_attempts_limited_per_card_before_the_card(lab: SettleLab, sockdir: Path) -> None:
    async with lab.terminal(A, ZHANG) as t, \
            kiosk_for(t, sockdir, pin_attempts_per_card=2, pin_attempt_window=1.0) as server, \
            client(server.path) as a, client(server.path) as b:
        assert app_error(await a.call("pin.verify", {"pin": WRONG}))["tries_left"] == 2
        assert app_error(await b.call("pin.verify", {"pin": WRONG}))["tries_left"] == 1
        limited = await a.call("pin.verify", {"pin": WRONG})
        assert limited["error"]["code"] == kiosk.RATE_LIMITED and limited["error"]["data"]["scope"] == "card"
        await asyncio.sleep(1.05)
        # The refused attempt never reached the card: one try is left, and the right PIN works.
        assert result(await b.call("pin.verify", {"pin": GOOD})) == {"verified": True}


async def test_a_client_dying_mid_call_leaves_the_card_consistent(lab: SettleLab, sockdir: Path) -> None:
    async with lab.terminal(A, ZHANG) as t, kiosk_for(t, sockdir) as server:
        assert t.daemon is not None
        # Fault control: hold the daemon's card lock so the call is in flight when the client dies.
        async with t.daemon._card_lock, client(server.path) as dying:
            await dying.send("pin.verify", {"pin": WRONG})
            await asyncio.sleep(0.1)
            assert server.status()["calls_in_flight"] == 1
            dying.writer.transport.abort()
        for _ in range(200):
            if server.status()["calls_in_flight"] == 0:
                break
            await asyncio.sleep(0.02)
        async with client(server.path) as c:
            # The dead client's attempt ran to its end: the card counted it and was reset after it.
            assert app_error(await c.call("pin.verify", {"pin": WRONG}))["tries_left"] == 1
            assert result(await c.call("pin.verify", {"pin": GOOD})) == {"verified": True}
            assert result(await c.call("card.status"))["card_no"] == ZHANG.card_no


async def test_events_from_the_daemon(lab: SettleLab, sockdir: Path) -> None:
    async with lab.terminal(A, ZHANG) as t, kiosk_for(t, sockdir) as server, \
            client(server.path) as a, client(server.path) as b:
        assert t.daemon is not None
        assert result(await a.call("events.subscribe")) == {"subscribed": True}
        assert result(await b.call("events.subscribe")) == {"subscribed": True}
        # The daemon's reader-event path (fed by the PC/SC monitor, which the emulated readers lack).
        t.daemon._on_reader_event(ReaderEvent(ReaderEventKind.READER_ADDED, "Lab Reader 01"))
        t.daemon._on_reader_event(ReaderEvent(ReaderEventKind.CARD_REMOVED, "Lab Reader 01"))
        for c in (a, b):
            got = [await c.read(), await c.read()]
            assert [(d["method"], d["params"]["event"], d["params"]["reader"]) for d in got] == \
                [("event", "reader_added", "Lab Reader 01"), ("event", "card_removed", "Lab Reader 01")]
            assert datetime.fromisoformat(got[0]["params"]["at"]).utcoffset() == timedelta(hours=8)
        assert result(await a.call("card.status"))["card_no"] == ZHANG.card_no  # still serving


async def test_sscardctl_and_socat_against_the_daemon(lab: SettleLab, sockdir: Path) -> None:
    async with lab.terminal(A, ZHANG) as t, kiosk_for(t, sockdir) as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sscardd.ctl", "--socket", str(server.path), "pin.verify", "--pin-stdin",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        out, _ = await asyncio.wait_for(proc.communicate(f"{GOOD}\n".encode()), 20)
        assert proc.returncode == 0 and json.loads(out) == {"verified": True}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sscardd.ctl", "--socket", str(server.path), "card.read_basic",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0 and json.loads(out)["compat"].split("|")[1] == ZHANG.ssn
        socat = shutil.which("socat")
        if socat is None:
            pytest.skip("socat is not installed (apt-get install socat)")
        proc = await asyncio.create_subprocess_exec(socat, "-t", "10", "-", f"UNIX-CONNECT:{server.path}",
                                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        lines = (b'{"jsonrpc":"2.0","id":1,"method":"card.status"}\n'
                 b'{"jsonrpc":"2.0","id":2,"method":"account.query"}\n')
        out, _ = await asyncio.wait_for(proc.communicate(lines), 20)
        docs = [json.loads(x) for x in out.splitlines()]
        assert docs[0]["result"]["card_no"] == ZHANG.card_no
        assert docs[1]["result"]["balc"] == lab.balance(ZHANG.ssn)


async def test_sscardd_run_serves_the_socket_as_configured(lab: SettleLab, sockdir: Path) -> None:
    work = sockdir / "proc"
    work.mkdir()
    card, psam = issue_images(work, ZHANG, terminal_id=A)
    sock = sockdir / "run" / "kiosk.sock"
    text = config_text(lab, A, work, card=f"emulated:{card}", psam=f"emulated:{psam}")
    kiosk_section = f'[kiosk]\nenabled = true\nsocket = "{sock}"\nmode = "0640"\ngroup = 12345\n'
    assert "[kiosk]\nenabled = false\n" in text
    cfg_path = work / "sscardd.toml"
    cfg_path.write_text(text.replace("[kiosk]\nenabled = false\n", kiosk_section))
    daemon = DaemonProcess(cfg_path)
    try:
        daemon.start()
        await asyncio.to_thread(daemon.wait_log, "kiosk socket listening")
        st = os.lstat(sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == 12345
        async with client(sock) as c:
            assert result(await c.call("card.status"))["card_no"] == ZHANG.card_no
            assert result(await c.call("daemon.status"))["terminal_id"] == A
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(daemon.proc.wait, 20)
        assert not sock.exists()  # removed on the way out
    finally:
        daemon.stop()
