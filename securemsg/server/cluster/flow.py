"""Flow control across nodes: a publisher is held back by a congested session on another
node as it is by one on its own (docs/protocol.md section 5, docs/cluster.md).

- When a message from a publisher on another node reaches a congested session here, this
  node tells the cluster (``sm.congested``: the session's key, name and filters), again every
  beat while it lasts, and ``sm.relieved`` once acknowledgements relieve it or it ends or
  leaves the node;
- a session's congestion counts the stream messages its node has not read yet
  (:meth:`~securemsg.core.delivery.DeliveryLog.press`, from the stream reader): a
  publisher's node may run ahead of this one, and its backlog must not overflow a session;
- every node keeps the others' congested sessions (:class:`~securemsg.core.cluster.
  CongestedElsewhere`), each as a placeholder session; a local publish or direct that
  reaches one makes its publisher wait for it exactly as for a local one (its connection
  stops carrying out requests) until the relief note comes, or the entry expires (not
  re-announced for ``node_timeout``, or its node died);
- the slow-consumer rule: a session announced congested counts as waited for here (it is in
  :attr:`~securemsg.server.broker.Broker.stalled`) until relieved, so it is cut after
  ``slow_consumer_timeout`` without acknowledgements, as on one server. This node does not
  learn whether the remote publisher still waits (it may have gone): a congested session
  that acknowledges nothing for that long is cut anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from securemsg.core.cluster import CongestedElsewhere, CongestionNote, ReliefNote
from securemsg.core.server_session import ServerSession
from securemsg.server.broker import Link, Session
from securemsg.server.cluster.link import ClusterSettings
from securemsg.server.cluster.registry import ClusterRegistry

__all__ = ["ClusterFlow"]

logger = structlog.get_logger("securemsg.server.cluster")

_congestions = msgspec.json.Decoder(CongestionNote)
_reliefs = msgspec.json.Decoder(ReliefNote)
_json = msgspec.json.encode


class ClusterFlow(ClusterRegistry):
    """The flow-control notes of a cluster node (see the module doc)."""

    def __init__(
        self,
        settings: ClusterSettings,
        *,
        on_lost: Callable[[], None],
        on_drop: Callable[[Session], None],
        **options: Any,
    ) -> None:
        super().__init__(settings, on_lost=on_lost, on_drop=on_drop, **options)
        #: Congested sessions of other nodes, each standing here as a placeholder session.
        self.elsewhere: CongestedElsewhere[Session] = CongestedElsewhere(
            ttl=self.settings.node_timeout
        )
        #: This node's sessions the cluster was told are congested.
        self.announced: dict[Session, None] = {}
        #: Sessions congested by this node's unread backlog (DeliveryLog.press).
        self.pressed: dict[Session, None] = {}
        #: Notes not yet handed to NATS, and who waits until they are.
        self.notes: list[tuple[str, bytes]] = []
        self._notes_wake = asyncio.Event()
        self._notes_waiters: list[asyncio.Future[None]] = []
        #: The stream reader queued notes and must wait until they left (_pause_reading).
        self._notes_due = False

    async def start_flow(self) -> None:
        nc = self.link.nc
        assert nc is not None
        await nc.subscribe("sm.congested", cb=self._on_congested)
        await nc.subscribe("sm.relieved", cb=self._on_relieved)
        self.spawn(self._every(self.settings.beat_interval, self._flow_beat))
        self.spawn(self._send_notes())

    # -- the notes: sent at once, not behind the stream publishes ---------------------------

    def _note(self, subject: str, note: CongestionNote | ReliefNote) -> None:
        if self.available:
            self.notes.append((subject, _json(note)))
            self._notes_wake.set()

    async def _send_notes(self) -> None:
        nc = self.link.nc
        assert nc is not None
        while True:  # bounded by the node's life: cancelled at stop
            await self._notes_wake.wait()
            self._notes_wake.clear()
            notes, self.notes = self.notes, []
            waiters, self._notes_waiters = self._notes_waiters, []
            try:
                for subject, data in notes:
                    await nc.publish(subject, data)
                await nc.flush(timeout=max(1, round(self.settings.request_timeout)))
            except (NatsError, TimeoutError) as exc:
                logger.debug("cluster_request_failed", request="flow_note", error=repr(exc))
            finally:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)

    async def notes_out(self) -> None:
        """Return once the notes queued so far reached NATS. The stream reader calls it
        after announcing: it would otherwise deliver its whole backlog before the note
        left (it does not yield while messages are queued), and the publishers elsewhere
        would go on meanwhile."""
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._notes_waiters.append(waiter)
        self._notes_wake.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.request_timeout):
                await waiter

    # -- this node's congested sessions ----------------------------------------------------

    def congested_here(self, member: Session, sender: str) -> None:
        """A message from ``sender`` made ``member`` congested (or more so)."""
        publisher = self.by_name.get(sender)
        if publisher is not None:
            self._wait(publisher, member)  # on this node: as on one server
        elif member not in self.announced and member in self.states:
            self.announced[member] = None
            self.stalled.add(member)  # the slow-consumer rule counts the remote waiters
            self._announce(member)

    def caught_up(self, behind: int) -> None:
        """This node is ``behind`` stream messages now: a session pressed by more is
        relieved once its pending and that are down to a quarter, even if nothing more
        comes to it (its publishers wait) and it has nothing left to acknowledge."""
        for session in list(self.pressed):
            log = session.delivery
            if not log.coming or self.by_token.get(session.token) is not session:
                del self.pressed[session]  # relieved by an ack meanwhile, or gone
            elif log.settle(behind):
                del self.pressed[session]
                self.relieved(session)

    def _announce(self, member: Session) -> None:
        state = self.states.get(member)
        if state is None or not self.available:
            return
        filters = sorted(self.rooms.filters_of(member))
        self._note("sm.congested", CongestionNote(self.node, state.key, member.name, filters))

    def relieved(self, session: Session) -> None:
        since = session.stalled_since
        super().relieved(session)
        if session not in self.announced:
            return
        if session.delivery.congested and self.by_token.get(session.token) is session:
            # Its last local waiter went, but the remote ones still wait: still stalled.
            session.stalled_since = since
            self.stalled.add(session)
            return
        del self.announced[session]
        state = self.states.get(session)
        if state is not None:
            self._note("sm.relieved", ReliefNote(self.node, state.key))

    async def _flow_beat(self) -> None:
        """Re-announce what is still congested (a node that joined since, or missed a note,
        learns it); forget the other nodes' notes that stopped coming."""
        for member in list(self.announced):
            self._announce(member)
        for placeholder in self.elsewhere.expired(now=self.loop.time(), live=self.is_live):
            self.relieved(placeholder)

    # -- the other nodes' ------------------------------------------------------------------

    async def _on_congested(self, msg: Msg) -> None:
        note = _congestions.decode(msg.data)
        if note.node != self.node:
            self.elsewhere.heard(note, now=self.loop.time(), make=lambda: _placeholder(note))

    async def _on_relieved(self, msg: Msg) -> None:
        note = _reliefs.decode(msg.data)
        placeholder = self.elsewhere.relieved(note.session)
        if placeholder is not None:
            self.relieved(placeholder)

    def hold_for_remote(self, publisher: Session, kind: str, target: str) -> None:
        """``publisher``'s publish (``kind`` "r" to room ``target``) or direct ("d" to name
        ``target``) reaches congested sessions of other nodes: it waits for them."""
        for placeholder in self.elsewhere.reached(kind, publisher.name, target):
            self._wait_remote(publisher, placeholder)

    def _wait_remote(self, publisher: Session, placeholder: Session) -> None:
        """:meth:`~securemsg.server.broker.Broker._wait` for a placeholder: never stalled
        here (its own node applies the slow-consumer rule)."""
        if publisher.link is None:
            return
        waiting_on = publisher.waiting_on
        if waiting_on is None:
            waiting_on = publisher.waiting_on = set()
        elif placeholder in waiting_on:
            return
        waiting_on.add(placeholder)
        if placeholder.waiters is None:
            placeholder.waiters = set()
        placeholder.waiters.add(publisher)
        if len(waiting_on) == 1:
            publisher.link.pause_reading()


def _placeholder(note: CongestionNote) -> Session:
    """A remote congested session as a session here: only its ``waiters`` are used."""
    return ServerSession[Link](
        sid=f"remote-{note.session[:12]}", name=note.name, token="", max_pending=1, dedup_window=1
    )
