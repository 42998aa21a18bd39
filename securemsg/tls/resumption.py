"""TLS session resumption on the client: a context that offers its last session.

The server side is one setting (``server_context(session_tickets=N)``); see
docs/security.md for what resumption changes.
"""

from __future__ import annotations

import ssl

__all__ = ["ResumingContext"]


class ResumingContext(ssl.SSLContext):
    """A client context that offers the TLS session of its last connection to the next.

    asyncio's and uvloop's SSL transports both make their ``SSLObject`` with
    ``context.wrap_bio(incoming, outgoing, server_side=..., server_hostname=...)`` and no
    ``session``: this override adds the one :meth:`remember` kept. A session is only ever
    offered to the host name it was made with, and OpenSSL only accepts one made by the
    same context. A server that does not know the ticket (it restarted, or sends none)
    just makes a full handshake.
    """

    _sessions: dict[str | None, ssl.SSLSession]

    def remember(self, ssl_object: ssl.SSLObject | None, *, host: str | None) -> None:
        """Keep ``ssl_object``'s session for the next connection to ``host`` if it carries
        a ticket (a TLS 1.3 server sends them after its handshake, before any data)."""
        session = None if ssl_object is None else ssl_object.session
        sessions = self.__dict__.setdefault("_sessions", {})
        if session is not None and session.has_ticket:
            sessions[host] = session
        else:
            sessions.pop(host, None)

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and not server_side:
            host = (
                server_hostname.decode() if isinstance(server_hostname, bytes) else server_hostname
            )
            session = self.__dict__.get("_sessions", {}).get(host)
        return super().wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
