"""In-process cost of the emulated card per APDU, without any transport.

The pcscd benchmark (``bench_vpcd.py``) is dominated by PC/SC and the socket, and its figures move
by ±20 % between runs on a shared machine. This one isolates what the card OS itself adds: it
times ``execute()`` of a generation-2 and a generation-3 card against a floor card whose
``execute()`` returns ``90 00``, in the same run, and prints medians in microseconds.

    .venv/bin/python bench/bench_cos.py [--iterations N] [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apdu_specs import keyfile
from firmware_sim.personalise import CardParams, issue_card
from firmware_sim.sscard import SocialSecurityCard

SELECT_SSSE = bytes.fromhex("00A404000F7378312E73682EC9E7BBE1B1A3D5CF")
CASES: list[tuple[str, list[bytes], bytes]] = [
    ("SELECT MF", [], bytes.fromhex("00A4000C023F00")),
    ("SELECT SSSE", [], SELECT_SSSE),
    ("READ RECORD 7", [SELECT_SSSE, bytes.fromhex("00A4020002EF05")], bytes.fromhex("00B207000B")),
    ("VERIFY (right)", [SELECT_SSSE], bytes.fromhex("0020000003123456")),
    ("INTERNAL AUTH", [SELECT_SSSE], bytes.fromhex("0088000010") + bytes(range(16))),
]


def per_call_us(fn: Callable[[bytes], bytes], apdu: bytes, n: int, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn(apdu)
        samples.append((time.perf_counter_ns() - t0) / n / 1000)
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iterations", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    roots = keyfile.load(keyfile.DEFAULT_TEST_KEYFILE)

    def floor(apdu: bytes) -> bytes:
        return b"\x90\x00"

    floor_us = per_call_us(floor, CASES[0][2], args.iterations, args.repeats)
    print(f"floor execute(): {floor_us:.3f} µs (median of {args.repeats} × {args.iterations})")
    print(f"{'gen':<4} {'APDU':<16} {'µs/APDU':>9} {'SW':>5}")
    for gen in (2, 3):
        card = SocialSecurityCard(issue_card(CardParams(generation=gen), roots))
        for label, prep, apdu in CASES:
            card.reset()
            for p in prep:
                card.execute(p)
            sw = card.execute(apdu)[-2:].hex().upper()
            us = per_call_us(card.execute, apdu, args.iterations, args.repeats)
            print(f"{gen:<4} {label:<16} {us:>9.2f} {sw:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
