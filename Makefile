# sscardd developer entry points. On a fresh Debian 12 machine, `make test` (as root) alone does
# all the set-up: missing Debian packages, then .venv with the project and its test extras.
#
#   make test   PYTEST_ARGS='-k harness'   extra pytest arguments
#   make bench  BENCH_ARGS='--iterations 500 --json bench.json'
#   make install [PREFIX=/opt/sscardd] [DESTDIR=/tmp/stage]   the daemon under systemd (see below)

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
LINT_PATHS := apdu_specs firmware_sim sscardd backend_sim tests bench
PYTEST_ARGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := test
.PHONY: setup test lint bench demo clean distclean install install-venv install-units uninstall

# Idempotent and quick when nothing changed (re-installs only when pyproject.toml changed).
setup:
	bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy

lint: setup
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy

# Benchmarks, not tests: vpcd against the floor card and vicc (bench/bench_vpcd.py), then sales
# against bare MQTT round trips, commits and APDUs (bench/bench_settle.py).
bench: setup
	$(PY) bench/bench_vpcd.py $(BENCH_ARGS)
	$(PY) bench/bench_settle.py

# The emulated card and PSAM through a real pcscd (where none can run it says why, exit 2, and
# the demo goes on), then the settlement path: broker, backend, two daemons (sscardd demo).
demo: setup
	$(PY) -m firmware_sim.demo || [ $$? -eq 2 ]
	$(PY) -m sscardd demo

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Also drops the venv (the next `make setup` rebuilds it).
distclean: clean
	rm -rf $(VENV)

# --- installation ------------------------------------------------------------------------------
# `make install` (as root) puts the package in a venv at $(PREFIX) (Debian's python3, the project
# with pyscard, no test tools), the units, sysusers and tmpfiles files under /usr/lib, the default
# config at /etc/sscardd/sscardd.toml (never over an existing one), examples and test keys under
# $(PREFIX)/share/sscardd, and symlinks in $(BINDIR) (sscardd, sscardctl); then creates the user
# (sysusers), fixes the config's owner (tmpfiles: 0640 root:sscardd) and reloads systemd. It
# enables nothing:
#   systemctl enable --now sscardd
# With DESTDIR (a package build, a staged root) everything goes below $(DESTDIR), built for its
# final place $(PREFIX), and the root-only steps are left to the target (systemd-sysusers,
# systemd-tmpfiles --create, systemctl daemon-reload). `make install-units` is the same without
# the venv (the tests stage a root with it). A venv is not relocatable: with DESTDIR it is built at
# $(DESTDIR)$(PREFIX) and its scripts' shebangs and pyvenv.cfg are rewritten to $(PREFIX) (the
# compiled .pyc files need nothing: Python takes a module's file name from where it loads it).
PREFIX ?= /opt/sscardd
DESTDIR ?=
SYSCONFDIR ?= /etc
BINDIR ?= /usr/local/bin
UNITDIR ?= /usr/lib/systemd/system
SYSUSERSDIR ?= /usr/lib/sysusers.d
TMPFILESDIR ?= /usr/lib/tmpfiles.d
INSTALL_PYTHON ?= /usr/bin/python3
UNITS := sscardd.service sscard-emu@.service sscard-backend.service

install: install-venv install-units
	@for b in sscardd sscardctl; do \
		if [ -e '$(DESTDIR)$(PREFIX)'/bin/$$b ]; then ln -sfn $(PREFIX)/bin/$$b '$(DESTDIR)$(BINDIR)'/$$b; fi; \
	done
	@if [ -z '$(DESTDIR)' ] && [ "$$(id -u)" = 0 ]; then \
		set -x; \
		systemd-sysusers $(SYSUSERSDIR)/sscardd.conf; \
		systemd-tmpfiles --create $(TMPFILESDIR)/sscardd.conf; \
		if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; \
	fi

