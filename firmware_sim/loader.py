"""Load a card or PSAM image from a file into a running emulated chip (persisting changes back)."""

from __future__ import annotations

from pathlib import Path

from firmware_sim.cos import ResponseMode
from firmware_sim.image import CardImage, PsamImage
from firmware_sim.psam import Psam
from firmware_sim.sscard import SocialSecurityCard
from firmware_sim.store import TearSafeStore


def load_card(path: Path, mode: ResponseMode = ResponseMode.DIRECT) -> SocialSecurityCard:
    store = TearSafeStore(path)
    return SocialSecurityCard(CardImage.from_json(store.load()), store, mode)


def load_psam(path: Path, mode: ResponseMode = ResponseMode.DIRECT) -> Psam:
    store = TearSafeStore(path)
    return Psam(PsamImage.from_json(store.load()), store, mode)
