"""``sscardd readers`` / ``read`` / ``pin`` as an operator runs them, through real pcscd + vpcd.

Also: a foreign card (Debian's vicc, ``-t iso7816``) is NOT_SSCARD, and no PIN, ID number or
name reaches the process's real stdout/stderr at the most verbose log level.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from firmware_sim.lab import VPCD_PORT, VPCD_READERS, card_process, wait_card_state
from tests.e2e.emulator import served_in_pcscd
from tests.rigs import GOOD, write_images

SSCARDD = [str(Path(sys.executable).parent / "sscardd")]
SSN = "370202199001011237"
pytestmark = pytest.mark.usefixtures("pcscd")


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SSCARDD, *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


def assert_no_secrets(text: str, *secrets: str) -> None:
    for s in (SSN, "张三", *secrets):
        assert s not in text, f"{s!r} leaked"
    # the PIN as it travels in a VERIFY body, in hex
    for s in secrets:
        if s.isdigit() and len(s) % 2 == 0:
            assert f"0{len(s) // 2}{s}" not in text.replace(" ", "")


def test_readers_read_and_pin(tmp_path: Path) -> None:
    cp, pp = write_images(tmp_path, 3)
    with served_in_pcscd(cp, psam=pp, log=tmp_path / "serve.log"):
        r = run("readers", "--json")
        assert r.returncode == 0, r.stderr
        rows = {row["reader"]: row for row in json.loads(r.stdout)}
        assert "social security card" in rows[VPCD_READERS[0]]["holds"]
        assert rows[VPCD_READERS[1]]["holds"] == "PSAM, terminal 370212000001"

        r = run("-vv", "read", "--json")  # card and PSAM found automatically
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)["result"]
        assert result["compat"].endswith("|370212000001||")
        assert result["name"] == "张三"  # the operator asked for it: stdout carries it
        assert_no_secrets(r.stderr)

        r = run("-vv", "pin", "verify", "--pin-stdin", stdin="999999\n")
        assert r.returncode == 1
        assert "PIN_WRONG (-51)" in r.stderr
        assert_no_secrets(r.stdout + r.stderr, "999999")

        r = run("-vv", "pin", "change", "--pin-stdin", stdin=f"{GOOD}\n135790\n135790\n")
        assert r.returncode == 0, r.stderr
        assert_no_secrets(r.stdout + r.stderr, GOOD, "135790")

        r = run("-vv", "read", "--address", "DF04EF05|84|$", "--auth", "pin", "--pin-stdin",
                stdin="135790\n")
        assert r.returncode == 0 and r.stdout.strip() == "DF04EF05|370202|$", r.stderr
        assert_no_secrets(r.stderr, "135790")


def test_no_psam_gives_2201(tmp_path: Path) -> None:
    cp, _ = write_images(tmp_path, 3)
    with served_in_pcscd(cp, log=tmp_path / "serve.log"):
        r = run("read", "--reader", VPCD_READERS[0], "--json")
        assert r.returncode == 1
        err = json.loads(r.stdout)["error"]
        assert err["code"] == "NO_PSAM" and err["compat_code"] == -2201


def test_vicc_iso_card_is_not_sscard(tmp_path: Path) -> None:
    vicc_root = Path("/usr/lib/python3/site-packages/virtualsmartcard")
    if not Path("/usr/bin/vicc").exists() or not vicc_root.exists():
        pytest.skip("vicc (vsmartcard-vpicc) is not installed")
    env = dict(os.environ, PYTHONPATH=str(vicc_root))
    argv = [sys.executable, "/usr/bin/vicc", "-t", "iso7816", "-H", "127.0.0.1", "-P", str(VPCD_PORT)]
    assert wait_card_state(VPCD_READERS[0], present=False, timeout=5)
    with open(tmp_path / "vicc.log", "wb") as log, card_process(argv, env=env, log=log):
        assert wait_card_state(VPCD_READERS[0], present=True, timeout=15)
        r = run("read", "--reader", VPCD_READERS[0], "--json")
        assert r.returncode == 1, r.stdout + r.stderr
        assert json.loads(r.stdout)["error"]["code"] == "NOT_SSCARD"
        assert "Traceback" not in r.stderr
    assert wait_card_state(VPCD_READERS[0], present=False, timeout=10)
