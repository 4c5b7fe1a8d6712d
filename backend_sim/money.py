"""Money: decimal yuan strings with two decimals at the edges (``"12.50"``), integer fen inside.

Ratios (``"0.10"``) are held as integer basis points (1/10,000) so every split is exact integer
arithmetic; a share of an amount is rounded half up to the fen.
"""

from __future__ import annotations

import re

_MONEY = re.compile(r"^(0|[1-9][0-9]{0,9})\.([0-9]{2})$")
_RATIO = re.compile(r"^(0|1)(?:\.([0-9]{1,4}))?$")
BP = 10_000  # basis points in 1


class MoneyError(ValueError):
    """A money or ratio string is malformed."""


def parse_yuan(value: object) -> int:
    """``"12.50"`` → 1250 fen. Only non-negative strings with exactly two decimals are accepted."""
    if not isinstance(value, str):
        raise MoneyError("money must be a string in yuan with two decimals, e.g. \"12.50\"")
    m = _MONEY.match(value)
    if not m:
        raise MoneyError(f"money must be yuan with two decimals, e.g. \"12.50\", got {value!r}")
    return int(m.group(1)) * 100 + int(m.group(2))


def yuan(fen: int) -> str:
    """1250 → ``"12.50"``; negative amounts keep their sign (``"-3.00"``)."""
    sign = "-" if fen < 0 else ""
    fen = abs(fen)
    return f"{sign}{fen // 100}.{fen % 100:02d}"


def parse_ratio(value: object) -> int:
    """``"0.10"`` → 1000 basis points; between ``"0"`` and ``"1"``, at most four decimals."""
    if not isinstance(value, str):
        raise MoneyError("a ratio must be a decimal string such as \"0.10\"")
    m = _RATIO.match(value)
    if not m:
        raise MoneyError(f"a ratio must be a decimal string between 0 and 1, e.g. \"0.10\", got {value!r}")
    whole, frac = int(m.group(1)), (m.group(2) or "").ljust(4, "0")
    bp = whole * BP + int(frac)
    if bp > BP:
        raise MoneyError(f"a ratio cannot exceed 1, got {value!r}")
    return bp


def ratio_str(bp: int) -> str:
    """1000 → ``"0.10"`` (at least two decimals, up to four)."""
    s = f"{bp // BP}.{bp % BP:04d}"
    while s.endswith("0") and len(s.split(".")[1]) > 2:
        s = s[:-1]
    return s


def share(fen: int, bp: int) -> int:
    """``fen × bp / 10,000`` rounded half up to the fen (amounts are non-negative)."""
    return (fen * bp + BP // 2) // BP
