"""Settlement end to end: POS → daemon (in-process, emulated card and PSAM) → real mosquitto
(TLS, the provisioned dynamic-security file) → backend simulator processes on one ledger.

Faults come from the backend's fault controls (hold, hold_answer, drop, fail) and from real
process and broker restarts, never from sleeps; waiting for an outcome polls the journal or the
ledger with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from sscardd import broker
from sscardd.journal import State
from tests.backend_lab import request_properties
from tests.daemon_lab import (
    GOOD,
    INITIAL,
    LI,
    QIAN_NOT_ACTIVATED,
    SUN_FILED,
    WANG_LOST,
    ZHANG,
    ZHAO_BLACKLISTED,
    ZHOU_NOT_FILED,
    A,
    B,
    SettleLab,
    Terminal,
    capture_requests,
    pin_block,
    running_lab,
)
from tests.mqtt_harness import MosquittoFactory

pytestmark = pytest.mark.mosquitto

T = TypeVar("T")
ITEMS = [{"code": "A0001", "qty": 2, "price": "12.50"}, {"code": "B0001", "qty": 1, "price": "30.00"},
         {"code": "C0001", "qty": 1, "price": "8.00"}]
SMALL = [{"code": "A0002", "qty": 1, "price": "6.00"}]
OPERATOR = {"id": "0001", "name": "王药师"}
HOSPITAL_T, CLINIC_T = "370202000001", "370203000001"
SUSPENDED_T, BLACKLISTED_T = "370213000001", "370211000001"


@pytest.fixture(scope="module")
def lab(mosquitto_factory: MosquittoFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SettleLab]:
    with running_lab(mosquitto_factory, tmp_path_factory.mktemp("settle")) as lab:
        yield lab


@pytest.fixture(autouse=True)
def _clean_faults(lab: SettleLab) -> Iterator[None]:
    yield
    lab.faults.clear()
    lab.faults.release()


def sale(pin: dict[str, Any] | None, items: list[dict[str, Any]] | None = None, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"operator": OPERATOR, "items": items or ITEMS, **kw}
    if pin is not None:
        args["pin"] = pin
    return args


async def eventually(fn: Callable[[], Awaitable[T]], check: Callable[[T], bool], timeout: float = 15.0) -> T:
    """Poll ``fn`` until ``check`` holds (a deadline, not a sleep standing in for a fault)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fn()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s; last value {value!r}")
        await asyncio.sleep(0.02)


async def row_state(t: Terminal, row_id: int) -> State:
    entry = await asyncio.to_thread(t.journal.get, row_id)
    return entry.state


def settlement_state(lab: SettleLab, msgid: str) -> str | None:
    rows = lab.ledger_rows("SELECT state FROM settlement WHERE msgid = ?", (msgid,))
    return str(rows[0][0]) if rows else None


def last_row(t: Terminal) -> Any:
    rows = t.journal._query("SELECT * FROM txn ORDER BY id DESC LIMIT 1")
    return rows[0]


def fen(money: str) -> int:
    return int(money.replace(".", ""))


def err(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    return str(reply["error"]["code"])


# --- the main paths ------------------------------------------------------------------------------


async def test_pharmacy_sale_books_once_and_records_on_the_chip(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG) as t:
        before = lab.balance(ZHANG.ssn)
        r = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn)))
        assert r["ok"], r
        res = r["result"]
        assert (res["medfee_sumamt"], res["fund_pay_sumamt"], res["acct_pay"], res["psn_cash_pay"]) == \
            ("63.00", "0.00", "52.00", "11.00")
        assert res["pin_verified"] is True and res["chip_record"] == "written" and res["psn_name"] == "张*"
        assert [ln["code"] for ln in res["lines"]] == ["A0001", "B0001", "C0001"]
        assert res["lines"][1]["preselfpay_amt"] == "3.00"
        assert fen(lab.balance(ZHANG.ssn)) == fen(before) - 5200
        assert res["balc"] == lab.balance(ZHANG.ssn)
        assert settlement_state(lab, res["msgid"]) == "settled"
        row = last_row(t)
        assert row.state == State.SETTLED and row.chip_record == "written" and row.setl_id == res["setl_id"]
        # The chip's DF04/EF08 holds the record: account 52.00, self-pay 11.00, fund 0.00.
        chip = await t.request("card.read", {"address": "DF04EF08|01|$", "auth": "pin",
                                             "pin": pin_block(GOOD, ZHANG.ssn)})
        assert chip["ok"], chip
        assert "52.00^11.00^0.00^" in chip["result"]["value"] and A in chip["result"]["value"]
        # The stored reply holds no full ID number and no name.
        stored = json.dumps(row.reply, ensure_ascii=False)
        assert ZHANG.ssn not in stored and ZHANG.name not in stored


