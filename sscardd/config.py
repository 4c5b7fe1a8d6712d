"""The daemon's configuration: one TOML file (``config/sscardd.toml`` documents every key), loaded
into frozen dataclasses and checked in full before anything starts.

A bad file fails with :class:`ConfigError`, which names the key path (``mqtt.port``,
``pin.region_override[1].region``) and the reason: wrong type, out of range, unknown key (typos
are errors: a misspelt ``require_pin`` must not silently fall back to a default), missing required
key, unreadable file, or invalid TOML with its line and column. Secrets — the MQTT password, the
contents of the password file and of the PIN-block key file — never appear in an error text or a
``repr``: they are held in :class:`Secret`.

Relative paths are resolved against the directory of the config file (``load``) or ``base_dir``
(``parse``), so a config and its key files can move together.

The SIGHUP rules (issue 5): :func:`restart_needed` lists the changed keys that a reload cannot
apply (the daemon keeps running with the old values of those and says so); everything else — log
level, PIN policy, allow-lists, limits, backoffs — is taken over.
"""

from __future__ import annotations

import dataclasses
import difflib
import grp
import ipaddress
import math
import os
import pwd
import re
import stat
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar

from sscardd.session import PinPolicy

INSTITUTION_TYPES: Final = ("pharmacy", "clinic", "hospital")
InstitutionType = Literal["pharmacy", "clinic", "hospital"]
# The national default: the PIN is verified on the chip at designated pharmacies and clinics, not
# at designated hospitals (architecture.md).
DEFAULT_REQUIRE_PIN: Final[Mapping[str, bool]] = MappingProxyType(
    {"pharmacy": True, "clinic": True, "hospital": False})
# ISO 9564-1 format 4 carries 4..12 digits; the reader interface's PIN_LENGTH (−33) uses the same.
PIN_LEN_MIN, PIN_LEN_MAX = 4, 12
MAX_CONFIG_BYTES = 1 << 20
MAX_SECRET_FILE_BYTES = 4096
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_UNIX_PATH_BYTES = 107
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_DIGITS12 = re.compile(r"[0-9]{12}")
_DIGITS6 = re.compile(r"[0-9]{6}")
_REGION_PREFIX = re.compile(r"[0-9]{2,6}")
_INST_CODE = re.compile(r"[A-Za-z0-9]{12}")
_CLIENT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_USERNAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_HOST = re.compile(r"[A-Za-z0-9.:_-]{1,253}")
_ACCOUNT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
# Characters a reader name, device number or institution name may not carry: control characters,
# and the field separators of the compat strings (``|``, ``$``, ``^``).
_FORBIDDEN_CHARS = frozenset("|$^") | frozenset(chr(c) for c in range(0x20)) | {"\x7f"}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_OCTAL = re.compile(r"0?o?[0-7]{1,4}")


class ConfigError(Exception):
    """A configuration that cannot be used. ``key`` is the dotted key path ("" for the whole file)."""

    def __init__(self, key: str, reason: str, source: str = "") -> None:
        self.key = key
        self.reason = reason
        self.source = source
        where = ": ".join(p for p in (source, key) if p)
        super().__init__(f"{where}: {reason}" if where else reason)

    def with_source(self, source: str) -> ConfigError:
        return ConfigError(self.key, self.reason, source)


@dataclass(frozen=True, eq=True)
class Secret:
    """A secret value (password, key). Its ``repr`` and ``str`` never show it; use ``.value``."""

    value: str | bytes = field(repr=False)

    def __repr__(self) -> str:
        return "Secret(***)"

    def __str__(self) -> str:
        return "***"


# --- the sections ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TerminalConfig:
    """``[terminal]``: which terminal this daemon is (checked against the PSAM's file 0016)."""

    id: str
    device_no: str = ""


@dataclass(frozen=True)
class InstitutionConfig:
    """``[institution]``: the designated institution this terminal belongs to."""

    code: str
    name: str
    type: InstitutionType
    region: str


@dataclass(frozen=True)
class RegionsConfig:
    """``[regions]``: how region codes compare."""

    coordinating_prefix_len: int = 4

    def same_area(self, a: str, b: str) -> bool:
        """Whether two region codes lie in the same coordinating area (统筹区)."""
        n = self.coordinating_prefix_len
        return len(a) >= n and len(b) >= n and a[:n] == b[:n]


