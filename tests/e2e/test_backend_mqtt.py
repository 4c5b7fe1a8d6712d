"""The backend simulator over a real mosquitto: request/response with correlation data, the
response-topic rule, two instances on one ledger, fault controls, logs, broker restart.

Two ``sscard-backend run`` processes share one ledger and the shared subscription for the whole
module (as a deployment would run them); each test cleans the fault controls it armed. The broker
is a plain mosquitto on a free loopback port (``tests/backend_lab.py``); the last test goes
through the shipped configuration (TLS, dynamic security) of ``tests/mqtt_harness.py``.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from backend_sim.envelope import fmt_time_ms, parse_time
from backend_sim.faults import Faults
from backend_sim.ledger import Ledger
from tests.backend_helpers import EXAMPLE_SEED, LI, PHARMACY, PHARMACY_2, ZHANG, LiveClock, Requests
from tests.backend_lab import (
    BackendProcess,
    Broker,
    BrokerUnavailable,
    HarnessBroker,
    PlainMosquitto,
    Terminal,
    user_properties,
)

SALE = [("A0001", 2, "12.50"), ("B0001", 1, "30.00"), ("C0001", 1, "8.00")]  # account pays 52.00


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    mosq = PlainMosquitto(tmp_path_factory.mktemp("backend-broker"))
    try:
        mosq.start()
    except BrokerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield mosq
    finally:
        mosq.stop()


@pytest.fixture(scope="module")
def ledger_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("backend-ledger") / "ledger.sqlite"


@pytest.fixture(scope="module")
def backends(broker: Broker, ledger_path: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[list[BackendProcess]]:
    workdir = tmp_path_factory.mktemp("backends")
    procs = [BackendProcess(workdir, broker, ledger_path, EXAMPLE_SEED, name, control=True)
             for name in ("a", "b")]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            p.stop()
    for p in procs:
        assert "Traceback" not in p.log_text(), p.log_text()


@pytest.fixture
def faults(backends: list[BackendProcess], ledger_path: Path) -> Iterator[Faults]:
    f = Faults(ledger_path)
    try:
        yield f
    finally:
        f.clear()
        f.close()


@pytest.fixture
def ledger(backends: list[BackendProcess], ledger_path: Path) -> Iterator[Ledger]:
    lg = Ledger(ledger_path)
    try:
        yield lg
    finally:
        lg.close()


@pytest.fixture
def req() -> Requests:
    return Requests(LiveClock())


def stored(ledger_path: Path, terminal_id: str, msgid: str) -> bool:
    with sqlite3.connect(ledger_path) as db:
        return db.execute("SELECT 1 FROM message WHERE terminal_id = ? AND msgid = ?",
                          (terminal_id, msgid)).fetchone() is not None


def wait_any(procs: list[BackendProcess], event: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            for e in p.events():
                if e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
                    return e
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {event!r} {match} in the backends' logs")
        time.sleep(0.01)


async def test_request_response(backends: list[BackendProcess], ledger: Ledger, req: Requests,
                                broker: Broker) -> None:
    before = ledger.balance(ZHANG[0])
    async with Terminal(broker, PHARMACY[0]) as term:
        ans, msg = await term.request(req.identity())
        assert ans["infcode"] == 0 and ans["output"]["insuinfo"][0]["balc"] == f"{before / 100:.2f}"
        assert str(msg.topic) == term.response_topic
        props = user_properties(msg)
        assert props["sscard-backend"] in ("a", "b") and props["sscard-replayed"] == "0"
        sale = req.sale("2102", SALE)
        ans, _ = await term.request(sale)
        assert ans["infcode"] == 0 and ans["msgid"] == sale["msgid"]
        info = ans["output"]["setlinfo"]
        assert (info["medfee_sumamt"], info["acct_pay"], info["psn_cash_pay"]) == ("63.00", "52.00", "11.00")
    assert ledger.balance(ZHANG[0]) == before - 5200


async def test_response_topic_must_be_the_terminals(backends: list[BackendProcess], ledger_path: Path,
                                                    req: Requests, broker: Broker) -> None:
    other = Requests(LiveClock(), PHARMACY_2)
    async with Terminal(broker, PHARMACY[0]) as a, Terminal(broker, PHARMACY_2[0]) as b:
        wrong = [("sscard/v1/term/370212000002/settle/resp", "B's response topic"),
                 (None, "no response topic"),
                 ("sscard/v1/term/370212000001/reply/x", "the POS reply namespace")]
        for topic, _why in wrong:
            doc = req.sale("2102", SALE)
            await a.publish(doc, response_topic=topic)
            await asyncio.to_thread(wait_any, backends, "dropped: response topic is not the terminal's",
                                    response_topic=topic or "")
            assert not stored(ledger_path, PHARMACY[0], doc["msgid"])
        # B's first delivery is the answer to its own request: nothing of A's reached it.
        mine = other.identity()
        ans, _ = await b.request(mine)
        assert ans["msgid"] == mine["msgid"]


async def test_one_request_to_two_instances(backends: list[BackendProcess], faults: Faults, ledger: Ledger,
                                            req: Requests, broker: Broker) -> None:
    """The first delivery is held on one instance; a redelivery is served by the other one and
    the held one answers from the stored result once released: booked once, one answer."""
    before = ledger.balance(ZHANG[0])
    faults.arm("hold", infno="2102", terminal_id=PHARMACY[0])
    sale = req.sale("2102", SALE)
    async with Terminal(broker, PHARMACY[0]) as term:
        c1 = await term.publish(sale)
        held = await asyncio.to_thread(faults.wait_held, msgid=sale["msgid"])
        c2 = await term.publish(sale)
        ans2, msg2 = await term.answer()
        assert getattr(msg2.properties, "CorrelationData", None) == c2
        assert user_properties(msg2)["sscard-replayed"] == "0"
        assert faults.release(msgid=sale["msgid"]) == 1
        ans1, msg1 = await term.answer()
        assert getattr(msg1.properties, "CorrelationData", None) == c1
        assert user_properties(msg1) == {"sscard-backend": held["instance"], "sscard-replayed": "1"}
        assert user_properties(msg2)["sscard-backend"] != held["instance"]  # mosquitto: round robin
        assert ans1 == ans2 and ans1["infcode"] == 0
    assert ledger.balance(ZHANG[0]) == before - 5200
    assert [s["msgid"] for s in ledger.settlements()].count(sale["msgid"]) == 1


async def test_duplicates_answered_once(backends: list[BackendProcess], ledger: Ledger, req: Requests,
                                        broker: Broker) -> None:
    before = ledger.balance(ZHANG[0])
    sale = req.sale("2102", SALE)
    async with Terminal(broker, PHARMACY[0]) as term:
        corrs = [await term.publish(sale) for _ in range(6)]
        answers = [await term.answer() for _ in corrs]
    assert {getattr(m.properties, "CorrelationData", None) for _, m in answers} == set(corrs)
    assert len({json.dumps(a, sort_keys=True) for a, _ in answers}) == 1
    assert sorted(user_properties(m)["sscard-replayed"] for _, m in answers) == ["0"] + ["1"] * 5
    assert {user_properties(m)["sscard-backend"] for _, m in answers} == {"a", "b"}
    assert ledger.balance(ZHANG[0]) == before - 5200


async def test_fault_fail_next_requests(backends: list[BackendProcess], faults: Faults, ledger: Ledger,
                                        req: Requests, broker: Broker) -> None:
    faults.arm("fail", count=2, terminal_id=PHARMACY[0])
    before = ledger.balance(LI[0])
    async with Terminal(broker, PHARMACY[0]) as term:
        sale = req.sale("2102", [("A0001", 1, "1.00")], LI)
        for doc in (req.identity(), sale):
            ans, _ = await term.request(doc)
            assert (ans["infcode"], ans["err_code"]) == (-1, "INJECTED_FAILURE")
        assert ledger.balance(LI[0]) == before
        ans, _ = await term.request(sale)  # nothing was stored: the resend is processed
        assert ans["infcode"] == 0
    assert ledger.balance(LI[0]) == before - 100


async def test_fault_drop_then_reversal(backends: list[BackendProcess], faults: Faults, ledger: Ledger,
                                        req: Requests, broker: Broker) -> None:
    """The daemon's case: the 2102 answer is lost, the daemon reverses, nothing stays booked."""
    before = ledger.balance(ZHANG[0])
    faults.arm("drop", infno="2102", terminal_id=PHARMACY[0])
    sale = req.sale("2102", SALE)
    async with Terminal(broker, PHARMACY[0]) as term:
        await term.publish(sale)
        await asyncio.to_thread(wait_any, backends, "answer dropped (fault)", msgid=sale["msgid"])
        assert ledger.balance(ZHANG[0]) == before - 5200
        ans, _ = await term.request(req.reversal(sale["msgid"]))  # the first answer is the reversal's
        assert ans["output"]["result"] == "reversed"
    assert ledger.balance(ZHANG[0]) == before


