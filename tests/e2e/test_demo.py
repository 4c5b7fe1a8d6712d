"""``sscardd demo`` as a user runs it: a process that starts mosquitto, the backend simulator and two
daemons (the pharmacy's with its kiosk socket), plays the scenarios — the POS ones over MQTT, then the
holder's at the kiosk over the local socket — checks them itself, and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sscardd.cli import build_parser
from sscardd.demo import HOLDER_PIN, INITIAL_PIN, KIOSK_PIN, WRONG_PIN
from tests.mqtt_harness import MosquittoUnavailable, check_mosquitto

ROOT = Path(__file__).resolve().parents[2]
HOLDER_SSN, HOLDER_NAME = "370202199001011237", "张三"


def _alive(pid: int) -> bool:
    """A live (not zombie) process with this pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


@pytest.mark.mosquitto
def test_demo_plays_the_scenarios_and_stops_all_it_started() -> None:
    try:
        check_mosquitto()
    except MosquittoUnavailable as exc:
        pytest.skip(str(exc))
    done = subprocess.run([sys.executable, "-m", "sscardd", "demo"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr}"
    for expected in (
        "plaintext on loopback",
        "[1] pharmacy 370212000001  card.read_basic",
        "[3] pharmacy 370212000001  pin.change",
        "[4] pharmacy 370212000001  sale",
        "PIN verified on the chip: yes; chip record (DF04/EF08): written",
        "PIN_WRONG (-51) wrong PIN, 2 tries left",
        "NON_MEDICAL_ITEM (-3014)",
        "offending line 2: G0001 洗发水",
        "[7] hospital 370202000001  sale",
        "PIN verified on the chip: no",
        "[8] pharmacy 370212000001  sale.void",
        "the card goes into the pharmacy's reader again",
        "[9] pharmacy 370212000001  kiosk account.query",
        "card Q54198963, 张*, card status normal, balance 496.25",
        "[10] pharmacy 370212000001  kiosk records.list: the chip's settlement log (DF04/EF08); "
        "PIN: the holder's (clear, over the local socket only)",
        "2 record(s) on the chip, newest first",
        "terminal 370212000001 (pharmacy) seq 1 type 2: account 52.00, self-pay 11.00, fund 0.00",
        "terminal 370202000001 (hospital) seq 1 type 2: account 3.75, self-pay 0.00, fund 8.75",
        "the pharmacy sale of step 4 on the chip (account 52.00), and the hospital's",
        "[11] pharmacy 370212000001  kiosk pin.change: old PIN, new PIN, new PIN again "
        "(clear, over the local socket only)",
        "PIN changed at the kiosk",
        "[12] pharmacy 370212000001  kiosk pin.verify: the new PIN (clear, over the local socket only)",
        "the new PIN verifies",
        "pharmacy journal: settled, refused, refused, settled",
        "sscardd demo: OK, every step as expected",
    ):
        assert expected in out, f"{expected!r} missing from the transcript:\n{out}"
    assert "NOT AS EXPECTED" not in out
    assert out.count("[as expected]") == 14  # 12 steps, 2 journals
    # The kiosk steps come after the POS ones, in order, before the journals.
    positions = [out.index(f"[{n}] pharmacy") for n in (8, 9, 10, 11, 12)] + [out.index("journals (")]
    assert positions == sorted(positions), out
    # The opening balance 500.00 of the seed: 52.00 and 3.75 paid from the account, 52.00 refunded.
    assert "balance 500.00" in out and "account balance 448.00" in out and "account balance 496.25" in out

    # No PIN, no full ID number, no full name, in the transcript or the log lines.
    both = out + done.stderr
    for secret in (HOLDER_PIN, WRONG_PIN, KIOSK_PIN, HOLDER_SSN, HOLDER_NAME):
        assert secret not in both
    assert f"PIN {INITIAL_PIN}" not in both

    # Everything it started is stopped, and its directory removed.
    pids = {name: int(pid) for name, pid in re.findall(r"stopped (\w+) \(pid (\d+)\)", out)}
    assert set(pids) == {"mosquitto", "backend"}, out
    for name, pid in pids.items():  # the pids the header announced
        assert re.search(rf"^  {name} +pid {pid},", out, re.MULTILINE), out
    assert not [pid for pid in pids.values() if _alive(pid)]
    match = re.search(r"work directory  (\S+)", out)
    assert match is not None
    workdir = match.group(1)
    assert workdir.startswith(("/tmp/", os.environ.get("TMPDIR", "/tmp/"))) and not Path(workdir).exists()
    kiosk = re.search(r"^  kiosk +the pharmacy daemon's local socket (\S+) \(JSON-RPC 2\.0", out,
                      re.MULTILINE)
    assert kiosk is not None, out
    assert Path(kiosk.group(1)).parent == Path(workdir)  # in the demo's directory, gone with it
    assert _processes_naming(workdir) == []


def test_demo_verbosity_before_or_after_the_subcommand() -> None:
    parse = build_parser().parse_args
    assert parse(["-v", "demo"]).verbose == 1
    assert parse(["demo", "-vv"]).verbose == 2
    assert parse(["demo", "--keep"]).verbose == 0 and parse(["demo", "--keep"]).keep is True