@dataclass(frozen=True)
class ReadersConfig:
    """``[readers]``: ``None`` means "found automatically"."""

    card: str | None = None
    psam: str | None = None
    monitor: bool = True


@dataclass(frozen=True)
class RegionPinOverride:
    """``[[pin.region_override]]``: a region's own PIN rule for some institution types."""

    region: str  # a region code or prefix, 2..6 digits; the longest matching one wins
    require_pin: Mapping[str, bool]


@dataclass(frozen=True)
class PinConfig:
    """``[pin]``: PIN rules, the PIN-block key and when a PIN is required."""

    initial_pins: frozenset[str] = frozenset({"123456"})
    min_len: int = PIN_LEN_MIN
    max_len: int = PIN_LEN_MAX
    require_pin: Mapping[str, bool] = field(default_factory=lambda: DEFAULT_REQUIRE_PIN)
    region_overrides: tuple[RegionPinOverride, ...] = ()
    allow_clear_over_mqtt: bool = False
    pin_block_key_file: Path | None = None
    pin_block_key: Secret | None = None  # the AES key (16, 24 or 32 bytes) read from that file

    def policy(self) -> PinPolicy:
        """The :class:`sscardd.session.PinPolicy` the card session enforces."""
        return PinPolicy(initial_pins=self.initial_pins, min_len=self.min_len, max_len=self.max_len)

    def requires_pin(self, inst_type: str, region: str) -> bool:
        """Whether a sale at an institution of ``inst_type`` in ``region`` needs the cardholder PIN
        verified on the chip: the longest region override naming that type, else the type's rule."""
        if inst_type not in INSTITUTION_TYPES:
            raise ValueError(f"unknown institution type {inst_type!r}")
        best: RegionPinOverride | None = None
        for o in self.region_overrides:
            if inst_type in o.require_pin and region.startswith(o.region) \
                    and (best is None or len(o.region) > len(best.region)):
                best = o
        return best.require_pin[inst_type] if best is not None else self.require_pin[inst_type]


@dataclass(frozen=True)
class TlsConfig:
    """``[mqtt.tls]``."""

    enabled: bool = True
    ca: Path | None = None  # None: the system's trust store
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False  # skip the host-name check (tests only)


@dataclass(frozen=True)
class MqttConfig:
    """``[mqtt]``: the broker connection (both the POS side and the backend side)."""

    host: str
    port: int
    tls: TlsConfig
    username: str
    password: Secret | None
    password_file: Path | None
    client_id: str
    session_expiry: int
    keepalive: int
    answer_timeout: float
    message_expiry: int
    reconnect_backoff_min: float
    reconnect_backoff_max: float
    max_payload: int


@dataclass(frozen=True)
class JournalConfig:
    """``[journal]``: the settlement journal (SQLite, WAL)."""

    path: Path
    sync: Literal["full", "extra"] = "full"
    busy_timeout: float = 5.0


@dataclass(frozen=True)
class ReversalConfig:
    """``[reversal]``: how unacknowledged reversals (2601) are retried."""

    backoff_min: float = 1.0
    backoff_max: float = 60.0


@dataclass(frozen=True)
class KioskLimits:
    """``[kiosk.limits]``."""

    max_line_bytes: int = 65536
    max_connections: int = 32
    max_requests_per_connection: int = 10000  # 0: unlimited
    idle_timeout: float = 300.0
    pin_attempts_per_card: int = 5
    pin_attempts_per_client: int = 10
    pin_attempt_window: float = 60.0


@dataclass(frozen=True)
class KioskConfig:
    """``[kiosk]``: the local JSON-RPC socket for kiosks and operators (uids/gids resolved)."""

    enabled: bool = True
    socket: Path = Path("/run/sscardd/kiosk.sock")
    mode: int = 0o660
    group: int | None = None
    allowed_uids: frozenset[int] = frozenset()
    allowed_gids: frozenset[int] = frozenset()
    operator_uids: frozenset[int] = frozenset()
    operator_gids: frozenset[int] = frozenset()
    limits: KioskLimits = KioskLimits()


