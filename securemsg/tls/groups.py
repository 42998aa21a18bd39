"""The key exchange groups of an SSL context: X25519 first, P-256 for everyone else.

Why these two and no others (server CPU per full TLS 1.3 handshake, OpenSSL 3.0, ECDSA
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
"""

from __future__ import annotations

import ctypes
import functools
import ssl
import sys
from typing import Any, Final

__all__ = ["FALLBACK_GROUP", "GROUPS", "set_groups"]

#: In order of preference. A client sends its key share for the first one; a server whose
#: list lacks it answers with a HelloRetryRequest for one it has.
GROUPS: Final = "X25519:P-256"
#: What a context gets when the list cannot be set.
FALLBACK_GROUP: Final = "prime256v1"

_SSL_CTRL_SET_GROUPS_LIST: Final = 92  # OpenSSL 1.1.1 and 3.x, ssl.h


def set_groups(context: ssl.SSLContext) -> bool:
    """Limit ``context`` to :data:`GROUPS`; False if only :data:`FALLBACK_GROUP` could be set."""
    if _set_groups_list(context, GROUPS.encode()):
        return True
    context.set_ecdh_curve(FALLBACK_GROUP)
    return False


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
