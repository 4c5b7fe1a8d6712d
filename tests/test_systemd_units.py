"""The systemd units, checked offline against a staged install (no running systemd needed).

A temporary root gets the host's own unit files (for sysinit.target, pcscd.socket, ...), then
``make install-units DESTDIR=root`` (units, sysusers, tmpfiles, default config; no venv), stub
executables where ExecStart= points (``systemd-analyze verify`` checks that they exist and are
executable inside the root), and the host's ``kill`` for ExecReload=. Then:

- ``systemd-analyze verify --root=ROOT --man=no --generators=no UNIT...`` must pass (it fails on an
  unknown key, a bad value or a missing executable);
- ``systemd-analyze security --offline=true --root=ROOT UNIT`` rates each unit; sscardd.service
  (also with the serial-reader drop-in) must not be rated above 2.5, nor the lab units;
- ``systemd-sysusers --root`` and ``systemd-tmpfiles --root`` apply the sysusers and tmpfiles files.

Skipped, with the reason, where systemd-analyze (Debian package ``systemd``) or make is missing.
``SSCARD_SLOW=1`` also builds the real venv with ``make install DESTDIR=...``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PREFIX = "/opt/sscardd"
UNITDIR = "usr/lib/systemd/system"
MAX_EXPOSURE = 2.5
# The units and the instance the template is checked as.
UNITS = ("sscardd.service", "sscard-backend.service", "sscard-emu@card1.service")
EXECUTABLES = ("sscardd", "sscard-emu", "sscard-backend")

ANALYZE = shutil.which("systemd-analyze")
MAKE = shutil.which("make")

pytestmark = [
    pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is missing (Debian package systemd)"),
    pytest.mark.skipif(MAKE is None, reason="make is missing"),
]


@dataclass
class Root:
    path: Path

    @property
    def units(self) -> Path:
        return self.path / UNITDIR


def _host_unit_dir() -> Path:
    for d in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if d.is_dir():
            return d
    pytest.skip("no systemd unit directory on this host to stage sysinit.target & co. from")


def stage(root: Path, *, stubs: bool = True, prefix: str = PREFIX) -> Root:
    """A merged-/usr root with the host's units, then ours (make install-units), and stubs."""
    shutil.copytree(_host_unit_dir(), root / UNITDIR, symlinks=True,
                    ignore=shutil.ignore_patterns("sscard*"))  # an installed copy of ours is not the tree's
    for link in ("bin", "lib", "sbin"):
        (root / link).symlink_to(f"usr/{link}")
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    kill = shutil.which("kill", path="/usr/bin:/bin")
    assert kill, "kill (procps) is missing"
    shutil.copy2(kill, root / "usr/bin/kill")
    subprocess.run([MAKE or "make", "-s", "-C", str(REPO), "install-units", f"DESTDIR={root}",
                    f"PREFIX={prefix}"], check=True, capture_output=True, text=True, timeout=60)
    if stubs:
        bindir = root / prefix.lstrip("/") / "bin"
        bindir.mkdir(parents=True, exist_ok=True)
        for name in EXECUTABLES:
            exe = bindir / name
            exe.write_text("#!/bin/sh\nexit 0\n")
            exe.chmod(0o755)
    return Root(root)


def verify(root: Root, *units: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ANALYZE or "systemd-analyze", "verify", f"--root={root.path}", "--man=no",
                           "--generators=no", "--recursive-errors=no", *units],
                          capture_output=True, text=True, timeout=60)