@dataclass(frozen=True)
class LoggingConfig:
    """``[logging]``. ``json`` None: JSON lines unless stderr is a TTY."""

    level: str = "INFO"
    json: bool | None = None


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: the optional Prometheus endpoint, on a loopback address only."""

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True)
class Config:
    """The whole configuration. ``source`` names the file it came from."""

    terminal: TerminalConfig
    institution: InstitutionConfig
    regions: RegionsConfig
    readers: ReadersConfig
    pin: PinConfig
    mqtt: MqttConfig
    journal: JournalConfig
    reversal: ReversalConfig
    kiosk: KioskConfig
    logging: LoggingConfig
    metrics: MetricsConfig
    source: str = field(default="", compare=False)

    def requires_pin(self) -> bool:
        """Whether this terminal's institution needs the PIN for a sale."""
        return self.pin.requires_pin(self.institution.type, self.institution.region)


# Keys a SIGHUP applies; a change anywhere else needs a restart (see restart_needed).
RELOADABLE_PREFIXES: Final = ("logging.", "pin.", "reversal.", "kiosk.allowed_", "kiosk.operator_",
                              "kiosk.limits.")


def _flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type | Secret):
        for f in dataclasses.fields(obj):
            if f.name == "source":
                continue
            yield from _flatten(getattr(obj, f.name), f"{prefix}{f.name}.")
    else:
        yield prefix.rstrip("."), obj


def changed_keys(old: Config, new: Config) -> list[str]:
    """Key paths (of the loaded form) whose values differ."""
    a, b = dict(_flatten(old)), dict(_flatten(new))
    return sorted(k for k in a if a[k] != b[k])


def restart_needed(old: Config, new: Config) -> list[str]:
    """The changed keys a reload cannot apply: the daemon needs a restart for them."""
    return [k for k in changed_keys(old, new) if not k.startswith(RELOADABLE_PREFIXES)]


# --- reading TOML tables with key paths --------------------------------------------------------------

_REQUIRED: Any = object()
T = TypeVar("T")


def _kind(v: object) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, datetime | date | time):
        return "a date/time"
    return type(v).__name__


def _show(v: object) -> str:
    """A value for an error text (only of keys that are not secret), kept short."""
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _key_part(k: str) -> str:
    if _BARE_KEY.fullmatch(k):
        return k
    shown = k if len(k) <= 40 else k[:37] + "..."
    return '"' + shown.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


