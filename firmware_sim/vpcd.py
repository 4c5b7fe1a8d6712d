"""The card side of the vpcd protocol: plug an emulated card into a real pcscd.

vpcd (vsmartcard's IFD handler, Debian package ``vsmartcard-vpcd``) listens on TCP port
35963 + slot; a card *connects* to it, and one connection is one inserted card. Every message
in both directions is a big-endian uint16 length followed by that many bytes. A 1-byte message
from vpcd is a control code (power off/on, reset, ATR request); anything longer is a C-APDU that
must be answered with the R-APDU. See ``shared/docs/vpcd-protocol.md``.

What matters for speed: vpcd writes the length and the APDU in two ``send()`` calls without
TCP_NODELAY, so with delayed ACKs on our side every APDU costs ~40 ms. We set TCP_NODELAY and
re-arm TCP_QUICKACK before every read, and send each reply as a single frame.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from typing import Protocol

log = logging.getLogger(__name__)

VPCD_DEFAULT_PORT = 0x8C7B  # 35963, slot 0; slot n listens on 35963 + n

CTRL_OFF = 0x00
CTRL_ON = 0x01
CTRL_RESET = 0x02
CTRL_ATR = 0x04

_HAVE_QUICKACK = hasattr(socket, "TCP_QUICKACK")


class Card(Protocol):
    """What vpcd needs of a card: the contract of vsmartcard's virtual card."""

    @property
    def atr(self) -> bytes: ...

    def power_on(self) -> None: ...

    def power_off(self) -> None: ...

    def reset(self) -> None: ...

    def execute(self, apdu: bytes) -> bytes: ...


class VpcdProtocolError(Exception):
    """vpcd sent something the protocol does not allow (the link is then closed)."""


def _recv_exact(sock: socket.socket, n: int, buf: bytearray) -> bytes:
    """Read exactly ``n`` bytes; ``EOFError`` when the peer closes first."""
    view = memoryview(buf)[:n]
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("vpcd closed the connection")
        got += k
    return bytes(view)


def tune_socket(sock: socket.socket) -> None:
    """Socket options every vpcd link we own uses (the floor benchmark uses the same)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if _HAVE_QUICKACK:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


class VpcdLink:
    """One inserted card: a TCP connection to vpcd, served until it closes or ``eject()``.

    ``serve()`` blocks; run it in a thread. ``eject()`` from any thread removes the card
    (closes the socket, which vpcd reports to pcscd as card removal).
    """

    MAX_FRAME = 0xFFFF

    def __init__(self, card: Card, host: str = "127.0.0.1", port: int = VPCD_DEFAULT_PORT):
        self.card = card
        self.host = host
        self.port = port
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.apdus = 0

    def connect(self, timeout: float = 5.0) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        sock.settimeout(None)
        tune_socket(sock)
        with self._lock:
            self._sock = sock

    def eject(self) -> None:
        """Remove the card: close the connection (safe to call from another thread)."""
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def serve(self) -> None:
        """Answer vpcd until the connection ends. Returns normally on EOF or eject."""
        sock = self._sock
        if sock is None:
            raise RuntimeError("not connected")
        buf = bytearray(self.MAX_FRAME)
        card = self.card
        try:
            while True:
                if _HAVE_QUICKACK:
                    # Linux clears QUICKACK after use; without it the ACK of vpcd's 2-byte
                    # length header is delayed and vpcd's second send() waits (Nagle).
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                (length,) = struct.unpack(">H", _recv_exact(sock, 2, buf))
                if length == 0:
                    raise VpcdProtocolError("empty frame from vpcd")
                msg = _recv_exact(sock, length, buf)
                if length == 1:
                    code = msg[0]
                    if code == CTRL_ATR:
                        atr = card.atr
                        sock.sendall(struct.pack(">H", len(atr)) + atr)
                    elif code == CTRL_ON:
                        card.power_on()
                    elif code == CTRL_OFF:
                        card.power_off()
                    elif code == CTRL_RESET:
                        card.reset()
                    else:
                        raise VpcdProtocolError(f"unknown vpcd control code {code:#04x}")
                    continue
                self.apdus += 1
                rapdu = card.execute(msg)
                if not rapdu or len(rapdu) > self.MAX_FRAME:
                    # vpcd treats an empty reply as an error and ejects; never send one.
                    rapdu = b"\x6f\x00"
                sock.sendall(struct.pack(">H", len(rapdu)) + rapdu)
        except (EOFError, ConnectionError, OSError) as exc:
            if self._sock is not None:
                log.info("vpcd link %s:%d closed: %s", self.host, self.port, exc)
        except VpcdProtocolError as exc:
            log.warning("vpcd link %s:%d: %s; disconnecting", self.host, self.port, exc)
        finally:
            self.eject()