def security(root: Root, unit: str) -> tuple[float, dict[str, bool | None]]:
    """The overall exposure (0 safe .. 10 unsafe) and, per check, whether it is satisfied."""
    base = [ANALYZE or "systemd-analyze", "security", "--offline=true", f"--root={root.path}", "--no-pager"]
    r = subprocess.run([*base, unit], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    m = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+(?:\.\d+)?)", r.stdout)
    assert m, r.stdout
    r = subprocess.run([*base, "--json=short", unit], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    checks = {c["name"]: c["set"] for c in json.loads(r.stdout)}
    return float(m.group(1)), checks


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Root:
    return stage(tmp_path_factory.mktemp("root"))


@pytest.fixture(scope="module")
def serial_root(tmp_path_factory: pytest.TempPathFactory) -> Root:
    """The same with the serial-reader drop-in installed as the README says."""
    r = stage(tmp_path_factory.mktemp("serial-root"))
    dropin = r.path / "etc/systemd/system/sscardd.service.d"
    dropin.mkdir(parents=True)
    example = r.path / PREFIX.lstrip("/") / "share/sscardd/systemd/serial.conf.example"
    shutil.copy(example, dropin / "serial.conf")
    return r


def _our_complaints(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "sscard" in line]


def test_units_verify(root: Root) -> None:
    r = verify(root, *UNITS)
    assert r.returncode == 0 and not _our_complaints(r.stderr), r.stderr


def test_serial_dropin_verifies(serial_root: Root) -> None:
    r = verify(serial_root, "sscardd.service")
    assert r.returncode == 0 and not _our_complaints(r.stderr), r.stderr


def test_verify_checks_the_executables(tmp_path: Path) -> None:
    """Without the stubs verify fails: it really looks for ExecStart= inside the root."""
    r = verify(stage(tmp_path, stubs=False), "sscardd.service")
    assert r.returncode != 0 and f"{PREFIX}/bin/sscardd" in r.stderr, r.stderr


def test_verify_rejects_a_bad_key(tmp_path: Path) -> None:
    r0 = stage(tmp_path)
    unit = r0.units / "sscardd.service"
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nProtectSystem=bogus\n", 1))
    r = verify(r0, "sscardd.service")
    assert r.returncode != 0 and "bogus" in r.stderr, r.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_exposure(root: Root, unit: str) -> None:
    exposure, _checks = security(root, unit)
    sys.stderr.write(f"\n{unit}: exposure {exposure}\n")  # shown with pytest -s
    assert exposure <= MAX_EXPOSURE, f"{unit} is rated {exposure}, above {MAX_EXPOSURE}"


def test_exposure_with_serial_reader(serial_root: Root) -> None:
    exposure, checks = security(serial_root, "sscardd.service")
    assert exposure <= MAX_EXPOSURE
    assert checks["PrivateDevices="] is False  # the drop-in was applied


def test_daemon_hardening_choices(root: Root) -> None:
    _exposure, checks = security(root, "sscardd.service")
    must = ["NoNewPrivileges=", "ProtectSystem=", "ProtectHome=", "PrivateTmp=", "PrivateDevices=",
            "RestrictAddressFamilies=~AF_PACKET", "RestrictAddressFamilies=~AF_NETLINK",
            "RestrictAddressFamilies=~…", "SystemCallArchitectures=", "MemoryDenyWriteExecute=",
            "User=/DynamicUser=", "CapabilityBoundingSet=~CAP_SYS_ADMIN", "ProtectKernelTunables=",
            "RestrictNamespaces=~user", "SystemCallFilter=~@mount", "UMask="]
    assert [c for c in must if checks.get(c) is not True] == []
    # Peer credentials on the kiosk socket must be the host's real uids and gids.
    assert checks["PrivateUsers="] is False


def test_daemon_unit_settings(root: Root) -> None:
    text = (root.units / "sscardd.service").read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines()
                    if "=" in line and not line.startswith("#") and not line.startswith("SystemCallFilter"))
    assert settings["Type"] == "notify"
    assert settings["ExecStart"] == f"{PREFIX}/bin/sscardd run -c /etc/sscardd/sscardd.toml"
    assert settings["WatchdogSec"] == "30" and settings["Restart"] == "on-failure"
    assert settings["RuntimeDirectory"] == settings["StateDirectory"] == "sscardd"
    assert settings["User"] == "sscardd"
    # Stopping waits for the sales in flight: answer_timeout (15 s) + 5 s, then 5 s to disconnect.
    assert int(settings["TimeoutStopSec"]) > 15 + 5 + 5


