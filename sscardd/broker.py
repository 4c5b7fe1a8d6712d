"""The broker side: topic names, and mosquitto dynamic-security files for terminals and backends.

``sscardd broker-provision --terminals FILE`` (and :func:`provision` behind it) writes a complete
dynamic-security JSON file (mosquitto 2.0's ``mosquitto_dynamic_security.so``) from a TOML list of
terminals. Each terminal gets two clients, each with its own role — the plugin has no ``%u``/``%c``
patterns, so the roles are generated per terminal:

- the daemon, username ``term-{id}``: receives ``sscard/v1/term/{id}/cmd`` and
  ``sscard/v1/term/{id}/settle/resp``; publishes ``sscard/v1/term/{id}/reply/#``,
  ``.../status``, ``.../events`` and ``sscard/v1/settle/req/{id}``. The operator CLI connects with
  the same credentials under the client id ``{id}-cli``;
- the POS, username ``pos-{id}``: publishes ``.../cmd``; receives ``.../reply/#``,
  ``.../status`` and ``.../events``;

and the settlement backends share one role: subscribe to the literal shared filter
``$share/settle/sscard/v1/settle/req/+`` (the plugin matches a ``$share`` subscription against its
ACLs as a literal string), receive ``sscard/v1/settle/req/+``, publish
``sscard/v1/term/+/settle/resp``. Everything else is denied by default.

Passwords are stored as mosquitto stores them: PBKDF2-HMAC-SHA512 over the UTF-8 password with a
random 12-byte salt, the 64-byte result and the salt base64-encoded, and the iteration count
(``password``, ``salt``, ``iterations``; the plugin skips, silently, a client whose salt is not 12
bytes or whose hash is not 64). A password comes from the input file or is generated; generated
ones are returned (and printed once by the CLI), never logged. Re-provisioning keeps the stored
hash of every client that is still listed and got no new password, so adding a terminal does not
change the others' passwords (``rotate=True`` generates new ones for all).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOPIC_ROOT = "sscard/v1"
SETTLE_SHARE_GROUP = "settle"
# What backends subscribe to; dynamic security checks a SUBSCRIBE to it as this literal string.
SETTLE_SHARED_FILTER = f"$share/{SETTLE_SHARE_GROUP}/{TOPIC_ROOT}/settle/req/+"

SALT_LEN = 12  # mosquitto's SALT_LEN; the plugin refuses any other length
HASH_LEN = 64  # SHA-512 output
# mosquitto's own tools use 101 (PW_DEFAULT_ITERATIONS). Every login costs the broker's single
# thread one PBKDF2; 10 000 iterations take about 5 ms, which a reconnect storm of a few hundred
# clients tolerates, and slow down guessing a weak supplied password from a leaked file.
DEFAULT_ITERATIONS = 10_000
GENERATED_PASSWORD_BYTES = 24  # 32 URL-safe characters, 192 bits

TERMINAL_ID_RE = re.compile(r"\d{12}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
CLIENT_ID_RE = re.compile(r"[\x21-\x7e]{1,64}")
DEFAULT_BACKEND_PREFIX = "backend-"
BACKEND_ROLE = "sscard-backend"


class ProvisionError(ValueError):
    """Bad provisioning input; the message names the entry and the reason (never a password)."""


# -- topics ---------------------------------------------------------------------------------------


def term_topic(terminal_id: str, leaf: str) -> str:
    """``sscard/v1/term/{terminal_id}/{leaf}``."""
    return f"{TOPIC_ROOT}/term/{terminal_id}/{leaf}"


def cmd_topic(terminal_id: str) -> str:
    return term_topic(terminal_id, "cmd")


def reply_prefix(terminal_id: str) -> str:
    """Every POS Response Topic must start with this (ends with ``/``)."""
    return term_topic(terminal_id, "reply/")


def status_topic(terminal_id: str) -> str:
    return term_topic(terminal_id, "status")


def events_topic(terminal_id: str) -> str:
    return term_topic(terminal_id, "events")


def settle_req_topic(terminal_id: str) -> str:
    return f"{TOPIC_ROOT}/settle/req/{terminal_id}"


def settle_resp_topic(terminal_id: str) -> str:
    """The only Response Topic a backend answers a settlement request to."""
    return term_topic(terminal_id, "settle/resp")


def daemon_username(terminal_id: str) -> str:
    return f"term-{terminal_id}"


def pos_username(terminal_id: str) -> str:
    return f"pos-{terminal_id}"


def cli_client_id(terminal_id: str) -> str:
    """The operator CLI's client id (daemon credentials, never the daemon's own client id)."""
    return f"{terminal_id}-cli"


# -- input ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TerminalSpec:
    """One terminal of the input file. A ``*_client_id`` pins that username to that client id
    (the plugin then refuses any other); pinning the daemon's also locks out the CLI's
    ``{id}-cli``, so it is off unless asked for."""

    id: str
    institution: str | None = None
    daemon_password: str | None = field(default=None, repr=False)
    pos_password: str | None = field(default=None, repr=False)
    daemon_client_id: str | None = None
    pos_client_id: str | None = None


@dataclass(frozen=True)
class BackendSpec:
    name: str
    password: str | None = field(default=None, repr=False)
    client_id: str | None = None


_TERMINAL_KEYS = {f for f in TerminalSpec.__dataclass_fields__}
_BACKEND_KEYS = {f for f in BackendSpec.__dataclass_fields__}


def _check_password(password: object, where: str) -> str | None:
    if password is None:
        return None
    if not isinstance(password, str) or not password or "\x00" in password:
        # mosquitto hashes strlen(password) bytes: an empty or NUL-containing one cannot work.
        raise ProvisionError(f"{where}: a password must be a non-empty string without NUL")
    return password


def _check_client_id(client_id: object, where: str) -> str | None:
    if client_id is None:
        return None
    if not isinstance(client_id, str) or not CLIENT_ID_RE.fullmatch(client_id):
        raise ProvisionError(f"{where}: a client id is 1-64 printable ASCII characters without spaces")
    return client_id


def _terminal_from(entry: object, index: int) -> TerminalSpec:
    where = f"terminal #{index + 1}"
    if not isinstance(entry, dict):
        raise ProvisionError(f"{where}: expected a table")
    unknown = set(entry) - _TERMINAL_KEYS
    if unknown:
        raise ProvisionError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(_TERMINAL_KEYS)})")
    tid = entry.get("id")
    if not isinstance(tid, str) or not TERMINAL_ID_RE.fullmatch(tid):
        raise ProvisionError(f"{where}: id must be the 12-digit terminal number as a string, got {tid!r}")
    where = f"terminal {tid}"
    institution = entry.get("institution")
    if institution is not None and not isinstance(institution, str):
        raise ProvisionError(f"{where}: institution must be a string")
    return TerminalSpec(
        id=tid,
        institution=institution,
        daemon_password=_check_password(entry.get("daemon_password"), where),
        pos_password=_check_password(entry.get("pos_password"), where),
        daemon_client_id=_check_client_id(entry.get("daemon_client_id"), where),
        pos_client_id=_check_client_id(entry.get("pos_client_id"), where),
    )


def _backend_from(entry: object, index: int) -> BackendSpec:
    where = f"backend #{index + 1}"
    if not isinstance(entry, dict):
        raise ProvisionError(f"{where}: expected a table")
    unknown = set(entry) - _BACKEND_KEYS
    if unknown:
        raise ProvisionError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(_BACKEND_KEYS)})")
    name = entry.get("name")
    if not isinstance(name, str):
        raise ProvisionError(f"{where}: name must be a string")
    return BackendSpec(
        name=check_backend_name(name),
        password=_check_password(entry.get("password"), f"backend {name}"),
        client_id=_check_client_id(entry.get("client_id"), f"backend {name}"),
    )


def check_backend_name(name: str) -> str:
    """A backend's username: letters, digits, ``_.-``, at most 64, not a terminal's name."""
    if not NAME_RE.fullmatch(name) or name.startswith(("term-", "pos-")):
        raise ProvisionError(
            f"backend name {name!r}: use letters, digits, '_', '.', '-' (at most 64), "
            "not starting with 'term-' or 'pos-'"
        )
    return name


def parse_terminals(data: Mapping[str, Any]) -> tuple[list[TerminalSpec], list[BackendSpec]]:
    """The ``[[terminal]]`` and ``[[backend]]`` tables of a parsed terminals file."""
    unknown = set(data) - {"terminal", "backend"}
    if unknown:
        raise ProvisionError(f"unknown top-level key(s) {sorted(unknown)}; expected [[terminal]] tables")
    raw_terminals = data.get("terminal", [])
    raw_backends = data.get("backend", [])
    if not isinstance(raw_terminals, list) or not isinstance(raw_backends, list):
        raise ProvisionError("'terminal' and 'backend' must be arrays of tables ([[terminal]])")
    terminals = [_terminal_from(e, i) for i, e in enumerate(raw_terminals)]
    backends = [_backend_from(e, i) for i, e in enumerate(raw_backends)]
    return terminals, backends


def load_terminals_file(path: Path) -> tuple[list[TerminalSpec], list[BackendSpec]]:
    """Read a terminals file (TOML). :class:`ProvisionError` names what is wrong."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ProvisionError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProvisionError(f"{path}: not valid TOML ({exc})") from None
    try:
        return parse_terminals(data)
    except ProvisionError as exc:
        raise ProvisionError(f"{path}: {exc}") from None


