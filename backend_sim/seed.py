"""The seed file (TOML, ``format = "sscard-backend-seed/1"``): policy, institutions, persons, items.

A bad seed fails with :class:`SeedError` naming the entry, the key and the reason. See
``config/backend-seed.example.toml`` and the README ("Backend simulator") for every key.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apdu_specs import identifiers
from backend_sim.money import MoneyError, parse_ratio, parse_yuan

FORMAT = "sscard-backend-seed/1"
INSTITUTION_TYPES = ("pharmacy", "clinic", "hospital")
INSTITUTION_STATUSES = ("active", "suspended", "blacklisted")
PERSON_STATUSES = ("normal", "lost", "blacklisted", "cancelled")
ITEM_CLASSES = ("a", "b", "c")
_REGION = re.compile(r"^[0-9]{6}$")
_TERMINAL = re.compile(r"^[0-9]{12}$")
_CODE = re.compile(r"^[0-9A-Za-z_-]{1,30}$")


class SeedError(ValueError):
    """The seed is unreadable or invalid; the message names the entry, the key and the reason."""


@dataclass(frozen=True)
class Policy:
    region_level: int = 4
    pin_required: dict[str, bool] = field(
        default_factory=lambda: {"pharmacy": True, "clinic": True, "hospital": False})
    fund_ratio_bp: dict[str, int] = field(
        default_factory=lambda: {"pharmacy": 0, "clinic": 5000, "hospital": 7000})
    max_ttl_seconds: int = 600
    activation_max_failures: int = 5


@dataclass(frozen=True)
class Institution:
    code: str
    name: str
    type: str
    region: str
    status: str
    terminals: tuple[str, ...]


@dataclass(frozen=True)
class Person:
    ssn: str
    name: str
    card_no: str
    balance_fen: int
    status: str
    insured_region: str
    cross_region_filing: bool
    activated: bool
    portal_password: str
    psn_no: str
    card_sn: bytes | None


@dataclass(frozen=True)
class Item:
    code: str
    name: str
    cls: str
    medical: bool
    first_selfpay_bp: int


@dataclass(frozen=True)
class Seed:
    policy: Policy
    institutions: tuple[Institution, ...]
    persons: tuple[Person, ...]
    items: tuple[Item, ...]
    digest: str  # SHA-256 of the file's bytes: a ledger remembers which seed it was made from


def default_psn_no(ssn: str) -> str:
    """The person number when the seed names none: stable, and does not reveal the ID number."""
    return "PSN" + hashlib.sha256(f"sscard-backend psn|{ssn}".encode()).hexdigest()[:13].upper()


class _Table:
    def __init__(self, where: str, table: object) -> None:
        if not isinstance(table, dict):
            raise SeedError(f"{where}: must be a table")
        self.where = where
        self.t: dict[str, Any] = table
        self.used: set[str] = set()

    def get(self, key: str, default: object) -> object:
        self.used.add(key)
        return self.t.get(key, default)

    def text(self, key: str, default: str | None = None, pattern: re.Pattern[str] | None = None) -> str:
        v = self.get(key, default)
        if v is None:
            raise SeedError(f"{self.where}: {key}: missing")
        if not isinstance(v, str) or not v:
            raise SeedError(f"{self.where}: {key}: must be a non-empty string")
        if pattern is not None and not pattern.match(v):
            raise SeedError(f"{self.where}: {key}: {v!r} is malformed")
        return v

    def choice(self, key: str, choices: tuple[str, ...], default: str | None = None) -> str:
        v = self.text(key, default)
        if v not in choices:
            raise SeedError(f"{self.where}: {key}: must be one of {', '.join(choices)}, got {v!r}")
        return v

    def flag(self, key: str, default: bool | None = None) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise SeedError(f"{self.where}: {key}: must be true or false")
        return v

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        v = self.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise SeedError(f"{self.where}: {key}: must be an integer from {lo} to {hi}")
        return v

    def money(self, key: str) -> int:
        try:
            return parse_yuan(self.get(key, None))
        except MoneyError as exc:
            raise SeedError(f"{self.where}: {key}: {exc}") from None

    def ratio(self, key: str, default: str) -> int:
        try:
            return parse_ratio(self.get(key, default))
        except MoneyError as exc:
            raise SeedError(f"{self.where}: {key}: {exc}") from None

    def done(self) -> None:
        unknown = set(self.t) - self.used
        if unknown:
            raise SeedError(f"{self.where}: unknown keys {sorted(unknown)}")


def _policy(raw: object) -> Policy:
    t = _Table("[policy]", raw if raw is not None else {})
    base = Policy()
    level = t.integer("region_level", base.region_level, 2, 6)
    pin = dict(base.pin_required)
    pin_raw = t.get("pin_required", {})
    pt = _Table("[policy] pin_required", pin_raw)
    for kind in INSTITUTION_TYPES:
        pin[kind] = pt.flag(kind, pin[kind])
    pt.done()
    ratios = dict(base.fund_ratio_bp)
    rt = _Table("[policy] fund_ratio", t.get("fund_ratio", {}))
    for kind in INSTITUTION_TYPES:
        ratios[kind] = rt.ratio(kind, f"{ratios[kind] / 10_000:.4f}")
    rt.done()
    ttl = t.integer("max_ttl_seconds", base.max_ttl_seconds, 1, 86_400)
    failures = t.integer("activation_max_failures", base.activation_max_failures, 1, 100)
    t.done()
    return Policy(level, pin, ratios, ttl, failures)


def _institution(i: int, raw: object) -> Institution:
    t = _Table(f"[[institution]] #{i + 1}", raw)
    code = t.text("code", pattern=_CODE)
    t.where = f"[[institution]] {code}"
    inst = Institution(
        code=code, name=t.text("name"), type=t.choice("type", INSTITUTION_TYPES),
        region=t.text("region", pattern=_REGION), status=t.choice("status", INSTITUTION_STATUSES, "active"),
        terminals=tuple(_terminals(t)),
    )
    t.done()
    return inst


def _terminals(t: _Table) -> list[str]:
    v = t.get("terminals", None)
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and _TERMINAL.match(x) for x in v):
        raise SeedError(f"{t.where}: terminals: must be a non-empty list of 12-digit terminal ids")
    return list(v)


def _person(i: int, raw: object) -> Person:
    t = _Table(f"[[person]] #{i + 1}", raw)
    ssn = t.text("ssn")
    try:
        identifiers.validate_ssn(ssn)
    except identifiers.IdentifierError as exc:
        raise SeedError(f"{t.where}: ssn: {exc}") from None
    t.where = f"[[person]] {identifiers.mask_ssn(ssn)}"
    card_no = t.text("card_no")
    try:
        identifiers.validate_card_no(card_no)
    except identifiers.IdentifierError as exc:
        raise SeedError(f"{t.where}: card_no: {exc}") from None
    card_sn_hex = t.get("card_sn", None)
    card_sn: bytes | None = None
    if card_sn_hex is not None:
        try:
            card_sn = bytes.fromhex(str(card_sn_hex))
        except ValueError:
            card_sn = b""
        if len(card_sn) != 16:
            raise SeedError(f"{t.where}: card_sn: must be the 16-byte card identification code in hex")
    person = Person(
        ssn=ssn, name=t.text("name"), card_no=card_no, balance_fen=t.money("balance"),
        status=t.choice("status", PERSON_STATUSES, "normal"),
        insured_region=t.text("insured_region", pattern=_REGION),
        cross_region_filing=t.flag("cross_region_filing", False),
        activated=t.flag("activated", True),
        portal_password=t.text("portal_password", card_no),
        psn_no=t.text("psn_no", default_psn_no(ssn), pattern=_CODE),
        card_sn=card_sn,
    )
    t.done()
    return person


def _item(i: int, raw: object) -> Item:
    t = _Table(f"[[item]] #{i + 1}", raw)
    code = t.text("code", pattern=_CODE)
    t.where = f"[[item]] {code}"
    medical = t.flag("medical")
    cls = t.choice("class", ITEM_CLASSES, None if medical else "c")
    ratio = t.ratio("first_selfpay_ratio", "0")
    if ratio and cls != "b":
        raise SeedError(f"{t.where}: first_selfpay_ratio: only class b items have one")
    item = Item(code=code, name=t.text("name"), cls=cls, medical=medical, first_selfpay_bp=ratio)
    t.done()
    return item


def _array(doc: dict[str, Any], key: str) -> list[object]:
    v = doc.get(key, [])
    if not isinstance(v, list):
        raise SeedError(f"{key}: must be an array of tables ([[{key}]])")
    return v


def parse(data: bytes, source: str = "<seed>") -> Seed:
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise SeedError(f"{source}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise SeedError(f"{source}: not valid TOML: {exc}") from None
    try:
        if doc.get("format") != FORMAT:
            raise SeedError(f"format: must be {FORMAT!r}, got {doc.get('format')!r}")
        unknown = set(doc) - {"format", "description", "policy", "institution", "person", "item"}
        if unknown:
            raise SeedError(f"unknown top-level keys {sorted(unknown)}")
        policy = _policy(doc.get("policy"))
        insts = tuple(_institution(i, r) for i, r in enumerate(_array(doc, "institution")))
        persons = tuple(_person(i, r) for i, r in enumerate(_array(doc, "person")))
        items = tuple(_item(i, r) for i, r in enumerate(_array(doc, "item")))
        _unique("[[institution]] code", [x.code for x in insts])
        _unique("terminal id", [term for x in insts for term in x.terminals])
        _unique("[[person]] ssn", [identifiers.mask_ssn(x.ssn) for x in persons], [x.ssn for x in persons])
        _unique("[[person]] card_no", [x.card_no for x in persons])
        _unique("[[person]] psn_no", [x.psn_no for x in persons])
        _unique("[[item]] code", [x.code for x in items])
    except SeedError as exc:
        raise SeedError(f"{source}: {exc}") from None
    return Seed(policy, insts, persons, items, hashlib.sha256(data).hexdigest())


def _unique(what: str, shown: list[str], values: list[str] | None = None) -> None:
    seen: set[str] = set()
    for s, v in zip(shown, values if values is not None else shown, strict=True):
        if v in seen:
            raise SeedError(f"{what} {s} appears twice")
        seen.add(v)


def load(path: str | Path) -> Seed:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise SeedError(f"{p}: cannot read the seed: {exc.strerror}") from None
    return parse(data, str(p))
