"""Reconciliation (对账): this terminal's journal against the settlement backend, totals first (3201)
and, when they differ, the settlements one by one (3202) — settlement-domain §1.6; README,
"Backend simulator" (3201 totals, 3202 details).

What is compared is what the backend counts for a terminal: the **settlements still standing**
whose settlement day (the backend's ``setl_time``, Beijing time) lies in the period — count,
``medfee_sumamt``, ``fund_pay_sumamt``, ``acct_pay`` (and ``psn_cash_pay``, compared here only).
The journal side is :meth:`sscardd.journal.Journal.totals` ``["0"]``: this terminal's settled
sales of the period that no settled void *in this journal* refunds. Voided and reversed
settlements count on neither side (the backend reports them as ``refd_setl_cnt``).

Known caveats, each reported as a difference with a note rather than hidden:

- a sale **voided by another terminal** of the institution stands in this journal but not at the
  backend (``differs`` on ``refd_setl_flag``, center state ``voided``); that terminal's journal
  holds the void;
- a settlement whose outcome is **still open** here (``sent``, ``unknown``, ``reversing``: the
  reversal has not been acknowledged yet; or ``reversal_refused``) is not in the journal's totals
  but may stand at the backend (``missing_at_terminal``, the note names the journal state). The
  same for a void whose outcome is open. Reconcile again once the reversals are through;
- the settlement day is the backend's ``setl_time`` date; only an answer without ``setl_time``
  leaves the journal with its own (Beijing) date, which can differ around midnight.

The command that needs MQTT connects with the terminal's daemon credentials under its own client
id ``{terminal_id}-cli`` (never the daemon's: that would take over the daemon's session) and its
own Correlation Data prefix, so neither reads the other's answers (architecture.md, "CLI"). Its
MQTT session expires shortly after it disconnects (:data:`CLI_SESSION_EXPIRY`), so the broker does
not keep queueing the terminal's answers for a client that is gone.

Reports carry message ids, settlement ids and amounts — never names, ID numbers or ``psn_no``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import re
import sqlite3
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Final, Literal, Protocol, cast

import structlog

from sscardd import backend
from sscardd import broker as topics
from sscardd.backend import BackendGarbage, fen
from sscardd.config import Config, ConfigError
from sscardd.errors import SSCardError
from sscardd.journal import (
    HOLD_STATES,
    Amounts,
    Detail,
    Journal,
    JournalError,
    State,
    Totals,
)
from sscardd.mqtt import AnswerTimeout, DaemonLink

log = structlog.get_logger("sscardd.reconcile")

PAGE_SIZE: Final = 500
MAX_PERIOD_DAYS: Final = 366  # the backend's limit: end − begin at most 366 days
# A 3202 request carries the period's details; the backend takes requests up to 256 KiB. A longer
# period is split into shorter ones (at most one day each) until each request fits.
MAX_DETAILS_BYTES: Final = 200_000
# The CLI's MQTT session outlives a dropped connection long enough to get its answer, no longer.
CLI_SESSION_EXPIRY: Final = 60
TOTAL_KEYS: Final = ("fixmedins_setl_cnt", "medfee_sumamt", "fund_pay_sumamt", "acct_pay", "psn_cash_pay")
Kind = Literal["missing_at_center", "missing_at_terminal", "differs"]
KINDS: Final = ("missing_at_center", "missing_at_terminal", "differs")
CENTER_STATES: Final = ("settled", "voided", "reversed")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)
_FIELD = re.compile(r"[a-z_]{1,40}", re.ASCII)


class Requester(Protocol):
    """What sends a backend request and returns the answer's bytes (:class:`DaemonLink`)."""

    async def request(self, payload: bytes, timeout: float | None = None, *,
                      ref: str | None = None) -> bytes: ...


def yuan(amount: int) -> str:
    """Fen → ``"12.50"`` (as the backend writes money)."""
    sign = "-" if amount < 0 else ""
    amount = abs(amount)
    return f"{sign}{amount // 100}.{amount % 100:02d}"


def parse_day(value: str) -> date:
    """A ``yyyy-MM-dd`` date (ValueError otherwise)."""
    shown = repr(value[:20]) if isinstance(value, str) else type(value).__name__
    if not isinstance(value, str) or not _DATE.fullmatch(value):
        raise ValueError(f"not a yyyy-MM-dd date: {shown}")
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"not a valid date: {shown} ({exc})") from None


