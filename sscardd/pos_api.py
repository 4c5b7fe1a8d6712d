"""The POS message layer (architecture.md, "MQTT, POS side"), independent of the transport.

The MQTT client hands in a request's payload bytes, its Response Topic and Correlation Data, and
gets back what to publish where (or "drop", already logged). Nothing here speaks MQTT.

Request: a JSON object ``{"id", "op", "args"}`` (UTF-8, at most ``max_payload`` bytes), plus
``reply_to`` for MQTT 3.1.1 clients that cannot set a Response Topic. Every field is checked
strictly: duplicate keys, unknown keys, wrong types, floats where money belongs, ``NaN`` — all are
refused with a named error whose ``field`` and ``reason`` details say what was wrong, without
echoing what the POS sent (it may be a PIN or a name).

- ``id``: 1..64 characters of ``A-Z a-z 0-9 . _ : -``.
- The reply topic (the Response Topic; else ``reply_to``) must lie under
  ``sscard/v1/term/{terminal_id}/reply/``: at most 256 bytes, levels of ``A-Z a-z 0-9 . _ : @ -``,
  no empty level, no ``.``/``..`` level, no wildcard. A request whose reply topic is missing or
  refused cannot be answered anywhere: it is dropped with a log line (REPLY_TOPIC_REFUSED). When
  both are given the Response Topic wins, and a bad ``reply_to`` is still refused (answered).

Argument schemas (unknown keys refused everywhere; ``pin`` is a *PIN source*, see below):

==================  ====================================================================
``card.status``      ``{}``
``card.read_basic``  ``{}``
``account.query``    ``{}``
``card.read``        ``{"address": "DF04EF05|84|$", "auth": "key"|"pin" (default "key"),
                     "pin": source (optional; with ``auth: "pin"`` and no pin: the keypad)}``
``pin.verify``       ``{"pin": source}`` (optional; default the keypad)
``pin.change``       ``{"pin": change source}`` (optional; default the keypad)
``sale``             ``{"operator": {"id", "name"}, "items": [{"code", "qty", "price"}, ...],
                     "pin": source (optional: absent = the POS offers none),
                     "preview": false (optional)}``
``sale.void``        ``{"setl_id": "...", "operator": {"id", "name"} (optional)}``
==================  ====================================================================

PIN source: ``{"source": "keypad"}`` | ``{"source": "block", "block": "<32 hex digits>"}`` |
``{"source": "clear", "pin": "123456"}`` (refused, CLEAR_PIN_REFUSED, unless
``pin.allow_clear_over_mqtt``). Change source: ``{"source": "keypad"}`` |
``{"source": "block", "old", "new", "new_again"}`` (three PIN blocks) |
``{"source": "clear", "old", "new", "new_again"}``.

A PIN block is ISO 9564-1 format 4 (AES, 16 bytes) under the terminal's PIN-block key, with the
first 17 digits of the card holder's social security number as the account field
(:func:`decode_pin_block`); it deciphers only once the card is read.

Money is a string in yuan with exactly two decimals (``"12.50"``; no sign, no exponent, no
leading zero, never a JSON number), held as integer fen. ``qty`` is a JSON integer 1..10000 (the
backend's ``cnt``; split packs are not sold by fraction). Limits: 1..100 items, a price of
0.01..99999.99, a sale total of at most 999999.99.

Replies: ``{"id", "ok": true, "result": {...}}`` or ``{"id", "ok": false, "error": {"code",
"compat_code", "message", "message_zh", ...details}}`` as UTF-8 JSON (Unicode, not escaped);
``id`` is null when the request had no usable id. A result holding a float is a bug: it becomes an
INTERNAL_ERROR reply, so money can never leave as a number.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NoReturn, TypeAlias

import structlog

from apdu_specs import crypto
from sscardd import address as addr
from sscardd import broker, jsonwire
from sscardd.config import PIN_LEN_MAX, PIN_LEN_MIN, Secret
from sscardd.errors import SSCardError
from sscardd.session import PinPolicy

log = structlog.get_logger("sscardd.pos")

OPS: Final = ("card.status", "card.read_basic", "card.read", "pin.verify", "pin.change", "sale",
              "sale.void", "account.query")
MAX_ID_LEN: Final = 64
MAX_TOPIC_BYTES: Final = 256
MAX_ITEMS: Final = 100
MAX_QTY: Final = 10_000
MAX_PRICE_FEN: Final = 9_999_999  # 99999.99
MAX_TOTAL_FEN: Final = 99_999_999  # 999999.99
MAX_CODE_LEN: Final = 50
MAX_OPERATOR_ID_LEN: Final = 30
MAX_OPERATOR_NAME_LEN: Final = 50
MAX_SETL_ID_LEN: Final = 64
PIN_BLOCK_BYTES: Final = 16

_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}", re.ASCII)
_TOPIC_LEVEL = re.compile(r"[A-Za-z0-9._:@-]+", re.ASCII)
_MONEY = re.compile(r"(0|[1-9][0-9]{0,9})\.([0-9]{2})", re.ASCII)
_CODE = re.compile(r"[A-Za-z0-9._-]{1,50}", re.ASCII)
_OPERATOR_ID = re.compile(r"[A-Za-z0-9._-]{1,30}", re.ASCII)
_SETL_ID = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)
_HEX_BLOCK = re.compile(r"[0-9A-Fa-f]{32}", re.ASCII)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}", re.ASCII)


def reply_prefix(terminal_id: str) -> str:
    """The namespace every reply topic of ``terminal_id`` lies under."""
    return broker.reply_prefix(terminal_id)


# --- errors -------------------------------------------------------------------------------------


def _bad(where: str, reason: str, code: str = "BAD_REQUEST") -> NoReturn:
    """Refuse the request; ``reason`` is our own text, never a value from the request."""
    raise SSCardError(code, f"{where}: {reason}" if where else reason, field=where, reason=reason)


class PosRequestRejected(Exception):
    """A request that cannot be served. ``reply_topic`` None: drop it (nowhere to answer)."""

    def __init__(self, error: SSCardError, *, request_id: str | None, reply_topic: str | None) -> None:
        self.error = error
        self.request_id = request_id
        self.reply_topic = reply_topic
        super().__init__(str(error))

    @property
    def action(self) -> Literal["reply", "drop"]:
        return "drop" if self.reply_topic is None else "reply"

    def reply(self) -> bytes:
        """The error reply to publish on ``reply_topic``."""
        return error_reply(self.request_id, self.error)


# --- money ---------------------------------------------------------------------------------------


def parse_money(value: object, where: str = "amount") -> int:
    """``"12.50"`` → 1250 fen; BAD_REQUEST on anything but a plain two-decimal string."""
    if isinstance(value, bool) or not isinstance(value, str):
        _bad(where, 'money is a string in yuan with two decimals, e.g. "12.50" (not a number)')
    m = _MONEY.fullmatch(value)
    if m is None:
        _bad(where, 'money is yuan with exactly two decimals, e.g. "12.50", without sign or exponent')
    return int(m.group(1)) * 100 + int(m.group(2))


def format_money(fen: int) -> str:
    """1250 → ``"12.50"``; a negative amount keeps its sign (``"-3.00"``)."""
    if isinstance(fen, bool) or not isinstance(fen, int):
        raise TypeError("money is held in integer fen")
    sign = "-" if fen < 0 else ""
    fen = abs(fen)
    return f"{sign}{fen // 100}.{fen % 100:02d}"


# --- PIN sources ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeypadPin:
    """The PIN is entered on the reader's keypad and never reaches the host."""

    source: Literal["keypad"] = "keypad"


