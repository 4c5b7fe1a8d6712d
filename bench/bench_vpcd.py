"""APDU round trips through real pcscd + vpcd: our emulator against the floor and vicc.

One run measures, one after the other on vpcd slot 0 (port 35963, reader "Virtual PCD 00 00"),
floor and ours alternating for ``--rounds`` rounds (figures are medians over rounds):

- ``floor``: ``bench/floor_card.py``, every APDU answered with 90 00 over the emulator's own vpcd
  link; what PC/SC + pcscd + vpcd + the socket cost.
- ``ours``: ``sscard-emu serve`` with a freshly issued generation-2 card image.
- ``vicc``: Debian's reference emulator (vsmartcard-vpicc), ``-t iso7816``.

Each card runs as its own process. When pcscd sees it present, the benchmark connects once
(pyscard's low-level API), warms up, and times SCardTransmit calls: SELECT MF for all three, and
for ours also SELECT of the SSSE application and READ RECORD in EF05. It prints p50/p99/mean
and the ratios ours/floor (SELECT MF, target ≤ 1.5) and vicc/ours (target ≥ 100).

    .venv/bin/python bench/bench_vpcd.py [--iterations N] [--json FILE]

It uses a running pcscd with the vpcd readers, or starts one (root) and stops it at the end.
Every process it starts is stopped; between cards it waits until pcscd sees the slot empty.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from smartcard import scard

from firmware_sim.lab import (
    SELECT_MF,
    VPCD_PORT,
    VPCD_READERS,
    Pcscd,
    PcscdUnavailable,
    PcscError,
    card_process,
    pcsc_context,
    tail_file,
    wait_card_state,
)

FLOOR_CARD = Path(__file__).resolve().parent / "floor_card.py"


def floor_card_argv(port: int = VPCD_PORT) -> list[str]:
    """The floor card: every APDU answered 90 00 through the emulator's own vpcd link."""
    return [sys.executable, str(FLOOR_CARD), "--vpcd", f"127.0.0.1:{port}"]

READER = VPCD_READERS[0]
SELECT_SSSE = bytes.fromhex("00A404000F7378312E73682EC9E7BBE1B1A3D5CF")
SELECT_EF05 = bytes.fromhex("00A4020002EF05")
READ_RECORD_7 = bytes.fromhex("00B207000B")
SW_OK = (0x90, 0x00)

VICC = Path("/usr/bin/vicc")
# python3-virtualsmartcard installs the package as .../site-packages/virtualsmartcard/
# virtualsmartcard/, outside every sys.path; the first of these that holds it goes on PYTHONPATH.
VICC_MODULE_ROOTS = (
    Path("/usr/lib/python3/site-packages/virtualsmartcard"),
    Path("/usr/lib/python3/site-packages"),
    Path("/usr/lib/python3/dist-packages"),
)

PRESENT_TIMEOUT = 20.0
ABSENT_TIMEOUT = 10.0


class Skip(Exception):
    """A peer cannot be measured here (the message says why); the others still run."""


class BenchError(Exception):
    """A peer failed in a way that makes its figures meaningless."""


@dataclass
class Timing:
    """Round-trip times of one APDU, in milliseconds."""

    label: str
    apdu: str
    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    sw: str
    non_9000: int


@dataclass
class PeerResult:
    name: str
    status: str  # "ok", "skipped" or "failed"
    reason: str = ""
    timings: dict[str, Timing] = field(default_factory=dict)


@dataclass
class Step:
    """Time ``apdu`` ``n`` times after sending ``prepare`` once (each must answer 90 00)."""

    label: str
    apdu: bytes
    n: int
    prepare: tuple[bytes, ...] = ()


def _sw(response: list[int]) -> str:
    return bytes(response[-2:]).hex().upper() if len(response) >= 2 else "(none)"


def _send(hcard: Any, protocol: int, apdu: bytes) -> list[int]:
    hresult, response = scard.SCardTransmit(hcard, protocol, list(apdu))
    if hresult != scard.SCARD_S_SUCCESS:
        raise PcscError(f"SCardTransmit({apdu.hex().upper()})", hresult)
    return list(response)


