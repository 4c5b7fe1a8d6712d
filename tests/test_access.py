"""Access conditions and key identifiers of :mod:`apdu_specs.access` (card-spec §3.3, §4.5)."""

from __future__ import annotations

import pytest

from apdu_specs import access, filesystem
from apdu_specs.access import FREE, NEVER, PIN, SM, AllOf, AnyOf, Key


def test_expressions() -> None:
    either = PIN | Key("RK1DF04")
    both = PIN & Key("RK1DF04")
    assert either == AnyOf((PIN, Key("RK1DF04")))
    assert both == AllOf((PIN, Key("RK1DF04")))
    assert str(either) == "PIN | RK1DF04"
    assert str(both) == "PIN & RK1DF04"
    assert (str(FREE), str(NEVER), str(PIN), str(SM("UK2DF04"))) == ("free", "never", "PIN", "SM(UK2DF04)")


def test_keys_and_needs_pin() -> None:
    assert FREE.keys() == set() and not FREE.needs_pin
    assert PIN.keys() == set() and PIN.needs_pin
    assert Key("RKSSSE").keys() == {"RKSSSE"} and not Key("RKSSSE").needs_pin
    assert SM("UK2DF04").keys() == {"UK2DF04"}
    assert (PIN | Key("A")).keys() == {"A"}
    assert (Key("A") & Key("B")).keys() == {"A", "B"}
    assert not (PIN | Key("A")).needs_pin  # the key alone will do
    assert (PIN & Key("A")).needs_pin
    assert (PIN | PIN).needs_pin


@pytest.mark.parametrize(
    ("name", "kid"),
    [("IRK", 0x00), ("STKSSSE", 0x02), ("UKSSSE", 0x04), ("BK", 0x05), ("PUK", 0x06), ("RKSSSE", 0x0A),
     ("STKDF04", 0x82), ("LKDF03", 0x83), ("RK1DF04", 0x84), ("RK1DF03", 0x84), ("RK2DF03", 0x85),
     ("UK1DF04", 0x86), ("UK2DF04", 0x87), ("UKADF01", 0x8F), ("UKBDF01", 0x90)],
)
def test_card_key_id(name: str, kid: int) -> None:
    assert access.card_key_id(name) == kid


@pytest.mark.parametrize("name", ["", "UK1", "UK1DF0", "UK1DF041", "UKCDF01", "RK3DF03", "XYZ"])
def test_card_key_id_unknown(name: str) -> None:
    with pytest.raises(KeyError):
        access.card_key_id(name)


def test_every_declared_key_has_an_id() -> None:
    for name in filesystem.all_key_names():
        kid = access.card_key_id(name)
        # key-id byte: b7 = 0 global (SSSE), 1 DF-specific
        assert bool(kid & 0x80) is (not name.endswith("SSSE") and name not in ("IRK", "BK", "PUK"))


def test_df_key_name() -> None:
    assert access.df_key_name("UK2", "DF04") == "UK2DF04"