def check_period(begin: str, end: str) -> tuple[date, date]:
    """The period's days; ValueError unless both are dates, in order, at most 366 days apart."""
    b, e = parse_day(begin), parse_day(end)
    if e < b:
        raise ValueError(f"the period ends ({end}) before it begins ({begin})")
    if (e - b).days > MAX_PERIOD_DAYS:
        raise ValueError(f"a period spans at most {MAX_PERIOD_DAYS + 1} days")
    return b, e


def today() -> str:
    """Today in Beijing time, the platform's settlement day."""
    return backend.now_beijing().date().isoformat()


# --- the journal's side ------------------------------------------------------------------------------


def totals_input(begin: str, end: str, terminal_id: str, standing: Totals) -> dict[str, Any]:
    """The 3201 input: the period, this terminal, and the journal's totals of standing sales."""
    return {"stmt_begndate": begin, "stmt_enddate": end, "terminal_id": terminal_id,
            "fixmedins_setl_cnt": standing.count, "medfee_sumamt": yuan(standing.medfee_sumamt),
            "fund_pay_sumamt": yuan(standing.fund_pay_sumamt), "acct_pay": yuan(standing.acct_pay)}


def detail_row(d: Detail) -> dict[str, Any]:
    """One journal settlement as 3202's ``details[]`` lists it."""
    return {"msgid": d.msgid, "setl_id": d.setl_id, "medfee_sumamt": yuan(d.amounts.medfee_sumamt),
            "fund_pay_sumamt": yuan(d.amounts.fund_pay_sumamt), "acct_pay": yuan(d.amounts.acct_pay),
            "refd_setl_flag": d.refd_setl_flag}


def details_input(begin: str, end: str, terminal_id: str, details: Sequence[Detail], page: int,
                  page_size: int | None = None) -> dict[str, Any]:
    """The 3202 input for one page (of :data:`PAGE_SIZE` rows): the period, this terminal, and the
    journal's details."""
    return {"stmt_begndate": begin, "stmt_enddate": end, "terminal_id": terminal_id, "page_num": page,
            "page_size": page_size or PAGE_SIZE, "details": [detail_row(d) for d in details]}


def standing_totals(details: Sequence[Detail]) -> tuple[Totals, Totals]:
    """(standing, voided) totals of the journal's settled sales (what 3201 compares is the first)."""
    standing, voided = Totals(), Totals()
    for d in details:
        if d.refd_setl_flag == "0":
            standing = standing.plus(d.amounts)
        else:
            voided = voided.plus(d.amounts)
    return standing, voided


def split_period(b: date, e: date, details: Sequence[Detail],
                 limit: int | None = None) -> list[tuple[date, date, list[Detail]]]:
    """The period in pieces whose ``details[]`` fits one request (at most ``limit`` bytes, default
    :data:`MAX_DETAILS_BYTES`; a day is never split)."""
    limit = MAX_DETAILS_BYTES if limit is None else limit
    rows = list(details)
    size = len(json.dumps([detail_row(d) for d in rows], separators=(",", ":")))
    if size <= limit or b == e:
        if size > limit:
            raise SSCardError("BAD_PARAMETER", f"the settlements of {b} do not fit one 3202 request "
                                               f"({len(rows)} rows, {size} bytes)")
        return [(b, e, rows)]
    mid = b + (e - b) // 2
    left = [d for d in rows if date.fromisoformat(d.setl_date) <= mid]
    right = [d for d in rows if date.fromisoformat(d.setl_date) > mid]
    return split_period(b, mid, left, limit) + split_period(mid + timedelta(days=1), e, right, limit)


# --- the report ------------------------------------------------------------------------------------------


def _totals_json(t: Totals) -> dict[str, Any]:
    return {"setl_cnt": t.count, "medfee_sumamt": yuan(t.medfee_sumamt),
            "fund_pay_sumamt": yuan(t.fund_pay_sumamt), "acct_pay": yuan(t.acct_pay),
            "psn_cash_pay": yuan(t.psn_cash_pay)}


def _amounts_json(a: Amounts) -> dict[str, str]:
    return {"medfee_sumamt": yuan(a.medfee_sumamt), "fund_pay_sumamt": yuan(a.fund_pay_sumamt),
            "acct_pay": yuan(a.acct_pay), "psn_cash_pay": yuan(a.psn_cash_pay)}


