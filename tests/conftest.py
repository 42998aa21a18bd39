"""Shared fixtures: trustme certificates written to files, SSL contexts, the time unit."""

from __future__ import annotations

import fcntl
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from hypothesis import HealthCheck, settings

from securemsg.tls.contexts import client_context, server_context

__all__ = ["TLSFiles"]


@dataclass(frozen=True)
class TLSFiles:
    """A test PKI: ``ca`` signs the server and alice/bob; ``other_ca`` signs the intruder."""

    ca: trustme.CA
    ca_pem: Path
    server_cert: Path
    server_key: Path
    alice_cert: Path
    alice_key: Path
    bob_cert: Path
    bob_key: Path
    other_ca_pem: Path
    intruder_cert: Path
    intruder_key: Path


def _write_leaf(directory: Path, name: str, leaf: trustme.LeafCert) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    leaf.private_key_pem.write_to_path(str(key))
    for index, blob in enumerate(leaf.cert_chain_pems):  # leaf first, then the chain
        blob.write_to_path(str(cert), append=index > 0)
    return cert, key


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    directory = tmp_path_factory.mktemp("tls")
    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    other_ca.cert_pem.write_to_path(str(directory / "other_ca.pem"))
    server = _write_leaf(directory, "server", ca.issue_cert("localhost", "127.0.0.1", "::1"))
    alice = _write_leaf(directory, "alice", ca.issue_cert(common_name="alice"))
    bob = _write_leaf(directory, "bob", ca.issue_cert(common_name="bob"))
    intruder = _write_leaf(directory, "intruder", other_ca.issue_cert(common_name="alice"))
    return TLSFiles(
        ca=ca,
        ca_pem=directory / "ca.pem",
        server_cert=server[0],
        server_key=server[1],
        alice_cert=alice[0],
        alice_key=alice[1],
        bob_cert=bob[0],
        bob_key=bob[1],
        other_ca_pem=directory / "other_ca.pem",
        intruder_cert=intruder[0],
        intruder_key=intruder[1],
    )


@pytest.fixture
def server_ssl_context(tls_files: TLSFiles) -> ssl.SSLContext:
    """The server's context: server certificate, client certificates optional (ca given)."""
    return server_context(cert=tls_files.server_cert, key=tls_files.server_key, ca=tls_files.ca_pem)


@pytest.fixture
def client_ssl_context(tls_files: TLSFiles) -> ssl.SSLContext:
    """A client's context trusting the test CA, with no client certificate."""
    return client_context(ca=tls_files.ca_pem)


@pytest.fixture
def unit() -> float:
    """The base time unit of timing tests, in seconds; SECUREMSG_TEST_TIMESCALE stretches it."""
    return float(os.environ.get("SECUREMSG_TEST_TIMESCALE", "1")) * 0.1


def _serial_lock_files() -> tuple[Path, Path] | None:
    """The gate and the lock the workers of this pytest-xdist run share, if it is one."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None or "PYTEST_XDIST_WORKER" not in os.environ:
        return None
    base = Path(tempfile.gettempdir()) / f"securemsg-tests-{run}"
    return base.with_suffix(".gate"), base.with_suffix(".lock")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[object]:
    """Under pytest-xdist, a test marked ``serial`` runs while no other test does.

    Every test holds a shared lock while it runs, a serial test an exclusive one. Each first
    passes a gate that a serial test holds until it ends, so that the other worker, starting
    test after test, cannot keep the exclusive lock from ever being granted. Taken before
    pytest-timeout starts its clock (tryfirst): waiting for the other worker's test is not
    this test's time.
    """
    files = _serial_lock_files()
    if files is None:
        return (yield)
    serial = item.get_closest_marker("serial") is not None
    with open(files[0], "a") as gate, open(files[1], "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if serial else fcntl.LOCK_SH)
        if not serial:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            return (yield)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)


def pytest_sessionfinish(session: pytest.Session) -> None:
    # Once a worker is done the other has no one to wait for: the files can go.
    for path in _serial_lock_files() or ():
        path.unlink(missing_ok=True)


# CI machines are shared and slow: a strategy that takes a second to draw an example is the
# machine's fault, not the code's. Limits on examples stay as each test sets them.
settings.register_profile(
    "ci", suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], deadline=None
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
