"""Settlement under process and broker failures, and terminals trying what they may not.

Each test has a broker of its own (it restarts it, or must not disturb other modules). The daemon
runs as an ``sscardd run`` process where it gets SIGKILLed, in-process otherwise.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sscardd import broker
from sscardd.journal import Journal, State
from tests.backend_lab import request_properties
from tests.daemon_lab import (
    CLINIC,
    GOOD,
    LI,
    ZHANG,
    A,
    B,
    DaemonProcess,
    SettleLab,
    capture_requests,
    config_text,
    issue_images,
    pin_block,
    running_lab,
)
from tests.e2e.test_settlement import SMALL, eventually, sale, settlement_state
from tests.mqtt_harness import BACKEND, MosquittoFactory

pytestmark = pytest.mark.mosquitto


@pytest.fixture
def lab(mosquitto_factory: MosquittoFactory, tmp_path: Path) -> Iterator[SettleLab]:
    with running_lab(mosquitto_factory, tmp_path) as lab:
        yield lab


async def pos_send(lab: SettleLab, terminal_id: str, op: str, args: dict[str, Any], reply_topic: str,
                   client: Any) -> bytes:
    corr = uuid.uuid4().bytes
    body = json.dumps({"id": uuid.uuid4().hex[:12], "op": op, "args": args}, ensure_ascii=False).encode()
    await client.publish(broker.cmd_topic(terminal_id), body, qos=1,
                         properties=request_properties(reply_topic, corr))
    return corr


async def test_daemon_killed_after_publishing_is_resolved_on_restart(lab: SettleLab, tmp_path: Path) -> None:
    work = tmp_path / "proc"
    work.mkdir()
    card, psam = issue_images(work, ZHANG, terminal_id=A)
    cfg_path = work / "sscardd.toml"
    cfg_path.write_text(config_text(lab, A, work, card=f"emulated:{card}", psam=f"emulated:{psam}",
                                    answer_timeout=20.0, message_expiry=15))
    journal_path = lab.workdir / f"journal-{A}.sqlite3"
    before = lab.balance(ZHANG.ssn)
    daemon = DaemonProcess(cfg_path)
    try:
        daemon.start()
        await asyncio.to_thread(daemon.wait_log, "broker connected")
        lab.faults.arm("hold_answer", infno="2102", terminal_id=A)
        reply_topic = f"sscard/v1/term/{A}/reply/kill"
        async with lab.mosq.client(broker.pos_username(A)) as pos:
            await pos.subscribe(reply_topic, qos=1)
            await pos_send(lab, A, "sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL), reply_topic, pos)
            held = await asyncio.to_thread(lab.faults.wait_held, infno="2102")
            # The backend booked it and holds the answer; the daemon dies before hearing it.
            assert settlement_state(lab, held["msgid"]) == "settled"
            daemon.kill()
            with Journal(journal_path) as j:
                row = j.find_by_msgid(held["msgid"])
                assert row is not None and row.state == State.SENT
            lab.faults.release(infno="2102")  # queued for the daemon's persistent session
            daemon.start()

            def resolved() -> Any:
                with Journal(journal_path) as j:
                    return j.find_by_msgid(held["msgid"])

            entry = await eventually(lambda: asyncio.to_thread(resolved), lambda e: e.state == State.REVERSED)
            assert settlement_state(lab, held["msgid"]) == "reversed"
            assert lab.balance(ZHANG.ssn) == before
            # The answer queued while it was down arrived after the restart: recorded, not acted on.
            entry = await eventually(lambda: asyncio.to_thread(resolved),
                                     lambda e: any(n.get("kind") == "late_answer" for n in e.notes))
            assert entry.state == State.REVERSED
            # The journal and the ledger agree: nothing of this terminal stands.
            standing = lab.ledger_rows("SELECT count(*) FROM settlement WHERE terminal_id = ? AND state = "
                                       "'settled'", (A,))[0][0]
            with Journal(journal_path) as j:
                settled = [e for e in j._query("SELECT * FROM txn WHERE state = 'settled' AND op = 'sale'")]
            assert standing == len(settled) == 0
        assert daemon.stop() == 0
        text = daemon.log_text()
        assert '"daemon ready"' in text or "daemon ready" in text
        for secret in (ZHANG.ssn, ZHANG.name, GOOD, pin_block(GOOD, ZHANG.ssn)["block"][:12]):
            assert secret not in text, f"{secret!r} in the daemon's log"
    finally:
        daemon.stop()


async def test_broker_restart_mid_sale(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG, answer_timeout=30.0, message_expiry=25) as t:
        assert t.daemon is not None
        lab.faults.arm("hold", infno="2102", terminal_id=A)
        task = asyncio.create_task(t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL), timeout=40))
        held = await asyncio.to_thread(lab.faults.wait_held, infno="2102")
        connects = t.daemon.link.connect_count
        await lab.mosq.async_restart()
        await t.daemon.link.wait_until(lambda link: link.connected and link.connect_count > connects, 20)
        await lab.backends[0].async_wait_event("ready", count=2, timeout=20)
        # The POS client reconnects too (its reply subscription is gone with the old broker).
        await t.reconnect_pos()
        lab.faults.release(infno="2102")
        r = await task
        assert r["ok"], r
        assert settlement_state(lab, held["msgid"]) == "settled"
        row = t.journal.find_by_msgid(held["msgid"])
        assert row is not None and row.state == State.SETTLED


async def test_a_terminal_cannot_act_for_another(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG) as ta, lab.terminal(B, LI, psam_terminal=B) as tb:
        assert ta.daemon is not None and tb.daemon is not None
        seen_b = dict(tb.daemon.stats)
        # A's POS publishes to B's command topic: the broker refuses it, B's daemon never sees it.
        async with lab.mosq.client(broker.pos_username(A)) as pos_a:
            await pos_a.subscribe(ta.reply_topic + "-x", qos=1)
            await pos_send(lab, B, "card.status", {}, f"sscard/v1/term/{A}/reply/x", pos_a)
            # A request to A naming B's reply topic: refused by A's daemon, answered nowhere.
            dropped = ta.daemon.link.dropped_count
            await pos_send(lab, A, "card.status", {}, f"sscard/v1/term/{B}/reply/steal", pos_a)
        ok_b = await tb.request("card.status")
        assert ok_b["ok"]
        assert sum(tb.daemon.stats.values()) == sum(seen_b.values()) + 1
        await eventually(lambda: _stat(ta, "REPLY_TOPIC_REFUSED"), lambda n: n >= 1)
        assert ta.daemon.link.dropped_count == dropped  # refused by the POS layer, not the link
        # A's daemon credentials cannot put a settlement on B's request topic.
        before = lab.ledger_rows("SELECT count(*) FROM message WHERE terminal_id = ?", (B,))[0][0]
        async with lab.mosq.client(broker.daemon_username(A)) as rogue:
            await rogue.subscribe(f"sscard/v1/term/{A}/settle/resp", qos=1)
            doc = {"infno": "1101", "msgid": "X" * 30, "input": {}}
            await rogue.publish(broker.settle_req_topic(B), json.dumps(doc).encode(), qos=1,
                                properties=request_properties(f"sscard/v1/term/{A}/settle/resp", b"c", 5))
            # and the backend's shared group is closed to it
            result = await rogue.subscribe("$share/settle/sscard/v1/settle/req/+", qos=1)
            assert _granted(result) == [0x87]
        ok = await tb.request("account.query")  # a later request of B is processed: the rogue one was not
        assert ok["ok"], ok
        after = lab.ledger_rows("SELECT count(*) FROM message WHERE terminal_id = ?", (B,))[0][0]
        assert after == before + 1  # B's own 1101; nothing of A's arrived under B
        assert not lab.ledger_rows("SELECT 1 FROM message WHERE msgid = ?", ("X" * 30,))


async def test_claiming_another_institution_achieves_nothing(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG, inst=CLINIC) as t:
        r = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL))
        assert r["ok"] is False and r["error"]["code"] == "BACKEND_REFUSED", r
        assert r["error"]["backend_code"] == "INSTITUTION_MISMATCH"


async def test_a_psam_of_another_terminal_refuses_sales(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG, psam_terminal=B) as t:
        r = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL))
        assert r["error"]["code"] == "TERMINAL_MISMATCH", r
        st = await t.request("card.status")
        assert st["ok"] and st["result"]["psam"] == "mismatch"  # the rest keeps working


async def test_garbage_on_the_response_topic_is_dropped_and_serving_goes_on(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG) as t:
        assert t.daemon is not None
        prefix = f"sscardd/{t.daemon.link.client_id}/".encode()
        async with lab.mosq.client(BACKEND) as be:
            for payload, corr in ((b"\xff\xfe not json", prefix + b"x/y"), (b"[]", b"other"),
                                  (b'{"infcode": 0}', prefix + b"-/0")):
                await be.publish(broker.settle_resp_topic(A), payload, qos=1,
                                 properties=request_properties(None, corr))
        r = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL))
        assert r["ok"], r


def _granted(result: Any) -> list[int]:
    return [int(getattr(rc, "value", rc)) for rc in result]


async def _stat(t: Any, code: str) -> int:
    return int(t.daemon.stats.get(code, 0))



async def test_an_unreadable_2102_answer_is_an_unknown_outcome(lab: SettleLab) -> None:
    """An answer with the right Correlation Data whose content cannot be trusted is never read as a
    refusal nor as a success: the sale is reversed."""
    async with lab.terminal(A, ZHANG) as t:
        assert t.daemon is not None
        link = t.daemon.link
        sent = capture_requests(link, "2102")
        before = lab.balance(ZHANG.ssn)
        lab.faults.arm("hold_answer", infno="2102", terminal_id=A)
        task = asyncio.create_task(t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL)))
        held = await asyncio.to_thread(lab.faults.wait_held, infno="2102")
        _, corr = sent[0]
        garbage = {"msgid": held["msgid"], "infno": "2102", "infcode": 0, "final": True,
                   "output": {"setlinfo": {"setl_id": "S1", "medfee_sumamt": 6.0}}}
        async with lab.mosq.client(BACKEND) as be:
            await be.publish(broker.settle_resp_topic(A), json.dumps(garbage).encode(), qos=1,
                             properties=request_properties(None, corr))
        r = await task
        assert r["ok"] is False and r["error"]["code"] == "OUTCOME_UNKNOWN", r
        row = t.journal.find_by_msgid(held["msgid"])
        assert row is not None
        lab.faults.release(infno="2102")  # the genuine answer now comes late: recorded only
        await eventually(lambda: asyncio.to_thread(t.journal.get, row.id),
                         lambda e: e.state == State.REVERSED)
        assert settlement_state(lab, held["msgid"]) == "reversed"
        assert lab.balance(ZHANG.ssn) == before


async def test_sigterm_mid_sale_finishes_the_sale_then_exits(lab: SettleLab, tmp_path: Path) -> None:
    work = tmp_path / "term"
    work.mkdir()
    card, psam = issue_images(work, ZHANG, terminal_id=A)
    cfg_path = work / "sscardd.toml"
    cfg_path.write_text(config_text(lab, A, work, card=f"emulated:{card}", psam=f"emulated:{psam}",
                                    answer_timeout=20.0, message_expiry=15))
    daemon = DaemonProcess(cfg_path)
    try:
        daemon.start()
        await asyncio.to_thread(daemon.wait_log, "broker connected")
        lab.faults.arm("hold_answer", infno="2102", terminal_id=A)
        reply_topic = f"sscard/v1/term/{A}/reply/term"
        async with lab.mosq.client(broker.pos_username(A)) as pos:
            await pos.subscribe(reply_topic, qos=1)
            corr = await pos_send(lab, A, "sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL), reply_topic, pos)
            held = await asyncio.to_thread(lab.faults.wait_held, infno="2102")
            assert daemon.proc is not None
            daemon.proc.terminate()
            await asyncio.to_thread(daemon.wait_log, "waiting for the settlements in flight")
            lab.faults.release(infno="2102")
            async with asyncio.timeout(20):
                msg = await anext(pos.messages)
            assert msg.properties is not None and msg.properties.CorrelationData == corr
            reply = json.loads(msg.payload)  # type: ignore[arg-type]
            assert reply["ok"] and reply["result"]["msgid"] == held["msgid"], reply
        assert await asyncio.to_thread(daemon.proc.wait, 20) == 0
        with Journal(lab.workdir / f"journal-{A}.sqlite3") as j:
            row = j.find_by_msgid(held["msgid"])
            assert row is not None and row.state == State.SETTLED
        assert settlement_state(lab, held["msgid"]) == "settled"
    finally:
        daemon.stop()


async def test_a_sale_published_while_the_daemon_is_away_is_never_run(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG) as t:
        await t.stop_daemon()
        assert t.pos is not None
        await pos_send(lab, A, "sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL), t.reply_topic, t.pos)
        await t.start()
        # Commands are delivered in order: had the broker queued the sales, they would come first.
        st = await t.request("card.status")
        assert st["ok"]
        assert t.daemon is not None and set(t.daemon.stats) == {"OK"} and t.daemon.stats["OK"] == 1
        assert not t.journal._query("SELECT * FROM txn WHERE created_at > ?", (time.time() - 60,))


async def test_a_wrong_psam_replaced_by_the_right_one_clears(lab: SettleLab, tmp_path: Path) -> None:
    from firmware_sim.loader import load_psam

    async with lab.terminal(A, ZHANG, psam_terminal=B) as t:
        r = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL))
        assert r["error"]["code"] == "TERMINAL_MISMATCH"
        _, right = issue_images(tmp_path / "right", ZHANG, terminal_id=A)
        assert t.psam is not None
        with t.psam.state_lock:
            t.psam.card = load_psam(right)
        r2 = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL))
        assert r2["ok"], r2


async def test_two_daemons_cannot_share_a_journal(lab: SettleLab) -> None:
    from sscardd.service import Daemon, JournalInUse

    async with lab.terminal(A, ZHANG) as t:
        second = Daemon(t.cfg, card_reader=t.card, psam_reader=t.psam)
        with pytest.raises(JournalInUse):
            await second.run()


async def test_sighup_with_a_broken_config_keeps_the_running_one(lab: SettleLab, tmp_path: Path) -> None:
    import signal

    work = tmp_path / "hup"
    work.mkdir()
    card, psam = issue_images(work, ZHANG, terminal_id=A)
    cfg_path = work / "sscardd.toml"
    good = config_text(lab, A, work, card=f"emulated:{card}", psam=f"emulated:{psam}")
    cfg_path.write_text(good)
    daemon = DaemonProcess(cfg_path)
    try:
        daemon.start()
        await asyncio.to_thread(daemon.wait_log, "broker connected")
        assert daemon.proc is not None
        cfg_path.write_text(good.replace("[pin]\n", "[pin]\nmin_len = 99\n"))
        daemon.proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(daemon.wait_log, "configuration not reloaded")
        assert "pin.min_len" in daemon.log_text()
        cfg_path.write_text(good.replace("backoff_min = 0.2", "backoff_min = 0.3"))
        daemon.proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(daemon.wait_log, "configuration reloaded")
        assert "reversal.backoff_min" in daemon.log_text()
        # still serving
        reply_topic = f"sscard/v1/term/{A}/reply/hup"
        async with lab.mosq.client(broker.pos_username(A)) as pos:
            await pos.subscribe(reply_topic, qos=1)
            await pos_send(lab, A, "card.status", {}, reply_topic, pos)
            async with asyncio.timeout(10):
                msg = await anext(pos.messages)
            assert json.loads(msg.payload)["ok"]  # type: ignore[arg-type]
        assert daemon.stop() == 0
    finally:
        daemon.stop()
