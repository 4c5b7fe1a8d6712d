"""Command/response APDUs, the command table and the builders of :mod:`apdu_specs.apdu`."""

from __future__ import annotations

import construct as cs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from apdu_specs import apdu as A
from apdu_specs import crypto
from apdu_specs.apdu import ApduFormatError, CommandApdu, ResponseApdu
from apdu_specs.filesystem import SSSE_AID
from apdu_specs.status import SW


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


# --- CommandApdu.parse: ISO 7816-4 short cases ---------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "data", "le"),
    [
        ("00200000", "", None),  # case 1 (VERIFY query)
        ("0084000008", "", 8),  # case 2
        ("00B2010012", "", 0x12),
        ("00C0000000", "", 256),  # case 2, Le 00 → 256
        ("00A4020002EF05", "EF05", None),  # case 3
        ("00A404000F 7378312E73682EC9E7BBE1B1A3D5CF", "7378312E73682EC9E7BBE1B1A3D5CF", None),
        ("00A404000F 7378312E73682EC9E7BBE1B1A3D5CF 00", "7378312E73682EC9E7BBE1B1A3D5CF", 256),  # case 4
        ("0088000010" + "11" * 16 + "08", "11" * 16, 8),
        ("00DC0000FF" + "AB" * 255, "AB" * 255, None),  # the longest case 3
        ("00DC0000FF" + "AB" * 255 + "00", "AB" * 255, 256),
        ("0020000001AA", "AA", None),
    ],
)
def test_parse_cases(raw: str, data: str, le: int | None) -> None:
    apdu = CommandApdu.parse(h(raw))
    b = h(raw)
    assert (apdu.cla, apdu.ins, apdu.p1, apdu.p2) == tuple(b[:4])
    assert apdu.data == h(data)
    assert apdu.le == le
    assert apdu.encode() == b


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "00",
        "00A402",  # 3 bytes: shorter than the header
        "00A4020002EF",  # Lc 2, one data byte
        "00A4020002EF0500AA",  # Lc 2, two bytes too many
        "00A4020003EF05",  # Lc 3, two data bytes
        "00B0000000 0100",  # extended Le
        "00D6000000 0002 ABCD",  # extended Lc
        "00D6000000 0001 AB 0000",
    ],
)
def test_parse_malformed(raw: str) -> None:
    with pytest.raises(ApduFormatError) as info:
        CommandApdu.parse(h(raw))
    assert info.value.sw == 0x6700 == SW.WRONG_LENGTH
    assert isinstance(info.value, ValueError)


def test_encode_errors() -> None:
    with pytest.raises(ApduFormatError):
        CommandApdu(0, 0xD6, 0, 0, bytes(256)).encode()
    with pytest.raises(ApduFormatError):
        CommandApdu(0, 0xB0, 0, 0, b"", 0).encode()
    with pytest.raises(ApduFormatError):
        CommandApdu(0, 0xB0, 0, 0, b"", 257).encode()


def test_str_and_secure_messaging() -> None:
    apdu = CommandApdu.parse(h("0084000008"))
    assert str(apdu) == "00 84 00 00 08"
    assert not apdu.secure_messaging
    assert CommandApdu(0x04, 0xDC, 0, 0x1B, b"\x00" * 4).secure_messaging
    assert CommandApdu(0x84, 0x24, 0, 0, b"\x00" * 4).secure_messaging
    assert not CommandApdu(0x80, 0x5E, 1, 0, b"\x12").secure_messaging


def test_apdu_format_error_custom_sw() -> None:
    assert ApduFormatError("x", SW.WRONG_DATA).sw == 0x6A80


# --- ResponseApdu --------------------------------------------------------------------------------


def test_response_apdu() -> None:
    r = ResponseApdu.parse(h("0304332E3030 9000"))
    assert (r.data, r.sw, r.sw1, r.sw2) == (h("0304332E3030"), 0x9000, 0x90, 0x00)
    assert r.encode() == h("0304332E30309000")
    r = ResponseApdu.parse(h("6C12"))
    assert (r.data, r.sw1, r.sw2) == (b"", 0x6C, 0x12)
    for raw in (b"", b"\x90"):
        with pytest.raises(ApduFormatError) as info:
            ResponseApdu.parse(raw)
        assert info.value.sw == SW.NO_PRECISE_DIAGNOSIS


# --- properties ------------------------------------------------------------------------------


@given(st.binary(max_size=262))
def test_parse_random_bytes(raw: bytes) -> None:
    try:
        apdu = CommandApdu.parse(raw)
    except ApduFormatError as exc:
        assert exc.sw == 0x6700
        return
    assert apdu.encode() == raw


apdus = st.builds(
    CommandApdu,
    st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255),
    st.binary(max_size=255), st.one_of(st.none(), st.integers(1, 256)),
)


@given(apdus)
def test_encode_parse_round_trip(apdu: CommandApdu) -> None:
    assert CommandApdu.parse(apdu.encode()) == apdu


