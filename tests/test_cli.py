"""``sscard-emu issue`` and ``show``: synthetic defaults, validation, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apdu_specs import identifiers
from firmware_sim.cli import main
from firmware_sim.image import CardImage, PsamImage
from firmware_sim.store import TearSafeStore


def _show(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    capsys.readouterr()
    assert main(["show", str(path)]) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def test_issue_defaults_are_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "card.json"
    assert main(["issue", "--out", str(out)]) == 0
    assert "generation-3 card" in capsys.readouterr().out
    shown = _show(out, capsys)
    fields = shown["fields"]
    assert isinstance(fields, dict)
    identifiers.validate_ssn(fields["ssn"])
    identifiers.validate_card_no(fields["card_no"])
    assert fields["spec_version"] == "3.00"
    assert fields["card_id"].startswith("370202D156000005")
    assert shown["atr"] == "3B6D000000814A44468660370212345678"


def test_issue_with_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "card.json"
    args = ["issue", "--out", str(out), "--generation", "2", "--name", "欧阳娜娜",
            "--ssn", "11010519491231002X", "--region", "110105", "--card-no", "D2143569X",
            "--pin", "2468", "--tries", "5", "--serial", "0A0B0C0D"]
    assert main(args) == 0
    img = CardImage.from_json(TearSafeStore(out).load())
    assert img.generation == 2 and img.pin.max_tries == 5
    assert img.atr.hex().upper().endswith("11010A0B0C0D")
    fields = _show(out, capsys)["fields"]
    assert isinstance(fields, dict)
    assert fields["name"] == "欧阳娜娜" and fields["card_no"] == "D2143569X"


def test_issue_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "card.json"
    out.write_text("precious")
    assert main(["issue", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert out.read_text() == "precious"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ssn", "370202199001011230"], "check character"),
        (["--card-no", "D2143569Y"], "check character"),
        (["--pin", "12a4"], "pin"),
        (["--pin", "123"], "pin"),
        (["--region", "3702"], "region"),
        (["--issue-date", "20211301"], "issue date"),
        (["--tries", "0"], "tries"),
        (["--name", "x" * 60], "an value"),
    ],
)
def test_issue_validation(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
                          message: str) -> None:
    out = tmp_path / "card.json"
    assert main(["issue", "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_issue_psam(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "psam.json"
    assert main(["issue", "--psam", "--out", str(out), "--terminal-no", "370212000042",
                 "--service-hall"]) == 0
    img = PsamImage.from_json(TearSafeStore(out).load())
    assert img.terminal_no == "370212000042"
    assert "PUK" in img.keys["sm4"]
    assert _show(out, capsys)["terminal_no"] == "370212000042"
    assert main(["issue", "--psam", "--out", str(tmp_path / "p2.json"), "--terminal-no", "12"]) == 2


def test_bad_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('format = "sscardd-keys/1"\npurpose = "test"\n[sm4]\nIRK = "00"\n')
    assert main(["issue", "--out", str(tmp_path / "c.json"), "--keys", str(keys)]) == 2
    assert "IRK" in capsys.readouterr().err


def test_serve_with_a_broken_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["serve", "--card", str(bad), "--vpcd", "127.0.0.1:1"]) == 2
    assert "not a valid image" in capsys.readouterr().err
