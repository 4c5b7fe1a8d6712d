"""The transport floor: a card that answers every APDU with 90 00, plugged into vpcd.

It uses the emulator's own vpcd link (``firmware_sim.vpcd.VpcdLink``: same framing, same
TCP_NODELAY/TCP_QUICKACK handling), so the time it measures through pcscd is what PC/SC, vpcd
and the socket cost, with no card logic at all. The benchmark divides our emulator's times by it.

    python bench/floor_card.py --vpcd 127.0.0.1:35963

The card is inserted while the process runs; it exits when vpcd closes the connection, and
removes the card (closes the connection) on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType

try:
    from firmware_sim.vpcd import VpcdLink
except ModuleNotFoundError:  # run from a checkout without the editable install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from firmware_sim.vpcd import VpcdLink

# TS=3B, T0=80 (TD1 follows, no historical bytes), TD1=80 (T=0, TD2 follows), TD2=01 (T=1), TCK.
FLOOR_ATR = bytes.fromhex("3B80800101")
SW_OK = b"\x90\x00"


class FloorCard:
    """A card with no logic: every APDU gets 90 00; power and reset do nothing."""

    atr = FLOOR_ATR

    def power_on(self) -> None:
        pass

    def power_off(self) -> None:
        pass

    def reset(self) -> None:
        pass

    def execute(self, apdu: bytes) -> bytes:
        return SW_OK


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` → ``(host, port)``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    try:
        return host, int(port, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}") from None


def connect_with_retry(link: VpcdLink, timeout: float) -> None:
    """Connect to vpcd, retrying while it does not listen yet (pcscd still starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            link.connect()
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)  # unwinds VpcdLink.serve(), whose ``finally`` closes the link


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--vpcd",
        type=parse_hostport,
        default=("127.0.0.1", 35963),
        metavar="HOST:PORT",
        help="vpcd slot to plug into (default 127.0.0.1:35963, slot 0)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="keep trying to connect this long while vpcd does not listen (default 10)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log the link's events")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    host, port = args.vpcd
    signal.signal(signal.SIGTERM, _terminate)
    link = VpcdLink(FloorCard(), host, port)
    try:
        connect_with_retry(link, args.connect_timeout)
    except OSError as exc:
        print(f"floor_card: cannot connect to vpcd at {host}:{port}: {exc}", file=sys.stderr)
        return 1
    with contextlib.suppress(KeyboardInterrupt):
        link.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