async def test_preview_books_nothing(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG) as t:
        before = lab.balance(ZHANG.ssn)
        r = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), preview=True))
        assert r["ok"] and r["result"]["preview"] is True and r["result"]["setl_id"] is None, r
        assert r["result"]["acct_pay"] == "52.00"
        assert lab.balance(ZHANG.ssn) == before
        assert last_row(t).state == State.PREVIEWED


async def test_keypad_pin_at_a_pharmacy(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG) as t:
        t.keypad.type(GOOD)
        r = await t.request("sale", sale(None, SMALL))
        assert r["ok"] and r["result"]["pin_verified"] is True, r


async def test_wrong_pin_counts_down_to_blocked_and_books_nothing(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG) as t:
        before = lab.balance(ZHANG.ssn)
        first = last_row(t).id if t.journal._query("SELECT * FROM txn LIMIT 1") else 0
        r1 = await t.request("sale", sale(pin_block("111111", ZHANG.ssn)))
        assert err(r1) == "PIN_WRONG" and r1["error"]["tries_left"] == 2 and r1["error"]["compat_code"] == -51
        r2 = await t.request("sale", sale(pin_block("111111", ZHANG.ssn)))
        assert err(r2) == "PIN_WRONG" and r2["error"]["tries_left"] == 1
        r3 = await t.request("sale", sale(pin_block("111111", ZHANG.ssn)))
        assert err(r3) == "PIN_BLOCKED"
        r4 = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn)))
        assert err(r4) == "PIN_BLOCKED"
        assert lab.balance(ZHANG.ssn) == before
        rows = t.journal._query("SELECT * FROM txn WHERE id > ?", (first,))
        assert {e.state for e in rows} == {State.REFUSED} and len(rows) == 4
        log_text = json.dumps([e.reply for e in rows])
        assert "111111" not in log_text


async def test_initial_pin_cannot_transact_until_changed(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG, pin=INITIAL) as t:
        r = await t.request("sale", sale(pin_block(INITIAL, ZHANG.ssn), SMALL))
        assert err(r) == "PIN_INITIAL" and r["error"]["compat_code"] == -35
        to_initial = {"source": "block", "old": pin_block(INITIAL, ZHANG.ssn)["block"],
                      "new": pin_block(INITIAL, ZHANG.ssn)["block"],
                      "new_again": pin_block(INITIAL, ZHANG.ssn)["block"]}
        assert err(await t.request("pin.change", {"pin": to_initial})) == "PIN_TO_INITIAL"
        change = {"source": "block", "old": pin_block(INITIAL, ZHANG.ssn)["block"],
                  "new": pin_block(GOOD, ZHANG.ssn)["block"],
                  "new_again": pin_block(GOOD, ZHANG.ssn)["block"]}
        c = await t.request("pin.change", {"pin": change})
        assert c["ok"], c
        r2 = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL))
        assert r2["ok"], r2


async def test_hospital_sale_needs_no_pin(lab: SettleLab) -> None:
    async with lab.terminal(HOSPITAL_T, ZHANG, psam_terminal=HOSPITAL_T) as t:
        r = await t.request("sale", sale(None, [{"code": "A0001", "qty": 1, "price": "12.50"}]))
        assert r["ok"] and r["result"]["pin_verified"] is False, r
        # hospital fund ratio 0.70: 12.50 → fund 8.75, account 3.75
        assert (r["result"]["fund_pay_sumamt"], r["result"]["acct_pay"]) == ("8.75", "3.75")


async def test_daily_goods_are_refused_with_the_lines(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG) as t:
        before = lab.balance(ZHANG.ssn)
        items = [*SMALL, {"code": "G0001", "qty": 1, "price": "25.00"}]
        r = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), items))
        assert err(r) == "NON_MEDICAL_ITEM" and r["error"]["backend_code"] == "NON_MEDICAL_ITEM"
        assert [ln.get("medins_list_codg") for ln in r["error"]["lines"]] == ["G0001"]
        assert lab.balance(ZHANG.ssn) == before


@pytest.mark.parametrize(("person", "code"), [(WANG_LOST, "CARD_LOST"),
                                             (ZHAO_BLACKLISTED, "CARD_BLACKLISTED"),
                                             (QIAN_NOT_ACTIVATED, "CARD_NOT_ACTIVATED")])
async def test_cards_that_may_not_transact(lab: SettleLab, person: Any, code: str) -> None:
    async with lab.terminal(A, person) as t:
        r = await t.request("sale", sale(pin_block(GOOD, person.ssn), SMALL))
        assert err(r) == code, r