@dataclass(frozen=True)
class BlockPin:
    """A format 4 PIN block (16 bytes) from the POS."""

    block: bytes = field(repr=False)
    source: Literal["block"] = "block"


@dataclass(frozen=True)
class ClearPin:
    """A clear PIN (insecure test option only)."""

    pin: str = field(repr=False)
    source: Literal["clear"] = "clear"


PinSource: TypeAlias = KeypadPin | BlockPin | ClearPin
KEYPAD: Final = KeypadPin()


@dataclass(frozen=True)
class BlockPinChange:
    """Old, new and new-again PINs as three format 4 PIN blocks."""

    old: bytes = field(repr=False)
    new: bytes = field(repr=False)
    new_again: bytes = field(repr=False)
    source: Literal["block"] = "block"


@dataclass(frozen=True)
class ClearPinChange:
    """Old, new and new-again PINs in clear (insecure test option only)."""

    old: str = field(repr=False)
    new: str = field(repr=False)
    new_again: str = field(repr=False)
    source: Literal["clear"] = "clear"


PinChangeSource: TypeAlias = KeypadPin | BlockPinChange | ClearPinChange


def _key_bytes(key: bytes | Secret | None) -> bytes:
    value = key.value if isinstance(key, Secret) else key
    if value is None:
        raise SSCardError("INVALID_INPUT", "this terminal has no PIN-block key configured",
                          reason="this terminal has no PIN-block key configured")
    return value.encode("latin-1") if isinstance(value, str) else value


