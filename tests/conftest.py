"""Shared fixtures: a real pcscd with the vpcd driver (see ``firmware_sim/lab.py``).

- ``pcscd`` (session): a running pcscd listing "Virtual PCD 00 00" and "… 00 01". One that
  already runs is used as is (``pcscd.owned`` is False); otherwise one is started (root only) and
  stopped at the end of the session. Tests are skipped, with the reason, when neither works.
  ``SSCARD_PCSCD_DEBUG=1`` runs an own pcscd with ``--debug``; its output goes to
  ``pcscd.log_path`` under pytest's temporary directory either way.
- ``own_pcscd``: the same, for tests that stop or restart pcscd; skipped unless this session
  started it. pcscd is running again after the test.

Tests that use either fixture get the ``pcscd`` marker (``-m "not pcscd"`` deselects them);
tests marked ``slow`` run only with ``SSCARD_SLOW=1``.

A real mosquitto (see ``tests/mqtt_harness.py``), skipped with the reason when mosquitto or its
dynamic-security plugin is missing:

- ``mqtt_ca`` (session): a test CA and a server certificate for 127.0.0.1/localhost.
- ``mosquitto_factory`` (session): ``mosquitto_factory(terminals=[...], backends=[...])`` starts a
  broker configured as shipped with those clients provisioned; all are stopped at the end.
- ``mqtt_broker`` (module): one such broker for terminals ``TERMINAL_A``, ``TERMINAL_B`` and the
  backend ``backend-1``, shared by the tests of a module.
- ``own_mqtt_broker``: the same, for one test that stops or restarts it.

Tests that use them get the ``mosquitto`` marker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from firmware_sim.lab import Pcscd, PcscdUnavailable
from tests.mqtt_harness import Mosquitto, MosquittoFactory, MosquittoUnavailable, TestCA, check_mosquitto

_PCSCD_FIXTURES = {"pcscd", "own_pcscd"}
_MOSQUITTO_FIXTURES = {"mosquitto_factory", "mqtt_broker", "own_mqtt_broker"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = os.environ.get("SSCARD_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow test; set SSCARD_SLOW=1 to run it")
    for item in items:
        if _PCSCD_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.pcscd)
        if _MOSQUITTO_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.mosquitto)
        if not run_slow and item.get_closest_marker("slow") is not None:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def pcscd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pcscd]:
    """A running pcscd with the vpcd readers (skips with the reason if there is none)."""
    # pytest caches a session fixture's skip, so this is tried once, not once per test.
    log_path = tmp_path_factory.mktemp("pcscd") / "pcscd.log"
    try:
        daemon = Pcscd.acquire(log_path=log_path, debug=os.environ.get("SSCARD_PCSCD_DEBUG") == "1")
    except PcscdUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield daemon
    finally:
        daemon.close()


@pytest.fixture
def own_pcscd(pcscd: Pcscd) -> Iterator[Pcscd]:
    """The session's pcscd for a test that stops or restarts it; skips unless we started it."""
    if not pcscd.owned:
        pytest.skip(
            "this test stops/restarts pcscd, but the running pcscd was not started by the test "
            "session; stop it and run again as root"
        )
    yield pcscd
    if not pcscd.running:
        pcscd.start()


@pytest.fixture(scope="session")
def mqtt_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A test CA with a server certificate for 127.0.0.1 and localhost."""
    return TestCA.create(tmp_path_factory.mktemp("mqtt-ca"))


@pytest.fixture(scope="session")
def mosquitto_factory(
    tmp_path_factory: pytest.TempPathFactory, mqtt_ca: TestCA
) -> Iterator[MosquittoFactory]:
    """Starts brokers configured as shipped; skips (once) if mosquitto or its plugin is missing."""
    try:
        check_mosquitto()
    except MosquittoUnavailable as exc:
        pytest.skip(str(exc))
    factory = MosquittoFactory(tmp_path_factory.mktemp("mosquitto"), mqtt_ca)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def mqtt_broker(mosquitto_factory: MosquittoFactory) -> Iterator[Mosquitto]:
    """A broker with terminals A and B and one backend, shared by the tests of a module."""
    mosq = mosquitto_factory("shared")
    try:
        yield mosq
    finally:
        mosq.stop()


@pytest.fixture
def own_mqtt_broker(mosquitto_factory: MosquittoFactory) -> Iterator[Mosquitto]:
    """A broker of the test's own (terminals A and B, one backend), to stop or restart."""
    mosq = mosquitto_factory("own")
    try:
        yield mosq
    finally:
        mosq.stop()
