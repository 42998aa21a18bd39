"""``securemsg bench``: drive a server with real clients (imported only by that command).

This file stays free of imports: the command line reads :data:`SCENARIOS` to build its parser.
"""

from __future__ import annotations

from typing import Final

__all__ = ["SCENARIOS"]

SCENARIOS: Final = ("pubsub", "fanout", "rtt", "connections", "handshakes", "datagram")
