"""The settlement journal: one SQLite row per POS ``sale`` or ``sale.void``, and the rules that keep
money from being lost or taken twice (architecture.md, "Rules the whole system keeps";
settlement-domain §1.5, §1.6).

Every state change is one transaction in WAL mode, committed before the method returns; the ones
that matter are synced (``synchronous=FULL``) too: the caller writes ``sent`` before it publishes a
settlement and the outcome before it answers the POS, so a process killed or a machine losing
power at any point leaves a row that says what may have reached the backend. ``received`` and
``pre_settled`` (nothing sent that moves money, nothing final told) and the chip-record mark are
committed without a sync of their own (:data:`LAZY`); the next synced commit makes them durable.
A sale costs two syncs. States (``preview`` sales stop at ``previewed``; voids skip ``pre_settled``)::

    received ──► pre_settled ──► sent ──► settled
        │  │           │ │         │ ├──► refused
        │  │           │ │         │ └──► unknown ──► reversing ──► reversed
        │  │           │ └─► previewed          (retried ↺)
        │  └───────────┴────────► refused
        └─► sent   (sale.void only: no pre-settlement)

- ``unknown``: the answer to the 2102/2103 was lost, late or ambiguous. The reversal (2601) has
  its own ``msgid``, assigned here once and reused on every retry; ``pending_reversals`` hands
  it out with exponential backoff until the backend acknowledges (``reversed``).
- A card with a row in ``sent``, ``unknown`` or ``reversing`` is on hold (:meth:`card_on_hold`):
  that card number only.
- A late answer is recorded as a note (:meth:`note_late_answer`), never acted on.
- ``unfinished`` rows are resumed at start-up: ``received``/``pre_settled`` sent nothing that
  moves money (refuse them), ``sent`` may have (mark unknown → reverse), ``unknown``/``reversing``
  continue their reversal.

A repeated POS request id within 24 hours (:data:`REQUEST_ID_WINDOW`) finds its row: the same
arguments get the stored reply, different ones raise :class:`IdReused` (ID_REUSED). The hash of the
arguments leaves the PIN out (a hash over a 6-digit PIN and known arguments would give the PIN
away by trial), keeping only where it came from. Stored replies and notes pass through
:func:`mask_personal`: no full ID number, no name, no PIN reaches a row.

Amounts are fen (integers). Times are Unix seconds; the settlement day (for reconciliation) is the
backend's ``setl_time`` date, or today in Beijing time, the platform's clock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import structlog

from apdu_specs.identifiers import mask_name, mask_ssn
from sscardd.log import ID_KEYS, REDACTED, SECRET_KEYS, redact_text

if TYPE_CHECKING:
    from sscardd.config import JournalConfig, ReversalConfig

log = structlog.get_logger("sscardd.journal")

REQUEST_ID_WINDOW: Final = 24 * 3600.0  # POS request ids are unique per terminal for 24 hours
BEIJING: Final = timezone(timedelta(hours=8))
MAX_REQUEST_ID = 128
MAX_TEXT = 2000  # error messages, notes


class State(StrEnum):
    """A journal row's state (see the module docstring)."""

    RECEIVED = "received"
    PRE_SETTLED = "pre_settled"
    PREVIEWED = "previewed"
    SENT = "sent"
    SETTLED = "settled"
    REFUSED = "refused"
    UNKNOWN = "unknown"
    REVERSING = "reversing"
    REVERSED = "reversed"
    REVERSAL_REFUSED = "reversal_refused"  # the backend refused the 2601: an operator must look


Op = Literal["sale", "sale.void"]
OPS: Final = ("sale", "sale.void")

_NEXT: Final[Mapping[State, frozenset[State]]] = {
    State.RECEIVED: frozenset({State.PRE_SETTLED, State.SENT, State.REFUSED}),
    State.PRE_SETTLED: frozenset({State.SENT, State.PREVIEWED, State.REFUSED}),
    State.SENT: frozenset({State.SETTLED, State.REFUSED, State.UNKNOWN}),
    State.UNKNOWN: frozenset({State.REVERSING}),
    State.REVERSING: frozenset({State.REVERSING, State.REVERSED, State.REVERSAL_REFUSED}),
}
# Per op: a sale always pre-settles (2101) before it settles; a void has no pre-settlement.
_NOT_FOR_OP: Final[Mapping[str, frozenset[tuple[State, State]]]] = {
    "sale": frozenset({(State.RECEIVED, State.SENT)}),
    "sale.void": frozenset({(State.RECEIVED, State.PRE_SETTLED)}),
}
# reversal_refused is final for the machine (no automatic retry) but keeps its card held.
FINAL_STATES: Final = frozenset({State.PREVIEWED, State.SETTLED, State.REFUSED, State.REVERSED,
                                 State.REVERSAL_REFUSED})
UNFINISHED_STATES: Final = frozenset(State) - FINAL_STATES
# A settlement may have reached the backend and its outcome is not known: its card waits.
HOLD_STATES: Final = frozenset({State.SENT, State.UNKNOWN, State.REVERSING, State.REVERSAL_REFUSED})
REVERSAL_STATES: Final = frozenset({State.UNKNOWN, State.REVERSING})
# States written without a sync of their own: nothing that moves money has been sent yet and
# nobody has been told an outcome. They become durable with the next synced commit; lost in a
# power cut, the row is simply older (or absent) and nothing was at stake. Every other change —
# ``sent`` before the 2102/2103 is published, every outcome before the POS is answered, every
# reversal step — is synced before the method returns. A sale costs two syncs: sent, settled.
LAZY: Final = frozenset({State.RECEIVED, State.PRE_SETTLED})