install-venv:
	@set -euo pipefail; \
	dest='$(DESTDIR)$(PREFIX)'; \
	src="$$(mktemp -d)"; trap 'rm -rf "$$src"' EXIT; \
	tar -c --exclude=__pycache__ --exclude='*.pyc' pyproject.toml README.md \
		apdu_specs firmware_sim sscardd backend_sim | tar -x -C "$$src"; \
	if [ -e "$$dest" ] && [ ! -f "$$dest/pyvenv.cfg" ]; then \
		echo "install: $$dest exists and is not a venv; not touching it" >&2; exit 1; fi; \
	echo "install: venv $$dest (python: $(INSTALL_PYTHON))"; \
	$(INSTALL_PYTHON) -m venv "$$dest"; \
	"$$dest/bin/python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
		--upgrade "$$src[pcsc,metrics]"; \
	if [ -n '$(DESTDIR)' ]; then \
		grep -rlIF --null "$$dest" "$$dest/bin" "$$dest/pyvenv.cfg" \
			| xargs -0 -r sed -i "s|$$dest|$(PREFIX)|g"; \
		head -1 "$$dest/bin/sscardd"; \
	fi

install-units:
	@set -euo pipefail; \
	d='$(DESTDIR)'; \
	install -d -m 0755 "$$d$(UNITDIR)" "$$d$(SYSUSERSDIR)" "$$d$(TMPFILESDIR)" "$$d$(BINDIR)" \
		"$$d$(PREFIX)/share/sscardd/systemd" "$$d$(PREFIX)/share/doc/sscardd" "$$d$(SYSCONFDIR)/sscardd"; \
	for u in $(UNITS); do \
		sed 's|/opt/sscardd|$(PREFIX)|g' "systemd/$$u" >"$$d$(UNITDIR)/$$u.tmp"; \
		chmod 0644 "$$d$(UNITDIR)/$$u.tmp"; mv -f "$$d$(UNITDIR)/$$u.tmp" "$$d$(UNITDIR)/$$u"; \
	done; \
	install -m 0644 systemd/sscardd.sysusers "$$d$(SYSUSERSDIR)/sscardd.conf"; \
	install -m 0644 systemd/sscardd.tmpfiles "$$d$(TMPFILESDIR)/sscardd.conf"; \
	install -m 0644 systemd/sscardd.service.d/serial.conf.example "$$d$(PREFIX)/share/sscardd/systemd/"; \
	sed -i 's|/opt/sscardd|$(PREFIX)|g' "$$d$(PREFIX)/share/sscardd/systemd/serial.conf.example"; \
	install -m 0644 config/sscardd.toml config/backend-seed.example.toml config/test-root-keys.toml \
		config/mosquitto.conf.example "$$d$(PREFIX)/share/sscardd/"; \
	install -m 0644 README.md "$$d$(PREFIX)/share/doc/sscardd/"; \
	conf="$$d$(SYSCONFDIR)/sscardd/sscardd.toml"; \
	if [ -e "$$conf" ]; then \
		echo "install: keeping $$conf (the shipped default is $(PREFIX)/share/sscardd/sscardd.toml)"; \
	else \
		install -m 0640 config/sscardd.toml "$$conf"; \
	fi

# Leaves /etc/sscardd and /var/lib/sscardd (the journal) alone; the user stays too.
uninstall:
	@set -eu; d='$(DESTDIR)'; \
	for u in $(UNITS); do rm -f "$$d$(UNITDIR)/$$u"; done; \
	rm -f "$$d$(SYSUSERSDIR)/sscardd.conf" "$$d$(TMPFILESDIR)/sscardd.conf"; \
	for b in sscardd sscardctl; do if [ -L "$$d$(BINDIR)/$$b" ]; then rm -f "$$d$(BINDIR)/$$b"; fi; done; \
	if [ -f "$$d$(PREFIX)/pyvenv.cfg" ]; then rm -rf "$$d$(PREFIX)"; \
	else echo "uninstall: $$d$(PREFIX) is not a venv; left alone" >&2; fi
