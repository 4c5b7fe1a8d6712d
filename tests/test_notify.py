"""sd_notify client (:mod:`sscardd.notify`) against a real AF_UNIX datagram socket standing in for
the service manager: a file-system path and an abstract ``@name``, as systemd passes them."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from sscardd.notify import STATUS_MAX_BYTES, Notifier, watchdog_loop


class Manager:
    """The receiving end: what systemd's notify socket would get."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value  # NOTIFY_SOCKET as systemd would set it

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value, **extra}

    def recv(self, timeout: float = 2.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode("utf-8")

    def drain(self) -> list[str]:
        out: list[str] = []
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                out.append(self.sock.recv(4096).decode("utf-8"))
        return out


def _datagram_socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)


@pytest.fixture
def path_manager(tmp_path: Path) -> Iterator[Manager]:
    sock = _datagram_socket()
    path = tmp_path / "notify"
    sock.bind(str(path))
    try:
        yield Manager(sock, str(path))
    finally:
        sock.close()


@pytest.fixture
def abstract_manager() -> Iterator[Manager]:
    sock = _datagram_socket()
    name = f"sscardd-test-notify-{uuid.uuid4().hex}"
    sock.bind(b"\0" + name.encode())
    try:
        yield Manager(sock, "@" + name)
    finally:
        sock.close()


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, path_manager: Manager, abstract_manager: Manager) -> Manager:
    return path_manager if request.param == "path" else abstract_manager


def test_messages_reach_the_manager(manager: Manager) -> None:
    n = Notifier.from_env(manager.env())
    assert n.enabled
    assert n.ready("serving; broker: connecting")
    assert manager.recv() == "READY=1\nSTATUS=serving; broker: connecting\n"
    assert n.ready()
    assert manager.recv() == "READY=1\n"
    assert n.status("broker down: connection refused")
    assert manager.recv() == "STATUS=broker down: connection refused\n"
    assert n.watchdog()
    assert manager.recv() == "WATCHDOG=1\n"
    assert n.stopping("waiting for 1 sale in flight")
    assert manager.recv() == "STOPPING=1\nSTATUS=waiting for 1 sale in flight\n"
    assert n.extend_timeout(2.5)
    assert manager.recv() == "EXTEND_TIMEOUT_USEC=2500000\n"
    n.close()


def test_reloading_carries_the_monotonic_clock(manager: Manager) -> None:
    n = Notifier.from_env(manager.env())
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = manager.recv().splitlines()
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_status_is_one_line_and_bounded(path_manager: Manager) -> None:
    n = Notifier.from_env(path_manager.env())
    # A newline would let the text inject an assignment of its own (READY=1 here).
    assert n.status("reader error:\nREADY=1\r\n\ttab\x00nul")
    assert path_manager.recv() == "STATUS=reader error: READY=1 tab nul\n"
    assert n.status("卡" * 2000)  # 3 bytes a character: cut on a character boundary
    got = path_manager.recv()
    assert got.startswith("STATUS=卡") and got.endswith("...\n") and "\n" not in got[:-1]
    assert len(got.encode()) <= len("STATUS=\n") + STATUS_MAX_BYTES


