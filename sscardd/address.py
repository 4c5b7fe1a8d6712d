"""The standard reader interface's file-address syntax (card-spec §5.1, ``iReadCard``/``iWriteCard``).

``DF04EF05|84|$DF01EF0A|37|$`` — files separated by ``$`` (the list ends with ``$``); a file is
its DF name plus EF name (``SSSEEF05``, ``DF04EF05``), then ``|``-separated record identifiers
(hex tags), ``tag:n`` for the n-th record with that tag. A cyclic file takes record numbers
(1 = newest) or nothing for all records; a transparent file takes nothing (its whole content).

Output mirrors the input with values in place: ``DF01EF0A|CHN|$``. Records of a cyclic file are
separated by ``|`` and their items by ``^`` (each item ends with ``^``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from apdu_specs import filesystem
from apdu_specs.filesystem import DfSpec, EfSpec, Structure
from sscardd.errors import SSCardError

_FILE = re.compile(r"^(SSSE|DF0[1-4])(EF[0-9A-F]{2})$")
_ITEM = re.compile(r"^([0-9A-F]{2})(?::([1-9][0-9]?))?$")
MAX_ADDRESS = 1024


@dataclass(frozen=True)
class ItemRef:
    tag: int
    occurrence: int = 1  # the n-th record with this tag
    raw: str = ""


@dataclass(frozen=True)
class FileRef:
    df: str  # "SSSE", "DF01".."DF04"
    ef: EfSpec
    items: tuple[ItemRef, ...] = ()
    records: tuple[int, ...] = ()  # cyclic files: record numbers
    raw_name: str = ""  # as the caller wrote it (the output mirrors the input)

    @property
    def name(self) -> str:
        return self.raw_name or f"{self.df}{self.ef.name}"

    @property
    def df_spec(self) -> DfSpec | None:
        return None if self.df == "SSSE" else filesystem.ssse(3).df(self.df)


def _bad(why: str) -> SSCardError:
    return SSCardError("BAD_PARAMETER", f"file address: {why}")


def parse(address: str, generation: int = 3) -> list[FileRef]:
    """Parse a file address; BAD_PARAMETER with the reason on anything malformed."""
    if not isinstance(address, str) or not address:
        raise _bad("empty")
    if len(address) > MAX_ADDRESS:
        raise _bad(f"longer than {MAX_ADDRESS} characters")
    if not address.endswith("$"):
        raise _bad("must end with '$'")
    root = filesystem.ssse(generation)
    out: list[FileRef] = []
    for part in address[:-1].split("$"):
        fields = part.split("|")
        if len(fields) < 2 or fields[-1] != "":
            raise _bad(f"{part!r}: a file is NAME|item|...| (each field ends with '|')")
        m = _FILE.match(fields[0].upper()) if fields[0].isascii() else None
        if not m:
            raise _bad(f"unknown file {fields[0]!r}")
        df_name, ef_name = m.group(1), m.group(2)
        df = root if df_name == "SSSE" else root.df(df_name)
        try:
            ef = df.ef(int(ef_name[2:], 16) | 0xEF00)
        except KeyError:
            raise _bad(f"no file {df_name}{ef_name}") from None
        tokens = [t.upper() for t in fields[1:-1]]
        if ef.structure is Structure.TRANSPARENT:
            if tokens:
                raise _bad(f"{df_name}{ef_name} is transparent: no items")
            out.append(FileRef(df_name, ef, raw_name=fields[0]))
        elif ef.structure is Structure.CYCLIC:
            recs = []
            for t in tokens:
                if not (t.isascii() and t.isdigit()) or not 1 <= int(t) <= ef.records:
                    raise _bad(f"{df_name}{ef_name}: record number {t!r} out of 1..{ef.records}")
                recs.append(int(t))
            out.append(FileRef(df_name, ef, records=tuple(recs), raw_name=fields[0]))
        else:
            if not tokens:
                raise _bad(f"{df_name}{ef_name}: name at least one record identifier")
            items = []
            for t in tokens:
                im = _ITEM.match(t)
                if not im:
                    raise _bad(f"{df_name}{ef_name}: bad record identifier {t!r}")
                tag = int(im.group(1), 16)
                if ef.items and tag not in {i.tag for i in ef.items}:
                    raise _bad(f"{df_name}{ef_name} has no item {t}")
                items.append(ItemRef(tag, int(im.group(2) or 1), t))
            out.append(FileRef(df_name, ef, items=tuple(items), raw_name=fields[0]))
    return out


def format_result(files: list[tuple[FileRef, list[str]]]) -> str:
    """Mirror the address with values in place of the identifiers."""
    out = []
    for ref, values in files:
        out.append(ref.name + "|" + "".join(v + "|" for v in values))
    return "$".join(out) + "$"


def parse_values(data: str, refs: list[FileRef]) -> list[list[str]]:
    """Split ``iWriteCard`` data (``value|value|$value|$``) along ``refs``."""
    if not data.endswith("$"):
        raise _bad("write data must end with '$'")
    parts = data[:-1].split("$")
    if len(parts) != len(refs):
        raise _bad(f"write data names {len(parts)} files, the address {len(refs)}")
    out = []
    for part, ref in zip(parts, refs, strict=True):
        if not part.endswith("|"):
            raise _bad("each write value ends with '|'")
        values = part[:-1].split("|")
        expected = len(ref.items) or len(ref.records) or 1
        if len(values) != expected:
            raise _bad(f"{ref.name}: {len(values)} values for {expected} items")
        out.append(values)
    return out