def decode_pin_block(block_hex: str | bytes, key: bytes | Secret | None, ssn: str) -> str:
    """The PIN in an ISO 9564-1 format 4 PIN block whose account field is the first 17 digits of
    ``ssn``. Any failure (wrong key, wrong card, damaged block) is the same INVALID_INPUT "PIN
    block does not decipher", so the error tells an attacker nothing about which check failed."""
    k = _key_bytes(key)
    if isinstance(block_hex, bytes):
        block = block_hex
    elif isinstance(block_hex, str) and _HEX_BLOCK.fullmatch(block_hex):
        block = bytes.fromhex(block_hex)
    else:
        block = b""
    if len(block) != PIN_BLOCK_BYTES:
        raise SSCardError("INVALID_INPUT", "a PIN block is 32 hex digits",
                          reason="a PIN block is 32 hex digits")
    pan = ssn[:17] if isinstance(ssn, str) else ""
    if len(pan) != 17 or not _DIGITS.fullmatch(pan):
        raise SSCardError("INVALID_INPUT", "the card's social security number has no 17-digit account field",
                          reason="the card's social security number cannot form the account field")
    try:
        return crypto.iso9564_format4_decipher(k, block, pan)
    except (crypto.CryptoError, ValueError):
        raise SSCardError("INVALID_INPUT", "PIN block does not decipher",
                          reason="PIN block does not decipher") from None


def resolve_pin(source: PinSource | None, *, key: bytes | Secret | None, ssn: str,
                policy: PinPolicy) -> str | None:
    """The PIN a handler passes to the card session: ``None`` for the keypad (or no source), the
    deciphered or clear PIN checked against ``policy`` (PIN_LENGTH) otherwise."""
    if source is None or isinstance(source, KeypadPin):
        return None
    pin = decode_pin_block(source.block, key, ssn) if isinstance(source, BlockPin) else source.pin
    policy.check_format(pin)
    return pin


def resolve_pin_change(source: PinChangeSource, *, key: bytes | Secret | None, ssn: str,
                       policy: PinPolicy) -> tuple[str, str, str] | None:
    """``(old, new, new_again)`` for :meth:`CardSession.change_pin`, ``None`` for the keypad."""
    if isinstance(source, KeypadPin):
        return None
    if isinstance(source, BlockPinChange):
        pins = tuple(decode_pin_block(b, key, ssn) for b in (source.old, source.new, source.new_again))
    else:
        pins = (source.old, source.new, source.new_again)
    for p in pins:
        policy.check_format(p)
    return pins[0], pins[1], pins[2]


# --- argument schemas ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NoArgs:
    """``card.status``, ``card.read_basic``, ``account.query``: no arguments."""


@dataclass(frozen=True)
class CardReadArgs:
    address: str
    auth: Literal["key", "pin"] = "key"
    pin: PinSource | None = None


@dataclass(frozen=True)
class PinVerifyArgs:
    pin: PinSource = KEYPAD


