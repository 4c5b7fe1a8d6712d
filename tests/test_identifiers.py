"""Identifiers with check characters, masks, the card identification code and the ATR."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apdu_specs import crypto, identifiers
from apdu_specs.identifiers import Atr, IdentifierError

# --- social security number (ISO 7064 MOD 11-2) -------------------------------------------------


def _mod11_2(body: str) -> str:
    """ISO 7064 MOD 11-2, the recursive (pure system) formulation."""
    p = 0
    for c in body:
        p = ((p + int(c)) * 2) % 11
    return "0123456789X"[(12 - p) % 11]


@pytest.mark.parametrize(
    "ssn",
    ["11010519491231002X", "11010519491231002x", "370202199001011237"],
)
def test_valid_ssn(ssn: str) -> None:
    identifiers.validate_ssn(ssn)
    assert identifiers.ssn_check_char(ssn[:17]) == ssn[17].upper()


@pytest.mark.parametrize(
    "ssn",
    [
        "110105194912310021",  # wrong check char
        "370202199001011230",
        "37020219900101123",  # 17
        "3702021990010112377",  # 19
        "",
        "37020219900101A237",  # letter in the body
        "３７０２０２１９９００１０１１２３７",  # full-width digits
    ],
)
def test_invalid_ssn(ssn: str) -> None:
    with pytest.raises(IdentifierError):
        identifiers.validate_ssn(ssn)


@pytest.mark.parametrize("body", ["1101051949123100", "110105194912310021", "1101051949123100a"])
def test_ssn_check_char_bad_body(body: str) -> None:
    with pytest.raises(IdentifierError):
        identifiers.ssn_check_char(body)


@given(st.text(alphabet="0123456789", min_size=17, max_size=17))
def test_ssn_check_char_matches_iso7064(body: str) -> None:
    check = identifiers.ssn_check_char(body)
    assert check == _mod11_2(body)
    identifiers.validate_ssn(body + check)
    for other in "0123456789X":
        if other != check:
            with pytest.raises(IdentifierError):
                identifiers.validate_ssn(body + other)


# --- card number (card-spec §2.9) ----------------------------------------------------------------


def _card_check(body: str) -> str:
    values = [int(c) if c.isdigit() else ord(c) - 55 for c in body]
    c9 = 11 - sum(v * w for v, w in zip(values, (3, 7, 9, 10, 5, 8, 4, 2), strict=True)) % 11
    return {10: "X", 11: "0"}.get(c9, str(c9))


def test_card_no_check_char_spec_examples() -> None:
    assert identifiers.card_no_check_char("D2143569") == "X"  # worked example in the spec
    assert identifiers.card_no_check_char("Q2000001") == "5"  # Appendix A
    identifiers.validate_card_no("Q20000015")
    identifiers.validate_card_no("D2143569X")
    identifiers.validate_card_no("X00000019")  # the reader spec's own example


def test_card_no_check_char_covers_x_and_0() -> None:
    checks = {identifiers.card_no_check_char(f"A{n:07d}") for n in range(60)}
    assert {"X", "0"} <= checks


@pytest.mark.parametrize(
    "card_no",
    [
        "Q20000014",  # wrong check char
        "Q2000001",  # 8
        "Q200000155",  # 10
        "q20000015",  # lower-case district letter
        "120000015",  # starts with a digit
        "Qa0000015",  # lower-case in the body
        "Q-0000015",
        "Q２000001５",  # full-width digits
        "",
    ],
)
def test_invalid_card_no(card_no: str) -> None:
    with pytest.raises(IdentifierError):
        identifiers.validate_card_no(card_no)


@pytest.mark.parametrize("body", ["Q200000", "Q20000011", "Q200000a", "Q２000001"])
def test_card_no_check_char_bad_body(body: str) -> None:
    with pytest.raises(IdentifierError):
        identifiers.card_no_check_char(body)


@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=1),
       st.text(alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=7, max_size=7))
def test_card_no_check_char_property(first: str, rest: str) -> None:
    body = first + rest
    check = identifiers.card_no_check_char(body)
    assert check == _card_check(body)
    identifiers.validate_card_no(body + check)


# --- masks -----------------------------------------------------------------------------------


def test_masks() -> None:
    assert identifiers.mask_ssn("370202199001011237") == "3702**********1237"
    assert identifiers.mask_ssn("12345678") == "********"
    assert identifiers.mask_ssn("") == ""
    assert identifiers.mask_name("张三") == "张*"
    assert identifiers.mask_name("欧阳娜娜") == "欧***"
    assert identifiers.mask_name("张") == "张*"  # a one-character name still shows a mask
    assert identifiers.mask_name("") == ""


@given(st.text(min_size=9, max_size=40))
def test_mask_ssn_hides_the_middle(ssn: str) -> None:
    masked = identifiers.mask_ssn(ssn)
    assert len(masked) == len(ssn)
    assert masked[:4] == ssn[:4] and masked[-4:] == ssn[-4:]
    assert set(masked[4:-4]) == {"*"}


# --- card identification code (§2.8) -----------------------------------------------------------


def test_card_id_code_layout() -> None:
    code = identifiers.card_id_code("370200", bytes.fromhex("12345678"), bytes.fromhex("ABCDEF01"))
    assert code == bytes.fromhex("370200D15600000512345678ABCDEF01")  # Appendix A, EF05 record 1
    assert len(code) == 16
    assert code[:3] == bytes.fromhex("370200")
    assert code[3:8] == identifiers.RID == bytes.fromhex("D156000005")
    assert code[8:12] == bytes.fromhex("12345678")
    assert code[12:] == bytes.fromhex("ABCDEF01")
    assert code.hex().upper()[:6] == "370200"  # iReadCardBas field 1


@pytest.mark.parametrize(
    ("region", "serial", "auth"),
    [
        ("37020", bytes(4), bytes(4)),
        ("3702000", bytes(4), bytes(4)),
        ("37020A", bytes(4), bytes(4)),
        ("３７０２００", bytes(4), bytes(4)),
        ("370200", bytes(3), bytes(4)),
        ("370200", bytes(4), bytes(5)),
    ],
)
def test_card_id_code_errors(region: str, serial: bytes, auth: bytes) -> None:
    with pytest.raises(IdentifierError):
        identifiers.card_id_code(region, serial, auth)


@pytest.mark.parametrize("alg", [crypto.Algorithm.DES3, crypto.Algorithm.SM4])
def test_card_id_auth_code(alg: crypto.Algorithm) -> None:
    key = bytes(range(16))
    first12 = bytes.fromhex("370200D15600000512345678")
    code = identifiers.card_id_auth_code(alg, key, first12)
    assert len(code) == 4
    assert code == crypto.mac(alg, key, first12)
    with pytest.raises(IdentifierError):
        identifiers.card_id_auth_code(alg, key, first12[:11])


# --- ATR (§1) --------------------------------------------------------------------------------


def test_atr_for_card() -> None:
    atr = Atr.for_card("370200", bytes.fromhex("12345678"))
    assert atr.encode() == bytes.fromhex("3B6D0000" "00814A44468660" "3702" "12345678")
    # card-spec §5.1's reader output field 6: the 13 historical bytes as 26 hex chars
    assert atr.historical.hex().upper() == "00814A44468660370212345678"
    assert atr.region4 == "3702"
    assert Atr.parse(atr.encode()) == atr
    assert identifiers.historical_bytes(atr.encode()) == atr.historical


def test_atr_parse_spec_example() -> None:
    atr = Atr.parse(bytes.fromhex("3B6D000000814A444686605199000001AC"))
    assert atr.vendor == bytes.fromhex("00814A44468660")
    assert atr.region4 == "5199"
    assert atr.serial == bytes.fromhex("000001AC")
    assert atr.historical.hex().upper() == "00814A444686605199000001AC"


def test_atr_for_card_custom_vendor() -> None:
    atr = Atr.for_card("510100", b"\x00\x00\x01\xac", vendor=bytes(7))
    assert atr.encode() == bytes.fromhex("3B6D0000" "00000000000000" "5101" "000001AC")


@pytest.mark.parametrize(
    ("region", "serial", "vendor"),
    [
        ("370200", bytes(3), identifiers.DEFAULT_ATR_VENDOR),
        ("370200", bytes(5), identifiers.DEFAULT_ATR_VENDOR),
        ("370200", bytes(4), bytes(6)),
        ("37", bytes(4), identifiers.DEFAULT_ATR_VENDOR),  # used to build a 12-byte-historical ATR
        ("37A200", bytes(4), identifiers.DEFAULT_ATR_VENDOR),  # used to encode hex "37A2"
        ("", bytes(4), identifiers.DEFAULT_ATR_VENDOR),
    ],
)
def test_atr_for_card_errors(region: str, serial: bytes, vendor: bytes) -> None:
    with pytest.raises(IdentifierError):
        Atr.for_card(region, serial, vendor)


@pytest.mark.parametrize(
    ("atr", "hist"),
    [
        # TD1 and TD2 present (PC/SC part 3 contactless storage-card ATR shape)
        ("3B8F8001804F0CA000000306030001000000006A", "804F0CA00000030603000100000000"),
        # TA1, TC1, TD1 → TD2 → TA3, TB3; 3 historical bytes, then TCK
        ("3BD311FF8131FE4541424399", "414243"),
        # TS = 3F (inverse convention), TB1 and TC1 as in the contact social security card ATR
        ("3F6D0000" "00814A44468660370212345678", "00814A44468660370212345678"),
        # no interface bytes, no historical bytes
        ("3B00", ""),
        # TD1 only, T=0, no historical bytes
        ("3B8000", ""),
    ],
)
def test_historical_bytes(atr: str, hist: str) -> None:
    assert identifiers.historical_bytes(bytes.fromhex(atr)) == bytes.fromhex(hist)


@pytest.mark.parametrize(
    "atr",
    [
        "",
        "3B",
        "3A6D0000" "00814A44468660370212345678",  # TS neither 3B nor 3F
        "3B6D0000" "00814A444686603702123456",  # 12 of 13 historical bytes
        "3B6D00",  # TC1 missing
        "3BF0",  # TA1..TD1 announced, none present
        "3B80",  # TD1 announced, missing
        "3B8F80",  # TD1 announces TD2, missing
        "3BD311FF8131FE",  # TB3 missing
    ],
)
def test_historical_bytes_truncated(atr: str) -> None:
    with pytest.raises(IdentifierError):
        identifiers.historical_bytes(bytes.fromhex(atr))


def test_atr_parse_needs_13_historical_bytes() -> None:
    with pytest.raises(IdentifierError):
        Atr.parse(bytes.fromhex("3B6C0000" "00814A44468660370212345678"[:24]))
    with pytest.raises(IdentifierError):
        Atr.parse(bytes.fromhex("3B8F8001804F0CA000000306030001000000006A"))  # 15 bytes
    with pytest.raises(IdentifierError):
        Atr.parse(bytes.fromhex("3B6D0000"))


@given(st.binary(max_size=40))
def test_historical_bytes_garbage(atr: bytes) -> None:
    try:
        hist = identifiers.historical_bytes(atr)
    except IdentifierError:
        return
    assert len(hist) == atr[1] & 0x0F
    assert atr.find(hist) >= 2 or not hist


@given(st.text(alphabet="0123456789", min_size=6, max_size=6), st.binary(min_size=4, max_size=4),
       st.binary(min_size=7, max_size=7))
def test_atr_round_trip(region: str, serial: bytes, vendor: bytes) -> None:
    atr = Atr.for_card(region, serial, vendor)
    raw = atr.encode()
    assert len(raw) == 17
    assert Atr.parse(raw) == atr
    assert crypto.card_factor(atr.historical) == raw[9:17]