@given(st.binary(max_size=300), st.integers(0, 0xFFFF))
def test_response_round_trip(data: bytes, sw: int) -> None:
    r = ResponseApdu(data, sw)
    assert ResponseApdu.parse(r.encode()) == r


# --- the command table ---------------------------------------------------------------------------


def test_command_table_unique() -> None:
    keys = [(c.cla, c.ins) for c in A.COMMANDS]
    assert len(keys) == len(set(keys))
    # the emulator dispatches with the secure-messaging bit masked off; still unique
    masked = [(c.cla & ~0x04, c.ins) for c in A.COMMANDS]
    assert len(masked) == len(set(masked))
    assert len({c.name for c in A.COMMANDS}) == len(A.COMMANDS)
    assert all(c.target in ("card", "psam", "both") for c in A.COMMANDS)


@pytest.mark.parametrize("spec", A.COMMANDS, ids=lambda c: c.name)
def test_every_command_builds(spec: A.CommandSpec) -> None:
    apdu = spec.build(0x01, 0x02)
    assert (apdu.cla, apdu.ins, apdu.p1, apdu.p2) == (spec.cla, spec.ins, 1, 2)
    assert CommandApdu.parse(apdu.encode()) == apdu
    with_bytes = spec.build(0, 0, b"\x01\x02\x03\x04", le=16)
    assert with_bytes.data == b"\x01\x02\x03\x04" and with_bytes.le == 16
    assert spec.build(cla=0x04 | spec.cla).cla == spec.cla | 0x04


@pytest.mark.parametrize(
    ("spec", "value", "hex_"),
    [
        (A.INTERNAL_AUTHENTICATE, {"first": bytes(8), "second": b"\x11" * 8, "key_version": None},
         "00" * 8 + "11" * 8),
        (A.EXTERNAL_AUTHENTICATE, {"first": bytes(8), "second": b"\x11" * 8, "key_version": 2},
         "00" * 8 + "11" * 8 + "02"),
        (A.APPLICATION_BLOCK, {"mac": h("01020304")}, "01020304"),
        (A.CARD_BLOCK, {"mac": h("01020304")}, "01020304"),
        (A.INITIALIZE_ENVIRONMENT, {"card_id_first": 0x37}, "37"),
        (A.CHANGE_PIN, h("123456FF654321"), "123456FF654321"),
        (A.DELIVERY_SESSION_KEY, h("3337303030307368" "1122334455667788"),
         "3337303030307368" "1122334455667788"),
    ],
)
def test_data_layouts(spec: A.CommandSpec, value: object, hex_: str) -> None:
    apdu = spec.build(0, 0, value)
    assert apdu.data == h(hex_)
    parsed = spec.parse_data(apdu.data)
    if isinstance(value, dict):
        assert {k: parsed[k] for k in value} == value
    else:
        assert parsed == value


def test_build_dict_without_layout_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        A.SELECT.build(4, 0, {"aid": SSSE_AID})
    assert A.SELECT.parse_data(b"\xef\x05") == b"\xef\x05"


def test_auth_body_rejects_wrong_sizes() -> None:
    with pytest.raises(cs.ConstructError):
        A.INTERNAL_AUTHENTICATE.parse_data(bytes(15))


def test_parse_response() -> None:
    assert A.INTERNAL_AUTHENTICATE.parse_response(bytes(range(8))).auth_data == bytes(range(8))
    assert A.GET_CHALLENGE.parse_response(b"\x01\x02") == b"\x01\x02"


def test_psam_layouts() -> None:
    info = A.PsamCardInfo.parse(bytes(range(15)))
    assert (info.issuer_id, info.serial, info.version, info.key_card_type, info.fci) == (
        0, bytes(range(1, 11)), 11, 12, bytes((13, 14)))
    assert A.PsamTerminalInfo.parse(h("370200000001")).terminal_no == h("370200000001")
    assert A.PsamCounter.build({"counter": 0x01020304}) == h("01020304")


# --- P2 of READ/UPDATE RECORD ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("sfi", "mode", "p2"),
    [(0, A.REC_FIRST_ID, 0x00), (0, A.REC_NUMBER, 0x04), (0, A.REC_FROM_P1, 0x05), (5, A.REC_NUMBER, 0x2C),
     (8, A.REC_PREV_ID, 0x43), (30, A.REC_TO_P1, 0xF6), (1, A.REC_LAST_ID, 0x09), (2, A.REC_NEXT_ID, 0x12)],
)
def test_record_p2(sfi: int, mode: int, p2: int) -> None:
    assert A.record_p2(sfi, mode) == p2


@pytest.mark.parametrize(("sfi", "mode"), [(31, 0), (-1, 0), (1, 8), (1, -1)])
def test_record_p2_errors(sfi: int, mode: int) -> None:
    with pytest.raises(ValueError):
        A.record_p2(sfi, mode)


# --- builders against the card-spec §3.4 trace -------------------------------------------------


