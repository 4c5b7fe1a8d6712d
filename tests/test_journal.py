"""sscardd.journal: the state machine, durability across SIGKILL, holds per card, ID_REUSED, masked
replies, reconciliation aggregates and two connections writing at once."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sscardd.journal import (
    REQUEST_ID_WINDOW,
    SCHEMA_VERSION,
    Amounts,
    CardOnHold,
    DuplicateMsgid,
    Entry,
    IdReused,
    IllegalTransition,
    Journal,
    JournalError,
    State,
    args_hash,
    mask_personal,
)

TERM, TERM_B = "370212000001", "370212000002"
CARD, CARD_B = "A12345678", "B23456789"
SSN = "370202199001011237"  # a valid synthetic ID number (check character right)
NAME = "张三丰"
T0 = 1_750_000_000.0  # 2025-06-15 23:06:40 Beijing
SALE_ARGS: dict[str, Any] = {"operator": {"id": "op1", "name": "李四"},
                             "items": [{"code": "X01", "qty": 1, "price": "12.50"}],
                             "pin": {"source": "block", "block": "00" * 16}, "preview": False}
AMOUNTS = Amounts(medfee_sumamt=1250, fund_pay_sumamt=0, acct_pay=1000, psn_cash_pay=250)

_seq = iter(range(1, 10**9))


def msgid() -> str:
    return f"P37021200001{20250615230640}{next(_seq) % 10000:04d}x{next(_seq)}"


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "state" / "journal.sqlite3", backoff_min=2.0, backoff_max=10.0, jitter=0.0)
    yield j
    j.close()


def card_for(rid: str) -> str:
    """Each request its own card unless a test names one: a card is held while a sale of it is
    in flight, so two sales in flight at once need two cards."""
    return CARD if rid == "r1" else f"Z{rid:0>8}"[:9]


def sale(j: Journal, rid: str = "r1", card: str | None = None, *, now: float = T0, terminal: str = TERM,
         args: dict[str, Any] | None = None) -> Entry:
    card = card_for(rid) if card is None else card
    return j.begin(rid, "sale", args or SALE_ARGS, terminal_id=terminal, card_no=card, now=now).entry


def sent_sale(j: Journal, rid: str = "r1", card: str | None = None, *, now: float = T0) -> Entry:
    e = sale(j, rid, card, now=now)
    j.mark_pre_settled(e.id, msgid_2101=msgid(), amounts=AMOUNTS, now=now)
    return j.mark_sent(e.id, msgid=msgid(), infno="2102", now=now)


def settled_sale(j: Journal, rid: str, setl_id: str, *, now: float = T0, amounts: Amounts = AMOUNTS,
                 setl_time: str | None = "2025-06-15 23:06:41", card: str = CARD) -> Entry:
    e = sent_sale(j, rid, card, now=now)
    return j.mark_settled(e.id, setl_id=setl_id, amounts=amounts, setl_time=setl_time, now=now,
                          chip_data={"time": "20250615230641", "account_fen": amounts.acct_pay})


# -- the file ---------------------------------------------------------------------------------------


def test_opens_in_wal_with_full_sync_and_private_mode(journal: Journal) -> None:
    db = sqlite3.connect(journal.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert journal._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert journal.schema_version == SCHEMA_VERSION
    assert stat.S_IMODE(os.stat(journal.path).st_mode) == 0o600


def test_extra_sync(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.sqlite3", sync="extra") as j:
        assert j._db.execute("PRAGMA synchronous").fetchone()[0] == 3


def test_reopen_keeps_rows_and_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    with Journal(path) as j:
        e = sale(j)
    with Journal(path) as j:
        assert j.get(e.id).state is State.RECEIVED
        assert j.schema_version == SCHEMA_VERSION
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(JournalError, match="newer"):
        Journal(path)


# -- transitions ----------------------------------------------------------------------------------------


def test_sale_settles_and_records_the_chip_later(journal: Journal) -> None:
    e = sale(journal)
    assert e.state is State.RECEIVED and e.card_no == CARD and e.attempts == 0
    m2101, m2102 = msgid(), msgid()
    e = journal.mark_pre_settled(e.id, msgid_2101=m2101, amounts=AMOUNTS, psn_no="PSN0001")
    assert (e.state, e.msgid_2101, e.amounts, e.psn_no) == (State.PRE_SETTLED, m2101, AMOUNTS, "PSN0001")
    e = journal.mark_sent(e.id, msgid=m2102, infno="2102")
    assert (e.state, e.msgid, e.infno) == (State.SENT, m2102, "2102")
    e = journal.mark_settled(e.id, setl_id="S1", mdtrt_id="M1", amounts=AMOUNTS, insutype="310",
                             setl_time="2025-06-15 10:00:00", chip_data={"account_fen": 1000},
                             reply={"id": "r1", "ok": True, "result": {"setl_id": "S1"}})
    assert (e.state, e.setl_id, e.setl_date, e.chip_record) == (State.SETTLED, "S1", "2025-06-15", "pending")
    assert e.final and e.reply == {"id": "r1", "ok": True, "result": {"setl_id": "S1"}}
    assert [x.id for x in journal.pending_chip_records(CARD)] == [e.id]
    assert journal.pending_chip_records(CARD_B) == []
    journal.mark_chip_written(e.id)
    assert journal.pending_chip_records(CARD) == []
    with pytest.raises(IllegalTransition):
        journal.mark_chip_written(e.id)
    assert journal.find_by_msgid(m2101) == journal.find_by_msgid(m2102) == journal.get(e.id)
    assert journal.find_settled_sale("S1") == journal.get(e.id)


def test_settlement_day_defaults_to_beijing_today(journal: Journal) -> None:
    e = sent_sale(journal)
    # T0 is 15:06 UTC, 23:06 in Beijing; T0 + 1 h is the next day in Beijing.
    e = journal.mark_settled(e.id, setl_id="S1", amounts=AMOUNTS, now=T0 + 3600)
    assert e.setl_date == "2025-06-16" and e.chip_record is None


def test_preview_stops_after_pre_settlement(journal: Journal) -> None:
    e = journal.begin("p1", "sale", {**SALE_ARGS, "preview": True}, terminal_id=TERM, card_no=CARD,
                      preview=True).entry
    journal.mark_pre_settled(e.id, msgid_2101=msgid(), amounts=AMOUNTS)
    e = journal.mark_previewed(e.id, reply={"id": "p1", "ok": True})
    assert e.state is State.PREVIEWED and e.preview and e.final
    assert journal.unfinished() == []


def _illegal_cases() -> list[tuple[str, Callable[[Journal, Entry], Any], State]]:
    return [
        ("settle before sending", lambda j, e: j.mark_settled(e.id, setl_id="S", amounts=AMOUNTS),
         State.RECEIVED),
        ("sale sent without 2101", lambda j, e: j.mark_sent(e.id, msgid=msgid(), infno="2102"),
         State.RECEIVED),
        ("unknown before sent", lambda j, e: j.mark_unknown(e.id, reversal_msgid=msgid()), State.RECEIVED),
        ("reversing before unknown", lambda j, e: j.mark_reversing(e.id), State.RECEIVED),
        ("previewed before 2101", lambda j, e: j.mark_previewed(e.id), State.RECEIVED),
    ]


@pytest.mark.parametrize(("what", "step", "state"), _illegal_cases(), ids=[c[0] for c in _illegal_cases()])
def test_illegal_transitions_raise_and_write_nothing(
        journal: Journal, what: str, step: Callable[[Journal, Entry], Any], state: State) -> None:
    e = sale(journal)
    before = journal.get(e.id)
    with pytest.raises(IllegalTransition):
        step(journal, e)
    assert journal.get(e.id) == before and before.state is state


def test_final_states_are_final(journal: Journal) -> None:
    s = settled_sale(journal, "a", "S1")
    with pytest.raises(IllegalTransition):
        journal.mark_unknown(s.id, reversal_msgid=msgid())
    with pytest.raises(IllegalTransition):
        journal.mark_refused(s.id, code="X")
    r = sale(journal, "b")
    r = journal.mark_refused(r.id, code="PIN_WRONG", message="wrong PIN")
    assert r.final and r.error_code == "PIN_WRONG"
    with pytest.raises(IllegalTransition):
        journal.mark_pre_settled(r.id, msgid_2101=msgid())


def test_a_msgid_is_used_once(journal: Journal) -> None:
    a, b = sent_sale(journal, "a"), sale(journal, "b")
    journal.mark_pre_settled(b.id, msgid_2101=msgid())
    assert a.msgid is not None
    with pytest.raises(DuplicateMsgid):
        journal.mark_sent(b.id, msgid=a.msgid, infno="2102")
    assert journal.get(b.id).state is State.PRE_SETTLED and journal.get(b.id).msgid is None
    with pytest.raises(ValueError, match="2102"):
        journal.mark_sent(b.id, msgid=msgid(), infno="2103")
    assert journal.get(b.id).state is State.PRE_SETTLED


def test_void_flow_inherits_the_card_and_is_reversible(journal: Journal) -> None:
    s = settled_sale(journal, "s", "S1")
    v = journal.begin("v", "sale.void", {"setl_id": "S1"}, terminal_id=TERM, orig_setl_id="S1").entry
    assert v.card_no == CARD and v.refund and v.orig_setl_id == "S1"
    with pytest.raises(IllegalTransition):
        journal.mark_pre_settled(v.id, msgid_2101=msgid())
    with pytest.raises(ValueError):
        journal.mark_sent(v.id, msgid=msgid(), infno="2102")
    v = journal.mark_sent(v.id, msgid=msgid(), infno="2103")
    assert journal.card_on_hold(CARD)
    v = journal.mark_unknown(v.id, reversal_msgid=msgid(), reason="no answer")
    v = journal.mark_reversing(v.id)
    v = journal.mark_reversed(v.id)
    assert not journal.card_on_hold(CARD) and journal.get(s.id).state is State.SETTLED
    with pytest.raises(ValueError, match="orig_setl_id"):
        journal.begin("v2", "sale.void", {"setl_id": "S1"}, terminal_id=TERM)


# -- reversal, holds, late answers ----------------------------------------------------------------------


def test_unknown_outcome_reverses_with_backoff_and_holds_only_that_card(journal: Journal) -> None:
    e = sent_sale(journal, "a", CARD)
    other = settled_sale(journal, "b", "S2", card=CARD_B)
    assert journal.card_on_hold(CARD) and not journal.card_on_hold(CARD_B)  # sent: outcome not known yet
    rev = msgid()
    e = journal.mark_unknown(e.id, reversal_msgid=rev, reason="no answer in 15 s", now=T0)
    assert (e.state, e.msgid_2601, e.next_retry_at) == (State.UNKNOWN, rev, T0)
    assert [x.id for x in journal.pending_reversals(now=T0)] == [e.id]
    assert journal.card_on_hold(CARD) and not journal.card_on_hold(CARD_B)
    # backoff 2, 4, 8, then capped at 10 (jitter off in this fixture)
    t = T0
    for delay in (2.0, 4.0, 8.0, 10.0, 10.0):
        e = journal.mark_reversing(e.id, now=t)
        assert e.next_retry_at == t + delay
        assert journal.pending_reversals(now=t + delay - 0.001) == []
        assert [x.id for x in journal.pending_reversals(now=t + delay)] == [e.id]
        assert journal.next_reversal_due() == t + delay
        t += delay
    assert e.attempts == 5 and e.state is State.REVERSING and journal.card_on_hold(CARD)
    e = journal.mark_reversed(e.id, note="acknowledged", now=t)
    assert e.state is State.REVERSED and e.next_retry_at is None and e.notes[-1]["kind"] == "reversed"
    assert not journal.card_on_hold(CARD) and journal.pending_reversals(now=t + 10**6) == []
    assert journal.find_by_msgid(rev) == e and journal.get(other.id).state is State.SETTLED


def test_backoff_jitter_stays_in_range(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.sqlite3", backoff_min=4.0, backoff_max=4.0, jitter=0.25) as j:
        e = sent_sale(j)
        j.mark_unknown(e.id, reversal_msgid=msgid(), now=T0)
        for _ in range(20):
            got = j.mark_reversing(e.id, now=T0).next_retry_at
            assert got is not None and T0 + 3.0 <= got <= T0 + 4.0


def test_late_answer_is_noted_not_acted_on(journal: Journal) -> None:
    e = sent_sale(journal)
    assert e.msgid is not None
    journal.mark_unknown(e.id, reversal_msgid=msgid())
    e = journal.mark_reversing(e.id)
    assert e.msgid is not None
    noted = journal.note_late_answer(e.msgid, infcode=0,
                                     summary={"setl_id": "S9", "psn_name": NAME, "certno": SSN})
    assert noted is not None and noted.state is State.REVERSING
    note = noted.notes[-1]
    assert note["kind"] == "late_answer" and note["infno"] == "2102" and note["state"] == "reversing"
    assert note["summary"] == {"setl_id": "S9", "psn_name": "张**", "certno": "3702**********1237"}
    assert journal.note_late_answer("not-ours") is None


def test_unfinished_lists_what_a_restart_resumes(journal: Journal) -> None:
    received = sale(journal, "a")
    pre = sale(journal, "b")
    journal.mark_pre_settled(pre.id, msgid_2101=msgid())
    sent = sent_sale(journal, "c")
    unknown = sent_sale(journal, "d")
    journal.mark_unknown(unknown.id, reversal_msgid=msgid())
    settled_sale(journal, "e", "S1")
    refused = sale(journal, "f")
    journal.mark_refused(refused.id, code="CARD_NOT_ACTIVATED")
    assert [e.id for e in journal.unfinished()] == [received.id, pre.id, sent.id, unknown.id]
    assert journal.counts() == {"received": 1, "pre_settled": 1, "sent": 1, "unknown": 1, "settled": 1,
                                "refused": 1}


# -- request ids ----------------------------------------------------------------------------------------


def test_request_id_reuse(journal: Journal) -> None:
    first = journal.begin("r1", "sale", SALE_ARGS, terminal_id=TERM, card_no=CARD, now=T0)
    assert first.created
    # A redelivery, or a retry with a freshly enciphered PIN block: the same request.
    again = journal.begin("r1", "sale", {**SALE_ARGS, "pin": {"source": "block", "block": "11" * 16}},
                          terminal_id=TERM, card_no=CARD, now=T0 + 5)
    assert not again.created and again.entry.id == first.entry.id
    other_items = {**SALE_ARGS, "items": [{"code": "X01", "qty": 2, "price": "12.50"}]}
    with pytest.raises(IdReused) as err:
        journal.begin("r1", "sale", other_items, terminal_id=TERM, card_no=CARD, now=T0 + 10)
    assert err.value.code == "ID_REUSED" and err.value.row_id == first.entry.id
    with pytest.raises(IdReused):
        journal.begin("r1", "sale.void", {"setl_id": "S1"}, terminal_id=TERM, orig_setl_id="S1", now=T0 + 10)
    # another terminal's id space; and after 24 hours the id is free again
    assert journal.begin("r1", "sale", other_items, terminal_id=TERM_B, now=T0 + 10).created
    later = journal.begin("r1", "sale", other_items, terminal_id=TERM, now=T0 + REQUEST_ID_WINDOW + 1)
    assert later.created and later.entry.id != first.entry.id
    assert journal.get_by_request_id(TERM, "r1", now=T0 + REQUEST_ID_WINDOW + 2) == later.entry
    assert journal.get_by_request_id(TERM, "r1", now=T0 + 2 * REQUEST_ID_WINDOW + 2) is None
    assert journal.get_by_request_id(TERM, "nope") is None
    assert journal.get(first.entry.id).args_hash == args_hash("sale", SALE_ARGS)


def test_args_hash_leaves_the_pin_out() -> None:
    clear = {**SALE_ARGS, "pin": {"source": "clear", "pin": "123456"}}
    other_pin = {**SALE_ARGS, "pin": {"source": "clear", "pin": "9"}}
    assert args_hash("sale", clear) == args_hash("sale", other_pin)
    assert args_hash("sale", clear) != args_hash("sale", SALE_ARGS)  # the PIN's source does count
    assert args_hash("sale", SALE_ARGS) != args_hash("sale.void", SALE_ARGS)
    # key order does not matter
    assert args_hash("sale", dict(reversed(list(SALE_ARGS.items())))) == args_hash("sale", SALE_ARGS)


# -- what a row may hold --------------------------------------------------------------------------------


def test_stored_replies_hold_no_id_number_name_or_pin(journal: Journal) -> None:
    reply = {"id": "r1", "ok": True, "result": {
        "setl_id": "S1", "psn_name": NAME, "name": NAME, "certno": SSN, "fixmedins_name": "崂山康泰大药房",
        "memo": f"holder {SSN} paid", "idn": int(SSN[:17]) * 10 + 7,
        "operator": {"id": "op1", "name": "李四"}, "pin": "864209",
        "lines": [{"code": "X01", "fund_pay_type_name": "职工统筹基金", "holder_name": NAME}]}}
    e = settled_sale(journal, "r1", "S1")
    stored = journal.store_reply(e.id, reply)
    r = stored["result"]
    assert r["psn_name"] == r["name"] == r["lines"][0]["holder_name"] == "张**"
    assert r["certno"] == "3702**********1237" and r["memo"] == "holder 3702**********1237 paid"
    assert r["idn"] == "3702**********1237" and r["operator"]["name"] == "李*" and r["pin"] == "***"
    assert r["fixmedins_name"] == "崂山康泰大药房" and r["lines"][0]["fund_pay_type_name"] == "职工统筹基金"
    assert journal.get(e.id).reply == stored
    # and through the outcome methods too
    r2 = sent_sale(journal, "r2")
    journal.mark_refused(r2.id, code="X", message=f"refused for {SSN}", reply=reply)
    got = journal.get(r2.id)
    assert got.reply is not None and got.reply["result"]["certno"] == "3702**********1237"
    assert got.error_message == "refused for 3702**********1237"
    journal.checkpoint()
    raw = b"".join(p.read_bytes() for p in journal.path.parent.iterdir() if p.is_file())
    for secret in (SSN, NAME, "864209", "李四"):
        assert secret.encode() not in raw


def test_no_id_number_as_card_or_person_number(journal: Journal) -> None:
    with pytest.raises(ValueError, match="ID number"):
        journal.begin("r", "sale", SALE_ARGS, terminal_id=TERM, psn_no=SSN)
    e = sale(journal)
    with pytest.raises(ValueError, match="ID number"):
        journal.mark_pre_settled(e.id, msgid_2101=msgid(), psn_no=SSN)


def test_mask_personal_is_idempotent() -> None:
    once = mask_personal({"name": NAME, "x": [SSN]})
    assert mask_personal(once) == once == {"name": "张**", "x": ["3702**********1237"]}
    assert mask_personal({"certno": 12345678901234567, "n": 5}) == {"certno": "1234*********4567", "n": 5}


# -- reconciliation -------------------------------------------------------------------------------------


def test_totals_and_details_for_a_period(journal: Journal) -> None:
    a = Amounts(1000, 200, 700, 100)
    b = Amounts(5000, 1000, 3000, 1000)
    c = Amounts(300, 0, 300, 0)
    s1 = settled_sale(journal, "1", "S1", amounts=a, setl_time="2025-06-14 09:00:00")
    s2 = settled_sale(journal, "2", "S2", amounts=b, setl_time="2025-06-15 09:00:00")
    settled_sale(journal, "3", "S3", amounts=c, setl_time="2025-06-16 09:00:00")  # outside the period
    # a void of S2 (settled), a void of S1 that was reversed: S1 stands, S2 is refunded
    v = journal.begin("v2", "sale.void", {"setl_id": "S2"}, terminal_id=TERM, orig_setl_id="S2").entry
    journal.mark_sent(v.id, msgid=msgid(), infno="2103")
    v = journal.mark_settled(v.id, setl_id="S2", amounts=b, setl_time="2025-06-16 10:00:00")
    w = journal.begin("v1", "sale.void", {"setl_id": "S1"}, terminal_id=TERM, orig_setl_id="S1").entry
    journal.mark_sent(w.id, msgid=msgid(), infno="2103")
    journal.mark_unknown(w.id, reversal_msgid=msgid())
    journal.mark_reversing(w.id)
    journal.mark_reversed(w.id)
    # neither a reversed nor a refused nor an unknown sale counts
    for rid in ("x", "y", "z"):
        e = sent_sale(journal, rid)
        if rid == "x":
            journal.mark_refused(e.id, code="NON_MEDICAL_ITEM")
        else:
            journal.mark_unknown(e.id, reversal_msgid=msgid())
    tot = journal.totals("2025-06-14", "2025-06-15")
    assert tot["0"].count == 1 and (tot["0"].medfee_sumamt, tot["0"].fund_pay_sumamt, tot["0"].acct_pay,
                                    tot["0"].psn_cash_pay) == (1000, 200, 700, 100)
    assert tot["1"].count == 1 and (tot["1"].medfee_sumamt, tot["1"].acct_pay) == (5000, 3000)
    details = journal.details("2025-06-14", "2025-06-15")
    assert [(d.msgid, d.setl_id, d.refd_setl_flag, d.void_msgid) for d in details] == [
        (s1.msgid, "S1", "0", None), (s2.msgid, "S2", "1", v.msgid)]
    assert journal.totals("2025-06-14", "2025-06-16")["0"].count == 2
    assert journal.totals("2025-06-14", "2025-06-16", terminal_id=TERM_B)["0"].count == 0
    with pytest.raises(ValueError):
        journal.totals("2025-6-1", "2025-06-16")


# -- durability ----------------------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import sys, time
    from sscardd.journal import Amounts, Journal
    j = Journal(sys.argv[1])
    e = j.begin("r-kill", "sale", {"items": []}, terminal_id="370212000001", card_no="A12345678").entry
    j.mark_pre_settled(e.id, msgid_2101="m2101", amounts=Amounts(100, 0, 100, 0))
    j.mark_sent(e.id, msgid="m2102", infno="2102")
    print("ROW", e.id, flush=True)
    time.sleep(60)
""")


