"""The emulated social security card, command by command and status word by status word."""

from __future__ import annotations

import pytest

from apdu_specs import crypto, filesystem, tlv
from apdu_specs.crypto import Algorithm
from firmware_sim.cos import ResponseMode
from tests.emu import (
    SELECT_DF04,
    SELECT_SSSE,
    card_key,
    external_auth,
    new_card,
    ok,
    sm_command,
    tx,
)

GENS = [2, 3]


@pytest.fixture(params=GENS, ids=lambda g: f"gen{g}")
def card(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return new_card(request.param)


# --- SELECT ---------------------------------------------------------------------------------------


def test_select_ssse_fci_announces_algorithm(card) -> None:  # type: ignore[no-untyped-def]
    fci = ok(card, SELECT_SSSE)
    parsed = filesystem.parse_fci(fci)
    assert parsed.name == filesystem.SSSE_AID
    assert parsed.sfi_dir == 0x1E
    assert parsed.algorithm == (3 if card.image.generation == 3 else 1)
    if card.image.generation == 3:
        assert fci.hex().upper() == "6F1C840F7378312E73682EC9E7BBE1B1A3D5CFA50988011E9F0C03860103"


def test_select_mf_variants(card) -> None:  # type: ignore[no-untyped-def]
    assert tx(card, "00A4000C023F00").sw == 0x9000
    assert filesystem.parse_fci(ok(card, "00A40000023F00")).name == b""
    assert tx(card, "00A4000000").sw == 0x9000  # empty data selects the MF too (case 2, Le=256)
    assert tx(card, "00A40000").sw == 0x9000


def test_select_df04_by_aid_and_fid(card) -> None:  # type: ignore[no-untyped-def]
    assert filesystem.parse_fci(ok(card, SELECT_DF04)).name == bytes.fromhex("D15600000503")
    ok(card, SELECT_SSSE)
    assert tx(card, "00A4000C02DF04").sw == 0x9000
    assert card.cur_df.name == "DF04"


def test_select_ef_with_p1_00_and_02(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_SSSE)
    assert tx(card, "00A4020002EF05").sw == 0x9000
    assert tx(card, "00A4000002EF06").sw == 0x9000
    assert card.cur_ef is not None and card.cur_ef.spec.fid == 0xEF06


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        ("00A404000FA1A2A3A4A5A6A7A8A9AAABACADAEAF", 0x6A82),  # unknown AID
        ("00A4040003A1A2A3", 0x6700),  # name too short
        ("00A4020002EF99", 0x6A82),  # unknown EF
        ("00A4020001EF", 0x6700),  # FID of one byte
        ("00A4070002EF05", 0x6A86),  # absurd P1
        ("00A40405" + "0F" + "7378312E73682EC9E7BBE1B1A3D5CF", 0x6A86),  # absurd P2
        ("00A404020F7378312E73682EC9E7BBE1B1A3D5CF", 0x6A82),  # "next occurrence": there is none
    ],
)
def test_select_errors(card, apdu: str, sw: int) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_SSSE)
    assert tx(card, apdu).sw == sw


# --- READ RECORD ----------------------------------------------------------------------------------


def _select_ef05(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_SSSE)
    ok(card, "00A4020002EF05")


def test_read_record_by_identifier_number_sfi_and_ranges(card) -> None:  # type: ignore[no-untyped-def]
    _select_ef05(card)
    recs = card.image.files["SSSE/EF05"].records
    assert ok(card, "00B2010012") == recs[0]  # identifier 01, first
    assert ok(card, "00B2030006") == recs[2]
    assert ok(card, "00B207000B") == recs[6]
    assert ok(card, "00B207040B") == recs[6]  # record number 7
    all_ = ok(card, "00B2010540")  # from record 1 to the last: 64 bytes
    assert all_ == b"".join(recs) and len(all_) == 0x40
    assert ok(card, "00B2060611") == recs[6] + recs[5]  # last to record 6
    assert ok(card, "00B2072C0B") == recs[6]  # SFI 5 record 7, without selecting
    # last/next/previous by identifier: one record per tag here
    assert ok(card, "00B207010B") == recs[6]
    assert tx(card, "00B207020B").sw == 0x6A83  # no next record with tag 07
    assert tx(card, "00B207030B").sw == 0x6A83  # no previous either
    ok(card, "00B2010012")
    assert ok(card, "00B207020B") == recs[6]  # next after record 1
    assert ok(card, "00B2010312") == recs[0]  # previous from record 7
    assert ok(card, "00B2000412") == recs[0]  # P1=0, mode 100: current record


