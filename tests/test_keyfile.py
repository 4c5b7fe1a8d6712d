"""The root-key file format of :mod:`apdu_specs.keyfile` and the shipped test key file."""

from __future__ import annotations

from pathlib import Path

import pytest

from apdu_specs import filesystem, keyfile
from apdu_specs.crypto import Algorithm
from apdu_specs.keyfile import KeyFileError

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "test-root-keys.toml"
HEADER = 'format = "sscardd-keys/1"\npurpose = "test"\n'
K = "00112233445566778899AABBCCDDEEFF"


def test_default_path_is_the_shipped_file() -> None:
    assert keyfile.DEFAULT_TEST_KEYFILE == SHIPPED
    assert SHIPPED.is_file()


def test_shipped_file_holds_every_key() -> None:
    roots = keyfile.load(SHIPPED)
    assert roots.purpose == "test"
    assert roots.source == str(SHIPPED)
    names = filesystem.all_key_names()
    assert len(names) == len(set(names))
    for section, alg in keyfile.SECTIONS.items():
        assert roots.names(alg) == sorted(names), section
        for name in names:
            assert roots.get(alg, name) == keyfile.test_root_key(alg, name), f"[{section}] {name}"


def test_shipped_file_is_reproducible() -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    assert text == keyfile.render_test_keyfile(filesystem.all_key_names())


def test_test_root_key_derivation() -> None:
    import hashlib

    for alg in (Algorithm.DES3, Algorithm.SM4):
        key = keyfile.test_root_key(alg, "IRK")
        assert len(key) == 16
        assert key == hashlib.sha256(f"sscardd TEST root key|{alg.label}|IRK".encode()).digest()[:16]
    assert keyfile.test_root_key(Algorithm.DES3, "IRK") != keyfile.test_root_key(Algorithm.SM4, "IRK")


def test_parse_minimal_and_production() -> None:
    roots = keyfile.parse(HEADER + f'[sm4]\nIRK = "{K}"\n', "mem")
    assert roots.get(Algorithm.SM4, "IRK") == bytes.fromhex(K)
    assert roots.names(Algorithm.DES3) == []
    roots = keyfile.parse(HEADER.replace("test", "production") + 'description = "x"\n')
    assert roots.purpose == "production"
    # lower-case hex is fine
    roots = keyfile.parse(HEADER + f'[des3]\nPUK = "{K.lower()}"\n')
    assert roots.get(Algorithm.DES3, "PUK") == bytes.fromhex(K)


def test_get_unknown_key_names_it() -> None:
    roots = keyfile.parse(HEADER + f'[sm4]\nIRK = "{K}"\n', "mem.toml")
    with pytest.raises(KeyFileError, match=r"mem\.toml.*SM4.*'RKSSSE'"):
        roots.get(Algorithm.SM4, "RKSSSE")
    with pytest.raises(KeyFileError, match="3DES key 'IRK'"):
        roots.get(Algorithm.DES3, "IRK")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("format = \n", "not valid TOML"),
        (HEADER + "[sm4]\nIRK = 1\nIRK = 2\n", "not valid TOML"),  # duplicate key
        ('format = "sscardd-keys/2"\npurpose = "test"\n',
         "format must be 'sscardd-keys/1', got 'sscardd-keys/2'"),
        ('purpose = "test"\n', "format must be"),
        ('format = 1\npurpose = "test"\n', "format must be"),
        ('format = "sscardd-keys/1"\npurpose = "prod"\n', "purpose must be"),
        ('format = "sscardd-keys/1"\n', "purpose must be"),
        (HEADER + '[sm4]\nIRK = "zz112233445566778899AABBCCDDEEFF"\n', r"\[sm4\] IRK: not hex"),
        (HEADER + '[des3]\nUKSSSE = "0011"\n', r"\[des3\] UKSSSE: 2 bytes, expected 16"),
        (HEADER + f'[des3]\nPUK = "{K}00"\n', r"\[des3\] PUK: 17 bytes, expected 16"),
        (HEADER + "[sm4]\nRKSSSE = 5\n", r"\[sm4\] RKSSSE: must be a hex string"),
        (HEADER + "[sm4.IRK]\nx = 1\n", r"\[sm4\] IRK: must be a hex string"),
        (HEADER + 'sm4 = "x"\n', r"\[sm4\] must be a table"),
        (HEADER + "extra = 1\n", r"unknown top-level keys \['extra'\]"),
        (HEADER + f'[aes]\nIRK = "{K}"\n', r"unknown top-level keys \['aes'\]"),
    ],
)
def test_malformed(text: str, pattern: str) -> None:
    with pytest.raises(KeyFileError, match=pattern):
        keyfile.parse(text, "bad.toml")
    with pytest.raises(KeyFileError, match=r"^bad\.toml: "):
        keyfile.parse(text, "bad.toml")


def test_load_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(KeyFileError, match=r"missing\.toml: cannot read key file"):
        keyfile.load(missing)
    with pytest.raises(KeyFileError, match="cannot read key file"):
        keyfile.load(tmp_path)  # a directory
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00format")
    with pytest.raises(KeyFileError, match=r"binary\.toml: .*UTF-8"):
        keyfile.load(binary)
    bad = tmp_path / "bad.toml"
    bad.write_text(HEADER + '[sm4]\nIRK = "00"\n', encoding="utf-8")
    with pytest.raises(KeyFileError, match=r"bad\.toml: \[sm4\] IRK"):
        keyfile.load(str(bad))


def test_load_round_trip_of_rendered_file(tmp_path: Path) -> None:
    p = tmp_path / "keys.toml"
    p.write_text(keyfile.render_test_keyfile(["IRK", "PUK"]), encoding="utf-8")
    roots = keyfile.load(p)
    assert roots.names(Algorithm.SM4) == ["IRK", "PUK"]
    assert roots.get(Algorithm.DES3, "PUK") == keyfile.test_root_key(Algorithm.DES3, "PUK")