@pytest.mark.parametrize(("terminal", "code"), [(SUSPENDED_T, "INSTITUTION_SUSPENDED"),
                                               (BLACKLISTED_T, "INSTITUTION_BLACKLISTED")])
async def test_institutions_that_may_not_transact(lab: SettleLab, terminal: str, code: str) -> None:
    async with lab.terminal(terminal, ZHANG, psam_terminal=terminal) as t:
        r = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL))
        assert err(r) == code, r


async def test_cross_region_needs_a_filing(lab: SettleLab) -> None:
    async with lab.terminal(A, SUN_FILED) as t:
        r = await t.request("sale", sale(pin_block(GOOD, SUN_FILED.ssn), SMALL))
        assert r["ok"] and r["result"]["cross_region"] is True, r
    async with lab.terminal(A, ZHOU_NOT_FILED) as t:
        r = await t.request("sale", sale(pin_block(GOOD, ZHOU_NOT_FILED.ssn), SMALL))
        assert err(r) == "CROSS_REGION_NOT_FILED"


async def test_void_restores_the_account_once(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG) as t:
        before = lab.balance(ZHANG.ssn)
        r = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn)))
        assert r["ok"], r
        v = await t.request("sale.void", {"setl_id": r["result"]["setl_id"], "operator": OPERATOR})
        assert v["ok"] and v["result"]["acct_pay"] == "52.00" and v["result"]["refd_setl_flag"] == "1", v
        assert lab.balance(ZHANG.ssn) == before == v["result"]["balc"]
        again = await t.request("sale.void", {"setl_id": r["result"]["setl_id"]})
        assert err(again) == "ALREADY_VOIDED"
        assert err(await t.request("sale.void", {"setl_id": "S000000"})) == "SETTLEMENT_NOT_FOUND"


async def test_account_query_and_reads(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG) as t:
        q = await t.request("account.query")
        assert q["ok"] and q["result"]["balc"] == lab.balance(ZHANG.ssn) and q["result"]["activated"] is True
        assert q["result"]["psn_name"] == "张*"
        st = await t.request("card.status")
        assert st["ok"] and st["result"]["card_no"] == ZHANG.card_no and st["result"]["on_hold"] is False
        rb = await t.request("card.read_basic")
        assert rb["ok"] and rb["result"]["compat"].split("|")[1] == ZHANG.ssn
        pv = await t.request("pin.verify", {"pin": pin_block(GOOD, ZHANG.ssn)})
        assert pv["ok"], pv


# --- idempotency ---------------------------------------------------------------------------------


async def test_duplicate_pos_request_gets_the_stored_reply(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG) as t:
        args = sale(pin_block(GOOD, ZHANG.ssn), SMALL)
        # two deliveries at once, and one later
        r1, r2 = await asyncio.gather(t.request("sale", args, request_id="dup-1"),
                                      t.request("sale", args, request_id="dup-1"))
        r3 = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL), request_id="dup-1")
        assert r1["ok"] and r1 == r2 == r3, (r1, r2, r3)
        assert len(lab.ledger_rows("SELECT 1 FROM settlement WHERE msgid = ?", (r1["result"]["msgid"],))) == 1
        assert len(t.journal._query("SELECT * FROM txn WHERE request_id = 'dup-1'")) == 1
        other = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), ITEMS), request_id="dup-1")
        assert err(other) == "ID_REUSED"


async def test_the_same_request_delivered_to_two_backend_instances(lab: SettleLab) -> None:
    """Instance 1 books the 2102 and dies before answering; the redelivered message reaches
    instance 2, which answers from the stored result: one settlement, and the sale completes."""
    first = lab.backends[0]
    second = lab.start_backend(f"b2-{time.monotonic_ns()}")
    try:
        async with lab.terminal(A, ZHANG) as t:
            assert t.daemon is not None
            link = t.daemon.link
            sent = capture_requests(link, "2102")
            lab.faults.arm("hold_answer", infno="2102", terminal_id=A)
            task = asyncio.create_task(t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL)))
            held = await asyncio.to_thread(lab.faults.wait_held, infno="2102")
            holder = next(b for b in lab.backends if b.instance == held["instance"])
            holder.stop()
            lab.backends.remove(holder)
            survivor = second if holder is first else first
            # The same message again, as a redelivery brings it; only the survivor subscribes now.
            payload, corr = sent[0]
            async with lab.mosq.client(broker.daemon_username(A)) as dup:
                await dup.publish(link.request_topic, payload, qos=1,
                                  properties=request_properties(link.response_topic, corr, 4))
                r = await task
            assert r["ok"], r
            msgid = r["result"]["msgid"]
            assert msgid == held["msgid"]
            assert len(lab.ledger_rows("SELECT 1 FROM settlement WHERE msgid = ?", (msgid,))) == 1
            replay = await survivor.async_wait_event("request", msgid=msgid)
            assert replay["replayed"] is True
            assert last_row(t).state == State.SETTLED
    finally:
        for b in list(lab.backends):
            b.stop()
            lab.backends.remove(b)
        lab.start_backend(f"b1-{time.monotonic_ns()}")