@dataclass(frozen=True)
class PinChangeArgs:
    pin: PinChangeSource = KEYPAD


@dataclass(frozen=True)
class Operator:
    id: str
    name: str = field(repr=False)


@dataclass(frozen=True)
class Item:
    code: str
    qty: int
    price_fen: int

    @property
    def amount_fen(self) -> int:
        return self.qty * self.price_fen


@dataclass(frozen=True)
class SaleArgs:
    operator: Operator
    items: tuple[Item, ...]
    pin: PinSource | None = None
    preview: bool = False

    @property
    def total_fen(self) -> int:
        return sum(i.amount_fen for i in self.items)


@dataclass(frozen=True)
class SaleVoidArgs:
    setl_id: str
    operator: Operator | None = None


OpArgs: TypeAlias = NoArgs | CardReadArgs | PinVerifyArgs | PinChangeArgs | SaleArgs | SaleVoidArgs


def _kind(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def _object(v: object, where: str, required: str = "", optional: str = "") -> dict[str, Any]:
    """``v`` as a JSON object holding all ``required`` keys and no keys beyond ``optional``."""
    if not isinstance(v, dict):
        _bad(where, f"must be an object, got {_kind(v)}")
    req, opt = required.split(), optional.split()
    for k in v:
        if k not in req and k not in opt:
            allowed = ", ".join(req + opt) or "none"
            if _FIELD_NAME.fullmatch(k):  # a name, not a value (a PIN is digits): safe to show
                _bad(_sub(where, k), f"unknown field {k!r} (allowed: {allowed})")
            _bad(where, f"unknown field (allowed: {allowed})")
    for k in req:
        if k not in v:
            _bad(f"{where}.{k}" if where else k, "missing (required)")
    return v


def _sub(where: str, k: str) -> str:
    return f"{where}.{k}" if where else k


def _string(v: object, where: str, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(v, str):
        _bad(where, f"must be a string, got {_kind(v)}")
    if not pattern.fullmatch(v):
        _bad(where, f"must be {what}")
    return v


def _text(v: object, where: str, max_len: int) -> str:
    """Free text (a name): 1..max_len characters, no control characters, valid Unicode."""
    if not isinstance(v, str):
        _bad(where, f"must be a string, got {_kind(v)}")
    if not v.strip() or len(v) > max_len:
        _bad(where, f"must be 1..{max_len} characters")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000 for c in v):
        _bad(where, "must not hold control characters")
    return v


def _bool(v: object, where: str) -> bool:
    if not isinstance(v, bool):
        _bad(where, f"must be true or false, got {_kind(v)}")
    return v


def _pin_block(v: object, where: str) -> bytes:
    if not isinstance(v, str) or not _HEX_BLOCK.fullmatch(v):
        _bad(where, "a PIN block is a string of 32 hex digits (ISO 9564-1 format 4)", "INVALID_INPUT")
    return bytes.fromhex(v)


def _clear_pin(v: object, where: str) -> str:
    if not isinstance(v, str) or not _DIGITS.fullmatch(v) or not PIN_LEN_MIN <= len(v) <= PIN_LEN_MAX:
        _bad(where, f"a PIN is {PIN_LEN_MIN}..{PIN_LEN_MAX} digits", "PIN_LENGTH")
    return v


def _source_kind(v: object, where: str, allow_clear: bool) -> str:
    if not isinstance(v, dict):
        _bad(where, f"must be an object, got {_kind(v)}")
    src = v.get("source")
    if src not in ("keypad", "block", "clear"):
        _bad(_sub(where, "source"), 'must be "keypad", "block" or "clear"')
    if src == "clear" and not allow_clear:
        # Before anything else is looked at: the reply says nothing about the PIN itself.
        raise SSCardError("CLEAR_PIN_REFUSED", field=where,
                          reason="pin.allow_clear_over_mqtt is off on this terminal")
    assert isinstance(src, str)
    return src


def _pin_source(v: object, where: str, allow_clear: bool) -> PinSource:
    src = _source_kind(v, where, allow_clear)
    if src == "keypad":
        _object(v, where, "source")
        return KEYPAD
    if src == "block":
        o = _object(v, where, "source block")
        return BlockPin(_pin_block(o["block"], _sub(where, "block")))
    o = _object(v, where, "source pin")
    return ClearPin(_clear_pin(o["pin"], _sub(where, "pin")))


def _pin_change_source(v: object, where: str, allow_clear: bool) -> PinChangeSource:
    src = _source_kind(v, where, allow_clear)
    if src == "keypad":
        _object(v, where, "source")
        return KEYPAD
    o = _object(v, where, "source old new new_again")
    if src == "block":
        old, new, again = (_pin_block(o[k], _sub(where, k)) for k in ("old", "new", "new_again"))
        return BlockPinChange(old, new, again)
    old_p, new_p, again_p = (_clear_pin(o[k], _sub(where, k)) for k in ("old", "new", "new_again"))
    return ClearPinChange(old_p, new_p, again_p)


def _operator(v: object, where: str) -> Operator:
    o = _object(v, where, "id name")
    return Operator(
        id=_string(o["id"], _sub(where, "id"), _OPERATOR_ID,
                   f"1..{MAX_OPERATOR_ID_LEN} characters of A-Z a-z 0-9 . _ -"),
        name=_text(o["name"], _sub(where, "name"), MAX_OPERATOR_NAME_LEN))


def _item(v: object, where: str) -> Item:
    o = _object(v, where, "code qty price")
    code = _string(o["code"], _sub(where, "code"), _CODE,
                   f"1..{MAX_CODE_LEN} characters of A-Z a-z 0-9 . _ -")
    qty = o["qty"]
    if isinstance(qty, bool) or not isinstance(qty, int):
        _bad(_sub(where, "qty"), f"must be an integer, got {_kind(qty)}")
    if not 1 <= qty <= MAX_QTY:
        _bad(_sub(where, "qty"), f"must be from 1 to {MAX_QTY}")
    price = parse_money(o["price"], _sub(where, "price"))
    if not 1 <= price <= MAX_PRICE_FEN:
        _bad(_sub(where, "price"), f"must be from 0.01 to {format_money(MAX_PRICE_FEN)}")
    return Item(code, qty, price)


def _sale(a: dict[str, Any], allow_clear: bool) -> SaleArgs:
    o = _object(a, "args", "operator items", "pin preview")
    items_v = o["items"]
    if not isinstance(items_v, list):
        _bad("args.items", f"must be an array, got {_kind(items_v)}")
    if not 1 <= len(items_v) <= MAX_ITEMS:
        _bad("args.items", f"must hold 1 to {MAX_ITEMS} items")
    items = tuple(_item(x, f"args.items[{i}]") for i, x in enumerate(items_v))
    sale = SaleArgs(
        operator=_operator(o["operator"], "args.operator"),
        items=items,
        pin=_pin_source(o["pin"], "args.pin", allow_clear) if "pin" in o else None,
        preview=_bool(o["preview"], "args.preview") if "preview" in o else False)
    if sale.total_fen > MAX_TOTAL_FEN:
        _bad("args.items", f"the sale total must not exceed {format_money(MAX_TOTAL_FEN)}")
    return sale


def _card_read(a: dict[str, Any], allow_clear: bool) -> CardReadArgs:
    o = _object(a, "args", "address", "auth pin")
    address = o["address"]
    if not isinstance(address, str):
        _bad("args.address", f"must be a string, got {_kind(address)}")
    try:
        addr.parse(address)
    except SSCardError as exc:
        reason = exc.detail or "malformed"
        raise SSCardError("BAD_PARAMETER", reason, field="args.address", reason=reason) from None
    auth = o.get("auth", "key")
    if auth not in ("key", "pin"):
        _bad("args.auth", 'must be "key" or "pin"')
    pin = _pin_source(o["pin"], "args.pin", allow_clear) if "pin" in o else None
    return CardReadArgs(address, "pin" if auth == "pin" else "key", pin)


def _args(op: str, a: dict[str, Any], allow_clear: bool) -> OpArgs:
    if op in ("card.status", "card.read_basic", "account.query"):
        _object(a, "args")
        return NoArgs()
    if op == "card.read":
        return _card_read(a, allow_clear)
    if op == "pin.verify":
        o = _object(a, "args", "", "pin")
        return PinVerifyArgs(_pin_source(o["pin"], "args.pin", allow_clear) if "pin" in o else KEYPAD)
    if op == "pin.change":
        o = _object(a, "args", "", "pin")
        return PinChangeArgs(_pin_change_source(o["pin"], "args.pin", allow_clear) if "pin" in o else KEYPAD)
    if op == "sale":
        return _sale(a, allow_clear)
    assert op == "sale.void", op
    o = _object(a, "args", "setl_id", "operator")
    return SaleVoidArgs(
        setl_id=_string(o["setl_id"], "args.setl_id", _SETL_ID,
                        f"1..{MAX_SETL_ID_LEN} characters of A-Z a-z 0-9 . _ -"),
        operator=_operator(o["operator"], "args.operator") if "operator" in o else None)


# --- the request ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PosRequest:
    """A valid POS request. ``raw_args`` is the JSON as sent (PIN included: for the journal's
    argument hash, which leaves the PIN out, and never for a log)."""

    id: str
    op: str
    args: OpArgs
    reply_topic: str
    raw_args: Mapping[str, Any] = field(repr=False)


def check_reply_topic(topic: object, terminal_id: str) -> str:
    """``topic`` if it lies in this terminal's reply namespace, else REPLY_TOPIC_REFUSED."""
    def refuse(reason: str) -> NoReturn:
        raise SSCardError("REPLY_TOPIC_REFUSED", reason, reason=reason)

    if not isinstance(topic, str):
        refuse(f"the reply topic must be a string, got {_kind(topic)}")
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        refuse("the reply topic is not valid Unicode")
    if size > MAX_TOPIC_BYTES:
        refuse(f"the reply topic is longer than {MAX_TOPIC_BYTES} bytes")
    prefix = reply_prefix(terminal_id)
    if not topic.startswith(prefix):
        refuse(f"the reply topic must lie under {prefix}")
    for level in topic[len(prefix):].split("/"):
        if level in ("", ".", ".."):
            refuse("the reply topic has an empty, '.' or '..' level")
        if not _TOPIC_LEVEL.fullmatch(level):
            refuse("the reply topic levels may hold only A-Z a-z 0-9 . _ : @ - (no wildcards)")
    return topic


def parse_request(payload: bytes, *, terminal_id: str, response_topic: str | None, max_payload: int,
                  allow_clear_pin: bool = False) -> PosRequest:
    """Parse and check one POS request; :class:`PosRequestRejected` on anything wrong, carrying the
    error, the id (when one could be read) and where to answer (None: drop)."""
    reply_topic: str | None = None
    request_id: str | None = None

    def reject(err: SSCardError) -> NoReturn:
        raise PosRequestRejected(err, request_id=request_id, reply_topic=reply_topic)

    if response_topic:  # an empty Response Topic (some 3.1.1 bridges) counts as none
        try:
            reply_topic = check_reply_topic(response_topic, terminal_id)
        except SSCardError as exc:
            reject(exc)
    try:
        if not isinstance(payload, bytes | bytearray | memoryview):
            _bad("", "the payload is not bytes")
        if len(payload) > max_payload:
            raise SSCardError("PAYLOAD_TOO_LARGE", f"more than {max_payload} bytes",
                              max_bytes=max_payload, reason=f"the request exceeds {max_payload} bytes")
        try:
            text = bytes(payload).decode("utf-8")
        except UnicodeDecodeError:
            _bad("", "the payload is not UTF-8")
        try:
            doc = jsonwire.loads(text)
        except RecursionError:
            _bad("", "the JSON is nested too deeply")
        except ValueError:  # JSONDecodeError, duplicate keys, NaN, integers beyond the digit limit
            _bad("", "the payload is not valid JSON (or repeats a key, or holds NaN/Infinity)")
        if not isinstance(doc, dict):
            _bad("", f"the request must be a JSON object, got {_kind(doc)}")
        rid = doc.get("id")
        if isinstance(rid, str) and _ID.fullmatch(rid):
            request_id = rid
        if "reply_to" in doc:
            try:
                to = check_reply_topic(doc["reply_to"], terminal_id)
            except SSCardError:
                if reply_topic is None:
                    raise
                _bad("reply_to", "outside this terminal's reply namespace", "REPLY_TOPIC_REFUSED")
            if reply_topic is None:
                reply_topic = to
        if reply_topic is None:
            raise SSCardError("REPLY_TOPIC_REFUSED", "no reply topic",
                              reason="no Response Topic and no reply_to: nowhere to answer")
        _object(doc, "", "id op args", "reply_to")
        if request_id is None:
            _bad("id", f"must be a string of 1..{MAX_ID_LEN} characters of A-Z a-z 0-9 . _ : -")
        op = doc["op"]
        if not isinstance(op, str):
            _bad("op", f"must be a string, got {_kind(op)}")
        if op not in OPS:
            _bad("op", f"unknown operation (known: {', '.join(OPS)})", "UNKNOWN_OP")
        raw_args = doc["args"]
        if not isinstance(raw_args, dict):
            _bad("args", f"must be an object, got {_kind(raw_args)}")
        args = _args(op, raw_args, allow_clear_pin)
    except SSCardError as exc:
        reject(exc)
    return PosRequest(request_id, op, args, reply_topic, raw_args)


# --- replies -------------------------------------------------------------------------------------


def _check_json(v: Any, where: str = "result") -> None:
    """Plain JSON without floats (money is a string) and with string keys; TypeError otherwise."""
    if v is None or isinstance(v, bool | int | str):
        return
    if isinstance(v, float):
        raise TypeError(f"{where} holds a float (money is a decimal string)")
    if isinstance(v, list | tuple):
        for i, x in enumerate(v):
            _check_json(x, f"{where}[{i}]")
        return
    if isinstance(v, Mapping):
        for k, x in v.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a non-string key")
            _check_json(x, f"{where}.{k}")
        return
    raise TypeError(f"{where} holds a {type(v).__name__}")


def ok_reply(request_id: str | None, result: Mapping[str, Any]) -> bytes:
    """``{"id", "ok": true, "result"}``. TypeError on a result that is not plain JSON or holds a
    float; UnicodeEncodeError on text that is not valid Unicode."""
    if not isinstance(result, Mapping):
        raise TypeError("a result is a JSON object")
    _check_json(result)
    return jsonwire.dumps({"id": request_id, "ok": True, "result": dict(result)})


def _internal_reply(request_id: str | None) -> bytes:
    return jsonwire.dumps({"id": request_id, "ok": False, "error": SSCardError("INTERNAL_ERROR").to_dict()})


def error_reply(request_id: str | None, error: SSCardError) -> bytes:
    """``{"id", "ok": false, "error": {"code", "compat_code", "message", "message_zh", ...}}``.
    Details that are not plain JSON make it an INTERNAL_ERROR reply (logged) rather than fail."""
    try:
        body = error.to_dict()
        _check_json(body, "error")
        return jsonwire.dumps({"id": request_id, "ok": False, "error": body})
    except (TypeError, ValueError, UnicodeError) as exc:
        log.error("pos.error_reply_unencodable", code=error.code, error_type=type(exc).__name__)
        return _internal_reply(request_id)


# --- dispatch ------------------------------------------------------------------------------------

Handler: TypeAlias = Callable[[PosRequest], Awaitable[Mapping[str, Any]]]


class StoredReply(Exception):
    """Raised by a handler to answer with a reply stored earlier (a repeated ``sale``/``sale.void``
    request id): ``reply`` is ``{"ok": ..., "result"|"error": ...}``; the request's id is put in."""

    def __init__(self, reply: Mapping[str, Any]) -> None:
        super().__init__("stored reply")
        self.reply = reply


@dataclass(frozen=True)
class Outcome:
    """What the transport does with one request: publish ``payload`` on ``topic`` with
    ``correlation_data`` echoed, or (``topic`` None) nothing — the drop is already logged."""

    topic: str | None
    payload: bytes | None
    correlation_data: bytes | None
    request_id: str | None
    op: str | None
    code: str  # "OK" or the error code (for metrics)

    @property
    def dropped(self) -> bool:
        return self.topic is None


def _stored_body(req: PosRequest, reply: Mapping[str, Any]) -> tuple[str, bytes]:
    """A stored reply with this request's id (INTERNAL_ERROR, logged, if it cannot be sent)."""
    try:
        err = reply.get("error")
        code = "OK" if reply.get("ok") is True else str(err.get("code") if isinstance(err, Mapping) else "?")
        _check_json(reply, "stored reply")
        body = jsonwire.dumps({"id": req.id, **{k: v for k, v in reply.items() if k != "id"}})
    except (TypeError, ValueError, UnicodeError, AttributeError) as exc:
        log.error("pos.stored_reply_unusable", op=req.op, request_id=req.id, error_type=type(exc).__name__)
        return "INTERNAL_ERROR", _internal_reply(req.id)
    log.info("pos.stored_reply", op=req.op, request_id=req.id, code=code)
    return code, body


class Dispatcher:
    """op → async handler. A handler gets the parsed :class:`PosRequest` and returns the result
    object; an :class:`SSCardError` becomes an error reply, any other exception an INTERNAL_ERROR
    reply (logged with its traceback; the reply carries none). ``allow_clear_pin`` and
    ``max_payload`` may be changed on reload."""

    def __init__(self, *, terminal_id: str, max_payload: int, allow_clear_pin: bool = False,
                 handlers: Mapping[str, Handler] | None = None) -> None:
        self.terminal_id = terminal_id
        self.max_payload = max_payload
        self.allow_clear_pin = allow_clear_pin
        self._handlers: dict[str, Handler] = {}
        for op, h in (handlers or {}).items():
            self.register(op, h)

    def register(self, op: str, handler: Handler) -> None:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}")
        self._handlers[op] = handler

    async def handle(self, payload: bytes, *, response_topic: str | None = None,
                     correlation_data: bytes | None = None) -> Outcome:
        """One request in, one :class:`Outcome` out. Never raises (but for cancellation)."""
        try:
            req = parse_request(payload, terminal_id=self.terminal_id, response_topic=response_topic,
                                max_payload=self.max_payload, allow_clear_pin=self.allow_clear_pin)
        except PosRequestRejected as rej:
            ev = log.warning if rej.reply_topic is None else log.info
            ev("pos.request_dropped" if rej.reply_topic is None else "pos.request_refused",
               code=rej.error.code, field=rej.error.details.get("field"),
               reason=rej.error.details.get("reason"), request_id=rej.request_id, size=len(payload))
            return Outcome(rej.reply_topic, None if rej.reply_topic is None else rej.reply(),
                           correlation_data, rej.request_id, None, rej.error.code)
        # The caller runs each request in its own task: these tag every line it logs.
        structlog.contextvars.bind_contextvars(request_id=req.id, op=req.op)
        handler = self._handlers.get(req.op)
        code = "OK"
        try:
            if handler is None:
                _bad("op", "this operation is not served by this daemon", "UNKNOWN_OP")
            result = await handler(req)
            body = ok_reply(req.id, result)
        except StoredReply as stored:
            code, body = _stored_body(req, stored.reply)
        except SSCardError as exc:
            code = exc.code
            body = error_reply(req.id, exc)
            log.info("pos.op_failed", op=req.op, request_id=req.id, code=exc.code)
        except Exception as exc:
            code = "INTERNAL_ERROR"
            body = _internal_reply(req.id)
            log.error("pos.internal_error", op=req.op, request_id=req.id, error_type=type(exc).__name__,
                      exc_info=True)
        return Outcome(req.reply_topic, body, correlation_data, req.id, req.op, code)