async def test_fault_hold_then_tombstone(backends: list[BackendProcess], faults: Faults, ledger: Ledger,
                                         req: Requests, broker: Broker) -> None:
    """The 2102 is delayed past its reversal: the tombstone refuses it, nothing is booked."""
    before = ledger.balance(ZHANG[0])
    faults.arm("hold", infno="2102", terminal_id=PHARMACY[0])
    sale = req.sale("2102", SALE)
    async with Terminal(broker, PHARMACY[0]) as term:
        c_sale = await term.publish(sale)
        await asyncio.to_thread(faults.wait_held, msgid=sale["msgid"])
        ans, _ = await term.request(req.reversal(sale["msgid"]))
        assert ans["output"]["result"] == "tombstoned"
        faults.release(msgid=sale["msgid"])
        ans, msg = await term.answer()
        assert getattr(msg.properties, "CorrelationData", None) == c_sale
        assert ans["err_code"] == "MSG_REVERSED"
    assert ledger.balance(ZHANG[0]) == before


async def test_fault_hold_past_expiry(backends: list[BackendProcess], faults: Faults, broker: Broker) -> None:
    """A request held past the expiry it states is refused when it is finally processed."""
    clock = LiveClock()
    req = Requests(clock)

    def short_lived() -> dict[str, Any]:
        doc = req.identity()
        doc["exp_time"] = fmt_time_ms(clock.now + timedelta(seconds=0.5))
        return doc

    async with Terminal(broker, PHARMACY[0]) as term:
        ans, _ = await term.request(short_lived())
        assert ans["infcode"] == 0  # in time
        faults.arm("hold", infno="1101", terminal_id=PHARMACY[0])
        doc = short_lived()
        await term.publish(doc)
        await asyncio.to_thread(faults.wait_held, msgid=doc["msgid"])
        expiry = parse_time(doc["exp_time"], "exp_time")
        await asyncio.sleep(max(0.0, (expiry - clock.now).total_seconds()) + 0.05)
        faults.release(msgid=doc["msgid"])
        ans, _ = await term.answer()
        assert ans["err_code"] == "EXPIRED"


