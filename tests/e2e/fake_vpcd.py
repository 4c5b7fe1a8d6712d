"""A stand-in for vpcd: a TCP listener the emulator connects to as a card (``--vpcd HOST:PORT``).

Real pcscd never sends malformed frames, so the emulator's side of the vpcd protocol is tested
against this server, which can send anything. One accepted connection is one inserted card; the
``sscard-emu serve`` loop connects again after the link ends (a re-insertion).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time

CTRL_OFF, CTRL_ON, CTRL_RESET, CTRL_ATR = b"\x00", b"\x01", b"\x02", b"\x04"


class Closed(Exception):
    """The emulator closed the connection."""


class CardLink:
    """The server end of one emulator connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, payload: bytes) -> None:
        self.sock.sendall(struct.pack(">H", len(payload)) + payload)

    def _recv_exact(self, n: int, timeout: float) -> bytes:
        self.sock.settimeout(timeout)
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Closed(f"connection closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def recv_frame(self, timeout: float = 5.0) -> bytes:
        (length,) = struct.unpack(">H", self._recv_exact(2, timeout))
        return self._recv_exact(length, timeout) if length else b""

    def exchange(self, payload: bytes, timeout: float = 5.0) -> bytes:
        """Send one frame, return the reply frame (``Closed`` if the emulator hangs up)."""
        self.send_frame(payload)
        return self.recv_frame(timeout)

    def atr(self) -> bytes:
        return self.exchange(CTRL_ATR)

    def power_on(self) -> bytes:
        """Power up as vpcd does (no reply to 0x01, then an ATR request); returns the ATR."""
        self.send_frame(CTRL_ON)
        return self.atr()

    def closed_by_peer(self, timeout: float = 3.0) -> bool:
        """True if the emulator closes the connection within ``timeout`` without sending more."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return data == b""

    def silent(self, timeout: float = 0.2) -> bool:
        """True if nothing arrives (and the link stays open) for ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1, socket.MSG_PEEK)
        except TimeoutError:
            return True
        except ConnectionResetError:
            return False
        del data  # a byte or EOF: not silent
        return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class FakeVpcd:
    """Listens on a free loopback port; :meth:`accept` waits for the emulator to connect."""

    def __init__(self) -> None:
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(4)
        self.port: int = self.server.getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def accept(self, timeout: float = 10.0) -> CardLink:
        """The next connection (``TimeoutError`` if the emulator does not connect in time)."""
        self.server.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock, _ = self.server.accept()
            except TimeoutError:
                raise TimeoutError(f"the emulator did not connect to {self.address} "
                                   f"within {timeout} s") from None
            except InterruptedError:
                if time.monotonic() > deadline:
                    raise
                continue
            return CardLink(sock)

    def close(self) -> None:
        self.server.close()

    def __enter__(self) -> FakeVpcd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
