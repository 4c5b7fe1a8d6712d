"""Tear safety of the card image (``firmware_sim/store.py``): a process killed while the card
commits a change leaves the old or the new image, never a mix and never an unreadable file.

Two ways of dying: ``SSCARD_EMU_CRASH_AT=<stage>[:n]`` makes the store ``os._exit(70)`` at a
given point of its write; and ``sscard-emu serve`` gets SIGKILLed at random moments while a fake
vpcd drives PIN verifications (each of which commits the try counter) as fast as it can.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from apdu_specs import crypto
from firmware_sim.image import CardImage
from firmware_sim.sscard import SocialSecurityCard
from firmware_sim.store import STAGES, TearSafeStore
from tests.e2e.emulator import issue_card, load_image, serve, tail
from tests.e2e.fake_vpcd import Closed, FakeVpcd

PIN = "123456"
WRONG_VERIFY = bytes.fromhex("0020000003999999")
RIGHT_VERIFY = bytes.fromhex("0020000003123456")

# Loads the image the way `sscard-emu serve` does and sends the APDUs given in hex; prints the
# answers. The store reads SSCARD_EMU_CRASH_AT when it is created.
CHILD = """
import sys
from pathlib import Path
from firmware_sim.loader import load_card
card = load_card(Path(sys.argv[1]))
for apdu in sys.argv[2:]:
    print(card.execute(bytes.fromhex(apdu)).hex().upper(), flush=True)
"""


def _without_counter(doc: dict[str, Any]) -> dict[str, Any]:
    out = dict(doc)
    out["pin"] = {k: v for k, v in doc["pin"].items() if k != "tries"}
    return out


def check_consistent(path: Path, original: dict[str, Any], allowed_tries: set[int]) -> int:
    """The image loads, differs from the original only in the PIN counter (one of
    ``allowed_tries``), and still works: the right PIN verifies. Returns the counter."""
    doc = TearSafeStore(path).load()  # raises on a torn or unparsable file
    image = CardImage.from_json(doc)
    tries = image.pin.tries
    assert tries in allowed_tries, f"counter {tries}, expected {allowed_tries}"
    assert _without_counter(image.to_json()) == _without_counter(original)
    assert image.pin.matches(crypto.pin_to_bcd(PIN))
    card = SocialSecurityCard(image)  # no store: do not touch the file
    assert card.execute(RIGHT_VERIFY) == b"\x90\x00"
    return tries


def run_child(image: Path, *apdus: bytes, crash_at: str | None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("SSCARD_EMU_CRASH_AT", None)
    if crash_at is not None:
        env["SSCARD_EMU_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-c", CHILD, str(image), *(a.hex() for a in apdus)],
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("issued") / "card.json"
    issue_card(path, "--generation", "3")
    return path.read_bytes()


@pytest.fixture
def image(tmp_path: Path, issued: bytes) -> Path:
    path = tmp_path / "card.json"
    path.write_bytes(issued)
    return path


# stage → counter the image must hold after the crash (the issued counter is 3; a wrong PIN
# makes it 2): before the rename the old image stands, after it the new one.
EXPECTED = {"tmp-partial": 3, "tmp-synced": 3, "replaced": 2}


def test_stages_are_the_ones_tested() -> None:
    assert set(STAGES) == set(EXPECTED)


@pytest.mark.parametrize("stage", STAGES)
def test_crash_during_commit(image: Path, stage: str) -> None:
    original = TearSafeStore(image).load()
    done = run_child(image, WRONG_VERIFY, crash_at=stage)
    assert done.returncode == 70, f"expected the crash hook to exit 70: {done}"
    assert done.stdout == "", "the card must not answer before its write is complete"
    assert check_consistent(image, original, {EXPECTED[stage]}) == EXPECTED[stage]

    # The card goes on working from what was left, temporary file or not.
    done = run_child(image, WRONG_VERIFY, RIGHT_VERIFY, crash_at=None)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [f"63C{EXPECTED[stage] - 1}", "9000"]
    assert check_consistent(image, original, {3}) == 3


@pytest.mark.parametrize("stage", STAGES)
def test_crash_at_the_second_commit(image: Path, stage: str) -> None:
    original = TearSafeStore(image).load()
    done = run_child(image, WRONG_VERIFY, WRONG_VERIFY, crash_at=f"{stage}:2")
    assert done.returncode == 70, done
    assert done.stdout.split() == ["63C2"], "the first commit completes and is answered"
    assert check_consistent(image, original, {EXPECTED[stage] - 1}) == EXPECTED[stage] - 1


def test_sigkill_while_serving(image: Path, tmp_path: Path) -> None:
    """Several rounds: serve, verify wrong/right PINs in a loop, SIGKILL at a random moment."""
    original = TearSafeStore(image).load()
    rng = random.Random(1125)
    total = 0
    for rnd in range(6):
        log = tmp_path / f"serve-{rnd}.log"
        with FakeVpcd() as vpcd, serve(image, vpcd=vpcd.address, log=log) as proc:
            link = vpcd.accept(timeout=10)
            link.power_on()
            # Start from a full counter, so the counter never reaches 0 whatever the kill hits.
            assert link.exchange(RIGHT_VERIFY) == b"\x90\x00", tail(log)
            killer = threading.Timer(rng.uniform(0.05, 0.4), proc.send_signal, (signal.SIGKILL,))
            killer.start()
            try:
                n = 0
                while True:
                    assert link.exchange(WRONG_VERIFY, timeout=5) == b"\x63\xc2"
                    assert link.exchange(RIGHT_VERIFY, timeout=5) == b"\x90\x00"
                    n += 2
            except (Closed, OSError):  # killed: EOF, reset or broken pipe
                pass
            finally:
                killer.join()
                link.close()
            assert proc.wait(10) == -signal.SIGKILL
        total += n
        check_consistent(image, original, {2, 3})
        assert load_image(image).to_json()["pin"]["max_tries"] == 3
    assert total > 20, f"only {total} committed VERIFYs in all rounds: the kills came too early"
