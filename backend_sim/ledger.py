"""The ledger: one SQLite file (WAL) shared by every backend instance, and the transactions.

:meth:`Ledger.handle` takes a request exactly as it came off MQTT (the terminal id from the topic
and the payload bytes) and returns the answer. Each request is one ``BEGIN IMMEDIATE``
transaction: the idempotency lookup, the checks, the booking and the stored answer commit together
(``synchronous=FULL``), so a request delivered twice — to this instance or another one — is
processed once and answered from the stored result ever after.

The ledger never goes negative: a ``CHECK (balance_fen >= 0)`` stands behind the rules.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from apdu_specs import crypto, identifiers, sale_auth
from apdu_specs.crypto import Algorithm
from apdu_specs.keyfile import KeyFileError, RootKeys
from backend_sim import envelope as env_mod
from backend_sim.envelope import Envelope, fmt_time, now_beijing
from backend_sim.errors import Refusal
from backend_sim.money import MoneyError, parse_yuan, ratio_str, yuan
from backend_sim.seed import Policy, Seed
from backend_sim.split import CHRGITM_LV, Line, Split, split

SCHEMA_VERSION = "1"
MAX_LINES = 200
MAX_PAGE_SIZE = 1000
REVERSIBLE = ("2101", "2102", "2103")
PW_ITERATIONS = 10_000  # a simulator: cheap enough to seed many ledgers in tests
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_FEEDETL = re.compile(r"^[0-9A-Za-z_-]{1,30}$")
_PW_OK = re.compile(r"^[\x21-\x7e]{8,20}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counter (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS institution (
    code TEXT PRIMARY KEY, name TEXT NOT NULL, type TEXT NOT NULL, region TEXT NOT NULL,
    status TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS terminal (
    terminal_id TEXT PRIMARY KEY, institution_code TEXT NOT NULL REFERENCES institution(code));
CREATE TABLE IF NOT EXISTS person (
    psn_no TEXT PRIMARY KEY, ssn TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
    card_no TEXT NOT NULL UNIQUE, card_sn BLOB,
    balance_fen INTEGER NOT NULL CHECK (balance_fen >= 0),
    status TEXT NOT NULL, insured_region TEXT NOT NULL, cross_region_filing INTEGER NOT NULL,
    activated INTEGER NOT NULL, pw_salt BLOB NOT NULL, pw_hash BLOB NOT NULL,
    pw_failures INTEGER NOT NULL DEFAULT 0, pw_locked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS item (
    code TEXT PRIMARY KEY, name TEXT NOT NULL, cls TEXT NOT NULL, medical INTEGER NOT NULL,
    first_selfpay_bp INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS message (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    terminal_id TEXT NOT NULL, msgid TEXT NOT NULL, infno TEXT, body_hash TEXT NOT NULL,
    infcode INTEGER NOT NULL, err_code TEXT, answer TEXT NOT NULL, processed_at TEXT NOT NULL,
    instance TEXT NOT NULL, UNIQUE (terminal_id, msgid));
CREATE TABLE IF NOT EXISTS tombstone (
    terminal_id TEXT NOT NULL, omsgid TEXT NOT NULL, oinfno TEXT NOT NULL,
    reversal_msgid TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (terminal_id, omsgid));
CREATE TABLE IF NOT EXISTS settlement (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    setl_id TEXT NOT NULL UNIQUE, mdtrt_id TEXT NOT NULL UNIQUE,
    terminal_id TEXT NOT NULL, msgid TEXT NOT NULL, institution_code TEXT NOT NULL,
    psn_no TEXT NOT NULL, setl_time TEXT NOT NULL, setl_date TEXT NOT NULL,
    medfee_fen INTEGER NOT NULL, fund_fen INTEGER NOT NULL, acct_fen INTEGER NOT NULL,
    cash_fen INTEGER NOT NULL, balc_after_fen INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('settled', 'voided', 'reversed')),
    void_terminal TEXT, void_msgid TEXT, void_time TEXT, reversal_msgid TEXT,
    detail TEXT NOT NULL, UNIQUE (terminal_id, msgid));
CREATE INDEX IF NOT EXISTS settlement_date ON settlement (institution_code, setl_date);
CREATE TABLE IF NOT EXISTS account_entry (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, psn_no TEXT NOT NULL, delta_fen INTEGER NOT NULL,
    balance_after_fen INTEGER NOT NULL CHECK (balance_after_fen >= 0), reason TEXT NOT NULL,
    setl_id TEXT NOT NULL, msgid TEXT NOT NULL, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fault (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, infno TEXT, terminal_id TEXT,
    remaining INTEGER NOT NULL, seconds REAL NOT NULL DEFAULT 0, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS held (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, terminal_id TEXT NOT NULL,
    msgid TEXT, infno TEXT, instance TEXT NOT NULL, held_at TEXT NOT NULL,
    released INTEGER NOT NULL DEFAULT 0);
"""

_ROW_COLUMNS = ("msgid, terminal_id, setl_id, mdtrt_id, psn_no, setl_time, medfee_fen, fund_fen, acct_fen,"
                " cash_fen, state")
_TABLES = ("meta", "counter", "institution", "terminal", "person", "item", "message", "tombstone",
           "settlement", "account_entry", "fault", "held")



@functools.lru_cache(maxsize=4096)
def _card_irk(alg: Algorithm, root: bytes, region: str, historical: bytes) -> bytes:
    """A card's diversified IRK (card-spec §4.3); cached: a card comes back sale after sale."""
    return crypto.derive(alg, root, crypto.diversification_factors(region, historical))

class LedgerError(Exception):
    """The ledger file cannot be used (another seed, unreadable, a newer schema)."""


@dataclass(frozen=True)
class Result:
    """What :meth:`Ledger.handle` returns: the answer and how it came about."""

    answer: bytes  # the JSON answer, exactly as stored (a replay returns the same bytes)
    msgid: str | None
    infno: str | None
    infcode: int
    err_code: str | None
    replayed: bool = False  # answered from the stored result of an earlier delivery
    stored: bool = False  # recorded under (terminal_id, msgid)
    alarm: bool = False  # a msgid reused with another body


@dataclass(frozen=True)
class _Inst:
    code: str
    name: str
    type: str
    region: str
    status: str


@dataclass(frozen=True)
class _Person:
    psn_no: str
    ssn: str
    name: str
    card_no: str
    card_sn: bytes | None
    balance_fen: int
    status: str
    insured_region: str
    cross_region_filing: bool
    activated: bool
    pw_salt: bytes
    pw_hash: bytes
    pw_failures: int
    pw_locked: bool


