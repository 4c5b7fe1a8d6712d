"""The emulator's side of the vpcd protocol against a fake vpcd that sends garbage.

pcscd cannot be made to send malformed frames, so ``sscard-emu serve --vpcd 127.0.0.1:PORT``
connects to a listener of this test instead. For every input the emulator must give a clean
answer or a clean disconnect, stay alive, come back (the serve loop re-inserts the card after
vpcd drops it), and leave the card image byte-for-byte unchanged unless the test wrote on purpose.
"""

from __future__ import annotations

import random
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.emulator import issue_card, load_image, serve, show, tail
from tests.e2e.fake_vpcd import CTRL_ATR, CTRL_OFF, CTRL_ON, CTRL_RESET, CardLink, Closed, FakeVpcd

SELECT_SSSE = bytes.fromhex("00A404000F7378312E73682EC9E7BBE1B1A3D5CF")
SELECT_EF05 = bytes.fromhex("00A4020002EF05")
READ_CARD_NO = bytes.fromhex("00B207000B")
OK = b"\x90\x00"


@dataclass
class Emulator:
    proc: subprocess.Popen[bytes]
    vpcd: FakeVpcd
    image: Path
    log: Path
    original: bytes
    atr: bytes
    link: CardLink | None = None

    def insert(self) -> CardLink:
        """Wait for the emulator to (re)connect and power the card up."""
        self.link = self.vpcd.accept(timeout=10)
        assert self.link.power_on() == self.atr
        return self.link

    def reconnects(self) -> CardLink:
        """After a disconnect: the process lives and the card comes back, working."""
        assert self.proc.poll() is None, f"emulator exited ({self.proc.returncode}):\n{tail(self.log)}"
        link = self.insert()
        assert link.exchange(SELECT_SSSE)[-2:] == OK
        return link

    def image_unchanged(self) -> None:
        assert self.image.read_bytes() == self.original, "the card image changed"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    tmp = tmp_path_factory.mktemp("garbage")
    image = tmp / "card.json"
    issue_card(image, "--generation", "2")
    original = image.read_bytes()
    atr = bytes.fromhex(show(image)["atr"])
    with FakeVpcd() as vpcd, serve(image, vpcd=vpcd.address, log=tmp / "serve.log") as proc:
        emu = Emulator(proc, vpcd, image, tmp / "serve.log", original, atr)
        yield emu
        if emu.link is not None:
            emu.link.close()
        assert proc.poll() is None, f"emulator exited ({proc.returncode}):\n{tail(emu.log)}"
    emu.image_unchanged()


@pytest.fixture
def card(emulator: Emulator) -> Iterator[CardLink]:
    """A card in its power-up state: the live link after a reset (which clears the volatile
    state), or a new insertion if there is no usable link."""
    link = emulator.link
    try:
        if link is None:
            raise Closed("no link yet")
        link.send_frame(CTRL_RESET)
        assert link.exchange(CTRL_ATR) == emulator.atr
    except (Closed, OSError):
        if link is not None:
            link.close()
        link = emulator.insert()
    yield link
    assert emulator.proc.poll() is None, f"emulator died:\n{tail(emulator.log)}"
    emulator.image_unchanged()


def test_well_formed_controls_and_apdus(card: CardLink) -> None:
    # Power on/off/reset are not answered; the ATR request is, every time, without side effects.
    card.send_frame(CTRL_OFF)
    card.send_frame(CTRL_ON)
    card.send_frame(CTRL_RESET)
    assert card.silent(0.1)
    atr = card.atr()
    for _ in range(50):
        assert card.exchange(CTRL_ATR) == atr
    fci = card.exchange(SELECT_SSSE)
    assert fci[:2] == b"\x6f\x1c" and fci[-2:] == OK
    assert card.exchange(SELECT_EF05) == OK
    assert card.exchange(READ_CARD_NO)[:2] == b"\x07\x09"
    # ATR requests between commands do not reset the card; a reset does.
    assert card.exchange(CTRL_ATR) == atr
    assert card.exchange(READ_CARD_NO)[-2:] == OK
    card.send_frame(CTRL_RESET)
    assert card.exchange(CTRL_ATR) == atr
    assert card.exchange(READ_CARD_NO) == b"\x69\x86"  # no current EF after the reset