def time_apdu(hcard: Any, protocol: int, step: Step, warmup: int) -> Timing:
    """Warm up, then time ``step.n`` transmits of ``step.apdu``."""
    for prep in step.prepare:
        response = _send(hcard, protocol, prep)
        if tuple(response[-2:]) != SW_OK:
            raise BenchError(f"{prep.hex().upper()} (before {step.label}) → SW {_sw(response)}")
    command = list(step.apdu)
    transmit = scard.SCardTransmit
    first_sw = ""
    for _ in range(warmup):
        _send(hcard, protocol, step.apdu)
    samples = [0] * step.n
    non_9000 = 0
    clock = time.perf_counter_ns
    for i in range(step.n):
        t0 = clock()
        hresult, response = transmit(hcard, protocol, command)
        samples[i] = clock() - t0
        if hresult != scard.SCARD_S_SUCCESS:
            raise PcscError(f"SCardTransmit({step.label})", hresult)
        if response[-2:] != [0x90, 0x00]:
            non_9000 += 1
            first_sw = first_sw or _sw(response)
    ms = [s / 1e6 for s in samples]
    p99 = statistics.quantiles(ms, n=100, method="inclusive")[98] if len(ms) > 1 else ms[0]
    return Timing(
        label=step.label,
        apdu=step.apdu.hex().upper(),
        n=step.n,
        p50_ms=statistics.median(ms),
        p99_ms=p99,
        mean_ms=statistics.fmean(ms),
        min_ms=min(ms),
        max_ms=max(ms),
        sw=first_sw or "9000",
        non_9000=non_9000,
    )


def measure(
    name: str,
    argv: list[str],
    steps: list[Step],
    *,
    warmup: int,
    workdir: Path,
    env: dict[str, str] | None = None,
) -> PeerResult:
    """Run one card process on slot 0, time ``steps`` against it, stop it, wait for removal."""
    log_path = workdir / f"{name}.log"
    result = PeerResult(name=name, status="ok")
    if not wait_card_state(READER, present=False, timeout=ABSENT_TIMEOUT):
        raise BenchError(f"{READER} holds a card before {name} starts (another emulator on it?)")
    with open(log_path, "wb") as log, card_process(argv, env=env, log=log) as proc:
        if not wait_card_state(READER, present=True, timeout=PRESENT_TIMEOUT):
            status = proc.poll()
            state = f"exited with {status}" if status is not None else "still running"
            raise BenchError(
                f"{name}: no card seen in {READER} after {PRESENT_TIMEOUT:.0f} s "
                f"(process {state}); its output:{tail_file(log_path)}"
            )
        with pcsc_context() as ctx:
            hresult, hcard, protocol = scard.SCardConnect(
                ctx,
                READER,
                scard.SCARD_SHARE_SHARED,
                scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
            )
            if hresult != scard.SCARD_S_SUCCESS:
                raise PcscError(f"SCardConnect({READER!r}) to {name}", hresult)
            try:
                for step in steps:
                    print(f"  {name}: {step.label} × {step.n} …", file=sys.stderr, flush=True)
                    try:
                        result.timings[step.label] = time_apdu(hcard, protocol, step, warmup)
                    except BenchError as exc:
                        result.status = "failed"
                        result.reason = f"{step.label}: {exc}"
                        break
            finally:
                scard.SCardDisconnect(hcard, scard.SCARD_LEAVE_CARD)
    if not wait_card_state(READER, present=False, timeout=ABSENT_TIMEOUT):
        raise BenchError(f"{name}: card still present {ABSENT_TIMEOUT:.0f} s after it stopped")
    return result


