"""sscardd.broker and ``sscardd broker-provision``: the dynamic-security file, offline.

The file is checked against a real broker in ``tests/e2e/test_broker_acl.py``; here: the password
hash format (against a hash made by mosquitto's own ``mosquitto_ctrl``), the roles, input errors,
keeping and rotating passwords, and that no password reaches a log line or the file in clear.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from sscardd import broker
from sscardd.broker import BackendSpec, ProvisionError, TerminalSpec
from sscardd.cli import main

A, B = "370212000001", "370212000002"

# Made on this project's Debian 12 host with `mosquitto_ctrl dynsec init dynsec.json admin` (mosquitto
# 2.0.11), password "secretpw": the plugin's fields as it writes them.
MOSQUITTO_CTRL_VECTOR = {
    "password": "cZNi0FBEEI3FrO1qaRyb6Zd76qafLHnUXjOHFLpSL3rgsXyitCjLgz7VXhpNRpqLkwVzARhngKilNhipNfXplA==",
    "salt": "CAd6Fvx5QbKUFOJj",
    "iterations": 101,
}


def acls(role: dict[str, object]) -> set[tuple[str, str]]:
    return {(a["acltype"], a["topic"]) for a in role["acls"]}  # type: ignore[attr-defined]


# -- password hashes ------------------------------------------------------------------------------


def test_hash_matches_mosquitto_ctrl_vector() -> None:
    salt = base64.b64decode(MOSQUITTO_CTRL_VECTOR["salt"])  # type: ignore[arg-type]
    assert broker.hash_password("secretpw", salt=salt, iterations=101) == MOSQUITTO_CTRL_VECTOR
    assert broker.verify_password(MOSQUITTO_CTRL_VECTOR, "secretpw")
    assert not broker.verify_password(MOSQUITTO_CTRL_VECTOR, "secretpW")


@pytest.mark.skipif(shutil.which("mosquitto_ctrl") is None, reason="mosquitto_ctrl is not installed")
def test_hash_matches_a_fresh_mosquitto_ctrl_hash(tmp_path: Path) -> None:
    path = tmp_path / "dynsec.json"
    password = "Zhōng-文 pw 1"  # non-ASCII: both sides hash the UTF-8 bytes
    subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(path), "admin"],
                   input=f"{password}\n{password}\n", text=True, check=True, capture_output=True, timeout=30)
    entry = json.loads(path.read_text())["clients"][0]
    assert broker.verify_password(entry, password)
    salt = base64.b64decode(entry["salt"])
    assert len(salt) == broker.SALT_LEN
    ours = broker.hash_password(password, salt=salt, iterations=entry["iterations"])
    assert ours == {k: entry[k] for k in ("password", "salt", "iterations")}


def test_hash_shape() -> None:
    h = broker.hash_password("x" * 10)
    assert set(h) == {"password", "salt", "iterations"}
    assert len(base64.b64decode(h["password"])) == 64
    assert len(base64.b64decode(h["salt"])) == 12
    assert h["iterations"] == broker.DEFAULT_ITERATIONS
    assert broker.hash_password("x" * 10)["salt"] != h["salt"]  # a fresh salt each time


# -- roles ----------------------------------------------------------------------------------------


def test_daemon_role() -> None:
    t = f"sscard/v1/term/{A}"
    assert acls(broker.daemon_role(A)) == {
        ("publishClientSend", f"{t}/reply/#"),
        ("publishClientSend", f"{t}/status"),
        ("publishClientSend", f"{t}/events"),
        ("publishClientSend", f"sscard/v1/settle/req/{A}"),
        ("publishClientReceive", f"{t}/cmd"),
        ("publishClientReceive", f"{t}/settle/resp"),
        ("subscribeLiteral", f"{t}/cmd"),
        ("subscribeLiteral", f"{t}/settle/resp"),
        ("unsubscribeLiteral", f"{t}/cmd"),
        ("unsubscribeLiteral", f"{t}/settle/resp"),
    }


def test_pos_role() -> None:
    t = f"sscard/v1/term/{A}"
    assert acls(broker.pos_role(A)) == {
        ("publishClientSend", f"{t}/cmd"),
        ("publishClientReceive", f"{t}/reply/#"),
        ("publishClientReceive", f"{t}/status"),
        ("publishClientReceive", f"{t}/events"),
        ("subscribePattern", f"{t}/reply/#"),
        ("unsubscribePattern", f"{t}/reply/#"),
        ("subscribeLiteral", f"{t}/status"),
        ("unsubscribeLiteral", f"{t}/status"),
        ("subscribeLiteral", f"{t}/events"),
        ("unsubscribeLiteral", f"{t}/events"),
    }


def test_backend_role() -> None:
    assert acls(broker.backend_role()) == {
        ("publishClientSend", "sscard/v1/term/+/settle/resp"),
        ("publishClientReceive", "sscard/v1/settle/req/+"),
        ("subscribeLiteral", "$share/settle/sscard/v1/settle/req/+"),
        ("unsubscribeLiteral", "$share/settle/sscard/v1/settle/req/+"),
    }


def test_every_acl_allows_and_the_default_denies() -> None:
    result = broker.provision([TerminalSpec(A)], [BackendSpec("backend-1")])
    assert result.config["defaultACLAccess"] == {
        "publishClientSend": False, "publishClientReceive": False, "subscribe": False, "unsubscribe": False,
    }
    for role in result.config["roles"]:
        assert all(a["allow"] is True for a in role["acls"])


def test_provision_layout() -> None:
    result = broker.provision(
        [TerminalSpec(A, institution="P37021200001", daemon_password="daemon-pw-A"), TerminalSpec(B)],
        [BackendSpec("backend-1"), BackendSpec("backend-2", password="backend-pw-2")],
        iterations=5,
    )
    cfg = result.config
    assert [c["username"] for c in cfg["clients"]] == [
        f"term-{A}", f"pos-{A}", f"term-{B}", f"pos-{B}", "backend-1", "backend-2",
    ]
    role_names = {r["rolename"] for r in cfg["roles"]}
    for c in cfg["clients"]:
        assert [r["rolename"] for r in c["roles"]] != []
        assert {r["rolename"] for r in c["roles"]} <= role_names
        assert "clientid" not in c  # nothing pinned unless asked (the CLI shares the daemon's user)
        assert c["iterations"] == 5
    by_user = {c["username"]: c for c in cfg["clients"]}
    assert by_user[f"term-{A}"]["roles"] == [{"rolename": f"sscard-daemon-{A}"}]
    assert by_user[f"pos-{B}"]["roles"] == [{"rolename": f"sscard-pos-{B}"}]
    assert by_user["backend-2"]["roles"] == [{"rolename": "sscard-backend"}]
    assert "P37021200001" in by_user[f"term-{A}"]["textdescription"]
    # Supplied passwords are used and not reported as generated; the others are generated.
    assert broker.verify_password(by_user[f"term-{A}"], "daemon-pw-A")
    assert broker.verify_password(by_user["backend-2"], "backend-pw-2")
    assert set(result.generated) == {f"pos-{A}", f"term-{B}", f"pos-{B}", "backend-1"}
    for user, pw in result.generated.items():
        assert len(pw) >= 32
        assert broker.verify_password(by_user[user], pw)
    assert len(set(result.generated.values())) == 4
    assert set(result.passwords) == set(by_user)
    # Roles precede clients in the file (the plugin resolves role names while loading clients).
    assert list(cfg).index("roles") < list(cfg).index("clients")


def test_pinned_client_ids() -> None:
    result = broker.provision([TerminalSpec(A, pos_client_id="pos-till-1")],
                              [BackendSpec("backend-1", client_id="backend-1")])
    by_user = {c["username"]: c for c in result.config["clients"]}
    assert by_user[f"pos-{A}"]["clientid"] == "pos-till-1"
    assert by_user["backend-1"]["clientid"] == "backend-1"
    assert "clientid" not in by_user[f"term-{A}"]


def test_reprovisioning_keeps_hashes_unless_rotated() -> None:
    first = broker.provision([TerminalSpec(A)], [BackendSpec("backend-1")])
    second = broker.provision([TerminalSpec(A), TerminalSpec(B, pos_password="new-pos-pw")],
                              [BackendSpec("backend-1")], existing=first.config)
    by_user = {c["username"]: c for c in second.config["clients"]}
    assert set(second.kept) == {f"term-{A}", f"pos-{A}", "backend-1"}
    assert set(second.generated) == {f"term-{B}"}
    for user, pw in first.generated.items():
        assert broker.verify_password(by_user[user], pw)
    assert broker.verify_password(by_user[f"pos-{B}"], "new-pos-pw")
    # A password given in the input replaces a kept one.
    third = broker.provision([TerminalSpec(A, daemon_password="changed-pw")], [BackendSpec("backend-1")],
                             existing=second.config)
    assert broker.verify_password(third.config["clients"][0], "changed-pw")
    rotated = broker.provision([TerminalSpec(A)], [BackendSpec("backend-1")], existing=first.config,
                               rotate=True)
    assert rotated.kept == []
    assert set(rotated.generated) == {f"term-{A}", f"pos-{A}", "backend-1"}


# -- input errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "fragment"), [
    ('[[terminal]]\nid = 370212000001\n', "12-digit"),
    ('[[terminal]]\nid = "37021200001"\n', "12-digit"),
    ('[[terminal]]\nid = "37021200000a"\n', "12-digit"),
    ('[[terminal]]\nid = "370212000001"\npasword = "x"\n', "unknown key"),
    ('[[terminal]]\nid = "370212000001"\ndaemon_password = ""\n', "non-empty"),
    ('[[terminal]]\nid = "370212000001"\n[[terminal]]\nid = "370212000001"\n', "twice"),
    ('[[terminal]]\nid = "370212000001"\npos_client_id = "a b"\n', "client id"),
    ('[[terminal]]\nid = "370212000001"\n[[backend]]\nname = "term-x"\n', "backend name"),
    ('[[terminal]]\nid = "370212000001"\n[[backend]]\nname = "a/b"\n', "backend name"),
    ('[[terminals]]\nid = "370212000001"\n', "top-level"),
    ('terminal = "x"\n', "arrays of tables"),
    ("", "no terminals"),
    ('[[terminal]\nid = "370212000001"\n', "not valid TOML"),
])
def test_bad_input_is_refused_with_a_reason(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "terminals.toml"
    path.write_text(text)
    with pytest.raises(ProvisionError, match=fragment):
        terminals, backends = broker.load_terminals_file(path)
        broker.provision(terminals, backends or [BackendSpec("backend-1")])


def test_a_refused_password_is_not_echoed(tmp_path: Path) -> None:
    path = tmp_path / "terminals.toml"
    path.write_text('[[terminal]]\nid = "370212000001"\ndaemon_password = "bad\\u0000secret"\n')
    with pytest.raises(ProvisionError) as info:
        broker.load_terminals_file(path)
    assert "secret" not in str(info.value)


# -- the CLI --------------------------------------------------------------------------------------

TERMINALS = f'''
[[terminal]]
id = "{A}"
institution = "P37021200001"
daemon_password = "supplied-daemon-pw-A"

[[terminal]]
id = "{B}"
'''


def generated_lines(out: str) -> dict[str, str]:
    rows = [line.split("\t") for line in out.splitlines() if line and not line.startswith("#")]
    return {user: pw for user, pw in rows}


def test_cli_writes_the_file_and_prints_generated_passwords_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    terminals = tmp_path / "terminals.toml"
    terminals.write_text(TERMINALS)
    out = tmp_path / "dynsec.json"
    assert main(["-vv", "--log-json", "broker-provision", "--terminals", str(terminals), "--out", str(out),
                 "--backends", "2"]) == 0
    captured = capsys.readouterr()
    printed = generated_lines(captured.out)
    assert set(printed) == {f"pos-{A}", f"term-{B}", f"pos-{B}", "backend-1", "backend-2"}
    text = out.read_text()
    cfg = json.loads(text)
    by_user = {c["username"]: c for c in cfg["clients"]}
    for user, pw in printed.items():
        assert broker.verify_password(by_user[user], pw)
        assert pw not in text and pw not in captured.err
    assert broker.verify_password(by_user[f"term-{A}"], "supplied-daemon-pw-A")
    assert "supplied-daemon-pw-A" not in text + captured.out + captured.err
    assert out.stat().st_mode & 0o777 == 0o600
    # Again, with one more backend: nothing is printed for the clients already there.
    assert main(["broker-provision", "--terminals", str(terminals), "--out", str(out),
                 "--backend", "backend-1", "--backend", "backend-2", "--backend", "backend-3"]) == 0
    again = capsys.readouterr()
    assert set(generated_lines(again.out)) == {"backend-3"}
    by_user = {c["username"]: c for c in json.loads(out.read_text())["clients"]}
    for user, pw in printed.items():
        assert broker.verify_password(by_user[user], pw)
    # --rotate: every client without a password in the file gets a new one.
    assert main(["broker-provision", "--terminals", str(terminals), "--out", str(out), "--rotate"]) == 0
    rotated = generated_lines(capsys.readouterr().out)
    assert set(rotated) == {f"pos-{A}", f"term-{B}", f"pos-{B}", "backend-1"}
    assert not set(rotated.values()) & set(printed.values())


def test_cli_keeps_mode_of_a_replaced_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    terminals = tmp_path / "terminals.toml"
    terminals.write_text(TERMINALS)
    out = tmp_path / "dynsec.json"
    out.write_text("{}")
    out.chmod(0o640)
    assert main(["broker-provision", "--terminals", str(terminals), "--out", str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o640
    assert {c["username"] for c in json.loads(out.read_text())["clients"]} >= {"backend-1"}
    assert not list(tmp_path.glob(".dynsec.json.*"))


def test_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    terminals = tmp_path / "terminals.toml"
    terminals.write_text('[[terminal]]\nid = "12"\n')
    out = tmp_path / "dynsec.json"
    assert main(["broker-provision", "--terminals", str(terminals), "--out", str(out)]) == 2
    assert "12-digit" in capsys.readouterr().err
    assert not out.exists()
    assert main(["broker-provision", "--terminals", str(tmp_path / "missing.toml"), "--out", str(out)]) == 2
    terminals.write_text(TERMINALS)
    assert main(["broker-provision", "--terminals", str(terminals), "--out", str(out),
                 "--backends", "0"]) == 2
    assert not out.exists()
