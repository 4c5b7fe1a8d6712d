"""``sscardd.reconcile`` without a broker: the 3201/3202 inputs built from journal rows, and whole
reconciliations against the backend simulator's ledger in process (its ``handle`` stands in for
the MQTT round trip), paging, period splitting, refusals, garbage, timeouts and the CLI's usage
and configuration errors.

The helpers that book settlements and mirror them into a journal are shared with
``tests/e2e/test_reconcile.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from backend_sim import seed
from backend_sim.ledger import Ledger
from sscardd import cli, reconcile
from sscardd.backend import now_beijing
from sscardd.config import Config, ConfigError, load
from sscardd.errors import SSCardError
from sscardd.journal import Amounts, Detail, Entry, Journal, Totals
from sscardd.mqtt import AnswerTimeout
from tests.backend_helpers import EXAMPLE_SEED, PHARMACY, PHARMACY_2, ZHANG, Clock, Requests, dumps, roots

A = PHARMACY[0]
SALE = [("A0001", 2, "12.50"), ("B0001", 1, "30.00"), ("C0001", 1, "8.00")]  # 63.00: acct 52.00, cash 11.00
SMALL = [("A0001", 1, "1.50")]  # 1.50, all from the account


# --- shared helpers ----------------------------------------------------------------------------------


def write_config(directory: Path, *, mqtt: dict[str, Any] | None = None, code: str = PHARMACY[1],
                 journal: Path | None = None) -> Path:
    """A config file for terminal A of the example seed's pharmacy; ``mqtt`` keys override the
    defaults (a broker nobody listens on: tests without MQTT pass their own link)."""
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 1, "answer_timeout": 5.0, "message_expiry": 4,
                              "reconnect_backoff_min": 0.05, "reconnect_backoff_max": 0.5}
    values.update(mqtt or {})
    tls = values.pop("tls", {"enabled": False})

    def toml(v: Any) -> str:
        return json.dumps(str(v)) if isinstance(v, str | Path) else str(v).lower() if isinstance(v, bool) \
            else str(v)

    lines = ["[terminal]", f'id = "{A}"', "[institution]", f'code = "{code}"', 'name = "崂山康泰大药房"',
             'type = "pharmacy"', 'region = "370212"', "[mqtt]",
             *(f"{k} = {toml(v)}" for k, v in values.items()), "[mqtt.tls]",
             *(f"{k} = {toml(v)}" for k, v in tls.items()),
             "[journal]", f"path = {toml(journal or directory / 'journal.sqlite3')}",
             "[kiosk]", "enabled = false", f"socket = {toml(directory / 'kiosk.sock')}"]
    path = directory / "sscardd.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def amounts_of(info: dict[str, Any]) -> Amounts:
    def f(key: str) -> int:
        whole, cents = info[key].split(".")
        return int(whole) * 100 + int(cents)

    return Amounts(f("medfee_sumamt"), f("fund_pay_sumamt"), f("acct_pay"), f("psn_cash_pay"))


def journal_sale(j: Journal, msgid: str, info: dict[str, Any], *, amounts: Amounts | None = None,
                 terminal_id: str = A) -> Entry:
    """A sale settled as the daemon records it: received → pre_settled → sent → settled."""
    row = j.begin(f"pos-{msgid}", "sale", {"msgid": msgid}, terminal_id=terminal_id).entry.id
    j.mark_pre_settled(row, msgid_2101=f"{msgid}P", amounts=amounts_of(info))
    j.mark_sent(row, msgid=msgid, infno="2102")
    return j.mark_settled(row, setl_id=info["setl_id"], mdtrt_id=info["mdtrt_id"],
                          setl_time=info["setl_time"], amounts=amounts or amounts_of(info))


def journal_void(j: Journal, msgid: str, info: dict[str, Any]) -> Entry:
    """A void settled (2103): received → sent → settled."""
    row = j.begin(f"pos-{msgid}", "sale.void", {"setl_id": info["setl_id"]}, terminal_id=A,
                  orig_setl_id=info["setl_id"]).entry.id
    j.mark_sent(row, msgid=msgid, infno="2103")
    return j.mark_settled(row, setl_id=info["setl_id"], amounts=amounts_of(info))


def journal_open(j: Journal, msgid: str, *, reversed_: bool = False) -> Entry:
    """A sale whose 2102 answer was lost: unknown → reversing (→ reversed once acknowledged)."""
    row = j.begin(f"pos-{msgid}", "sale", {"msgid": msgid}, terminal_id=A).entry.id
    j.mark_pre_settled(row, msgid_2101=f"{msgid}P")
    j.mark_sent(row, msgid=msgid, infno="2102")
    j.mark_unknown(row, reversal_msgid=f"{msgid}R")
    entry = j.mark_reversing(row)
    return j.mark_reversed(row) if reversed_ else entry


class LedgerLink:
    """The backend simulator's ledger in process, where the daemon would have a DaemonLink."""

    def __init__(self, ledger: Ledger, terminal_id: str = A) -> None:
        self.ledger = ledger
        self.terminal_id = terminal_id
        self.sent: list[dict[str, Any]] = []
        self.refs: list[str | None] = []

    async def request(self, payload: bytes, timeout: float | None = None, *, ref: str | None = None) -> bytes:
        self.sent.append(json.loads(payload))
        self.refs.append(ref)
        return self.ledger.handle(self.terminal_id, payload).answer

    def infnos(self) -> list[str]:
        return [d["infno"] for d in self.sent]


