"""Scan one TLS server with sslyze's Python API and print a JSON summary on stdout.

Runs in its own virtual environment (``.ci/.sslyze-venv``: sslyze 6 needs cryptography < 47,
older than the project's), so it imports nothing of securemsg. ``tests/integration/
test_tls_scan.py`` runs it in a subprocess and asserts on the summary, never on the exit
code: a scan that cannot connect still completes, so its status is part of the summary.

    .ci/.sslyze-venv/bin/python tests/integration/sslyze_scan.py 127.0.0.1 7443 \
        --ca certs/ca.pem [--cert alice.pem --key alice.key] [--profile modern]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sslyze import (
    CertificateInfoExtraArgument,
    ClientAuthenticationCredentials,
    ScanCommand,
    ScanCommandAttemptStatusEnum,
    ScanCommandsExtraArguments,
    Scanner,
    ServerNetworkConfiguration,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanStatusEnum,
)
from sslyze.mozilla_tls_profile.tls_config_checker import (
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    ServerScanResultIncomplete,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)

VERSIONS = {
    "SSLv2": "ssl_2_0_cipher_suites",
    "SSLv3": "ssl_3_0_cipher_suites",
    "TLSv1.0": "tls_1_0_cipher_suites",
    "TLSv1.1": "tls_1_1_cipher_suites",
    "TLSv1.2": "tls_1_2_cipher_suites",
    "TLSv1.3": "tls_1_3_cipher_suites",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--server-name", default="localhost")
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--profile", choices=["intermediate", "modern"], default="intermediate")
    args = parser.parse_args()
    credentials = None
    if args.cert is not None:
        credentials = ClientAuthenticationCredentials(
            certificate_chain_path=args.cert, key_path=args.key
        )
    request = ServerScanRequest(
        server_location=ServerNetworkLocation(args.server_name, args.port, args.host),
        network_configuration=ServerNetworkConfiguration(
            tls_server_name_indication=args.server_name,
            tls_client_auth_credentials=credentials,
            network_timeout=5,
            network_max_retries=1,
        ),
        scan_commands=set(SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER),
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=args.ca)
        ),
    )
    scanner = Scanner()
    scanner.queue_scans([request])
    (result,) = list(scanner.get_results())
    print(json.dumps(summarize(result, args.profile), indent=2, sort_keys=True))
    return 0


def summarize(result: Any, profile: str) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "scan_status": result.scan_status.name,
        "connectivity_status": result.connectivity_status.name,
        "connectivity_error": result.connectivity_error_trace
        and str(result.connectivity_error_trace).splitlines()[-1],
    }
    if result.scan_status != ServerScanStatusEnum.COMPLETED:
        return summary
    scan = result.scan_result
    summary["errors"] = {
        command.value: str(getattr(scan, command.value).error_reason)
        for command in ScanCommand
        if getattr(scan, command.value, None) is not None
        and getattr(scan, command.value).status == ScanCommandAttemptStatusEnum.ERROR
    }
    versions: dict[str, list[dict[str, Any]]] = {}
    for version, field in VERSIONS.items():
        attempt = getattr(scan, field)
        if attempt.status != ScanCommandAttemptStatusEnum.COMPLETED:
            continue
        suites = attempt.result.accepted_cipher_suites
        versions[version] = [
            {
                "name": accepted.cipher_suite.name,
                "openssl_name": accepted.cipher_suite.openssl_name,
                "key_exchange": type(accepted.ephemeral_key).__name__
                if accepted.ephemeral_key is not None
                else None,
                "curve": getattr(accepted.ephemeral_key, "curve_name", None),
            }
            for accepted in suites
        ]
    summary["accepted_cipher_suites"] = versions
    summary["compression"] = scan.tls_compression.result.supports_compression
    renegotiation = scan.session_renegotiation.result
    summary["secure_renegotiation"] = renegotiation.supports_secure_renegotiation
    summary["client_renegotiation_dos"] = renegotiation.is_vulnerable_to_client_renegotiation_dos
    curves = scan.elliptic_curves.result
    summary["curves"] = sorted(c.name for c in curves.supported_curves or [])
    summary["fallback_scsv"] = scan.tls_fallback_scsv.result.supports_fallback_scsv
    summary["heartbleed"] = scan.heartbleed.result.is_vulnerable_to_heartbleed
    summary["ccs_injection"] = scan.openssl_ccs_injection.result.is_vulnerable_to_ccs_injection
    summary["robot"] = scan.robot.result.robot_result.name
    summary["extended_master_secret"] = (
        scan.tls_extended_master_secret.result.supports_ems_extension
    )
    deployments = scan.certificate_info.result.certificate_deployments
    summary["certificate_chain_verified"] = all(
        d.verified_certificate_chain is not None for d in deployments
    )
    configuration = MozillaTlsConfiguration.get(TlsConfigurationEnum(profile))
    try:
        check_server_against_tls_configuration(result, configuration)
    except ServerNotCompliantWithTlsConfiguration as exc:
        summary["mozilla_issues"] = exc.issues
    except ServerScanResultIncomplete as exc:
        summary["mozilla_issues"] = {"incomplete": str(exc)}
    else:
        summary["mozilla_issues"] = {}
    summary["mozilla_profile"] = profile
    return summary


if __name__ == "__main__":
    sys.exit(main())