def test_install_units_layout_and_prefix(tmp_path: Path) -> None:
    r = stage(tmp_path, prefix="/srv/sscardd")
    for unit in ("sscardd.service", "sscard-backend.service", "sscard-emu@.service"):
        text = (r.units / unit).read_text()
        assert "/opt/sscardd" not in text and "/srv/sscardd/bin/" in text
        assert (r.units / unit).stat().st_mode & 0o777 == 0o644
    assert (r.path / "usr/lib/sysusers.d/sscardd.conf").is_file()
    assert (r.path / "usr/lib/tmpfiles.d/sscardd.conf").is_file()
    conf = r.path / "etc/sscardd/sscardd.toml"
    assert conf.read_bytes() == (REPO / "config/sscardd.toml").read_bytes()
    assert conf.stat().st_mode & 0o777 == 0o640
    assert "/srv/sscardd" in (r.path / "srv/sscardd/share/sscardd/systemd/serial.conf.example").read_text()
    assert (r.path / "srv/sscardd/share/sscardd/test-root-keys.toml").is_file()


def test_install_keeps_an_existing_config(tmp_path: Path) -> None:
    conf = tmp_path / "etc/sscardd/sscardd.toml"
    conf.parent.mkdir(parents=True)
    conf.write_text("# the operator's\n")
    r = subprocess.run([MAKE or "make", "-s", "-C", str(REPO), "install-units", f"DESTDIR={tmp_path}"],
                       capture_output=True, text=True, timeout=60, check=True)
    assert conf.read_text() == "# the operator's\n" and "keeping" in r.stdout


def _sysusers(root: Path) -> None:
    subprocess.run(["systemd-sysusers", f"--root={root}"], check=True, capture_output=True, timeout=60)


def _table(path: Path) -> dict[str, list[str]]:
    """/etc/passwd or /etc/group by name."""
    return {line.split(":")[0]: line.split(":") for line in path.read_text().splitlines()}


@pytest.fixture
def accounts_root(tmp_path: Path) -> Iterator[Path]:
    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers is missing")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "etc/group").write_text("root:x:0:\ndialout:x:20:\n")
    subprocess.run(["make", "-s", "-C", str(REPO), "install-units", f"DESTDIR={tmp_path}"],
                   check=True, capture_output=True, timeout=60)
    yield tmp_path


def test_sysusers(accounts_root: Path) -> None:
    _sysusers(accounts_root)
    users, groups = _table(accounts_root / "etc/passwd"), _table(accounts_root / "etc/group")
    assert users["sscardd"][5] == "/var/lib/sscardd" and users["sscardd"][6] == "/usr/sbin/nologin"
    assert users["sscardd"][3] == groups["sscardd"][2]  # its own primary group
    assert groups["sscardd-kiosk"][3] == "sscardd"  # may give the kiosk socket that group
    assert "sscardd" not in groups["dialout"][3]  # serial ports only through the drop-in


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_tmpfiles_fix_the_config_owner(accounts_root: Path) -> None:
    _sysusers(accounts_root)
    conf = accounts_root / "etc/sscardd/sscardd.toml"
    conf.chmod(0o644)
    subprocess.run(["systemd-tmpfiles", f"--root={accounts_root}", "--create"], check=True,
                   capture_output=True, timeout=60)
    gid = int(_table(accounts_root / "etc/group")["sscardd"][2])
    st = conf.stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o640, 0, gid)


@pytest.mark.slow
def test_make_install_builds_a_venv_for_its_final_place(tmp_path: Path) -> None:
    """The real thing: the venv built under DESTDIR, its scripts pointing at PREFIX."""
    subprocess.run(["make", "-s", "-C", str(REPO), "install", f"DESTDIR={tmp_path}"], check=True,
                   capture_output=True, timeout=900)
    venv = tmp_path / PREFIX.lstrip("/")
    assert (venv / "bin/sscardd").read_text().splitlines()[0] == f"#!{PREFIX}/bin/python"
    assert f"{PREFIX}\n" in (venv / "pyvenv.cfg").read_text()
    leftovers = subprocess.run(["grep", "-rlIF", str(tmp_path), str(venv / "bin"), str(venv / "pyvenv.cfg")],
                               capture_output=True, text=True)
    assert leftovers.stdout == ""
    # The venv's interpreter finds its site-packages from where it lies: importable here already.
    r = subprocess.run([str(venv / "bin/python"), "-c", "import sscardd.notify, smartcard, serial, aiomqtt;"
                        "import importlib.util as u; print(u.find_spec('pytest'))"],
                       capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout.strip() == "None"  # no test tools in production
    assert os.readlink(tmp_path / "usr/local/bin/sscardd") == f"{PREFIX}/bin/sscardd"
