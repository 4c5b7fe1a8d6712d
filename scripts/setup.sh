#!/usr/bin/env bash
# Idempotent set-up of a Debian 12 machine for sscardd: system packages, then the project venv.
#
#   bash scripts/setup.sh          (as root on a fresh machine; `make setup` and `make test` call it)
#
# 1. Installs the Debian packages that are missing (apt-get update only when something is).
#    Running:         pcscd libpcsclite-dev gcc python3-dev python3-venv swig (pyscard may
#                     have to build from source: swig, gcc and the PC/SC headers), make
#    Tests and labs:  vsmartcard-vpcd vsmartcard-vpicc opensc pcsc-tools mosquitto
#                     mosquitto-clients socat; systemd (systemd-analyze verify/security,
#                     systemd-sysusers, systemd-tmpfiles check the units offline; no running
#                     systemd needed) and procps (/bin/kill, the unit's ExecReload=)
# 2. Creates .venv with Debian's /usr/bin/python3, so that the reference emulator vicc
#    (python3-virtualsmartcard, outside sys.path) runs with the venv's python and pip's
#    pycryptodome, and installs the project editable with its test extras. That step is re-run
#    only when pyproject.toml changed (a stamp file inside .venv records its hash).
#
# Environment: SSCARD_SKIP_APT=1 skips step 1 (for machines where someone else manages packages).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# make: the project's entry points are make targets (a minimal Debian image lacks it).
RUN_PKGS=(pcscd libpcsclite-dev gcc python3-dev python3-venv swig make)
TEST_PKGS=(vsmartcard-vpcd vsmartcard-vpicc opensc pcsc-tools mosquitto mosquitto-clients socat systemd procps)
PYTHON=/usr/bin/python3
VENV=.venv
STAMP="$VENV/.sscardd-setup.stamp"

log() { printf 'setup: %s\n' "$*" >&2; }

is_installed() {
    # "install ok installed" only; half-configured or removed-with-config packages count as missing.
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

install_packages() {
    local missing=() pkg
    for pkg in "${RUN_PKGS[@]}" "${TEST_PKGS[@]}"; do
        is_installed "$pkg" || missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    if ((EUID != 0)); then
        log "missing Debian packages: ${missing[*]}"
        log "install them as root, then run this again:"
        log "  sudo apt-get update && sudo apt-get install -y ${missing[*]}"
        log "(or set SSCARD_SKIP_APT=1 to skip this check)"
        exit 1
    fi
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
}

venv_is_usable() {
    # Debian's interpreter is required (see above); a venv made from another one is replaced.
    [[ -x "$VENV/bin/python" && -f "$VENV/pyvenv.cfg" ]] &&
        grep -Eq '^home = /usr/bin/?$' "$VENV/pyvenv.cfg" &&
        "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

setup_venv() {
    if ! venv_is_usable; then
        if [[ -e "$VENV" ]]; then
            log "$VENV is not a venv of $PYTHON; recreating it"
            rm -rf "$VENV"
        fi
        log "creating $VENV with $PYTHON"
        "$PYTHON" -m venv "$VENV"
    fi
    local want have=""
    # The interpreter version is part of the stamp: a Python point release rebuilds nothing, but
    # a new minor version (different ABI) must reinstall.
    want="$(sha256sum pyproject.toml | cut -d' ' -f1) $("$VENV/bin/python" -c \
        'import sys; print("%d.%d" % sys.version_info[:2])')"
    [[ -f "$STAMP" ]] && have="$(cat "$STAMP")"
    if [[ "$want" == "$have" ]]; then
        log "$VENV is up to date"
        return 0
    fi
    log "installing the project into $VENV (pyproject.toml changed or first run)"
    rm -f "$STAMP"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]'
    printf '%s\n' "$want" >"$STAMP"
}

if [[ "${SSCARD_SKIP_APT:-0}" != 1 ]]; then
    install_packages
fi
setup_venv