def test_read_record_ef06_holder(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_SSSE)
    ok(card, "00A4020002EF06")
    if card.image.generation == 3:
        assert tx(card, "00B2080014").sw == 0x6982  # RKSSSE needed on 3.0 cards
        assert external_auth(card, "RKSSSE", 0x0A).sw == 0x9000
    rec = ok(card, "00B2080014")
    assert filesystem.SSSE_EF06_ITEMS[0].decode_record(rec) == "370202199001011237"
    name = ok(card, "00B2090020")
    assert filesystem.SSSE_EF06_ITEMS[1].decode_record(name) == "张三"
    assert name[2:6] == bytes.fromhex("D5C5C8FD")
    assert tlv.decode_record(ok(card, "00B24E0016"))[1] == bytes(20)
    assert len(ok(card, "00B201055B")) == 0x5B


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        ("00B2010000", 0x6C12),  # Le=00: the card tells the length
        ("00B2010010", 0x6C12),  # Le short
        ("00B2010020", 0x6C12),  # Le long
        ("00B20100", 0x6C12),  # no Le at all
        ("00B2110012", 0x6A83),  # no record with identifier 11
        ("00B2090412", 0x6A83),  # record number past the end
        ("00B2000512", 0x6A83),  # P1=0 with mode 101
        ("00B2010712", 0x6A86),  # mode 111 is undefined
        ("00B2017C12", 0x6A82),  # SFI 15 does not exist
        ("00B20100020000", 0x6700),  # data in a READ RECORD
    ],
)
def test_read_record_errors(card, apdu: str, sw: int) -> None:  # type: ignore[no-untyped-def]
    _select_ef05(card)
    assert tx(card, apdu).sw == sw


def test_read_record_needs_a_record_file_and_a_current_ef(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_SSSE)
    assert tx(card, "00B2010412").sw == 0x6986  # no current EF
    ok(card, "00A4020002EF07")  # transparent
    assert tx(card, "00B2010412").sw == 0x6981
    assert tx(card, "00B2000412").sw == 0x6981


# --- DF04 and access conditions -----------------------------------------------------------------


def test_df04_ef05_pin_or_rk1(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_DF04)
    ok(card, "00A4020002EF05")
    card.reset()
    ok(card, SELECT_DF04)
    ok(card, "00A4020002EF05")
    assert tx(card, "00B2840005").sw == 0x6982
    assert external_auth(card, "RK1DF04", 0x84).sw == 0x9000  # key alone
    assert filesystem.DF04_EF05.item(0x84).decode_record(ok(card, "00B2840005")) == "370202"
    card.reset()
    ok(card, SELECT_DF04)
    ok(card, "0020000003123456")  # PIN alone
    ok(card, "00A4020002EF05")
    assert ok(card, "00B2840005")


def test_df04_ef06_needs_pin_and_key(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_DF04)
    ok(card, "00A4020002EF06")
    assert tx(card, "00B2900003").sw == 0x6982
    ok(card, "0020000003123456")
    assert tx(card, "00B2900003").sw == 0x6982  # PIN alone is not enough
    assert external_auth(card, "RK1DF04", 0x84).sw == 0x9000
    assert ok(card, "00B2900003") == bytes.fromhex("900130")


def test_external_auth_is_cleared_by_selecting_another_df(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_DF04)
    assert external_auth(card, "RK1DF04", 0x84).sw == 0x9000
    ok(card, "00A4020002EF05")  # an EF of the same DF keeps it
    assert ok(card, "00B2840005")
    ok(card, SELECT_SSSE)
    ok(card, SELECT_DF04)
    ok(card, "00A4020002EF05")
    assert tx(card, "00B2840005").sw == 0x6982


