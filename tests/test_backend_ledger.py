"""The backend simulator's ledger without a broker: rules, money split, idempotency, reversal and
tombstones, void, reconciliation, activation, expiry, seeds, logs."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from apdu_specs.crypto import Algorithm
from backend_sim import logs, money, seed
from backend_sim.ledger import Ledger, LedgerError, Result
from backend_sim.service import check_response_topic, terminal_of
from backend_sim.split import Line, split
from tests.backend_helpers import (
    BLACKLISTED,
    CLINIC,
    EXAMPLE_SEED,
    HOSPITAL,
    LI,
    PHARMACY,
    PHARMACY_2,
    QIAN_NOT_ACTIVATED,
    SUN_FILED,
    SUSPENDED,
    WANG_LOST,
    WU_CANCELLED,
    ZHANG,
    ZHAO_BLACKLISTED,
    ZHOU_NOT_FILED,
    Card,
    Clock,
    Requests,
    dumps,
    roots,
)

SALE = [("A0001", 2, "12.50"), ("B0001", 1, "30.00"), ("C0001", 1, "8.00")]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(tmp_path: Path, clock: Clock) -> Ledger:
    lg = Ledger(tmp_path / "ledger.sqlite", seed.load(EXAMPLE_SEED), roots(), clock=clock, instance="t1")
    yield lg
    lg.close()


@pytest.fixture
def req(clock: Clock) -> Requests:
    return Requests(clock)


def send(ledger: Ledger, doc: dict[str, Any] | bytes, terminal_id: str = PHARMACY[0]) -> dict[str, Any]:
    res = send_raw(ledger, doc, terminal_id)
    return json.loads(res.answer)  # type: ignore[no-any-return]


def send_raw(ledger: Ledger, doc: dict[str, Any] | bytes, terminal_id: str = PHARMACY[0]) -> Result:
    return ledger.handle(terminal_id, doc if isinstance(doc, bytes) else dumps(doc))


def ok(ans: dict[str, Any]) -> dict[str, Any]:
    assert ans["infcode"] == 0, ans
    assert ans["err_code"] is None
    return ans["output"]  # type: ignore[no-any-return]


def refused(ans: dict[str, Any], code: str) -> dict[str, Any]:
    assert ans["infcode"] == -1, ans
    assert ans["err_code"] == code, ans
    assert " / " in ans["err_msg"]
    return ans["output"]  # type: ignore[no-any-return]


# --- money and split ------------------------------------------------------------------------------


def test_money_round_trip() -> None:
    assert money.parse_yuan("12.50") == 1250
    assert money.parse_yuan("0.00") == 0
    assert money.yuan(1250) == "12.50"
    assert money.yuan(-300) == "-3.00"
    for bad in ("12.5", "1", "-1.00", "01.00", 12.5, None, "1.005", " 1.00"):
        with pytest.raises(money.MoneyError):
            money.parse_yuan(bad)
    assert money.parse_ratio("0.10") == 1000
    assert money.parse_ratio("1") == 10_000
    assert money.ratio_str(1000) == "0.10"
    assert money.ratio_str(1234) == "0.1234"
    for bad in ("1.5", "0.12345", "-0.1", 0.1):
        with pytest.raises(money.MoneyError):
            money.parse_ratio(bad)
    assert money.share(5, 5000) == 3  # half up


def test_split_by_class() -> None:
    lines = [Line("1", "A", "a", "a", 2, 1250, 0), Line("2", "B", "b", "b", 1, 3000, 1000),
             Line("3", "C", "c", "c", 1, 800, 0)]
    sp = split(lines, 0, 50_000, True)
    a, b, c = sp.lines
    assert (a.in_scope, a.fund, a.acct, a.cash) == (2500, 0, 2500, 0)
    assert (b.preselfpay, b.in_scope, b.acct, b.cash) == (300, 2700, 2700, 300)
    assert (c.fulamt_ownpay, c.in_scope, c.acct, c.cash) == (800, 0, 0, 800)
    assert (sp.medfee, sp.fund, sp.acct, sp.cash) == (6300, 0, 5200, 1100)
    sp = split(lines, 5000, 1000, True)  # half from the fund, balance runs out on the first line
    assert [x.fund for x in sp.lines] == [1250, 1350, 0]
    assert [x.acct for x in sp.lines] == [1000, 0, 0]
    assert sp.cash == 6300 - 2600 - 1000
    assert split(lines, 0, 50_000, False).acct == 0


@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 50), st.integers(0, 100_000),
                          st.integers(0, 10_000)), min_size=1, max_size=12),
       st.integers(0, 10_000), st.integers(0, 10**7), st.booleans())
def test_split_invariants(items: list[tuple[str, int, int, int]], ratio: int, balance: int,
                          use: bool) -> None:
    lines = [Line(str(i), "X", "x", c, n, p, bp if c == "b" else 0) for i, (c, n, p, bp) in enumerate(items)]
    sp = split(lines, ratio, balance, use)
    assert sp.medfee == sp.fund + sp.acct + sp.cash
    assert 0 <= sp.acct <= (balance if use else 0)
    for x in sp.lines:
        assert min(x.fund, x.acct, x.cash, x.in_scope, x.preselfpay, x.fulamt_ownpay) >= 0
        assert x.fund + x.acct <= x.in_scope
        assert x.line.amount_fen == x.in_scope + x.preselfpay + x.fulamt_ownpay


# --- 1101 ---------------------------------------------------------------------------------------


def test_identity(ledger: Ledger, req: Requests) -> None:
    out = ok(send(ledger, req.identity()))
    assert out["baseinfo"]["certno"] == ZHANG[1]
    assert out["baseinfo"]["psn_name"] == "张三"
    assert out["baseinfo"]["gend"] == "1"
    assert out["baseinfo"]["brdy"] == "1990-01-01"
    assert out["baseinfo"]["age"] == 36
    assert out["insuinfo"][0]["balc"] == "500.00"
    assert out["cardinfo"] == {"card_no": ZHANG[0], "card_stas": "normal", "activated": True,
                               "cross_region": False, "cross_region_filing": False}
    refused(send(ledger, req.identity((ZHANG[0], LI[1]))), "CARD_MISMATCH")
    refused(send(ledger, req.identity(("Q99999999", ZHANG[1]))), "PERSON_NOT_FOUND")
    refused(send(ledger, req.identity(WANG_LOST)), "CARD_LOST")
    not_active = ok(send(ledger, req.identity(QIAN_NOT_ACTIVATED)))
    assert not_active["cardinfo"]["activated"] is False


# --- 2101 / 2102 --------------------------------------------------------------------------------


def test_preview_books_nothing(ledger: Ledger, req: Requests) -> None:
    out = ok(send(ledger, req.sale("2101", SALE)))
    info = out["setlinfo"]
    assert info["setl_id"] is None and info["mdtrt_id"] is None
    assert (info["medfee_sumamt"], info["acct_pay"], info["psn_cash_pay"], info["balc"]) == (
        "63.00", "52.00", "11.00", "448.00")
    assert ledger.balance(ZHANG[0]) == 50_000
    assert ledger.settlements() == []


def test_pharmacy_sale_receipt(ledger: Ledger, req: Requests) -> None:
    out = ok(send(ledger, req.sale("2102", SALE)))
    info = out["setlinfo"]
    assert info["setl_id"].startswith("S20261125") and info["mdtrt_id"].startswith("M20261125")
    assert {k: info[k] for k in ("medfee_sumamt", "fund_pay_sumamt", "acct_pay", "psn_cash_pay", "balc",
                                 "fulamt_ownpay_amt", "preselfpay_amt", "inscp_scp_amt")} == {
        "medfee_sumamt": "63.00", "fund_pay_sumamt": "0.00", "acct_pay": "52.00", "psn_cash_pay": "11.00",
        "balc": "448.00", "fulamt_ownpay_amt": "8.00", "preselfpay_amt": "3.00", "inscp_scp_amt": "52.00"}
    lines = out["detlcutinfo"]
    assert [(x["medins_list_codg"], x["item_class"], x["chrgitm_lv"]) for x in lines] == [
        ("A0001", "a", "01"), ("B0001", "b", "02"), ("C0001", "c", "03")]
    assert [(x["fund_pay"], x["acct_pay"], x["psn_cash_pay"]) for x in lines] == [
        ("0.00", "25.00", "0.00"), ("0.00", "27.00", "3.00"), ("0.00", "0.00", "8.00")]
    assert lines[1]["selfpay_prop"] == "0.10" and lines[1]["preselfpay_amt"] == "3.00"
    assert ledger.balance(ZHANG[0]) == 44_800
    [row] = ledger.settlements()
    assert row["state"] == "settled" and row["acct_pay"] == "52.00"


def test_clinic_and_hospital_fund_share(ledger: Ledger, clock: Clock) -> None:
    clinic = Requests(clock, CLINIC)
    info = ok(send(ledger, clinic.sale("2102", [("A0001", 2, "12.50")]), CLINIC[0]))["setlinfo"]
    assert (info["fund_pay_sumamt"], info["acct_pay"], info["psn_cash_pay"]) == ("12.50", "12.50", "0.00")
    hospital = Requests(clock, HOSPITAL)
    sale = hospital.sale("2102", [("B0002", 1, "10.00")], pin=False)
    info = ok(send(ledger, sale, HOSPITAL[0]))["setlinfo"]
    # class b 20 % first self-pay: 2.00 cash; 8.00 in scope, 70 % fund = 5.60, account 2.40
    assert (info["fund_pay_sumamt"], info["acct_pay"], info["psn_cash_pay"]) == ("5.60", "2.40", "2.00")


def test_pin_policy(ledger: Ledger, req: Requests, clock: Clock) -> None:
    refused(send(ledger, req.sale("2102", SALE, pin=False)), "PIN_NOT_VERIFIED")
    refused(send(ledger, req.sale("2101", SALE, pin=False)), "PIN_NOT_VERIFIED")
    clinic = Requests(clock, CLINIC)
    refused(send(ledger, clinic.sale("2102", SALE, pin=False), CLINIC[0]), "PIN_NOT_VERIFIED")
    hospital = Requests(clock, HOSPITAL)
    ok(send(ledger, hospital.sale("2102", SALE, pin=False), HOSPITAL[0]))
    assert ledger.balance(ZHANG[0]) < 50_000


def test_account_never_negative(ledger: Ledger, req: Requests) -> None:
    info = ok(send(ledger, req.sale("2102", [("A0001", 1, "12.50")], LI)))["setlinfo"]
    assert (info["acct_pay"], info["psn_cash_pay"], info["balc"]) == ("5.00", "7.50", "0.00")
    info = ok(send(ledger, req.sale("2102", [("A0001", 1, "12.50")], LI)))["setlinfo"]
    assert (info["acct_pay"], info["psn_cash_pay"], info["balc"]) == ("0.00", "12.50", "0.00")
    assert ledger.balance(LI[0]) == 0


def test_account_not_used(ledger: Ledger, req: Requests) -> None:
    info = ok(send(ledger, req.sale("2102", SALE, acct_used_flag="0")))["setlinfo"]
    assert (info["acct_pay"], info["psn_cash_pay"]) == ("0.00", "63.00")
    assert ledger.balance(ZHANG[0]) == 50_000


def test_non_medical_and_unknown_items(ledger: Ledger, req: Requests) -> None:
    out = refused(send(ledger, req.sale("2102", [("A0001", 1, "12.50"), ("G0001", 1, "25.00"),
                                                 ("G0002", 2, "6.00")])), "NON_MEDICAL_ITEM")
    assert out["lines"] == [{"feedetl_sn": "2", "medins_list_codg": "G0001", "name": "洗发水"},
                            {"feedetl_sn": "3", "medins_list_codg": "G0002", "name": "牙膏"}]
    out = refused(send(ledger, req.sale("2102", [("X9999", 1, "1.00")])), "UNKNOWN_ITEM")
    assert out["lines"] == [{"feedetl_sn": "1", "medins_list_codg": "X9999"}]
    refused(send(ledger, req.sale("2102", SALE, total="64.00")), "TOTAL_MISMATCH")
    assert ledger.settlements() == [] and ledger.balance(ZHANG[0]) == 50_000


@pytest.mark.parametrize(("person", "code"), [(WANG_LOST, "CARD_LOST"),
                                              (ZHAO_BLACKLISTED, "CARD_BLACKLISTED"),
                                              (WU_CANCELLED, "CARD_CANCELLED"),
                                              (QIAN_NOT_ACTIVATED, "CARD_NOT_ACTIVATED"),
                                              (ZHOU_NOT_FILED, "CROSS_REGION_NOT_FILED")])
def test_person_refusals(ledger: Ledger, req: Requests, person: tuple[str, str], code: str) -> None:
    refused(send(ledger, req.sale("2102", SALE, person)), code)
    assert ledger.settlements() == []


def test_cross_region_with_filing(ledger: Ledger, req: Requests) -> None:
    info = ok(send(ledger, req.sale("2102", SALE, SUN_FILED)))["setlinfo"]
    assert info["cross_region"] is True


def test_region_level_configurable(tmp_path: Path, clock: Clock) -> None:
    text = EXAMPLE_SEED.read_text(encoding="utf-8").replace("region_level = 4", "region_level = 2")
    lg = Ledger(tmp_path / "l.sqlite", seed.parse(text.encode()), roots(), clock=clock)
    try:
        info = ok(send(lg, Requests(clock).sale("2102", SALE, ZHOU_NOT_FILED)))["setlinfo"]
        assert info["cross_region"] is False
    finally:
        lg.close()


@pytest.mark.parametrize(("terminal", "code"), [(SUSPENDED, "INSTITUTION_SUSPENDED"),
                                                (BLACKLISTED, "INSTITUTION_BLACKLISTED")])
def test_institution_refusals(ledger: Ledger, clock: Clock, terminal: tuple[str, str], code: str) -> None:
    r = Requests(clock, terminal)
    refused(send(ledger, r.sale("2102", SALE), terminal[0]), code)
    refused(send(ledger, r.identity(), terminal[0]), code)


def test_institution_comes_from_the_terminal(ledger: Ledger, req: Requests) -> None:
    doc = req.sale("2102", SALE)
    doc["fixmedins_code"] = HOSPITAL[1]  # a pharmacy claiming to be the hospital (no PIN needed there)
    refused(send(ledger, doc), "INSTITUTION_MISMATCH")
    refused(send(ledger, req.sale("2102", SALE), "370299999999"), "UNKNOWN_TERMINAL")
    refused(send(ledger, req.sale("2102", SALE, mdtrtarea_admvs_unused=1) | {"mdtrtarea_admvs": "370203"}),
            "REGION_MISMATCH")
    refused(send(ledger, req.sale("2102", SALE) | {"insuplc_admdvs": "370102"}), "REGION_MISMATCH")
    assert ledger.settlements() == []


# --- the card cryptogram ------------------------------------------------------------------------


def test_cryptogram_checked(ledger: Ledger, req: Requests) -> None:
    doc = req.sale("2102", SALE)
    doc["input"]["card_auth"]["cryptogram"] = "00" * 8
    refused(send(ledger, doc), "CARD_NOT_GENUINE")
    # a genuine cryptogram for another total or another msgid does not verify
    doc = req.sale("2102", SALE)
    doc["input"]["card_auth"] = Card().auth(doc["msgid"], "1.00")
    refused(send(ledger, doc), "CARD_NOT_GENUINE")
    doc = req.sale("2102", SALE)
    doc["input"]["card_auth"] = Card().auth(req.msgid(), "63.00")
    refused(send(ledger, doc), "CARD_NOT_GENUINE")
    # a forged card identification code
    doc = req.sale("2102", SALE)
    sn = bytearray(bytes.fromhex(doc["input"]["card_auth"]["card_sn"]))
    sn[-1] ^= 1
    doc["input"]["card_auth"]["card_sn"] = sn.hex()
    refused(send(ledger, doc), "CARD_NOT_GENUINE")
    doc = req.sale("2102", SALE)
    del doc["input"]["card_auth"]
    refused(send(ledger, doc), "BAD_INPUT")
    assert ledger.settlements() == []
    ok(send(ledger, req.sale("2102", SALE, card=Card(alg=Algorithm.DES3, serial=bytes.fromhex("0A0B0C0D")))))


def test_cryptogram_matches_the_emulated_card(ledger: Ledger, req: Requests) -> None:
    """The contract with the real chip: the emulated card's INTERNAL AUTHENTICATE is accepted."""
    from apdu_specs import sale_auth
    from apdu_specs.identifiers import historical_bytes
    from tests.emu import SELECT_SSSE, new_card
    from tests.emu import ok as apdu_ok

    card = new_card(3)
    doc = req.sale("2102", SALE)
    si, plain = sale_auth.sale_challenge(doc["msgid"], doc["input"]["medfee_sumamt"], req.terminal_id)
    apdu_ok(card, SELECT_SSSE)
    answer = apdu_ok(card, "0088000010" + (si + plain).hex())
    ef05 = card.image.files["SSSE/EF05"]
    card_sn = next(r for r in ef05.records if r[0] == 0x01)[2:18]
    doc["input"]["card_auth"] = {"card_sn": card_sn.hex(), "atr_hist": historical_bytes(card.atr).hex(),
                                 "alg": "03", "cryptogram": answer.hex()}
    ok(send(ledger, doc))


