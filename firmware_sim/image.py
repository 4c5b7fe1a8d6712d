"""Card and PSAM images: the persistent content of an emulated chip, as JSON.

An image holds what a real chip keeps in EEPROM: files, card keys (already diversified for this
card — root keys never sit on a user card), the PIN (as a salted hash: the emulator only ever
compares it), try counters and block flags. Volatile state (selected file, security status,
challenge) is not part of it. Bytes are hex inside the JSON; pickle is never used.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Any

from firmware_sim.store import ImageError

CARD_FORMAT = "sscard-emu-card/1"
PSAM_FORMAT = "sscard-emu-psam/1"


def pin_hash(salt: bytes, pin_bcd: bytes) -> bytes:
    return hashlib.sha256(b"sscard-emu pin|" + salt + pin_bcd).digest()


@dataclass
class KeyEntry:
    name: str
    key_id: int
    value: bytes
    tries: int
    max_tries: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.key_id, "value": self.value.hex().upper(), "tries": self.tries,
                "max_tries": self.max_tries}

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> KeyEntry:
        return cls(name, int(d["id"]), bytes.fromhex(d["value"]), int(d["tries"]),
                   int(d["max_tries"]))


@dataclass
class PinState:
    salt: bytes
    digest: bytes
    tries: int
    max_tries: int

    def matches(self, pin_bcd: bytes) -> bool:
        return hmac.compare_digest(pin_hash(self.salt, pin_bcd), self.digest)

    def set(self, pin_bcd: bytes) -> None:
        self.salt = os.urandom(8)
        self.digest = pin_hash(self.salt, pin_bcd)
        self.tries = self.max_tries

    @classmethod
    def new(cls, pin_bcd: bytes, max_tries: int) -> PinState:
        st = cls(b"", b"", max_tries, max_tries)
        st.set(pin_bcd)
        return st


@dataclass
class FileContent:
    """Records (record files; cyclic: newest first) or bytes (transparent)."""

    records: list[bytes] | None = None
    data: bytearray | None = None

    def to_json(self) -> dict[str, Any]:
        if self.records is not None:
            return {"records": [r.hex().upper() for r in self.records]}
        assert self.data is not None
        return {"data": bytes(self.data).hex().upper()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FileContent:
        if "records" in d:
            return cls(records=[bytes.fromhex(r) for r in d["records"]])
        return cls(data=bytearray.fromhex(d["data"]))


@dataclass
class CardImage:
    generation: int
    algorithm: int
    atr: bytes
    region: str
    pin: PinState
    keys: dict[str, KeyEntry]
    files: dict[str, FileContent]  # "SSSE/EF05", "SSSE/DF04/EF08"
    blocked_apps: set[str] = field(default_factory=set)
    card_blocked: bool = False
    meta: dict[str, Any] = field(default_factory=dict)  # personalisation summary, test-only

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CARD_FORMAT,
            "generation": self.generation,
            "algorithm": self.algorithm,
            "atr": self.atr.hex().upper(),
            "region": self.region,
            "pin": {"salt": self.pin.salt.hex(), "digest": self.pin.digest.hex(),
                    "tries": self.pin.tries, "max_tries": self.pin.max_tries},
            "keys": {n: k.to_json() for n, k in sorted(self.keys.items())},
            "files": {p: f.to_json() for p, f in sorted(self.files.items())},
            "blocked_apps": sorted(self.blocked_apps),
            "card_blocked": self.card_blocked,
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CardImage:
        if d.get("format") != CARD_FORMAT:
            raise ImageError(f"not a card image (format {d.get('format')!r})")
        try:
            p = d["pin"]
            img = cls(
                generation=int(d["generation"]),
                algorithm=int(d["algorithm"]),
                atr=bytes.fromhex(d["atr"]),
                region=str(d["region"]),
                pin=PinState(bytes.fromhex(p["salt"]), bytes.fromhex(p["digest"]),
                             int(p["tries"]), int(p["max_tries"])),
                keys={n: KeyEntry.from_json(n, k) for n, k in d["keys"].items()},
                files={path: FileContent.from_json(f) for path, f in d["files"].items()},
                blocked_apps=set(d.get("blocked_apps", [])),
                card_blocked=bool(d.get("card_blocked", False)),
                meta=dict(d.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ImageError(f"card image is malformed: {exc!r}") from exc
        if img.generation not in (2, 3):
            raise ImageError(f"card image: generation must be 2 or 3, got {img.generation}")
        if img.algorithm not in (0x01, 0x03):
            raise ImageError(f"card image: algorithm must be 01 (3DES) or 03 (SM4), got {img.algorithm}")
        if img.pin.max_tries < 1 or not 0 <= img.pin.tries <= img.pin.max_tries:
            raise ImageError("card image: PIN counters out of range")
        return img


@dataclass
class PsamImage:
    terminal_no: str  # 12 digits, file 0016
    serial: str  # 20 digits (cn10), file 0015
    atr: bytes
    # environment ("des3" | "sm4") → key name → (psam key id, root key)
    keys: dict[str, dict[str, KeyEntry]]
    counter: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PSAM_FORMAT,
            "terminal_no": self.terminal_no,
            "serial": self.serial,
            "atr": self.atr.hex().upper(),
            "keys": {env: {n: k.to_json() for n, k in sorted(ks.items())}
                     for env, ks in sorted(self.keys.items())},
            "counter": self.counter,
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PsamImage:
        if d.get("format") != PSAM_FORMAT:
            raise ImageError(f"not a PSAM image (format {d.get('format')!r})")
        try:
            img = cls(
                terminal_no=str(d["terminal_no"]),
                serial=str(d["serial"]),
                atr=bytes.fromhex(d["atr"]),
                keys={env: {n: KeyEntry.from_json(n, k) for n, k in ks.items()}
                      for env, ks in d["keys"].items()},
                counter=int(d.get("counter", 0)),
                meta=dict(d.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ImageError(f"PSAM image is malformed: {exc!r}") from exc
        if len(img.terminal_no) != 12 or not img.terminal_no.isdigit():
            raise ImageError("PSAM image: terminal_no must be 12 digits")
        return img