@dataclass(frozen=True)
class CenterTotals:
    """The backend's 3201 answer: its standing settlements, the voided/reversed count, its verdict."""

    totals: Totals
    refd_setl_cnt: int
    stmt_rslt: str  # "0" agree, "1" differ (the backend's comparison of the four totals sent)
    stmt_rslt_dscr: str

    @classmethod
    def from_output(cls, out: Mapping[str, Any]) -> CenterTotals:
        cnt, refd, rslt = out.get("setl_cnt"), out.get("refd_setl_cnt"), out.get("stmt_rslt")
        for key, v in (("setl_cnt", cnt), ("refd_setl_cnt", refd)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise BackendGarbage(f"{key} is not a count")
        if rslt not in ("0", "1"):
            raise BackendGarbage("stmt_rslt is not 0 or 1")
        assert isinstance(cnt, int) and isinstance(refd, int) and isinstance(rslt, str)
        dscr = backend.text(out, "stmt_rslt_dscr", optional=True, max_len=500) or ""
        totals = Totals(cnt, fen(out, "medfee_sumamt"), fen(out, "fund_pay_sumamt"), fen(out, "acct_pay"),
                        fen(out, "psn_cash_pay"))
        return cls(totals, refd, rslt, dscr)

    def to_json(self) -> dict[str, Any]:
        return {**_totals_json(self.totals), "refd_setl_cnt": self.refd_setl_cnt,
                "stmt_rslt": self.stmt_rslt, "stmt_rslt_dscr": self.stmt_rslt_dscr}


@dataclass(frozen=True)
class CenterRow:
    """The backend's row of a differing settlement (no ``psn_no``: the report names no person)."""

    setl_id: str
    mdtrt_id: str | None
    setl_time: str | None
    amounts: Amounts
    state: str  # settled | voided | reversed
    refd_setl_flag: str

    @classmethod
    def from_output(cls, row: Mapping[str, Any]) -> CenterRow:
        state, flag = row.get("state"), row.get("refd_setl_flag")
        if state not in CENTER_STATES:
            raise BackendGarbage("a row's state is not settled, voided or reversed")
        if flag not in ("0", "1"):
            raise BackendGarbage("a row's refd_setl_flag is not 0 or 1")
        assert isinstance(state, str) and isinstance(flag, str)
        setl_id = backend.text(row, "setl_id", max_len=64)
        assert setl_id is not None
        return cls(setl_id, backend.text(row, "mdtrt_id", optional=True, max_len=64),
                   backend.text(row, "setl_time", optional=True, max_len=40),
                   Amounts(fen(row, "medfee_sumamt"), fen(row, "fund_pay_sumamt"), fen(row, "acct_pay"),
                           fen(row, "psn_cash_pay")), state, flag)

    def to_json(self) -> dict[str, Any]:
        return {"setl_id": self.setl_id, "mdtrt_id": self.mdtrt_id, "setl_time": self.setl_time,
                **_amounts_json(self.amounts), "state": self.state, "refd_setl_flag": self.refd_setl_flag}


@dataclass(frozen=True)
class Difference:
    """One settlement the two sides see differently. ``center`` holds the backend's values (for
    ``differs`` and ``missing_at_terminal``), ``terminal`` the journal's (for ``differs`` and
    ``missing_at_center``); ``note`` says what the journal knows that explains it, if anything."""

    msgid: str
    kind: Kind
    fields: tuple[str, ...] = ()
    center: CenterRow | None = None
    terminal: Detail | None = None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"msgid": self.msgid, "kind": self.kind, "fields": list(self.fields),
                               "center": self.center.to_json() if self.center is not None else None,
                               "terminal": None, "note": self.note}
        if self.terminal is not None:
            d = self.terminal
            out["terminal"] = {"setl_id": d.setl_id, "mdtrt_id": d.mdtrt_id, "setl_time": d.setl_time,
                               **_amounts_json(d.amounts), "refd_setl_flag": d.refd_setl_flag,
                               "void_msgid": d.void_msgid}
        return out


