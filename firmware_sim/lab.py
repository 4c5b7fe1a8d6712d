"""Lab tooling: a real pcscd with the vpcd driver, helper processes, and PC/SC calls.

For technicians (``make demo``), the end-to-end tests and the vpcd benchmark alike. pcscd needs
neither systemd nor udev: ``pcscd --foreground`` creates ``/run/pcscd/pcscd.comm`` and loads vpcd
from ``/etc/reader.conf.d/vpcd``, which gives two readers, "Virtual PCD 00 00" and "Virtual PCD
00 01", listening for cards on TCP 35963 and 35964 (see ``shared/docs/vpcd-protocol.md``). An
emulated card *connects* to that port; closing the connection removes the card.

:class:`Pcscd` uses a pcscd that already answers with the vpcd readers (and then does not own
it: it never stops it), or starts one (root only) and stops it again. Nothing here depends on
pytest.

pyscard is an optional dependency of the package (extra ``pcsc``): it is imported when a PC/SC
call is made, and its absence raises :class:`PyscardMissing` (a :class:`PcscdUnavailable`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

PCSCD_SOCKET = Path("/run/pcscd/pcscd.comm")
PCSCD_PID_FILE = Path("/run/pcscd/pcscd.pid")
VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
VPCD_CONFIG = Path("/etc/reader.conf.d/vpcd")
VPCD_PORT = 0x8C7B  # 35963: slot 0; slot n listens on VPCD_PORT + n
VPCD_READERS = ("Virtual PCD 00 00", "Virtual PCD 00 01")

SELECT_MF = bytes.fromhex("00A4000C023F00")

_PR_SET_PDEATHSIG = 1


class PcscdUnavailable(Exception):
    """No usable pcscd with the vpcd readers, and none can be started here (the reason says why)."""


class PyscardMissing(PcscdUnavailable):
    """pyscard (the optional ``pcsc`` extra) is not installed."""


class PcscError(Exception):
    """A PC/SC call failed; ``hresult`` is the PC/SC return code."""

    def __init__(self, what: str, hresult: int) -> None:
        try:
            message = str(scard().SCardGetErrorMessage(hresult))
        except PyscardMissing:
            message = "PC/SC error"
        super().__init__(f"{what}: {message} ({hresult & 0xFFFFFFFF:#010x})")
        self.hresult = hresult


def scard() -> Any:
    """pyscard's low-level module ``smartcard.scard``, imported on first use."""
    try:
        from smartcard import scard as module
    except ImportError as exc:
        raise PyscardMissing(
            f"pyscard is not installed ({exc}); install the extra: pip install 'sscardd[pcsc]' "
            "(Debian: python3-pyscard)"
        ) from None
    return module


def _check(hresult: int, what: str) -> None:
    if hresult != scard().SCARD_S_SUCCESS:
        raise PcscError(what, hresult)


@contextlib.contextmanager
def pcsc_context() -> Iterator[Any]:
    """A PC/SC context for the duration of the block (``PcscError`` if pcscd does not answer)."""
    sc = scard()
    hresult, ctx = sc.SCardEstablishContext(sc.SCARD_SCOPE_USER)
    _check(hresult, "SCardEstablishContext")
    try:
        yield ctx
    finally:
        sc.SCardReleaseContext(ctx)


def list_readers() -> list[str] | None:
    """The readers of the running pcscd, or ``None`` when no pcscd answers."""
    sc = scard()
    try:
        with pcsc_context() as ctx:
            hresult, readers = sc.SCardListReaders(ctx, [])
    except PcscError:
        return None
    if hresult == sc.SCARD_E_NO_READERS_AVAILABLE:
        return []
    if hresult != sc.SCARD_S_SUCCESS:
        return None
    return [str(r) for r in readers]


def wait_card_state(reader_name: str, present: bool, timeout: float = 10.0) -> bool:
    """Wait until pcscd reports a card in ``reader_name`` (``present``) or none (not ``present``).

    Uses ``SCardGetStatusChange`` on that reader, so it returns as soon as pcscd notices the
    change (vpcd is polled: insertion and removal take up to about half a second). Returns
    ``False`` on timeout; raises ``PcscError`` if pcscd does not know the reader.
    """
    sc = scard()
    deadline = time.monotonic() + timeout
    with pcsc_context() as ctx:
        current = sc.SCARD_STATE_UNAWARE
        while True:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            hresult, states = sc.SCardGetStatusChange(ctx, remaining_ms, [(reader_name, current)])
            if hresult == sc.SCARD_E_TIMEOUT:
                return False
            _check(hresult, f"SCardGetStatusChange({reader_name!r})")
            _name, event, _atr = states[0]
            if event & sc.SCARD_STATE_UNKNOWN:
                raise PcscError(f"reader {reader_name!r}", sc.SCARD_E_UNKNOWN_READER)
            if bool(event & sc.SCARD_STATE_PRESENT) == present:
                return True
            if remaining_ms == 0:
                return False
            current = event & ~sc.SCARD_STATE_CHANGED