class JournalError(Exception):
    """The journal cannot do what was asked (texts carry ids and states, never personal data)."""


class IllegalTransition(JournalError):
    """A state change the state machine does not allow; nothing was written."""

    def __init__(self, row_id: int, current: str, wanted: str, why: str = "") -> None:
        self.row_id, self.current, self.wanted = row_id, current, wanted
        super().__init__(f"journal row {row_id}: {current} → {wanted} is not allowed"
                         + (f" ({why})" if why else ""))


class CardOnHold(JournalError):
    """The card has a settlement whose outcome is not known (or whose reversal was refused)."""

    code = "CARD_ON_HOLD"

    def __init__(self, row_id: int, holding_row: int) -> None:
        self.row_id, self.holding_row = row_id, holding_row
        super().__init__(f"journal row {row_id}: its card is held by row {holding_row}")


class IdReused(JournalError):
    """A POS request id seen within 24 hours with different arguments (ID_REUSED)."""

    code = "ID_REUSED"

    def __init__(self, request_id: str, row_id: int) -> None:
        self.request_id, self.row_id = request_id, row_id
        super().__init__(f"request id {request_id!r} was used within 24 hours with other arguments")


class DuplicateMsgid(JournalError):
    """A backend ``msgid`` already used by another message: msgids are idempotency keys."""


class UnknownRow(JournalError):
    """No journal row with that id."""


# --- money and outcomes ------------------------------------------------------------------------------


def _fen(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative integer (fen)")
    return v


@dataclass(frozen=True)
class Amounts:
    """A settlement's amounts in fen, as the backend split them (not recomputed here)."""

    medfee_sumamt: int
    fund_pay_sumamt: int
    acct_pay: int
    psn_cash_pay: int

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _fen(f.name, getattr(self, f.name))


@dataclass(frozen=True)
class Entry:
    """One journal row. ``reply`` is the stored (masked) reply; ``notes`` late answers and retries."""

    id: int
    request_id: str
    args_hash: str
    op: Op
    terminal_id: str
    card_no: str | None
    psn_no: str | None
    state: State
    preview: bool
    created_at: float
    updated_at: float
    msgid_2101: str | None
    msgid: str | None  # the settling message (2102 or 2103): what a reversal names
    infno: str | None
    msgid_2601: str | None
    orig_setl_id: str | None  # sale.void: the settlement it voids
    setl_id: str | None
    mdtrt_id: str | None
    setl_time: str | None
    setl_date: str | None
    insutype: str | None
    clr_type: str | None
    amounts: Amounts | None
    attempts: int  # reversal attempts published
    next_retry_at: float | None
    error_code: str | None
    error_message: str | None
    reply: dict[str, Any] | None
    chip_record: Literal["pending", "written"] | None
    chip_data: dict[str, Any] | None
    notes: tuple[dict[str, Any], ...]

    @property
    def refund(self) -> bool:
        """Whether this row refunds a settlement (a void): refd_setl_flag 1."""
        return self.op == "sale.void"

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(frozen=True)
class Begun:
    """What :meth:`Journal.begin` found: a new row (``created``) or the one this request id has."""

    entry: Entry
    created: bool


@dataclass(frozen=True)
class Detail:
    """One settled sale of a period, as 3202 compares it (keyed by the 2102 ``msgid``)."""

    msgid: str
    setl_id: str
    mdtrt_id: str | None
    setl_time: str | None
    setl_date: str
    terminal_id: str
    insutype: str | None
    clr_type: str | None
    amounts: Amounts
    refd_setl_flag: Literal["0", "1"]  # "1": voided since (by a settled sale.void of this terminal)
    void_msgid: str | None


@dataclass(frozen=True)
class Totals:
    """Aggregates for 3201: count and sums in fen."""

    count: int = 0
    medfee_sumamt: int = 0
    fund_pay_sumamt: int = 0
    acct_pay: int = 0
    psn_cash_pay: int = 0

    def plus(self, a: Amounts) -> Totals:
        return Totals(self.count + 1, self.medfee_sumamt + a.medfee_sumamt,
                      self.fund_pay_sumamt + a.fund_pay_sumamt, self.acct_pay + a.acct_pay,
                      self.psn_cash_pay + a.psn_cash_pay)


# --- what may be stored ---------------------------------------------------------------------------------

# ``*_name`` keys that name things, not people; every other ``name``/``*_name`` is masked (fail
# closed: an unknown field is treated as a person's name).
NON_PERSON_NAME_KEYS: Final = frozenset({
    "fixmedins_name", "fund_pay_type_name", "med_list_name", "medins_list_name", "item_name",
    "drug_name", "dise_name", "insutype_name", "med_type_name", "clr_type_name", "chrgitm_lv_name",
    "med_chrgitm_type_name", "setl_optins_name", "admdvs_name", "reader_name",
})


def _mask(key: str, value: Any) -> Any:
    k = key.lower()
    if k in SECRET_KEYS or k.endswith("_pin") or k.endswith("password"):
        return REDACTED
    if isinstance(value, dict):
        return {str(kk): _mask(str(kk), vv) for kk, vv in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(key, v) for v in value]
    if isinstance(value, str):
        if k in ID_KEYS:
            return mask_ssn(value)
        if (k == "name" or k.endswith("_name")) and k not in NON_PERSON_NAME_KEYS:
            return mask_name(value)
        return redact_text(value)
    if isinstance(value, int) and not isinstance(value, bool):
        # An ID number sent as a JSON number.
        if k in ID_KEYS:
            return mask_ssn(str(value))
        masked = redact_text(str(value))
        return masked if masked != str(value) else value
    return value


def mask_personal(payload: Mapping[str, Any]) -> dict[str, Any]:
    """``payload`` fit for the journal: 18-character ID numbers masked wherever they appear
    (``3702**********1237``), ``name`` and person ``*_name`` fields masked (``张*``), PINs,
    PIN blocks, passwords and keys replaced by ``***``."""
    out = _mask("", dict(payload))
    assert isinstance(out, dict)
    return out


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)