def ours_argv(workdir: Path) -> list[str]:
    """Issue a card image with ``sscard-emu`` and return the ``serve`` command line."""
    emu = Path(sys.executable).parent / "sscard-emu"
    if not emu.exists():
        raise Skip(f"{emu} does not exist (run `make setup`)")
    image = workdir / "card.img"
    try:
        done = subprocess.run(
            [str(emu), "issue", "--force", "--out", str(image), "--generation", "2"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        raise Skip("`sscard-emu issue` did not finish in 120 s") from None
    if done.returncode != 0 or not image.exists():
        lines = (done.stderr or done.stdout).strip().splitlines()
        detail = lines[-1].strip() if lines else f"exit status {done.returncode}"
        raise Skip(f"`sscard-emu issue` failed (not implemented yet?): {detail}")
    return [str(emu), "serve", "--card", str(image), "--vpcd", f"127.0.0.1:{VPCD_PORT}"]


def vicc_command() -> tuple[list[str], dict[str, str]]:
    """Command line and environment to run vicc with this interpreter (it needs pycryptodome)."""
    if not VICC.exists():
        raise Skip(f"{VICC} is missing (Debian package vsmartcard-vpicc)")
    root = next(
        (r for r in VICC_MODULE_ROOTS if (r / "virtualsmartcard" / "VirtualSmartcard.py").exists()),
        None,
    )
    if root is None:
        raise Skip("module virtualsmartcard missing (Debian package python3-virtualsmartcard)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    check = subprocess.run(
        [sys.executable, "-c", "import Crypto.Cipher, virtualsmartcard.VirtualSmartcard"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check.returncode != 0:
        last = check.stderr.strip().splitlines()[-1:] or ["?"]
        raise Skip(
            f"vicc cannot be imported with {sys.executable}: {last[0]} "
            "(it needs pycryptodome, from the test extras)"
        )
    argv = [sys.executable, str(VICC), "-t", "iso7816", "-H", "127.0.0.1", "-P", str(VPCD_PORT)]
    return argv, env


def _ratio(a: PeerResult | None, b: PeerResult | None, label: str) -> float | None:
    if a is None or b is None or label not in a.timings or label not in b.timings:
        return None
    return a.timings[label].p50_ms / b.timings[label].p50_ms


def _median_ratio(rounds: list[dict[str, PeerResult]], a: str, b: str, label: str) -> float | None:
    """Median over rounds of a/b; a peer measured in one round only pairs with every round."""
    a_runs = [r[a] for r in rounds if a in r]
    b_runs = [r[b] for r in rounds if b in r]
    if len(a_runs) == len(b_runs):
        pairs = list(zip(a_runs, b_runs, strict=True))
    else:
        pairs = [(x, y) for x in a_runs for y in b_runs]
    values = [v for x, y in pairs if (v := _ratio(x, y, label)) is not None]
    return statistics.median(values) if values else None


def merge_rounds(rounds: list[dict[str, PeerResult]]) -> dict[str, PeerResult]:
    """One result per peer: each timing is the median of its per-round figures."""
    merged: dict[str, PeerResult] = {}
    for r in rounds:
        for name, res in r.items():
            merged.setdefault(name, PeerResult(name=name, status=res.status, reason=res.reason))
            if res.status != "ok":
                merged[name].status, merged[name].reason = res.status, res.reason
    for name, out in merged.items():
        labels = {label for r in rounds if name in r for label in r[name].timings}
        for label in sorted(labels, key=lambda lb: list(_first(rounds, name).timings).index(lb)):
            ts = [r[name].timings[label] for r in rounds if name in r and label in r[name].timings]
            out.timings[label] = Timing(
                label=label,
                apdu=ts[0].apdu,
                n=sum(t.n for t in ts),
                p50_ms=statistics.median(t.p50_ms for t in ts),
                p99_ms=statistics.median(t.p99_ms for t in ts),
                mean_ms=statistics.median(t.mean_ms for t in ts),
                min_ms=min(t.min_ms for t in ts),
                max_ms=max(t.max_ms for t in ts),
                sw=ts[0].sw,
                non_9000=sum(t.non_9000 for t in ts),
            )
    return merged


def _first(rounds: list[dict[str, PeerResult]], name: str) -> PeerResult:
    return next(r[name] for r in rounds if name in r)


def print_report(results: list[PeerResult], ratios: dict[str, float | None]) -> None:
    header = f"{'card':<6} {'APDU':<14} {'n':>6} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9}  SW"
    print()
    print(header)
    print("-" * len(header))
    for peer in results:
        for t in peer.timings.values():
            sw = t.sw if t.non_9000 == 0 else f"{t.sw} ({t.non_9000}/{t.n} not 9000)"
            print(
                f"{peer.name:<6} {t.label:<14} {t.n:>6} {t.p50_ms:>9.3f} {t.p99_ms:>9.3f} "
                f"{t.mean_ms:>9.3f}  {sw}"
            )
        if peer.status != "ok":
            print(f"{peer.name:<6} {peer.status}: {peer.reason}")
    print()
    targets = {
        "ours/floor SELECT MF (p50)": ("<=", 1.5),
        "vicc/ours SELECT MF (p50)": (">=", 100.0),
    }
    for name, value in ratios.items():
        if name not in targets:
            if value is not None:
                print(f"{name}: {value:.1f}  (for reference)")
            continue
        op, goal = targets[name]
        if value is None:
            print(f"{name}: n/a (target {op} {goal:g})")
            continue
        met = value <= goal if op == "<=" else value >= goal
        print(f"{name}: {value:.2f}  (target {op} {goal:g}: {'met' if met else 'MISSED'})")


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwind so that every process started here is stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="APDU round trips through pcscd+vpcd: floor card, our emulator, vicc."
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=3000,
        metavar="N",
        help="timed APDUs per command for floor and ours (default 3000)",
    )
    parser.add_argument(
        "--vicc-iterations",
        type=int,
        default=50,
        metavar="N",
        help="timed APDUs for vicc, ~44 ms each (default 50)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=100,
        metavar="N",
        help="untimed APDUs before each series (vicc: at most 3; default 100)",
    )
    parser.add_argument(
        "--peers",
        default="floor,ours,vicc",
        help="comma-separated subset of floor,ours,vicc (default all)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        metavar="R",
        help="floor and ours run alternately R times; figures are medians over rounds (default 3)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - {"floor", "ours", "vicc"}
    if unknown or min(args.iterations, args.vicc_iterations, args.rounds) < 1 or args.warmup < 0:
        parser.error(f"bad --peers {sorted(unknown)}" if unknown else "counts must be positive")
    signal.signal(signal.SIGTERM, _terminate)

    try:
        daemon = Pcscd.acquire()
    except PcscdUnavailable as exc:
        print(f"bench_vpcd: {exc}", file=sys.stderr)
        return 2
    print(
        f"pcscd: {'started here' if daemon.owned else 'already running, used as is'}",
        file=sys.stderr,
    )
    rounds: list[dict[str, PeerResult]] = []
    failed = False
    try:
        with tempfile.TemporaryDirectory(prefix="bench_vpcd-") as tmp:
            workdir = Path(tmp)
            n, nv = args.iterations, args.vicc_iterations
            # Floor and ours alternate, round after round, so that drift on a shared machine
            # hits both; vicc (44 ms per APDU) runs once, in the last round.
            schedule = [[p for p in peers if p != "vicc" or r == args.rounds - 1]
                        for r in range(args.rounds)]
            for round_peers in schedule:
                results: dict[str, PeerResult] = {}
                rounds.append(results)
                for name in round_peers:
                    try:
                        if name == "floor":
                            cmd, env = floor_card_argv(VPCD_PORT), None
                            steps = [Step("SELECT MF", SELECT_MF, n)]
                            warmup = args.warmup
                        elif name == "ours":
                            cmd, env = ours_argv(workdir), None
                            steps = [
                                Step("SELECT MF", SELECT_MF, n),
                                Step("SELECT SSSE", SELECT_SSSE, n),
                                Step(
                                    "READ RECORD 7",
                                    READ_RECORD_7,
                                    n,
                                    prepare=(SELECT_SSSE, SELECT_EF05),
                                ),
                            ]
                            warmup = args.warmup
                        else:
                            cmd, env = vicc_command()
                            steps = [Step("SELECT MF", SELECT_MF, nv)]
                            warmup = min(args.warmup, 3)
                        results[name] = measure(
                            name, cmd, steps, warmup=warmup, workdir=workdir, env=env
                        )
                        failed |= results[name].status == "failed"
                    except Skip as exc:
                        print(f"  {name}: skipped: {exc}", file=sys.stderr)
                        results[name] = PeerResult(name=name, status="skipped", reason=str(exc))
                    except (BenchError, PcscError) as exc:
                        print(f"  {name}: failed: {exc}", file=sys.stderr)
                        results[name] = PeerResult(name=name, status="failed", reason=str(exc))
                        failed = True
    finally:
        daemon.close()

    merged = merge_rounds(rounds)
    ratios = {
        f"{a}/{b} SELECT MF (p50)": _median_ratio(rounds, a, b, "SELECT MF")
        for a, b in (("ours", "floor"), ("vicc", "ours"), ("vicc", "floor"))
    }
    print(f"\n{args.rounds} round(s); per-round figures are combined by their median.")
    print_report(list(merged.values()), ratios)
    if args.json is not None:
        report = {
            "host": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
            },
            "pcscd_started_here": daemon.owned,
            "reader": READER,
            "rounds": [{k: asdict(v) for k, v in r.items()} for r in rounds],
            "peers": {k: asdict(v) for k, v in merged.items()},
            "ratios": ratios,
        }
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