@dataclass
class _Ctx:
    terminal_id: str
    inst: _Inst
    env: Envelope
    now: datetime
    extra: dict[str, Any] = field(default_factory=dict)


def _pw_hash(password: str, salt: bytes) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, PW_ITERATIONS)


def _dumps(doc: object) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


class Ledger:
    """The shared SQLite ledger. One connection; calls are serialised by a lock.

    ``seed``: loaded into a new ledger; a ledger made from another seed is refused unless
    ``reset`` (which wipes it first). Without ``seed`` the ledger must exist already.
    ``clock``: the current time (Beijing), injectable for tests.
    """

    def __init__(self, path: str | Path, seed: Seed | None = None, keys: RootKeys | None = None, *,
                 reset: bool = False, instance: str = "", clock: Callable[[], datetime] = now_beijing,
                 busy_timeout_ms: int = 30_000) -> None:
        self.path = Path(path)
        self.keys = keys
        self.instance = instance or f"pid{os.getpid()}"
        self.clock = clock
        self._lock = threading.RLock()
        if seed is None and not self.path.exists():
            raise LedgerError(f"{self.path}: no such ledger (start with --seed to make one)")
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                      timeout=busy_timeout_ms / 1000)
            self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise LedgerError(f"{self.path}: cannot switch to WAL mode (got {mode})")
            self.db.execute("PRAGMA synchronous = FULL")
            self.db.execute("PRAGMA foreign_keys = ON")
            with self._tx():
                self._prepare(seed, reset)
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.path}: {exc}") from exc
        self.policy = self._load_policy()

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # --- set-up ---------------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                # inside the try: a failed COMMIT must still roll back, or the connection stays
                # in a write transaction and every instance blocks on the lock
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def _prepare(self, seed: Seed | None, reset: bool) -> None:
        db = self.db
        if reset:
            for t in reversed(_TABLES):  # referencing tables first
                db.execute(f"DROP TABLE IF EXISTS {t}")
        for statement in _SCHEMA.split(";"):  # executescript() would commit the open transaction
            if statement.strip():
                db.execute(statement)
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise LedgerError(
                f"{self.path}: ledger schema {meta['schema']}, this backend knows {SCHEMA_VERSION}")
        if "seed_digest" in meta:
            if seed is not None and meta["seed_digest"] != seed.digest:
                raise LedgerError(
                    f"{self.path}: this ledger was made from another seed "
                    f"(sha256 {meta['seed_digest'][:12]}…, given {seed.digest[:12]}…); "
                    "use another --db, or --reset to wipe it")
            return
        if seed is None:
            raise LedgerError(f"{self.path}: the ledger holds no seed data (start with --seed)")
        self._load_seed(seed)

    def _load_seed(self, seed: Seed) -> None:
        db = self.db
        p = seed.policy
        policy = {"region_level": p.region_level, "pin_required": p.pin_required,
                  "fund_ratio_bp": p.fund_ratio_bp, "max_ttl_seconds": p.max_ttl_seconds,
                  "activation_max_failures": p.activation_max_failures}
        db.executemany("INSERT INTO meta VALUES (?, ?)", [
            ("schema", SCHEMA_VERSION), ("seed_digest", seed.digest), ("policy", json.dumps(policy))])
        for i in seed.institutions:
            db.execute("INSERT INTO institution VALUES (?, ?, ?, ?, ?)",
                       (i.code, i.name, i.type, i.region, i.status))
            db.executemany("INSERT INTO terminal VALUES (?, ?)", [(t, i.code) for t in i.terminals])
        for ps in seed.persons:
            salt = os.urandom(16)
            db.execute(
                "INSERT INTO person (psn_no, ssn, name, card_no, card_sn, balance_fen, status,"
                " insured_region, cross_region_filing, activated, pw_salt, pw_hash)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (ps.psn_no, ps.ssn, ps.name, ps.card_no, ps.card_sn, ps.balance_fen, ps.status,
                 ps.insured_region, int(ps.cross_region_filing), int(ps.activated), salt,
                 _pw_hash(ps.portal_password, salt)))
        db.executemany("INSERT INTO item VALUES (?, ?, ?, ?, ?)", [
            (it.code, it.name, it.cls, int(it.medical), it.first_selfpay_bp) for it in seed.items])

    def _load_policy(self) -> Policy:
        raw = json.loads(self.db.execute("SELECT value FROM meta WHERE key = 'policy'").fetchone()[0])
        return Policy(region_level=raw["region_level"], pin_required=raw["pin_required"],
                      fund_ratio_bp=raw["fund_ratio_bp"], max_ttl_seconds=raw["max_ttl_seconds"],
                      activation_max_failures=raw["activation_max_failures"])

    # --- the request path ---------------------------------------------------------------------

    def handle(self, terminal_id: str, payload: bytes) -> Result:
        """Process one request from ``sscard/v1/settle/req/{terminal_id}``; never raises a Refusal."""
        try:
            doc = env_mod.load_request(payload)
            msgid = env_mod.msgid_of(doc)
        except Refusal as r:
            # Nothing to key it by: answered, not stored.
            infno = None
            if r.code == "BAD_ENVELOPE":
                try:
                    raw_infno = json.loads(payload).get("infno")
                    infno = raw_infno if isinstance(raw_infno, str) and len(raw_infno) <= 8 else None
                except (ValueError, AttributeError):
                    infno = None
            now = self.clock()
            ans = env_mod.answer(msgid=None, infno=infno, refmsgid=self._refmsgid(now, 0), now=now, refusal=r)
            return Result(_dumps(ans), None, infno, -1, r.code)
        digest = env_mod.body_hash(doc)
        raw_infno = doc.get("infno")
        infno_shown = raw_infno if isinstance(raw_infno, str) and len(raw_infno) <= 8 else None
        with self._tx() as db:
            row = db.execute("SELECT body_hash, answer, infcode, err_code, infno FROM message "
                             "WHERE terminal_id = ? AND msgid = ?", (terminal_id, msgid)).fetchone()
            now = self.clock()
            if row is not None:
                if hmac.compare_digest(row[0], digest):
                    return Result(row[1].encode(), msgid, row[4], row[2], row[3], replayed=True)
                reused = Refusal("MSGID_REUSED", "the first request's answer stands")
                ans = env_mod.answer(msgid=msgid, infno=infno_shown, refmsgid=self._refmsgid(now, 0),
                                     now=now, refusal=reused, final=False)
                return Result(_dumps(ans), msgid, infno_shown, -1, reused.code, alarm=True)
            seq = self._next("refmsg")
            refmsgid = self._refmsgid(now, seq)
            try:
                out, infno = self._process(terminal_id, doc, now)
                ans = env_mod.answer(msgid=msgid, infno=infno, refmsgid=refmsgid, now=now, output=out)
            except Refusal as refusal:
                if refusal.code == "EXPIRED":
                    # Nothing happened: not stored, so a resend (a reversal retried with fresh
                    # times) is processed afresh instead of getting this answer replayed for ever.
                    ans = env_mod.answer(msgid=msgid, infno=infno_shown, refmsgid=refmsgid, now=now,
                                         refusal=refusal, final=False)
                    return Result(_dumps(ans), msgid, ans["infno"], -1, refusal.code)
                ans = env_mod.answer(msgid=msgid, infno=infno_shown, refmsgid=refmsgid, now=now,
                                     refusal=refusal)
            body = _dumps(ans)
            db.execute(
                "INSERT INTO message (terminal_id, msgid, infno, body_hash, infcode, err_code, answer,"
                " processed_at, instance) VALUES (?,?,?,?,?,?,?,?,?)",
                (terminal_id, msgid, ans["infno"], digest, ans["infcode"], ans["err_code"], body.decode(),
                 env_mod.fmt_time_ms(now), self.instance))
        return Result(body, msgid, ans["infno"], ans["infcode"], ans["err_code"], stored=True)

    @staticmethod
    def _refmsgid(now: datetime, seq: int) -> str:
        """Receiver message id: ``SIMBKD`` + yyyyMMddHHmmss + a 10-digit serial."""
        return "SIMBKD" + now.strftime("%Y%m%d%H%M%S") + f"{seq % 10**10:010d}"

    def _next(self, name: str) -> int:
        row = self.db.execute("INSERT INTO counter VALUES (?, 1) ON CONFLICT (name) DO UPDATE "
                              "SET value = value + 1 RETURNING value", (name,)).fetchone()
        return int(row[0])

    def _process(self, terminal_id: str, doc: dict[str, Any], now: datetime) -> tuple[dict[str, Any], str]:
        env = env_mod.parse_envelope(doc, self.policy.max_ttl_seconds)
        inst = self._institution_of(terminal_id)
        if env.fixmedins_code != inst.code:
            raise Refusal("INSTITUTION_MISMATCH", "the institution is the terminal's registered one")
        if env.mdtrtarea_admvs and env.mdtrtarea_admvs != inst.region:
            raise Refusal("REGION_MISMATCH", "mdtrtarea_admvs is not the institution's region")
        tomb = self.db.execute("SELECT reversal_msgid FROM tombstone WHERE terminal_id = ? AND omsgid = ?",
                               (terminal_id, env.msgid)).fetchone()
        if tomb is not None:
            raise Refusal("MSG_REVERSED", f"reversed by {tomb[0]}")
        if now > env.exp_time:
            raise Refusal("EXPIRED", f"exp_time {fmt_time(env.exp_time)}, processed {fmt_time(now)}")
        ctx = _Ctx(terminal_id, inst, env, now)
        handler = self._handlers()[env.infno]
        self.db.execute("SAVEPOINT handler")
        try:
            out = handler(ctx)
        except Refusal as r:
            if not r.keep_writes:
                self.db.execute("ROLLBACK TO handler")
            self.db.execute("RELEASE handler")
            raise
        except BaseException:
            self.db.execute("ROLLBACK TO handler")
            self.db.execute("RELEASE handler")
            raise
        self.db.execute("RELEASE handler")
        return out, env.infno

    def _handlers(self) -> dict[str, Callable[[_Ctx], dict[str, Any]]]:
        return {"1101": self._t1101, "2101": self._t2101, "2102": self._t2102, "2103": self._t2103,
                "2601": self._t2601, "3201": self._t3201, "3202": self._t3202,
                env_mod.ACTIVATION_INFNO: self._t9901}

    # --- lookups and checks ---------------------------------------------------------------------

    def _institution_of(self, terminal_id: str) -> _Inst:
        row = self.db.execute(
            "SELECT i.code, i.name, i.type, i.region, i.status FROM terminal t "
            "JOIN institution i ON i.code = t.institution_code WHERE t.terminal_id = ?",
            (terminal_id,)).fetchone()
        if row is None:
            raise Refusal("UNKNOWN_TERMINAL")
        return _Inst(*row)

    @staticmethod
    def _require_active(inst: _Inst) -> None:
        if inst.status == "suspended":
            raise Refusal("INSTITUTION_SUSPENDED")
        if inst.status == "blacklisted":
            raise Refusal("INSTITUTION_BLACKLISTED")
        if inst.status != "active":
            raise Refusal("INSTITUTION_SUSPENDED", "unknown institution status")

    def _person_row(self, where: str, value: str) -> _Person | None:
        row = self.db.execute(
            "SELECT psn_no, ssn, name, card_no, card_sn, balance_fen, status, insured_region,"
            " cross_region_filing, activated, pw_salt, pw_hash, pw_failures, pw_locked"
            f" FROM person WHERE {where} = ?",
            (value,)).fetchone()
        if row is None:
            return None
        return _Person(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], bool(row[8]),
                       bool(row[9]), row[10], row[11], row[12], bool(row[13]))

    def _person_by_card(self, ctx: _Ctx) -> _Person:
        inp = ctx.env.input
        if inp.get("mdtrt_cert_type") != "03":
            raise Refusal("BAD_INPUT", "mdtrt_cert_type must be \"03\" (social security card)")
        card_no, ssn = inp.get("mdtrt_cert_no"), inp.get("certno")
        if not isinstance(card_no, str) or not card_no or len(card_no) > 20:
            raise Refusal("BAD_INPUT", "mdtrt_cert_no must be the card number")
        if not isinstance(ssn, str) or not ssn or len(ssn) > 20:
            raise Refusal("BAD_INPUT", "certno must be the social security number")
        person = self._person_row("card_no", card_no)
        if person is None:
            raise Refusal("PERSON_NOT_FOUND")
        if not hmac.compare_digest(person.ssn.upper(), ssn.upper()):
            raise Refusal("CARD_MISMATCH")
        if ctx.env.insuplc_admdvs and ctx.env.insuplc_admdvs != person.insured_region:
            raise Refusal("REGION_MISMATCH", "insuplc_admdvs is not the person's insured region")
        return person

    @staticmethod
    def _check_card_status(person: _Person) -> None:
        code = {"lost": "CARD_LOST", "blacklisted": "CARD_BLACKLISTED", "cancelled": "CARD_CANCELLED"}
        if person.status in code:
            raise Refusal(code[person.status])
        if person.status != "normal":
            raise Refusal("CARD_BLACKLISTED", "unknown card status")

    def _check_card_auth(self, ctx: _Ctx, total: str) -> bytes:
        """The sale cryptogram of ``apdu_specs.sale_auth``; returns the card identification code."""
        ca = ctx.env.input.get("card_auth")
        if not isinstance(ca, dict):
            raise Refusal("BAD_INPUT", "card_auth (card_sn, atr_hist, alg, cryptogram) is required")
        fields: dict[str, bytes] = {}
        for key in ("card_sn", "atr_hist", "cryptogram"):
            v = ca.get(key)
            try:
                if not isinstance(v, str) or len(v) > 64:
                    raise ValueError
                fields[key] = bytes.fromhex(v)
            except ValueError:
                raise Refusal("BAD_INPUT", f"card_auth.{key} must be hex") from None
        alg_code = ca.get("alg")
        algs = {"01": Algorithm.DES3, "03": Algorithm.SM4}
        if alg_code not in algs:
            raise Refusal("BAD_INPUT", "card_auth.alg must be \"01\" (3DES) or \"03\" (SM4)")
        alg = algs[str(alg_code)]
        card_sn, hist, cryptogram = fields["card_sn"], fields["atr_hist"], fields["cryptogram"]
        if len(card_sn) != 16 or len(hist) != 13 or len(cryptogram) != 8:
            raise Refusal("BAD_INPUT", "card_auth: card_sn is 16 bytes, atr_hist 13, the cryptogram 8")
        region = card_sn[:3].hex()
        if (not region.isdigit() or card_sn[3:8] != identifiers.RID or card_sn[8:12] != hist[9:13]
                or hist[7:9].hex() != region[:4]):
            raise Refusal("CARD_NOT_GENUINE", "card_sn and atr_hist do not describe one card")
        if self.keys is None:
            raise Refusal("INTERNAL_ERROR", "the backend has no root keys")
        try:
            root = self.keys.get(alg, "IRK")
        except KeyFileError:
            raise Refusal("INTERNAL_ERROR", f"the backend has no {alg.label} IRK") from None
        card_irk = _card_irk(alg, root, region, hist)
        if not hmac.compare_digest(identifiers.card_id_auth_code(alg, card_irk, card_sn[:12]), card_sn[12:]):
            raise Refusal("CARD_NOT_GENUINE", "the card identification code does not verify")
        try:
            expected = sale_auth.card_cryptogram(alg, card_irk, ctx.env.msgid, total, ctx.terminal_id)
        except ValueError:
            expected = b""
        if not hmac.compare_digest(expected, cryptogram):
            raise Refusal("CARD_NOT_GENUINE", "the sale cryptogram does not verify")
        return card_sn

    def _cross_region(self, inst: _Inst, person: _Person) -> bool:
        n = self.policy.region_level
        return inst.region[:n] != person.insured_region[:n]

    # --- 1101 identity and balance -------------------------------------------------------------

    def _t1101(self, ctx: _Ctx) -> dict[str, Any]:
        self._require_active(ctx.inst)
        person = self._person_by_card(ctx)
        self._check_card_status(person)
        card_sn = ctx.env.input.get("card_sn")
        if card_sn is not None and person.card_sn is not None and (
                not isinstance(card_sn, str) or card_sn.upper() != person.card_sn.hex().upper()):
            raise Refusal("CARD_MISMATCH", "card_sn is not this person's card")
        birth = person.ssn[6:14]
        try:
            born = date(int(birth[:4]), int(birth[4:6]), int(birth[6:8]))
        except ValueError:
            born = None
        today = ctx.now.date()
        age = (None if born is None
               else today.year - born.year - ((today.month, today.day) < (born.month, born.day)))
        cross = self._cross_region(ctx.inst, person)
        return {
            "baseinfo": {"psn_no": person.psn_no, "psn_cert_type": "01", "certno": person.ssn,
                         "psn_name": person.name, "gend": "1" if int(person.ssn[16]) % 2 else "2",
                         "brdy": born.isoformat() if born else None, "age": age},
            "insuinfo": [{"balc": yuan(person.balance_fen), "insutype": "310", "psn_type": "11",
                          "psn_insu_stas": "1", "insuplc_admdvs": person.insured_region}],
            "cardinfo": {"card_no": person.card_no, "card_stas": person.status, "activated": person.activated,
                         "cross_region": cross, "cross_region_filing": person.cross_region_filing},
        }

    # --- 2101 / 2102 pre-settlement and settlement ---------------------------------------------

    def _sale(self, ctx: _Ctx) -> tuple[_Person, Split, list[dict[str, Any]], bool, str]:
        inp = ctx.env.input
        self._require_active(ctx.inst)
        total = inp.get("medfee_sumamt")
        try:
            total_fen = parse_yuan(total)
        except MoneyError as exc:
            raise Refusal("BAD_INPUT", f"medfee_sumamt: {exc}") from None
        lines = self._parse_lines(inp.get("drugdetail"))
        use_acct = inp.get("acct_used_flag", "1")
        if use_acct not in ("0", "1"):
            raise Refusal("BAD_INPUT", "acct_used_flag must be \"1\" or \"0\"")
        pin_verified = inp.get("pin_verified", False)
        if not isinstance(pin_verified, bool):
            raise Refusal("BAD_INPUT", "pin_verified must be true or false")
        for key in ("med_type", "insutype", "invono"):
            if key in inp and (not isinstance(inp[key], str) or len(inp[key]) > 30):
                raise Refusal("BAD_INPUT", f"{key} must be a string of at most 30 characters")
        card_sn = self._check_card_auth(ctx, str(total))
        person = self._person_by_card(ctx)
        self._check_card_status(person)
        if not person.activated:
            raise Refusal("CARD_NOT_ACTIVATED")
        if person.card_sn is not None and person.card_sn != card_sn:
            raise Refusal("CARD_MISMATCH", "the card presented is not this person's card")
        if self.policy.pin_required.get(ctx.inst.type, True) and not pin_verified:
            raise Refusal("PIN_NOT_VERIFIED", f"{ctx.inst.type}s require the PIN verified on the chip")
        cross = self._cross_region(ctx.inst, person)
        if cross and not person.cross_region_filing:
            raise Refusal("CROSS_REGION_NOT_FILED", "the insured region and the institution's differ")
        resolved = self._resolve_items(lines)
        if sum(ln.amount_fen for ln in resolved) != total_fen:
            raise Refusal("TOTAL_MISMATCH", f"lines sum to {yuan(sum(ln.amount_fen for ln in resolved))}")
        sp = split(resolved, self.policy.fund_ratio_bp.get(ctx.inst.type, 0), person.balance_fen,
                   use_acct == "1")
        detail = [{
            "feedetl_sn": x.line.feedetl_sn, "medins_list_codg": x.line.code, "name": x.line.name,
            "item_class": x.line.cls, "chrgitm_lv": CHRGITM_LV[x.line.cls], "cnt": x.line.cnt,
            "pric": yuan(x.line.price_fen), "det_item_fee_sumamt": yuan(x.line.amount_fen),
            "selfpay_prop": ratio_str({"a": 0, "b": x.line.selfpay_bp, "c": 10_000}[x.line.cls]),
            "fulamt_ownpay_amt": yuan(x.fulamt_ownpay), "preselfpay_amt": yuan(x.preselfpay),
            "inscp_scp_amt": yuan(x.in_scope), "fund_pay": yuan(x.fund), "acct_pay": yuan(x.acct),
            "psn_cash_pay": yuan(x.cash),
        } for x in sp.lines]
        return person, sp, detail, cross, use_acct

    @staticmethod
    def _parse_lines(raw: object) -> list[dict[str, Any]]:
        if not isinstance(raw, list) or not raw:
            raise Refusal("BAD_INPUT", "drugdetail must be a non-empty list of lines")
        if len(raw) > MAX_LINES:
            raise Refusal("BAD_INPUT", f"at most {MAX_LINES} lines")
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for i, ln in enumerate(raw):
            where = f"drugdetail[{i}]"
            if not isinstance(ln, dict):
                raise Refusal("BAD_INPUT", f"{where} must be an object")
            sn, code, cnt = ln.get("feedetl_sn"), ln.get("medins_list_codg"), ln.get("cnt")
            if not isinstance(sn, str) or not _FEEDETL.match(sn) or sn in seen:
                raise Refusal("BAD_INPUT", f"{where}.feedetl_sn must be a unique short string")
            seen.add(sn)
            if not isinstance(code, str) or not code or len(code) > 50:
                raise Refusal("BAD_INPUT", f"{where}.medins_list_codg must be the item code")
            if not isinstance(cnt, int) or isinstance(cnt, bool) or not 1 <= cnt <= 10_000:
                raise Refusal("BAD_INPUT", f"{where}.cnt must be an integer from 1 to 10000")
            try:
                price = parse_yuan(ln.get("pric"))
            except MoneyError as exc:
                raise Refusal("BAD_INPUT", f"{where}.pric: {exc}") from None
            if "det_item_fee_sumamt" in ln:
                try:
                    amount = parse_yuan(ln["det_item_fee_sumamt"])
                except MoneyError as exc:
                    raise Refusal("BAD_INPUT", f"{where}.det_item_fee_sumamt: {exc}") from None
                if amount != cnt * price:
                    raise Refusal("BAD_INPUT", f"{where}.det_item_fee_sumamt is not cnt × pric")
            out.append({"feedetl_sn": sn, "code": code, "cnt": cnt, "price_fen": price})
        return out

    def _resolve_items(self, lines: list[dict[str, Any]]) -> list[Line]:
        unknown: list[dict[str, str]] = []
        non_medical: list[dict[str, str]] = []
        resolved: list[Line] = []
        for ln in lines:
            row = self.db.execute("SELECT name, cls, medical, first_selfpay_bp FROM item WHERE code = ?",
                                  (ln["code"],)).fetchone()
            if row is None:
                unknown.append({"feedetl_sn": ln["feedetl_sn"], "medins_list_codg": ln["code"]})
                continue
            name, cls, medical, bp = row
            if not medical:
                non_medical.append({"feedetl_sn": ln["feedetl_sn"], "medins_list_codg": ln["code"],
                                    "name": name})
                continue
            resolved.append(Line(ln["feedetl_sn"], ln["code"], name, cls, ln["cnt"], ln["price_fen"], bp))
        if unknown:
            raise Refusal("UNKNOWN_ITEM", ", ".join(x["feedetl_sn"] for x in unknown), lines=unknown)
        if non_medical:
            raise Refusal("NON_MEDICAL_ITEM", ", ".join(x["feedetl_sn"] for x in non_medical),
                          lines=non_medical)
        return resolved

    @staticmethod
    def _setlinfo(ctx: _Ctx, person: _Person, sp: Split, balc: int, cross: bool,
                  setl_id: str | None, mdtrt_id: str | None) -> dict[str, Any]:
        inp = ctx.env.input
        return {
            "setl_id": setl_id, "mdtrt_id": mdtrt_id, "psn_no": person.psn_no, "psn_name": person.name,
            "setl_time": fmt_time(ctx.now), "med_type": inp.get("med_type", "41"),
            "insutype": inp.get("insutype", "310"), "fixmedins_code": ctx.inst.code,
            "terminal_id": ctx.terminal_id, "cross_region": cross,
            "medfee_sumamt": yuan(sp.medfee), "fulamt_ownpay_amt": yuan(sp.fulamt_ownpay),
            "preselfpay_amt": yuan(sp.preselfpay), "inscp_scp_amt": yuan(sp.in_scope),
            "hifp_pay": yuan(sp.fund), "fund_pay_sumamt": yuan(sp.fund), "acct_pay": yuan(sp.acct),
            "psn_cash_pay": yuan(sp.cash), "psn_part_amt": yuan(sp.acct + sp.cash), "balc": yuan(balc),
        }

    def _t2101(self, ctx: _Ctx) -> dict[str, Any]:
        person, sp, detail, cross, _ = self._sale(ctx)
        return {"setlinfo": self._setlinfo(ctx, person, sp, person.balance_fen - sp.acct, cross, None, None),
                "detlcutinfo": detail}

    def _t2102(self, ctx: _Ctx) -> dict[str, Any]:
        person, sp, detail, cross, _ = self._sale(ctx)
        day = ctx.now.strftime("%Y%m%d")
        n = self._next("settlement")
        setl_id, mdtrt_id = f"S{day}{n:010d}", f"M{day}{n:010d}"
        balc = person.balance_fen - sp.acct
        cur = self.db.execute("UPDATE person SET balance_fen = balance_fen - ?"
                              " WHERE psn_no = ? AND balance_fen >= ?", (sp.acct, person.psn_no, sp.acct))
        if cur.rowcount != 1:  # cannot happen inside one transaction; the CHECK stands behind it
            raise Refusal("INTERNAL_ERROR", "balance changed under the transaction")
        setlinfo = self._setlinfo(ctx, person, sp, balc, cross, setl_id, mdtrt_id)
        self.db.execute(
            "INSERT INTO settlement (setl_id, mdtrt_id, terminal_id, msgid, institution_code, psn_no,"
            " setl_time, setl_date, medfee_fen, fund_fen, acct_fen, cash_fen, balc_after_fen, state, detail)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,'settled',?)",
            (setl_id, mdtrt_id, ctx.terminal_id, ctx.env.msgid, ctx.inst.code, person.psn_no,
             fmt_time(ctx.now), ctx.now.date().isoformat(), sp.medfee, sp.fund, sp.acct, sp.cash, balc,
             json.dumps(detail)))
        self._entry(person.psn_no, -sp.acct, balc, "settle", setl_id, ctx)
        return {"setlinfo": setlinfo, "detlcutinfo": detail}

    def _entry(self, psn_no: str, delta: int, after: int, reason: str, setl_id: str, ctx: _Ctx) -> None:
        if delta:
            self.db.execute("INSERT INTO account_entry (psn_no, delta_fen, balance_after_fen, reason,"
                            " setl_id, msgid, at) VALUES (?,?,?,?,?,?,?)",
                            (psn_no, delta, after, reason, setl_id, ctx.env.msgid, fmt_time(ctx.now)))

    def _balance(self, psn_no: str) -> int:
        row = self.db.execute("SELECT balance_fen FROM person WHERE psn_no = ?", (psn_no,)).fetchone()
        return int(row[0])

    def _credit(self, psn_no: str, fen: int) -> int:
        self.db.execute("UPDATE person SET balance_fen = balance_fen + ? WHERE psn_no = ?", (fen, psn_no))
        return self._balance(psn_no)

    # --- 2103 void ------------------------------------------------------------------------------

    def _t2103(self, ctx: _Ctx) -> dict[str, Any]:
        self._require_active(ctx.inst)
        inp = ctx.env.input
        setl_id = inp.get("setl_id")
        if not isinstance(setl_id, str) or not setl_id or len(setl_id) > 40:
            raise Refusal("BAD_INPUT", "setl_id is required")
        row = self.db.execute(
            "SELECT setl_id, mdtrt_id, psn_no, state, medfee_fen, fund_fen, acct_fen, cash_fen"
            " FROM settlement WHERE setl_id = ? AND institution_code = ?",
            (setl_id, ctx.inst.code)).fetchone()
        if row is None:
            raise Refusal("SETTLEMENT_NOT_FOUND")
        _, mdtrt_id, psn_no, state, medfee, fund, acct, cash = row
        for key, have in (("mdtrt_id", mdtrt_id), ("psn_no", psn_no)):
            if key in inp and inp[key] != have:
                raise Refusal("SETTLEMENT_NOT_FOUND", f"{key} does not match the settlement")
        if state == "voided":
            raise Refusal("ALREADY_VOIDED")
        if state == "reversed":
            raise Refusal("SETTLEMENT_REVERSED")
        balc = self._credit(psn_no, acct)
        self.db.execute("UPDATE settlement SET state = 'voided', void_terminal = ?, void_msgid = ?,"
                        " void_time = ? WHERE setl_id = ?",
                        (ctx.terminal_id, ctx.env.msgid, fmt_time(ctx.now), setl_id))
        self._entry(psn_no, acct, balc, "void", setl_id, ctx)
        return {"setlinfo": {
            "setl_id": setl_id, "mdtrt_id": mdtrt_id, "psn_no": psn_no, "void_time": fmt_time(ctx.now),
            "refd_setl_flag": "1", "medfee_sumamt": yuan(medfee), "fund_pay_sumamt": yuan(fund),
            "acct_pay": yuan(acct), "psn_cash_pay": yuan(cash), "balc": yuan(balc)}}

    # --- 2601 reversal --------------------------------------------------------------------------

    def _t2601(self, ctx: _Ctx) -> dict[str, Any]:
        inp = ctx.env.input
        omsgid, oinfno = inp.get("omsgid"), inp.get("oinfno")
        try:
            env_mod.msgid_of({"msgid": omsgid})
        except Refusal:
            raise Refusal("BAD_INPUT", "omsgid must be the original message's msgid") from None
        if oinfno not in env_mod.INFNOS:
            raise Refusal("BAD_INPUT", "oinfno must be the original message's infno")
        if oinfno not in REVERSIBLE:
            raise Refusal("NOT_REVERSIBLE", f"only {', '.join(REVERSIBLE)} can be reversed")
        if omsgid == ctx.env.msgid:
            raise Refusal("BAD_INPUT", "a reversal cannot name itself")
        out: dict[str, Any] = {"omsgid": omsgid, "oinfno": oinfno}
        orig = self.db.execute("SELECT infno, infcode, answer FROM message"
                               " WHERE terminal_id = ? AND msgid = ?", (ctx.terminal_id, omsgid)).fetchone()
        if orig is None:
            tomb = self.db.execute("SELECT oinfno FROM tombstone WHERE terminal_id = ? AND omsgid = ?",
                                   (ctx.terminal_id, omsgid)).fetchone()
            if tomb is not None:
                if tomb[0] != oinfno:
                    raise Refusal("REVERSAL_MISMATCH", f"the tombstone names oinfno {tomb[0]}")
                return {**out, "result": "already_reversed"}
            self.db.execute("INSERT INTO tombstone VALUES (?, ?, ?, ?, ?)",
                            (ctx.terminal_id, omsgid, oinfno, ctx.env.msgid, fmt_time(ctx.now)))
            return {**out, "result": "tombstoned"}
        infno, infcode, answer = orig
        if infno != oinfno:
            raise Refusal("REVERSAL_MISMATCH", f"the original message is a {infno}")
        if infcode != 0 or oinfno == "2101":
            return {**out, "result": "nothing_to_reverse"}
        if oinfno == "2102":
            row = self.db.execute("SELECT setl_id, psn_no, state, acct_fen FROM settlement "
                                  "WHERE terminal_id = ? AND msgid = ?", (ctx.terminal_id, omsgid)).fetchone()
            setl_id, psn_no, state, acct = row
            out["setl_id"] = setl_id
            if state == "reversed":
                return {**out, "result": "already_reversed"}
            if state == "voided":
                return {**out, "result": "already_voided"}
            balc = self._credit(psn_no, acct)
            self.db.execute("UPDATE settlement SET state = 'reversed', reversal_msgid = ? WHERE setl_id = ?",
                            (ctx.env.msgid, setl_id))
            self._entry(psn_no, acct, balc, "reversal", setl_id, ctx)
            return {**out, "result": "reversed", "balc": yuan(balc)}
        # 2103: undo the void — the settlement stands again and its account payment is taken again.
        setl_id = json.loads(answer)["output"]["setlinfo"]["setl_id"]
        out["setl_id"] = setl_id
        row = self.db.execute("SELECT psn_no, state, acct_fen, void_terminal, void_msgid FROM settlement "
                              "WHERE setl_id = ?", (setl_id,)).fetchone()
        psn_no, state, acct, void_terminal, void_msgid = row
        if state != "voided" or (void_terminal, void_msgid) != (ctx.terminal_id, omsgid):
            return {**out, "result": "already_reversed"}
        balance = self._balance(psn_no)
        if balance < acct:
            raise Refusal("REVERSAL_CONFLICT", f"balance {yuan(balance)}, the void returned {yuan(acct)}")
        self.db.execute("UPDATE person SET balance_fen = balance_fen - ? WHERE psn_no = ?", (acct, psn_no))
        self.db.execute("UPDATE settlement SET state = 'settled', void_terminal = NULL, void_msgid = NULL,"
                        " void_time = NULL WHERE setl_id = ?", (setl_id,))
        self._entry(psn_no, -acct, balance - acct, "void reversal", setl_id, ctx)
        return {**out, "result": "reversed", "balc": yuan(balance - acct)}

    # --- 3201 / 3202 reconciliation -------------------------------------------------------------

    def _period(self, ctx: _Ctx) -> tuple[str, str, str | None]:
        inp = ctx.env.input
        begin, end = inp.get("stmt_begndate"), inp.get("stmt_enddate")
        try:
            if not (isinstance(begin, str) and isinstance(end, str)
                    and _DATE.match(begin) and _DATE.match(end)):
                raise ValueError
            b, e = date.fromisoformat(begin), date.fromisoformat(end)
        except ValueError:
            raise Refusal("BAD_INPUT", "stmt_begndate and stmt_enddate must be yyyy-MM-dd") from None
        if e < b or e - b > timedelta(days=366):
            raise Refusal("BAD_INPUT", "the period must run forwards and span at most 366 days")
        term = inp.get("terminal_id")
        if term is not None:
            owner = self.db.execute("SELECT institution_code FROM terminal WHERE terminal_id = ?",
                                    (term,)).fetchone() if isinstance(term, str) else None
            if owner is None or owner[0] != ctx.inst.code:
                raise Refusal("BAD_INPUT", "terminal_id is not a terminal of this institution")
        return begin, end, term

    def _rows(self, ctx: _Ctx, begin: str, end: str, term: str | None) -> list[tuple[Any, ...]]:
        sql = (f"SELECT {_ROW_COLUMNS} FROM settlement"
               " WHERE institution_code = ? AND setl_date BETWEEN ? AND ?")
        args: list[Any] = [ctx.inst.code, begin, end]
        if term is not None:
            sql += " AND terminal_id = ?"
            args.append(term)
        return self.db.execute(sql + " ORDER BY seq", args).fetchall()

    def _t3201(self, ctx: _Ctx) -> dict[str, Any]:
        begin, end, term = self._period(ctx)
        rows = self._rows(ctx, begin, end, term)
        standing = [r for r in rows if r[10] == "settled"]
        out: dict[str, Any] = {
            "stmt_begndate": begin, "stmt_enddate": end, "terminal_id": term,
            "setl_cnt": len(standing), "medfee_sumamt": yuan(sum(r[6] for r in standing)),
            "fund_pay_sumamt": yuan(sum(r[7] for r in standing)),
            "acct_pay": yuan(sum(r[8] for r in standing)),
            "psn_cash_pay": yuan(sum(r[9] for r in standing)), "refd_setl_cnt": len(rows) - len(standing),
        }
        theirs = {k: ctx.env.input.get(k) for k in ("fixmedins_setl_cnt", "medfee_sumamt", "fund_pay_sumamt",
                                                     "acct_pay")}
        if any(v is not None for v in theirs.values()):
            cnt = theirs["fixmedins_setl_cnt"]
            if not isinstance(cnt, int) or isinstance(cnt, bool):
                raise Refusal("BAD_INPUT", "fixmedins_setl_cnt must be an integer")
            try:
                mine = [parse_yuan(theirs[k]) for k in ("medfee_sumamt", "fund_pay_sumamt", "acct_pay")]
            except MoneyError as exc:
                raise Refusal("BAD_INPUT", f"totals: {exc}") from None
            differ = [k for k, a, b in (("fixmedins_setl_cnt", theirs["fixmedins_setl_cnt"], len(standing)),
                                        ("medfee_sumamt", mine[0], sum(r[6] for r in standing)),
                                        ("fund_pay_sumamt", mine[1], sum(r[7] for r in standing)),
                                        ("acct_pay", mine[2], sum(r[8] for r in standing))) if a != b]
            out["stmt_rslt"] = "1" if differ else "0"
            out["stmt_rslt_dscr"] = ("differ: " + ", ".join(differ)) if differ else "totals agree"
        return out

    @staticmethod
    def _detail_row(r: tuple[Any, ...]) -> dict[str, Any]:
        return {"msgid": r[0], "terminal_id": r[1], "setl_id": r[2], "mdtrt_id": r[3], "psn_no": r[4],
                "setl_time": r[5], "medfee_sumamt": yuan(r[6]), "fund_pay_sumamt": yuan(r[7]),
                "acct_pay": yuan(r[8]), "psn_cash_pay": yuan(r[9]), "state": r[10],
                "refd_setl_flag": "0" if r[10] == "settled" else "1"}

    def _t3202(self, ctx: _Ctx) -> dict[str, Any]:
        inp = ctx.env.input
        begin, end, term = self._period(ctx)
        page, size = inp.get("page_num", 1), inp.get("page_size", 500)
        if (not isinstance(page, int) or isinstance(page, bool) or page < 1 or not isinstance(size, int)
                or isinstance(size, bool) or not 1 <= size <= MAX_PAGE_SIZE):
            raise Refusal("BAD_INPUT", f"page_num ≥ 1, page_size from 1 to {MAX_PAGE_SIZE}")
        rows = [self._detail_row(r) for r in self._rows(ctx, begin, end, term)]
        out: dict[str, Any] = {"stmt_begndate": begin, "stmt_enddate": end, "terminal_id": term,
                               "total": len(rows), "page_num": page, "page_size": size,
                               "rows": rows[(page - 1) * size: page * size]}
        if "details" in inp:
            mine = [r for r in rows if r["terminal_id"] == (term or ctx.terminal_id)]
            out["diffs"] = self._diffs(inp["details"], mine)
        return out

    @staticmethod
    def _diffs(details: object, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not isinstance(details, list) or len(details) > 10_000:
            raise Refusal("BAD_INPUT", "details must be a list of the terminal's settlements")
        keys = ("setl_id", "medfee_sumamt", "fund_pay_sumamt", "acct_pay", "psn_cash_pay", "refd_setl_flag")
        theirs: dict[str, dict[str, Any]] = {}
        for i, d in enumerate(details):
            if not isinstance(d, dict) or not isinstance(d.get("msgid"), str):
                raise Refusal("BAD_INPUT", f"details[{i}] must be an object with msgid")
            theirs[d["msgid"]] = d
        center = {r["msgid"]: r for r in rows}
        diffs: list[dict[str, Any]] = []
        for msgid in sorted(set(theirs) | set(center)):
            c, t = center.get(msgid), theirs.get(msgid)
            if c is None:
                diffs.append({"msgid": msgid, "kind": "missing_at_center"})
            elif t is None:
                if c["refd_setl_flag"] == "0":
                    diffs.append({"msgid": msgid, "kind": "missing_at_terminal", "center": c})
            else:
                fields = [k for k in keys if k in t and t[k] != c[k]]
                if fields:
                    diffs.append({"msgid": msgid, "kind": "differs", "fields": fields, "center": c})
        return diffs

    # --- 9901 card activation -------------------------------------------------------------------

    def _t9901(self, ctx: _Ctx) -> dict[str, Any]:
        self._require_active(ctx.inst)
        inp = ctx.env.input
        ssn, password, new = inp.get("certno"), inp.get("password"), inp.get("new_password")
        if not isinstance(ssn, str) or not ssn or len(ssn) > 20:
            raise Refusal("BAD_INPUT", "certno must be the ID number")
        if not isinstance(password, str) or not password or len(password) > 64:
            raise Refusal("BAD_INPUT", "password is required")
        if new is not None and (not isinstance(new, str) or len(new) > 64):
            raise Refusal("BAD_INPUT", "new_password must be a string")
        person = self._person_row("upper(ssn)", ssn.upper())
        if person is None:
            raise Refusal("PERSON_NOT_FOUND")
        card_no = inp.get("card_no")
        if card_no is not None and card_no != person.card_no:
            raise Refusal("CARD_MISMATCH")
        self._check_card_status(person)
        if person.pw_locked:
            raise Refusal("ACCOUNT_LOCKED", "unlock at a service hall")
        if not hmac.compare_digest(_pw_hash(password, person.pw_salt), person.pw_hash):
            failures = person.pw_failures + 1
            locked = failures >= self.policy.activation_max_failures
            self.db.execute("UPDATE person SET pw_failures = ?, pw_locked = ? WHERE psn_no = ?",
                            (failures, int(locked), person.psn_no))
            if locked:
                raise Refusal("ACCOUNT_LOCKED", "too many wrong passwords", keep_writes=True)
            raise Refusal("PASSWORD_WRONG", keep_writes=True,
                          tries_left=self.policy.activation_max_failures - failures)
        initial = hmac.compare_digest(person.pw_hash, _pw_hash(person.card_no, person.pw_salt))
        self.db.execute("UPDATE person SET pw_failures = 0 WHERE psn_no = ?", (person.psn_no,))
        if initial and new is None:
            raise Refusal("PASSWORD_CHANGE_REQUIRED", "send new_password with the initial password",
                          keep_writes=True)
        changed = False
        if new is not None:
            reason = self._weak(new, person)
            if reason:
                raise Refusal("PASSWORD_WEAK", reason, keep_writes=True)
            salt = os.urandom(16)
            self.db.execute("UPDATE person SET pw_salt = ?, pw_hash = ? WHERE psn_no = ?",
                            (salt, _pw_hash(new, salt), person.psn_no))
            changed = True
        self.db.execute("UPDATE person SET activated = 1 WHERE psn_no = ?", (person.psn_no,))
        return {"psn_no": person.psn_no, "activated": True, "already_activated": person.activated,
                "password_changed": changed}

    @staticmethod
    def _weak(pw: str, person: _Person) -> str:
        if not _PW_OK.match(pw):
            return "8 to 20 printable ASCII characters without spaces"
        if not re.search(r"[A-Za-z]", pw) or not re.search(r"[0-9]", pw):
            return "at least one letter and one digit"
        if pw.upper() == person.card_no.upper() or person.ssn[-6:] in pw or person.ssn.upper() in pw.upper():
            return "must not be the card number or contain the ID number's last six characters"
        return ""

    # --- inspection (tests, technicians) -------------------------------------------------------

    def balance(self, card_no: str) -> int:
        """The personal-account balance in fen of the person with ``card_no``."""
        with self._lock:
            row = self.db.execute("SELECT balance_fen FROM person WHERE card_no = ?", (card_no,)).fetchone()
        if row is None:
            raise KeyError(card_no)
        return int(row[0])

    def settlements(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.db.execute(f"SELECT {_ROW_COLUMNS} FROM settlement ORDER BY seq").fetchall()
        return [self._detail_row(r) for r in rows]

    def message_count(self, terminal_id: str | None = None) -> int:
        with self._lock:
            if terminal_id is None:
                return int(self.db.execute("SELECT count(*) FROM message").fetchone()[0])
            return int(self.db.execute("SELECT count(*) FROM message WHERE terminal_id = ?",
                                       (terminal_id,)).fetchone()[0])
