"""Helpers for the backend simulator's tests: a settable clock, request envelopes, card cryptograms.

The cryptogram is computed the way the genuine card does (``apdu_specs.sale_auth``) for a card
personalised like ``sscard-emu issue`` does (region, serial → ATR, card identification code);
``test_backend_ledger`` also checks it against the emulated card's own INTERNAL AUTHENTICATE.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

from apdu_specs import crypto, identifiers, keyfile, sale_auth
from apdu_specs.crypto import Algorithm
from backend_sim.envelope import BEIJING, fmt_time, now_beijing

EXAMPLE_SEED = Path(__file__).resolve().parent.parent / "config" / "backend-seed.example.toml"

# From config/backend-seed.example.toml
PHARMACY = ("370212000001", "P37021200001")
PHARMACY_2 = ("370212000002", "P37021200001")
CLINIC = ("370203000001", "C37020300001")
HOSPITAL = ("370202000001", "H37020200001")
SUSPENDED = ("370213000001", "P37021300001")
BLACKLISTED = ("370211000001", "P37021100001")

ZHANG = ("Q54198963", "370202199001011237")  # 500.00, the emulator's default holder
LI = ("Q10000011", "370202198503151235")  # 5.00
WANG_LOST = ("Q1000002X", "37020319781120234X")
ZHAO_BLACKLISTED = ("Q10000038", "370212199206073450")
QIAN_NOT_ACTIVATED = ("Q10000046", "370213199509094562")
SUN_FILED = ("Q10000054", "370102198001015676")
ZHOU_NOT_FILED = ("Q10000062", "370102198808086782")
WU_CANCELLED = ("Q10000070", "370211197005057897")


@cache
def roots() -> keyfile.RootKeys:
    return keyfile.load(keyfile.DEFAULT_TEST_KEYFILE)


@dataclass
class Clock:
    now: datetime = field(default_factory=lambda: datetime(2026, 11, 25, 10, 30, 0, tzinfo=BEIJING))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass(frozen=True)
class Card:
    region: str = "370202"
    serial: bytes = bytes.fromhex("12345678")
    alg: Algorithm = Algorithm.SM4

    @property
    def hist(self) -> bytes:
        return identifiers.Atr.for_card(self.region, self.serial).historical

    @property
    def card_sn(self) -> bytes:
        first12 = bytes.fromhex(self.region) + identifiers.RID + self.serial
        irk = crypto.derive(self.alg, roots().get(self.alg, "IRK"),
                            crypto.diversification_factors(self.region, self.hist))
        return first12 + identifiers.card_id_auth_code(self.alg, irk, first12)

    def auth(self, msgid: str, total: str, terminal_id: str = "370212000001") -> dict[str, str]:
        crypt = sale_auth.expected_cryptogram(self.alg, roots().get(self.alg, "IRK"), self.region, self.hist,
                                              msgid, total, terminal_id)
        return {"card_sn": self.card_sn.hex().upper(), "atr_hist": self.hist.hex().upper(),
                "alg": f"{int(self.alg):02d}", "cryptogram": crypt.hex().upper()}


class LiveClock(Clock):
    """The real time (for requests to a running backend)."""

    @property  # type: ignore[override]
    def now(self) -> datetime:
        return now_beijing()

    @now.setter
    def now(self, value: datetime) -> None:
        pass


_seq = itertools.count(1)


@dataclass
class Requests:
    """Builds envelopes for one terminal."""

    clock: Clock
    terminal: tuple[str, str] = PHARMACY
    ttl: float = 30.0

    @property
    def terminal_id(self) -> str:
        return self.terminal[0]

    def msgid(self) -> str:
        return f"{self.terminal[1]}{self.clock.now:%Y%m%d%H%M%S}{next(_seq) % 10000:04d}"

    def envelope(self, infno: str, inp: dict[str, Any], msgid: str | None = None,
                 **over: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "infno": infno, "msgid": msgid or self.msgid(), "mdtrtarea_admvs": "", "insuplc_admdvs": "",
            "opter_type": "1", "opter": "0001", "inf_time": fmt_time(self.clock.now),
            "exp_time": fmt_time(self.clock.now + timedelta(seconds=self.ttl)),
            "fixmedins_code": self.terminal[1], "input": inp,
        }
        doc.update(over)
        return doc

    def sale(self, infno: str, items: list[tuple[str, int, str]], person: tuple[str, str] = ZHANG, *,
             pin: bool = True, card: Card | None = None, msgid: str | None = None, total: str | None = None,
             **extra: Any) -> dict[str, Any]:
        """A 2101/2102 with lines ``(code, cnt, price)`` and a genuine cryptogram."""
        msgid = msgid or self.msgid()
        lines = [{"feedetl_sn": str(i + 1), "medins_list_codg": c, "cnt": n, "pric": p}
                 for i, (c, n, p) in enumerate(items)]
        fen = sum(n * (int(p.split(".")[0]) * 100 + int(p.split(".")[1])) for _, n, p in items)
        total = total or f"{fen // 100}.{fen % 100:02d}"
        inp: dict[str, Any] = {
            "mdtrt_cert_type": "03", "mdtrt_cert_no": person[0], "certno": person[1], "med_type": "41",
            "medfee_sumamt": total, "acct_used_flag": "1", "pin_verified": pin,
            "card_auth": (card or Card()).auth(msgid, total, self.terminal_id), "drugdetail": lines,
        }
        inp.update(extra)
        return self.envelope(infno, inp, msgid=msgid)

    def identity(self, person: tuple[str, str] = ZHANG) -> dict[str, Any]:
        return self.envelope("1101", {"mdtrt_cert_type": "03", "mdtrt_cert_no": person[0],
                                      "certno": person[1]})

    def void(self, setl_id: str, **extra: Any) -> dict[str, Any]:
        return self.envelope("2103", {"setl_id": setl_id, **extra})

    def reversal(self, omsgid: str, oinfno: str = "2102") -> dict[str, Any]:
        return self.envelope("2601", {"omsgid": omsgid, "oinfno": oinfno})


def dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode()