class Center:
    """Settlements booked at the in-process ledger through real 2102/2103/2601 requests."""

    def __init__(self, ledger: Ledger, clock: Clock) -> None:
        self.ledger = ledger
        self.clock = clock
        self.n = 0

    def msgid(self) -> str:
        self.n += 1
        return f"T{self.clock.now:%Y%m%d%H%M%S}{os.getpid() % 10000:04d}{self.n:04d}"

    def ask(self, doc: dict[str, Any], terminal: tuple[str, str] = PHARMACY) -> dict[str, Any]:
        ans: dict[str, Any] = json.loads(self.ledger.handle(terminal[0], dumps(doc)).answer)
        assert ans["infcode"] == 0, ans
        return ans

    def sale(self, items: list[tuple[str, int, str]] = SALE) -> tuple[str, dict[str, Any]]:
        msgid = self.msgid()
        info = self.ask(Requests(self.clock).sale("2102", items, ZHANG, msgid=msgid))["output"]["setlinfo"]
        return msgid, info

    def void(self, setl_id: str, terminal: tuple[str, str] = PHARMACY) -> str:
        msgid = self.msgid()
        self.ask(Requests(self.clock, terminal).envelope("2103", {"setl_id": setl_id}, msgid=msgid), terminal)
        return msgid

    def reverse(self, omsgid: str) -> None:
        doc = Requests(self.clock).envelope("2601", {"omsgid": omsgid, "oinfno": "2102"}, msgid=self.msgid())
        assert self.ask(doc)["output"]["result"] == "reversed"


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    # Days before today: a reconciliation request (stamped with the real time) is never EXPIRED.
    return Clock(now=now_beijing().replace(microsecond=0) - timedelta(days=3))


@pytest.fixture
def ledger(tmp_path: Path, clock: Clock) -> Iterator[Ledger]:
    lg = Ledger(tmp_path / "ledger.sqlite", seed.load(EXAMPLE_SEED), roots(), clock=clock, instance="t")
    try:
        yield lg
    finally:
        lg.close()


@pytest.fixture
def center(ledger: Ledger, clock: Clock) -> Center:
    return Center(ledger, clock)


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return load(write_config(tmp_path))


@pytest.fixture
def journal(cfg: Config) -> Iterator[Journal]:
    j = Journal.from_config(cfg.journal, cfg.reversal)
    try:
        yield j
    finally:
        j.close()


def day(clock: Clock) -> str:
    return clock.now.date().isoformat()


# --- inputs -------------------------------------------------------------------------------------------