def args_hash(op: str, args: Mapping[str, Any]) -> str:
    """The fingerprint of a POS request's arguments for ID_REUSED detection. The PIN, a PIN block and
    other secrets are left out (only the PIN's source counts): a retried sale with a freshly
    enciphered PIN block is the same request."""
    def strip(key: str, v: Any) -> Any:
        k = key.lower()
        if k == "pin" and isinstance(v, dict):
            return {"source": v.get("source")}
        if k in SECRET_KEYS or k.endswith("_pin") or k.endswith("password"):
            return None
        if isinstance(v, dict):
            return {str(kk): strip(str(kk), vv) for kk, vv in v.items()}
        if isinstance(v, list | tuple):
            return [strip(key, x) for x in v]
        return v

    try:
        body = _dumps(strip("", dict(args)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"arguments are not plain JSON: {type(exc).__name__}") from None
    return hashlib.sha256(f"sscardd-args/1\x00{op}\x00{body}".encode()).hexdigest()


def _check_no_id(what: str, value: str | None) -> str | None:
    if value is not None and redact_text(value) != value:
        raise ValueError(f"{what} looks like an ID number; the journal keeps none")
    return value


def _short(text: str) -> str:
    text = redact_text(text)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _day(value: str) -> str:
    if not isinstance(value, str) or not _DATE.fullmatch(value):
        raise ValueError("a date is yyyy-MM-dd")
    date.fromisoformat(value)
    return value


# --- schema -------------------------------------------------------------------------------------------

# MIGRATIONS[i] takes the schema from version i to i + 1, one transaction each. Append, never edit.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE txn (
            id INTEGER PRIMARY KEY,
            request_id TEXT NOT NULL,
            args_hash TEXT NOT NULL,
            op TEXT NOT NULL CHECK (op IN ('sale', 'sale.void')),
            terminal_id TEXT NOT NULL,
            card_no TEXT,
            psn_no TEXT,
            state TEXT NOT NULL CHECK (state IN ('received', 'pre_settled', 'previewed', 'sent',
                'settled', 'refused', 'unknown', 'reversing', 'reversed', 'reversal_refused')),
            preview INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            msgid_2101 TEXT,
            msgid TEXT,
            infno TEXT,
            msgid_2601 TEXT,
            orig_setl_id TEXT,
            setl_id TEXT,
            mdtrt_id TEXT,
            setl_time TEXT,
            setl_date TEXT,
            insutype TEXT,
            clr_type TEXT,
            medfee_sumamt INTEGER CHECK (medfee_sumamt >= 0),
            fund_pay_sumamt INTEGER CHECK (fund_pay_sumamt >= 0),
            acct_pay INTEGER CHECK (acct_pay >= 0),
            psn_cash_pay INTEGER CHECK (psn_cash_pay >= 0),
            attempts INTEGER NOT NULL DEFAULT 0,
            next_retry_at REAL,
            error_code TEXT,
            error_message TEXT,
            reply TEXT,
            chip_record TEXT CHECK (chip_record IN ('pending', 'written')),
            chip_data TEXT,
            notes TEXT NOT NULL DEFAULT '[]'
        )""",
        "CREATE INDEX txn_request ON txn (terminal_id, request_id, created_at)",
        "CREATE INDEX txn_state ON txn (state, next_retry_at)",
        "CREATE INDEX txn_card ON txn (card_no, state)",
        "CREATE INDEX txn_setl ON txn (setl_id)",
        "CREATE INDEX txn_void ON txn (orig_setl_id)",
        "CREATE INDEX txn_setl_date ON txn (setl_date)",
        # Every backend message id this terminal used, whatever its infno: one namespace, because a
        # msgid is the backend's idempotency key.
        """CREATE TABLE message (
            msgid TEXT PRIMARY KEY,
            txn_id INTEGER NOT NULL REFERENCES txn (id),
            infno TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
    ),
)

SCHEMA_VERSION: Final = len(MIGRATIONS)

_ROW_COLUMNS = frozenset({
    "state", "updated_at", "msgid_2101", "msgid", "infno", "msgid_2601", "setl_id", "mdtrt_id",
    "setl_time", "setl_date", "insutype", "clr_type", "medfee_sumamt", "fund_pay_sumamt", "acct_pay",
    "psn_cash_pay", "attempts", "next_retry_at", "error_code", "error_message", "reply", "chip_record",
    "chip_data", "notes", "card_no", "psn_no",
})


