"""Key exchange groups and TLS 1.3 suites, through OpenSSL itself over memory BIOs (no
sockets needed).

Python 3.11 cannot say which group a handshake used, so the tests tell it by what succeeds
and by how many flights the server needed: a client whose key share the server lacks gets
a HelloRetryRequest, a second server flight.
"""

from __future__ import annotations

import contextlib
import ctypes
import ssl
from typing import TYPE_CHECKING

import pytest

from securemsg.tls import algorithms
from securemsg.tls.contexts import client_context, server_context

if TYPE_CHECKING:
    from tests.conftest import TLSFiles


def server_flights(server: ssl.SSLContext, client: ssl.SSLContext) -> int:
    """Flights the server sent before the client's handshake was done; raises if it failed."""
    return handshake(server, client)[0]


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[int, str]:
    """(server flights, the suite chosen) of one handshake; raises if it failed."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    server_end = server.wrap_bio(server_in, server_out, server_side=True)
    client_end = client.wrap_bio(client_in, client_out, server_hostname="localhost")
    for flights in range(4):
        with contextlib.suppress(ssl.SSLWantReadError):
            client_end.do_handshake()
            assert client_end.version() == "TLSv1.3"
            suite = client_end.cipher()
            assert suite is not None
            return flights, suite[0]
        server_in.write(client_out.read())
        with contextlib.suppress(ssl.SSLWantReadError):
            server_end.do_handshake()
        client_in.write(server_out.read())
    raise AssertionError("the handshake did not finish in 3 server flights")


def only(context: ssl.SSLContext, group: str) -> ssl.SSLContext:
    context.set_ecdh_curve(group)
    return context


@pytest.fixture
def server(tls_files: TLSFiles) -> ssl.SSLContext:
    return server_context(cert=tls_files.server_cert, key=tls_files.server_key)


def test_the_group_list_is_set_through_openssl_here(tls_files: TLSFiles) -> None:
    # On CPython with a shared OpenSSL (this machine, CI) the list must really be set; the
    # fallback is for other interpreters and builds.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert algorithms.set_groups(context)


def test_our_client_guesses_the_servers_key_share_so_no_hello_retry(
    server: ssl.SSLContext, tls_files: TLSFiles
) -> None:
    # A HelloRetryRequest costs a round trip and a second ClientHello on the server.
    assert server_flights(server, client_context(ca=tls_files.ca_pem)) == 1


def test_the_server_speaks_x25519_and_p256_without_a_retry(
    server: ssl.SSLContext, tls_files: TLSFiles
) -> None:
    for group in ("X25519", "prime256v1"):
        assert server_flights(server, only(client_context(ca=tls_files.ca_pem), group)) == 1


@pytest.mark.parametrize("group", ["secp384r1", "secp521r1", "X448"])
def test_the_server_refuses_the_costly_groups(
    server: ssl.SSLContext, tls_files: TLSFiles, group: str
) -> None:
    # P-384 costs OpenSSL 3.0 nine times X25519's CPU: a client must not be able to ask for it.
    with pytest.raises(ssl.SSLError, match=r"NO_SUITABLE|NO_SHARED|HANDSHAKE_FAILURE"):
        server_flights(server, only(client_context(ca=tls_files.ca_pem), group))


def test_our_client_still_reaches_a_server_with_p256_alone(tls_files: TLSFiles) -> None:
    # securemsg 0.1's servers had P-256 only: one retry, and the handshake completes.
    old = only(server_context(cert=tls_files.server_cert, key=tls_files.server_key), "prime256v1")
    assert server_flights(old, client_context(ca=tls_files.ca_pem)) == 2


def test_without_the_list_a_context_falls_back_to_p256_alone(
    tls_files: TLSFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(algorithms, "_ssl_ctx_pointer", lambda context: None)
    server = server_context(cert=tls_files.server_cert, key=tls_files.server_key)
    assert server_flights(server, only(client_context(ca=tls_files.ca_pem), "prime256v1")) == 1
    with pytest.raises(ssl.SSLError):
        server_flights(server, only(client_context(ca=tls_files.ca_pem), "X25519"))
    client = client_context(ca=tls_files.ca_pem)
    assert server_flights(server, client) == 1  # the fallback client offers P-256


def test_the_suite_list_is_set_through_openssl_here() -> None:
    assert algorithms.set_tls13_suites(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))


def test_the_server_chooses_aes128_gcm_when_the_client_offers_openssls_default_order(
    server: ssl.SSLContext, tls_files: TLSFiles
) -> None:
    # A client with OpenSSL's default order asks for AES-256-GCM/SHA-384 first; the server's
    # order decides, and SHA-256 makes its key schedule cheaper.
    plain = ssl.create_default_context(cafile=str(tls_files.ca_pem))
    plain.set_alpn_protocols(["securemsg/1"])
    assert handshake(server, plain)[1] == "TLS_AES_128_GCM_SHA256"
    assert handshake(server, client_context(ca=tls_files.ca_pem))[1] == "TLS_AES_128_GCM_SHA256"


@pytest.mark.parametrize("suite", ["TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"])
def test_a_client_that_offers_one_other_suite_still_connects(
    server: ssl.SSLContext, tls_files: TLSFiles, suite: str
) -> None:
    client = ssl.create_default_context(cafile=str(tls_files.ca_pem))
    set_suites = algorithms._openssl(
        "SSL_CTX_set_ciphersuites", ctypes.c_int, (ctypes.c_void_p, ctypes.c_char_p)
    )
    assert set_suites(algorithms._ssl_ctx_pointer(client), suite.encode()) == 1
    assert handshake(server, client) == (1, suite)


def test_without_openssls_call_the_default_suite_order_stays(
    tls_files: TLSFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(algorithms, "_ssl_ctx_pointer", lambda context: None)
    assert not algorithms.set_tls13_suites(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    server = server_context(cert=tls_files.server_cert, key=tls_files.server_key)
    assert handshake(server, client_context(ca=tls_files.ca_pem))[1] == "TLS_AES_256_GCM_SHA384"
