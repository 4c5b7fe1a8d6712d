"""The service manager's notification protocol (``sd_notify(3)``), without libsystemd.

Under ``Type=notify`` systemd passes the daemon ``NOTIFY_SOCKET`` (a file-system path, or ``@name``
for the abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``).
The daemon sends newline-separated ``KEY=value`` assignments in one datagram each:

- ``READY=1`` once it serves: the journal is open, unfinished rows are resumed and the readers are
  initialised. Not "the broker answers": a broker outage is reported in ``STATUS=`` and never holds
  back readiness (nor causes a restart loop; the kiosk keeps working without a broker);
- ``STATUS=...`` a one-line human summary (``systemctl status`` shows it);
- ``WATCHDOG=1`` every half of ``WATCHDOG_USEC``, from the event loop (:func:`watchdog_loop`), so a
  blocked loop stops the pings and systemd restarts the daemon;
- ``STOPPING=1`` when it begins to stop, ``RELOADING=1`` when it begins to re-read its
  configuration (followed by ``READY=1`` when done).

Without ``NOTIFY_SOCKET`` (run by hand, in tests) every call does nothing. A send that fails — the
socket vanished, the manager is gone, its queue is full — drops the message, is logged once (until
a send works again) and never raises: telling the service manager is never a reason to fail.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping

import structlog

__all__ = ["STATUS_MAX_BYTES", "Notifier", "watchdog_loop"]

log = structlog.get_logger("sscardd.notify")

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"

# systemd reads at most PIPE_BUF (4096) bytes of one notification; STATUS= is the only free text.
STATUS_MAX_BYTES = 1024


def _one_line(text: str, limit: int = STATUS_MAX_BYTES) -> str:
    """``text`` as one line (no control characters: a newline would start a new assignment, a NUL
    ends the datagram for some readers), cut to ``limit`` UTF-8 bytes on a character boundary."""
    flat = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    raw = flat.encode("utf-8")
    if len(raw) <= limit:
        return flat
    return raw[: limit - 3].decode("utf-8", "ignore").rstrip() + "..."


def _address(value: str) -> str | bytes | None:
    """The socket address for a ``NOTIFY_SOCKET`` value: a path, or ``@name`` (abstract)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    return None  # relative paths, vsock:… (systemd 253+ in VMs): not for this daemon


