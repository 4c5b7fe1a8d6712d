"""The card session's cost through real pcscd + vpcd, against raw pyscard in the same run.

One run, on one pcscd with ``sscard-emu serve`` holding a generation-3 card (slot 0) and its
PSAM (slot 1):

1. raw: pyscard ``SCardTransmit`` of SELECT MF in a plain loop, on the card and on the PSAM —
   the floor of one round trip on each reader;
2. session per APDU: the same SELECT MF sent through the session layer (``Exchanger.send`` inside
   one ``PcscReader.run`` operation: worker thread, T=0 rules, trace hook, error mapping);
3. ``read_basic`` end to end (card authentication through the PSAM, RKSSSE, all fields), next to
   its floor: the number of card and PSAM APDUs it sends times the raw round trip on each reader.

Targets (issue 3): per APDU ≤ 1.15 × raw; read_basic ≤ floor + 1 ms. Medians over rounds; raw and
session alternate within each round so that drift on a shared machine hits both.

    .venv/bin/python bench/bench_session.py [--iterations N] [--reads N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from firmware_sim.lab import (
    VPCD_READERS,
    CardConnection,
    Pcscd,
    PcscdUnavailable,
    card_process,
    sscard_emu_argv,
    wait_card_state,
)
from sscardd.psam import PsamClient
from sscardd.readers.base import CardLink
from sscardd.readers.pcsc import PcscReader
from sscardd.session import CardSession
from sscardd.transport import Exchanger

SELECT_MF = bytes.fromhex("00A4000C023F00")
CARD, PSAM = VPCD_READERS[0], VPCD_READERS[1]


def raw_loop(reader: str, n: int) -> list[float]:
    with CardConnection(reader) as conn:
        for _ in range(20):
            conn.transmit(SELECT_MF)
        out = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            conn.transmit(SELECT_MF)
            out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


async def session_loop(reader: PcscReader, n: int) -> list[float]:
    def op(link: CardLink) -> list[float]:
        ex = Exchanger(link)
        for _ in range(20):
            ex.send(SELECT_MF)
        times = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            r = ex.send(SELECT_MF)
            times.append((time.perf_counter_ns() - t0) / 1e6)
            if r.sw != 0x9000:
                raise RuntimeError(f"SELECT MF answered {r.sw:04X}")
        return times

    return await reader.run(op)


async def read_basic_loop(session: CardSession, n: int) -> tuple[list[float], dict[str, int]]:
    counts = {"card": 0, "psam": 0}

    def count(label: str, _c: bytes, _r: bytes) -> None:
        counts[label] = counts.get(label, 0) + 1

    await session.read_basic()  # warm-up
    session.trace = count
    assert session.psam is not None
    session.psam.trace = count
    times = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        await session.read_basic()
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return times, {k: v // n for k, v in counts.items()}


def p(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def run(args: argparse.Namespace, workdir: Path) -> int:
    emu = sscard_emu_argv()
    card_img, psam_img = workdir / "card.json", workdir / "psam.json"
    import subprocess

    subprocess.run([*emu, "issue", "--out", str(card_img), "--force"], check=True,
                   capture_output=True)
    subprocess.run([*emu, "issue", "--psam", "--out", str(psam_img), "--force"], check=True,
                   capture_output=True)
    argv = [*emu, "serve", "--card", str(card_img), "--psam", str(psam_img)]
    with open(workdir / "serve.log", "wb") as log, card_process(argv, log=log):
        for r in (CARD, PSAM):
            if not wait_card_state(r, present=True, timeout=20):
                print(f"bench_session: no card in {r}", file=sys.stderr)
                return 1
        rounds: dict[str, list[float]] = {k: [] for k in
                                          ("raw_card", "raw_psam", "session", "read_basic")}
        counts: dict[str, int] = {}
        for i in range(args.rounds):
            print(f"  round {i + 1}/{args.rounds}", file=sys.stderr, flush=True)
            rounds["raw_card"].append(statistics.median(raw_loop(CARD, args.iterations)))
            rounds["raw_psam"].append(statistics.median(raw_loop(PSAM, args.iterations)))
            card_reader, psam_reader = PcscReader(CARD), PcscReader(PSAM)
            try:
                rounds["session"].append(statistics.median(
                    await session_loop(card_reader, args.iterations)))
                session = CardSession(card_reader, PsamClient(psam_reader))
                times, counts = await read_basic_loop(session, args.reads)
                rounds["read_basic"].append(statistics.median(times))
            finally:
                await card_reader.close()
                await psam_reader.close()
    med = {k: statistics.median(v) for k, v in rounds.items()}
    floor = counts.get("card", 0) * med["raw_card"] + counts.get("psam", 0) * med["raw_psam"]
    per_apdu = med["session"] / med["raw_card"]
    print(f"\n{args.rounds} round(s), medians over rounds (ms):")
    print(f"  raw SCardTransmit, card reader     p50 {med['raw_card']:.4f}")
    print(f"  raw SCardTransmit, PSAM reader     p50 {med['raw_psam']:.4f}")
    print(f"  session layer, per APDU in one op  p50 {med['session']:.4f}")
    print(f"  read_basic end to end              p50 {med['read_basic']:.3f}  "
          f"({counts.get('card', 0)} card + {counts.get('psam', 0)} PSAM APDUs)")
    print(f"  read_basic floor (APDUs × raw)         {floor:.3f}")
    print()
    print(f"session/raw per APDU: {per_apdu:.3f}  (target <= 1.15: "
          f"{'met' if per_apdu <= 1.15 else 'MISSED'}); per-round "
          + ", ".join(f"{s / r:.3f}" for s, r in zip(rounds['session'], rounds['raw_card'],
                                                     strict=True)))
    over = med["read_basic"] - floor
    print(f"read_basic - floor: {over:+.3f} ms  (target <= +1 ms: {'met' if over <= 1 else 'MISSED'})")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--reads", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    try:
        daemon = Pcscd.acquire()
    except PcscdUnavailable as exc:
        print(f"bench_session: {exc}", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="bench_session-") as tmp:
            return asyncio.run(run(args, Path(tmp)))
    finally:
        daemon.close()


if __name__ == "__main__":
    sys.exit(main())