@dataclass(frozen=True)
class Report:
    """The outcome of one reconciliation. Money in fen here, ``"12.50"`` strings in :meth:`to_json`."""

    terminal_id: str
    fixmedins_code: str
    begin: str
    end: str
    terminal: Totals  # the journal's standing settlements of the period
    terminal_voided: int  # the journal's settled sales of the period voided since
    center: CenterTotals
    differing_totals: tuple[str, ...]  # of TOTAL_KEYS; "stmt_rslt" if only the backend says so
    details_compared: bool
    differences: tuple[Difference, ...] = ()

    @property
    def agree(self) -> bool:
        return not self.differing_totals and not self.differences

    def to_json(self) -> dict[str, Any]:
        return {
            "terminal_id": self.terminal_id, "fixmedins_code": self.fixmedins_code,
            "stmt_begndate": self.begin, "stmt_enddate": self.end, "agree": self.agree,
            "terminal": {**_totals_json(self.terminal), "refd_setl_cnt": self.terminal_voided},
            "center": self.center.to_json(), "differing_totals": list(self.differing_totals),
            "details_compared": self.details_compared,
            "differences": [d.to_json() for d in self.differences],
        }

    def text(self) -> str:
        """The report for a person reading a terminal."""
        period = self.begin if self.begin == self.end else f"{self.begin} … {self.end}"
        head = f"{'':10}{'count':>7}{'medfee_sumamt':>16}{'fund_pay_sumamt':>17}{'acct_pay':>12}" \
               f"{'psn_cash_pay':>14}"

        def line(name: str, t: Totals) -> str:
            return (f"{name:10}{t.count:>7}{yuan(t.medfee_sumamt):>16}{yuan(t.fund_pay_sumamt):>17}"
                    f"{yuan(t.acct_pay):>12}{yuan(t.psn_cash_pay):>14}")

        out = [f"reconciliation of terminal {self.terminal_id} ({self.fixmedins_code}), {period}",
               head, line("terminal", self.terminal), line("center", self.center.totals),
               f"voided or reversed: center {self.center.refd_setl_cnt}; voided in this journal "
               f"{self.terminal_voided}"]
        if self.agree:
            out.append("result: AGREE" + ("" if not self.details_compared else " (details compared)"))
            return "\n".join(out)
        out.append("result: DIFFER" + (f" (totals: {', '.join(self.differing_totals)})"
                                       if self.differing_totals else " (details)"))
        if not self.details_compared:
            return "\n".join(out)
        if not self.differences:
            out.append("the details show no difference: the totals differ nonetheless")
        else:
            out.append(f"differences ({len(self.differences)}):")
        for d in self.differences:
            out.append(f"  {d.msgid}  {d.kind}" + (f" [{', '.join(d.fields)}]" if d.fields else ""))
            if d.terminal is not None:
                t = d.terminal
                out.append(f"    terminal: {t.setl_id} {t.setl_time or t.setl_date}  "
                           f"{_amounts_text(t.amounts)}  refd_setl_flag {t.refd_setl_flag}")
            if d.center is not None:
                c = d.center
                out.append(f"    center:   {c.setl_id} {c.setl_time or ''}  {_amounts_text(c.amounts)}"
                           f"  {c.state}")
            if d.note:
                out.append(f"    note: {d.note}")
        return "\n".join(out)


def _amounts_text(a: Amounts) -> str:
    return (f"medfee {yuan(a.medfee_sumamt)} = fund {yuan(a.fund_pay_sumamt)} + acct {yuan(a.acct_pay)}"
            f" + cash {yuan(a.psn_cash_pay)}")


def compare_totals(mine: Totals, center: CenterTotals) -> tuple[str, ...]:
    """The totals that differ (:data:`TOTAL_KEYS`), or ``("stmt_rslt",)`` when only the backend
    finds a difference."""
    c = center.totals
    pairs = zip(TOTAL_KEYS, (mine.count, mine.medfee_sumamt, mine.fund_pay_sumamt, mine.acct_pay,
                             mine.psn_cash_pay),
                (c.count, c.medfee_sumamt, c.fund_pay_sumamt, c.acct_pay, c.psn_cash_pay), strict=True)
    differ = tuple(k for k, a, b in pairs if a != b)
    if not differ and center.stmt_rslt != "0":
        return ("stmt_rslt",)
    return differ


# One entry of 3202's diffs[]: msgid, kind, the fields that differ, the backend's row.
Diff = tuple[str, Kind, tuple[str, ...], CenterRow | None]