def test_pin_survives_df_change_but_not_reset(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_SSSE)
    ok(card, "0020000003123456")
    ok(card, SELECT_DF04)
    assert tx(card, "00200000").sw == 0x9000
    card.power_off()
    card.power_on()
    assert tx(card, "00200000").sw == 0x63C3


# --- VERIFY / CHANGE PIN / unblock / reload --------------------------------------------------------


def test_verify_counts_down_to_blocked_and_correct_pin_resets(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_SSSE)
    assert tx(card, "0020000003999999").sw == 0x63C2
    assert tx(card, "00200000").sw == 0x63C2  # the query does not decrement
    assert tx(card, "0020000003123456").sw == 0x9000
    assert card.image.pin.tries == 3
    for left in (2, 1, 0):
        assert tx(card, "0020000003999999").sw == 0x63C0 | left
    assert tx(card, "0020000003123456").sw == 0x6983  # blocked: even the right PIN
    assert tx(card, "00200000").sw == 0x6983


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        ("002000000112", 0x6700),  # Lc 1
        ("00200000091234567890123456FF", 0x6700),  # Lc 9
        ("0020000103123456", 0x6A86),
        ("0020010003123456", 0x6A86),
        ("00200000031234A6", 0x6A80),  # not BCD
    ],
)
def test_verify_errors(card, apdu: str, sw: int) -> None:  # type: ignore[no-untyped-def]
    assert tx(card, apdu).sw == sw
    assert card.image.pin.tries == 3  # malformed attempts cost nothing


def test_verify_odd_length_pin() -> None:
    card = new_card(3, pin="12345")
    assert tx(card, "002000000312345F").sw == 0x9000


def test_change_pin(card) -> None:  # type: ignore[no-untyped-def]
    old, new = crypto.pin_to_bcd("123456"), crypto.pin_to_bcd("2468")
    body = old + b"\xff" + new
    assert tx(card, b"\x80\x5e\x01\x00" + bytes((len(body),)) + body).sw == 0x9000
    assert tx(card, "0020000003123456").sw == 0x63C2
    assert tx(card, "00200000022468").sw == 0x9000
    bad_old = crypto.pin_to_bcd("111111")
    r = tx(card, b"\x80\x5e\x01\x00" + bytes((len(bad_old) + 1 + len(new),)) + bad_old + b"\xff" + new)
    assert r.sw == 0x63C2


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        ("805E0100021234", 0x6700),  # too short
        ("805E01000412345678", 0x6A80),  # no FF separator
        ("805E0200081234 56FF12345678".replace(" ", ""), 0x6A86),
        ("805E010008FF12345612345678", 0x6A80),  # empty old PIN
    ],
)
def test_change_pin_errors(card, apdu: str, sw: int) -> None:  # type: ignore[no-untyped-def]
    raw = bytes.fromhex(apdu[:10]) + bytes.fromhex(apdu[10:])
    assert tx(card, raw).sw == sw
    assert card.image.pin.tries == 3


def test_change_pin_new_pin_too_short(card) -> None:  # type: ignore[no-untyped-def]
    assert tx(card, "805E010006123456FF123F").sw == 0x6A80


def _block_pin(card) -> None:  # type: ignore[no-untyped-def]
    for _ in range(3):
        tx(card, "0020000003999999")
    assert tx(card, "00200000").sw == 0x6983


def test_unblock_needs_puk_and_mac(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_SSSE)
    _block_pin(card)
    assert sm_command(card, "STKSSSE", bytes.fromhex("84240000"), b"").sw == 0x6982  # no PUK auth
    assert external_auth(card, "PUK", 0x06).sw == 0x9000
    assert tx(card, "8424000004AABBCCDD").sw == 0x6984  # no challenge
    assert sm_command(card, "STKSSSE", bytes.fromhex("84240000"), b"", corrupt=True).sw == 0x9302
    assert sm_command(card, "STKSSSE", bytes.fromhex("84240000"), b"").sw == 0x9000
    assert tx(card, "0020000003123456").sw == 0x9000


