"""The POS message layer: request parsing, argument schemas, PIN blocks, replies, dispatch."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apdu_specs import crypto
from sscardd import pos_api as P
from sscardd.config import Secret
from sscardd.errors import SSCardError
from sscardd.session import PinPolicy

TID = "370200000001"
RT = f"sscard/v1/term/{TID}/reply/pos-1"
SSN = "370202199001011237"
KEY = bytes(range(16))
MAX = 65536
OPERATOR = {"id": "op01", "name": "王小明"}
ITEMS = [{"code": "XA01AAA0012", "qty": 2, "price": "12.50"}]


def enc(obj: Any) -> bytes:
    return json.dumps(obj).encode()  # \u escapes: lone surrogates reach the parser


def req(op: str, args: Any, rid: Any = "r-1", **extra: Any) -> bytes:
    return enc({"id": rid, "op": op, "args": args, **extra})


def parse(payload: bytes, response_topic: str | None = RT, allow_clear: bool = False,
          max_payload: int = MAX) -> P.PosRequest:
    return P.parse_request(payload, terminal_id=TID, response_topic=response_topic, max_payload=max_payload,
                           allow_clear_pin=allow_clear)


def rejected(payload: bytes, response_topic: str | None = RT, **kw: Any) -> P.PosRequestRejected:
    with pytest.raises(P.PosRequestRejected) as ei:
        parse(payload, response_topic, **kw)
    return ei.value


def block(pin: str, ssn: str = SSN, key: bytes = KEY) -> str:
    return crypto.iso9564_format4_encipher(key, pin, ssn[:17]).hex()


# --- happy paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "args", "expected"), [
    ("card.status", {}, P.NoArgs()),
    ("card.read_basic", {}, P.NoArgs()),
    ("account.query", {}, P.NoArgs()),
    ("card.read", {"address": "DF04EF05|84|$"}, P.CardReadArgs("DF04EF05|84|$")),
    ("card.read", {"address": "DF01EF0A|37|$", "auth": "pin", "pin": {"source": "keypad"}},
     P.CardReadArgs("DF01EF0A|37|$", "pin", P.KEYPAD)),
    ("pin.verify", {}, P.PinVerifyArgs(P.KEYPAD)),
    ("pin.verify", {"pin": {"source": "block", "block": "00" * 16}},
     P.PinVerifyArgs(P.BlockPin(bytes(16)))),
    ("pin.change", {}, P.PinChangeArgs(P.KEYPAD)),
    ("pin.change", {"pin": {"source": "block", "old": "01" * 16, "new": "02" * 16, "new_again": "03" * 16}},
     P.PinChangeArgs(P.BlockPinChange(b"\x01" * 16, b"\x02" * 16, b"\x03" * 16))),
    ("sale", {"operator": OPERATOR, "items": ITEMS, "pin": {"source": "keypad"}, "preview": True},
     P.SaleArgs(P.Operator("op01", "王小明"), (P.Item("XA01AAA0012", 2, 1250),), P.KEYPAD, True)),
    ("sale", {"operator": OPERATOR, "items": ITEMS},
     P.SaleArgs(P.Operator("op01", "王小明"), (P.Item("XA01AAA0012", 2, 1250),), None, False)),
    ("sale.void", {"setl_id": "S202406010000000001"}, P.SaleVoidArgs("S202406010000000001")),
    ("sale.void", {"setl_id": "S1", "operator": OPERATOR},
     P.SaleVoidArgs("S1", P.Operator("op01", "王小明"))),
])
def test_every_op_parses(op: str, args: dict[str, Any], expected: P.OpArgs) -> None:
    r = parse(req(op, args))
    assert (r.id, r.op, r.args, r.reply_topic, dict(r.raw_args)) == ("r-1", op, expected, RT, args)


def test_sale_amounts() -> None:
    items = [{"code": "A", "qty": 3, "price": "0.99"}, {"code": "B", "qty": 1, "price": "100.00"}]
    a = parse(req("sale", {"operator": OPERATOR, "items": items})).args
    assert isinstance(a, P.SaleArgs)
    assert [i.amount_fen for i in a.items] == [297, 10000] and a.total_fen == 10297


def test_clear_pin_when_allowed() -> None:
    a = parse(req("pin.verify", {"pin": {"source": "clear", "pin": "246810"}}), allow_clear=True).args
    assert a == P.PinVerifyArgs(P.ClearPin("246810"))
    change = {"source": "clear", "old": "2468", "new": "1357", "new_again": "1357"}
    c = parse(req("pin.change", {"pin": change}), allow_clear=True).args
    assert c == P.PinChangeArgs(P.ClearPinChange("2468", "1357", "1357"))
    assert "2468" not in repr(c) and "1357" not in repr(c)


def test_reprs_hide_pins_and_names() -> None:
    r = parse(req("sale", {"operator": OPERATOR, "items": ITEMS,
                           "pin": {"source": "clear", "pin": "975310"}}), allow_clear=True)
    assert "975310" not in repr(r) and "王小明" not in repr(r)


# --- reply topics ----------------------------------------------------------------------------------


def test_reply_to_for_mqtt311() -> None:
    r = parse(req("card.status", {}, reply_to=RT + "/x"), response_topic=None)
    assert r.reply_topic == RT + "/x"


def test_response_topic_wins_over_reply_to() -> None:
    r = parse(req("card.status", {}, reply_to=RT + "/x"))
    assert r.reply_topic == RT


def test_bad_reply_to_with_good_response_topic_is_answered() -> None:
    e = rejected(req("card.status", {}, reply_to="sscard/v1/term/999999999999/reply/x"))
    assert e.action == "reply" and e.reply_topic == RT and e.error.code == "REPLY_TOPIC_REFUSED"
    assert json.loads(e.reply())["id"] == "r-1"


BAD_TOPICS = [
    "sscard/v1/term/999999999999/reply/x",  # another terminal's namespace
    f"sscard/v1/term/{TID}/status",
    f"sscard/v1/term/{TID}/reply/",  # nothing under the prefix
    f"sscard/v1/term/{TID}/reply/+",
    f"sscard/v1/term/{TID}/reply/#",
    f"sscard/v1/term/{TID}/reply/a/+/b",
    f"sscard/v1/term/{TID}/reply/../../999999999999/reply/x",
    f"sscard/v1/term/{TID}/reply/a//b",
    f"sscard/v1/term/{TID}/reply/a/",
    f"sscard/v1/term/{TID}/reply/a\x00b",
    f"sscard/v1/term/{TID}/reply/" + "x" * 230,  # over 256 bytes
    f"$SYS/sscard/v1/term/{TID}/reply/x",
    "",
]


@pytest.mark.parametrize("topic", BAD_TOPICS)
def test_reply_topic_outside_namespace_is_dropped(topic: str) -> None:
    e = rejected(req("card.status", {}), response_topic=topic)
    assert e.action == "drop" and e.reply_topic is None and e.error.code == "REPLY_TOPIC_REFUSED"
    e = rejected(req("card.status", {}, reply_to=topic), response_topic=None)
    assert e.action == "drop" and e.error.code == "REPLY_TOPIC_REFUSED"


@pytest.mark.parametrize("reply_to", [None, 5, ["x"], {"t": RT}])
def test_reply_to_wrong_type_is_dropped(reply_to: Any) -> None:
    e = rejected(req("card.status", {}, reply_to=reply_to), response_topic=None)
    assert e.action == "drop" and e.error.code == "REPLY_TOPIC_REFUSED"


def test_no_reply_topic_at_all_is_dropped() -> None:
    for rt in (None, ""):
        e = rejected(req("card.status", {}), response_topic=rt)
        assert e.action == "drop" and e.error.code == "REPLY_TOPIC_REFUSED"
    assert parse(req("card.status", {}, reply_to=RT), response_topic="").reply_topic == RT


def test_longest_allowed_topic() -> None:
    prefix = P.reply_prefix(TID)
    topic = prefix + "x" * (P.MAX_TOPIC_BYTES - len(prefix))
    assert parse(req("card.status", {}), response_topic=topic).reply_topic == topic


# --- malformed requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(("payload", "code", "field"), [
    (b"\xff\xfe{}", "BAD_REQUEST", ""),
    (b"", "BAD_REQUEST", ""),
    (b"{", "BAD_REQUEST", ""),
    (b'{"id": "a", "id": "b", "op": "card.status", "args": {}}', "BAD_REQUEST", ""),
    (b'{"id": "a", "op": "card.status", "args": {"x": NaN}}', "BAD_REQUEST", ""),
    (b"[1, 2]", "BAD_REQUEST", ""),
    (b'"card.status"', "BAD_REQUEST", ""),
    (b"null", "BAD_REQUEST", ""),
    (b"[" * 30_000 + b"]" * 30_000, "BAD_REQUEST", ""),
    (b'{"op": "card.status", "args": {}}', "BAD_REQUEST", "id"),
    (b'{"id": "a", "args": {}}', "BAD_REQUEST", "op"),
    (b'{"id": "a", "op": "card.status"}', "BAD_REQUEST", "args"),
    (b'{"id": "a", "op": "card.status", "args": {}, "extra": 1}', "BAD_REQUEST", "extra"),
    (b'{"id": "a", "op": "card.status", "args": {}, "123456": 1}', "BAD_REQUEST", ""),
    (b'{"id": 5, "op": "card.status", "args": {}}', "BAD_REQUEST", "id"),
    (b'{"id": "", "op": "card.status", "args": {}}', "BAD_REQUEST", "id"),
    (b'{"id": "a b", "op": "card.status", "args": {}}', "BAD_REQUEST", "id"),
    (b'{"id": "' + b"x" * 65 + b'", "op": "card.status", "args": {}}', "BAD_REQUEST", "id"),
    (b'{"id": "a", "op": 7, "args": {}}', "BAD_REQUEST", "op"),
    (b'{"id": "a", "op": "card.format", "args": {}}', "UNKNOWN_OP", "op"),
    (b'{"id": "a", "op": "card.status", "args": []}', "BAD_REQUEST", "args"),
    (b'{"id": "a", "op": "card.status", "args": null}', "BAD_REQUEST", "args"),
    (b'{"id": "a", "op": "card.status", "args": {"x": 1}}', "BAD_REQUEST", "args.x"),
])
def test_malformed_requests_get_named_errors(payload: bytes, code: str, field: str) -> None:
    e = rejected(payload)
    assert e.action == "reply" and e.error.code == code and e.error.details["field"] == field
    body = json.loads(e.reply())
    assert body["ok"] is False and body["error"]["code"] == code and body["error"]["reason"]


def test_id_is_echoed_when_usable_and_null_otherwise() -> None:
    assert json.loads(rejected(req("card.format", {})).reply())["id"] == "r-1"
    assert json.loads(rejected(req("card.format", {}, rid=5)).reply())["id"] is None
    assert json.loads(rejected(b"{").reply())["id"] is None


def test_oversize() -> None:
    payload = req("card.read", {"address": "DF04EF05|84|$"}) + b" " * 2000
    e = rejected(payload, max_payload=1024)
    assert e.action == "reply" and e.error.code == "PAYLOAD_TOO_LARGE" and e.request_id is None
    assert json.loads(e.reply())["error"]["max_bytes"] == 1024
    e = rejected(payload, response_topic=None, max_payload=1024)  # reply_to is not read: dropped
    assert e.action == "drop" and e.error.code == "PAYLOAD_TOO_LARGE"
    assert parse(payload, max_payload=len(payload)).op == "card.read"


@pytest.mark.parametrize(("op", "args", "field", "code"), [
    ("card.read", {}, "args.address", "BAD_REQUEST"),
    ("card.read", {"address": 5}, "args.address", "BAD_REQUEST"),
    ("card.read", {"address": "DF09EF05|84|$"}, "args.address", "BAD_PARAMETER"),
    ("card.read", {"address": "DF04EF05|84|$", "auth": "psam"}, "args.auth", "BAD_REQUEST"),
    ("pin.verify", {"pin": "123456"}, "args.pin", "BAD_REQUEST"),
    ("pin.verify", {"pin": {"source": "voice"}}, "args.pin.source", "BAD_REQUEST"),
    ("pin.verify", {"pin": {"source": "keypad", "pin": "1234"}}, "args.pin.pin", "BAD_REQUEST"),
    ("pin.verify", {"pin": {"source": "block"}}, "args.pin.block", "BAD_REQUEST"),
    ("pin.verify", {"pin": {"source": "block", "block": "00" * 15}}, "args.pin.block", "INVALID_INPUT"),
    ("pin.verify", {"pin": {"source": "block", "block": "zz" * 16}}, "args.pin.block", "INVALID_INPUT"),
    ("pin.change", {"pin": {"source": "block", "old": "00" * 16, "new": "00" * 16}}, "args.pin.new_again",
     "BAD_REQUEST"),
    ("sale", {"items": ITEMS}, "args.operator", "BAD_REQUEST"),
    ("sale", {"operator": OPERATOR}, "args.items", "BAD_REQUEST"),
    ("sale", {"operator": OPERATOR, "items": ITEMS, "preview": "false"}, "args.preview", "BAD_REQUEST"),
    ("sale", {"operator": OPERATOR, "items": ITEMS, "preview": 0}, "args.preview", "BAD_REQUEST"),
    ("sale", {"operator": OPERATOR, "items": ITEMS, "tip": "1.00"}, "args.tip", "BAD_REQUEST"),
    ("sale", {"operator": {"id": "op01"}, "items": ITEMS}, "args.operator.name", "BAD_REQUEST"),
    ("sale", {"operator": {"id": "op 01", "name": "x"}, "items": ITEMS}, "args.operator.id", "BAD_REQUEST"),
    ("sale", {"operator": {"id": "op01", "name": "a\nb"}, "items": ITEMS}, "args.operator.name",
     "BAD_REQUEST"),
    ("sale", {"operator": {"id": "op01", "name": " "}, "items": ITEMS}, "args.operator.name", "BAD_REQUEST"),
    ("sale", {"operator": {"id": "op01", "name": "\ud800"}, "items": ITEMS}, "args.operator.name",
     "BAD_REQUEST"),
    ("sale", {"operator": OPERATOR, "items": {}}, "args.items", "BAD_REQUEST"),
    ("sale", {"operator": OPERATOR, "items": []}, "args.items", "BAD_REQUEST"),
    ("sale", {"operator": OPERATOR, "items": ITEMS * 101}, "args.items", "BAD_REQUEST"),
    ("sale", {"operator": OPERATOR, "items": [{"code": "A", "qty": 1}]}, "args.items[0].price",
     "BAD_REQUEST"),
    ("sale", {"operator": OPERATOR, "items": [{"code": "A", "qty": 1, "price": "1.00", "name": "x"}]},
     "args.items[0].name", "BAD_REQUEST"),
    ("sale", {"operator": OPERATOR, "items": [{"code": "", "qty": 1, "price": "1.00"}]},
     "args.items[0].code", "BAD_REQUEST"),
    ("sale", {"operator": OPERATOR, "items": [{"code": "A|B", "qty": 1, "price": "1.00"}]},
     "args.items[0].code", "BAD_REQUEST"),
    ("sale.void", {}, "args.setl_id", "BAD_REQUEST"),
    ("sale.void", {"setl_id": 12}, "args.setl_id", "BAD_REQUEST"),
    ("sale.void", {"setl_id": "S1", "amount": "1.00"}, "args.amount", "BAD_REQUEST"),
])
def test_bad_args(op: str, args: Any, field: str, code: str) -> None:
    e = rejected(req(op, args))
    assert (e.error.code, e.error.details["field"]) == (code, field)
    assert json.loads(e.reply())["id"] == "r-1"


@pytest.mark.parametrize("qty", [0, -1, 10_001, 1.0, 2.5, "1", True, None])
def test_qty_refused(qty: Any) -> None:
    e = rejected(req("sale", {"operator": OPERATOR, "items": [{"code": "A", "qty": qty, "price": "1.00"}]}))
    assert e.error.details["field"] == "args.items[0].qty"


# --- money -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "fen"), [("0.00", 0), ("0.01", 1), ("12.50", 1250), ("99999.99", 9_999_999),
                                           ("1234567890.00", 123_456_789_000)])
def test_money_accepted(text: str, fen: int) -> None:
    assert P.parse_money(text) == fen
    assert P.format_money(fen) == text


@pytest.mark.parametrize("value", ["1.5", "1", "1.", ".50", "1.500", "-1.00", "+1.00", "1e3", "1E3", "01.00",
                                   " 1.00", "1.00\n", "1,00", "１.００", "٣.00", "NaN", "Infinity", "",
                                   1.5, 12, 1e3, True, None, ["1.00"], {"yuan": "1.00"}])
def test_money_refused(value: Any) -> None:
    with pytest.raises(SSCardError) as ei:
        P.parse_money(value, "x.price")
    assert ei.value.code == "BAD_REQUEST" and ei.value.details["field"] == "x.price"
    e = rejected(req("sale", {"operator": OPERATOR, "items": [{"code": "A", "qty": 1, "price": value}]}))
    assert e.error.code == "BAD_REQUEST" and e.error.details["field"] == "args.items[0].price"


def test_float_price_in_raw_json_refused() -> None:
    raw = b'{"id":"a","op":"sale","args":{"operator":{"id":"o","name":"n"},' \
          b'"items":[{"code":"A","qty":1,"price":12.50}]}}'
    assert rejected(raw).error.details["field"] == "args.items[0].price"


@pytest.mark.parametrize(("price", "qty", "ok"), [
    ("0.00", 1, False), ("0.01", 1, True), ("99999.99", 1, True), ("100000.00", 1, False),
    ("99999.99", 10, True),  # 999999.90 total
    ("99999.99", 11, False),  # over the sale total limit
])
def test_amount_limits(price: str, qty: int, ok: bool) -> None:
    payload = req("sale", {"operator": OPERATOR, "items": [{"code": "A", "qty": qty, "price": price}]})
    if ok:
        parse(payload)
    else:
        assert rejected(payload).error.code == "BAD_REQUEST"


def test_format_money_negative_and_types() -> None:
    assert P.format_money(-300) == "-3.00"
    with pytest.raises(TypeError):
        P.format_money(1.5)  # type: ignore[arg-type]


# --- PINs ------------------------------------------------------------------------------------------


def test_pin_block_round_trip() -> None:
    for pin in ("1234", "246810", "123456789012"):
        assert P.decode_pin_block(block(pin), KEY, SSN) == pin
        assert P.decode_pin_block(bytes.fromhex(block(pin)), Secret(KEY), SSN) == pin
    ssn_x = "11010519491231002X"
    assert P.decode_pin_block(block("8642", ssn_x), KEY, ssn_x) == "8642"


@pytest.mark.parametrize(("key", "ssn"), [(bytes(16), SSN), (KEY, "370202199001011245"), (KEY + KEY, SSN)])
def test_pin_block_wrong_key_or_card(key: bytes, ssn: str) -> None:
    with pytest.raises(SSCardError) as ei:
        P.decode_pin_block(block("246810"), key, ssn)
    assert ei.value.code == "INVALID_INPUT" and ei.value.details == {"reason": "PIN block does not decipher"}
    assert "246810" not in str(ei.value) and "2468" not in json.dumps(ei.value.to_dict())


@pytest.mark.parametrize(("blk", "key", "ssn"), [
    ("00" * 15, KEY, SSN), ("zz" * 16, KEY, SSN), (b"\x00" * 15, KEY, SSN),
    ("00" * 16, None, SSN), ("00" * 16, KEY, "3702021990"), ("00" * 16, KEY, "37020219900101123A"),
])
def test_pin_block_bad_inputs(blk: Any, key: Any, ssn: str) -> None:
    with pytest.raises(SSCardError) as ei:
        P.decode_pin_block(blk, key, ssn)
    assert ei.value.code == "INVALID_INPUT" and SSN not in str(ei.value)


def test_resolve_pin() -> None:
    pol = PinPolicy()
    assert P.resolve_pin(None, key=KEY, ssn=SSN, policy=pol) is None
    assert P.resolve_pin(P.KEYPAD, key=None, ssn=SSN, policy=pol) is None
    assert P.resolve_pin(P.BlockPin(bytes.fromhex(block("2468"))), key=KEY, ssn=SSN, policy=pol) == "2468"
    assert P.resolve_pin(P.ClearPin("97531"), key=None, ssn=SSN, policy=pol) == "97531"
    with pytest.raises(SSCardError) as ei:
        P.resolve_pin(P.BlockPin(bytes.fromhex(block("2468"))), key=KEY, ssn=SSN,
                      policy=PinPolicy(min_len=6, max_len=6))
    assert ei.value.code == "PIN_LENGTH"
    old, new, again = (bytes.fromhex(block(p)) for p in ("2468", "1357", "1357"))
    change = P.BlockPinChange(old, new, again)
    assert P.resolve_pin_change(change, key=KEY, ssn=SSN, policy=pol) == ("2468", "1357", "1357")
    assert P.resolve_pin_change(P.KEYPAD, key=KEY, ssn=SSN, policy=pol) is None
    assert P.resolve_pin_change(P.ClearPinChange("2468", "1357", "1357"), key=None, ssn=SSN,
                                policy=pol) == ("2468", "1357", "1357")


@pytest.mark.parametrize(("op", "args"), [
    ("pin.verify", {"pin": {"source": "clear", "pin": "975310"}}),
    ("card.read", {"address": "DF04EF05|84|$", "auth": "pin", "pin": {"source": "clear", "pin": "975310"}}),
    ("sale", {"operator": OPERATOR, "items": ITEMS, "pin": {"source": "clear", "pin": "975310"}}),
    ("pin.change", {"pin": {"source": "clear", "old": "975310", "new": "975311", "new_again": "975311"}}),
    ("pin.verify", {"pin": {"source": "clear", "pin": "975310", "extra": 1}}),
    ("pin.verify", {"pin": {"source": "clear", "975310": 1}}),
])
def test_clear_pin_refused_without_echo(op: str, args: dict[str, Any]) -> None:
    e = rejected(req(op, args))
    assert e.error.code == "CLEAR_PIN_REFUSED" and e.error.details["field"] == "args.pin"
    out = e.reply().decode()
    assert "975310" not in out and "975311" not in out and "975310" not in str(e)
    assert "allow_clear_over_mqtt" in out and "明文密码" in out


@pytest.mark.parametrize("pin", ["12a4", "123", "1234567890123", "", 123456, "１２３４"])
def test_bad_clear_pin_not_echoed(pin: Any) -> None:
    e = rejected(req("pin.verify", {"pin": {"source": "clear", "pin": pin}}), allow_clear=True)
    assert e.error.code == "PIN_LENGTH"
    assert not isinstance(pin, str) or not pin or pin not in e.reply().decode()


# --- replies ---------------------------------------------------------------------------------------


def test_ok_reply() -> None:
    out = P.ok_reply("r-1", {"name": "张三", "balc": "12.50", "lines": [{"n": 1}], "flag": None})
    assert "张三".encode() in out
    assert json.loads(out) == {"id": "r-1", "ok": True,
                               "result": {"name": "张三", "balc": "12.50", "lines": [{"n": 1}], "flag": None}}


@pytest.mark.parametrize("result", [{"balc": 12.5}, {"x": [1, 2.0]}, {"x": {1: "a"}}, {"x": b"raw"}, ["x"]])
def test_ok_reply_refuses_floats_and_non_json(result: Any) -> None:
    with pytest.raises(TypeError):
        P.ok_reply("r-1", result)


def test_error_reply() -> None:
    out = json.loads(P.error_reply(None, SSCardError("PIN_WRONG", tries_left=2)))
    assert out == {"id": None, "ok": False, "error": {
        "code": "PIN_WRONG", "compat_code": -51, "message": "wrong PIN, 2 tries left",
        "message_zh": "密码错误，还可以尝试2次", "tries_left": 2}}
    out = json.loads(P.error_reply("r", SSCardError("CARD_STATUS", sw=0x6A82)))
    assert out["error"]["sw"] == "6A82" and out["error"]["compat_code"] == -27266
    bad = json.loads(P.error_reply("r", SSCardError("NO_CARD", weird=1.5)))
    assert bad["error"]["code"] == "INTERNAL_ERROR" and bad["id"] == "r"


# --- dispatch --------------------------------------------------------------------------------------


def make_dispatcher(**handlers: P.Handler) -> P.Dispatcher:
    return P.Dispatcher(terminal_id=TID, max_payload=MAX, handlers={k.replace("_", "."): v
                                                                    for k, v in handlers.items()})


async def test_dispatch_ok_and_errors() -> None:
    seen: list[P.PosRequest] = []

    async def status(r: P.PosRequest) -> dict[str, Any]:
        seen.append(r)
        return {"present": True}

    async def verify(r: P.PosRequest) -> dict[str, Any]:
        raise SSCardError("PIN_WRONG", tries_left=1)

    async def boom(r: P.PosRequest) -> dict[str, Any]:
        raise RuntimeError("secret 975310 in a traceback")

    async def floaty(r: P.PosRequest) -> dict[str, Any]:
        return {"balc": 1.5}

    d = make_dispatcher(card_status=status, pin_verify=verify, sale=boom, account_query=floaty)
    o = await d.handle(req("card.status", {}), response_topic=RT, correlation_data=b"c1")
    assert (o.topic, o.correlation_data, o.code) == (RT, b"c1", "OK")
    assert (o.op, o.request_id) == ("card.status", "r-1")
    assert o.payload is not None and json.loads(o.payload) == {"id": "r-1", "ok": True,
                                                               "result": {"present": True}}
    assert seen[0].args == P.NoArgs()

    o = await d.handle(req("pin.verify", {}), response_topic=RT)
    assert o.code == "PIN_WRONG" and o.payload is not None
    assert json.loads(o.payload)["error"]["tries_left"] == 1

    with structlog.testing.capture_logs() as logs:
        o = await d.handle(req("sale", {"operator": OPERATOR, "items": ITEMS}), response_topic=RT)
    assert o.code == "INTERNAL_ERROR" and o.payload is not None
    text = o.payload.decode()
    assert "Traceback" not in text and "975310" not in text and "RuntimeError" not in text
    assert json.loads(text)["error"]["compat_code"] == -5
    assert any(e["event"] == "pos.internal_error" and e["error_type"] == "RuntimeError" for e in logs)

    o = await d.handle(req("account.query", {}), response_topic=RT)
    assert o.code == "INTERNAL_ERROR"

    o = await d.handle(req("card.read_basic", {}), response_topic=RT)  # no handler registered
    assert o.code == "UNKNOWN_OP" and o.payload is not None and json.loads(o.payload)["id"] == "r-1"


async def test_dispatch_refusals_and_drops_are_logged_without_secrets() -> None:
    d = make_dispatcher()
    with structlog.testing.capture_logs() as logs:
        o = await d.handle(req("pin.verify", {"pin": {"source": "clear", "pin": "975310"}}),
                           response_topic=RT, correlation_data=b"c")
        assert o.topic == RT and o.code == "CLEAR_PIN_REFUSED" and not o.dropped
        o = await d.handle(req("card.status", {}), response_topic="sscard/v1/term/999999999999/reply/x")
        assert o.dropped and o.payload is None and o.code == "REPLY_TOPIC_REFUSED"
        o = await d.handle(b"\x00garbage", response_topic=None)
        assert o.dropped and o.code == "BAD_REQUEST"
    events = [e["event"] for e in logs]
    assert events == ["pos.request_refused", "pos.request_dropped", "pos.request_dropped"]
    assert "975310" not in repr(logs)


async def test_dispatcher_reload_settings() -> None:
    async def verify(r: P.PosRequest) -> dict[str, Any]:
        return {"verified": True}

    d = make_dispatcher(pin_verify=verify)
    payload = req("pin.verify", {"pin": {"source": "clear", "pin": "975310"}})
    assert (await d.handle(payload, response_topic=RT)).code == "CLEAR_PIN_REFUSED"
    d.allow_clear_pin = True
    assert (await d.handle(payload, response_topic=RT)).code == "OK"
    with pytest.raises(ValueError):
        d.register("card.format", verify)


# --- properties ------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20)
pin_sources = st.fixed_dictionaries({"source": st.sampled_from(["keypad", "block", "clear", "x"])},
                                    optional={"block": json_values | st.just("ab" * 16),
                                              "pin": json_values | st.just("1234"),
                                              "old": json_values, "new": json_values,
                                              "new_again": json_values})
items = st.fixed_dictionaries({}, optional={"code": json_values | st.just("A1"),
                                            "qty": json_values | st.integers(0, 20_000),
                                            "price": json_values | st.from_regex(r"-?[0-9]{1,12}\.[0-9]{1,3}",
                                                                                 fullmatch=True)})
args_values = st.fixed_dictionaries({}, optional={
    "address": json_values | st.sampled_from(["DF04EF05|84|$", "DF04EF05|84:2|$", "SSSEEF05|$"])
    | st.text(alphabet="SDEF0123456789ABC|$:", max_size=40),
    "auth": json_values | st.sampled_from(["key", "pin"]),
    "pin": json_values | pin_sources,
    "operator": json_values | st.fixed_dictionaries({"id": json_values | st.just("o1"),
                                                     "name": json_values}),
    "items": json_values | st.lists(items, max_size=3),
    "preview": json_values,
    "setl_id": json_values | st.just("S1"),
}) | json_values
envelopes = st.fixed_dictionaries({}, optional={
    "id": json_values | st.just("r-1"),
    "op": json_values | st.sampled_from(P.OPS),
    "args": args_values,
    "reply_to": json_values | st.sampled_from([RT, RT + "/+", "x"]),
}) | json_values


def check_parse(payload: bytes, response_topic: str | None, allow_clear: bool) -> None:
    try:
        r = parse(payload, response_topic, allow_clear, max_payload=4096)
    except P.PosRequestRejected as e:
        assert isinstance(e.error, SSCardError)
        assert (e.action == "drop") == (e.reply_topic is None)
        if e.reply_topic is not None:
            body = json.loads(e.reply())
            assert body["ok"] is False and body["id"] == e.request_id
            assert body["error"]["code"] != "INTERNAL_ERROR"
        return
    assert r.op in P.OPS and r.reply_topic.startswith(P.reply_prefix(TID))
    assert json.loads(P.ok_reply(r.id, {"ok": True}))["id"] == r.id


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=5000), rt=st.sampled_from([RT, None, "x"]))
def test_arbitrary_bytes(payload: bytes, rt: str | None) -> None:
    check_parse(payload, rt, False)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=envelopes, rt=st.sampled_from([RT, None]), allow_clear=st.booleans(), ascii=st.booleans())
def test_arbitrary_json(doc: Any, rt: str | None, allow_clear: bool, ascii: bool) -> None:
    try:
        payload = json.dumps(doc, ensure_ascii=ascii, allow_nan=False).encode("utf-8", "surrogatepass")
    except ValueError:
        return
    check_parse(payload, rt, allow_clear)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from(P.OPS), args=args_values, allow_clear=st.booleans())
def test_arbitrary_args_through_dispatcher(op: str, args: Any, allow_clear: bool) -> None:
    async def echo(r: P.PosRequest) -> dict[str, Any]:
        return {"op": r.op}

    d = P.Dispatcher(terminal_id=TID, max_payload=MAX, allow_clear_pin=allow_clear,
                     handlers=dict.fromkeys(P.OPS, echo))
    try:
        payload = json.dumps({"id": "r-9", "op": op, "args": args}, allow_nan=False).encode()
    except ValueError:
        return
    o = asyncio.run(d.handle(payload, response_topic=RT))
    assert o.topic == RT and o.payload is not None
    body = json.loads(o.payload)
    assert body["id"] == "r-9" and o.code != "INTERNAL_ERROR"
    assert body["ok"] == (o.code == "OK")