def parse_diff(raw: object) -> Diff:
    """One entry of 3202's ``diffs[]`` (:class:`BackendGarbage` if malformed)."""
    if not isinstance(raw, dict):
        raise BackendGarbage("a diff is not an object")
    msg_id, kind, fields = raw.get("msgid"), raw.get("kind"), raw.get("fields", [])
    if not isinstance(msg_id, str):
        raise BackendGarbage("a diff has no msgid")
    try:
        backend.check_msgid(msg_id)
    except ValueError:
        raise BackendGarbage("a diff's msgid is malformed") from None
    if kind not in KINDS:
        raise BackendGarbage("a diff's kind is unknown")
    if not isinstance(fields, list) or not all(isinstance(f, str) and _FIELD.fullmatch(f) for f in fields):
        raise BackendGarbage("a diff's fields are not field names")
    center = raw.get("center")
    row = CenterRow.from_output(center) if isinstance(center, dict) else None
    if center is not None and row is None:
        raise BackendGarbage("a diff's center is not an object")
    if kind in ("differs", "missing_at_terminal") and row is None:
        raise BackendGarbage(f"a {kind} diff without the center's row")
    return msg_id, cast(Kind, kind), tuple(fields), row


# --- talking to the backend ---------------------------------------------------------------------------------


class _Backend:
    """3201/3202 requests of one terminal over a :class:`Requester`."""

    def __init__(self, cfg: Config, link: Requester, timeout: float) -> None:
        self.cfg = cfg
        self.link = link
        self.timeout = timeout
        # exp_time: the Message Expiry, and never after the moment this side stops waiting.
        self.expiry = max(1, min(cfg.mqtt.message_expiry, math.ceil(timeout) - 1))

    async def ask(self, infno: str, inp: Mapping[str, Any]) -> Mapping[str, Any]:
        """The output of a successful answer; SSCardError otherwise. A refusal the backend did not
        store (``final: false``: EXPIRED, MSGID_REUSED, INJECTED_FAILURE, INTERNAL_ERROR) is asked
        once more under a fresh msgid: a query moves no money."""
        for attempt in (1, 2):
            msg_id = backend.msgid(self.cfg.institution.code, backend.KIND_OTHER)
            payload = backend.envelope(infno, msg_id, inp, institution=self.cfg.institution,
                                       expiry_s=self.expiry, opter=self.cfg.terminal.id, opter_type="1")
            try:
                raw = await self.link.request(payload, self.timeout, ref=msg_id)
            except AnswerTimeout:
                raise SSCardError("BACKEND_UNAVAILABLE",
                                  f"no answer to {infno} within {self.timeout:g} s") from None
            try:
                answer = backend.parse_answer(raw, msg_id=msg_id, infno=infno)
            except BackendGarbage as exc:
                raise SSCardError("BACKEND_UNAVAILABLE", f"a malformed answer to {infno}: {exc}") from None
            if answer.ok:
                return answer.output
            log.info("reconcile: refused", infno=infno, msgid=msg_id, err_code=answer.err_code,
                     final=answer.final, attempt=attempt)
            if answer.final or attempt == 2:
                raise answer.error()
        raise AssertionError("unreachable")

    async def totals(self, begin: str, end: str, standing: Totals) -> CenterTotals:
        out = await self.ask("3201", totals_input(begin, end, self.cfg.terminal.id, standing))
        try:
            return CenterTotals.from_output(out)
        except BackendGarbage as exc:
            raise SSCardError("BACKEND_UNAVAILABLE", f"a malformed answer to 3201: {exc}") from None

    async def diffs(self, begin: str, end: str, details: Sequence[Detail]
                    ) -> tuple[list[Diff], dict[str, CenterRow]]:
        """Every page of 3202 for the period, with the journal's details: the diffs of all pages
        (each (msgid, kind) once: a backend may list them on every page or per page) and the
        backend's rows of this terminal by msgid."""
        seen: dict[tuple[str, str], Diff] = {}
        rows: dict[str, CenterRow] = {}
        page, pages, size = 1, 1, PAGE_SIZE
        while page <= pages:
            out = await self.ask("3202", details_input(begin, end, self.cfg.terminal.id, details, page, size))
            try:
                total, diffs = out.get("total"), out.get("diffs")
                if not isinstance(total, int) or isinstance(total, bool) or total < 0:
                    raise BackendGarbage("total is not a count")
                if not isinstance(diffs, list):
                    raise BackendGarbage("diffs is missing")
                page_rows = out.get("rows")
                if not isinstance(page_rows, list):
                    raise BackendGarbage("rows is missing")
                for raw in page_rows:
                    if not isinstance(raw, dict):
                        raise BackendGarbage("a row is not an object")
                    if raw.get("terminal_id") == self.cfg.terminal.id:
                        msg_id = backend.text(raw, "msgid", max_len=64)
                        assert msg_id is not None
                        rows[msg_id] = CenterRow.from_output(raw)
                for raw in diffs:
                    parsed = parse_diff(raw)
                    seen.setdefault((parsed[0], parsed[1]), parsed)
            except BackendGarbage as exc:
                raise SSCardError("BACKEND_UNAVAILABLE", f"a malformed answer to 3202: {exc}") from None
            if page == 1:
                pages = max(1, math.ceil(total / size))
            page += 1
        return list(seen.values()), rows


