"""The blocking client, as ``securemsg.sync`` (it lives in :mod:`securemsg.client.sync`)."""

from __future__ import annotations

from securemsg.client.sync import SyncClient, connect

__all__ = ["SyncClient", "connect"]
