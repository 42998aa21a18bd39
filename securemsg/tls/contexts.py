"""The TLS edge: SSL contexts, peer identity, and TLS failures told in plain words.

Every file problem becomes a :class:`~securemsg.errors.TLSConfigError` that names the
file and the option it came from; every handshake failure a client sees becomes a
:class:`~securemsg.errors.TLSError` whose ``check`` says which verification failed.

Note for drivers: on Python 3.11 an asyncio server that fails a handshake closes the socket
without sending the TLS alert (CPython gh-98078), so an asyncio client refused by an asyncio
server sees a bare EOF or reset rather than "certificate required" or "unknown ca".
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, NoReturn, cast

from securemsg.core.clienthello import ALPN_PROTOCOL
from securemsg.errors import TLSConfigError, TLSError
from securemsg.tls.algorithms import set_groups, set_tls13_suites
from securemsg.tls.resumption import ResumingContext

__all__ = [
    "ALPN_PROTOCOL",
    "ResumingContext",
    "certificate_names",
    "client_context",
    "describe_server_handshake_error",
    "is_hostname_mismatch",
    "peer_identity",
    "reason_text",
    "server_context",
    "translate_client_error",
]

PathLike = str | Path

#: TLS 1.2 suites: forward secret and AEAD only. TLS 1.3 suites are all of that already.
TLS12_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20"


_UNKNOWN_AUTHORITY_CODES: Final = frozenset({2, 18, 19, 20, 21, 27})
_HOSTNAME_CODES: Final = frozenset({62, 63, 64})
_VALIDITY_CODES: Final = frozenset({9, 10})
_CLIENT_CERT_ALERTS: Final = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "TLSV1_ALERT_ACCESS_DENIED",
    }
)
_VERSION_REASONS: Final = frozenset(
    {
        "UNSUPPORTED_PROTOCOL",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "NO_PROTOCOLS_AVAILABLE",
        "VERSION_TOO_LOW",
        "TLSV1_ALERT_INAPPROPRIATE_FALLBACK",
    }
)
_NOT_TLS_REASONS: Final = frozenset(
    {"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"}
)
_ALPN_REASONS: Final = frozenset({"TLSV1_ALERT_NO_APPLICATION_PROTOCOL", "NO_APPLICATION_PROTOCOL"})

_SERVER_REASONS: Final = {
    "WRONG_VERSION_NUMBER": "plaintext",
    "PACKET_LENGTH_TOO_LONG": "plaintext",
    "RECORD_LAYER_FAILURE": "plaintext",
    "HTTP_REQUEST": "http_request",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_certificate",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "UNEXPECTED_EOF_WHILE_READING": "eof",
}


# -- contexts ------------------------------------------------------------------------------


def server_context(
    *,
    cert: PathLike,
    key: PathLike | None = None,
    ca: PathLike | None = None,
    require_client_cert: bool = False,
    tls13_only: bool = False,
    session_tickets: int = 0,
) -> ssl.SSLContext:
    """The server's context; ``cert`` may hold the chain and the key together (``key=None``).

    With ``ca``, client certificates signed by it are verified: required when
    ``require_client_cert``, otherwise optional (a client may still connect without one).
    ``session_tickets`` TLS 1.3 tickets follow each full handshake (0: none), so that a
    client can resume (see :class:`ResumingContext` and docs/security.md).
    """
    if require_client_cert and ca is None:
        raise TLSConfigError("requiring client certificates needs a CA file to check them (--ca)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context, tls13_only=tls13_only)
    context.num_tickets = session_tickets
    if session_tickets:
        # Stateless tickets, sealed with this context's random key: no server memory per
        # ticket, and a new context (a restart, a certificate reload) rejects the old ones.
        # With OP_NO_TICKET, OpenSSL would keep each TLS 1.3 ticket in its session cache
        # instead (~1 KB per ticket, for hours).
        context.options &= ~ssl.OP_NO_TICKET
    set_groups(context)
    _load_identity(context, cert, key)
    if ca is not None:
        _load_ca(context, ca)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context


def client_context(
    *,
    ca: PathLike | None = None,
    cert: PathLike | None = None,
    key: PathLike | None = None,
    tls13_only: bool = False,
) -> ResumingContext:
    """The client's context: verifies the server against ``ca`` (the system store when None)
    and its host name, offers ALPN, presents ``cert``/``key`` for mutual TLS if given, and
    offers the session it was told to :meth:`~ResumingContext.remember`.
    """
    if key is not None and cert is None:
        raise TLSConfigError(f"key file {key} (--key) was given without a certificate (--cert)")
    context = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    _harden(context, tls13_only=tls13_only)
    set_groups(context)
    if ca is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _load_ca(context, ca)
    if cert is not None:
        _load_identity(context, cert, key)
    return context


def _harden(context: ssl.SSLContext, *, tls13_only: bool) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if tls13_only else ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)  # TLS 1.2 only; TLS 1.3 suites are all AEAD
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    context.set_alpn_protocols([ALPN_PROTOCOL])
    set_tls13_suites(context)


def _load_identity(context: ssl.SSLContext, cert: PathLike, key: PathLike | None) -> None:
    cert_pem = _read_pem(cert, "certificate", "--cert")
    if "-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise TLSConfigError(f"certificate file {cert} (--cert) holds no PEM certificate")
    if key is None:
        if "PRIVATE KEY-----" not in cert_pem:
            raise TLSConfigError(
                f"certificate file {cert} (--cert) holds no private key; pass it with --key"
            )
        key_pem, key_source = cert_pem, f"certificate file {cert} (--cert)"
    else:
        key_pem, key_source = _read_pem(key, "key", "--key"), f"key file {key} (--key)"
        if "PRIVATE KEY-----" not in key_pem:
            raise TLSConfigError(f"{key_source} holds no PEM private key")
    if "ENCRYPTED" in key_pem:
        raise TLSConfigError(f"{key_source} is encrypted; securemsg needs an unencrypted key")

    def refuse_password() -> NoReturn:  # never let OpenSSL prompt on the terminal
        raise TLSConfigError(f"{key_source} is encrypted; securemsg needs an unencrypted key")

    try:
        context.load_cert_chain(str(cert), None if key is None else str(key), refuse_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(
                f"the private key in {key_source} does not match certificate file {cert} (--cert)"
            ) from exc
        raise TLSConfigError(
            f"certificate file {cert} (--cert) or {key_source} could not be loaded"
            f" ({reason_text(exc)})"
        ) from exc
    except OSError as exc:  # the file changed under us since we read it
        raise TLSConfigError(
            f"certificate file {cert} (--cert) or {key_source} cannot be read: {_why(exc)}"
        ) from exc


def _load_ca(context: ssl.SSLContext, ca: PathLike) -> None:
    if "-----BEGIN CERTIFICATE-----" not in _read_pem(ca, "CA", "--ca"):
        raise TLSConfigError(f"CA file {ca} (--ca) holds no PEM certificate")
    try:
        context.load_verify_locations(cafile=str(ca))
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"CA file {ca} (--ca) could not be loaded ({reason_text(exc)})"
        ) from exc
    except OSError as exc:
        raise TLSConfigError(f"CA file {ca} (--ca) cannot be read: {_why(exc)}") from exc


def _read_pem(path: PathLike, what: str, option: str) -> str:
    try:
        return Path(path).read_bytes().decode("ascii", "replace")
    except FileNotFoundError as exc:
        raise TLSConfigError(f"{what} file {path} ({option}) does not exist") from exc
    except IsADirectoryError as exc:
        raise TLSConfigError(f"{what} file {path} ({option}) is a directory") from exc
    except OSError as exc:
        raise TLSConfigError(f"{what} file {path} ({option}) cannot be read: {_why(exc)}") from exc


def _why(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


# -- peers -----------------------------------------------------------------------------------


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    """The verified peer certificate's common name, else its first DNS name; None if none."""
    certificate = ssl_object.getpeercert()
    if not certificate:
        return None
    subject = cast("tuple[tuple[tuple[str, str], ...], ...]", certificate.get("subject", ()))
    for rdn in subject:
        for attribute, value in rdn:
            if attribute == "commonName" and value:
                return value
    alt_names = cast("tuple[tuple[str, str], ...]", certificate.get("subjectAltName", ()))
    for kind, value in alt_names:
        if kind == "DNS" and value:
            return value
    return None


