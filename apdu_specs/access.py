"""Access conditions (card-spec §3.3) and the key names and identifiers this project uses.

An access condition is a small expression: ``FREE``, ``NEVER``, ``PIN``, a key (satisfied by a
prior EXTERNAL AUTHENTICATE with it, or by secure messaging under it), ``PIN | key``,
``PIN & key``, or ``SM(key)`` — secure messaging only, no prior authentication (the DF04/EF08
project rule of card-spec §2.7). The card evaluates them against its security state; the
daemon reads them to know what to present before an access.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Access:
    """Base of the access-condition expressions."""

    def __or__(self, other: Access) -> Access:
        return AnyOf((self, other))

    def __and__(self, other: Access) -> Access:
        return AllOf((self, other))

    def keys(self) -> set[str]:
        """Key names the condition mentions."""
        return set()

    @property
    def needs_pin(self) -> bool:
        return False


@dataclass(frozen=True)
class _Free(Access):
    def __str__(self) -> str:
        return "free"


@dataclass(frozen=True)
class _Never(Access):
    def __str__(self) -> str:
        return "never"


@dataclass(frozen=True)
class _Pin(Access):
    def __str__(self) -> str:
        return "PIN"

    @property
    def needs_pin(self) -> bool:
        return True


@dataclass(frozen=True)
class Key(Access):
    """External authentication with ``name`` (or secure messaging under it)."""

    name: str

    def __str__(self) -> str:
        return self.name

    def keys(self) -> set[str]:
        return {self.name}


@dataclass(frozen=True)
class SM(Access):
    """Secure messaging (CLA ``04`` + MAC) under ``name`` only."""

    name: str

    def __str__(self) -> str:
        return f"SM({self.name})"

    def keys(self) -> set[str]:
        return {self.name}


@dataclass(frozen=True)
class AnyOf(Access):
    terms: tuple[Access, ...]

    def __str__(self) -> str:
        return " | ".join(map(str, self.terms))

    def keys(self) -> set[str]:
        return set().union(*(t.keys() for t in self.terms))

    @property
    def needs_pin(self) -> bool:
        return all(t.needs_pin for t in self.terms)


@dataclass(frozen=True)
class AllOf(Access):
    terms: tuple[Access, ...]

    def __str__(self) -> str:
        return " & ".join(map(str, self.terms))

    def keys(self) -> set[str]:
        return set().union(*(t.keys() for t in self.terms))

    @property
    def needs_pin(self) -> bool:
        return any(t.needs_pin for t in self.terms)


def sm_key(ac: Access) -> str | None:
    """The key a secure-messaging write under ``ac`` is MACed with (None: no key-based access)."""
    for t in (ac.terms if isinstance(ac, AnyOf | AllOf) else (ac,)):
        if isinstance(t, Key | SM):
            return t.name
    return None


FREE: Access = _Free()
NEVER: Access = _Never()
PIN: Access = _Pin()


# --- key identifiers on the user card (EXTERNAL AUTHENTICATE P2) -------------------------------
# SSSE (DDF) level, card-spec §4.5 [SOLID for 00, 04, 06, 0A].
SSSE_KEY_IDS: dict[str, int] = {
    "IRK": 0x00,
    "STKSSSE": 0x02,
    "UKSSSE": 0x04,
    "BK": 0x05,
    "PUK": 0x06,
    "RKSSSE": 0x0A,
}

# DF level (b7 = 1): the spec's ranges overlap, so this project fixes them (README, "key ids").
DF_KEY_SLOTS: dict[str, int] = {
    "STK": 0x82,
    "LK": 0x83,
    "RK1": 0x84,
    "RK2": 0x85,
    "UK1": 0x86,
    "UK2": 0x87,
    "UK3": 0x88,
    "UK4": 0x89,
    "UK5": 0x8A,
    "UK6": 0x8B,
    "UK7": 0x8C,
    "UK8": 0x8D,
    "UK9": 0x8E,
    "UKA": 0x8F,
    "UKB": 0x90,
}


def df_key_name(slot: str, df: str) -> str:
    """``df_key_name("UK2", "DF04")`` → ``"UK2DF04"``."""
    return slot + df


def card_key_id(name: str) -> int:
    """Card key identifier of a root-key name (``RK1DF04`` → ``0x84``)."""
    if name in SSSE_KEY_IDS:
        return SSSE_KEY_IDS[name]
    for slot, kid in DF_KEY_SLOTS.items():
        if name.startswith(slot) and name[len(slot) :].startswith("DF") and len(name) == len(
            slot
        ) + 4:
            return kid
    raise KeyError(name)