# --- lost and late answers -----------------------------------------------------------------------


async def test_dropped_2102_answer_is_reversed_and_the_card_held_meanwhile(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG, answer_timeout=1.5, message_expiry=1) as t, \
            lab.terminal(B, LI, psam_terminal=B) as tb:
        before = lab.balance(ZHANG.ssn)
        lab.faults.arm("drop", infno="2102", terminal_id=A)
        lab.faults.arm("hold", infno="2601", terminal_id=A)
        r = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL))
        assert err(r) == "OUTCOME_UNKNOWN"
        row = last_row(t)
        await asyncio.to_thread(lab.faults.wait_held, infno="2601")
        assert settlement_state(lab, row.msgid) == "settled"  # booked, answer lost
        # The card is held until the reversal is acknowledged; another card is not.
        again = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL))
        assert err(again) == "CARD_ON_HOLD"
        other = await tb.request("sale", sale(pin_block(GOOD, LI.ssn), SMALL))
        assert other["ok"], other
        lab.faults.release(infno="2601")
        await eventually(lambda: row_state(t, row.id), lambda s: s == State.REVERSED)
        assert settlement_state(lab, row.msgid) == "reversed"
        assert lab.balance(ZHANG.ssn) == before
        after = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL))
        assert after["ok"], after


async def test_2102_delayed_past_the_reversal_is_refused_by_the_tombstone(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG, answer_timeout=1.5, message_expiry=1) as t:
        before = lab.balance(ZHANG.ssn)
        lab.faults.arm("hold", infno="2102", terminal_id=A)
        r = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL))
        assert err(r) == "OUTCOME_UNKNOWN"
        row = last_row(t)
        await eventually(lambda: row_state(t, row.id), lambda s: s == State.REVERSED)
        assert lab.ledger_rows("SELECT 1 FROM tombstone WHERE omsgid = ?", (row.msgid,))
        lab.faults.release(infno="2102")
        ans = await eventually(
            lambda: asyncio.to_thread(lab.ledger_rows, "SELECT err_code FROM message WHERE msgid = ?",
                                      (row.msgid,)), bool)
        assert ans[0][0] in ("MSG_REVERSED", "EXPIRED")
        assert settlement_state(lab, row.msgid) is None
        assert lab.balance(ZHANG.ssn) == before
        assert last_row(t).state == State.REVERSED


async def test_answer_that_is_not_final_is_an_unknown_outcome(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG) as t:
        before = lab.balance(ZHANG.ssn)
        lab.faults.arm("fail", infno="2102", terminal_id=A)
        r = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL))
        assert err(r) == "OUTCOME_UNKNOWN"
        row = last_row(t)
        await eventually(lambda: row_state(t, row.id), lambda s: s == State.REVERSED)
        assert lab.balance(ZHANG.ssn) == before


# --- malformed input -----------------------------------------------------------------------------


async def test_malformed_pos_requests_get_errors_and_the_daemon_keeps_serving(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG) as t:
        bad = await t.request("x", payload=b"{not json")
        assert err(bad) == "BAD_REQUEST"
        float_money = {"id": "m1", "op": "sale", "args": {
            "operator": OPERATOR, "items": [{"code": "A0001", "qty": 1, "price": 12.5}]}}
        assert err(await t.request("x", payload=json.dumps(float_money).encode())) == "BAD_REQUEST"
        no_args = json.dumps({"id": "m2", "op": "sale"}).encode()
        assert err(await t.request("x", payload=no_args)) == "BAD_REQUEST"
        unknown = json.dumps({"id": "m3", "op": "fly", "args": {}}).encode()
        assert err(await t.request("x", payload=unknown)) == "UNKNOWN_OP"
        big = json.dumps({"id": "m4", "op": "card.status", "args": {}, "pad": "x" * 70000}).encode()
        assert t.daemon is not None
        before = t.daemon.link.dropped_count
        with pytest.raises(TimeoutError):
            await t.request("x", payload=big, timeout=1.0)  # over max_payload: dropped with a log line
        assert t.daemon.link.dropped_count == before + 1
        ok = await t.request("card.status")
        assert ok["ok"], ok
        assert t.daemon.stats.get("BAD_REQUEST", 0) >= 3
