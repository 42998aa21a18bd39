"""What an SSL context's handshakes compute with: the key exchange groups (X25519 first,
P-256 for everyone else) and the order of the TLS 1.3 cipher suites (AES-128-GCM first).

Groups. Why these two and no others (server CPU per full TLS 1.3 handshake, OpenSSL 3.0, ECDSA
certificate, `bench/tls_resumption.py`'s harness): X25519 190 µs, P-256 255 µs, X448 420 µs,
P-521 780 µs, P-384 1,700 µs. OpenSSL's default list holds all five, so a client that offered
only P-384 could make each of its handshakes cost the server nine of ours; these two cap it
at P-256's. Both are in Mozilla's profiles, and P-256 is the group every TLS 1.3 peer must
support (RFC 8446, 9.1), so no client is locked out.

Python 3.11 sets one group only (``SSLContext.set_ecdh_curve``), and a list otherwise needs
an OpenSSL configuration file, which is process-wide. So the list is set here through
OpenSSL's own call, ``SSL_CTX_set1_groups_list``, reached with ctypes on the context's
``SSL_CTX`` (the first field after the object header in CPython's ``PySSLContext``). Where
that cannot be done (another interpreter, an OpenSSL linked in without exported symbols),
the context gets P-256 alone, which every peer speaks: slower, never incompatible.

TLS 1.3 cipher suites. OpenSSL's default order puts AES-256-GCM with SHA-384 first; the
suite's hash is the hash of the whole key schedule (a dozen HKDF steps and the transcript),
and SHA-384 runs on the SHA-512 code where SHA-256 has the CPU's SHA extensions. With
AES-128-GCM and SHA-256 first (Go's order, and what Mozilla's profiles allow), the server's
CPU per full handshake drops by ~80,000 instructions of ~3.1 million (callgrind, see
docs/benchmarks.md). All three suites stay on, so every TLS 1.3 peer still connects. Python
3.11 has no call for this list (``set_ciphers`` is TLS 1.2's), so it is set with
``SSL_CTX_set_ciphersuites``; where that cannot be done, OpenSSL's default order stays.
"""

from __future__ import annotations

import ctypes
import functools
import ssl
import sys
from typing import Any, Final

__all__ = ["FALLBACK_GROUP", "GROUPS", "TLS13_SUITES", "set_groups", "set_tls13_suites"]

#: In order of preference. A client sends its key share for the first one; a server whose
#: list lacks it answers with a HelloRetryRequest for one it has.
GROUPS: Final = "X25519:P-256"
#: What a context gets when the list cannot be set.
FALLBACK_GROUP: Final = "prime256v1"

_SSL_CTRL_SET_GROUPS_LIST: Final = 92  # OpenSSL 1.1.1 and 3.x, ssl.h

#: TLS 1.3 suites in the server's order of preference (Python's server contexts choose by
#: their own order: ``OP_CIPHER_SERVER_PREFERENCE``).
TLS13_SUITES: Final = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


def set_groups(context: ssl.SSLContext) -> bool:
    """Limit ``context`` to :data:`GROUPS`; False if only :data:`FALLBACK_GROUP` could be set."""
    if _set_groups_list(context, GROUPS.encode()):
        return True
    context.set_ecdh_curve(FALLBACK_GROUP)
    return False


def set_tls13_suites(context: ssl.SSLContext) -> bool:
    """Order ``context``'s TLS 1.3 suites as :data:`TLS13_SUITES`; False if OpenSSL's default
    order had to stay."""
    set_suites = _openssl(
        "SSL_CTX_set_ciphersuites", ctypes.c_int, (ctypes.c_void_p, ctypes.c_char_p)
    )
    ssl_ctx = _ssl_ctx_pointer(context)
    if set_suites is None or ssl_ctx is None:
        return False
    return bool(set_suites(ssl_ctx, TLS13_SUITES.encode()) == 1)


def _set_groups_list(context: ssl.SSLContext, groups: bytes) -> bool:
    control = _openssl(
        "SSL_CTX_ctrl",
        ctypes.c_long,
        (ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p),
    )
    if control is None:
        return False
    ssl_ctx = _ssl_ctx_pointer(context)
    if ssl_ctx is None:
        return False
    return bool(control(ssl_ctx, _SSL_CTRL_SET_GROUPS_LIST, 0, groups) == 1)


def _ssl_ctx_pointer(context: ssl.SSLContext) -> int | None:
    if sys.implementation.name != "cpython" or not isinstance(context, ssl.SSLContext):
        return None
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    get_options = _openssl("SSL_CTX_get_options", ctypes.c_uint64, (ctypes.c_void_p,))
    # The layout is CPython's private business: read the options back through the pointer
    # and use it only if they are the context's own.
    if pointer is None or get_options is None or get_options(pointer) != int(context.options):
        return None
    return pointer


@functools.cache
def _openssl(name: str, restype: Any, argtypes: tuple[Any, ...]) -> Any:
    """An OpenSSL function of the library the ssl module uses, or None."""
    # _ssl's own handle: dlsym searches the libraries it was linked against. Without a
    # file (_ssl built into the interpreter) the interpreter's own symbols are searched.
    import _ssl

    try:
        library = ctypes.CDLL(getattr(_ssl, "__file__", None))
    except OSError:
        return None
    function = getattr(library, name, None)
    if function is not None:
        function.restype = restype
        function.argtypes = argtypes
    return function