def test_a_row_marked_sent_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        while line and not line.startswith("ROW "):  # structlog's default output goes to stdout too
            line = child.stdout.readline()
        row_id = int(line.split()[1])
        child.send_signal(signal.SIGKILL)  # right after mark_sent returned: no close, no checkpoint
    finally:
        child.kill()
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    with Journal(path) as j:
        e = j.get(row_id)
        assert (e.state, e.msgid, e.infno) == (State.SENT, "m2102", "2102")
        assert [x.id for x in j.unfinished()] == [row_id]
        assert j.card_on_hold("A12345678")


# -- concurrency -------------------------------------------------------------------------------------


def test_two_connections_write_at_once_without_lock_errors(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    journals = [Journal(path, busy_timeout=10.0), Journal(path, busy_timeout=10.0)]
    errors: list[BaseException] = []
    n = 100

    def writer(k: int) -> None:
        j = journals[k]
        try:
            for i in range(n):
                e = j.begin(f"w{k}-{i}", "sale", {"i": i}, terminal_id=TERM, card_no=f"C{k}").entry
                j.mark_pre_settled(e.id, msgid_2101=f"p{k}-{i}", amounts=AMOUNTS)
                j.mark_sent(e.id, msgid=f"s{k}-{i}", infno="2102")
                j.mark_settled(e.id, setl_id=f"S{k}-{i}", amounts=AMOUNTS, setl_time="2025-06-15 10:00:00")
                j.card_on_hold(f"C{1 - k}")
                j.totals("2025-06-15", "2025-06-15")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert not errors, errors
        assert journals[0].totals("2025-06-15", "2025-06-15")["0"].count == 2 * n
        assert journals[1].counts() == {"settled": 2 * n}
    finally:
        for j in journals:
            j.close()


_WRITER = textwrap.dedent("""
    import sys
    from sscardd.journal import Amounts, Journal
    j = Journal(sys.argv[1], busy_timeout=30.0)
    a = Amounts(100, 0, 100, 0)
    print("READY", flush=True)
    for i in range(int(sys.argv[2])):
        e = j.begin(f"p-{i}", "sale", {"i": i}, terminal_id="370212000001", card_no="P").entry
        j.mark_pre_settled(e.id, msgid_2101=f"pp-{i}", amounts=a)
        j.mark_sent(e.id, msgid=f"ps-{i}", infno="2102")
        j.mark_settled(e.id, setl_id=f"PS-{i}", amounts=a, setl_time="2025-06-15 10:00:00")
        j.card_on_hold("T")
    print("DONE", flush=True)
""")


def test_another_process_writes_at_the_same_time(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    n = 100
    with Journal(path, busy_timeout=30.0) as j:
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(n)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
        try:
            assert child.stdout is not None
            line = "-"
            while line and not line.startswith("READY"):  # both loops run at the same time
                line = child.stdout.readline()
            for i in range(n):
                e = j.begin(f"t-{i}", "sale", {"i": i}, terminal_id=TERM, card_no="T").entry
                j.mark_pre_settled(e.id, msgid_2101=f"tp-{i}", amounts=AMOUNTS)
                j.mark_sent(e.id, msgid=f"ts-{i}", infno="2102")
                j.mark_settled(e.id, setl_id=f"TS-{i}", amounts=AMOUNTS, setl_time="2025-06-15 10:00:00")
                j.card_on_hold("P")
            out, err = child.communicate(timeout=120)
        finally:
            child.kill()
        assert child.returncode == 0 and "DONE" in out, err[-2000:]
        assert "locked" not in err
        assert j.counts() == {"settled": 2 * n}


# -- the state machine, by property ---------------------------------------------------------------------

_STEPS = ("pre", "preview", "sent", "settled", "refused", "unknown", "reversing", "reversed")
_LEGAL = {
    (State.RECEIVED, "pre"), (State.RECEIVED, "refused"),
    (State.PRE_SETTLED, "sent"), (State.PRE_SETTLED, "preview"), (State.PRE_SETTLED, "refused"),
    (State.SENT, "settled"), (State.SENT, "refused"), (State.SENT, "unknown"),
    (State.UNKNOWN, "reversing"), (State.REVERSING, "reversing"), (State.REVERSING, "reversed"),
}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(_STEPS), max_size=8))
def test_any_sequence_follows_the_state_machine(tmp_path_factory: pytest.TempPathFactory,
                                                steps: list[str]) -> None:
    with Journal(tmp_path_factory.mktemp("j") / "j.sqlite3") as j:
        e = sale(j)
        for step in steps:
            before = j.get(e.id)
            call: dict[str, Callable[[], Entry]] = {
                "pre": lambda: j.mark_pre_settled(e.id, msgid_2101=msgid()),
                "preview": lambda: j.mark_previewed(e.id),
                "sent": lambda: j.mark_sent(e.id, msgid=msgid(), infno="2102"),
                "settled": lambda: j.mark_settled(e.id, setl_id="S", amounts=AMOUNTS),
                "refused": lambda: j.mark_refused(e.id, code="X"),
                "unknown": lambda: j.mark_unknown(e.id, reversal_msgid=msgid()),
                "reversing": lambda: j.mark_reversing(e.id),
                "reversed": lambda: j.mark_reversed(e.id),
            }
            if (before.state, step) in _LEGAL:
                assert call[step]().state is not before.state or step == "reversing"
            else:
                with pytest.raises(IllegalTransition):
                    call[step]()
                assert j.get(e.id) == before
            assert j.card_on_hold(CARD) == (j.get(e.id).state in {State.SENT, State.UNKNOWN, State.REVERSING})


def test_the_hold_is_checked_where_a_sale_is_marked_sent(journal: Journal) -> None:
    first = sent_sale(journal, "h1", CARD_B)
    second = sale(journal, "h2", CARD_B)
    journal.mark_pre_settled(second.id, msgid_2101=msgid())
    with pytest.raises(CardOnHold):
        journal.mark_sent(second.id, msgid=msgid(), infno="2102")
    assert journal.get(second.id).state is State.PRE_SETTLED  # nothing written
    other = sent_sale(journal, "h3", CARD)  # another card is not affected
    assert other.state is State.SENT and first.state is State.SENT


def test_a_refused_reversal_keeps_the_card_held_and_is_not_retried(journal: Journal) -> None:
    e = sent_sale(journal, "rr", CARD_B)
    journal.mark_unknown(e.id, reversal_msgid=msgid())
    journal.mark_reversing(e.id)
    r = journal.mark_reversal_refused(e.id, code="REVERSAL_CONFLICT", note="voided meanwhile")
    assert r.state is State.REVERSAL_REFUSED and r.final
    assert journal.card_on_hold(CARD_B)
    assert e.id not in [x.id for x in journal.unfinished()]
    assert e.id not in [x.id for x in journal.pending_reversals(now=T0 + 10**6)]
