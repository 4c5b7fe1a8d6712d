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
    return Rig("emulated", card, psam, cp, keypad)


def memory_card(generation: int = 3) -> SocialSecurityCard:
    return SocialSecurityCard(copy.deepcopy(issue_card(CardParams(generation=generation), roots())))
