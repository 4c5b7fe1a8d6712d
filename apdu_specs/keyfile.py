"""The root-key file format (``sscardd-keys/1``), shared by the emulator, the PSAM and the backend.

A TOML file::

    format = "sscardd-keys/1"
    purpose = "test"            # "test" or "production": lets a production host refuse test keys
    description = "..."

    [des3]                      # generation-2 cards: two-key 3DES root keys (16 bytes, hex)
    IRK = "00112233..."
    ...
    [sm4]                       # generation-3 cards: SM4 root keys (16 bytes, hex)
    IRK = "..."

Keys are national-level roots; card keys are diversified from them with the province, city and
card factors (card-spec §4.3). Names are those of :func:`apdu_specs.filesystem.all_key_names`.

The shipped ``config/test-root-keys.toml`` holds keys derived by :func:`test_root_key` — anyone
can regenerate them, which is the point: they are for tests and labs only.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path

from apdu_specs.crypto import KEY_LEN, Algorithm

FORMAT = "sscardd-keys/1"
SECTIONS = {"des3": Algorithm.DES3, "sm4": Algorithm.SM4}


class KeyFileError(ValueError):
    """The key file is unreadable or malformed; the message names the key and the reason."""


@dataclass(frozen=True)
class RootKeys:
    purpose: str
    keys: dict[Algorithm, dict[str, bytes]]
    source: str = ""

    def get(self, alg: Algorithm, name: str) -> bytes:
        try:
            return self.keys[alg][name]
        except KeyError:
            raise KeyFileError(f"{self.source or 'key file'}: no {alg.label} key {name!r}") from None

    def names(self, alg: Algorithm) -> list[str]:
        return sorted(self.keys.get(alg, {}))


def parse(text: str, source: str = "<string>") -> RootKeys:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeyFileError(f"{source}: not valid TOML: {exc}") from exc
    if doc.get("format") != FORMAT:
        raise KeyFileError(f"{source}: format must be {FORMAT!r}, got {doc.get('format')!r}")
    purpose = doc.get("purpose")
    if purpose not in ("test", "production"):
        raise KeyFileError(f"{source}: purpose must be 'test' or 'production'")
    keys: dict[Algorithm, dict[str, bytes]] = {}
    for section, alg in SECTIONS.items():
        table = doc.get(section, {})
        if not isinstance(table, dict):
            raise KeyFileError(f"{source}: [{section}] must be a table")
        out: dict[str, bytes] = {}
        for name, value in table.items():
            if not isinstance(value, str):
                raise KeyFileError(f"{source}: [{section}] {name}: must be a hex string")
            try:
                raw = bytes.fromhex(value)
            except ValueError:
                raise KeyFileError(f"{source}: [{section}] {name}: not hex") from None
            if len(raw) != KEY_LEN:
                raise KeyFileError(
                    f"{source}: [{section}] {name}: {len(raw)} bytes, expected {KEY_LEN}")
            out[name] = raw
        keys[alg] = out
    unknown = set(doc) - {"format", "purpose", "description", *SECTIONS}
    if unknown:
        raise KeyFileError(f"{source}: unknown top-level keys {sorted(unknown)}")
    return RootKeys(purpose, keys, source)


def load(path: str | Path) -> RootKeys:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyFileError(f"{p}: cannot read key file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"{p}: key file is not UTF-8 text") from exc
    return parse(text, str(p))


def test_root_key(alg: Algorithm, name: str) -> bytes:
    """The published derivation of the test keys: SHA-256 of a label, first 16 bytes."""
    label = f"sscardd TEST root key|{alg.label}|{name}".encode()
    return hashlib.sha256(label).digest()[:KEY_LEN]


def render_test_keyfile(names: list[str]) -> str:
    lines = [
        "# sscardd root TEST keys — never use in production.",
        "# Each key is sha256('sscardd TEST root key|<alg>|<name>')[:16]; see apdu_specs/keyfile.py.",
        "# The emulator (sscard-emu issue), the emulated PSAM and the backend simulator load this",
        "# file by default. Format: apdu_specs/keyfile.py (sscardd-keys/1).",
        f'format = "{FORMAT}"',
        'purpose = "test"',
        'description = "published test root keys for CI and labs"',
    ]
    for section, alg in SECTIONS.items():
        lines.append("")
        lines.append(f"[{section}]")
        for n in names:
            lines.append(f'{n} = "{test_root_key(alg, n).hex().upper()}"')
    return "\n".join(lines) + "\n"


DEFAULT_TEST_KEYFILE = Path(__file__).resolve().parent.parent / "config" / "test-root-keys.toml"
