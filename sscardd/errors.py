"""The daemon's named errors, each with its standard reader-interface return code (card-spec §5.2)
and a message in English and Chinese.

Callers (POS over MQTT, kiosks, the CLI) see ``code`` (a stable name), ``compat_code`` (the number
an integrator of the MOHRSS reader interface knows) and the two messages. A card status word that
has no name of its own is reported as ``CARD_STATUS`` with ``compat_code = −(SW1·256 + SW2)``.

Messages never carry a PIN, a PIN block, an ID number or a name: details are typed fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from apdu_specs import status


@dataclass(frozen=True)
class ErrorKind:
    code: str
    compat_code: int
    message: str
    message_zh: str


_KINDS = [
    ErrorKind("NOT_SSCARD", -1, "the card is not a social security card", "卡类型不对"),
    ErrorKind("NO_CARD", -2, "no card in the reader", "无卡"),
    ErrorKind("CARD_NOT_POWERED", -3, "the card could not be powered", "卡片上电失败"),
    ErrorKind("CARD_NO_ANSWER", -4, "the card does not answer", "卡无应答"),
    ErrorKind("READER_UNAVAILABLE", -11, "cannot connect to the reader", "连接读卡器失败"),
    ErrorKind("READER_NOT_CONNECTED", -12, "the reader is not connected", "读卡器未连接"),
    ErrorKind("UNSUPPORTED", -13, "the reader does not support this command", "不支持该命令"),
    ErrorKind("BAD_PARAMETER", -14, "bad parameter", "参数错误"),
    ErrorKind("READER_CHECKSUM", -15, "reader frame checksum error", "读卡器数据校验错"),
    ErrorKind("BAD_CARD_ID", -20, "the card identification code is malformed", "卡识别码格式错"),
    ErrorKind("CARD_NOT_GENUINE", -21, "card authentication failed: the card is not genuine",
              "内部认证失败（卡片不可信）"),
    ErrorKind("CARD_MISMATCH", -22, "the card does not match the input", "输入信息与卡不符"),
    ErrorKind("INVALID_INPUT", -23, "invalid input", "输入信息无效"),
    ErrorKind("PSAM_KEY_LEVEL", -24, "the PSAM lacks the key for this operation", "PSAM卡密钥级别不够"),
    ErrorKind("PIN_CANCELLED", -31, "PIN entry cancelled", "用户取消密码输入"),
    ErrorKind("PIN_TIMEOUT", -32, "PIN entry timed out", "密码输入超时"),
    ErrorKind("PIN_LENGTH", -33, "PIN length is wrong", "密码长度错误"),
    ErrorKind("PIN_MISMATCH", -34, "the two new PINs differ", "两次输入的新密码不一致"),
    ErrorKind("PIN_INITIAL", -35, "the initial PIN must be changed before transacting",
              "初始密码不允许交易，请先修改密码"),
    ErrorKind("PIN_TO_INITIAL", -36, "the PIN cannot be changed to an initial PIN", "新密码不能为初始密码"),
    ErrorKind("BAD_CALCULATION_DATA", -41, "bad computation data", "计算数据错误"),
    ErrorKind("PIN_WRONG", -51, "wrong PIN", "密码错误"),
    ErrorKind("PIN_BLOCKED", -52, "the PIN is blocked", "密码已锁定"),
    ErrorKind("NO_PSAM", -2201, "no PSAM in the reader", "无PSAM卡"),
    ErrorKind("PSAM_NO_ALGORITHM", -2202, "the PSAM lacks the card's algorithm", "PSAM卡不支持该算法"),
    ErrorKind("PSAM_NO_RKSSSE", -2203, "the PSAM lacks RKSSSE", "PSAM卡无RKSSSE密钥"),
    ErrorKind("HSM_NOT_NEEDED", -2204, "no HSM computation needed for this file", "无需加密机计算"),
    # Not in the reader interface; the daemon's own (compat code: the nearest standard one).
    ErrorKind("CARD_REMOVED", -2, "the card was removed during the operation", "操作过程中卡被拔出"),
    ErrorKind("READER_GONE", -11, "the reader went away", "读卡器已断开"),
    ErrorKind("CARD_GARBAGE", -4, "the card answered something malformed", "卡片应答数据错误"),
    ErrorKind("CARD_STATUS", 0, "the card refused the command", "卡片返回错误状态"),
    ErrorKind("ID_REUSED", -23, "this request id was used within 24 hours with other arguments",
              "请求编号在24小时内已用于其他参数"),
    # The POS message layer (sscardd.pos_api). ``field`` and ``reason`` details say what was wrong;
    # they never echo a value the POS sent.
    ErrorKind("BAD_REQUEST", -14, "malformed request", "请求格式错误"),
    ErrorKind("UNKNOWN_OP", -13, "unknown operation", "不支持的操作"),
    ErrorKind("PAYLOAD_TOO_LARGE", -14, "the request is too large", "请求数据过大"),
    ErrorKind("REPLY_TOPIC_REFUSED", -23, "the reply topic lies outside this terminal's reply namespace",
              "应答主题不在本终端的应答命名空间内"),
    ErrorKind("CLEAR_PIN_REFUSED", -23,
              "a clear PIN over MQTT is not allowed on this terminal (use the keypad or a PIN block)",
              "本终端不允许通过MQTT传送明文密码（请使用密码键盘或密码块）"),
    # Settlement (sscardd.service): not in the reader interface; the project's own range −3001….
    # Refusals the backend names keep the backend's code where a POS acts on it (the backend's
    # ``err_code`` is in the ``backend_code`` detail, its text in ``backend_message``); any other
    # backend refusal is BACKEND_REFUSED.
    ErrorKind("TERMINAL_MISMATCH", -3001, "the PSAM in the SAM slot belongs to another terminal",
              "PSAM卡终端号与本终端配置不符"),
    ErrorKind("CARD_ON_HOLD", -3002,
              "an earlier settlement with this card has an unknown outcome and is being reversed; "
              "try again shortly", "该卡上一笔结算结果未知，正在冲正，请稍后再试"),
    ErrorKind("OUTCOME_UNKNOWN", -3003,
              "the backend's answer was lost or ambiguous: the settlement is being reversed and "
              "nothing stays booked", "结算应答丢失或不明确，正在冲正，不会扣款"),
    ErrorKind("BACKEND_UNAVAILABLE", -3004, "the settlement backend did not answer; nothing was booked",
              "医保结算中心无应答，未结算"),
    ErrorKind("BACKEND_REFUSED", -3005, "the settlement backend refused the transaction",
              "医保结算中心拒绝交易"),
    ErrorKind("CARD_EXPIRED", -3006, "the card has expired", "卡已过有效期"),
    ErrorKind("CARD_LOST", -3007, "the card is reported lost", "卡已挂失"),
    ErrorKind("CARD_BLACKLISTED", -3008, "the card is blacklisted", "卡已列入黑名单"),
    ErrorKind("CARD_CANCELLED", -3009, "the card is cancelled", "卡已注销"),
    ErrorKind("CARD_NOT_ACTIVATED", -3010, "the card is not activated for medical insurance use",
              "卡未激活医保应用"),
    ErrorKind("INSTITUTION_SUSPENDED", -3011, "this institution is suspended from medical insurance",
              "定点机构已暂停医保结算"),
    ErrorKind("INSTITUTION_BLACKLISTED", -3012, "this institution is blacklisted", "定点机构已列入黑名单"),
    ErrorKind("CROSS_REGION_NOT_FILED", -3013,
              "cross-region settlement needs a filing (备案) in the insured region", "异地就医未备案"),
    ErrorKind("NON_MEDICAL_ITEM", -3014,
              "the personal account pays for medical items only: remove the lines listed",
              "个人账户不能支付非医保药品或日用品"),
    ErrorKind("UNKNOWN_ITEM", -3015, "items not in the catalogue", "项目不在医保目录中"),
    ErrorKind("SETTLEMENT_NOT_FOUND", -3016, "no such settlement of this institution", "结算记录不存在"),
    ErrorKind("ALREADY_VOIDED", -3017, "the settlement was already voided", "该结算已退费"),
    ErrorKind("SETTLEMENT_REVERSED", -3018, "the settlement was reversed", "该结算已冲正"),
    ErrorKind("PIN_REQUIRED", -3019,
              "this institution requires the cardholder PIN: send a PIN block or use the keypad",
              "本机构结算须验证持卡人密码"),
    ErrorKind("SALE_INTERRUPTED", -3020,
              "the daemon stopped before the settlement was sent; nothing was booked",
              "结算发送前服务中断，未结算"),
    ErrorKind("PERSON_NOT_FOUND", -3021, "the backend knows no insured person for this card",
              "未查询到参保人信息"),
    # −5 is the interface's "reader library failed": the nearest to "the middleware itself failed".
    ErrorKind("INTERNAL_ERROR", -5, "internal error", "内部错误"),
]
KINDS: dict[str, ErrorKind] = {k.code: k for k in _KINDS}


class SSCardError(Exception):
    """A named error. ``details`` are typed, non-secret fields (tries_left, sw, reader, ...)."""

    def __init__(self, code: str, detail: str = "", **details: Any):
        if code not in KINDS:
            raise ValueError(f"unknown error code {code!r}")
        self.kind = KINDS[code]
        self.detail = detail
        self.details = details
        super().__init__(self.message + (f": {detail}" if detail else ""))

    @property
    def code(self) -> str:
        return self.kind.code

    @property
    def compat_code(self) -> int:
        if self.kind.code == "CARD_STATUS":
            return status.compat_code(int(self.details.get("sw", 0x6F00)))
        return self.kind.compat_code

    @property
    def message(self) -> str:
        if self.kind.code == "PIN_WRONG" and "tries_left" in self.details:
            return f"wrong PIN, {self.details['tries_left']} tries left"
        if self.kind.code == "CARD_STATUS":
            sw = int(self.details.get("sw", 0x6F00))
            return f"the card answered {sw:04X} ({status.meaning(sw)})"
        return self.kind.message

    @property
    def message_zh(self) -> str:
        if self.kind.code == "PIN_WRONG" and "tries_left" in self.details:
            return f"密码错误，还可以尝试{self.details['tries_left']}次"
        if self.kind.code == "CARD_STATUS":
            sw = int(self.details.get("sw", 0x6F00))
            return f"卡片返回{sw:04X}（{status.meaning_zh(sw)}）"
        return self.kind.message_zh

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "compat_code": self.compat_code,
                               "message": self.message, "message_zh": self.message_zh}
        for k, v in self.details.items():
            out[k] = f"{v:04X}" if k == "sw" else v
        return out


def card_status(sw: int, what: str = "") -> SSCardError:
    """The error for a status word a command was not expected to return."""
    return SSCardError("CARD_STATUS", what, sw=sw)