def test_inputs_from_journal_rows(journal: Journal, center: Center, clock: Clock) -> None:
    m1, s1 = center.sale()
    m2, s2 = center.sale(SMALL)
    m3, s3 = center.sale(SMALL)
    journal_sale(journal, m1, s1)
    journal_sale(journal, m2, s2)
    journal_sale(journal, m3, s3)
    journal_void(journal, "V1", s3)
    journal_open(journal, "X1", reversed_=True)  # reversed: on neither side
    journal_open(journal, "X2")  # open: not in the journal's totals
    clock.advance(86400)
    m4, s4 = center.sale(SMALL)
    journal_sale(journal, m4, s4)  # another day

    d1 = s1["setl_time"][:10]
    details = journal.details(d1, d1, terminal_id=A)
    standing, voided = reconcile.standing_totals(details)
    assert standing == Totals(2, 6450, 0, 5350, 1100)
    assert voided == Totals(1, 150, 0, 150, 0)
    assert reconcile.totals_input(d1, d1, A, standing) == {
        "stmt_begndate": d1, "stmt_enddate": d1, "terminal_id": A, "fixmedins_setl_cnt": 2,
        "medfee_sumamt": "64.50", "fund_pay_sumamt": "0.00", "acct_pay": "53.50"}
    inp = reconcile.details_input(d1, d1, A, details, 1)
    assert inp["page_num"] == 1 and inp["page_size"] == 500
    assert inp["details"] == [
        {"msgid": m1, "setl_id": s1["setl_id"], "medfee_sumamt": "63.00", "fund_pay_sumamt": "0.00",
         "acct_pay": "52.00", "refd_setl_flag": "0"},
        {"msgid": m2, "setl_id": s2["setl_id"], "medfee_sumamt": "1.50", "fund_pay_sumamt": "0.00",
         "acct_pay": "1.50", "refd_setl_flag": "0"},
        {"msgid": m3, "setl_id": s3["setl_id"], "medfee_sumamt": "1.50", "fund_pay_sumamt": "0.00",
         "acct_pay": "1.50", "refd_setl_flag": "1"},
    ]


def test_yuan_and_periods() -> None:
    assert [reconcile.yuan(v) for v in (0, 5, 1250, 100000, -300)] == ["0.00", "0.05", "12.50", "1000.00",
                                                                        "-3.00"]
    assert reconcile.check_period("2026-01-01", "2027-01-02") == (date(2026, 1, 1), date(2027, 1, 2))
    for begin, end in (("2026-01-02", "2026-01-01"), ("2026-01-01", "2027-01-03"), ("20260101", "2026-01-01"),
                       ("2026-02-30", "2026-03-01")):
        with pytest.raises(ValueError):
            reconcile.check_period(begin, end)


def _detail(n: int, day_: str) -> Detail:
    return Detail(msgid=f"M{n:04d}", setl_id=f"S{n}", mdtrt_id=None, setl_time=None, setl_date=day_,
                  terminal_id=A, insutype=None, clr_type=None, amounts=Amounts(100, 0, 100, 0),
                  refd_setl_flag="0", void_msgid=None)


def test_split_period_keeps_days_whole() -> None:
    rows = [_detail(i, f"2026-11-{1 + i % 4:02d}") for i in range(8)]
    one = len(json.dumps([reconcile.detail_row(rows[0])], separators=(",", ":")))
    pieces = reconcile.split_period(date(2026, 11, 1), date(2026, 11, 4), rows, limit=one * 2 + 2)
    assert [(b.day, e.day, len(r)) for b, e, r in pieces] == [(1, 1, 2), (2, 2, 2), (3, 3, 2), (4, 4, 2)]
    assert reconcile.split_period(date(2026, 11, 1), date(2026, 11, 4), rows) == \
        [(date(2026, 11, 1), date(2026, 11, 4), rows)]
    with pytest.raises(SSCardError) as exc:
        reconcile.split_period(date(2026, 11, 1), date(2026, 11, 1), rows[:3], limit=one)
    assert exc.value.code == "BAD_PARAMETER"


# --- against the ledger -----------------------------------------------------------------------------------