def test_reload_sets_a_new_pin(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_SSSE)
    _block_pin(card)
    assert external_auth(card, "PUK", 0x06).sw == 0x9000
    ch = ok(card, "0084000008")
    sk = crypto.session_key(card.alg, card_key(card, "STKSSSE"), ch)
    enc = crypto.encrypt(card.alg, sk, crypto.reload_pin_block("654321"))
    header = bytes.fromhex("84240001") + bytes((len(enc) + 4,))
    mac = crypto.mac(card.alg, sk, header + enc)
    assert len(header + enc + mac) == (25 if card.alg is Algorithm.SM4 else 17)  # card-spec §4.1
    assert tx(card, header + enc + mac).sw == 0x9000
    assert tx(card, "0020000003123456").sw == 0x63C2
    assert tx(card, "0020000003654321").sw == 0x9000


def test_unblock_reload_errors(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_SSSE)
    assert tx(card, "8424000204AABBCCDD").sw == 0x6A86
    assert external_auth(card, "PUK", 0x06).sw == 0x9000
    assert tx(card, "842400010401020304").sw == 0x6700  # reload needs enc + MAC
    # a MAC-valid reload whose plaintext is not a PIN
    ch = ok(card, "0084000008")
    sk = crypto.session_key(card.alg, card_key(card, "STKSSSE"), ch)
    enc = crypto.encrypt(card.alg, sk, b"\xab\xcd")
    header = bytes.fromhex("84240001") + bytes((len(enc) + 4,))
    assert tx(card, header + enc + crypto.mac(card.alg, sk, header + enc)).sw == 0x6A80


# --- challenge and authentication ---------------------------------------------------------------


def test_get_challenge(card) -> None:  # type: ignore[no-untyped-def]
    for n in (4, 8, 16):
        assert len(ok(card, f"00840000{n:02X}")) == n
    assert tx(card, "0084000005").sw == 0x6700
    assert tx(card, "00840000").sw == 0x6700
    assert tx(card, "0084010008").sw == 0x6A86
    assert ok(card, "0084000008") != ok(card, "0084000008")


def test_internal_authenticate(card) -> None:  # type: ignore[no-untyped-def]
    a, b = bytes(range(8)), bytes(range(8, 16))
    got = ok(card, "0088000010" + (a + b).hex())
    assert got == crypto.auth_data(card.alg, card_key(card, "IRK"), a, b)
    assert len(ok(card, "0088000011" + (a + b).hex() + "01")) == 8  # with a key version byte
    assert tx(card, "008800000801020304050607 08".replace(" ", "")).sw == 0x6700
    assert tx(card, "0088000110" + (a + b).hex()).sw == 0x6A86


def test_external_authenticate_counts_tries(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_SSSE)
    assert external_auth(card, "RKSSSE", 0x0A, good=False).sw == 0x63C2
    assert external_auth(card, "RKSSSE", 0x0A).sw == 0x9000
    assert card.image.keys["RKSSSE"].tries == 3
    for left in (2, 1, 0):
        assert external_auth(card, "RKSSSE", 0x0A, good=False).sw == 0x63C0 | left
    assert external_auth(card, "RKSSSE", 0x0A).sw == 0x6983


def test_external_authenticate_errors(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_SSSE)
    body = bytes(16).hex()
    assert tx(card, "008200 0A10".replace(" ", "") + body).sw == 0x6984  # no challenge
    ok(card, "0084000008")
    assert tx(card, "0082000A10" + body).sw == 0x63C2  # the challenge was consumed
    assert tx(card, "0082000A10" + body).sw == 0x6984  # single use
    ok(card, "0084000008")
    assert tx(card, "0082007710" + body).sw == 0x6A88  # unknown key
    assert tx(card, "0082000010" + body).sw == 0x6A88  # IRK cannot be externally authenticated
    assert tx(card, "0082000A08" + body[:16]).sw == 0x6700
    assert tx(card, "0082010A10" + body).sw == 0x6A86


# --- writes: plain after external auth, and secure messaging ----------------------------------------


