"""The server's TLS configuration, scanned with sslyze against Mozilla's profiles.

sslyze 6 needs cryptography < 47 and the project uses a newer one, so it lives in its own
virtual environment, ``.ci/.sslyze-venv``, which ``.ci/run`` creates; the scan itself is
``sslyze_scan.py`` run there in a subprocess, talking to a server on 127.0.0.1 port 0. The
test skips when the environment is missing locally, and fails under CI (``CI=true``).

The server certificate is made by :func:`securemsg.tls.devcerts.make_dev_pki` (what ``--dev``
uses: P-256, non-critical subjectAltName), with a 90-day validity: Mozilla's profiles bound
a certificate's lifespan (366 days for intermediate, 90 for modern) while the development
certificates live 825 days, a difference a test below pins down as the only one.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from securemsg.tls import devcerts as certs
from tests.faults import record_figure

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = ROOT / ".ci" / ".sslyze-venv" / "bin" / "python"
SCRIPT = Path(__file__).with_name("sslyze_scan.py")
MOZILLA_GROUPS = {"X25519", "prime256v1", "secp256r1", "secp384r1"}
AEAD = ("_GCM_", "_CHACHA20_POLY1305_")


@pytest.fixture(scope="module")
def scanner() -> Path:
    if VENV_PYTHON.exists():
        return VENV_PYTHON
    how = (
        f"the sslyze virtualenv {VENV_PYTHON.relative_to(ROOT)} is missing; make it with "
        "`python -m venv .ci/.sslyze-venv && .ci/.sslyze-venv/bin/pip install 'sslyze>=6,<7'`"
        " (.ci/run does)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"under CI the TLS scan must run: {how}")
    pytest.skip(how)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> certs.DevPKI:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(certs, "LEAF_VALIDITY", datetime.timedelta(days=90))
        return certs.make_dev_pki(tmp_path_factory.mktemp("scan-pki"), clients=["alice"])


@pytest.fixture(scope="module")
def long_lived_pki(tmp_path_factory: pytest.TempPathFactory) -> certs.DevPKI:
    return certs.make_dev_pki(tmp_path_factory.mktemp("dev-pki"))


async def scan(
    scanner: Path, port: int, pki: certs.DevPKI, *options: str, within: float = 90
) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        str(scanner), str(SCRIPT), "127.0.0.1", str(port), "--ca", str(pki.ca), *options,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(within):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert out, f"the scan printed nothing (exit {proc.returncode}): {err.decode()[-2000:]}"
    result: dict[str, Any] = json.loads(out)
    print(json.dumps(result, indent=1), file=sys.stderr)  # shown when a test fails
    return result


def figure(case: str, result: dict[str, Any]) -> None:
    suites = result.get("accepted_cipher_suites", {})
    record_figure(
        case,
        scan_status=result["scan_status"],
        versions=[version for version, accepted in suites.items() if accepted],
        tls12_suites=[s["openssl_name"] for s in suites.get("TLSv1.2", [])],
        tls13_suites=[s["openssl_name"] for s in suites.get("TLSv1.3", [])],
        groups=result.get("curves"),
        compression=result.get("compression"),
        secure_renegotiation=result.get("secure_renegotiation"),
        client_renegotiation=result.get("client_renegotiation_dos"),
        mozilla_profile=result.get("mozilla_profile"),
        mozilla_issues=result.get("mozilla_issues"),
    )


def assert_sound(result: dict[str, Any], *, versions: set[str]) -> None:
    """What the issue asks of every configuration, checked on the scan's own findings."""
    assert result["scan_status"] == "COMPLETED", result.get("connectivity_error")
    assert result["errors"] == {}
    suites = result["accepted_cipher_suites"]
    assert {version for version, accepted in suites.items() if accepted} == versions
    for old in ("SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1"):
        assert suites[old] == []
    for suite in suites["TLSv1.2"]:  # forward secret and AEAD only
        assert suite["name"].startswith("TLS_ECDHE_"), suite
        assert any(mode in suite["name"] for mode in AEAD), suite
        assert suite["curve"] in MOZILLA_GROUPS, suite
    assert suites["TLSv1.3"], "TLS 1.3 must be offered"
    assert result["compression"] is False
    assert result["secure_renegotiation"] is True
    assert result["client_renegotiation_dos"] is False
    assert set(result["curves"]) <= MOZILLA_GROUPS
    assert result["certificate_chain_verified"] is True


async def test_default_server_is_mozilla_intermediate_compliant(
    start_server, scanner: Path, pki: certs.DevPKI
) -> None:
    server = await start_server(cert=str(pki.server_cert), key=str(pki.server_key))
    result = await scan(scanner, server.port, pki)
    figure("TLS scan: default server (TLS 1.2 and 1.3)", result)
    assert_sound(result, versions={"TLSv1.2", "TLSv1.3"})
    assert result["mozilla_profile"] == "intermediate"
    assert result["mozilla_issues"] == {}


async def test_tls13_only_server_is_mozilla_modern_compliant(
    start_server, scanner: Path, pki: certs.DevPKI
) -> None:
    server = await start_server(cert=str(pki.server_cert), key=str(pki.server_key), tls13_only=True)
    result = await scan(scanner, server.port, pki, "--profile", "modern")
    figure("TLS scan: tls13_only server", result)
    assert_sound(result, versions={"TLSv1.3"})
    assert result["mozilla_profile"] == "modern"
    assert result["mozilla_issues"] == {}


async def test_mutual_tls_server_is_compliant_and_a_scan_without_certificate_gets_nowhere(
    start_server, scanner: Path, pki: certs.DevPKI
) -> None:
    server = await start_server(
        cert=str(pki.server_cert),
        key=str(pki.server_key),
        ca=str(pki.ca),
        require_client_cert=True,
    )
    refused = await scan(scanner, server.port, pki)
    figure("TLS scan: mutual TLS server, without a client certificate", refused)
    assert refused["scan_status"] == "ERROR_NO_CONNECTIVITY"  # and yet the scan exits 0
    alice_cert, alice_key = pki.clients["alice"]
    result = await scan(
        scanner, server.port, pki, "--cert", str(alice_cert), "--key", str(alice_key)
    )
    figure("TLS scan: mutual TLS server, with a client certificate", result)
    assert_sound(result, versions={"TLSv1.2", "TLSv1.3"})
    assert result["mozilla_issues"] == {}


async def test_development_certificates_differ_from_intermediate_only_in_lifespan(
    start_server, scanner: Path, long_lived_pki: certs.DevPKI
) -> None:
    pki = long_lived_pki
    server = await start_server(cert=str(pki.server_cert), key=str(pki.server_key))
    result = await scan(scanner, server.port, pki)
    figure("TLS scan: default server with the 825-day development certificate", result)
    assert_sound(result, versions={"TLSv1.2", "TLSv1.3"})
    assert set(result["mozilla_issues"]) == {"maximum_certificate_lifespan"}
