"""``sscardd run`` under a service manager: READY (also while the broker is down), STATUS, WATCHDOG
pings from the event loop and STOPPING, on a NOTIFY_SOCKET of the test's own."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from firmware_sim.lab import start_process, stop_process
from tests.daemon_lab import ZHANG, A, issue_images
from tests.mqtt_harness import free_port


def config(work: Path, card: Path, psam: Path) -> Path:
    path = work / "sscardd.toml"
    path.write_text(f"""
[terminal]
id = "{A}"
[institution]
code = "P37021200001"
name = "崂山康泰大药房"
type = "pharmacy"
region = "370212"
[readers]
card = "emulated:{card}"
psam = "emulated:{psam}"
monitor = false
[mqtt]
host = "127.0.0.1"
port = {free_port()}
username = "term-{A}"
password = "not-used-nobody-listens"
reconnect_backoff_min = 0.05
reconnect_backoff_max = 0.2
[mqtt.tls]
enabled = false
[journal]
path = "{work / 'journal.sqlite3'}"
[kiosk]
socket = "{work / 'kiosk.sock'}"
""")
    return path


def receive_until(sock: socket.socket, wanted: str, seen: list[str], timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            msg = sock.recv(4096).decode()
        except TimeoutError:
            break
        seen.append(msg)
        if wanted in msg.split("\n"):
            return msg
    raise AssertionError(f"no {wanted!r} within {timeout} s; got {seen}")


def test_ready_while_the_broker_is_down_watchdog_and_stopping(tmp_path: Path) -> None:
    card, psam = issue_images(tmp_path / "img", ZHANG, terminal_id=A)
    cfg = config(tmp_path, card, psam)
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "200000", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115 - closed below
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = start_process([sys.executable, "-m", "sscardd", "run", "-c", str(cfg)], env=env, log=log)
        seen: list[str] = []
        ready = receive_until(sock, "READY=1", seen)
        assert "STATUS=" in ready and "broker DOWN" in ready
        receive_until(sock, "WATCHDOG=1", seen)
        receive_until(sock, "WATCHDOG=1", seen)  # pinged again: from a running event loop
        assert (tmp_path / "kiosk.sock").exists()  # the kiosk serves without the broker
        proc.send_signal(signal.SIGTERM)
        receive_until(sock, "STOPPING=1", seen)
        assert proc.wait(20) == 0
    finally:
        if proc is not None:
            stop_process(proc)
        log.close()
        sock.close()