class CardConnection:
    """One PC/SC connection to the card in ``reader``: ``SCardConnect`` once, then
    :meth:`transmit` as often as needed, :meth:`close` at the end (also as a context manager).

    Shared mode, T=0 or T=1 (vpcd presents itself as T=1 and passes APDUs through).
    """

    def __init__(self, reader: str) -> None:
        sc = scard()
        self.reader = reader
        hresult, self._ctx = sc.SCardEstablishContext(sc.SCARD_SCOPE_USER)
        _check(hresult, "SCardEstablishContext")
        hresult, self._hcard, self.protocol = sc.SCardConnect(
            self._ctx, reader, sc.SCARD_SHARE_SHARED, sc.SCARD_PROTOCOL_T0 | sc.SCARD_PROTOCOL_T1
        )
        if hresult != sc.SCARD_S_SUCCESS:
            sc.SCardReleaseContext(self._ctx)
            self._ctx = None
            raise PcscError(f"SCardConnect({reader!r})", hresult)

    @property
    def atr(self) -> bytes:
        """The card's ATR, as pcscd reports it (``SCardStatus``)."""
        sc = scard()
        hresult, _reader, _state, _protocol, atr = sc.SCardStatus(self._hcard)
        _check(hresult, f"SCardStatus({self.reader!r})")
        return bytes(atr)

    def transmit(self, apdu: bytes) -> bytes:
        """Send one C-APDU; returns the R-APDU (data ‖ SW1 SW2). ``PcscError`` on failure."""
        if self._ctx is None:
            raise RuntimeError("connection closed")
        sc = scard()
        hresult, response = sc.SCardTransmit(self._hcard, self.protocol, list(apdu))
        _check(hresult, f"SCardTransmit({self.reader!r})")
        return bytes(response)

    def close(self) -> None:
        if self._ctx is None:
            return
        sc = scard()
        sc.SCardDisconnect(self._hcard, sc.SCARD_LEAVE_CARD)
        sc.SCardReleaseContext(self._ctx)
        self._ctx = None

    def __enter__(self) -> CardConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def transmit(reader: str, apdu: bytes) -> bytes:
    """Send one APDU to the card in ``reader`` (connect, transmit, disconnect)."""
    with CardConnection(reader) as conn:
        return conn.transmit(apdu)


# -- helper processes ---------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies, so nothing outlives a crash."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def start_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log: IO[bytes] | int | None = subprocess.DEVNULL,
) -> subprocess.Popen[bytes]:
    """Start a helper process (pcscd, an emulated card) that dies with us at the latest."""
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=None if env is None else dict(env),
        preexec_fn=_die_with_parent,
    )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@contextlib.contextmanager
def card_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log: IO[bytes] | int | None = subprocess.DEVNULL,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run an emulated card process for the block; stopping it removes the card."""
    proc = start_process(argv, env=env, log=log)
    try:
        yield proc
    finally:
        stop_process(proc)


def wait_listening(proc: subprocess.Popen[bytes], host: str, port: int, *, timeout: float = 10.0,
                   log_path: Path | None = None) -> None:
    """Wait until ``proc`` accepts TCP connections on ``host:port``; ``TimeoutError`` (with the tail
    of its log) if it exits or does not listen in time. The caller stops it then."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = tail_file(log_path) if log_path is not None else ""
                raise TimeoutError(f"{proc.args!r} is not listening on {host}:{port}{tail}") from None
            time.sleep(0.02)


def tail_file(path: Path, lines: int = 15) -> str:
    """The last ``lines`` of a process log, indented, for error messages ("" if unreadable)."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return ("\n    " + "\n    ".join(text)) if text else ""


def sscard_emu_argv() -> list[str]:
    """How to run ``sscard-emu``: the script beside this interpreter, on ``PATH``, or ``-m``."""
    beside = Path(sys.executable).parent / "sscard-emu"
    if os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("sscard-emu")
    if found:
        return [found]
    return [sys.executable, "-m", "firmware_sim.cli"]


# -- pcscd ---------------------------------------------------------------------------------------


def _live_pcscd(pid: int) -> bool:
    """True if ``pid`` is a live pcscd (not a zombie: with no init reaping, those linger)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, _, rest = stat.partition(" (")[2].rpartition(")")
    return name == "pcscd" and rest.split()[0] not in ("Z", "X")


def _remove_stale_pid_file() -> None:
    try:
        pid = int(PCSCD_PID_FILE.read_text().strip() or "0")
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        pid = 0
    # pcscd itself refuses to start while the pid in that file is alive, whatever it is.
    if pid > 0 and _live_pcscd(pid):
        raise PcscdUnavailable(
            f"pcscd (pid {pid}, from {PCSCD_PID_FILE}) is running but does not answer on "
            f"{PCSCD_SOCKET}; stop it first"
        )
    PCSCD_PID_FILE.unlink(missing_ok=True)


