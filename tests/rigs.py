"""Test rigs: a card reader and a PSAM reader over one transport, with the controls tests need.

The same card-session suite runs over each rig (tests/test_session.py): the in-process emulated
reader, real pcscd + vpcd with ``sscard-emu serve``, and the serial keypad reader on a pty.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware_sim.image import CardImage
from firmware_sim.keypad import KeypadConfig, ScriptedKeypad
from firmware_sim.personalise import CardParams, issue_card, issue_psam
from firmware_sim.sscard import SocialSecurityCard
from firmware_sim.store import TearSafeStore
from sscardd.psam import PsamClient
from sscardd.readers.base import Reader
from sscardd.readers.emulated import EmulatedReader
from sscardd.session import CardSession, PinPolicy
from tests.emu import roots

INITIAL = "123456"
GOOD = "246810"


def write_images(tmp: Path, generation: int = 3, pin: str = GOOD, **params: Any) -> tuple[Path, Path]:
    card = issue_card(CardParams(generation=generation, pin=pin, **params), roots())
    psam = issue_psam(roots())
    cp, pp = tmp / "card.json", tmp / "psam.json"
    TearSafeStore(cp).save(card.to_json())
    TearSafeStore(pp).save(psam.to_json())
    return cp, pp


def load_image(path: Path) -> CardImage:
    return CardImage.from_json(TearSafeStore(path).load())


@dataclass
class Rig:
    """One transport's readers plus fault controls; ``close()`` stops everything."""

    kind: str
    card_reader: Reader
    psam_reader: Reader | None
    card_image: Path | None = None
    keypad: ScriptedKeypad | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def session(self, with_psam: bool = True, initial: tuple[str, ...] = (INITIAL,)) -> CardSession:
        psam = PsamClient(self.psam_reader) if (with_psam and self.psam_reader) else None
        return CardSession(self.card_reader, psam, pin_policy=PinPolicy(frozenset(initial)))

    def remove_card(self) -> None:
        self.extras["remove"]()

    def insert_card(self) -> None:
        self.extras["insert"]()

    def type_keys(self, *entries: str | None) -> None:
        assert self.keypad is not None, f"{self.kind} has no keypad"
        self.keypad.type(*entries)

    async def close(self) -> None:
        await self.card_reader.close()
        if self.psam_reader is not None:
            await self.psam_reader.close()
        for stop in self.extras.get("stops", []):
            stop()


def emulated_rig(tmp: Path, generation: int = 3, pin: str = GOOD, **params: Any) -> Rig:
    cp, pp = write_images(tmp, generation, pin, **params)
    keypad = ScriptedKeypad()
    card = EmulatedReader.from_image(cp, keypad=keypad, keypad_config=KeypadConfig((INITIAL,)))
    psam = EmulatedReader.from_image(pp)
    return Rig("emulated", card, psam, cp, keypad, {"remove": card.remove, "insert": card.insert})


def memory_card(generation: int = 3) -> SocialSecurityCard:
    return SocialSecurityCard(copy.deepcopy(issue_card(CardParams(generation=generation), roots())))


def serial_rig(tmp: Path, generation: int = 3, pin: str = GOOD, **params: Any) -> Rig:
    """The card behind the serial keypad reader's firmware on a pty; the PSAM stays emulated.

    ``extras["firmware"]`` removes and inserts the card (``.remove()``/``.insert()``).
    """
    from firmware_sim.loader import load_card
    from firmware_sim.serial_reader import SerialReaderFirmware, open_pty
    from sscardd.readers.serial import SerialReader

    cp, pp = write_images(tmp, generation, pin, **params)
    keypad = ScriptedKeypad()
    master, slave, path = open_pty()
    firmware = SerialReaderFirmware(master, load_card(cp), keypad, KeypadConfig((INITIAL,)),
                                    extra_fds=(slave,))
    firmware.start()
    return Rig("serial", SerialReader(path), EmulatedReader.from_image(pp), cp, keypad,
               {"stops": [firmware.close], "firmware": firmware, "remove": firmware.remove,
                "insert": firmware.insert})


def pcsc_rig(tmp: Path, generation: int = 3, pin: str = GOOD, **params: Any) -> Rig:
    """``sscard-emu serve`` into the real pcscd (card in slot 0, PSAM in slot 1); needs the
    ``pcscd`` fixture. Removal and insertion are SIGUSR1/SIGUSR2, waited for until pcscd sees them."""
    import contextlib
    import signal

    from firmware_sim.lab import VPCD_READERS, wait_card_state
    from sscardd.readers.pcsc import PcscReader
    from tests.e2e.emulator import served_in_pcscd

    cp, pp = write_images(tmp, generation, pin, **params)
    stack = contextlib.ExitStack()
    proc = stack.enter_context(served_in_pcscd(cp, psam=pp, log=tmp / "serve.log"))

    def remove() -> None:
        proc.send_signal(signal.SIGUSR1)
        assert wait_card_state(VPCD_READERS[0], present=False, timeout=10)

    def insert() -> None:
        proc.send_signal(signal.SIGUSR2)
        assert wait_card_state(VPCD_READERS[0], present=True, timeout=10)

    return Rig("pcsc", PcscReader(VPCD_READERS[0]), PcscReader(VPCD_READERS[1]), cp, None,
               {"stops": [stack.close], "remove": remove, "insert": insert, "proc": proc})