class Notifier:
    """Sends notifications to the service manager; a no-op when ``address`` is ``None``.

    Use :meth:`from_env` in the daemon. ``watchdog_usec`` is the manager's watchdog timeout for this
    process (``None``: no watchdog). Safe to call from any thread."""

    def __init__(self, address: str | bytes | None = None, *, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failing = False  # a failure was logged; the next success is logged too

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = False) -> Notifier:
        """The notifier the service manager asked for (``os.environ`` unless ``environ`` is given).
        ``unset`` removes the three variables afterwards, so child processes do not inherit them."""
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        raw = env.get(ENV_SOCKET, "")
        address = _address(raw) if raw else None
        if raw and address is None:
            log.warning("NOTIFY_SOCKET not supported; not notifying the service manager", notify_socket=raw)
        usec = _watchdog_usec(env)
        if unset:
            for key in (ENV_SOCKET, ENV_WATCHDOG_USEC, ENV_WATCHDOG_PID):
                env.pop(key, None)
        return cls(address, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens (``NOTIFY_SOCKET`` was set and usable)."""
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between two ``WATCHDOG=1`` pings (half the manager's timeout, as systemd
        recommends), or ``None`` when no watchdog is configured for this process."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 2_000_000

    # -- the messages --------------------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up is complete (optionally with a status line in the same datagram)."""
        return self._send(("READY", "1"), *self._status_field(status))

    def status(self, text: str) -> bool:
        """``STATUS=``: a one-line summary for ``systemctl status`` (newlines become spaces)."""
        return self._send(*self._status_field(text))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the daemon is alive (call every :meth:`watchdog_interval` seconds)."""
        return self._send(("WATCHDOG", "1"))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: the daemon has begun to shut down."""
        return self._send(("STOPPING", "1"), *self._status_field(status))

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1``: the daemon re-reads its configuration; send :meth:`ready` when done.
        ``MONOTONIC_USEC`` is what systemd 253+ expects beside it (older ones ignore it)."""
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(("RELOADING", "1"), ("MONOTONIC_USEC", str(now)), *self._status_field(status))

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC=``: the start (or stop) needs ``seconds`` more from now."""
        return self._send(("EXTEND_TIMEOUT_USEC", str(max(0, int(seconds * 1_000_000)))))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    # -- sending -------------------------------------------------------------------------------

    @staticmethod
    def _status_field(text: str | None) -> tuple[tuple[str, str], ...]:
        return () if text is None else (("STATUS", _one_line(text)),)

    def _send(self, *fields: tuple[str, str]) -> bool:
        """One datagram with ``fields``; True if the manager got it (False when disabled)."""
        if self._address is None or not fields:
            return False
        message = "".join(f"{key}={_one_line(value)}\n" for key, value in fields).encode("utf-8")
        try:
            with self._lock:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    # Non-blocking: a stalled manager (its queue full) costs a dropped message,
                    # never a stalled event loop.
                    sock.setblocking(False)
                    self._sock = sock
                self._sock.sendto(message, self._address)
        except OSError as exc:
            if not self._failing:
                self._failing = True
                log.warning("cannot notify the service manager", notify_socket=self._printable_address(),
                            error=exc.strerror or type(exc).__name__,
                            notification=message.split(b"\n", 1)[0].decode("utf-8", "replace"))
            return False
        if self._failing:
            self._failing = False
            log.info("service manager notifications delivered again")
        return True

    def _printable_address(self) -> str:
        a = self._address
        if isinstance(a, bytes):
            return "@" + os.fsdecode(a[1:])
        return a or ""

    def __repr__(self) -> str:
        return f"Notifier({self._printable_address() or None!r}, watchdog_usec={self._watchdog_usec})"


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """``WATCHDOG_USEC``, if it is meant for this process (``WATCHDOG_PID`` unset or ours)."""
    raw = env.get(ENV_WATCHDOG_USEC, "")
    if not raw:
        return None
    pid = env.get(ENV_WATCHDOG_PID, "")
    try:
        usec = int(raw)
        if pid and int(pid) != os.getpid():
            return None  # the watchdog belongs to another process (a parent that exec'd us?)
    except ValueError:
        log.warning("ignoring a malformed watchdog setting", watchdog_usec=raw, watchdog_pid=pid)
        return None
    return usec if usec > 0 else None


async def watchdog_loop(notifier: Notifier, healthy: Callable[[], bool]) -> None:
    """Send ``WATCHDOG=1`` every :meth:`Notifier.watchdog_interval` seconds while ``healthy()`` says
    so; return at once when there is no watchdog. Run it as a task on the daemon's event loop and
    cancel it on shutdown.

    The pings come from the event loop itself: when the loop is blocked (a synchronous call that
    hangs, a deadlock) they stop and the service manager kills and restarts the daemon. When
    ``healthy()`` returns False (or raises) the ping is withheld, with the same effect once the
    watchdog timeout has passed; pings resume if it turns True again before that."""
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    withheld = False
    while True:
        try:
            ok = bool(healthy())
        except Exception as exc:  # a broken health check is an unhealthy daemon, not a dead loop
            log.error("health check failed; withholding the watchdog ping", error=type(exc).__name__)
            ok = False
        if ok:
            notifier.watchdog()
            if withheld:
                withheld = False
                log.info("healthy again; watchdog pings resumed")
        elif not withheld:
            withheld = True
            log.error("unhealthy; withholding watchdog pings (the service manager will restart the daemon)")
        await asyncio.sleep(interval)
