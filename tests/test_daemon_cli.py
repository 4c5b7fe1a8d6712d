"""``sscardd run`` refuses a bad configuration before starting anything (exit 2, key and reason)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RUN = [sys.executable, "-m", "sscardd", "run", "-c"]


@pytest.mark.parametrize(("text", "expect"), [
    ('[terminal]\nid = "12"\n', "terminal.id: must be the PSAM's 12-digit terminal number"),
    ("[terminal\n", "invalid TOML at line 1"),
    ('[terminal]\nid = "370212000001"\nidd = 1\n', "terminal.idd"),
])
def test_bad_config_is_refused_naming_the_key(tmp_path: Path, text: str, expect: str) -> None:
    cfg = tmp_path / "sscardd.toml"
    cfg.write_text(text)
    r = subprocess.run([*RUN, str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_missing_config(tmp_path: Path) -> None:
    r = subprocess.run([*RUN, str(tmp_path / "none.toml")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "cannot read the file" in r.stderr
