"""The request envelope, its expiry, the body hash, and the answer envelope.

Times are Beijing time (UTC+08:00) without a zone suffix, ``"2026-11-25 10:30:00"``, optionally
with milliseconds (``"2026-11-25 10:30:00.250"``), whatever the host's time zone is.

The request states its own expiry in ``exp_time``: a request the backend would process after that
instant is refused (EXPIRED). ``exp_time`` must not be before ``inf_time`` nor more than the
policy's ``max_ttl_seconds`` after it.

The idempotency key is ``(terminal_id, msgid)``; the body hash is SHA-256 over the canonical JSON
(sorted keys, no spaces, UTF-8) of the whole request **without** ``inf_time`` and ``exp_time``, so a
sender may resend the same business content with fresh times.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from backend_sim.errors import Refusal

BEIJING = timezone(timedelta(hours=8), "CST")
MAX_REQUEST_BYTES = 256 * 1024
INFNOS = ("1101", "2101", "2102", "2103", "2601", "3201", "3202", "9901")
ACTIVATION_INFNO = "9901"
_MSGID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
_TIME = re.compile(r"^(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})(?:\.(\d{3}))?$")
_REGION = re.compile(r"^(|[0-9]{6})$")
HASH_EXCLUDED = ("inf_time", "exp_time")


def now_beijing() -> datetime:
    return datetime.now(BEIJING)


def fmt_time(t: datetime) -> str:
    return t.astimezone(BEIJING).strftime("%Y-%m-%d %H:%M:%S")


def fmt_time_ms(t: datetime) -> str:
    t = t.astimezone(BEIJING)
    return t.strftime("%Y-%m-%d %H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def parse_time(value: object, what: str) -> datetime:
    if not isinstance(value, str):
        raise Refusal("BAD_ENVELOPE", f"{what} must be a string \"yyyy-MM-dd HH:mm:ss\"")
    m = _TIME.match(value)
    if not m:
        raise Refusal("BAD_ENVELOPE", f"{what} must be \"yyyy-MM-dd HH:mm:ss[.SSS]\" (Beijing time)")
    y, mo, d, h, mi, s = (int(m.group(i)) for i in range(1, 7))
    ms = int(m.group(7) or 0)
    try:
        return datetime(y, mo, d, h, mi, s, ms * 1000, tzinfo=BEIJING)
    except ValueError:
        raise Refusal("BAD_ENVELOPE", f"{what} is not a valid time") from None


def load_request(payload: bytes) -> dict[str, Any]:
    """The request as a JSON object (TOO_LARGE, BAD_JSON otherwise)."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise Refusal("TOO_LARGE", f"{len(payload)} bytes, at most {MAX_REQUEST_BYTES}")
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise Refusal("BAD_JSON") from None
    if not isinstance(doc, dict):
        raise Refusal("BAD_JSON")
    return doc


def msgid_of(doc: dict[str, Any]) -> str:
    msgid = doc.get("msgid")
    if not isinstance(msgid, str) or not _MSGID.match(msgid):
        raise Refusal("BAD_ENVELOPE", "msgid must be 1–64 characters of [0-9A-Za-z_-]")
    return msgid


def body_hash(doc: dict[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k not in HASH_EXCLUDED}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()


@dataclass(frozen=True)
class Envelope:
    infno: str
    msgid: str
    mdtrtarea_admvs: str
    insuplc_admdvs: str
    opter_type: str
    opter: str
    inf_time: datetime
    exp_time: datetime
    fixmedins_code: str
    input: dict[str, Any]


def _text(doc: dict[str, Any], key: str, max_len: int, required: bool = True) -> str:
    v = doc.get(key, None if required else "")
    if not isinstance(v, str) or (required and not v) or len(v) > max_len:
        raise Refusal("BAD_ENVELOPE", f"{key} must be a {'non-empty ' if required else ''}string "
                                      f"of at most {max_len} characters")
    return v


def parse_envelope(doc: dict[str, Any], max_ttl_seconds: int) -> Envelope:
    msgid = msgid_of(doc)
    infno = doc.get("infno")
    if not isinstance(infno, str):
        raise Refusal("BAD_ENVELOPE", "infno must be a string such as \"2102\"")
    if infno not in INFNOS:
        raise Refusal("UNKNOWN_INFNO", f"infno {infno[:8]!r}")
    regions = {}
    for key in ("mdtrtarea_admvs", "insuplc_admdvs"):
        v = doc.get(key, "")
        if not isinstance(v, str) or not _REGION.match(v):
            raise Refusal("BAD_ENVELOPE", f"{key} must be a 6-digit region code or empty")
        regions[key] = v
    opter_type = doc.get("opter_type")
    if opter_type not in ("1", "2", "3"):
        raise Refusal("BAD_ENVELOPE",
                      "opter_type must be \"1\" (clerk), \"2\" (self-service) or \"3\" (mobile)")
    inf_time = parse_time(doc.get("inf_time"), "inf_time")
    exp_time = parse_time(doc.get("exp_time"), "exp_time")
    if exp_time < inf_time:
        raise Refusal("BAD_ENVELOPE", "exp_time is before inf_time")
    if exp_time - inf_time > timedelta(seconds=max_ttl_seconds):
        raise Refusal("BAD_ENVELOPE", f"exp_time is more than {max_ttl_seconds} s after inf_time")
    inp = doc.get("input")
    if not isinstance(inp, dict):
        raise Refusal("BAD_ENVELOPE", "input must be a JSON object")
    return Envelope(
        infno=infno, msgid=msgid,
        mdtrtarea_admvs=regions["mdtrtarea_admvs"], insuplc_admdvs=regions["insuplc_admdvs"],
        opter_type=str(opter_type), opter=_text(doc, "opter", 30), inf_time=inf_time, exp_time=exp_time,
        fixmedins_code=_text(doc, "fixmedins_code", 30), input=inp,
    )


def answer(*, msgid: str | None, infno: str | None, refmsgid: str, now: datetime,
           output: dict[str, Any] | None = None, refusal: Refusal | None = None,
           final: bool = True) -> dict[str, Any]:
    """The answer envelope (``infcode`` 0 with ``output``, or −1 with ``err_code``/``err_msg``).

    ``final`` is false for an answer the ledger did not store (INTERNAL_ERROR, INJECTED_FAILURE,
    EXPIRED, MSGID_REUSED): it says nothing definite about the message, so a sender of a
    2102/2103 must treat it as an unknown outcome (reverse), never as a refusal.
    """
    if refusal is None:
        return {"infcode": 0, "inf_refmsgid": refmsgid, "msgid": msgid, "infno": infno,
                "respond_time": fmt_time_ms(now), "err_code": None, "err_msg": None,
                "final": final, "output": output if output is not None else {}}
    return {"infcode": -1, "inf_refmsgid": refmsgid, "msgid": msgid, "infno": infno,
            "respond_time": fmt_time_ms(now), "err_code": refusal.code, "err_msg": refusal.message,
            "final": final, "output": refusal.details}