# -- passwords ------------------------------------------------------------------------------------


def generate_password() -> str:
    return secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)


def hash_password(
    password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> dict[str, Any]:
    """The ``password``/``salt``/``iterations`` fields of a dynamic-security client."""
    if iterations < 1:
        raise ProvisionError("iterations must be at least 1")
    salt = secrets.token_bytes(SALT_LEN) if salt is None else salt
    if len(salt) != SALT_LEN:
        raise ProvisionError(f"the salt must be {SALT_LEN} bytes")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, HASH_LEN)
    return {
        "password": base64.b64encode(digest).decode("ascii"),
        "salt": base64.b64encode(salt).decode("ascii"),
        "iterations": iterations,
    }


def _stored_hash(entry: Mapping[str, Any]) -> tuple[bytes, bytes, int] | None:
    """(hash, salt, iterations) of a client entry if the plugin would accept them, else None."""
    try:
        digest = base64.b64decode(entry["password"], validate=True)
        salt = base64.b64decode(entry["salt"], validate=True)
        iterations = entry["iterations"]
    except (KeyError, TypeError, ValueError):
        return None
    if len(digest) != HASH_LEN or len(salt) != SALT_LEN or not isinstance(iterations, int) or iterations < 1:
        return None
    return digest, salt, iterations