def test_update_record_plain_after_ukssse(card) -> None:  # type: ignore[no-untyped-def]
    _select_ef05(card)
    new = filesystem.SSSE_EF05.item(0x06).encode_record("20361231")
    assert tx(card, "00DC0604" + f"{len(new):02X}" + new.hex()).sw == 0x6982
    assert external_auth(card, "UKSSSE", 0x04).sw == 0x9000
    assert tx(card, "00DC0604" + f"{len(new):02X}" + new.hex()).sw == 0x9000
    assert ok(card, "00B2060006") == new
    by_id = filesystem.SSSE_EF05.item(0x05).encode_record("20220101")
    assert tx(card, "00DC0500" + f"{len(by_id):02X}" + by_id.hex()).sw == 0x9000  # by identifier
    assert ok(card, "00B2050006") == by_id


def test_update_record_with_secure_messaging(card) -> None:  # type: ignore[no-untyped-def]
    _select_ef05(card)
    new = filesystem.SSSE_EF05.item(0x06).encode_record("20400101")
    assert sm_command(card, "UKSSSE", bytes.fromhex("04DC0604"), new, corrupt=True).sw == 0x9302
    assert sm_command(card, "UKSSSE", bytes.fromhex("04DC0604"), new).sw == 0x9000
    assert ok(card, "00B2060006") == new
    assert tx(card, "04DC060403AABBCC").sw == 0x6988


@pytest.mark.parametrize(
    ("body", "p1p2", "sw"),
    [
        ("0604202101", "0604", 0x6A85),  # length byte says 4, 3 bytes follow
        ("06032021 01".replace(" ", ""), "0604", 0x6A85),  # item 06 is 4 bytes long
        ("5502AABB", "0604", 0x6A80),  # no item 55 in EF05
        ("060420210601", "0904", 0x6A83),  # record 9: neither existing nor next
        ("060420210601", "0607", 0x6A86),  # undefined mode
        ("060420210601", "0000", 0x6A86),  # by identifier with P1=0
    ],
)
def test_update_record_errors(card, body: str, p1p2: str, sw: int) -> None:  # type: ignore[no-untyped-def]
    _select_ef05(card)
    assert external_auth(card, "UKSSSE", 0x04).sw == 0x9000
    before = list(card.image.files["SSSE/EF05"].records or [])
    assert tx(card, "00DC" + p1p2 + f"{len(body) // 2:02X}" + body).sw == sw
    assert card.image.files["SSSE/EF05"].records == before


def test_update_record_appends_to_linear_file_until_full(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_DF04)
    ok(card, "00A4020002EF06")
    assert external_auth(card, "UK2DF04", 0x87).sw == 0x9000
    rec = bytes.fromhex("900131")
    n = len(card.image.files["SSSE/DF04/EF06"].records or [])
    capacity = 2 * len(filesystem.DF04_EF06.items)
    for i in range(n + 1, capacity + 1):
        assert tx(card, f"00DC{i:02X}0403" + rec.hex()).sw == 0x9000
    assert tx(card, f"00DC{capacity + 1:02X}0403" + rec.hex()).sw == 0x6A84


def _ef08_record(seq: int) -> bytes:
    return filesystem.DF04_EF08.encode_fixed({
        "seq": seq, "txn_type": "2", "terminal": "370212000001", "time": "20261125103000",
        "account_fen": 1250, "self_pay_fen": 100, "fund_fen": 1000,
    })