@pytest.mark.parametrize(
    ("name", "apdu", "sw"),
    [
        ("2 bytes", bytes.fromhex("00A4"), b"\x67\x00"),
        ("truncated header (3 bytes)", bytes.fromhex("00A404"), b"\x67\x00"),
        ("Lc larger than the data", bytes.fromhex("00A404000F7378"), b"\x67\x00"),
        ("Lc smaller than the data", bytes.fromhex("00A40400027378312E"), b"\x67\x00"),
        ("extended length", bytes.fromhex("00A40400000002") + b"\x3f\x00", b"\x67\x00"),
        ("unknown INS", bytes.fromhex("00FE0000"), b"\x6d\x00"),
        ("unknown INS with data", bytes.fromhex("0050000002AABB00"), b"\x6d\x00"),
        ("unknown CLA", bytes.fromhex("A0A4000C023F00"), b"\x6e\x00"),
        ("CLA FF", bytes.fromhex("FFA4000C023F00"), b"\x6e\x00"),
        ("SELECT with absurd P1", bytes.fromhex("00A4FF00023F00"), b"\x6a\x86"),
        ("SELECT with absurd P2", bytes.fromhex("00A400FF023F00"), b"\x6a\x86"),
        ("SELECT with absurd P1 and P2", bytes.fromhex("00A4FFFF0F") + SELECT_SSSE[5:], b"\x6a\x86"),
    ],
)
def test_malformed_apdus(card: CardLink, name: str, apdu: bytes, sw: bytes) -> None:
    assert card.exchange(apdu) == sw, name
    assert card.exchange(SELECT_SSSE)[-2:] == OK, f"card unusable after {name}"


def test_maximum_frame(card: CardLink) -> None:
    """A 65535-byte frame (the protocol's maximum) is an APDU with a wrong length, not a crash."""
    assert card.exchange(b"\x00\xa4\x04\x00\x0f" + bytes(0xFFFF - 5)) == b"\x67\x00"
    assert card.exchange(SELECT_SSSE)[-2:] == OK


def test_zero_length_frame_disconnects(emulator: Emulator, card: CardLink) -> None:
    card.send_raw(b"\x00\x00")
    assert card.closed_by_peer(), "an empty frame must end the link"
    emulator.reconnects()


@pytest.mark.parametrize("code", [0x03, 0x05, 0x7F, 0xFF])
def test_unknown_control_code_disconnects(emulator: Emulator, card: CardLink, code: int) -> None:
    card.send_frame(bytes((code,)))
    assert card.closed_by_peer(), f"unknown control code {code:#04x} must end the link"
    emulator.reconnects()


@pytest.mark.parametrize("sent", [0, 1, 3, 100])
def test_frame_shorter_than_its_header_then_close(emulator: Emulator, card: CardLink,
                                                  sent: int) -> None:
    card.send_raw(struct.pack(">H", 200) + bytes(range(sent)))
    assert card.silent(0.1), "no answer may come before the frame is complete"
    card.close()
    emulator.reconnects()


def test_half_a_length_header_then_close(emulator: Emulator, card: CardLink) -> None:
    card.send_raw(b"\x00")
    assert card.silent(0.1)
    card.close()
    emulator.reconnects()


def test_random_apdu_frames(card: CardLink) -> None:
    """Frames of random bytes (2..300, so never a control code): each gets an R-APDU."""
    rng = random.Random(20261125)
    for _ in range(300):
        payload = rng.randbytes(rng.randint(2, 300))
        rapdu = card.exchange(payload)
        assert 2 <= len(rapdu) <= 258, payload.hex()
        assert rapdu[-2] in (0x61, 0x62, 0x63, 0x65, 0x67, 0x68, 0x69, 0x6A, 0x6B, 0x6C, 0x6D,
                             0x6E, 0x6F, 0x90), (payload.hex(), rapdu.hex())
    assert card.exchange(SELECT_SSSE)[-2:] == OK


@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_on_the_stream(emulator: Emulator, card: CardLink, seed: int) -> None:
    """Unframed random bytes: whatever they parse as, the answer is clean or the link ends."""
    rng = random.Random(seed)
    card.send_raw(rng.randbytes(rng.randint(1, 600)))
    try:
        while True:  # read whatever answers come, until the emulator waits for more or hangs up
            if card.silent(0.15):
                break
            rapdu = card.recv_frame(timeout=2)
            assert rapdu, "the emulator must never send an empty frame"
    except Closed:
        pass
    card.close()
    emulator.reconnects()


def test_deliberate_write_then_restore(emulator: Emulator, card: CardLink) -> None:
    """The one write of this module: a wrong PIN commits the counter, the right PIN restores it
    (and with it the image, byte for byte)."""
    assert card.exchange(bytes.fromhex("0020000003999999")) == b"\x63\xc2"
    assert emulator.image.read_bytes() != emulator.original
    assert load_image(emulator.image).pin.tries == 2
    assert card.exchange(bytes.fromhex("0020000003123456")) == OK
    emulator.image_unchanged()
