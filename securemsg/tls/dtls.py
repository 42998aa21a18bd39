"""DTLS 1.2 contexts (pyOpenSSL), with the TLS side's policy: ECDHE with AEAD only, P-256,
no compression, renegotiation or tickets; the client verifies the chain and the host name,
the server verifies client certificates against its CA and names the client as the TLS
side does (:func:`peer_identity`).

pyOpenSSL is imported by whoever imports this module: only the datagram wings do, when a
datagram listener starts or a datagram client connects, so ``import securemsg`` and the
TLS client never load it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from securemsg.errors import TLSConfigError, TLSError
from securemsg.tls.contexts import TLS12_CIPHERS

__all__ = [
    "DTLS12_VERSION",
    "PeerCheck",
    "client_dtls_context",
    "describe_dtls_failure",
    "dtls_peer_identity",
    "server_dtls_context",
    "translate_dtls_client_error",
]

DTLS12_VERSION: Final = 0xFEFD
_UNKNOWN_AUTHORITY_CODES: Final = frozenset({2, 18, 19, 20, 21, 27})
_VALIDITY_CODES: Final = frozenset({9, 10})
_HOSTNAME_MISMATCH: Final = -1  # our own mark: the chain was fine, the name was not
_OPTIONS: Final = (
    SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET | SSL.OP_NO_QUERY_MTU
)


def _base_context() -> SSL.Context:
    context = SSL.Context(SSL.DTLS_METHOD)
    context.set_min_proto_version(DTLS12_VERSION)
    context.set_max_proto_version(DTLS12_VERSION)
    context.set_options(_OPTIONS)
    context.set_cipher_list(TLS12_CIPHERS.encode())
    context.set_tmp_ecdh(ec.SECP256R1())
    # An idle association gives back its 16 KiB read and write buffers.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    return context


def _load_identity(context: SSL.Context, cert: str, key: str | None) -> None:
    try:
        context.use_certificate_chain_file(cert)
        context.use_privatekey_file(key if key is not None else cert)
        context.check_privatekey()
    except SSL.Error as exc:
        raise TLSConfigError(
            f"certificate file {cert} (--cert) or its key cannot be used for DTLS ({exc})"
        ) from None


def _load_ca(context: SSL.Context, ca: str) -> None:
    try:
        context.load_verify_locations(ca)
    except SSL.Error as exc:
        raise TLSConfigError(f"CA file {ca} (--ca) cannot be used for DTLS ({exc})") from None


def server_dtls_context(
    *,
    cert: str,
    key: str | None,
    ca: str | None,
    require_client_cert: bool,
    cookie: Callable[[SSL.Connection], bytes],
    cookie_valid: Callable[[SSL.Connection, bytes], bool],
) -> SSL.Context:
    """The server's DTLS context. Cookies are the caller's (``cookie``/``cookie_valid`` see
    the peer in the connection's app data), so they follow the stateless rules of
    :mod:`securemsg.core.datagram`."""
    context = _base_context()
    context.set_options(cast("int", SSL.OP_COOKIE_EXCHANGE))
    # No session resumption: nothing kept per handshake beyond its association.
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    _load_identity(context, cert, key)
    if ca is not None:
        _load_ca(context, ca)
        mode = SSL.VERIFY_PEER
        if require_client_cert:
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        context.set_verify(mode, _keep_verdict)
    context.set_cookie_generate_callback(cookie)
    context.set_cookie_verify_callback(cookie_valid)
    return context


def _keep_verdict(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
    return bool(ok)


@dataclass
class PeerCheck:
    """What the client's verification saw, to say which check failed."""

    host: str
    errno: int = 0
    names: list[str] = field(default_factory=list)

    def __call__(
        self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        if not ok:
            self.errno = self.errno or errno
            return False
        if depth == 0:
            leaf = cert.to_cryptography()
            self.names = certificate_names(leaf)
            if not host_matches(self.host, self.names):
                self.errno = _HOSTNAME_MISMATCH
                return False
        return True


def client_dtls_context(
    *, ca: str | None, cert: str | None, key: str | None, check: PeerCheck
) -> SSL.Context:
    if key is not None and cert is None:
        raise TLSConfigError(f"key file {key} (--key) was given without a certificate (--cert)")
    context = _base_context()
    if ca is None:
        context.set_default_verify_paths()
    else:
        if not Path(ca).is_file():
            raise TLSConfigError(f"CA file {ca} (--ca) does not exist")
        _load_ca(context, ca)
    if cert is not None:
        _load_identity(context, cert, key)
    context.set_verify(SSL.VERIFY_PEER, check)
    return context


def certificate_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [*san.get_values_for_type(x509.DNSName)] + [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]


def host_matches(host: str, names: list[str]) -> bool:
    """RFC 6125 matching: an address equals an IP entry; a name equals a DNS entry, or
    matches a wildcard in its leftmost label only."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    wanted = host.lower().rstrip(".")
    for name in names:
        if address is not None:
            try:
                if ipaddress.ip_address(name) == address:
                    return True
            except ValueError:
                continue
            continue
        pattern = name.lower().rstrip(".")
        if pattern == wanted:
            return True
        if pattern.startswith("*.") and "." in wanted:
            if wanted.split(".", 1)[1] == pattern[2:] and wanted.split(".", 1)[0]:
                return True
    return False


def dtls_peer_identity(conn: SSL.Connection) -> str | None:
    """The verified client certificate's common name, else its first DNS name."""
    cert = conn.get_peer_certificate(as_cryptography=True)
    if cert is None:
        return None
    for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        if isinstance(attribute.value, str) and attribute.value:
            return attribute.value
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    names = san.get_values_for_type(x509.DNSName)
    return names[0] if names else None


def _reasons(exc: SSL.Error) -> str:
    parts = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    words = [str(item[2]) for item in parts if isinstance(item, tuple) and len(item) == 3]
    return "; ".join(words) or str(exc) or type(exc).__name__


def translate_dtls_client_error(
    exc: SSL.Error, *, host: str, ca: str | None, mutual: bool, check: PeerCheck
) -> TLSError:
    """A failed DTLS handshake as a one-sentence :class:`TLSError` (as the TLS side's)."""
    code = check.errno
    if code == _HOSTNAME_MISMATCH:
        listed = ", ".join(repr(name) for name in check.names) or "no names"
        return TLSError(
            f"the certificate of {host} is not valid for the name {host!r}; it holds {listed}:"
            " connect with one of those",
            check="hostname_mismatch",
        )
    if code in _UNKNOWN_AUTHORITY_CODES:
        where = f"the CA in {ca}" if ca is not None else "the system's trusted CAs"
        return TLSError(
            f"the certificate of {host} is not signed by {where}; pass --ca with the CA"
            " certificate that issued it",
            check="unknown_authority",
        )
    if code in _VALIDITY_CODES:
        return TLSError(
            f"the certificate of {host} is outside its validity period", check="expired"
        )
    reason = _reasons(exc)
    if any(word in reason for word in ("unknown ca", "certificate", "handshake failure")):
        advice = "check --cert/--key" if mutual else "it may require one: pass --cert/--key"
        return TLSError(
            f"{host} refused the DTLS handshake over our client certificate ({reason}); {advice}",
            check="client_certificate",
        )
    return TLSError(f"DTLS handshake with {host} failed: {reason}", check="other")


def describe_dtls_failure(exc: SSL.Error) -> str:
    """A short snake_case reason for the server's ``datagram_handshake_failed`` log line."""
    reason = _reasons(exc).lower()
    for words, name in (
        ("no shared cipher", "no_shared_cipher"),
        ("peer did not return a certificate", "no_client_certificate"),
        ("certificate verify failed", "client_certificate_invalid"),
        ("unknown ca", "client_rejected_certificate"),
        ("bad certificate", "client_rejected_certificate"),
        ("version", "protocol_version"),
    ):
        if words in reason:
            return name
    return "handshake_failed"