def find_pcscd() -> str | None:
    """Path of the pcscd binary, or ``None``."""
    return shutil.which("pcscd") or next(
        (p for p in ("/usr/sbin/pcscd", "/sbin/pcscd") if os.access(p, os.X_OK)), None
    )


class Pcscd:
    """A pcscd serving the vpcd readers: found running (``owned`` False) or started here.

    Use :meth:`acquire`; :meth:`close` stops it if (and only if) it was started here. An owned
    pcscd can be stopped and restarted (:meth:`stop`, :meth:`start`, :meth:`restart`).
    """

    def __init__(
        self,
        *,
        owned: bool,
        readers: Sequence[str],
        log_path: Path | None = None,
        debug: bool = False,
    ) -> None:
        self.owned = owned
        self.readers = tuple(readers)
        self.log_path = log_path
        self.debug = debug
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._held_context: Any = None

    @classmethod
    def acquire(
        cls, *, log_path: Path | None = None, debug: bool = False, timeout: float = 15.0
    ) -> Pcscd:
        """Use the running pcscd if it has the vpcd readers, else start one.

        ``log_path``: where an own pcscd's output goes (``--debug`` if ``debug``).
        Raises :class:`PcscdUnavailable` with the reason when neither works.
        """
        readers = list_readers()
        if readers is not None:
            if all(r in readers for r in VPCD_READERS):
                daemon = cls(owned=False, readers=readers)
                daemon._hold()
                return daemon
            raise PcscdUnavailable(
                f"a pcscd is running without the vpcd readers {list(VPCD_READERS)} "
                f"(it lists {readers}); restart it after installing vsmartcard-vpcd"
            )
        if find_pcscd() is None:
            raise PcscdUnavailable("pcscd is not installed (Debian package pcscd)")
        if not VPCD_DRIVER.exists():
            raise PcscdUnavailable(
                f"the vpcd driver {VPCD_DRIVER} is not installed (Debian package vsmartcard-vpcd)"
            )
        if not VPCD_CONFIG.exists():
            raise PcscdUnavailable(f"{VPCD_CONFIG} is missing (Debian package vsmartcard-vpcd)")
        if os.geteuid() != 0:
            raise PcscdUnavailable(
                f"no pcscd answers on {PCSCD_SOCKET}, and starting one needs root; "
                "start pcscd (e.g. `sudo pcscd`) and run again"
            )
        daemon = cls(owned=True, readers=(), log_path=log_path, debug=debug)
        daemon.start(timeout)
        return daemon

    @property
    def running(self) -> bool:
        """True while the pcscd started here runs (always True for a foreign one)."""
        if not self.owned:
            return True
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        """Start the owned pcscd (no-op if it runs) and wait until it lists the vpcd readers."""
        if not self.owned:
            raise RuntimeError("this pcscd was not started here")
        if self.running:
            return
        pcscd = find_pcscd()
        if pcscd is None:
            raise PcscdUnavailable("pcscd is not installed (Debian package pcscd)")
        _remove_stale_pid_file()
        argv = [pcscd, "--foreground"] + (["--debug"] if self.debug else [])
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = start_process(argv, log=self._log or subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            readers = list_readers()
            if readers is not None and all(r in readers for r in VPCD_READERS):
                self.readers = tuple(readers)
                return
            status = self.proc.poll()
            if status is not None or time.monotonic() > deadline:
                self.stop()
                what = f"exited with {status}" if status is not None else "timed out"
                raise PcscdUnavailable(
                    f"pcscd {what} before listing {list(VPCD_READERS)} (last: {readers}); "
                    f"log: {self.log_path or 'not kept'}{self._log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the owned pcscd: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if not self.owned:
            raise RuntimeError("this pcscd was not started here; not stopping it")
        proc, self.proc = self.proc, None
        if proc is not None:
            status = stop_process(proc, timeout)
            if status == -signal.SIGKILL:
                # Killed pcscd leaves its pid file and socket behind.
                PCSCD_PID_FILE.unlink(missing_ok=True)
                PCSCD_SOCKET.unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, timeout: float = 15.0) -> None:
        """Stop and start the owned pcscd (every card link to vpcd is dropped)."""
        self.stop()
        self.start(timeout)

    def _hold(self) -> None:
        # A socket-activated pcscd (systemd, ``--auto-exit``) quits after 60 s without clients,
        # taking the vpcd ports with it; an open context keeps it alive while we use it.
        sc = scard()
        hresult, ctx = sc.SCardEstablishContext(sc.SCARD_SCOPE_USER)
        if hresult == sc.SCARD_S_SUCCESS:
            self._held_context = ctx

    def close(self) -> None:
        """Release: stop pcscd if it was started here, leave it alone otherwise."""
        if self._held_context is not None:
            scard().SCardReleaseContext(self._held_context)
            self._held_context = None
        if self.owned:
            self.stop()

    def _log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n" + "\n".join(tail) if tail else ""

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc is not None else None
        return f"Pcscd(owned={self.owned}, pid={pid}, readers={self.readers})"
