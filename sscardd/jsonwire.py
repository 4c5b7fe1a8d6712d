"""Strict JSON for every message the daemon takes in or sends (POS requests over MQTT, the kiosk
socket, backend answers): one parser and one encoder, so the three cannot drift apart.

:func:`loads` refuses a repeated key (which of two values counts would be the parser's guess, and
a validator and a consumer could guess differently) and NaN/Infinity (not JSON). :func:`dumps`
writes compact UTF-8 with Unicode unescaped, on one line, and refuses NaN.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError("duplicate key")
        out[k] = v
    return out


def _no_constant(_name: str) -> NoReturn:
    raise ValueError("NaN and Infinity are not JSON")


def loads(text: str) -> Any:
    """Strict JSON: a repeated key or NaN/Infinity is a ValueError."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def dumps(obj: Any) -> bytes:
    """One line of UTF-8 JSON (Unicode not escaped; ``\\n`` cannot occur inside; NaN refused)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