def translate_client_error(
    exc: BaseException,
    *,
    host: str,
    ca: str | None,
    mutual: bool,
    names: Sequence[str] = (),
) -> TLSError:
    """Turn what a failed client handshake raised into a one-sentence :class:`TLSError`.

    ``ca`` is the CA file the client trusts (None: the system store); ``mutual`` says
    whether the client presented a certificate; ``names`` are the names the server's
    certificate holds, when known (see :func:`certificate_names`), for a host-name mismatch.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _verification_error(exc, host=host, ca=ca, names=names)
    reason = getattr(exc, "reason", None) if isinstance(exc, ssl.SSLError) else None
    if reason in _CLIENT_CERT_ALERTS:
        alert = reason_text(exc)
        if mutual:
            message = (
                f"{host} rejected our client certificate ({alert}); check that --cert/--key"
                " were issued by a CA the server trusts and have not expired"
            )
        else:
            message = f"{host} requires a client certificate ({alert}); pass --cert and --key"
        return TLSError(message, check="client_certificate")
    if reason in _NOT_TLS_REASONS:
        return TLSError(f"{host} did not answer in TLS (is it a plaintext port?)", check="protocol")
    if reason in _VERSION_REASONS:
        return TLSError(
            f"{host} and this client share no TLS version ({reason_text(exc)}); TLS 1.2 or"
            " newer is required",
            check="protocol",
        )
    if reason in _ALPN_REASONS:
        return TLSError(f"{host} does not speak {ALPN_PROTOCOL} (ALPN refused)", check="protocol")
    if isinstance(exc, TimeoutError):
        return TLSError(f"the TLS handshake with {host} timed out", check="other")
    if isinstance(exc, ssl.SSLEOFError | ConnectionResetError | EOFError):
        # An asyncio server on Python 3.11 drops the alert (gh-98078): a bare close is all
        # we get. Having sent a certificate, its rejection is by far the likeliest cause.
        if mutual:
            return TLSError(
                f"{host} closed the connection during the TLS handshake, which usually means"
                " it rejected our client certificate; check --cert/--key",
                check="client_certificate",
            )
        return TLSError(
            f"{host} closed the connection during the TLS handshake; it may require a client"
            " certificate (pass --cert/--key)",
            check="other",
        )
    return TLSError(f"TLS handshake with {host} failed: {reason_text(exc)}", check="other")


def is_hostname_mismatch(exc: BaseException) -> bool:
    """True for a handshake that failed only because the certificate names another host."""
    return isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_code in _HOSTNAME_CODES


def certificate_names(peercert: dict[str, Any] | None) -> list[str]:
    """The host names and addresses a certificate (``getpeercert()``) is valid for: its
    subjectAltName entries, else its common name."""
    if not peercert:
        return []
    names = [
        str(value)
        for kind, value in peercert.get("subjectAltName", ())
        if kind in ("DNS", "IP Address")
    ]
    if not names:
        for rdn in peercert.get("subject", ()):
            names += [str(value) for key, value in rdn if key == "commonName"]
    return names


def _verification_error(
    exc: ssl.SSLCertVerificationError, *, host: str, ca: str | None, names: Sequence[str] = ()
) -> TLSError:
    code = exc.verify_code
    detail = exc.verify_message or reason_text(exc)
    if code in _UNKNOWN_AUTHORITY_CODES:
        where = f"the CA in {ca}" if ca is not None else "the system's trusted CAs"
        return TLSError(
            f"the certificate of {host} is not signed by {where} ({detail}); pass --ca with"
            " the CA certificate that issued it",
            check="unknown_authority",
        )
    if code in _HOSTNAME_CODES:
        if names:
            listed = ", ".join(repr(name) for name in names)
            advice = f"it holds {listed}: connect with one of those"
        else:
            advice = "connect with a name the certificate lists"
        return TLSError(
            f"the certificate of {host} is not valid for the name {host!r} ({detail}); {advice}",
            check="hostname_mismatch",
        )
    if code in _VALIDITY_CODES:
        return TLSError(
            f"the certificate of {host} is outside its validity period ({detail})",
            check="expired",
        )
    return TLSError(f"the certificate of {host} failed verification ({detail})", check="other")


def describe_server_handshake_error(exc: BaseException) -> str:
    """A short snake_case reason for the server's ``tls_handshake_failed`` log line."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in _UNKNOWN_AUTHORITY_CODES:
            return "unknown_ca"
        if exc.verify_code in _VALIDITY_CODES:
            return "client_certificate_expired"
        return "client_certificate_invalid"
    if isinstance(exc, ssl.SSLEOFError | EOFError):
        return "eof"
    reason = getattr(exc, "reason", None) if isinstance(exc, ssl.SSLError) else None
    if isinstance(reason, str):
        return _SERVER_REASONS.get(reason) or _server_reason_family(reason) or reason.lower()
    if isinstance(exc, ConnectionResetError):
        return "connection_reset"
    return _snake_case(type(exc).__name__.removesuffix("Error")) or "error"


def _server_reason_family(reason: str) -> str | None:
    if reason in _VERSION_REASONS:
        return "protocol_version"
    if reason in _ALPN_REASONS:
        return "alpn_mismatch"
    if reason in _CLIENT_CERT_ALERTS:
        return "client_rejected_certificate"  # the client did not trust our certificate
    return None


def reason_text(exc: BaseException) -> str:
    """OpenSSL's words without the ``[SSL: X] ... (_ssl.c:1006)`` decoration."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        return reason.lower().replace("_", " ")
    text = str(exc) or type(exc).__name__
    return re.sub(r"^\[[^]]*\]\s*|\s*\(_ssl\.c:\d+\)$", "", text)


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