def test_select_aid_trace() -> None:
    # Trace: 00A404000F 7378312E73682EC9E7BBE1B1A3D5CF -> FCI. select_aid asks for the FCI with
    # Le 00 (case 4); on T=0 the transport drops the Le and the card answers 61xx.
    trace = h("00A404000F 7378312E73682EC9E7BBE1B1A3D5CF")
    assert A.select_aid(SSSE_AID).encode() == trace + b"\x00"
    assert A.select_aid(SSSE_AID, fci=False).encode() == h("00A4040C0F 7378312E73682EC9E7BBE1B1A3D5CF")


def test_select_ef_trace() -> None:
    # Trace: 00A4020002 EF05 (P2 00). Both forms "seen in the wild" (card-spec §3.1):
    assert A.SELECT.build(A.SELECT_EF, 0x00, h("EF05")).encode() == h("00A4020002EF05")
    assert A.select_fid(0xEF05, A.SELECT_BY_FID).encode() == h("00A4000002EF05")
    assert A.select_fid(0xEF05).encode() == h("00A4020002EF05")  # the traced bytes


@pytest.mark.parametrize(
    ("args", "trace"),
    [
        ((0x01, 0, A.REC_FIRST_ID, 0x12), "00B2010012"),  # card-id by identifier 01
        ((0x03, 0, A.REC_FIRST_ID, 0x06), "00B2030006"),  # spec version
        ((0x07, 0, A.REC_FIRST_ID, 0x0B), "00B207000B"),  # card number
        ((0x05, 0, A.REC_FIRST_ID, 0x06), "00B2050006"),
        ((0x06, 0, A.REC_FIRST_ID, 0x06), "00B2060006"),
        ((0x08, 0, A.REC_FIRST_ID, 0x14), "00B2080014"),
        ((0x09, 0, A.REC_FIRST_ID, 0x20), "00B2090020"),
        ((0x4E, 0, A.REC_FIRST_ID, 0x16), "00B24E0016"),
        ((0x07, 5, A.REC_NUMBER, 0x0B), "00B2072C0B"),  # via SFI 5, record 7, no SELECT
        ((0x01, 0, A.REC_FROM_P1, 0x40), "00B2010540"),  # read-all EF05
        ((0x01, 0, A.REC_FROM_P1, 0x5B), "00B201055B"),  # read-all EF06
    ],
)
def test_read_record_trace(args: tuple[int, int, int, int], trace: str) -> None:
    assert A.read_record(*args).encode() == h(trace)


def test_auth_and_challenge_trace() -> None:
    r1, r2, r3 = h("0102030405060708"), h("1112131415161718"), h("2122232425262728")
    auth = h("A1A2A3A4A5A6A7A8")
    assert A.get_challenge().encode() == h("0084000008")
    assert A.get_challenge(4).encode() == h("0084000004")
    # 00880000 10 R2 R1 00 (R2 = session-key input, R1 = plain; case 4, Le 00 per §3.1)
    assert A.internal_authenticate(r2, r1).encode() == h("0088000010") + r2 + r1 + h("00")
    # 00 82 00 0A 10 <auth(8)> R3 (RKSSSE)
    assert A.external_authenticate(0x0A, auth, r3).encode() == h("0082000A10") + auth + r3
    # body layout round trip
    parsed = A.EXTERNAL_AUTHENTICATE.parse_data(A.external_authenticate(0x0A, auth, r3).data)
    assert (parsed.first, parsed.second, parsed.key_version) == (auth, r3, None)


def test_verify_and_change_pin() -> None:
    # a Tecsun Android reader's hard-coded VERIFY (card-spec §9)
    assert A.verify(crypto.pin_to_bcd("888888")).encode() == h("0020000003888888")
    assert A.verify(crypto.pin_to_bcd("12345")).encode() == h("002000000312345F")
    # the 4-byte case-1 query
    assert A.verify_query().encode() == h("00200000")
    with pytest.raises(ValueError):
        A.verify(b"")  # an empty PIN must never turn into the query
    # 80 5E 01 00: old ‖ FF ‖ new
    old, new = crypto.pin_to_bcd("123456"), crypto.pin_to_bcd("654321")
    assert A.change_pin(old, new).encode() == h("805E010007 123456 FF 654321")


def test_get_response_and_reload_shape() -> None:
    assert A.get_response(0x1C).encode() == h("00C000001C")
    assert A.get_response(256).encode() == h("00C0000000")
    # PIN reload: SM4 card 25 bytes ("50 hex chars"), DES 17 bytes ("34 hex chars"), unblock 9 bytes
    assert len(A.PIN_UNBLOCK_RELOAD.build(0, 1, bytes(16 + 4)).encode()) == 25
    assert len(A.PIN_UNBLOCK_RELOAD.build(0, 1, bytes(8 + 4)).encode()) == 17
    unblock = A.PIN_UNBLOCK_RELOAD.build(0, 0, bytes(4)).encode()
    assert unblock[:5] == h("8424000004") and len(unblock) == 9
