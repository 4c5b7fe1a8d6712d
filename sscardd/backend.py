"""The daemon's side of the backend contract (architecture.md, "MQTT, backend side"; README,
"Backend simulator"): message ids, the national-platform envelope, and reading answers.

Nothing here speaks MQTT; :class:`sscardd.mqtt.DaemonLink` carries the bytes.

**Message ids** have the national form ``fixmedins_code(12) + yyyyMMddHHmmss + seq(4)`` (30
characters). The backend keys idempotency on ``(terminal, msgid)``, so two different messages of
one terminal must never share one. A settlement's messages take their ``seq`` from the journal
row: ``(row_id mod 2500) × 4 + k`` with ``k`` = 0 for the 2101, 1 for the 2102/2103 and 2 for the
2601 — two rows created in the same second would need 2500 rows in between to collide. Messages
outside the journal (1101 queries, 3201/3202 reconciliation) use ``k`` = 3 with a per-process
counter starting at a random point; a collision there (same second, same counter value, from two
processes of one terminal) costs a MSGID_REUSED refusal of a query, never money.

**Answers** are checked strictly: a payload that is not the envelope's answer to *this* message
(wrong ``msgid``/``infno``, bad JSON, a money field that is not a two-decimal string) is
:class:`BackendGarbage`. For a 2102/2103 garbage, like ``final: false`` and a timeout, means the
outcome is unknown and the settlement is reversed; it is never read as a refusal.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Final

from sscardd import jsonwire
from sscardd.config import InstitutionConfig
from sscardd.errors import SSCardError

BEIJING: Final = timezone(timedelta(hours=8))
TIME_FORMAT: Final = "%Y-%m-%d %H:%M:%S"
# The project-defined activation transaction (README, "9901 card activation").
ACTIVATION_INFNO: Final = "9901"
KIND_PRESETTLE, KIND_SETTLE, KIND_REVERSAL, KIND_OTHER = 0, 1, 2, 3
_MONEY = re.compile(r"(0|[1-9][0-9]{0,9})\.([0-9]{2})", re.ASCII)
_MSGID = re.compile(r"[0-9A-Za-z_-]{1,64}", re.ASCII)
_other_seq = itertools.count(secrets.randbelow(2500))

# Backend refusal codes a POS acts on, reported under the same name; the rest are BACKEND_REFUSED.
PASS_THROUGH: Final = frozenset({
    "CARD_LOST", "CARD_BLACKLISTED", "CARD_CANCELLED", "CARD_NOT_ACTIVATED", "CARD_NOT_GENUINE",
    "CARD_MISMATCH", "INSTITUTION_SUSPENDED", "INSTITUTION_BLACKLISTED", "CROSS_REGION_NOT_FILED",
    "NON_MEDICAL_ITEM", "UNKNOWN_ITEM", "SETTLEMENT_NOT_FOUND", "ALREADY_VOIDED", "SETTLEMENT_REVERSED",
    "PERSON_NOT_FOUND",
})


class BackendGarbage(Exception):
    """An answer that is not a well-formed answer to the message it claims to answer."""


def now_beijing() -> datetime:
    return datetime.now(BEIJING)


def msgid(fixmedins_code: str, kind: int, row_id: int | None = None, at: datetime | None = None) -> str:
    """A national-form message id (see the module docstring)."""
    if kind not in (KIND_PRESETTLE, KIND_SETTLE, KIND_REVERSAL, KIND_OTHER):
        raise ValueError("unknown message kind")
    if (row_id is None) != (kind == KIND_OTHER):
        raise ValueError("journal messages name their row; others do not")
    n = next(_other_seq) if row_id is None else row_id
    seq = (n % 2500) * 4 + kind
    return f"{fixmedins_code}{(at or now_beijing()):%Y%m%d%H%M%S}{seq:04d}"


def envelope(infno: str, msg_id: str, inp: Mapping[str, Any], *, institution: InstitutionConfig,
             expiry_s: int, opter: str, opter_type: str = "1", insuplc_admdvs: str = "",
             at: datetime | None = None) -> bytes:
    """The request's JSON bytes. ``exp_time`` is ``inf_time`` + the request's Message Expiry, so the
    backend refuses (EXPIRED, not stored) what the broker should already have dropped."""
    t = at or now_beijing()
    doc = {"infno": infno, "msgid": msg_id, "mdtrtarea_admvs": institution.region,
           "insuplc_admdvs": insuplc_admdvs, "opter_type": opter_type, "opter": opter,
           "inf_time": t.strftime(TIME_FORMAT),
           "exp_time": (t + timedelta(seconds=expiry_s)).strftime(TIME_FORMAT),
           "fixmedins_code": institution.code, "input": dict(inp)}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Answer:
    """A backend answer. ``final`` False: not stored by the backend, says nothing definite."""

    infcode: int
    err_code: str | None
    err_msg: str | None
    output: Mapping[str, Any] = field(repr=False)
    final: bool
    inf_refmsgid: str | None = None

    @property
    def ok(self) -> bool:
        return self.infcode == 0

    def error(self) -> SSCardError:
        """The daemon error for a refusal (never for a success)."""
        code = self.err_code if isinstance(self.err_code, str) else "UNKNOWN"
        details: dict[str, Any] = {"backend_code": code}
        if self.err_msg:
            details["backend_message"] = self.err_msg[:300]
        lines = self.output.get("lines") if isinstance(self.output, Mapping) else None
        if isinstance(lines, list):
            # "name" is the item's (the journal's masking would take it for a person's)
            details["lines"] = [{("item_name" if k == "name" else k): v for k, v in ln.items()}
                                if isinstance(ln, dict) else ln for ln in lines[:200]]
        return SSCardError(code if code in PASS_THROUGH else "BACKEND_REFUSED", **details)


def parse_answer(payload: bytes, *, msg_id: str, infno: str) -> Answer:
    """The answer to message ``msg_id``/``infno``, or :class:`BackendGarbage`."""
    try:
        doc = jsonwire.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BackendGarbage("not strict UTF-8 JSON (duplicate keys, NaN)") from None
    if not isinstance(doc, dict):
        raise BackendGarbage("not a JSON object")
    if doc.get("msgid") != msg_id or doc.get("infno") != infno:
        raise BackendGarbage("answers another message")
    infcode, final, output = doc.get("infcode"), doc.get("final"), doc.get("output")
    if isinstance(infcode, bool) or infcode not in (0, -1):
        raise BackendGarbage("infcode is not 0 or -1")
    if not isinstance(final, bool):
        raise BackendGarbage("final is not a boolean")
    if output is None:
        output = {}
    if not isinstance(output, dict):
        raise BackendGarbage("output is not an object")
    err_code, err_msg = doc.get("err_code"), doc.get("err_msg")
    if err_code is not None and not isinstance(err_code, str):
        raise BackendGarbage("err_code is not a string")
    if err_msg is not None and not isinstance(err_msg, str):
        raise BackendGarbage("err_msg is not a string")
    if infcode == 0 and not final:
        raise BackendGarbage("a success that is not final")
    ref = doc.get("inf_refmsgid")
    return Answer(infcode, err_code, err_msg, output, final, ref if isinstance(ref, str) else None)


# --- reading outputs -----------------------------------------------------------------------------


def fen(obj: Mapping[str, Any], key: str) -> int:
    """A money field of an answer in fen (:class:`BackendGarbage` unless ``"12.50"``-shaped)."""
    v = obj.get(key)
    m = _MONEY.fullmatch(v) if isinstance(v, str) else None
    if m is None:
        raise BackendGarbage(f"{key} is not a money string")
    return int(m.group(1)) * 100 + int(m.group(2))


def text(obj: Mapping[str, Any], key: str, *, optional: bool = False, max_len: int = 200) -> str | None:
    v = obj.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or len(v) > max_len:
        raise BackendGarbage(f"{key} is not a string")
    return v


def section(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    v = obj.get(key)
    if not isinstance(v, dict):
        raise BackendGarbage(f"{key} is not an object")
    return v


def check_msgid(value: str) -> str:
    if not _MSGID.fullmatch(value):
        raise ValueError("a msgid is 1-64 of [0-9A-Za-z_-]")
    return value
