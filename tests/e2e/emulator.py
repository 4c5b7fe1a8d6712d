"""Running ``sscard-emu`` as a separate process, the way technicians and the daemon's tests do."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from firmware_sim.image import CardImage
from firmware_sim.lab import (
    VPCD_PORT,
    VPCD_READERS,
    sscard_emu_argv,
    start_process,
    stop_process,
    wait_card_state,
)
from firmware_sim.store import TearSafeStore

EMU = sscard_emu_argv()
PRESENT_TIMEOUT = 10.0
ABSENT_TIMEOUT = 10.0


def run_emu(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*EMU, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"sscard-emu {' '.join(args)} failed: {done.stderr or done.stdout}"
    return done


def issue_card(path: Path, *args: str) -> str:
    """Issue a card image with ``sscard-emu issue``; returns the card number it printed."""
    out = run_emu("issue", "--out", str(path), *args).stdout
    m = re.search(r"card (\S{9}) \(", out)
    assert m, f"no card number in {out!r}"
    return m.group(1)


def issue_psam(path: Path, *args: str) -> None:
    run_emu("issue", "--psam", "--out", str(path), *args)


def show(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(run_emu("show", str(path)).stdout)
    return doc


def load_image(path: Path) -> CardImage:
    return CardImage.from_json(TearSafeStore(path).load())


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join(text)


@contextlib.contextmanager
def serve(
    card: Path,
    *,
    psam: Path | None = None,
    vpcd: str | None = None,
    extra: Sequence[str] = (),
    log: Path,
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """``sscard-emu -vv serve`` for the block (stopped on the way out, whatever happens)."""
    argv = [*EMU, "-vv", "serve", "--card", str(card)]
    if vpcd is not None:
        argv += ["--vpcd", vpcd]
    if psam is not None:
        argv += ["--psam", str(psam)]
    argv += list(extra)
    with open(log, "wb") as out:
        proc = start_process(argv, log=out, env=env)
    try:
        yield proc
    finally:
        stop_process(proc)


@contextlib.contextmanager
def served_in_pcscd(card: Path, *, psam: Path | None = None, log: Path
                    ) -> Iterator[subprocess.Popen[bytes]]:
    """Serve into the real pcscd's vpcd slots; waits until pcscd sees the card(s), and after
    stopping until it sees the slots empty again."""
    readers = VPCD_READERS[: 2 if psam is not None else 1]
    for reader in readers:
        assert wait_card_state(reader, present=False, timeout=5), (
            f"{reader} already holds a card: another emulator is connected to vpcd "
            f"(port {VPCD_PORT} or {VPCD_PORT + 1})"
        )
    with serve(card, psam=psam, log=log) as proc:
        for reader in readers:
            if not wait_card_state(reader, present=True, timeout=PRESENT_TIMEOUT):
                raise AssertionError(f"no card seen in {reader} (serve exit status {proc.poll()}); "
                                     f"its log:\n{tail(log)}")
        yield proc
    for reader in readers:
        assert wait_card_state(reader, present=False, timeout=ABSENT_TIMEOUT), (
            f"{reader} still holds a card after the emulator stopped"
        )
