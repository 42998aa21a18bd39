"""The datagram channel's client, as ``securemsg.datagram`` (it lives in
:mod:`securemsg.client.datagram` and :mod:`securemsg.client.datagram_sync`): ``connect``
(asyncio) and ``connect_sync`` (blocking). Importing it loads pyOpenSSL."""

from __future__ import annotations

from securemsg.client.datagram import DatagramClient, connect
from securemsg.client.datagram_sync import SyncDatagramClient, connect_sync

__all__ = ["DatagramClient", "SyncDatagramClient", "connect", "connect_sync"]