def test_ef08_cyclic_write_previous_mode_with_mac(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_DF04)
    ok(card, "00A4020002EF08")
    header = bytes.fromhex("04DC0043")  # P2 = SFI 8 << 3 | 011 (previous)
    assert tx(card, b"\x00\xdc\x00\x43\x1c" + _ef08_record(1)).sw == 0x6982  # plain: never
    assert external_auth(card, "UK2DF04", 0x87).sw == 0x9000
    assert tx(card, b"\x00\xdc\x00\x43\x1c" + _ef08_record(1)).sw == 0x6982  # auth does not help
    assert sm_command(card, "UK2DF04", header, _ef08_record(1), corrupt=True).sw == 0x9302
    for seq in range(1, 33):  # 30 records, then the oldest are replaced
        assert sm_command(card, "UK2DF04", header, _ef08_record(seq)).sw == 0x9000
    recs = card.image.files["SSSE/DF04/EF08"].records or []
    assert len(recs) == 30
    assert filesystem.DF04_EF08.decode_fixed(recs[0])["seq"] == 32  # newest is record 1
    assert filesystem.DF04_EF08.decode_fixed(recs[-1])["seq"] == 3
    assert tx(card, "00B201441C").sw == 0x6982  # reading needs the PIN
    ok(card, "0020000003123456")
    assert filesystem.DF04_EF08.decode_fixed(ok(card, "00B201041C"))["seq"] == 32
    assert sm_command(card, "UK2DF04", header, _ef08_record(1)[:20]).sw == 0x6700
    assert sm_command(card, "UK2DF04", bytes.fromhex("04DC0103"), _ef08_record(1)).sw == 0x6A86
    assert tx(card, "04DC004303AABBCC").sw == 0x6988  # shorter than a MAC
    assert tx(card, "04DC004305AABBCCDDEE").sw == 0x6984  # no challenge left


def test_ef08_history_cannot_be_rewritten_by_number(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_DF04)
    for seq in (1, 2):
        assert sm_command(card, "UK2DF04", bytes.fromhex("04DC0043"), _ef08_record(seq)).sw == 0x9000
    before = list(card.image.files["SSSE/DF04/EF08"].records or [])
    # a valid MAC under UK2DF04, but record-number mode: refused, the log only ever appends
    assert sm_command(card, "UK2DF04", bytes.fromhex("04DC0244"), _ef08_record(99)).sw == 0x6A86
    assert card.image.files["SSSE/DF04/EF08"].records == before


def test_ef08_identifier_modes_are_refused(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_DF04)
    ok(card, "0020000003123456")
    ok(card, "00A4020002EF08")
    assert tx(card, "00B201001C").sw == 0x6981  # no identifiers in a fixed-record file


# --- transparent files ----------------------------------------------------------------------------


def test_read_and_update_binary(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_SSSE)
    ok(card, "00A4020002EF07")
    assert tx(card, "00B0000010").sw == 0x6982
    assert external_auth(card, "RKSSSE", 0x0A).sw == 0x9000
    assert ok(card, "00B0000010") == bytes(16)
    assert len(ok(card, "00B0000000")) == 256
    assert len(ok(card, "00B0000000")) == 256
    assert len(ok(card, "00B002F000")) == 0x10  # only 16 bytes left from 0x2F0
    assert tx(card, "00B002F020").sw == 0x6C10
    assert tx(card, "00B0030000").sw == 0x6B00
    # UPDATE BINARY under UKSSSE by secure messaging (RKSSSE stays authenticated)
    assert sm_command(card, "UKSSSE", bytes.fromhex("04D60010"), b"\x11\x22\x33").sw == 0x9000
    assert ok(card, "00B0000F05") == b"\x00\x11\x22\x33\x00"
    assert tx(card, "00D6001003112233").sw == 0x6982  # plain without UKSSSE
    assert external_auth(card, "UKSSSE", 0x04).sw == 0x9000
    assert tx(card, "00D602FF02AABB").sw == 0x6700  # runs past the end
    assert tx(card, "00D6030001AA").sw == 0x6B00
    assert tx(card, "00D6000000").sw == 0x6700


def test_binary_by_sfi_and_errors(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_SSSE)
    assert external_auth(card, "RKSSSE", 0x0A).sw == 0x9000
    assert ok(card, "00B0870004") == bytes(4)  # SFI 7 = EF07
    assert tx(card, "00B0950004").sw == 0x6A82  # SFI 21 does not exist
    assert tx(card, "00B0E70004").sw == 0x6A86
    ok(card, "00A4020002EF05")
    assert tx(card, "00B0000004").sw == 0x6981  # a record file
    card.reset()
    ok(card, SELECT_SSSE)
    assert tx(card, "00B0000004").sw == 0x6986