class _Table:
    """One TOML table being read: every key it may hold is declared up front, so an unknown key is
    reported (with a suggestion) before a "missing" error that a typo would otherwise cause."""

    def __init__(self, data: Mapping[str, Any], path: str, keys: str, base_dir: Path) -> None:
        self.data = data
        self.where = path
        self.keys = frozenset(keys.split())
        self.base_dir = base_dir
        for k in sorted(data):
            if k not in self.keys:
                hint = difflib.get_close_matches(k, sorted(self.keys), n=1, cutoff=0.75)
                raise ConfigError(self.key(k),
                                  "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else ""))

    def key(self, k: str) -> str:
        return f"{self.where}.{_key_part(k)}" if self.where else _key_part(k)

    def err(self, k: str, reason: str) -> ConfigError:
        return ConfigError(self.key(k), reason)

    def _get(self, k: str, default: Any) -> Any:
        assert k in self.keys, k  # a programming error: the key is not declared
        if k in self.data:
            return self.data[k]
        if default is _REQUIRED:
            raise self.err(k, "missing (required)")
        return default

    def _typed(self, k: str, v: object, kind: type, what: str, secret: bool = False) -> Any:
        ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
        if not ok:
            raise self.err(k, f"expected {what}, got {_kind(v)}" + ("" if secret or isinstance(
                v, dict | list) else f" {_show(v)}"))
        return v

    def table(self, k: str, keys: str, required: bool = False) -> _Table:
        v = self._get(k, _REQUIRED if required else {})
        self._typed(k, v, dict, "a table")
        return _Table(v, self.key(k), keys, self.base_dir)

    def tables(self, k: str, keys: str) -> list[_Table]:
        v = self._get(k, [])
        self._typed(k, v, list, "an array of tables")
        out = []
        for i, item in enumerate(v):
            path = f"{self.key(k)}[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(path, f"expected a table, got {_kind(item)}")
            out.append(_Table(item, path, keys, self.base_dir))
        return out

    def string(self, k: str, default: Any = _REQUIRED, *, pattern: re.Pattern[str] | None = None,
               expect: str = "", choices: tuple[str, ...] = (), max_len: int = 200,
               allow_empty: bool = False, secret: bool = False) -> Any:
        v = self._get(k, default)
        if v is default and k not in self.data:
            return v
        self._typed(k, v, str, "a string", secret)
        if not v and not allow_empty:
            raise self.err(k, "must not be empty")
        shown = "" if secret else f", got {_show(v)}"
        if len(v) > max_len:
            raise self.err(k, f"longer than {max_len} characters")
        if choices and v not in choices:
            raise self.err(k, f"must be one of {', '.join(choices)}{shown}")
        if pattern is not None and v and not pattern.fullmatch(v):
            raise self.err(k, f"must be {expect}{shown}")
        return v

    def text(self, k: str, default: Any = _REQUIRED, *, max_len: int = 200, allow_empty: bool = False) -> Any:
        """A free-form string without control characters or compat-string separators."""
        v = self.string(k, default, max_len=max_len, allow_empty=allow_empty)
        if isinstance(v, str) and _FORBIDDEN_CHARS & set(v):
            raise self.err(k, "must not contain control characters or any of | $ ^")
        return v

    def integer(self, k: str, default: Any, lo: int, hi: int) -> int:
        v = self._get(k, default)
        self._typed(k, v, int, "an integer")
        if not lo <= v <= hi:
            raise self.err(k, f"must be from {lo} to {hi}, got {_show(v)}")
        return int(v)

    def number(self, k: str, default: Any, lo: float, hi: float, unit: str = "s") -> float:
        """A float; integers are accepted (``timeout = 15``)."""
        v = self._get(k, default)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.err(k, f"expected a number, got {_kind(v)}"
                              + ("" if isinstance(v, dict | list) else f" {_show(v)}"))
        if not math.isfinite(v) or not lo <= v <= hi:
            raise self.err(k, f"must be from {lo:g} to {hi:g} {unit}, got {_show(v)}")
        return float(v)

    def boolean(self, k: str, default: Any) -> bool:
        v = self._get(k, default)
        self._typed(k, v, bool, "a boolean (true or false)")
        return bool(v)

    def array(self, k: str, default: Any) -> list[Any]:
        v = self._get(k, default)
        self._typed(k, v, list, "an array")
        return list(v)

    def path(self, k: str, default: Any = _REQUIRED) -> Path | None:
        """A file path; relative ones are taken from the config file's directory."""
        v = self.string(k, default, max_len=4096, allow_empty=default is None)
        if v is None or v == "":
            return None
        if "\x00" in v:
            raise self.err(k, "must not contain a NUL character")
        p = Path(v)
        return p if p.is_absolute() else self.base_dir / p


# --- helpers for particular keys ---------------------------------------------------------------------


def _read_secret_file(t: _Table, k: str, path: Path) -> bytes:
    """The contents of a file holding a secret: a regular file, not readable by others."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise t.err(k, f"{path} is not a regular file")
        if st.st_mode & 0o004:
            # Like ssh with its private keys: a secret file others can read is a configuration
            # mistake to fix (chmod o-r), not to run with.
            mode = stat.S_IMODE(st.st_mode)
            raise t.err(k, f"{path} is readable by others (mode {mode:04o}); chmod o-r it")
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_FILE_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise t.err(k, f"cannot read {path}: {_os_reason(exc)}") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise t.err(k, f"{path} is larger than {MAX_SECRET_FILE_BYTES} bytes")
    return data


def _os_reason(exc: BaseException) -> str:
    # strerror only: str(exc) of an OSError repeats the file name, and a ValueError (NUL in a path)
    # has no strerror.
    return getattr(exc, "strerror", None) or type(exc).__name__


def _check_file(t: _Table, k: str, path: Path | None) -> Path | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except (OSError, ValueError) as exc:
        raise t.err(k, f"cannot use {path}: {_os_reason(exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise t.err(k, f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise t.err(k, f"{path} is not readable")
    return path


def _reader_name(t: _Table, k: str) -> str | None:
    name = t.text(k, "", allow_empty=True)
    if not name:
        return None
    if name.startswith("serial:"):
        dev = name.removeprefix("serial:")
        if not dev.startswith("/"):
            raise t.err(k, "a serial reader is serial:/dev/... (an absolute device path)")
    elif name.startswith("emulated:"):
        image = name.removeprefix("emulated:")
        if not image:
            raise t.err(k, "an emulated reader is emulated:PATH (the card or PSAM image)")
        if not Path(image).is_absolute():
            return "emulated:" + str(t.base_dir / image)
    return str(name)


def _ids(t: _Table, k: str, kind: Literal["user", "group"]) -> frozenset[int]:
    """A list of numeric ids or account names, resolved now (an unknown name fails at start)."""
    out: set[int] = set()
    for i, item in enumerate(t.array(k, [])):
        out.add(_one_id(t.key(k) + f"[{i}]", item, kind))
    return frozenset(out)


def _one_id(key: str, item: object, kind: Literal["user", "group"]) -> int:
    if isinstance(item, int) and not isinstance(item, bool):
        if not 0 <= item < 2**32 - 1:
            raise ConfigError(key, f"a {kind} id is from 0 to {2**32 - 2}, got {item}")
        return item
    if not isinstance(item, str):
        raise ConfigError(key, f"expected a {kind} id or name, got {_kind(item)}")
    if not _ACCOUNT_NAME.fullmatch(item):
        raise ConfigError(key, f"not a valid {kind} name: {_show(item)}")
    try:
        return pwd.getpwnam(item).pw_uid if kind == "user" else grp.getgrnam(item).gr_gid
    except KeyError:
        raise ConfigError(key, f"no such {kind} {item!r} on this host") from None


def _require_pin_table(t: _Table, k: str, defaults: Mapping[str, bool] | None) -> Mapping[str, bool]:
    """``{pharmacy, clinic, hospital} → bool``; with ``defaults`` None only the named types."""
    sub = t.table(k, " ".join(INSTITUTION_TYPES), required=defaults is None)
    out: dict[str, bool] = {}
    for typ in INSTITUTION_TYPES:
        if typ in sub.data or defaults is not None:
            out[typ] = sub.boolean(typ, None if defaults is None else defaults[typ])
    return MappingProxyType(out)


# --- the sections --------------------------------------------------------------------------------------


def _terminal(root: _Table) -> TerminalConfig:
    t = root.table("terminal", "id device_no", required=True)
    return TerminalConfig(
        id=t.string("id", pattern=_DIGITS12, expect="the PSAM's 12-digit terminal number"),
        device_no=t.text("device_no", "", max_len=100, allow_empty=True),
    )


def _institution(root: _Table) -> InstitutionConfig:
    t = root.table("institution", "code name type region", required=True)
    return InstitutionConfig(
        code=t.string("code", pattern=_INST_CODE, expect="12 letters or digits (fixmedins_code)"),
        name=t.text("name", max_len=100),
        type=t.string("type", choices=INSTITUTION_TYPES),
        region=t.string("region", pattern=_DIGITS6, expect="a 6-digit region code"),
    )


def _regions(root: _Table) -> RegionsConfig:
    t = root.table("regions", "coordinating_prefix_len")
    return RegionsConfig(coordinating_prefix_len=t.integer("coordinating_prefix_len", 4, 2, 6))


def _readers(root: _Table) -> ReadersConfig:
    t = root.table("readers", "card psam monitor")
    card, psam = _reader_name(t, "card"), _reader_name(t, "psam")
    if card is not None and card == psam:
        raise t.err("psam", "must not be the card reader")
    return ReadersConfig(card=card, psam=psam, monitor=t.boolean("monitor", True))


def _pin(root: _Table) -> PinConfig:
    t = root.table("pin", "initial_pins min_len max_len require_pin region_override allow_clear_over_mqtt"
                          " pin_block_key_file")
    min_len = t.integer("min_len", PIN_LEN_MIN, PIN_LEN_MIN, PIN_LEN_MAX)
    max_len = t.integer("max_len", PIN_LEN_MAX, PIN_LEN_MIN, PIN_LEN_MAX)
    if max_len < min_len:
        raise t.err("max_len", f"must not be below pin.min_len ({min_len})")
    pins: set[str] = set()
    for i, p in enumerate(t.array("initial_pins", ["123456"])):
        where = f"{t.key('initial_pins')}[{i}]"
        # The PIN itself stays out of the message, like every PIN.
        if not isinstance(p, str):
            raise ConfigError(where, f"expected a quoted string of digits (leading zeros count), "
                                     f"got {_kind(p)}")
        if not (p.isascii() and p.isdigit() and min_len <= len(p) <= max_len):
            raise ConfigError(where, f"must be {min_len} to {max_len} digits")
        pins.add(p)
    overrides: list[RegionPinOverride] = []
    seen: set[str] = set()
    for o in t.tables("region_override", "region require_pin"):
        region = o.string("region", pattern=_REGION_PREFIX, expect="a region code or prefix of 2 to 6 digits")
        if region in seen:
            raise o.err("region", f"region {region} has two overrides")
        seen.add(region)
        rule = _require_pin_table(o, "require_pin", None)
        if not rule:
            raise o.err("require_pin", "names no institution type (pharmacy, clinic, hospital)")
        overrides.append(RegionPinOverride(region=region, require_pin=rule))
    key_file = t.path("pin_block_key_file", None)
    key: Secret | None = None
    if key_file is not None:
        raw = _read_secret_file(t, "pin_block_key_file", key_file)
        try:
            hexed = raw.decode("ascii")
            if not all(c in "0123456789abcdefABCDEF \t\r\n" for c in hexed):
                raise ValueError
            key_bytes = bytes.fromhex("".join(hexed.split()))
        except (UnicodeDecodeError, ValueError):
            raise t.err("pin_block_key_file", f"{key_file} must hold the AES key in hex") from None
        if len(key_bytes) not in (16, 24, 32):
            raise t.err("pin_block_key_file",
                        f"{key_file} must hold an AES key of 32, 48 or 64 hex digits")
        key = Secret(key_bytes)
    return PinConfig(
        initial_pins=frozenset(pins), min_len=min_len, max_len=max_len,
        require_pin=_require_pin_table(t, "require_pin", DEFAULT_REQUIRE_PIN),
        region_overrides=tuple(overrides),
        allow_clear_over_mqtt=t.boolean("allow_clear_over_mqtt", False),
        pin_block_key_file=key_file, pin_block_key=key,
    )


def _mqtt(root: _Table, terminal_id: str) -> MqttConfig:
    t = root.table("mqtt", "host port tls username password password_file client_id session_expiry keepalive"
                           " answer_timeout message_expiry reconnect_backoff_min reconnect_backoff_max"
                           " max_payload")
    tt = t.table("tls", "enabled ca cert key insecure")
    tls = TlsConfig(enabled=tt.boolean("enabled", True),
                    ca=_check_file(tt, "ca", tt.path("ca", None)),
                    cert=_check_file(tt, "cert", tt.path("cert", None)),
                    key=_check_file(tt, "key", tt.path("key", None)),
                    insecure=tt.boolean("insecure", False))
    if (tls.cert is None) != (tls.key is None):
        raise tt.err("key" if tls.key is None else "cert", "a client certificate needs both cert and key")
    password = t.string("password", None, max_len=1024, secret=True)
    password_file = t.path("password_file", None)
    if password is not None and password_file is not None:
        raise t.err("password_file", "give either mqtt.password or mqtt.password_file, not both")
    secret: Secret | None = Secret(password) if password is not None else None
    if password_file is not None:
        raw = _read_secret_file(t, "password_file", password_file)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise t.err("password_file", f"{password_file} is not UTF-8") from None
        text = text.rstrip("\r\n")  # one trailing newline is how editors and `echo` leave it
        if not text:
            raise t.err("password_file", f"{password_file} is empty")
        secret = Secret(text)
    answer_timeout = t.number("answer_timeout", 15.0, 1.0, 600.0)
    message_expiry = t.integer("message_expiry", 10, 1, 600)
    if message_expiry >= answer_timeout:
        # The broker must drop a request the daemon has stopped waiting for (and is reversing).
        raise t.err("message_expiry", f"must be shorter than mqtt.answer_timeout ({answer_timeout:g} s)")
    backoff_min = t.number("reconnect_backoff_min", 0.5, 0.01, 3600.0)
    backoff_max = t.number("reconnect_backoff_max", 30.0, 0.01, 3600.0)
    if backoff_max < backoff_min:
        raise t.err("reconnect_backoff_max", "must not be below mqtt.reconnect_backoff_min")
    return MqttConfig(
        host=t.string("host", "localhost", pattern=_HOST, expect="a host name or address"),
        port=t.integer("port", 8883 if tls.enabled else 1883, 1, 65535),
        tls=tls,
        username=t.string("username", f"term-{terminal_id}", pattern=_USERNAME,
                          expect="letters, digits and _ . @ - (at most 64)"),
        password=secret, password_file=password_file,
        client_id=t.string("client_id", terminal_id, pattern=_CLIENT_ID,
                           expect="letters, digits and _ . - (at most 64)"),
        session_expiry=t.integer("session_expiry", 3600, 1, 2**32 - 1),
        keepalive=t.integer("keepalive", 30, 5, 65535),
        answer_timeout=answer_timeout, message_expiry=message_expiry,
        reconnect_backoff_min=backoff_min, reconnect_backoff_max=backoff_max,
        max_payload=t.integer("max_payload", 65536, 1024, 16 << 20),
    )


def _journal(root: _Table) -> JournalConfig:
    t = root.table("journal", "path sync busy_timeout")
    path = t.path("path", "/var/lib/sscardd/journal.sqlite3")
    assert path is not None
    return JournalConfig(path=path, sync=t.string("sync", "full", choices=("full", "extra")),
                         busy_timeout=t.number("busy_timeout", 5.0, 0.1, 600.0))


def _reversal(root: _Table) -> ReversalConfig:
    t = root.table("reversal", "backoff_min backoff_max")
    lo = t.number("backoff_min", 1.0, 0.01, 3600.0)
    hi = t.number("backoff_max", 60.0, 0.01, 86400.0)
    if hi < lo:
        raise t.err("backoff_max", "must not be below reversal.backoff_min")
    return ReversalConfig(backoff_min=lo, backoff_max=hi)


def _mode(t: _Table, k: str, default: int) -> int:
    v = t.data.get(k, default)
    if isinstance(v, str) and _OCTAL.fullmatch(v):
        v = int(v.removeprefix("0o").removeprefix("o"), 8)
    elif isinstance(v, bool) or not isinstance(v, int):
        raise t.err(k, f"expected an octal mode (0o660 or \"0660\"), got {_kind(v)}")
    if not 0 <= v <= 0o777:
        raise t.err(k, "must be a permission mode from 0o000 to 0o777")
    if v & 0o002:
        raise t.err(k, f"must not be writable by others ({v:04o}): access is by group and allow-lists")
    return v


def _kiosk(root: _Table) -> KioskConfig:
    t = root.table("kiosk", "enabled socket mode group allowed_uids allowed_gids operator_uids operator_gids"
                            " limits")
    sock = t.path("socket", "/run/sscardd/kiosk.sock")
    assert sock is not None
    if len(os.fsencode(sock)) > MAX_UNIX_PATH_BYTES:
        raise t.err("socket", f"a Unix socket path is at most {MAX_UNIX_PATH_BYTES} bytes")
    group = t.data.get("group")
    gid = None if group is None or group == "" else _one_id(t.key("group"), group, "group")
    lt = t.table("limits", "max_line_bytes max_connections max_requests_per_connection idle_timeout"
                           " pin_attempts_per_card pin_attempts_per_client pin_attempt_window")
    limits = KioskLimits(
        max_line_bytes=lt.integer("max_line_bytes", 65536, 256, 16 << 20),
        max_connections=lt.integer("max_connections", 32, 1, 4096),
        max_requests_per_connection=lt.integer("max_requests_per_connection", 10000, 0, 2**31 - 1),
        idle_timeout=lt.number("idle_timeout", 300.0, 1.0, 86400.0),
        pin_attempts_per_card=lt.integer("pin_attempts_per_card", 5, 1, 1000),
        pin_attempts_per_client=lt.integer("pin_attempts_per_client", 10, 1, 1000),
        pin_attempt_window=lt.number("pin_attempt_window", 60.0, 1.0, 86400.0),
    )
    return KioskConfig(
        enabled=t.boolean("enabled", True), socket=sock, mode=_mode(t, "mode", 0o660), group=gid,
        allowed_uids=_ids(t, "allowed_uids", "user"), allowed_gids=_ids(t, "allowed_gids", "group"),
        operator_uids=_ids(t, "operator_uids", "user"), operator_gids=_ids(t, "operator_gids", "group"),
        limits=limits,
    )


def _logging(root: _Table) -> LoggingConfig:
    t = root.table("logging", "level json")
    level = t.string("level", "INFO", max_len=20)
    if level.upper() not in LOG_LEVELS:
        raise t.err("level", f"must be one of {', '.join(LOG_LEVELS)}, got {_show(level)}")
    js = t.data.get("json", "auto")
    if not (isinstance(js, bool) or js == "auto"):
        raise t.err("json", f"must be true, false or \"auto\", got {_kind(js)}")
    return LoggingConfig(level=level.upper(), json=js if isinstance(js, bool) else None)


def _metrics(root: _Table) -> MetricsConfig:
    t = root.table("metrics", "enabled bind port")
    bind = t.string("bind", "127.0.0.1", max_len=64)
    try:
        loopback = bind == "localhost" or ipaddress.ip_address(bind).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise t.err("bind", f"must be a loopback address (127.0.0.1, ::1 or localhost), got {_show(bind)}")
    return MetricsConfig(enabled=t.boolean("enabled", False), bind=bind,
                         port=t.integer("port", 9464, 1, 65535))


_SECTIONS = "terminal institution regions readers pin mqtt journal reversal kiosk logging metrics"


def _build(data: Mapping[str, Any], source: str, base_dir: Path) -> Config:
    root = _Table(data, "", _SECTIONS, base_dir)
    terminal = _terminal(root)
    return Config(
        terminal=terminal, institution=_institution(root), regions=_regions(root), readers=_readers(root),
        pin=_pin(root), mqtt=_mqtt(root, terminal.id), journal=_journal(root), reversal=_reversal(root),
        kiosk=_kiosk(root), logging=_logging(root), metrics=_metrics(root), source=source,
    )


_TOML_POS = re.compile(r"\s*\((at line \d+, column \d+|at end of document)\)$")
# tomllib quotes the offending character in these; on a password line that is part of a secret.
_TOML_QUOTED_CHAR = re.compile(r"^(Found invalid character|Illegal character) .*$")


def parse(text: str, source: str = "<string>", base_dir: str | os.PathLike[str] | None = None) -> Config:
    """The configuration in ``text`` (TOML). ``source`` names it in errors; relative paths are taken
    from ``base_dir`` (default: the current directory)."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = _TOML_POS.search(msg)
        where = m.group(1) if m else ""
        what = _TOML_QUOTED_CHAR.sub(r"\1", msg[: m.start()] if m else msg)
        raise ConfigError("", f"invalid TOML {where}: {what}".replace(" :", ":"), source) from None
    except RecursionError:
        raise ConfigError("", "invalid TOML: nested too deeply", source) from None
    try:
        return _build(data, source, base)
    except ConfigError as exc:
        raise exc.with_source(source) from None
    except RecursionError:
        raise ConfigError("", "nested too deeply", source) from None


def load(path: str | os.PathLike[str]) -> Config:
    """The configuration in the file ``path`` (see :func:`parse`)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise ConfigError("", f"cannot read the file: {_os_reason(exc)}", str(p)) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError("", f"larger than {MAX_CONFIG_BYTES} bytes", str(p))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"not UTF-8 (byte {exc.start})", str(p)) from None
    return parse(text, str(p), p.parent.absolute())


def reload(old: Config, path: str | os.PathLike[str] | None = None) -> tuple[Config, list[str]]:
    """For SIGHUP: read the file again (``old.source`` by default) and return the configuration to
    run with — the reloadable parts (logging, PIN policy, reversal backoff, the kiosk allow-lists
    and limits) from the file, everything else kept from ``old`` — and the changed keys that only a
    restart applies. A bad file raises :class:`ConfigError`; the caller keeps ``old``."""
    new = load(path if path is not None else old.source)
    kiosk = dataclasses.replace(
        old.kiosk, allowed_uids=new.kiosk.allowed_uids, allowed_gids=new.kiosk.allowed_gids,
        operator_uids=new.kiosk.operator_uids, operator_gids=new.kiosk.operator_gids,
        limits=new.kiosk.limits)
    merged = dataclasses.replace(old, logging=new.logging, pin=new.pin, reversal=new.reversal, kiosk=kiosk)
    return merged, restart_needed(old, new)
