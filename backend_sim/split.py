"""How a sale's amount is split between the pooled fund, the personal account and cash.

Per line (amount ``L`` fen, in request order):

* class c (丙类): wholly self-paid — ``fulamt_ownpay = L``, nothing in scope;
* class b (乙类): first self-pay share — ``preselfpay = round(L × ratio)``, in scope ``L − preselfpay``;
* class a (甲类): wholly in scope.

Then, per line, the pooled fund pays ``round(in_scope × fund_ratio)`` (the ratio of the
institution's type, policy ``fund_ratio``: 0 for pharmacies by default); the personal account pays
the rest of the in-scope amount while the balance lasts (lines in order; only when
``acct_used_flag`` is "1"), and everything else is cash. Rounding is half up to the fen, per line,
so the totals are exactly the sums of the lines and ``medfee = fund + acct + cash`` always holds.
The account never pays self-paid shares (class c, class b's first share) and never goes below zero.
Non-medical items never reach this function: a sale that contains one is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend_sim.money import share

CHRGITM_LV = {"a": "01", "b": "02", "c": "03"}  # 甲 / 乙 / 丙 as the national platform codes them


@dataclass(frozen=True)
class Line:
    feedetl_sn: str
    code: str
    name: str
    cls: str  # "a" | "b" | "c"
    cnt: int
    price_fen: int
    selfpay_bp: int  # class b's first self-pay ratio in basis points (0 otherwise)

    @property
    def amount_fen(self) -> int:
        return self.cnt * self.price_fen


@dataclass(frozen=True)
class LineSplit:
    line: Line
    fulamt_ownpay: int
    preselfpay: int
    in_scope: int
    fund: int
    acct: int
    cash: int


@dataclass(frozen=True)
class Split:
    lines: tuple[LineSplit, ...]

    @property
    def medfee(self) -> int:
        return sum(x.line.amount_fen for x in self.lines)

    @property
    def fulamt_ownpay(self) -> int:
        return sum(x.fulamt_ownpay for x in self.lines)

    @property
    def preselfpay(self) -> int:
        return sum(x.preselfpay for x in self.lines)

    @property
    def in_scope(self) -> int:
        return sum(x.in_scope for x in self.lines)

    @property
    def fund(self) -> int:
        return sum(x.fund for x in self.lines)

    @property
    def acct(self) -> int:
        return sum(x.acct for x in self.lines)

    @property
    def cash(self) -> int:
        return sum(x.cash for x in self.lines)


def split(lines: list[Line], fund_ratio_bp: int, balance_fen: int, use_account: bool) -> Split:
    """Split ``lines``; the account pays at most ``balance_fen`` in total."""
    if balance_fen < 0:
        raise ValueError("balance cannot be negative")
    left = balance_fen if use_account else 0
    out: list[LineSplit] = []
    for ln in lines:
        amount = ln.amount_fen
        if ln.cls == "c":
            own, pre = amount, 0
        elif ln.cls == "b":
            own, pre = 0, share(amount, ln.selfpay_bp)
        elif ln.cls == "a":
            own, pre = 0, 0
        else:
            raise ValueError(f"unknown item class {ln.cls!r}")
        in_scope = amount - own - pre
        fund = share(in_scope, fund_ratio_bp)
        acct = min(left, in_scope - fund)
        left -= acct
        out.append(LineSplit(ln, own, pre, in_scope, fund, acct, amount - fund - acct))
    return Split(tuple(out))