def test_card_bound_to_person(tmp_path: Path, clock: Clock) -> None:
    text = EXAMPLE_SEED.read_text(encoding="utf-8").replace(
        'portal_password = "Zhang2024pw"',
        f'portal_password = "Zhang2024pw"\ncard_sn = "{Card().card_sn.hex()}"')
    lg = Ledger(tmp_path / "l.sqlite", seed.parse(text.encode()), roots(), clock=clock)
    try:
        r = Requests(clock)
        refused(send(lg, r.sale("2102", SALE, card=Card(serial=bytes.fromhex("00000001")))), "CARD_MISMATCH")
        ok(send(lg, r.sale("2102", SALE)))
    finally:
        lg.close()


# --- idempotency --------------------------------------------------------------------------------


def test_repeated_msgid_gets_the_stored_answer(ledger: Ledger, req: Requests, clock: Clock) -> None:
    doc = req.sale("2102", SALE)
    first = send_raw(ledger, doc)
    assert first.stored and not first.replayed
    clock.advance(5)
    again = send_raw(ledger, doc)
    assert again.replayed and again.answer == first.answer
    # fresh inf_time/exp_time, same business content: still the same message
    fresh = dict(doc, inf_time="2026-11-25 10:30:05", exp_time="2026-11-25 10:31:00")
    assert send_raw(ledger, fresh).answer == first.answer
    assert ledger.balance(ZHANG[0]) == 44_800 and len(ledger.settlements()) == 1