def _entry(r: sqlite3.Row) -> Entry:
    amounts = None
    if r["medfee_sumamt"] is not None:
        amounts = Amounts(r["medfee_sumamt"], r["fund_pay_sumamt"], r["acct_pay"], r["psn_cash_pay"])
    return Entry(
        id=r["id"], request_id=r["request_id"], args_hash=r["args_hash"], op=r["op"],
        terminal_id=r["terminal_id"], card_no=r["card_no"], psn_no=r["psn_no"], state=State(r["state"]),
        preview=bool(r["preview"]), created_at=r["created_at"], updated_at=r["updated_at"],
        msgid_2101=r["msgid_2101"], msgid=r["msgid"], infno=r["infno"], msgid_2601=r["msgid_2601"],
        orig_setl_id=r["orig_setl_id"], setl_id=r["setl_id"], mdtrt_id=r["mdtrt_id"],
        setl_time=r["setl_time"], setl_date=r["setl_date"], insutype=r["insutype"], clr_type=r["clr_type"],
        amounts=amounts, attempts=r["attempts"], next_retry_at=r["next_retry_at"],
        error_code=r["error_code"], error_message=r["error_message"],
        reply=json.loads(r["reply"]) if r["reply"] is not None else None,
        chip_record=r["chip_record"],
        chip_data=json.loads(r["chip_data"]) if r["chip_data"] is not None else None,
        notes=tuple(json.loads(r["notes"])),
    )


def _amount_columns(a: Amounts | None) -> dict[str, Any]:
    if a is None:
        return {}
    return {"medfee_sumamt": a.medfee_sumamt, "fund_pay_sumamt": a.fund_pay_sumamt,
            "acct_pay": a.acct_pay, "psn_cash_pay": a.psn_cash_pay}


# --- the journal ----------------------------------------------------------------------------------------