async def test_fault_delay_and_hold_answer(backends: list[BackendProcess], faults: Faults, ledger: Ledger,
                                           req: Requests, broker: Broker) -> None:
    before = ledger.balance(ZHANG[0])
    faults.arm("hold_answer", infno="2102", terminal_id=PHARMACY[0])
    faults.arm("delay", infno="2101", terminal_id=PHARMACY[0], seconds=0.3)
    sale = req.sale("2102", SALE)
    async with Terminal(broker, PHARMACY[0]) as term:
        await term.publish(sale)
        await asyncio.to_thread(faults.wait_held, msgid=sale["msgid"], kind="hold_answer")
        assert ledger.balance(ZHANG[0]) == before - 5200  # processed, answer held
        preview = req.sale("2101", SALE)
        t0 = time.monotonic()
        c_prev = await term.publish(preview)
        ident = req.identity()
        c_ident = await term.publish(ident)
        _, m1 = await term.answer()
        assert getattr(m1.properties, "CorrelationData", None) == c_ident  # overtakes the delayed 2101
        _, m2 = await term.answer()
        assert getattr(m2.properties, "CorrelationData", None) == c_prev
        assert time.monotonic() - t0 >= 0.3
        faults.release(kind="hold_answer")
        ans, _ = await term.answer()
        assert ans["msgid"] == sale["msgid"] and ans["infcode"] == 0