async def test_agreement_sends_totals_only(cfg: Config, journal: Journal, center: Center, clock: Clock,
                                           ledger: Ledger) -> None:
    m1, s1 = center.sale()
    m2, s2 = center.sale(SMALL)
    center.void(s2["setl_id"])
    m3, _ = center.sale(SMALL)
    center.reverse(m3)
    journal_sale(journal, m1, s1)
    journal_sale(journal, m2, s2)
    journal_void(journal, "V2", s2)
    journal_open(journal, m3, reversed_=True)
    link = LedgerLink(ledger)
    d = day(clock)
    report = await reconcile.reconcile(cfg, d, d, journal=journal, link=link)
    assert report.agree and not report.details_compared and report.differences == ()
    assert link.infnos() == ["3201"]
    env = link.sent[0]
    assert (env["opter"], env["opter_type"], env["fixmedins_code"], env["mdtrtarea_admvs"]) == \
        (A, "1", PHARMACY[1], "370212")
    assert len(env["msgid"]) == 30 and env["msgid"].startswith(PHARMACY[1]) and link.refs == [env["msgid"]]
    assert env["input"]["terminal_id"] == A and env["input"]["fixmedins_setl_cnt"] == 1
    out = report.to_json()
    assert out["terminal"] == {"setl_cnt": 1, "medfee_sumamt": "63.00", "fund_pay_sumamt": "0.00",
                               "acct_pay": "52.00", "psn_cash_pay": "11.00", "refd_setl_cnt": 1}
    assert out["center"]["setl_cnt"] == 1 and out["center"]["refd_setl_cnt"] == 2  # voided + reversed
    assert out["center"]["stmt_rslt"] == "0" and out["agree"] is True
    assert "AGREE" in report.text()


async def test_differences_listed_with_notes(cfg: Config, journal: Journal, center: Center, clock: Clock,
                                             ledger: Ledger) -> None:
    m1, s1 = center.sale()  # the journal has another account payment
    m2, _ = center.sale(SMALL)  # the journal never heard of it
    m3, _ = center.sale(SMALL)  # its answer was lost here: the reversal is pending
    m4, s4 = center.sale(SMALL)  # voided by the institution's other terminal
    center.void(s4["setl_id"], PHARMACY_2)
    m5, s5 = center.sale(SMALL)  # agrees
    m6, s6 = center.sale()  # the journal's amounts do not add up: only psn_cash_pay differs
    wrong = amounts_of(s1)
    journal_sale(journal, m1, s1, amounts=Amounts(wrong.medfee_sumamt, 0, wrong.acct_pay - 100,
                                                  wrong.psn_cash_pay + 100))
    journal_open(journal, m3)
    journal_sale(journal, m4, s4)
    journal_sale(journal, m5, s5)
    a6 = amounts_of(s6)
    journal_sale(journal, m6, s6, amounts=Amounts(a6.medfee_sumamt, a6.fund_pay_sumamt, a6.acct_pay,
                                                  a6.psn_cash_pay + 50))
    fake = dict(s5, setl_id="S-nowhere", mdtrt_id="M-nowhere")
    journal_sale(journal, "TONLYHERE0001", fake)
    link = LedgerLink(ledger)
    d = day(clock)
    report = await reconcile.reconcile(cfg, d, d, journal=journal, link=link)
    assert not report.agree and report.details_compared
    assert link.infnos() == ["3201", "3202"]
    # Four standing on each side (the fake row and the other terminal's void make up for the two
    # missing here), 67.50 each: only the account/cash split shows in the totals.
    assert report.differing_totals == ("acct_pay", "psn_cash_pay")
    got = {(x.msgid, x.kind): x for x in report.differences}
    assert set(got) == {(m1, "differs"), (m2, "missing_at_terminal"), (m3, "missing_at_terminal"),
                        (m4, "differs"), ("TONLYHERE0001", "missing_at_center"), (m6, "differs")}
    d1 = got[m1, "differs"]
    assert d1.fields == ("acct_pay", "psn_cash_pay") and d1.center is not None and d1.terminal is not None
    assert d1.center.amounts.acct_pay == 5200 and d1.terminal.amounts.acct_pay == 5100
    assert got[m2, "missing_at_terminal"].note == "not in this terminal's journal"
    assert "reversal pending" in (got[m3, "missing_at_terminal"].note or "")
    d4 = got[m4, "differs"]
    assert d4.fields == ("refd_setl_flag",) and d4.center is not None and d4.center.state == "voided"
    assert "another terminal" in (d4.note or "")
    assert got["TONLYHERE0001", "missing_at_center"].center is None
    d6 = got[m6, "differs"]
    assert d6.fields == ("psn_cash_pay",) and "do not add up" in (d6.note or "")
    out = report.to_json()
    text = json.dumps(out, ensure_ascii=False)
    for personal in ("psn_no", ZHANG[1], "张三", s1["psn_no"]):
        assert personal not in text
    assert out["differences"][0]["msgid"] == min(x.msgid for x in report.differences)
    diff1 = next(x for x in out["differences"] if x["msgid"] == m1)
    assert diff1["center"]["acct_pay"] == "52.00" and diff1["terminal"]["acct_pay"] == "51.00"
    assert "DIFFER" in report.text() and m2 in report.text()


