"""sscardd.config: the shipped file, every class of error naming its key, secrets kept out of error
texts and reprs, the PIN rule per institution type and region, SIGHUP reloads, and random TOML
documents that never raise anything but ConfigError."""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sscardd import config
from sscardd.config import ConfigError, Secret
from sscardd.session import PinPolicy

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "config" / "sscardd.toml"
PASSWORD = "s3cret-Pässwörd-xyzzy"
KEY_HEX = "00112233445566778899aabbccddeeff"

MINIMAL = """\
[terminal]
id = "370212000001"
[institution]
code = "P37021200001"
name = "崂山康泰大药房"
type = "pharmacy"
region = "370212"
"""


def with_(extra: str, base: str = MINIMAL) -> str:
    return base + "\n" + extra + "\n"


def error(text: str, tmp_path: Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        config.parse(text, "test.toml", base_dir=tmp_path)
    return exc.value


# -- the shipped file -------------------------------------------------------------------------------


def test_the_shipped_config_loads() -> None:
    cfg = config.load(SHIPPED)
    assert cfg.source == str(SHIPPED)
    assert (cfg.terminal.id, cfg.institution.code, cfg.institution.type) == ("370212000001", "P37021200001",
                                                                              "pharmacy")
    assert cfg.mqtt.client_id == "370212000001" and cfg.mqtt.username == "term-370212000001"
    assert cfg.mqtt.port == 8883 and cfg.mqtt.tls.enabled and not cfg.mqtt.tls.insecure
    assert cfg.mqtt.message_expiry < cfg.mqtt.answer_timeout
    assert not cfg.pin.allow_clear_over_mqtt and cfg.pin.pin_block_key is None
    assert cfg.journal.sync == "full" and cfg.kiosk.mode == 0o660 and cfg.metrics.bind == "127.0.0.1"
    assert cfg.requires_pin()


def test_the_shipped_config_states_the_defaults() -> None:
    """Everything the shipped file sets is the default: a minimal file means the same."""
    shipped, minimal = config.load(SHIPPED), config.parse(MINIMAL)
    assert config.changed_keys(shipped, minimal) == []


def test_the_shipped_config_documents_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    declared: list[tuple[str, frozenset[str]]] = []
    original = config._Table.__init__

    def spy(self: config._Table, data: Any, path: str, keys: str, base_dir: Path) -> None:
        original(self, data, path, keys, base_dir)
        declared.append((re.sub(r"\[\d+\]", "", path), self.keys))

    monkeypatch.setattr(config._Table, "__init__", spy)
    # region_override is commented out in the shipped file: load one so its keys are declared too
    config.parse(with_('[[pin.region_override]]\nregion = "3702"\nrequire_pin = { hospital = true }'))
    text = SHIPPED.read_text()
    missing = []
    for path, keys in declared:
        for k in keys:
            full = f"{path}.{k}" if path else k
            if not (re.search(rf"^#?\s*{re.escape(k)}\s*=", text, re.M)
                    or re.search(rf"^#?\s*\[\[?{re.escape(full)}\]\]?", text, re.M)):
                missing.append(full)
    assert missing == []


def test_minimal_config_and_its_defaults() -> None:
    cfg = config.parse(MINIMAL)
    assert cfg.readers.card is None and cfg.readers.psam is None and cfg.readers.monitor
    assert cfg.pin.initial_pins == frozenset({"123456"}) and (cfg.pin.min_len, cfg.pin.max_len) == (4, 12)
    assert cfg.mqtt.host == "localhost" and cfg.mqtt.password is None
    assert cfg.regions.coordinating_prefix_len == 4
    assert cfg.logging.json is None and cfg.logging.level == "INFO"
    assert cfg.journal.path == Path("/var/lib/sscardd/journal.sqlite3")
    assert config.parse(with_("[mqtt.tls]\nenabled = false")).mqtt.port == 1883


# -- errors name the key ------------------------------------------------------------------------------

CASES: list[tuple[str, str, str]] = [
    # (added TOML, key, reason pattern)
    ("[mqtt]\nport = \"1883\"", "mqtt.port", "expected an integer, got a string '1883'"),
    ("[mqtt]\nport = 70000", "mqtt.port", "must be from 1 to 65535, got 70000"),
    ("[mqtt]\nport = true", "mqtt.port", "expected an integer, got a boolean"),
    ("[mqtt]\npasword = \"x\"", "mqtt.pasword", r"unknown key \(did you mean 'password'\?\)"),
    ("[mqqt]\nhost = \"x\"", "mqqt", "unknown key"),
    ("[pin.require_pin]\npharmcy = true", "pin.require_pin.pharmcy", "unknown key"),
    ("[pin.require_pin]\npharmacy = \"yes\"", "pin.require_pin.pharmacy", "expected a boolean"),
    ("[mqtt]\nmessage_expiry = 15\nanswer_timeout = 15", "mqtt.message_expiry",
     r"shorter than mqtt.answer_timeout \(15 s\)"),
    ("[mqtt]\nanswer_timeout = nan", "mqtt.answer_timeout", "must be from 1 to 600 s"),
    ("[mqtt]\nreconnect_backoff_min = 5\nreconnect_backoff_max = 1", "mqtt.reconnect_backoff_max", "below"),
    ("[mqtt]\nclient_id = \"has space\"", "mqtt.client_id", "letters, digits"),
    ("[mqtt.tls]\ncert = \"/etc/hostname\"", "mqtt.tls.key", "needs both cert and key"),
    ("[mqtt.tls]\nca = \"/nonexistent/ca.crt\"", "mqtt.tls.ca", "cannot use /nonexistent/ca.crt"),
    ("[reversal]\nbackoff_min = 10\nbackoff_max = 1", "reversal.backoff_max", "below reversal.backoff_min"),
    ("[journal]\nsync = \"normal\"", "journal.sync", "must be one of full, extra"),
    ("[pin]\nmin_len = 8\nmax_len = 6", "pin.max_len", r"below pin.min_len \(8\)"),
    ("[pin]\nmin_len = 3", "pin.min_len", "from 4 to 12"),
    ("[pin]\ninitial_pins = [123456]", "pin.initial_pins[0]", "quoted string of digits"),
    ("[pin]\ninitial_pins = [\"000000\", \"12a4\"]", "pin.initial_pins[1]", "must be 4 to 12 digits"),
    ("[[pin.region_override]]\nregion = \"3702\"\nrequire_pin = {hospital = true}\n"
     "[[pin.region_override]]\nregion = \"3702\"\nrequire_pin = {clinic = true}",
     "pin.region_override[1].region", "two overrides"),
    ("[[pin.region_override]]\nregion = \"37x2\"\nrequire_pin = {hospital = true}",
     "pin.region_override[0].region", "2 to 6 digits"),
    ("[[pin.region_override]]\nregion = \"3702\"\nrequire_pin = {}", "pin.region_override[0].require_pin",
     "names no institution type"),
    ("[[pin.region_override]]\nregion = \"3702\"", "pin.region_override[0].require_pin", "missing"),
    ("[readers]\ncard = \"serial:ttyUSB0\"", "readers.card", "absolute device path"),
    ("[readers]\ncard = \"Reader|1\"", "readers.card", "control characters or any of"),
    ("[readers]\ncard = \"R 1\"\npsam = \"R 1\"", "readers.psam", "must not be the card reader"),
    ("[kiosk]\nmode = 0o666", "kiosk.mode", "must not be writable by others"),
    ("[kiosk]\nmode = \"0999\"", "kiosk.mode", "expected an octal mode"),
    ("[kiosk]\nsocket = \"/" + "x" * 120 + "\"", "kiosk.socket", "at most 107 bytes"),
    ("[kiosk]\nallowed_uids = [\"no-such-user-xyz\"]", "kiosk.allowed_uids[0]", "no such user"),
    ("[kiosk]\noperator_gids = [-1]", "kiosk.operator_gids[0]", "a group id is from 0"),
    ("[kiosk]\nallowed_uids = [1.5]", "kiosk.allowed_uids[0]", "expected a user id or name"),
    ("[kiosk.limits]\nmax_line_bytes = 10", "kiosk.limits.max_line_bytes", "from 256"),
    ("[logging]\nlevel = \"verbose\"", "logging.level", "must be one of DEBUG"),
    ("[logging]\njson = 1", "logging.json", "true, false or \"auto\""),
    ("[metrics]\nbind = \"0.0.0.0\"", "metrics.bind", "loopback"),
    ("[regions]\ncoordinating_prefix_len = 7", "regions.coordinating_prefix_len", "from 2 to 6"),
    ("[journal]\npath = 5", "journal.path", "expected a string"),
    ("terminal = 5", "terminal", "unknown key|expected a table"),
]


@pytest.mark.parametrize(("extra", "key", "reason"), CASES, ids=[c[1] + ":" + c[2][:20] for c in CASES])
def test_each_error_names_its_key(extra: str, key: str, reason: str) -> None:
    text = MINIMAL + "\n" + extra + "\n" if not extra.startswith("terminal =") else extra
    err = error(text)
    assert err.key == key, str(err)
    assert re.search(reason, err.reason), err.reason
    assert str(err) == f"test.toml: {key}: {err.reason}"


@pytest.mark.parametrize(("drop", "key"), [
    ('id = "370212000001"\n', "terminal.id"),
    ('type = "pharmacy"\n', "institution.type"),
    ('[institution]\ncode = "P37021200001"\nname = "崂山康泰大药房"\ntype = "pharmacy"\nregion = "370212"\n',
     "institution"),
])
def test_missing_required_keys(drop: str, key: str) -> None:
    err = error(MINIMAL.replace(drop, ""))
    assert (err.key, err.reason) == (key, "missing (required)")


def test_a_typo_is_reported_before_the_missing_key_it_causes() -> None:
    err = error(MINIMAL.replace('id = "', 'idd = "'))
    assert err.key == "terminal.idd" and "did you mean 'id'" in err.reason


@pytest.mark.parametrize(("value", "reason"), [
    ('"12345"', "12-digit terminal number"), ('"37021200000X"', "12-digit"), ("370212000001", "a string"),
    ('"３７０２１２０００００１"', "12-digit"),  # full-width digits are not ASCII digits
])
def test_terminal_id(value: str, reason: str) -> None:
    err = error(MINIMAL.replace('"370212000001"', value))
    assert err.key == "terminal.id" and reason in err.reason


def test_invalid_toml_names_the_line() -> None:
    err = error(MINIMAL + "[mqtt]\nport = = 1\n")
    assert err.key == "" and re.search(r"invalid TOML at line 9, column \d+", err.reason), err.reason
    assert str(err).startswith("test.toml: invalid TOML at line 9")


def test_invalid_toml_does_not_echo_a_password_character() -> None:
    err = error(MINIMAL + '[mqtt]\npassword = "ab\x01cd"\n')
    assert "invalid TOML at line 9" in err.reason and "\\x01" not in str(err) and "\x01" not in str(err)


def test_deep_nesting_is_a_config_error() -> None:
    for text in ("a = " + "[" * 100_000, "a = " + "{a = " * 50_000):
        assert "nested too deeply" in error(text).reason


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file: No such file"):
        config.load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="cannot read the file"):
        config.load(tmp_path)
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(MINIMAL.replace("崂山康泰大药房", "caf").encode() + b'\n# caf\xe9\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(bad)
    if os.geteuid() != 0:  # root reads anything
        private = tmp_path / "private.toml"
        private.write_text(MINIMAL)
        private.chmod(0)
        with pytest.raises(ConfigError, match="Permission denied"):
            config.load(private)


# -- secrets --------------------------------------------------------------------------------------------


def secret_file(tmp_path: Path, name: str, content: str | bytes, mode: int = 0o600) -> Path:
    p = tmp_path / name
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    p.chmod(mode)
    return p


def test_password_never_in_repr_or_errors(tmp_path: Path) -> None:
    text = with_(f'[mqtt]\npassword = "{PASSWORD}"')
    cfg = config.parse(text)
    assert isinstance(cfg.mqtt.password, Secret) and cfg.mqtt.password.value == PASSWORD
    for shown in (repr(cfg), str(cfg), repr(cfg.mqtt), str(cfg.mqtt.password), f"{cfg.mqtt.password}"):
        assert PASSWORD not in shown
    # errors next to it, about it, or with it in the wrong place
    for bad in (text.replace("[mqtt]", "[mqtt]\nport = 0"),
                with_(f"[mqtt]\npassword = {json.dumps(PASSWORD * 100)}"),
                with_(f"[mqtt.tls]\npassword = {json.dumps(PASSWORD)}"),
                with_(f"[mqtt]\npassword = [{json.dumps(PASSWORD)}]"),
                text + f'\n[mqtt]\npassword = "{PASSWORD}"\n',
                with_(f'[mqtt]\npassword = "{PASSWORD}"\npassword_file = "pw"')):
        assert PASSWORD not in str(error(bad, tmp_path))


def test_password_file(tmp_path: Path) -> None:
    pw = secret_file(tmp_path, "pw", PASSWORD + "\n")
    cfg = config.parse(with_('[mqtt]\npassword_file = "pw"'), base_dir=tmp_path)
    assert cfg.mqtt.password == Secret(PASSWORD) and cfg.mqtt.password_file == pw
    assert PASSWORD not in repr(cfg)
    pw.chmod(0o644)
    err = error(with_('[mqtt]\npassword_file = "pw"'), tmp_path)
    assert err.key == "mqtt.password_file" and "readable by others" in err.reason
    secret_file(tmp_path, "empty", "\n")
    assert "is empty" in error(with_('[mqtt]\npassword_file = "empty"'), tmp_path).reason
    (tmp_path / "dir").mkdir()
    assert "not a regular file" in error(with_('[mqtt]\npassword_file = "dir"'), tmp_path).reason


def test_pin_block_key_file(tmp_path: Path) -> None:
    secret_file(tmp_path, "pin.key", KEY_HEX + "\n")
    cfg = config.parse(with_('[pin]\npin_block_key_file = "pin.key"'), base_dir=tmp_path)
    assert cfg.pin.pin_block_key == Secret(bytes.fromhex(KEY_HEX))
    assert cfg.pin.pin_block_key_file == tmp_path / "pin.key"
    assert KEY_HEX not in repr(cfg) and bytes.fromhex(KEY_HEX).hex() not in repr(cfg)
    for content in (KEY_HEX[:-2], KEY_HEX + "zz", "not hex at all " + KEY_HEX, b"\xff" * 16):
        secret_file(tmp_path, "bad.key", content)
        err = error(with_('[pin]\npin_block_key_file = "bad.key"'), tmp_path)
        assert err.key == "pin.pin_block_key_file"
        assert KEY_HEX[:16] not in str(err) and "hex" in err.reason
    secret_file(tmp_path, "open.key", KEY_HEX, mode=0o604)
    assert "readable by others" in error(with_('[pin]\npin_block_key_file = "open.key"'), tmp_path).reason
    err = error(with_('[pin]\npin_block_key_file = "nope.key"'), tmp_path)
    assert err.key == "pin.pin_block_key_file" and "No such file" in err.reason


# -- meaning ----------------------------------------------------------------------------------------------


def test_pin_policy_and_requires_pin() -> None:
    cfg = config.parse(with_("""
[pin]
initial_pins = ["123456", "000000"]
min_len = 6
max_len = 8
[pin.require_pin]
clinic = false
[[pin.region_override]]
region = "37"
require_pin = { hospital = true }
[[pin.region_override]]
region = "3702"
require_pin = { hospital = false, clinic = true }
"""))
    policy = cfg.pin.policy()
    assert isinstance(policy, PinPolicy)
    assert policy == PinPolicy(initial_pins=frozenset({"123456", "000000"}), min_len=6, max_len=8)
    rp = cfg.pin.requires_pin
    assert rp("pharmacy", "370212") and rp("pharmacy", "110101")  # the default for pharmacies
    assert not rp("clinic", "110101") and rp("clinic", "370212")  # 3702 overrides clinic
    assert rp("hospital", "370502") and not rp("hospital", "370212")  # 37 vs the longer 3702
    assert not rp("hospital", "110101")
    with pytest.raises(ValueError):
        rp("shop", "370212")


def test_regions_compare_at_the_coordinating_area() -> None:
    r = config.parse(MINIMAL).regions
    assert r.same_area("370212", "370202") and not r.same_area("370212", "370502")
    r6 = config.parse(with_("[regions]\ncoordinating_prefix_len = 6")).regions
    assert not r6.same_area("370212", "370202")


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "sscardd.toml"
    f.write_text(with_('[journal]\npath = "state/j.sqlite3"\n[readers]\ncard = "emulated:card.json"\n'
                       '[kiosk]\nsocket = "run/k.sock"\nmode = "0640"'))
    cfg = config.load(f)
    assert cfg.journal.path == tmp_path / "sub" / "state" / "j.sqlite3"
    assert cfg.readers.card == f"emulated:{tmp_path / 'sub' / 'card.json'}"
    assert cfg.kiosk.socket == tmp_path / "sub" / "run" / "k.sock" and cfg.kiosk.mode == 0o640


def test_ids_by_number_or_name() -> None:
    cfg = config.parse(with_('[kiosk]\nallowed_uids = [0, "root", 1000]\noperator_gids = ["root"]\n'
                             'group = 0'))
    assert cfg.kiosk.allowed_uids == frozenset({0, 1000}) and cfg.kiosk.operator_gids == frozenset({0})
    assert cfg.kiosk.group == 0


def test_logging_json_values() -> None:
    assert config.parse(with_("[logging]\njson = true\nlevel = \"debug\"")).logging == config.LoggingConfig(
        "DEBUG", True)
    assert config.parse(with_("[logging]\njson = false")).logging.json is False
    assert config.parse(with_("[logging]\njson = \"auto\"")).logging.json is None


def test_reload_applies_what_it_can(tmp_path: Path) -> None:
    f = tmp_path / "sscardd.toml"
    f.write_text(MINIMAL)
    old = config.load(f)
    f.write_text(with_('[logging]\nlevel = "DEBUG"\n[pin]\ninitial_pins = ["111111"]\n'
                       '[kiosk]\nallowed_uids = [1000]\nsocket = "/tmp/other.sock"\n[mqtt]\nhost = "broker"'))
    new, pending = config.reload(old)
    assert new.logging.level == "DEBUG" and new.pin.initial_pins == frozenset({"111111"})
    assert new.kiosk.allowed_uids == frozenset({1000})
    assert new.mqtt.host == "localhost" and new.kiosk.socket == old.kiosk.socket  # kept: need a restart
    assert pending == ["kiosk.socket", "mqtt.host"]
    f.write_text(MINIMAL + "[mqtt]\nport = -1\n")
    with pytest.raises(ConfigError, match=r"mqtt\.port"):
        config.reload(new)


# -- random documents ---------------------------------------------------------------------------------------


def _toml_str(k: str) -> str:
    # JSON escapes control characters the way TOML does; astral characters stay literal (JSON's
    # surrogate-pair escapes are not TOML), and DEL needs its own escape.
    return json.dumps(k, ensure_ascii=False).replace("\x7f", "\\u007f")


_toml_key = _toml_str


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, datetime | date):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def dumps(doc: dict[str, Any]) -> str:
    """A small TOML writer: top-level tables as [sections], everything below them inline."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"[{_toml_key(k)}]")
            lines += [f"{_toml_key(kk)} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


SHIPPED_DOC = tomllib.loads(SHIPPED.read_text())
KEY_WORDS = sorted({"password", "password_file", "pin_block_key_file", "ca", "cert", "key", "group",
                    "username", "client_id", "region_override", "require_pin", "region", "tls", "limits",
                    "allowed_uids", "mode", "socket", "initial_pins", "json", "bind", "x"}
                   | {k for sec in SHIPPED_DOC.values() for k in sec} | set(SHIPPED_DOC))
plausible = (st.integers(-1, 70000) | st.floats(-1, 1000) | st.booleans() | st.sampled_from(
    ["", "0660", "root", "370212000001", "P37021200001", "370212", "3702", "pharmacy", "full", "DEBUG",
     "localhost", "/dev/null", "/tmp", "serial:/dev/ttyS0", "emulated:x.json", "auto", "::1"])
             | st.lists(st.sampled_from(["123456", "root", 0, 1000, "x"]), max_size=3))
scalars = (st.text(max_size=30)
           | st.sampled_from(["", "0660", "0o660", "root", "/", ".", "370212000001", "serial:/dev/null",
                              "emulated:", "auto", "3702", PASSWORD])
           | st.integers(-2**63, 2**63 - 1) | st.integers(-5, 70000) | st.floats() | st.booleans()
           | st.datetimes() | st.dates())
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(KEY_WORDS) | st.text(max_size=5), inner, max_size=3),
                      max_leaves=8)


@st.composite
def mutated_documents(draw: st.DrawFn) -> dict[str, Any]:
    doc = json.loads(json.dumps(SHIPPED_DOC))
    doc["mqtt"]["password"] = PASSWORD
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from([*sorted(doc), "extra"]))
        table = doc.setdefault(section, {})
        if not isinstance(table, dict):
            doc[section] = draw(values)
            continue
        # mostly the section's own keys with plausible values: the validation behind the key check
        own = sorted(table) or KEY_WORDS
        key = draw(st.sampled_from(own) if draw(st.integers(0, 3)) else st.sampled_from(KEY_WORDS))
        action = draw(st.sampled_from(["delete", "plausible", "plausible", "any"]))
        if action == "delete" and key in table:
            del table[key]
        else:
            table[key] = draw(plausible if action == "plausible" else values)
    return doc  # type: ignore[no-any-return]


def _only_config_errors(text: str, tmp_path: Path) -> None:
    try:
        cfg = config.parse(text, "random.toml", base_dir=tmp_path)
    except ConfigError as exc:
        assert PASSWORD not in str(exc) and PASSWORD not in repr(exc)
    else:
        assert PASSWORD not in repr(cfg)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=mutated_documents())
def test_random_mutations_raise_only_config_errors(doc: dict[str, Any], tmp_path: Path) -> None:
    _only_config_errors(dumps(doc), tmp_path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(st.sampled_from(KEY_WORDS) | st.text(max_size=8), values, max_size=6))
def test_random_documents_raise_only_config_errors(doc: dict[str, Any], tmp_path: Path) -> None:
    _only_config_errors(dumps(doc), tmp_path)


BREAKERS = ["[[[", "= =", "\\", '"', "[a]\n[a]", "[" * 2000]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200) | st.builds(lambda a, b: MINIMAL + a + b, st.text(max_size=40),
                                                st.sampled_from(BREAKERS)))
def test_random_text_raises_only_config_errors(text: str, tmp_path: Path) -> None:
    _only_config_errors(text, tmp_path)