def test_sender_is_this_process(path_manager: Manager) -> None:
    """NotifyAccess=main: systemd accepts what the main PID sends (it reads SCM_CREDENTIALS)."""
    path_manager.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    assert Notifier.from_env(path_manager.env()).ready()
    path_manager.sock.settimeout(2.0)
    data, ancdata, _flags, _addr = path_manager.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    assert data == b"READY=1\n"
    creds = [d for level, kind, d in ancdata if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    pid, uid, _gid = struct.unpack("3i", creds[0])
    assert (pid, uid) == (os.getpid(), os.getuid())


def test_socket_is_close_on_exec(path_manager: Manager) -> None:
    def sockets() -> set[int]:
        out = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                    out.add(int(fd))
        return out

    before = sockets()
    n = Notifier.from_env(path_manager.env())
    assert n.watchdog()
    new = sockets() - before
    assert len(new) == 1, "the notifier keeps one socket open"
    assert fcntl.fcntl(new.pop(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    n.close()
    assert sockets() == before


def test_without_notify_socket_nothing_happens() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert not n.ready("x") and not n.status("x") and not n.watchdog() and not n.stopping()
    assert n.watchdog_interval() is None


@pytest.mark.parametrize("value", ["relative/path", "vsock:2:1234", "@"])
def test_unsupported_addresses_disable_it(value: str) -> None:
    with capture_logs() as logs:
        n = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert not n.enabled and not n.ready()
    assert any(e["log_level"] == "warning" for e in logs)


def test_unreachable_socket_never_raises_and_logs_once(tmp_path: Path) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with capture_logs() as logs:
        for _ in range(5):
            assert n.watchdog() is False
        assert n.status("still here") is False
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["notify_socket"] == str(tmp_path / "gone")


def test_manager_going_away_after_start(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    sock = _datagram_socket()
    sock.bind(str(path))
    n = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    assert n.ready()
    sock.close()
    path.unlink()
    with capture_logs() as logs:
        assert n.watchdog() is False and n.watchdog() is False
    assert [e["log_level"] for e in logs] == ["warning"]
    # It comes back (a re-executed manager binds the same path): delivered, and said so once.
    sock = _datagram_socket()
    sock.bind(str(path))
    try:
        with capture_logs() as logs:
            assert n.watchdog()
        assert [e["log_level"] for e in logs] == ["info"]
        assert sock.recv(4096) == b"WATCHDOG=1\n"
    finally:
        sock.close()


def test_full_queue_does_not_block_for_long(path_manager: Manager) -> None:
    """A manager that stops reading must not stall the event loop: the messages are dropped."""
    n = Notifier.from_env(path_manager.env())
    start = time.monotonic()
    with capture_logs() as logs:
        results = [n.status("x" * 1000) for _ in range(5000)]
    assert results[0] and not results[-1]  # the queue filled up at some point
    assert time.monotonic() - start < 2.0
    assert [e["log_level"] for e in logs] == ["warning"]


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # someone else's
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval(path_manager: Manager, env: dict[str, str], interval: float | None) -> None:
    assert Notifier.from_env(path_manager.env(**env)).watchdog_interval() == interval


def test_unset_removes_the_variables(path_manager: Manager) -> None:
    env = path_manager.env(WATCHDOG_USEC="1000000", WATCHDOG_PID=str(os.getpid()), OTHER="kept")
    n = Notifier.from_env(env, unset=True)
    assert env == {"OTHER": "kept"}
    assert n.enabled and n.watchdog_interval() == 0.5


async def test_watchdog_loop_pings_at_half_the_timeout(path_manager: Manager) -> None:
    n = Notifier.from_env(path_manager.env(WATCHDOG_USEC="100000"))  # pings every 50 ms
    task = asyncio.create_task(watchdog_loop(n, lambda: True))
    await asyncio.sleep(0.33)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    pings = path_manager.drain()
    assert set(pings) == {"WATCHDOG=1\n"}
    assert 3 <= len(pings) <= 9, len(pings)


async def test_watchdog_loop_stops_pinging_while_the_loop_is_blocked(path_manager: Manager) -> None:
    n = Notifier.from_env(path_manager.env(WATCHDOG_USEC="100000"))
    task = asyncio.create_task(watchdog_loop(n, lambda: True))
    await asyncio.sleep(0.01)
    path_manager.drain()
    time.sleep(0.4)  # a hung synchronous call on the event loop: no ping can go out meanwhile
    assert path_manager.drain() == []
    await asyncio.sleep(0.12)
    assert path_manager.drain(), "pings resume when the loop runs again"
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_watchdog_loop_withholds_pings_while_unhealthy(path_manager: Manager) -> None:
    n = Notifier.from_env(path_manager.env(WATCHDOG_USEC="40000"))
    state = {"healthy": False, "calls": 0}

    def healthy() -> bool:
        state["calls"] += 1
        if state["calls"] == 3:
            raise RuntimeError("broken check")
        return bool(state["healthy"])

    with capture_logs() as logs:
        task = asyncio.create_task(watchdog_loop(n, healthy))
        await asyncio.sleep(0.2)
        assert path_manager.drain() == []
        state["healthy"] = True
        await asyncio.sleep(0.1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert path_manager.drain()
    events = [e["event"] for e in logs]
    assert sum(e.startswith("unhealthy; withholding watchdog pings") for e in events) == 1
    assert "healthy again; watchdog pings resumed" in events


async def test_watchdog_loop_without_watchdog_returns_at_once(path_manager: Manager) -> None:
    n = Notifier.from_env(path_manager.env())
    await asyncio.wait_for(watchdog_loop(n, lambda: True), timeout=1.0)
    assert path_manager.drain() == []


def test_notifier_in_a_child_process(path_manager: Manager) -> None:
    """The daemon's way: the variables in the environment of a fresh interpreter."""
    import subprocess
    import sys

    code = ("from sscardd.notify import Notifier\n"
            "n = Notifier.from_env(unset=True)\n"
            "import os; assert 'NOTIFY_SOCKET' not in os.environ\n"
            "n.ready('up'); n.watchdog(); n.stopping()\n")
    env = {**os.environ, **path_manager.env(WATCHDOG_USEC="2000000")}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=30)
    got = [path_manager.recv() for _ in range(3)]
    assert got == ["READY=1\nSTATUS=up\n", "WATCHDOG=1\n", "STOPPING=1\n"]