# --- explaining differences from the journal --------------------------------------------------------------


def _note(journal: Journal, kind: Kind, msg_id: str, fields: tuple[str, ...], center: CenterRow | None,
          mine: Detail | None, open_voids: Mapping[str, State]) -> str | None:
    if kind == "missing_at_terminal":
        entry = journal.find_by_msgid(msg_id)
        if entry is None:
            return "not in this terminal's journal"
        if entry.state == State.SETTLED:
            return f"settled in this journal with settlement day {entry.setl_date} (outside the period?)"
        if entry.state == State.REVERSAL_REFUSED:
            return "the journal's reversal of it was refused: an operator must resolve it"
        if entry.state in HOLD_STATES:
            return f"outcome still open in this journal ({entry.state}): reversal pending"
        return f"in this journal as {entry.state}"
    if kind == "differs" and "refd_setl_flag" in fields and center is not None and mine is not None:
        state = open_voids.get(mine.setl_id)
        if state is not None:
            return f"a void of it is open in this journal ({state}): reversal pending"
        if center.refd_setl_flag == "1" and mine.refd_setl_flag == "0":
            if center.state == "voided":
                return "voided at the center, not by this terminal: by another terminal of the institution?"
            return f"{center.state} at the center, standing in this journal"
        if center.refd_setl_flag == "0" and mine.refd_setl_flag == "1":
            return f"voided in this journal ({mine.void_msgid}), standing at the center"
    return None


# --- the whole ---------------------------------------------------------------------------------------------


async def reconcile(cfg: Config, begin: str, end: str, *, journal: Journal | None = None,
                    timeout: float | None = None, link: Requester | None = None) -> Report:
    """Reconcile this terminal's journal with the backend for the days ``begin``…``end``
    (``yyyy-MM-dd``, Beijing time, inclusive): 3201 with the journal's totals, and 3202 with its
    details when the totals differ.

    ``journal``: an open journal (default: the one ``cfg`` names, opened and closed here; a missing
    file is a :class:`ConfigError` naming ``journal.path``, never created). ``link``: a running
    :class:`DaemonLink` to use (the daemon's own); default a link of its own under the client id
    ``{terminal_id}-cli``, connected and stopped here. ``timeout``: per request, and for
    connecting (default ``mqtt.answer_timeout``).

    Raises :class:`SSCardError`: the backend's refusal (``BACKEND_REFUSED`` with ``backend_code``,
    or a code a POS acts on), ``BACKEND_UNAVAILABLE`` for no broker, no answer or a malformed
    answer; ValueError for a bad period.
    """
    b, e = check_period(begin, end)
    timeout = cfg.mqtt.answer_timeout if timeout is None else timeout
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    terminal_id = cfg.terminal.id
    own_journal = journal is None
    if journal is None:
        journal = open_journal(cfg)
    try:
        details = await asyncio.to_thread(journal.details, begin, end, terminal_id=terminal_id)
        standing, voided = standing_totals(details)
        if link is not None:
            return await _run(cfg, journal, b, e, details, standing, voided, _Backend(cfg, link, timeout))
        async with cli_link(cfg, timeout) as own:
            return await _run(cfg, journal, b, e, details, standing, voided, _Backend(cfg, own, timeout))
    finally:
        if own_journal:
            journal.close()


def _cash_differs(mine: Detail | None, center: CenterRow | None) -> bool:
    if mine is None or center is None:
        return False
    return mine.amounts.psn_cash_pay != center.amounts.psn_cash_pay


