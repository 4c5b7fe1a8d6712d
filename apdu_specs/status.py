"""Status words (card-spec §3.2) with their meanings, and the reader-interface compat code.

The standard reader interface reports a card status word as ``-(SW1·256 + SW2)`` (card-spec §5.2),
e.g. ``6A82`` → −27266.
"""

from __future__ import annotations

import enum


class SW(enum.IntEnum):
    """Fixed status words. ``61xx``, ``6Cxx`` and ``63Cx`` carry a number; see the helpers."""

    OK = 0x9000
    MEMORY_FAILURE = 0x6581
    WRONG_LENGTH = 0x6700
    INVALID_STATE = 0x6901
    INCOMPATIBLE_FILE_STRUCTURE = 0x6981
    SECURITY_STATUS_NOT_SATISFIED = 0x6982
    AUTH_METHOD_BLOCKED = 0x6983
    REFERENCE_DATA_INVALID = 0x6984
    CONDITIONS_NOT_SATISFIED = 0x6985
    NO_CURRENT_EF = 0x6986
    SM_DATA_WRONG = 0x6988
    WRONG_DATA = 0x6A80
    FUNCTION_NOT_SUPPORTED = 0x6A81
    FILE_NOT_FOUND = 0x6A82
    RECORD_NOT_FOUND = 0x6A83
    NOT_ENOUGH_SPACE = 0x6A84
    LC_TLV_MISMATCH = 0x6A85
    WRONG_P1P2 = 0x6A86
    REFERENCE_NOT_FOUND = 0x6A88
    OFFSET_BEYOND_EF = 0x6B00
    INS_NOT_SUPPORTED = 0x6D00
    CLA_NOT_SUPPORTED = 0x6E00
    NO_PRECISE_DIAGNOSIS = 0x6F00
    MAC_INVALID = 0x9302
    APPLICATION_BLOCKED = 0x9303
    INSUFFICIENT_FUNDS = 0x9401
    COUNTER_AT_MAX = 0x9402
    KEY_INDEX_NOT_SUPPORTED = 0x9403
    MAC_UNAVAILABLE = 0x9406


_MEANINGS: dict[int, tuple[str, str]] = {
    SW.OK: ("success", "成功"),
    SW.MEMORY_FAILURE: ("memory failure", "存储器错误"),
    SW.WRONG_LENGTH: ("wrong length", "长度错误"),
    SW.INVALID_STATE: ("command not allowed in the current state", "无效状态"),
    SW.INCOMPATIBLE_FILE_STRUCTURE: ("command incompatible with the file structure", "文件类型不匹配"),
    SW.SECURITY_STATUS_NOT_SATISFIED: ("security status not satisfied", "安全状态不满足"),
    SW.AUTH_METHOD_BLOCKED: ("authentication method (PIN or key) blocked", "认证方法锁定"),
    SW.REFERENCE_DATA_INVALID: ("referenced data invalid (no challenge)", "引用数据无效"),
    SW.CONDITIONS_NOT_SATISFIED: ("conditions of use not satisfied", "使用条件不满足"),
    SW.NO_CURRENT_EF: ("no current EF", "没有选择当前文件"),
    SW.SM_DATA_WRONG: ("secure messaging data objects wrong", "安全报文数据项不正确"),
    SW.WRONG_DATA: ("incorrect data field", "数据域参数不正确"),
    SW.FUNCTION_NOT_SUPPORTED: ("function not supported (card blocked)", "功能不支持或卡已锁定"),
    SW.FILE_NOT_FOUND: ("file not found", "文件未找到"),
    SW.RECORD_NOT_FOUND: ("record not found", "记录未找到"),
    SW.NOT_ENOUGH_SPACE: ("not enough space in the file", "文件中存储空间不够"),
    SW.LC_TLV_MISMATCH: ("Lc inconsistent with the TLV structure", "Lc与TLV结构不一致"),
    SW.WRONG_P1P2: ("incorrect P1/P2", "参数P1P2不正确"),
    SW.REFERENCE_NOT_FOUND: ("referenced data (key) not found", "引用数据（密钥）未找到"),
    SW.OFFSET_BEYOND_EF: ("offset beyond the end of the EF", "偏移量超出文件长度"),
    SW.INS_NOT_SUPPORTED: ("instruction not supported", "指令不支持"),
    SW.CLA_NOT_SUPPORTED: ("class not supported", "CLA不支持"),
    SW.NO_PRECISE_DIAGNOSIS: ("no precise diagnosis", "数据无效"),
    SW.MAC_INVALID: ("MAC invalid", "MAC无效"),
    SW.APPLICATION_BLOCKED: ("application permanently blocked", "应用已被永久锁定"),
    SW.INSUFFICIENT_FUNDS: ("insufficient funds", "金额不足"),
    SW.COUNTER_AT_MAX: ("counter at its maximum", "计数器已达到最大值"),
    SW.KEY_INDEX_NOT_SUPPORTED: ("key index not supported", "密钥索引不支持"),
    SW.MAC_UNAVAILABLE: ("MAC unavailable", "不能计算MAC"),
}


class StatusWordError(Exception):
    """A command ended with a non-success status word (card side: raise it from a handler)."""

    def __init__(self, sw: int, detail: str = ""):
        self.sw = sw
        self.detail = detail
        super().__init__(f"{sw:04X} {meaning(sw)}" + (f": {detail}" if detail else ""))


def more_data(n: int) -> int:
    """``61xx``: xx bytes wait for GET RESPONSE (00 means 256)."""
    return 0x6100 | (n & 0xFF)


def wrong_le(exact: int) -> int:
    """``6Cxx``: repeat with Le = xx."""
    return 0x6C00 | (exact & 0xFF)


def tries_left(n: int) -> int:
    """``63Cx``: verification failed, x tries left."""
    if not 0 <= n <= 15:
        raise ValueError("tries must be 0..15")
    return 0x63C0 | n


def is_success(sw: int) -> bool:
    return sw == SW.OK


def _family(sw: int) -> tuple[str, str] | None:
    """Meanings of the status-word families that carry a number (61xx, 6Cxx, 63Cx)."""
    hi, lo = sw >> 8, sw & 0xFF
    if hi == 0x61:
        return (f"{lo or 256} response bytes available (GET RESPONSE)", f"还有{lo or 256}字节响应数据")
    if hi == 0x6C:
        return (f"wrong Le; exact length is {lo or 256}", f"Le错误，正确长度为{lo or 256}")
    if hi == 0x63 and lo & 0xF0 == 0xC0:
        n = lo & 0x0F
        return (f"verification failed, {n} tries left", f"认证失败，还剩{n}次机会")
    return None


def _meanings(sw: int) -> tuple[str, str]:
    return _MEANINGS.get(sw) or _family(sw) or ("unknown status word", "未知状态字")


def meaning(sw: int) -> str:
    """English meaning of any status word, including the numbered families."""
    return _meanings(sw)[0]


def meaning_zh(sw: int) -> str:
    """Chinese meaning, for the reader-interface error text."""
    return _meanings(sw)[1]


def compat_code(sw: int) -> int:
    """Reader-interface return code for a card status word: −(SW1·256 + SW2)."""
    return -sw


def all_fixed() -> list[SW]:
    return list(SW)
