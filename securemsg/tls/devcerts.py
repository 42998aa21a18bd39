"""A development PKI on disk: a trustme CA, a server certificate and client certificates.

For ``securemsg server --dev`` and for trying mutual TLS locally, never for production.
trustme 1.2 marks subjectAltName (and extendedKeyUsage) critical on the leaves it issues,
which some TLS checkers (sslyze) reject, so the CA comes from trustme and the leaves are
built here with ``cryptography``: non-critical SAN, serverAuth or clientAuth only.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securemsg.core.messages import NAME_PATTERN
from securemsg.errors import TLSConfigError

__all__ = [
    "DEFAULT_DEV_CLIENTS",
    "DEFAULT_HOSTS",
    "DevPKI",
    "dev_pki_banner",
    "ensure_dev_pki",
    "make_dev_pki",
]

DEFAULT_HOSTS: Final = ("localhost", "127.0.0.1", "::1")
#: Client certificates ``ensure_dev_pki`` makes, so mutual TLS works out of the box.
DEFAULT_DEV_CLIENTS: Final = ("alice", "bob")
LEAF_VALIDITY: Final = datetime.timedelta(days=825)
_RESERVED_NAMES: Final = frozenset({"ca", "server"})
_ORGANIZATION: Final = "securemsg development"

_Issuer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]


@dataclass(frozen=True)
class DevPKI:
    """Paths of a development PKI; ``clients`` maps a name to its (certificate, key)."""

    directory: Path
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    created: list[Path] = field(default_factory=list)


def make_dev_pki(
    directory: str | Path,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    clients: Sequence[str] = (),
    force: bool = False,
) -> DevPKI:
    """Write what is missing of the PKI under ``directory``; ``force`` makes all of it anew.

    An existing CA is kept and signs whatever is added. A new CA means new leaves too, since
    certificates from an old CA would no longer verify.
    """
    root = Path(directory)
    if not hosts:
        raise TLSConfigError("the development server certificate needs at least one host name")
    for name in clients:
        _check_client_name(name)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TLSConfigError(f"cannot create certificate directory {root}: {_why(exc)}") from exc
    pki = DevPKI(
        directory=root,
        ca=root / "ca.pem",
        ca_key=root / "ca.key",
        server_cert=root / "server.pem",
        server_key=root / "server.key",
        clients={name: (root / f"{name}.pem", root / f"{name}.key") for name in clients},
    )
    fresh_ca = force or not (pki.ca.exists() or pki.ca_key.exists())
    issuer = _new_ca(pki) if fresh_ca else _load_ca(pki)
    wanted = [(pki.server_cert, pki.server_key, hosts[0], tuple(hosts))]
    wanted += [(cert, key, name, ()) for name, (cert, key) in pki.clients.items()]
    for cert, key, common_name, names in wanted:
        if fresh_ca or not (cert.exists() and key.exists()):
            cert_pem, key_pem = _issue_leaf(
                issuer, common_name=common_name, hosts=names, server=bool(names)
            )
            _write(key, key_pem, private=True)
            _write(cert, cert_pem, private=False)
            pki.created.extend((cert, key))
    return pki


def ensure_dev_pki(
    directory: str | Path, *, clients: Sequence[str] = DEFAULT_DEV_CLIENTS
) -> DevPKI:
    """What ``securemsg server --dev`` calls: make whatever is missing and return the paths."""
    return make_dev_pki(directory, clients=clients)


def dev_pki_banner(pki: DevPKI) -> str:
    """The text printed once when development certificates are in use."""

    def q(path: Path) -> str:
        return shlex.quote(str(path))

    lines = [
        f"Development certificates in {q(pki.directory)}: for development only, never for"
        " production (whoever holds ca.key can make certificates these clients trust).",
        f"  server:  --cert {q(pki.server_cert)} --key {q(pki.server_key)}"
        f"  (add --ca {q(pki.ca)} to verify client certificates)",
        f"  clients: --ca {q(pki.ca)}",
    ]
    for name, (cert, key) in pki.clients.items():
        lines.append(f"  mutual TLS as {name}: --ca {q(pki.ca)} --cert {q(cert)} --key {q(key)}")
    return "\n".join(lines)


def _check_client_name(name: str) -> None:
    if not re.fullmatch(NAME_PATTERN, name) or name in _RESERVED_NAMES or name.startswith("."):
        raise TLSConfigError(
            f"client name {name!r} cannot name a certificate: use 1 to 64 letters, digits,"
            " '_', '-', '.' or '@', not starting with '.', and not 'ca' or 'server'"
        )


def _new_ca(pki: DevPKI) -> _Issuer:
    ca = trustme.CA(organization_name=_ORGANIZATION, organization_unit_name="development CA")
    _write(pki.ca_key, ca.private_key_pem.bytes(), private=True)
    _write(pki.ca, ca.cert_pem.bytes(), private=False)
    pki.created.extend((pki.ca, pki.ca_key))
    return _load_ca(pki)


def _load_ca(pki: DevPKI) -> _Issuer:
    start_over = "delete ca.pem and ca.key to start over"
    try:
        certificate = x509.load_pem_x509_certificate(_read(pki.ca, "CA certificate"))
    except ValueError as exc:
        raise TLSConfigError(
            f"CA certificate {pki.ca} is not a PEM certificate; {start_over}"
        ) from exc
    try:
        key = serialization.load_pem_private_key(_read(pki.ca_key, "CA key"), password=None)
    except (ValueError, TypeError) as exc:
        raise TLSConfigError(
            f"CA key {pki.ca_key} is not an unencrypted PEM key; {start_over}"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TLSConfigError(f"CA key {pki.ca_key} is neither an EC nor an RSA key; {start_over}")
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(*public) != key.public_key().public_bytes(*public):
        raise TLSConfigError(f"CA key {pki.ca_key} does not match CA certificate {pki.ca}")
    return certificate, key


def _issue_leaf(
    issuer: _Issuer, *, common_name: str, hosts: Sequence[str], server: bool
) -> tuple[bytes, bytes]:
    """A P-256 leaf signed by the CA: a server certificate for ``hosts``, or a client
    certificate whose common name is the client's name.
    """
    ca_cert, ca_key = issuer
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_DIGITAL_SIGNATURE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if hosts:
        names = [_general_name(host) for host in hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(ca_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


_DIGITAL_SIGNATURE: Final = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise TLSConfigError(
            f"{what} {path} is missing; delete the other CA file to start over"
        ) from exc
    except OSError as exc:
        raise TLSConfigError(f"{what} {path} cannot be read: {_why(exc)}") from exc


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``data`` whole or not at all; private keys are created with mode 0600."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as stream:
            os.fchmod(stream.fileno(), 0o600 if private else 0o644)
            stream.write(data)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise TLSConfigError(f"cannot write {path}: {_why(exc)}") from exc


def _why(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()