def verify_password(entry: Mapping[str, Any], password: str) -> bool:
    """True if ``password`` matches a client entry's stored hash (as the plugin checks it)."""
    stored = _stored_hash(entry)
    if stored is None:
        return False
    digest, salt, iterations = stored
    candidate = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, HASH_LEN)
    return hmac.compare_digest(candidate, digest)


# -- roles ----------------------------------------------------------------------------------------


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": True}


def _acls(
    *,
    send: Iterable[str] = (),
    receive: Iterable[str] = (),
    subscribe_literal: Iterable[str] = (),
    subscribe_pattern: Iterable[str] = (),
) -> list[dict[str, Any]]:
    out = [_acl("publishClientSend", t) for t in send]
    out += [_acl("publishClientReceive", t) for t in receive]
    for t in subscribe_literal:
        out += [_acl("subscribeLiteral", t), _acl("unsubscribeLiteral", t)]
    for t in subscribe_pattern:
        out += [_acl("subscribePattern", t), _acl("unsubscribePattern", t)]
    return out


def daemon_role(terminal_id: str) -> dict[str, Any]:
    """The daemon's (and its CLI's) role: its own namespace and its own settlement request topic."""
    inbound = [cmd_topic(terminal_id), settle_resp_topic(terminal_id)]
    return {
        "rolename": f"sscard-daemon-{terminal_id}",
        "textname": f"sscardd daemon of terminal {terminal_id}",
        "acls": _acls(
            send=[reply_prefix(terminal_id) + "#", status_topic(terminal_id), events_topic(terminal_id),
                  settle_req_topic(terminal_id)],
            receive=inbound,
            subscribe_literal=inbound,
        ),
    }


def pos_role(terminal_id: str) -> dict[str, Any]:
    """The POS's role: requests to its terminal, replies, presence and events back."""
    return {
        "rolename": f"sscard-pos-{terminal_id}",
        "textname": f"POS of terminal {terminal_id}",
        "acls": _acls(
            send=[cmd_topic(terminal_id)],
            receive=[reply_prefix(terminal_id) + "#", status_topic(terminal_id), events_topic(terminal_id)],
            subscribe_literal=[status_topic(terminal_id), events_topic(terminal_id)],
            subscribe_pattern=[reply_prefix(terminal_id) + "#"],
        ),
    }


def backend_role() -> dict[str, Any]:
    """The backends' shared role: the shared request group in, any terminal's settle/resp out."""
    return {
        "rolename": BACKEND_ROLE,
        "textname": "settlement backends",
        "acls": _acls(
            send=[settle_resp_topic("+")],
            receive=[settle_req_topic("+")],
            subscribe_literal=[SETTLE_SHARED_FILTER],
        ),
    }


DEFAULT_ACL_ACCESS = {
    "publishClientSend": False,
    "publishClientReceive": False,
    "subscribe": False,
    "unsubscribe": False,
}


# -- the file -------------------------------------------------------------------------------------


