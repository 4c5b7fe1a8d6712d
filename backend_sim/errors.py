"""Refusal codes: a stable machine-readable ``err_code`` with an English and a Chinese message.

Every refused request is answered ``infcode = -1`` with ``err_code`` from this table, ``err_msg``
(English / 中文) and, where it helps, typed details in ``output`` (e.g. the offending lines).
"""

from __future__ import annotations

from typing import Any

CODES: dict[str, tuple[str, str]] = {
    # the message itself
    "BAD_JSON": ("the request is not a JSON object", "报文不是合法的JSON对象"),
    "TOO_LARGE": ("the request is too large", "报文过大"),
    "BAD_ENVELOPE": ("the envelope is malformed", "报文头错误"),
    "BAD_INPUT": ("the input is malformed", "交易输入参数错误"),
    "UNKNOWN_INFNO": ("unknown transaction number", "未知交易编号"),
    "EXPIRED": ("the request was processed after its expiry time", "报文已过期"),
    "MSGID_REUSED": ("this msgid was already used for another request", "报文ID重复且内容不同"),
    "MSG_REVERSED": ("this message was reversed before it arrived", "该报文已被冲正"),
    # institution and terminal
    "UNKNOWN_TERMINAL": ("the terminal is not registered", "终端未登记"),
    "INSTITUTION_MISMATCH": ("fixmedins_code is not the terminal's institution",
                             "定点机构编号与终端登记不符"),
    "INSTITUTION_SUSPENDED": ("the institution is suspended", "定点机构已暂停医保服务"),
    "INSTITUTION_BLACKLISTED": ("the institution is blacklisted", "定点机构已列入失信黑名单"),
    "REGION_MISMATCH": ("the envelope's region codes do not match the registry", "医保区划与登记信息不符"),
    # person and card
    "PERSON_NOT_FOUND": ("no insured person with this card", "未查询到参保人员信息"),
    "CARD_MISMATCH": ("the card does not belong to this ID number", "卡号与证件号码不符"),
    "CARD_LOST": ("the card is reported lost", "卡已挂失"),
    "CARD_BLACKLISTED": ("the card is blacklisted", "卡已列入黑名单"),
    "CARD_CANCELLED": ("the card is cancelled", "卡已注销"),
    "CARD_NOT_ACTIVATED": ("the card is not activated", "卡未激活"),
    "CARD_NOT_GENUINE": ("the card cryptogram does not verify", "卡片认证失败"),
    "PIN_NOT_VERIFIED": ("this institution requires the PIN verified on the chip", "该机构刷卡须验证卡密码"),
    "CROSS_REGION_NOT_FILED": ("cross-region settlement needs a filing", "异地就医未备案"),
    # sale
    "UNKNOWN_ITEM": ("items not in the catalogue", "项目未在医保目录中"),
    "NON_MEDICAL_ITEM": ("non-medical items cannot be paid by medical insurance",
                         "非医疗用品不得使用医保支付"),
    "TOTAL_MISMATCH": ("medfee_sumamt is not the sum of the lines", "费用总额与明细合计不符"),
    # void and reversal
    "SETTLEMENT_NOT_FOUND": ("no such settlement for this institution", "未查询到结算记录"),
    "ALREADY_VOIDED": ("the settlement is already voided", "该结算已撤销"),
    "SETTLEMENT_REVERSED": ("the settlement was reversed", "该结算已冲正"),
    "NOT_REVERSIBLE": ("this transaction cannot be reversed", "该交易不允许冲正"),
    "REVERSAL_MISMATCH": ("oinfno does not match the original message", "原交易编号与原报文不符"),
    "REVERSAL_CONFLICT": ("the void cannot be reversed: the balance was spent since",
                          "撤销交易无法冲正：账户余额不足"),
    # activation
    "PASSWORD_WRONG": ("wrong portal password", "密码错误"),
    "PASSWORD_CHANGE_REQUIRED": ("the initial password must be changed", "初始密码必须修改"),
    "PASSWORD_WEAK": ("the new password is not acceptable", "新密码不符合要求"),
    "ACCOUNT_LOCKED": ("too many wrong passwords: the account is locked", "密码错误次数过多，账户已锁定"),
    # the simulator itself
    "INJECTED_FAILURE": ("failure injected by the fault controls", "测试注入的故障"),
    "INTERNAL_ERROR": ("internal error", "内部错误"),
}


class Refusal(Exception):
    """A request refused with ``code``; ``details`` go into the answer's ``output``.

    ``keep_writes``: the transaction's writes stand although the request is refused (a wrong
    activation password still counts towards the lock); otherwise they are rolled back.
    """

    def __init__(self, code: str, detail: str = "", *, keep_writes: bool = False, **details: Any) -> None:
        if code not in CODES:
            raise ValueError(f"unknown refusal code {code}")
        self.code = code
        self.detail = detail
        self.keep_writes = keep_writes
        self.details = details
        super().__init__(code if not detail else f"{code}: {detail}")

    @property
    def message(self) -> str:
        en, zh = CODES[self.code]
        text = f"{en} / {zh}"
        return f"{text}: {self.detail}" if self.detail else text
