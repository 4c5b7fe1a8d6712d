"""APDU exchange over a :class:`~sscardd.readers.base.CardLink`, with the T=0 rules done once.

* ``61xx``: the card holds xx more bytes — GET RESPONSE with Le=xx, repeated while it says more.
* ``6Cxx``: wrong Le — the same command again with Le=xx (once).
* A response shorter than a status word is garbage from the card: ``CARD_GARBAGE``.

Every exchange passes through an optional trace hook (:mod:`sscardd.log` redacts PIN-bearing
bodies before anything is written).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from apdu_specs.apdu import CommandApdu, ResponseApdu
from sscardd.errors import SSCardError
from sscardd.readers.base import CardLink

MAX_GET_RESPONSE = 32  # chained 61xx answers; a card that keeps going is garbage
MAX_RESPONSE = 64 * 1024

TraceHook = Callable[[str, bytes, bytes], None]  # (link label, C-APDU, R-APDU)


@dataclass
class Exchanger:
    """Sends APDUs on one link; counts them (for benchmarks and logs)."""

    link: CardLink
    label: str = "card"
    trace: TraceHook | None = None
    count: int = 0

    def raw(self, apdu: bytes) -> ResponseApdu:
        out = self.link.transmit(apdu)
        self.count += 1
        if self.trace is not None:
            self.trace(self.label, apdu, out)
        if len(out) < 2:
            raise SSCardError("CARD_GARBAGE", f"{len(out)}-byte response", link=self.label)
        return ResponseApdu(out[:-2], (out[-2] << 8) | out[-1])

    def send(self, apdu: CommandApdu | bytes) -> ResponseApdu:
        """Send and resolve ``61xx``/``6Cxx``; returns the final data and status word."""
        raw = apdu.encode() if isinstance(apdu, CommandApdu) else apdu
        resp = self.raw(raw)
        if resp.sw1 == 0x6C:
            # Only a command that expects data is repeated with the exact Le; a case-1/3
            # command (a VERIFY, say) answered 6Cxx is garbage and is never sent twice.
            cmd = CommandApdu.parse(raw)
            if cmd.le is None:
                raise SSCardError("CARD_GARBAGE", "6Cxx to a command without Le", link=self.label)
            le = resp.sw2 or 256
            resp = self.raw(CommandApdu(cmd.cla, cmd.ins, cmd.p1, cmd.p2, cmd.data, le).encode())
        data = bytearray(resp.data)
        rounds = 0
        while resp.sw1 == 0x61:
            rounds += 1
            if rounds > MAX_GET_RESPONSE or len(data) > MAX_RESPONSE:
                raise SSCardError("CARD_GARBAGE", "endless 61xx chain", link=self.label)
            le = resp.sw2 or 256
            resp = self.raw(bytes((0x00, 0xC0, 0x00, 0x00, le & 0xFF)))
            if resp.sw1 == 0x6C:  # some cards want the exact remaining length
                resp = self.raw(bytes((0x00, 0xC0, 0x00, 0x00, resp.sw2)))
            data += resp.data
        return ResponseApdu(bytes(data), resp.sw)