async def test_control_topic_and_cli(backends: list[BackendProcess], faults: Faults, ledger_path: Path,
                                     req: Requests, broker: Broker) -> None:
    async with broker.client("ctl") as ctl, Terminal(broker, PHARMACY[0]) as term:
        reply_topic = "sscard/v1/settle/ctl/resp/t1"
        await ctl.subscribe(reply_topic, qos=1)
        from tests.backend_lab import request_properties

        arm = {"op": "arm", "kind": "fail", "infno": "1101", "terminal_id": PHARMACY[0], "count": 1}
        await ctl.publish("sscard/v1/settle/ctl", json.dumps(arm), qos=1,
                          properties=request_properties(reply_topic, b"c1"))
        async with asyncio.timeout(5):
            reply = json.loads((await anext(ctl.messages)).payload)  # type: ignore[arg-type]
        assert reply["ok"] is True and reply["result"]["id"] > 0
        ans, _ = await term.request(req.identity())
        assert ans["err_code"] == "INJECTED_FAILURE"
        await ctl.publish("sscard/v1/settle/ctl", json.dumps({"op": "bogus"}), qos=1,
                          properties=request_properties(reply_topic, b"c2"))
        async with asyncio.timeout(5):
            reply = json.loads((await anext(ctl.messages)).payload)  # type: ignore[arg-type]
        assert reply["ok"] is False
    cli = [sys.executable, "-m", "backend_sim", "fault", "--db", str(ledger_path)]
    out = subprocess.run([*cli, "arm", "hold", "--infno", "3201", "--count", "2"], capture_output=True,
                         text=True, check=True, timeout=30)
    fid = json.loads(out.stdout)["id"]
    listed = json.loads(subprocess.run([*cli, "list"], capture_output=True, text=True, check=True,
                                       timeout=30).stdout)
    assert [(f["id"], f["kind"], f["remaining"]) for f in listed] == [(fid, "hold", 2)]
    subprocess.run([*cli, "clear"], check=True, capture_output=True, timeout=30)
    assert faults.faults() == []
    bad = subprocess.run([*cli, "arm", "hold", "--count", "0"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "count" in bad.stderr


async def test_logs_hold_no_personal_data(backends: list[BackendProcess], req: Requests,
                                          broker: Broker) -> None:
    async with Terminal(broker, PHARMACY[0]) as term:
        ans, _ = await term.request(req.identity())
        assert ans["output"]["baseinfo"]["certno"] == ZHANG[1]  # the answer has it, the logs must not
        await term.request(req.envelope("9901", {"certno": ZHANG[1], "password": "Zhang2024pw"}))
    for p in backends:
        text = p.log_text()
        for secret in (ZHANG[1], "张三", "Zhang2024pw", LI[1]):
            assert secret not in text


async def test_broker_restart(tmp_path: Path, req: Requests) -> None:
    mosq = PlainMosquitto(tmp_path / "broker")
    try:
        mosq.start()
    except BrokerUnavailable as exc:
        pytest.skip(str(exc))
    backend = BackendProcess(tmp_path, mosq, tmp_path / "l.sqlite", EXAMPLE_SEED, "r")
    try:
        backend.start()
        mosq.stop()
        await backend.async_wait_event("broker connection lost")
        mosq.start()
        await backend.async_wait_event("ready", 2)
        async with Terminal(mosq, PHARMACY[0]) as term:
            ans, _ = await term.request(req.identity())
            assert ans["infcode"] == 0
    finally:
        backend.stop()
        mosq.stop()


async def test_through_the_shipped_broker(tmp_path: Path, req: Requests) -> None:
    """TLS and the dynamic-security file of ``sscardd broker-provision`` (tests/mqtt_harness.py)."""
    try:
        from tests import mqtt_harness
    except ImportError as exc:  # the shared harness is optional for these tests
        pytest.skip(f"tests/mqtt_harness.py not usable: {exc}")
    try:
        ca = mqtt_harness.TestCA.create(tmp_path / "ca")
        mosq = mqtt_harness.make_broker(tmp_path / "broker", ca, terminals=[PHARMACY[0]],
                                        backends=["backend-1"])
    except mqtt_harness.MosquittoUnavailable as exc:
        pytest.skip(str(exc))
    try:
        from sscardd import broker as provisioning

        user = getattr(provisioning, "daemon_username", lambda t: t)
        harness = HarnessBroker(mosq, "backend-1", user)
        backend = BackendProcess(tmp_path, harness, tmp_path / "l.sqlite", EXAMPLE_SEED, "tls")
        backend.start()
        try:
            async with Terminal(harness, PHARMACY[0]) as term:
                ans, _ = await term.request(req.identity())
                assert ans["infcode"] == 0
        finally:
            backend.stop()
    finally:
        mosq.stop()