class Journal:
    """The settlement journal in the SQLite file ``path`` (created 0600 if missing).

    Thread-safe (one connection, one lock); several ``Journal`` objects or processes may share a
    file (WAL; writers wait up to ``busy_timeout`` seconds for each other). Every method that
    changes a row commits durably before it returns.
    """

    def __init__(self, path: str | os.PathLike[str], *, sync: Literal["full", "extra"] = "full",
                 busy_timeout: float = 5.0, backoff_min: float = 1.0, backoff_max: float = 60.0,
                 jitter: float = 0.2, rng: random.Random | None = None) -> None:
        if sync not in ("full", "extra"):
            raise ValueError("sync must be 'full' or 'extra'")
        if not 0 <= jitter < 1 or backoff_min <= 0 or backoff_max < backoff_min:
            raise ValueError("bad backoff parameters")
        self.path = Path(path)
        self.sync = sync
        self.backoff_min, self.backoff_max, self.jitter = backoff_min, backoff_max, jitter
        self._rng = rng or random.Random()
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The rows name cards and amounts: only the daemon's user reads them. SQLite gives the -wal
        # and -shm files the database file's mode.
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))
        self._db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None,
                                   check_same_thread=False)
        try:
            self._db.row_factory = sqlite3.Row
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JournalError(f"{self.path}: SQLite cannot use WAL here (journal_mode {mode})")
            self._db.execute(f"PRAGMA synchronous={sync.upper()}")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA trusted_schema=OFF")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def from_config(cls, journal: JournalConfig, reversal: ReversalConfig) -> Journal:
        """From :class:`sscardd.config.JournalConfig` and :class:`~sscardd.config.ReversalConfig`."""
        return cls(journal.path, sync=journal.sync, busy_timeout=journal.busy_timeout,
                   backoff_min=reversal.backoff_min, backoff_max=reversal.backoff_max)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------------

    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction. BEGIN IMMEDIATE takes the write lock up front: a transaction that
        starts reading and later writes could fail with SQLITE_BUSY, which busy_timeout cannot
        wait out.

        ``durable`` False commits without syncing (``synchronous=NORMAL`` for this transaction):
        in WAL mode such a commit stays in order and becomes durable with the next synced commit,
        which syncs the whole WAL. Only states that moved no money and told nobody anything final
        are written so (see :data:`LAZY`)."""
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            finally:
                if not durable:
                    self._db.execute(f"PRAGMA synchronous={self.sync.upper()}")

    def _migrate(self) -> None:
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (0)")
                version = 0
            else:
                version = int(row[0])
        if version > len(MIGRATIONS):
            raise JournalError(f"{self.path}: schema version {version} is newer than this sscardd "
                               f"({len(MIGRATIONS)})")
        for target in range(version + 1, len(MIGRATIONS) + 1):
            with self._write() as db:
                # Re-read under the write lock: another process may have migrated meanwhile.
                if int(db.execute("SELECT version FROM schema_version").fetchone()[0]) >= target:
                    continue
                for statement in MIGRATIONS[target - 1]:
                    db.execute(statement)
                db.execute("UPDATE schema_version SET version = ?", (target,))

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT version FROM schema_version").fetchone()[0])

    def _row(self, db: sqlite3.Connection, row_id: int) -> sqlite3.Row:
        r = db.execute("SELECT * FROM txn WHERE id = ?", (row_id,)).fetchone()
        if r is None:
            raise UnknownRow(f"no journal row {row_id}")
        return r  # type: ignore[no-any-return]

    def _add_msgid(self, db: sqlite3.Connection, row_id: int, msgid: str, infno: str, now: float) -> None:
        if not isinstance(msgid, str) or not msgid or len(msgid) > 64:
            raise ValueError("a msgid is a non-empty string of at most 64 characters")
        if not isinstance(infno, str) or not re.fullmatch(r"[0-9]{4}", infno):
            raise ValueError("an infno is 4 digits")
        try:
            db.execute("INSERT INTO message (msgid, txn_id, infno, created_at) VALUES (?, ?, ?, ?)",
                       (msgid, row_id, infno, now))
        except sqlite3.IntegrityError:
            raise DuplicateMsgid(f"msgid {msgid} is already used") from None

    def _transition(self, row_id: int, to: State, now: float | None, *,
                    msgids: Sequence[tuple[str, str]] = (),
                    more: Callable[[sqlite3.Row, float], Mapping[str, Any]] | None = None,
                    **columns: Any) -> Entry:
        """Check and apply one state change in one transaction (synced unless ``to`` is in
        :data:`LAZY`). ``more`` computes further columns from the current row inside that
        transaction (attempt counters, notes)."""
        now = time.time() if now is None else now
        with self._write(durable=to not in LAZY) as db:
            r = self._row(db, row_id)
            cur = State(r["state"])
            if to not in _NEXT.get(cur, frozenset()) or (cur, to) in _NOT_FOR_OP[r["op"]]:
                raise IllegalTransition(row_id, cur, to, r["op"])
            if more is not None:
                columns.update(more(r, now))
            for msgid, infno in msgids:
                self._add_msgid(db, row_id, msgid, infno, now)
            columns.update(state=str(to), updated_at=now)
            assert set(columns) <= _ROW_COLUMNS, set(columns) - _ROW_COLUMNS
            sets = ", ".join(f"{c} = ?" for c in columns)
            db.execute(f"UPDATE txn SET {sets} WHERE id = ?", (*columns.values(), row_id))
            entry = _entry(self._row(db, row_id))
        log.debug("journal.state", row=row_id, op=entry.op, frm=str(cur), to=str(to))
        return entry

    def _backoff(self, attempts: int) -> float:
        delay = min(self.backoff_max, self.backoff_min * 2.0 ** min(max(attempts - 1, 0), 60))
        return delay * (1.0 - self.jitter * self._rng.random())

    # -- writing ---------------------------------------------------------------------------------

    def begin(self, request_id: str, op: Op, args: Mapping[str, Any], *, terminal_id: str,
              card_no: str | None = None, psn_no: str | None = None, preview: bool = False,
              orig_setl_id: str | None = None, now: float | None = None) -> Begun:
        """Record a POS ``sale``/``sale.void`` as ``received``, or find the row its request id already
        has (within 24 hours): same arguments → that row (``created`` False: answer from it),
        other arguments → :class:`IdReused`. Check and insert are one transaction, so two
        deliveries of one request cannot both start. A void names ``orig_setl_id``; its card
        number, when not given, is taken from the voided sale in this journal (for the hold)."""
        if op not in OPS:
            raise ValueError(f"op must be one of {', '.join(OPS)}")
        if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_REQUEST_ID:
            raise ValueError(f"a request id is a non-empty string of at most {MAX_REQUEST_ID} characters")
        if op == "sale.void" and not orig_setl_id:
            raise ValueError("a void names the settlement it voids (orig_setl_id)")
        _check_no_id("psn_no", psn_no)
        _check_no_id("card_no", card_no)
        digest = args_hash(op, args)
        now = time.time() if now is None else now
        with self._write(durable=False) as db:  # received: nothing sent, nothing told (LAZY)
            r = db.execute("SELECT * FROM txn WHERE terminal_id = ? AND request_id = ? AND created_at > ?"
                           " ORDER BY created_at DESC, id DESC LIMIT 1",
                           (terminal_id, request_id, now - REQUEST_ID_WINDOW)).fetchone()
            if r is not None:
                if r["args_hash"] != digest:
                    raise IdReused(request_id, r["id"])
                return Begun(_entry(r), created=False)
            if op == "sale.void" and card_no is None:
                orig = db.execute("SELECT card_no FROM txn WHERE op = 'sale' AND state = 'settled'"
                                  " AND setl_id = ? ORDER BY id DESC LIMIT 1", (orig_setl_id,)).fetchone()
                card_no = orig["card_no"] if orig is not None else None
            cur = db.execute(
                "INSERT INTO txn (request_id, args_hash, op, terminal_id, card_no, psn_no, state, preview,"
                " created_at, updated_at, orig_setl_id) VALUES (?, ?, ?, ?, ?, ?, 'received', ?, ?, ?, ?)",
                (request_id, digest, op, terminal_id, card_no, psn_no, int(preview), now, now, orig_setl_id))
            assert cur.lastrowid is not None
            entry = _entry(self._row(db, cur.lastrowid))
        log.debug("journal.begin", row=entry.id, op=op, request_id=request_id)
        return Begun(entry, created=True)

    def mark_pre_settled(self, row_id: int, *, msgid_2101: str, amounts: Amounts | None = None,
                         card_no: str | None = None, psn_no: str | None = None,
                         now: float | None = None) -> Entry:
        """received → pre_settled: the 2101 answered (its amounts, the card read by now)."""
        extra: dict[str, Any] = _amount_columns(amounts)
        if card_no is not None:
            extra["card_no"] = _check_no_id("card_no", card_no)
        if psn_no is not None:
            extra["psn_no"] = _check_no_id("psn_no", psn_no)
        return self._transition(row_id, State.PRE_SETTLED, now, msgids=[(msgid_2101, "2101")],
                                msgid_2101=msgid_2101, **extra)

    def mark_previewed(self, row_id: int, *, reply: Mapping[str, Any] | None = None,
                       now: float | None = None) -> Entry:
        """pre_settled → previewed: a ``preview`` sale ends after its 2101."""
        return self._transition(row_id, State.PREVIEWED, now, **self._reply_column(reply))

    def mark_sent(self, row_id: int, *, msgid: str, infno: Literal["2102", "2103"],
                  now: float | None = None) -> Entry:
        """→ sent, durably, BEFORE the 2102/2103 is published. ``msgid`` is what a reversal names."""
        if infno not in ("2102", "2103"):
            raise ValueError("a settlement is sent as 2102 (sale) or 2103 (void)")

        def check(r: sqlite3.Row, _now: float) -> Mapping[str, Any]:
            if (r["op"] == "sale") != (infno == "2102"):
                raise ValueError(f"{r['op']} is settled with {'2102' if r['op'] == 'sale' else '2103'}")
            if r["card_no"]:
                # The hold is checked in the same transaction that marks this row sent, so two
                # sales of one card can never both be in flight.
                marks = ", ".join("?" for _ in HOLD_STATES)
                other = self._db.execute(
                    f"SELECT id FROM txn WHERE card_no = ? AND id != ? AND state IN ({marks}) LIMIT 1",
                    (r["card_no"], row_id, *sorted(HOLD_STATES))).fetchone()
                if other is not None:
                    raise CardOnHold(row_id, int(other[0]))
            return {}

        return self._transition(row_id, State.SENT, now, msgids=[(msgid, infno)], more=check,
                                msgid=msgid, infno=infno)

    def mark_settled(self, row_id: int, *, setl_id: str, amounts: Amounts, mdtrt_id: str | None = None,
                     setl_time: str | None = None, insutype: str | None = None, clr_type: str | None = None,
                     chip_data: Mapping[str, Any] | None = None, reply: Mapping[str, Any] | None = None,
                     now: float | None = None) -> Entry:
        """sent → settled, with the outcome and (for a sale) the chip record still to write
        (``chip_data``: what the DF04/EF08 record needs; ``pending`` until :meth:`mark_chip_written`).
        Commit before answering the POS."""
        if not isinstance(setl_id, str) or not setl_id:
            raise ValueError("setl_id is required")
        now = time.time() if now is None else now
        day = setl_time[:10] if isinstance(setl_time, str) and _DATE.fullmatch(setl_time[:10]) else \
            datetime.fromtimestamp(now, BEIJING).date().isoformat()
        cols: dict[str, Any] = {"setl_id": setl_id, "mdtrt_id": mdtrt_id, "setl_time": setl_time,
                                "setl_date": day, "insutype": insutype, "clr_type": clr_type,
                                **_amount_columns(amounts), **self._reply_column(reply)}
        if chip_data is not None:
            cols.update(chip_record="pending", chip_data=_dumps(mask_personal(chip_data)))
        return self._transition(row_id, State.SETTLED, now, **cols)

    def mark_refused(self, row_id: int, *, code: str, message: str = "",
                     reply: Mapping[str, Any] | None = None, now: float | None = None) -> Entry:
        """→ refused (by the backend, or locally before anything was settled)."""
        return self._transition(row_id, State.REFUSED, now, error_code=code, error_message=_short(message),
                                **self._reply_column(reply))

    def mark_unknown(self, row_id: int, *, reversal_msgid: str, reason: str = "",
                     reply: Mapping[str, Any] | None = None, now: float | None = None) -> Entry:
        """sent → unknown: no answer in time, or an ambiguous failure. Queues the reversal under its
        own ``msgid`` (the same on every retry), due at once; the card is held until reversed."""
        now = time.time() if now is None else now
        return self._transition(row_id, State.UNKNOWN, now, msgids=[(reversal_msgid, "2601")],
                                msgid_2601=reversal_msgid, next_retry_at=now, error_code="OUTCOME_UNKNOWN",
                                error_message=_short(reason), **self._reply_column(reply))

    def mark_reversing(self, row_id: int, *, note: str = "", now: float | None = None) -> Entry:
        """unknown/reversing → reversing, BEFORE each publish of the 2601: counts the attempt and sets
        when the next one is due (exponential backoff with jitter) should this one go unanswered."""
        def attempt(r: sqlite3.Row, now: float) -> Mapping[str, Any]:
            attempts = int(r["attempts"]) + 1
            cols: dict[str, Any] = {"attempts": attempts, "next_retry_at": now + self._backoff(attempts)}
            if note:
                cols["notes"] = self._with_note(r, {"at": now, "kind": "reversal_attempt",
                                                    "note": _short(note)})
            return cols

        return self._transition(row_id, State.REVERSING, now, more=attempt)

    def mark_reversed(self, row_id: int, *, note: str = "", now: float | None = None) -> Entry:
        """reversing → reversed: the backend acknowledged the 2601 (or its tombstone). The hold ends."""
        def noted(r: sqlite3.Row, now: float) -> Mapping[str, Any]:
            if not note:
                return {}
            return {"notes": self._with_note(r, {"at": now, "kind": "reversed", "note": _short(note)})}

        return self._transition(row_id, State.REVERSED, now, more=noted, next_retry_at=None)

    def mark_reversal_refused(self, row_id: int, *, code: str, note: str = "",
                              now: float | None = None) -> Entry:
        """reversing → reversal_refused: the backend refused the 2601 (e.g. REVERSAL_CONFLICT,
        NOT_REVERSIBLE). No automatic retry; the card stays held until an operator resolves it."""
        def noted(r: sqlite3.Row, now: float) -> Mapping[str, Any]:
            return {"notes": self._with_note(r, {"at": now, "kind": "reversal_refused",
                                                 "note": _short(note)})} if note else {}

        return self._transition(row_id, State.REVERSAL_REFUSED, now, more=noted, next_retry_at=None,
                                error_code=_short(code))

    def mark_chip_written(self, row_id: int, *, reply: Mapping[str, Any] | None = None,
                          now: float | None = None) -> Entry:
        """The settlement's DF04/EF08 record is on the chip now (pending → written), with the reply
        that says so. Not synced by itself (the sale's outcome already is): a power cut before
        the next synced commit can leave it ``pending``, and the record is then written once more
        the next time the card is seen (it carries the row's number, so the twin is recognisable)."""
        now = time.time() if now is None else now
        with self._write(durable=False) as db:
            r = self._row(db, row_id)
            if r["state"] != State.SETTLED or r["chip_record"] != "pending":
                raise IllegalTransition(row_id, f"{r['state']}/chip {r['chip_record']}", "chip written")
            cols = {"chip_record": "written", "updated_at": now, **self._reply_column(reply)}
            sets = ", ".join(f"{c} = ?" for c in cols)
            db.execute(f"UPDATE txn SET {sets} WHERE id = ?", (*cols.values(), row_id))
            return _entry(self._row(db, row_id))

    def store_reply(self, row_id: int, reply: Mapping[str, Any], *,
                    now: float | None = None) -> dict[str, Any]:
        """Store the reply a repeated POS request id gets (masked: see :func:`mask_personal`); returns
        what was stored."""
        masked = mask_personal(reply)
        now = time.time() if now is None else now
        with self._write() as db:
            self._row(db, row_id)
            db.execute("UPDATE txn SET reply = ?, updated_at = ? WHERE id = ?", (_dumps(masked), now, row_id))
        return masked

    def note_late_answer(self, msgid: str, *, infcode: int | str | None = None,
                         summary: Mapping[str, Any] | None = None, now: float | None = None) -> Entry | None:
        """Record an answer that came after its row stopped waiting (unknown, reversing, reversed, or
        already final): a note on the row, no state change. None if the msgid is not ours."""
        now = time.time() if now is None else now
        with self._write() as db:
            m = db.execute("SELECT txn_id, infno FROM message WHERE msgid = ?", (msgid,)).fetchone()
            if m is None:
                return None
            r = self._row(db, m["txn_id"])
            note = {"at": now, "kind": "late_answer", "msgid": msgid, "infno": m["infno"],
                    "state": r["state"], "infcode": infcode, "summary": mask_personal(summary or {})}
            db.execute("UPDATE txn SET notes = ?, updated_at = ? WHERE id = ?",
                       (self._with_note(r, note), now, r["id"]))
            entry = _entry(self._row(db, r["id"]))
        log.info("journal.late_answer", row=entry.id, msgid=msgid, state=str(entry.state))
        return entry

    @staticmethod
    def _with_note(r: sqlite3.Row, note: Mapping[str, Any]) -> str:
        notes = json.loads(r["notes"])
        notes.append(mask_personal(note))
        return _dumps(notes[-50:])  # a row that keeps getting late answers stays bounded

    @staticmethod
    def _reply_column(reply: Mapping[str, Any] | None) -> dict[str, Any]:
        return {} if reply is None else {"reply": _dumps(mask_personal(reply))}

    # -- reading ---------------------------------------------------------------------------------

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Entry]:
        with self._lock:
            return [_entry(r) for r in self._db.execute(sql, args).fetchall()]

    def get(self, row_id: int) -> Entry:
        """The row ``row_id`` (:class:`UnknownRow` if none)."""
        with self._lock:
            return _entry(self._row(self._db, row_id))

    def get_by_request_id(self, terminal_id: str, request_id: str, *,
                          now: float | None = None) -> Entry | None:
        """The row of this POS request id within the last 24 hours, if any."""
        now = time.time() if now is None else now
        rows = self._query("SELECT * FROM txn WHERE terminal_id = ? AND request_id = ? AND created_at > ?"
                           " ORDER BY created_at DESC, id DESC LIMIT 1",
                           (terminal_id, request_id, now - REQUEST_ID_WINDOW))
        return rows[0] if rows else None

    def find_by_msgid(self, msgid: str) -> Entry | None:
        """The row that used ``msgid`` for any of its messages (2101, 2102/2103, 2601)."""
        rows = self._query("SELECT txn.* FROM message JOIN txn ON txn.id = message.txn_id"
                           " WHERE message.msgid = ?", (msgid,))
        return rows[0] if rows else None

    def find_settled_sale(self, setl_id: str) -> Entry | None:
        """The settled sale with this ``setl_id`` (what a void names), if this journal has it."""
        rows = self._query("SELECT * FROM txn WHERE op = 'sale' AND state = 'settled' AND setl_id = ?"
                           " ORDER BY id DESC LIMIT 1", (setl_id,))
        return rows[0] if rows else None

    def pending_reversals(self, *, now: float | None = None) -> list[Entry]:
        """Rows whose reversal is due now (unknown, or reversing past its backoff), oldest due first."""
        now = time.time() if now is None else now
        return self._query("SELECT * FROM txn WHERE state IN ('unknown', 'reversing') AND next_retry_at <= ?"
                           " ORDER BY next_retry_at, id", (now,))

    def next_reversal_due(self) -> float | None:
        """When the next reversal is due (Unix time), for the retry loop's sleep."""
        with self._lock:
            r = self._db.execute("SELECT min(next_retry_at) FROM txn"
                                 " WHERE state IN ('unknown', 'reversing')").fetchone()
        return None if r[0] is None else float(r[0])

    def refused_reversals(self) -> list[Entry]:
        """Rows whose reversal the backend refused: their cards stay held until an operator acts."""
        return self._query("SELECT * FROM txn WHERE state = 'reversal_refused' ORDER BY id")

    def unfinished(self) -> list[Entry]:
        """Rows to resume at start-up (every non-final state), oldest first."""
        marks = ", ".join("?" for _ in UNFINISHED_STATES)
        return self._query(f"SELECT * FROM txn WHERE state IN ({marks}) ORDER BY id",
                           sorted(UNFINISHED_STATES))

    def card_on_hold(self, card_no: str) -> bool:
        """Whether ``card_no`` has a settlement whose outcome is not known yet (sent, unknown,
        reversing): new sales for that card wait. Other cards are not affected."""
        marks = ", ".join("?" for _ in HOLD_STATES)
        with self._lock:
            r = self._db.execute(f"SELECT 1 FROM txn WHERE card_no = ? AND state IN ({marks}) LIMIT 1",
                                 (card_no, *sorted(HOLD_STATES))).fetchone()
        return r is not None

    def card_state(self, card_no: str) -> tuple[bool, list[Entry]]:
        """:meth:`card_on_hold` and :meth:`pending_chip_records` in one call (one thread hop)."""
        with self._lock:
            return self.card_on_hold(card_no), self.pending_chip_records(card_no)

    def pending_chip_records(self, card_no: str) -> list[Entry]:
        """Settlements of ``card_no`` whose chip record is still to be written, oldest first."""
        return self._query("SELECT * FROM txn WHERE card_no = ? AND state = 'settled'"
                           " AND chip_record = 'pending' ORDER BY id", (card_no,))

    def counts(self) -> dict[str, int]:
        """Rows per state (for daemon.status: backlog, pending reversals)."""
        with self._lock:
            rows = self._db.execute("SELECT state, count(*) FROM txn GROUP BY state").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def details(self, begin: str, end: str, *, terminal_id: str | None = None) -> list[Detail]:
        """The settled sales with a settlement day from ``begin`` to ``end`` (yyyy-MM-dd, inclusive),
        for 3202: one per 2102 ``msgid``; ``refd_setl_flag`` "1" when a settled void of this journal
        refunds it (the backend simulator's convention: a voided settlement keeps its msgid and
        turns to refund)."""
        b, e = _day(begin), _day(end)
        sql = ("SELECT s.*, (SELECT v.msgid FROM txn v WHERE v.op = 'sale.void' AND v.state = 'settled'"
               " AND v.orig_setl_id = s.setl_id ORDER BY v.id LIMIT 1) AS void_msgid"
               " FROM txn s WHERE s.op = 'sale' AND s.state = 'settled' AND s.setl_date BETWEEN ? AND ?")
        args: list[Any] = [b, e]
        if terminal_id is not None:
            sql += " AND s.terminal_id = ?"
            args.append(terminal_id)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY s.setl_date, s.id", args).fetchall()
        out = []
        for r in rows:
            entry = _entry(r)
            assert entry.msgid is not None and entry.setl_id is not None and entry.amounts is not None
            out.append(Detail(
                msgid=entry.msgid, setl_id=entry.setl_id, mdtrt_id=entry.mdtrt_id, setl_time=entry.setl_time,
                setl_date=str(entry.setl_date), terminal_id=entry.terminal_id, insutype=entry.insutype,
                clr_type=entry.clr_type, amounts=entry.amounts,
                refd_setl_flag="1" if r["void_msgid"] is not None else "0", void_msgid=r["void_msgid"]))
        return out

    def totals(self, begin: str, end: str, *, terminal_id: str | None = None) -> dict[str, Totals]:
        """For 3201: the period's settled sales split by refund flag — ``"0"`` standing, ``"1"``
        voided since — with count, medfee_sumamt, fund_pay_sumamt, acct_pay, psn_cash_pay (fen)."""
        out = {"0": Totals(), "1": Totals()}
        for d in self.details(begin, end, terminal_id=terminal_id):
            out[d.refd_setl_flag] = out[d.refd_setl_flag].plus(d.amounts)
        return out

    # -- maintenance -----------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Fold the WAL back into the database file (at a quiet moment; SQLite also does it itself)."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