async def _run(cfg: Config, journal: Journal, b: date, e: date, details: list[Detail], standing: Totals,
               voided: Totals, api: _Backend) -> Report:
    begin, end = b.isoformat(), e.isoformat()
    center = await api.totals(begin, end, standing)
    differing = compare_totals(standing, center)
    report = Report(cfg.terminal.id, cfg.institution.code, begin, end, standing, voided.count, center,
                    differing, details_compared=False)
    if differing:
        by_msgid = {d.msgid: d for d in details}
        open_voids = {r.orig_setl_id: r.state for r in await asyncio.to_thread(journal.unfinished)
                      if r.op == "sale.void" and r.orig_setl_id is not None}
        found: dict[tuple[str, str], Difference] = {}
        for pb, pe, rows in split_period(b, e, details):
            diffs, center_rows = await api.diffs(pb.isoformat(), pe.isoformat(), rows)
            for msg_id, kind, fields, row in diffs:
                mine = by_msgid.get(msg_id)
                if kind == "differs" and _cash_differs(mine, row) and "psn_cash_pay" not in fields:
                    fields = (*fields, "psn_cash_pay")
                note = _note(journal, kind, msg_id, fields, row, mine, open_voids)
                found.setdefault((msg_id, kind), Difference(msg_id, kind, fields, row, mine, note))
            # 3202 leaves psn_cash_pay out of its comparison; the rows let it be compared here.
            for d in rows:
                c = center_rows.get(d.msgid)
                if c is not None and (d.msgid, "differs") not in found and _cash_differs(d, c):
                    found[d.msgid, "differs"] = Difference(
                        d.msgid, "differs", ("psn_cash_pay",), c, d,
                        "psn_cash_pay compared here (3202 does not): the journal's amounts do not add up")
        report = dataclasses.replace(report, details_compared=True,
                                     differences=tuple(sorted(found.values(), key=lambda d: d.msgid)))
    log.info("reconciled", terminal=cfg.terminal.id, begin=begin, end=end, agree=report.agree,
             differing_totals=list(report.differing_totals), differences=len(report.differences))
    return report


def open_journal(cfg: Config) -> Journal:
    """The journal ``cfg`` names, for reading; a missing or unusable file is a :class:`ConfigError`
    (the CLI never creates the daemon's journal: run as root it would leave a file the daemon's
    user cannot open)."""
    path = cfg.journal.path
    if not path.is_file():
        raise ConfigError("journal.path", f"{path} does not exist (has the daemon run on this machine?)",
                          cfg.source)
    try:
        return Journal.from_config(cfg.journal, cfg.reversal)
    except (OSError, JournalError, sqlite3.Error) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ConfigError("journal.path", f"cannot open {path}: {reason}", cfg.source) from None


@contextlib.asynccontextmanager
async def cli_link(cfg: Config, timeout: float) -> AsyncIterator[DaemonLink]:
    """A connected :class:`DaemonLink` under the CLI's client id ``{terminal_id}-cli`` with the
    daemon's credentials, no presence, no commands; stopped on exit. ``BACKEND_UNAVAILABLE`` if no
    connection comes up within ``timeout``."""
    terminal_id = cfg.terminal.id
    client_id = topics.cli_client_id(terminal_id)
    if cfg.mqtt.client_id == client_id:
        raise ConfigError("mqtt.client_id", f"{client_id!r} is the operator CLI's client id; the daemon "
                                            "needs another one", cfg.source)
    mqtt_cfg = dataclasses.replace(cfg.mqtt, session_expiry=min(cfg.mqtt.session_expiry, CLI_SESSION_EXPIRY))
    try:
        link = DaemonLink(mqtt_cfg, terminal_id, client_id=client_id, presence=False)
    except (ssl.SSLError, OSError) as exc:  # the TLS files exist (checked at load) but do not load
        raise ConfigError("mqtt.tls", f"cannot use the TLS files: {exc}", cfg.source) from None
    task = asyncio.create_task(link.run())
    try:
        try:
            await link.wait_connected(timeout)
        except TimeoutError:
            raise SSCardError("BACKEND_UNAVAILABLE", f"no connection to the broker {cfg.mqtt.host}:"
                                                     f"{cfg.mqtt.port} within {timeout:g} s"
                                                     + (f" ({link.last_error})" if link.last_error else "")
                              ) from None
        yield link
    finally:
        link.stop()
        try:
            async with asyncio.timeout(5.0):
                await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