# --- blocking -------------------------------------------------------------------------------------


def test_application_block(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_DF04)
    assert sm_command(card, "STKDF04", bytes.fromhex("841E0001"), b"", corrupt=True).sw == 0x9302
    assert sm_command(card, "STKDF04", bytes.fromhex("841E0001"), b"").sw == 0x9000
    assert "SSSE/DF04" in card.image.blocked_apps
    assert tx(card, "0084000008").sw == 0x9303
    ok(card, SELECT_SSSE)  # the SSSE is not blocked
    assert tx(card, SELECT_DF04).sw == 0x9303
    assert tx(card, "841E0101").sw == 0x6A86


def test_card_block(card) -> None:  # type: ignore[no-untyped-def]
    ok(card, SELECT_SSSE)
    assert sm_command(card, "BK", bytes.fromhex("84160000"), b"").sw == 0x9000
    for apdu in (SELECT_SSSE, "0084000008", "00200000", "00A4000C023F00"):
        assert tx(card, apdu).sw == 0x6A81
    card.power_off()
    card.power_on()
    assert tx(card, SELECT_SSSE).sw == 0x6A81  # permanent


# --- generic -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        ("00", 0x6700),
        ("00A4", 0x6700),
        ("00A404", 0x6700),
        ("00A404000F7378", 0x6700),  # Lc larger than the data
        ("00A4040002737800FF", 0x6700),  # Lc smaller than the data (not a case-4 shape)
        ("0000000000", 0x6D00),
        ("00FE000000", 0x6D00),
        ("80A4040000", 0x6E00),
        ("FFA4000000", 0x6E00),
        ("00A40000000100", 0x6700),  # extended length
    ],
)
def test_malformed_and_unknown(card, apdu: str, sw: int) -> None:  # type: ignore[no-untyped-def]
    assert tx(card, apdu).sw == sw


def test_t0_mode_answers_61xx_and_get_response() -> None:
    card = new_card(3, ResponseMode.T0)
    r = tx(card, SELECT_SSSE)
    assert r.sw == 0x611E and r.data == b""
    assert tx(card, "00C0000040").sw == 0x6C1E
    first = tx(card, "00C0000010")
    assert first.sw == 0x610E
    rest = tx(card, "00C000000E")
    assert rest.sw == 0x9000
    assert first.data + rest.data == bytes.fromhex(
        "6F1C840F7378312E73682EC9E7BBE1B1A3D5CFA50988011E9F0C03860103")
    assert tx(card, "00C0000008").sw == 0x6985  # nothing pending any more
    # case 2 in T=0: Le must be exact
    ok(card, "00A4020002EF05")
    assert tx(card, "00B2070000").sw == 0x6C0B
    assert tx(card, "00B207000B").sw == 0x9000
    # internal authenticate (case 4) → 61 08
    assert tx(card, "0088000010" + bytes(16).hex()).sw == 0x6108
    assert len(ok(card, "00C0000008")) == 8
    # any other command drops the pending answer
    assert tx(card, "0088000010" + bytes(16).hex()).sw == 0x6108
    ok(card, "00A4020002EF05")
    assert tx(card, "00C0000008").sw == 0x6985
    assert tx(card, "00C0010008").sw == 0x6A86
    assert tx(card, "0088000010" + bytes(16).hex()).sw == 0x6108
    assert tx(card, "00C00000").sw == 0x6700


def test_direct_mode_get_response_has_nothing() -> None:
    card = new_card(2)
    ok(card, SELECT_SSSE)
    assert tx(card, "00C0000010").sw == 0x6985


def test_handler_bug_answers_6f00_and_card_keeps_working(monkeypatch: pytest.MonkeyPatch) -> None:
    card = new_card(3)

    def boom(apdu: object) -> bytes:
        raise RuntimeError("bug")

    key = (0x00, 0x84)
    handler, policy, spec = card._handlers[key]
    card._handlers[key] = (boom, policy, spec)
    assert tx(card, "0084000008").sw == 0x6F00
    card._handlers[key] = (handler, policy, spec)
    assert len(ok(card, "0084000008")) == 8
