"""A securemsg server as a node of a cluster over NATS JetStream (``--cluster``).

Imported only when the server is given ``--cluster``: the single server does not load NATS.
See docs/cluster.md for the design.
"""

from __future__ import annotations

from securemsg.server.cluster.broker import ClusterBroker
from securemsg.server.cluster.link import ClusterSettings

__all__ = ["ClusterBroker", "ClusterSettings"]