async def test_pages_and_periods(cfg: Config, journal: Journal, center: Center, clock: Clock, ledger: Ledger,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Three days, five settlements a day; pages of two rows, and details of a day per request."""
    first = day(clock)
    missing = []
    for _ in range(3):
        for k in range(5):
            m, s = center.sale(SMALL)
            if k == 4:
                missing.append(m)
            else:
                journal_sale(journal, m, s)
        clock.advance(86400)
    last = (date.fromisoformat(first) + timedelta(days=2)).isoformat()
    monkeypatch.setattr(reconcile, "PAGE_SIZE", 2)
    one_day = len(json.dumps([reconcile.detail_row(d) for d in journal.details(first, first)],
                             separators=(",", ":")))
    monkeypatch.setattr(reconcile, "MAX_DETAILS_BYTES", one_day + 10)
    link = LedgerLink(ledger)
    report = await reconcile.reconcile(cfg, first, last, journal=journal, link=link)
    assert sorted(x.msgid for x in report.differences) == sorted(missing)
    assert {x.kind for x in report.differences} == {"missing_at_terminal"}
    pages = [(d["input"]["stmt_begndate"], d["input"]["page_num"], d["input"]["page_size"])
             for d in link.sent if d["infno"] == "3202"]
    days = [(date.fromisoformat(first) + timedelta(days=n)).isoformat() for n in range(3)]
    assert pages == [(dd, p, 2) for dd in days for p in (1, 2, 3)]  # 5 rows a day: 3 pages


async def test_refusal_garbage_timeout_and_retry(tmp_path: Path, journal: Journal, ledger: Ledger,
                                                 clock: Clock) -> None:
    d = day(clock)
    other = load(write_config(tmp_path, code="P37021200009", journal=journal.path))
    with pytest.raises(SSCardError) as exc:
        await reconcile.reconcile(other, d, d, journal=journal, link=LedgerLink(ledger))
    assert exc.value.code == "BACKEND_REFUSED" and exc.value.details["backend_code"] == "INSTITUTION_MISMATCH"
    cfg = load(write_config(tmp_path, journal=journal.path))

    class Scripted:
        def __init__(self, *answers: Any) -> None:
            self.answers = list(answers)
            self.msgids: list[str] = []

        async def request(self, payload: bytes, timeout: float | None = None, *,
                          ref: str | None = None) -> bytes:
            doc = json.loads(payload)
            self.msgids.append(doc["msgid"])
            a = self.answers.pop(0)
            if isinstance(a, BaseException):
                raise a
            if callable(a):
                return a(doc)  # type: ignore[no-any-return]
            return a  # type: ignore[no-any-return]

    with pytest.raises(SSCardError) as exc:
        await reconcile.reconcile(cfg, d, d, journal=journal, link=Scripted(b"not json"))
    assert exc.value.code == "BACKEND_UNAVAILABLE" and "malformed" in exc.value.detail
    with pytest.raises(SSCardError) as exc:
        timeout = AnswerTimeout("x", b"c", 1.0, True)
        await reconcile.reconcile(cfg, d, d, journal=journal, link=Scripted(timeout))
    assert exc.value.code == "BACKEND_UNAVAILABLE" and "no answer to 3201" in exc.value.detail

    def answer(doc: dict[str, Any], **kw: Any) -> bytes:
        base = {"infcode": 0, "msgid": doc["msgid"], "infno": doc["infno"], "final": True, "err_code": None,
                "err_msg": None, "output": {}}
        return json.dumps({**base, **kw}).encode()

    reused = lambda doc: answer(doc, infcode=-1, final=False, err_code="MSGID_REUSED")  # noqa: E731
    good = lambda doc: LedgerLink(ledger).ledger.handle(A, json.dumps(doc).encode()).answer  # noqa: E731
    link = Scripted(reused, good)
    report = await reconcile.reconcile(cfg, d, d, journal=journal, link=link)
    assert report.agree and len(set(link.msgids)) == 2  # asked again under a fresh msgid
    with pytest.raises(SSCardError) as exc:
        await reconcile.reconcile(cfg, d, d, journal=journal, link=Scripted(reused, reused))
    assert exc.value.details["backend_code"] == "MSGID_REUSED"
    bad_money = lambda doc: answer(doc, output={"setl_cnt": 0, "refd_setl_cnt": 0, "stmt_rslt": "0",  # noqa: E731
                                                "medfee_sumamt": 0, "fund_pay_sumamt": "0.00",
                                                "acct_pay": "0.00", "psn_cash_pay": "0.00"})
    with pytest.raises(SSCardError) as exc:
        await reconcile.reconcile(cfg, d, d, journal=journal, link=Scripted(bad_money))
    assert exc.value.code == "BACKEND_UNAVAILABLE" and "medfee_sumamt" in exc.value.detail


async def test_no_journal_and_the_cli_client_id(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path))
    with pytest.raises(ConfigError) as exc:
        await reconcile.reconcile(cfg, "2026-11-25", "2026-11-25")
    assert exc.value.key == "journal.path" and not cfg.journal.path.exists()  # never created here
    Journal.from_config(cfg.journal, cfg.reversal).close()
    squatter = load(write_config(tmp_path, mqtt={"client_id": f"{A}-cli"}))
    with pytest.raises(ConfigError) as exc:
        await reconcile.reconcile(squatter, "2026-11-25", "2026-11-25")
    assert exc.value.key == "mqtt.client_id"
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("not a certificate\n")
    bad_ca = load(write_config(tmp_path, mqtt={"tls": {"enabled": True, "ca": not_pem}}))
    with pytest.raises(ConfigError) as exc:
        await reconcile.reconcile(bad_ca, "2026-11-25", "2026-11-25")
    assert exc.value.key == "mqtt.tls"


# --- the CLI's usage ----------------------------------------------------------------------------------------


def test_cli_usage_and_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_path = write_config(tmp_path)
    for argv, message in ((["--date", "2026-11-25", "--from", "2026-11-01", "--to", "2026-11-02"], "either"),
                          (["--from", "2026-11-01"], "go together"),
                          (["--date", "2026-13-01"], "not a valid date"),
                          (["--from", "2026-11-02", "--to", "2026-11-01"], "before it begins")):
        assert cli.main(["reconcile", "-c", str(cfg_path), *argv]) == 2
        assert message in capsys.readouterr().err
    assert cli.main(["reconcile", "-c", str(cfg_path), "--date", "2026-11-25"]) == 2
    assert "journal.path" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg_path.read_text().replace("port = 1\n", "port = 70000\n"))
    monkeypatch.setenv("SSCARDD_CONFIG", str(bad))  # the default config file
    assert cli.main(["reconcile"]) == 2
    assert "mqtt.port: must be from 1 to 65535" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["reconcile", "--bogus"])
    assert exit_.value.code == 2


def test_cli_reports_no_broker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nobody listens on the configured port: exit 1 with the code and what failed."""
    cfg_path = write_config(tmp_path, mqtt={"answer_timeout": 1.5, "message_expiry": 1})
    cfg = load(cfg_path)
    Journal.from_config(cfg.journal, cfg.reversal).close()
    assert cli.main(["reconcile", "-c", str(cfg_path), "--date", "2026-11-25", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["error"]["code"] == "BACKEND_UNAVAILABLE"
    assert out["error"]["compat_code"] == -3004
    assert "no connection to the broker 127.0.0.1:1 within 1.5 s" in out["error"]["detail"]