@dataclass
class Provisioned:
    """A dynamic-security configuration and the passwords that went into it.

    ``generated``: username → password for the passwords made here (to hand out once);
    ``passwords``: username → password for every password known in clear (input or generated;
    clients whose stored hash was kept are absent). Neither is ever logged.
    """

    config: dict[str, Any]
    generated: dict[str, str] = field(default_factory=dict, repr=False)
    passwords: dict[str, str] = field(default_factory=dict, repr=False)
    kept: list[str] = field(default_factory=list)

    @property
    def usernames(self) -> list[str]:
        return [c["username"] for c in self.config["clients"]]


def default_backends(count: int) -> list[BackendSpec]:
    if count < 1:
        raise ProvisionError("--backends must be at least 1")
    return [BackendSpec(f"{DEFAULT_BACKEND_PREFIX}{i}") for i in range(1, count + 1)]


def _existing_hashes(existing: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if existing is None:
        return out
    for entry in existing.get("clients", []):
        if isinstance(entry, dict) and isinstance(entry.get("username"), str) and _stored_hash(entry):
            out[entry["username"]] = {k: entry[k] for k in ("password", "salt", "iterations")}
    return out


def provision(
    terminals: Sequence[TerminalSpec],
    backends: Sequence[BackendSpec],
    *,
    iterations: int = DEFAULT_ITERATIONS,
    existing: Mapping[str, Any] | None = None,
    rotate: bool = False,
) -> Provisioned:
    """Build the dynamic-security configuration for ``terminals`` and ``backends``.

    ``existing``: a previous configuration (the file being replaced); the stored hash of a client
    still listed without a password of its own is kept unless ``rotate``.
    """
    if not terminals:
        raise ProvisionError("no terminals: the file needs at least one [[terminal]] table")
    if not backends:
        raise ProvisionError("no backends")
    seen: set[str] = set()
    for t in terminals:
        if t.id in seen:
            raise ProvisionError(f"terminal {t.id} is listed twice")
        seen.add(t.id)
    names = [b.name for b in backends]
    if len(set(names)) != len(names):
        raise ProvisionError(f"a backend name is listed twice: {names}")
    for b in backends:
        check_backend_name(b.name)
    old = {} if rotate else _existing_hashes(existing)
    result = Provisioned(config={})
    clients: list[dict[str, Any]] = []

    def client(username: str, password: str | None, rolename: str, text: str,
               description: str | None, client_id: str | None) -> None:
        entry: dict[str, Any] = {"username": username, "textname": text}
        if description:
            entry["textdescription"] = description
        if client_id is not None:
            entry["clientid"] = client_id
        if password is None and username in old:
            entry.update(old[username])
            result.kept.append(username)
        else:
            if password is None:
                password = generate_password()
                result.generated[username] = password
            result.passwords[username] = password
            entry.update(hash_password(password, iterations=iterations))
        entry["roles"] = [{"rolename": rolename}]
        clients.append(entry)

    roles: list[dict[str, Any]] = []
    for t in terminals:
        d_role, p_role = daemon_role(t.id), pos_role(t.id)
        roles += [d_role, p_role]
        where = f"institution {t.institution}" if t.institution else None
        client(daemon_username(t.id), t.daemon_password, d_role["rolename"],
               f"sscardd daemon, terminal {t.id}", where, t.daemon_client_id)
        client(pos_username(t.id), t.pos_password, p_role["rolename"],
               f"POS, terminal {t.id}", where, t.pos_client_id)
    roles.append(backend_role())
    for b in backends:
        client(b.name, b.password, BACKEND_ROLE, "settlement backend", None, b.client_id)
    # Roles first: the plugin resolves a client's role names while loading the clients.
    result.config = {
        "defaultACLAccess": dict(DEFAULT_ACL_ACCESS),
        "roles": roles,
        "clients": clients,
        "groups": [],
    }
    return result


def read_dynsec(path: Path) -> dict[str, Any] | None:
    """A dynamic-security file's content, or None if there is none (or it is not a JSON object)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ProvisionError(
            f"{path}: cannot read the existing file ({exc}); move it away or use --rotate"
        ) from None
    return data if isinstance(data, dict) else None


def write_dynsec(path: Path, config: Mapping[str, Any]) -> None:
    """Write ``config`` atomically. A replaced file keeps its mode and owner (the broker reads it
    after dropping to its own user); a new one is created 0600."""
    path = Path(path)
    text = json.dumps(config, indent=1, ensure_ascii=False) + "\n"
    try:
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if st is not None:
            os.chmod(tmp, st.st_mode & 0o7777)
            with contextlib.suppress(PermissionError):
                os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