def test_repeated_msgid_other_body_is_an_alarm(ledger: Ledger, req: Requests, capsys: Any) -> None:
    doc = req.sale("2102", SALE)
    first = send_raw(ledger, doc)
    other = req.sale("2102", [("A0001", 1, "12.50")], msgid=doc["msgid"])
    res = send_raw(ledger, other)
    assert res.alarm and res.err_code == "MSGID_REUSED" and not res.stored
    assert send_raw(ledger, doc).answer == first.answer
    assert len(ledger.settlements()) == 1


def test_same_msgid_on_two_terminals_is_two_messages(ledger: Ledger, req: Requests, clock: Clock) -> None:
    doc = req.identity()
    ok(send(ledger, doc, PHARMACY[0]))
    other = Requests(clock, PHARMACY_2).identity()
    ok(send(ledger, dict(other, msgid=doc["msgid"]), PHARMACY_2[0]))
    assert ledger.message_count() == 2


def test_two_ledger_instances_share_one_file(ledger: Ledger, req: Requests, clock: Clock) -> None:
    other = Ledger(ledger.path, seed.load(EXAMPLE_SEED), roots(), clock=clock, instance="t2")
    try:
        doc = req.sale("2102", SALE)
        results: list[Result] = []
        barrier = threading.Barrier(8)

        def go(lg: Ledger) -> None:
            barrier.wait()
            results.append(send_raw(lg, doc))

        threads = [threading.Thread(target=go, args=(lg,)) for lg in [ledger, other] * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len({r.answer for r in results}) == 1
        assert sum(not r.replayed for r in results) == 1
        assert ledger.balance(ZHANG[0]) == 44_800 and len(other.settlements()) == 1
    finally:
        other.close()


# --- expiry -------------------------------------------------------------------------------------


def test_expired_request_refused(ledger: Ledger, req: Requests, clock: Clock) -> None:
    doc = req.sale("2102", SALE)
    clock.advance(31)
    late = send_raw(ledger, doc)
    assert json.loads(late.answer)["err_code"] == "EXPIRED"
    assert json.loads(late.answer)["final"] is False and not late.stored
    assert ledger.settlements() == []
    clock.advance(-31)
    # EXPIRED is not stored (nothing happened): the same msgid in time is processed afresh —
    # a reversal retried with fresh times must not get an old EXPIRED replayed for ever
    again = send_raw(ledger, doc)
    assert not again.replayed and json.loads(again.answer)["infcode"] == 0
    assert json.loads(again.answer)["final"] is True
    doc = req.sale("2102", SALE)
    doc["exp_time"] = "2026-11-25 10:41:00"  # 11 minutes: longer than max_ttl_seconds
    refused(send(ledger, doc), "BAD_ENVELOPE")
    doc = req.sale("2102", SALE)
    doc["exp_time"] = "2026-11-25 10:29:59"
    refused(send(ledger, doc), "BAD_ENVELOPE")


def test_stored_answer_outlives_the_expiry(ledger: Ledger, req: Requests, clock: Clock) -> None:
    doc = req.sale("2102", SALE)
    first = send_raw(ledger, doc)
    clock.advance(3600)
    assert send_raw(ledger, doc).answer == first.answer


# --- void ---------------------------------------------------------------------------------------


def test_void(ledger: Ledger, req: Requests, clock: Clock) -> None:
    setl_id = ok(send(ledger, req.sale("2102", SALE)))["setlinfo"]["setl_id"]
    refused(send(ledger, req.void("S000")), "SETTLEMENT_NOT_FOUND")
    refused(send(ledger, req.void(setl_id, mdtrt_id="M0")), "SETTLEMENT_NOT_FOUND")
    hospital = Requests(clock, HOSPITAL)
    refused(send(ledger, hospital.void(setl_id), HOSPITAL[0]), "SETTLEMENT_NOT_FOUND")
    # another terminal of the same institution may void
    info = ok(send(ledger, Requests(clock, PHARMACY_2).void(setl_id), PHARMACY_2[0]))["setlinfo"]
    assert (info["setl_id"], info["acct_pay"], info["balc"], info["refd_setl_flag"]) == (
        setl_id, "52.00", "500.00", "1")
    assert ledger.balance(ZHANG[0]) == 50_000
    refused(send(ledger, req.void(setl_id)), "ALREADY_VOIDED")
    assert ledger.settlements()[0]["state"] == "voided"


# --- reversal and tombstones --------------------------------------------------------------------


def test_reversal_unbooks(ledger: Ledger, req: Requests) -> None:
    sale = req.sale("2102", SALE)
    setl_id = ok(send(ledger, sale))["setlinfo"]["setl_id"]
    rev = req.reversal(sale["msgid"])
    out = ok(send(ledger, rev))
    assert out == {"omsgid": sale["msgid"], "oinfno": "2102", "result": "reversed", "setl_id": setl_id,
                   "balc": "500.00"}
    assert ledger.balance(ZHANG[0]) == 50_000
    assert send_raw(ledger, rev).replayed
    assert ok(send(ledger, req.reversal(sale["msgid"])))["result"] == "already_reversed"
    refused(send(ledger, req.void(setl_id)), "SETTLEMENT_REVERSED")
    assert send_raw(ledger, sale).replayed  # a late duplicate of the original books nothing
    assert ledger.balance(ZHANG[0]) == 50_000
    assert ledger.settlements()[0]["state"] == "reversed"


def test_reversal_of_unseen_message_leaves_a_tombstone(ledger: Ledger, req: Requests, clock: Clock) -> None:
    sale = req.sale("2102", SALE)
    assert ok(send(ledger, req.reversal(sale["msgid"])))["result"] == "tombstoned"
    assert ok(send(ledger, req.reversal(sale["msgid"])))["result"] == "already_reversed"
    refused(send(ledger, req.reversal(sale["msgid"], "2103")), "REVERSAL_MISMATCH")
    refused(send(ledger, sale), "MSG_REVERSED")
    refused(send(ledger, sale), "MSG_REVERSED")
    assert ledger.settlements() == [] and ledger.balance(ZHANG[0]) == 50_000
    # the tombstone is the terminal's own: another terminal's message with that msgid is not touched
    other = Requests(clock, PHARMACY_2).sale("2102", SALE, msgid=sale["msgid"])
    ok(send(ledger, other, PHARMACY_2[0]))


def test_reversal_edge_cases(ledger: Ledger, req: Requests) -> None:
    bad = req.sale("2102", SALE, pin=False)
    refused(send(ledger, bad), "PIN_NOT_VERIFIED")
    assert ok(send(ledger, req.reversal(bad["msgid"])))["result"] == "nothing_to_reverse"
    preview = req.sale("2101", SALE)
    ok(send(ledger, preview))
    assert ok(send(ledger, req.reversal(preview["msgid"], "2101")))["result"] == "nothing_to_reverse"
    refused(send(ledger, req.reversal(preview["msgid"], "2102")), "REVERSAL_MISMATCH")
    ident = req.identity()
    ok(send(ledger, ident))
    refused(send(ledger, req.reversal(ident["msgid"], "1101")), "NOT_REVERSIBLE")
    refused(send(ledger, req.envelope("2601", {"omsgid": "x y", "oinfno": "2102"})), "BAD_INPUT")


def test_reversal_of_a_void_rebooks(ledger: Ledger, req: Requests) -> None:
    setl_id = ok(send(ledger, req.sale("2102", SALE)))["setlinfo"]["setl_id"]
    void = req.void(setl_id)
    ok(send(ledger, void))
    assert ledger.balance(ZHANG[0]) == 50_000
    out = ok(send(ledger, req.reversal(void["msgid"], "2103")))
    assert (out["result"], out["balc"]) == ("reversed", "448.00")
    assert ledger.settlements()[0]["state"] == "settled"
    assert ok(send(ledger, req.reversal(void["msgid"], "2103")))["result"] == "already_reversed"
    ok(send(ledger, req.void(setl_id)))  # and it can be voided again
    assert ledger.balance(ZHANG[0]) == 50_000


def test_reversal_of_a_void_when_the_money_is_spent(ledger: Ledger, req: Requests) -> None:
    setl_id = ok(send(ledger, req.sale("2102", [("A0001", 1, "5.00")], LI)))["setlinfo"]["setl_id"]
    void = req.void(setl_id)
    ok(send(ledger, void))
    ok(send(ledger, req.sale("2102", [("A0001", 1, "5.00")], LI)))
    refused(send(ledger, req.reversal(void["msgid"], "2103")), "REVERSAL_CONFLICT")
    assert ledger.balance(LI[0]) == 0


def test_reversal_allowed_for_a_suspended_institution(ledger: Ledger, clock: Clock) -> None:
    r = Requests(clock, SUSPENDED)
    out = ok(send(ledger, r.reversal("P372130000012026112510300099"), SUSPENDED[0]))
    assert out["result"] == "tombstoned"


# --- reconciliation -----------------------------------------------------------------------------


def test_reconciliation(ledger: Ledger, req: Requests, clock: Clock) -> None:
    s1 = ok(send(ledger, req.sale("2102", SALE)))["setlinfo"]
    s2_req = req.sale("2102", [("A0001", 1, "10.00")])
    ok(send(ledger, s2_req))
    s3 = ok(send(ledger, req.sale("2102", [("B0001", 1, "20.00")])))["setlinfo"]
    other = ok(send(ledger, Requests(clock, PHARMACY_2).sale("2102", [("A0002", 1, "3.00")]), PHARMACY_2[0]))
    ok(send(ledger, req.void(s3["setl_id"])))
    ok(send(ledger, req.reversal(s2_req["msgid"])))
    period = {"stmt_begndate": "2026-11-25", "stmt_enddate": "2026-11-25"}
    tot = ok(send(ledger, req.envelope("3201", period)))
    assert (tot["setl_cnt"], tot["medfee_sumamt"], tot["acct_pay"], tot["refd_setl_cnt"]) == (
        2, "66.00", "55.00", 2)
    mine = ok(send(ledger, req.envelope("3201", {**period, "terminal_id": PHARMACY[0]})))
    assert (mine["setl_cnt"], mine["medfee_sumamt"], mine["psn_cash_pay"]) == (1, "63.00", "11.00")
    mine_period = {**period, "terminal_id": PHARMACY[0]}
    agree = ok(send(ledger, req.envelope("3201", {**mine_period, "fixmedins_setl_cnt": 1,
                                                  "medfee_sumamt": "63.00", "fund_pay_sumamt": "0.00",
                                                  "acct_pay": "52.00"})))
    assert agree["stmt_rslt"] == "0"
    differ = ok(send(ledger, req.envelope("3201", {**mine_period, "fixmedins_setl_cnt": 2,
                                                   "medfee_sumamt": "73.00", "fund_pay_sumamt": "0.00",
                                                   "acct_pay": "62.00"})))
    assert differ["stmt_rslt"] == "1" and "fixmedins_setl_cnt" in differ["stmt_rslt_dscr"]
    day_before = {"stmt_begndate": "2026-11-24", "stmt_enddate": "2026-11-24"}
    empty = ok(send(ledger, req.envelope("3201", day_before)))
    assert empty["setl_cnt"] == 0 and empty["medfee_sumamt"] == "0.00"
    refused(send(ledger, req.envelope("3201", {**period, "terminal_id": HOSPITAL[0]})), "BAD_INPUT")
    refused(send(ledger, req.envelope("3201", {"stmt_begndate": "2026-11-26", "stmt_enddate": "2026-11-25"})),
            "BAD_INPUT")

    det = ok(send(ledger, req.envelope("3202", {**period, "terminal_id": PHARMACY[0]})))
    assert det["total"] == 3
    first = det["rows"][0]
    assert (first["setl_id"], first["state"], first["refd_setl_flag"]) == (s1["setl_id"], "settled", "0")
    assert {r["state"] for r in det["rows"]} == {"settled", "voided", "reversed"}
    page = ok(send(ledger, req.envelope("3202", {**period, "page_num": 2, "page_size": 2})))
    assert page["total"] == 4 and len(page["rows"]) == 2
    assert other["setlinfo"]["setl_id"] in {r["setl_id"] for r in page["rows"]}
    diffs = ok(send(ledger, req.envelope("3202", {**period, "details": [
        {"msgid": first["msgid"], "setl_id": s1["setl_id"], "medfee_sumamt": "63.00", "acct_pay": "50.00"},
        {"msgid": "P372120000012026112500000000", "medfee_sumamt": "1.00"},
    ]})))["diffs"]
    assert sorted((d["kind"], d.get("fields")) for d in diffs) == [("differs", ["acct_pay"]),
                                                                    ("missing_at_center", None)]


def test_reconciliation_allowed_for_a_suspended_institution(ledger: Ledger, clock: Clock) -> None:
    r = Requests(clock, SUSPENDED)
    ok(send(ledger, r.envelope("3201", {"stmt_begndate": "2026-11-25", "stmt_enddate": "2026-11-25"}),
            SUSPENDED[0]))


# --- activation (9901) ---------------------------------------------------------------------------


def activation(req: Requests, password: str, new: str | None = None,
               person: tuple[str, str] = QIAN_NOT_ACTIVATED) -> dict[str, Any]:
    inp: dict[str, Any] = {"certno": person[1], "password": password}
    if new is not None:
        inp["new_password"] = new
    return req.envelope("9901", inp, opter_type="2")


def test_activation(ledger: Ledger, req: Requests) -> None:
    refused(send(ledger, req.sale("2102", SALE, QIAN_NOT_ACTIVATED)), "CARD_NOT_ACTIVATED")
    card_no = QIAN_NOT_ACTIVATED[0]
    refused(send(ledger, activation(req, card_no)), "PASSWORD_CHANGE_REQUIRED")
    refused(send(ledger, activation(req, card_no, "short1")), "PASSWORD_WEAK")
    refused(send(ledger, activation(req, card_no, "onlyletters")), "PASSWORD_WEAK")
    refused(send(ledger, activation(req, card_no, card_no)), "PASSWORD_WEAK")
    refused(send(ledger, activation(req, card_no, "ab094562cd")), "PASSWORD_WEAK")  # the ID's last six
    out = ok(send(ledger, activation(req, card_no, "Qian7pass")))
    assert out["activated"] is True and out["password_changed"] is True and out["already_activated"] is False
    ok(send(ledger, req.sale("2102", SALE, QIAN_NOT_ACTIVATED)))
    refused(send(ledger, activation(req, card_no)), "PASSWORD_WRONG")  # the initial one is gone
    again = ok(send(ledger, activation(req, "Qian7pass")))
    assert again["already_activated"] is True


def test_activation_locks_after_failures(ledger: Ledger, req: Requests) -> None:
    first = activation(req, "wrong-1")
    assert refused(send(ledger, first), "PASSWORD_WRONG") == {"tries_left": 4}
    assert send_raw(ledger, first).replayed  # a duplicate does not count again
    for left in (3, 2, 1):
        assert refused(send(ledger, activation(req, "wrong-x")), "PASSWORD_WRONG") == {"tries_left": left}
    refused(send(ledger, activation(req, "wrong-x")), "ACCOUNT_LOCKED")
    refused(send(ledger, activation(req, QIAN_NOT_ACTIVATED[0], "Qian7pass")), "ACCOUNT_LOCKED")
    refused(send(ledger, activation(req, "x", person=WANG_LOST)), "CARD_LOST")
    refused(send(ledger, activation(req, "x", person=("", "370202199001011245"))), "PERSON_NOT_FOUND")


def test_right_password_resets_the_failure_count(ledger: Ledger, req: Requests) -> None:
    for _ in range(4):
        refused(send(ledger, activation(req, "wrong", person=ZHANG)), "PASSWORD_WRONG")
    ok(send(ledger, activation(req, "Zhang2024pw", person=ZHANG)))
    out = refused(send(ledger, activation(req, "wrong", person=ZHANG)), "PASSWORD_WRONG")
    assert out == {"tries_left": 4}


# --- malformed requests -------------------------------------------------------------------------


def test_malformed(ledger: Ledger, req: Requests) -> None:
    for payload, code in ((b"{not json", "BAD_JSON"), (b"[1]", "BAD_JSON"), (b"\xff\xfe", "BAD_JSON"),
                          (b"{}", "BAD_ENVELOPE"), (b"x" * 300_000, "TOO_LARGE")):
        res = send_raw(ledger, payload)
        assert (res.infcode, res.err_code, res.stored) == (-1, code, False)
    refused(send(ledger, req.envelope("1234", {})), "UNKNOWN_INFNO")
    refused(send(ledger, req.envelope("1101", {}) | {"input": []}), "BAD_ENVELOPE")
    refused(send(ledger, req.envelope("1101", {}) | {"opter_type": 1}), "BAD_ENVELOPE")
    refused(send(ledger, req.envelope("1101", {}) | {"inf_time": "2026-11-25T10:30:00"}), "BAD_ENVELOPE")
    refused(send(ledger, req.envelope("1101", {})), "BAD_INPUT")
    bad_line = req.sale("2102", SALE)
    bad_line["input"]["drugdetail"][0]["cnt"] = 1.5
    refused(send(ledger, bad_line), "BAD_INPUT")
    bad_line = req.sale("2102", SALE)
    bad_line["input"]["drugdetail"][0]["det_item_fee_sumamt"] = "1.00"
    refused(send(ledger, bad_line), "BAD_INPUT")
    assert ledger.settlements() == []


def test_answer_envelope(ledger: Ledger, req: Requests) -> None:
    doc = req.identity()
    ans = send(ledger, doc)
    assert set(ans) == {"infcode", "inf_refmsgid", "msgid", "infno", "respond_time", "err_code", "err_msg",
                        "final", "output"}
    assert ans["msgid"] == doc["msgid"] and ans["infno"] == "1101"
    assert ans["inf_refmsgid"].startswith("SIMBKD20261125103000")


# --- seeds and ledger files ---------------------------------------------------------------------


def test_seed_errors() -> None:
    base = EXAMPLE_SEED.read_text(encoding="utf-8")
    cases = [
        (base.replace('ssn = "370202199001011237"', 'ssn = "370202199001011238"'),
         "ssn: SSN check character"),
        (base.replace('card_no = "Q54198963"', 'card_no = "Q54198964"'), "card_no"),
        (base.replace('balance = "500.00"', 'balance = 500'), "balance"),
        (base.replace('terminals = ["370203000001"]', 'terminals = ["370212000001"]'), "appears twice"),
        (base.replace('status = "lost"', 'status = "stolen"'), "status: must be one of"),
        (base.replace('type = "clinic"', 'type = "spa"'), "type"),
        (base.replace('first_selfpay_ratio = "0.10"', 'first_selfpay_ratio = "1.10"'), "first_selfpay_ratio"),
        (base + '\n[[item]]\ncode = "Z1"\nname = "z"\nclass = "a"\nmedical = true\ncolour = "red"\n',
         "colour"),
        (base.replace('format = "sscard-backend-seed/1"', 'format = "x"'), "format"),
        ("not toml [", "not valid TOML"),
    ]
    for text, needle in cases:
        with pytest.raises(seed.SeedError, match=needle) as exc:
            seed.parse(text.encode(), "seed.toml")
        assert "370202199001011237" not in str(exc.value)


def test_ledger_file_and_seed(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "l.sqlite"
    lg = Ledger(path, seed.load(EXAMPLE_SEED), roots(), clock=clock)
    ok(send(lg, Requests(clock).sale("2102", SALE)))
    lg.close()
    lg = Ledger(path, seed.load(EXAMPLE_SEED), roots(), clock=clock)  # same seed: the ledger is kept
    assert lg.balance(ZHANG[0]) == 44_800
    lg.close()
    other = seed.parse(EXAMPLE_SEED.read_bytes().replace(b'"500.00"', b'"600.00"'))
    with pytest.raises(LedgerError, match="another seed"):
        Ledger(path, other, roots(), clock=clock)
    lg = Ledger(path, other, roots(), clock=clock, reset=True)
    assert lg.balance(ZHANG[0]) == 60_000 and lg.settlements() == []
    lg.close()
    with pytest.raises(LedgerError, match="no such ledger"):
        Ledger(tmp_path / "missing.sqlite")
    assert Ledger(path).balance(ZHANG[0]) == 60_000


# --- response topics and logs -------------------------------------------------------------------


def test_response_topic_rule() -> None:
    assert terminal_of("sscard/v1/settle/req/370212000001") == "370212000001"
    assert terminal_of("sscard/v1/settle/req/a/b") is None
    assert terminal_of("other/370212000001") is None
    assert check_response_topic("370212000001", "sscard/v1/term/370212000001/settle/resp")
    for bad in (None, "sscard/v1/term/370212000002/settle/resp", "sscard/v1/term/370212000001/settle/resp/x",
                "sscard/v1/term/370212000001/reply/1", "sscard/v1/term/+/settle/resp"):
        assert not check_response_topic("370212000001", bad)


def test_log_redaction() -> None:
    logs.configure("INFO", json=True)
    with structlog.testing.capture_logs(processors=[logs.redact]) as captured:
        structlog.get_logger("t").info(f"seen {ZHANG[1]} here", certno=ZHANG[1], psn_name="张三",
                                       password="Zhang2024pw", detail={"new_password": "x", "ssn": ZHANG[1]})
    [ev] = captured
    text = json.dumps(ev, ensure_ascii=False)
    assert ZHANG[1] not in text and "Zhang2024pw" not in text and "张三" not in text
    assert ev["certno"] == "3702**********1237" and ev["psn_name"] == "张*" and ev["password"] == "***"
    assert ev["event"] == "seen 3702**********1237 here"
