"""What a certificate says, in words: subject, names, issuer and days left.

Used by the server (the ``certificate_expiring`` warning, refusing to reload an expired
certificate) and by ``securemsg doctor``. Parsing is cryptography's; only the leaf (the first
certificate of a PEM chain) is read.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from securemsg.errors import TLSConfigError

__all__ = ["CertInfo", "cert_info_from_der", "read_cert_info"]

_DAY = 86400.0


@dataclass(frozen=True, slots=True)
class CertInfo:
    subject: str
    issuer: str
    names: tuple[str, ...]  # subject alternative names: DNS names and IP addresses
    not_before: dt.datetime
    not_after: dt.datetime
    self_signed: bool

    def days_left(self, now: dt.datetime | None = None) -> float:
        """Days until expiry (negative once expired), to a hundredth of a day."""
        now = now or dt.datetime.now(dt.UTC)
        return round((self.not_after - now).total_seconds() / _DAY, 2)

    def valid_at(self, now: dt.datetime | None = None) -> bool:
        now = now or dt.datetime.now(dt.UTC)
        return self.not_before <= now <= self.not_after


def read_cert_info(path: str | Path, *, option: str = "--cert") -> CertInfo:
    """The leaf certificate of the PEM file at ``path``; TLSConfigError names the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        message = f"certificate file {path} ({option}) cannot be read: {reason}"
        raise TLSConfigError(message) from exc
    try:
        leaf = x509.load_pem_x509_certificates(data)[0]
    except ValueError as exc:
        raise TLSConfigError(
            f"certificate file {path} ({option}) holds no readable PEM certificate"
        ) from exc
    return _info(leaf)


def cert_info_from_der(der: bytes) -> CertInfo:
    return _info(x509.load_der_x509_certificate(der))


def _info(cert: x509.Certificate) -> CertInfo:
    names: list[str] = []
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += alt.get_values_for_type(x509.DNSName)
        names += [str(ip) for ip in alt.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    return CertInfo(
        subject=_name(cert.subject),
        issuer=_name(cert.issuer),
        names=tuple(names),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        self_signed=cert.subject == cert.issuer,
    )


def _name(name: x509.Name) -> str:
    common = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if common:
        return str(common[0].value)
    return name.rfc4514_string() or "(empty)"
