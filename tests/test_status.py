"""Status words of :mod:`apdu_specs.status` (card-spec §3.2) and the compat codes (§5.2)."""

from __future__ import annotations

import pytest

from apdu_specs import status
from apdu_specs.status import SW, StatusWordError


def _has_cjk(text: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" for c in text)


@pytest.mark.parametrize("sw", list(SW), ids=lambda s: f"{s:04X}-{s.name}")
def test_every_sw_has_both_meanings(sw: SW) -> None:
    en, zh = status.meaning(sw), status.meaning_zh(sw)
    assert en and en != "unknown status word"
    assert zh and zh != "未知状态字"
    assert _has_cjk(zh)
    assert str(StatusWordError(sw)).startswith(f"{int(sw):04X} {en}")


def test_meanings_are_distinct() -> None:
    assert len({status.meaning(s) for s in SW}) == len(SW)
    assert len({status.meaning_zh(s) for s in SW}) == len(SW)


# card-spec §3.2, as listed there
SPEC_SWS = {
    0x9000: SW.OK, 0x6581: SW.MEMORY_FAILURE, 0x6700: SW.WRONG_LENGTH, 0x6901: SW.INVALID_STATE,
    0x6981: SW.INCOMPATIBLE_FILE_STRUCTURE, 0x6982: SW.SECURITY_STATUS_NOT_SATISFIED,
    0x6983: SW.AUTH_METHOD_BLOCKED, 0x6984: SW.REFERENCE_DATA_INVALID, 0x6985: SW.CONDITIONS_NOT_SATISFIED,
    0x6986: SW.NO_CURRENT_EF, 0x6988: SW.SM_DATA_WRONG, 0x6A80: SW.WRONG_DATA,
    0x6A81: SW.FUNCTION_NOT_SUPPORTED, 0x6A82: SW.FILE_NOT_FOUND, 0x6A83: SW.RECORD_NOT_FOUND,
    0x6A84: SW.NOT_ENOUGH_SPACE, 0x6A85: SW.LC_TLV_MISMATCH, 0x6A86: SW.WRONG_P1P2,
    0x6A88: SW.REFERENCE_NOT_FOUND, 0x6B00: SW.OFFSET_BEYOND_EF, 0x6D00: SW.INS_NOT_SUPPORTED,
    0x6E00: SW.CLA_NOT_SUPPORTED, 0x6F00: SW.NO_PRECISE_DIAGNOSIS, 0x9302: SW.MAC_INVALID,
    0x9303: SW.APPLICATION_BLOCKED, 0x9401: SW.INSUFFICIENT_FUNDS, 0x9402: SW.COUNTER_AT_MAX,
    0x9403: SW.KEY_INDEX_NOT_SUPPORTED, 0x9406: SW.MAC_UNAVAILABLE,
}


def test_sw_values_match_the_spec_list() -> None:
    assert {int(k): v for k, v in SPEC_SWS.items()} == {int(s): s for s in SW}
    assert status.all_fixed() == list(SW)


def test_more_data() -> None:
    assert status.more_data(0x1C) == 0x611C
    assert status.more_data(256) == 0x6100  # 00 means 256
    assert status.meaning(0x611C) == "28 response bytes available (GET RESPONSE)"
    assert "256" in status.meaning(0x6100)
    assert status.meaning_zh(0x611C) == "还有28字节响应数据"
    assert "256" in status.meaning_zh(0x6100)


def test_wrong_le() -> None:
    assert status.wrong_le(0x12) == 0x6C12
    assert status.wrong_le(256) == 0x6C00
    assert status.meaning(0x6C12) == "wrong Le; exact length is 18"
    assert status.meaning_zh(0x6C12) == "Le错误，正确长度为18"
    assert "256" in status.meaning(0x6C00)


@pytest.mark.parametrize("n", range(16))
def test_tries_left(n: int) -> None:
    sw = status.tries_left(n)
    assert sw == 0x63C0 + n
    assert status.meaning(sw) == f"verification failed, {n} tries left"
    assert status.meaning_zh(sw) == f"认证失败，还剩{n}次机会"
    assert not status.is_success(sw)


@pytest.mark.parametrize("n", [-1, 16, 255])
def test_tries_left_range(n: int) -> None:
    with pytest.raises(ValueError):
        status.tries_left(n)


@pytest.mark.parametrize("sw", [0x6300, 0x63B1, 0x1234, 0x6A87, 0x9001, 0x0000])
def test_unknown(sw: int) -> None:
    assert status.meaning(sw) == "unknown status word"
    assert status.meaning_zh(sw) == "未知状态字"


def test_is_success() -> None:
    assert status.is_success(0x9000)
    assert status.is_success(SW.OK)
    assert not status.is_success(0x6100)
    assert not status.is_success(0x9001)


# card-spec §5.2: code = −(SW1·256 + SW2)
COMPAT = {
    0x6A88: -27272, 0x6982: -27010, 0x6983: -27011, 0x6984: -27012, 0x6985: -27013, 0x6988: -27016,
    0x6A80: -27264, 0x6A81: -27265, 0x6A82: -27266, 0x6A83: -27267, 0x6700: -26368, 0x6901: -26881,
    0x6981: -27009, 0x9302: -37634, 0x9303: -37635, 0x9403: -37891, 0x9406: -37894,
    0x63C0: -25536, 0x63C1: -25537, 0x63C2: -25538,
}


@pytest.mark.parametrize(("sw", "code"), COMPAT.items(), ids=lambda v: f"{v:04X}" if v > 0 else str(v))
def test_compat_code(sw: int, code: int) -> None:
    assert status.compat_code(sw) == code
    assert status.compat_code(sw) == -((sw >> 8) * 256 + (sw & 0xFF))


def test_status_word_error() -> None:
    e = StatusWordError(SW.FILE_NOT_FOUND, "EF05")
    assert e.sw == 0x6A82
    assert e.detail == "EF05"
    assert str(e) == "6A82 file not found: EF05"
    assert str(StatusWordError(status.tries_left(2))) == "63C2 verification failed, 2 tries left"
    assert str(StatusWordError(0x6A87)) == "6A87 unknown status word"
