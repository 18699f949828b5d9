"""The node: what a user opens with ``async with open_node(...)``.

A node is one supervision tree (design.md §1)::

    node supervisor (one_for_one)
     ├─ compute          the user's actor; gets Delivery and Gap messages
     ├─ gatekeeper       answers ZAP (secure nodes only)
     └─ dispatcher       the I/O task: owns the ROUTER and every DEALER and
                         runs the protocol actors (actors/_dispatch.py)

The protocol actors (one PeerLink per peer it sends to, the Receiver, one
Sequencer per peer that sends to it) are synchronous actors that outlive the
dispatcher's task: a restarted dispatcher opens fresh sockets and the links
resume their pending messages instead of losing them.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from transport import (
    Incarnation,
    Limits,
    LocalProtocolError,
    Network,
    NodeId,
    Payload,
    PeerState,
    ReceiverConfig,
    SenderConfig,
    SequencerConfig,
    SequencerStatistics,
    StreamId,
    ZmqNetwork,
)
from transport.frames import (
    ReqAnswer,
)
from transport.security import (
    Security,
)
from transport.testing import (
    FaultPlan,
)

from . import _collectives
from ._actor import Actor, ActorRef
from ._collectives import COLLECTIVE_STREAM, Collectives, CollectiveStatistics, ReduceOp
from ._dispatch import Dispatcher, IoStatistics
from ._errors import ActorCrashed, BindError, NodeClosed, PeersNotUp
from ._inbound import (
    Commit,
    ForgetQuery,
    InboundStatistics,
    Query,
    QueryWaiter,
    Receiver,
    Sequencer,
)
from ._journal import DurableCell, JournalStatistics, JournalStore, JournalSync
from ._link import BatchHandle, Close, LinkStatistics, PeerLink, SendHandle, Submit, SubmitItems
from ._outcomes import Ack, DeliveryFailed, PeerError, SendError
from ._security import Gatekeeper, SecurityState, SecurityStatistics
from ._spec import Backoff, ChildSpec, Restart, Strategy
from ._supervisor import Supervisor, open_supervisor

#: The stream a message goes on when the caller names none.
DEFAULT_STREAM = StreamId("default")

#: ``CELLMESH_PLAINTEXT_WARNED=1`` in a process's environment: a parent (the
#: demo's coordinator, a launcher) has already said that this run is
#: plaintext, so this process's nodes say nothing. One warning per run.
PLAINTEXT_WARNED_ENV = "CELLMESH_PLAINTEXT_WARNED"

#: Whether this process has warned about plaintext nodes already.
_plaintext_warned = False


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything tunable about a node, with defaults that suit a LAN.

    Attributes:
        sender: retry, credit and liveness settings of every outgoing link.
        receiver: credit window and dedup bounds of the receiving side.
        streams: ordering settings per stream name; others use ``stream``.
        stream: ordering settings of any stream not in ``streams``.
        faults: seeded fault injection on everything this node sends (for
            tests and demos; off by default).
        limits: codec limits for every frame sent and received.
        restart_intensity / restart_period: the node's supervisor gives up
            (and ``open_node`` raises ``SupervisorGaveUp``) after more than
            this many restarts of its actors within this many seconds.
        compute_concurrency: messages the compute actor handles at once
            (requirement 5: process N, answer asynchronously); None takes
            the actor class's ``max_concurrency``. Ordered streams are still
            handed over in order.
        seed: seeds the retry jitter and the fault injection.
        journal_sync: with ``open_node(journal=...)``, how hard each commit
            goes to disk: ``"normal"`` (survives the process's death, not
            the OS's) or ``"full"`` (an fsync per commit: survives power
            loss too). See docs/reliability.md, "Durable receiving".
        spin: seconds the node's I/O task may poll its sockets before it
            sleeps, when nothing else in the process is ready to run: an
            answer that comes within it is taken without a trip through
            the kernel and Trio's scheduler. Adaptive (an idle node does not
            spin); 0 turns it off. docs/performance.md measures both.
    """

    sender: SenderConfig = field(default_factory=SenderConfig)
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    streams: Mapping[str, SequencerConfig] = field(default_factory=dict)
    stream: SequencerConfig = field(default_factory=SequencerConfig)
    faults: FaultPlan = field(default_factory=FaultPlan)
    limits: Limits = field(default_factory=Limits)
    restart_intensity: int = 10
    restart_period: float = 10.0
    compute_concurrency: int | None = None
    seed: int = 0
    journal_sync: JournalSync = "normal"
    #: About one far side's turn of a loopback round trip: a lockstep
    #: exchange catches its answer; a spin that misses costs at most this.
    spin: float = 0.0002


@dataclass(frozen=True, slots=True)
class NodeStatistics:
    """A snapshot of a whole node: every link, the receiving side, streams.

    ``closed`` is True once the node's ``open_node`` block has ended; the
    counters are then the last ones, and each link's ``state`` is the last
    state it saw, not a live one.
    """

    node: NodeId
    closed: bool
    incarnation: Incarnation
    links: dict[NodeId, LinkStatistics]
    inbound: InboundStatistics
    streams: dict[NodeId, dict[StreamId, SequencerStatistics]]
    security: SecurityStatistics
    collectives: CollectiveStatistics
    #: The journal of a durable node (``open_node(journal=...)``), else None.
    journal: JournalStatistics | None = None
    #: How the node's I/O task waited: parks, wakes, spins (``NodeConfig.spin``).
    io: IoStatistics = field(default_factory=IoStatistics)

    def links_summary(self) -> dict[str, dict[str, Any]]:
        """Per peer, the counters one watches, as plain JSON-ready values.

        Keys: ``state``; ``sent`` (first transmissions), ``acked``, ``erred``,
        ``gave_up``, ``resent``, ``in_flight``; ``duplicate_answers`` (answers
        this node got twice) and ``duplicates`` (the peer's messages this node
        got twice, on the receiving side); ``rtt_ms`` (smoothed, or None).
        A peer that only sends to this node has just the receiving side's
        ``duplicates`` and a ``state`` of None.
        """
        dups: dict[str, int] = {}
        for session in self.inbound.protocol.sessions:
            dups[session.peer] = dups.get(session.peer, 0) + session.duplicates
        out: dict[str, dict[str, Any]] = {}
        for peer, link in self.links.items():
            p = link.protocol
            out[peer] = {
                "state": link.state.name,
                "sent": p.sent,
                "acked": p.acked,
                "erred": p.erred,
                "gave_up": p.gave_up,
                "resent": p.resent,
                "in_flight": p.in_flight,
                "duplicate_answers": p.duplicate_answers,
                "duplicates": dups.get(peer, 0),
                "rtt_ms": None if p.rtt is None else round(p.rtt * 1000.0, 3),
            }
        for peer in self.streams:
            if peer not in out:
                out[peer] = {"state": None, "duplicates": dups.get(peer, 0)}
        return out

    def __str__(self) -> str:
        """A short table: one row per peer, then the receiving side and security in a line each."""
        rows = self.links_summary()
        header = ("peer", "state", "sent", "acked", "resent", "gave_up", "in_flight", "dups", "rtt")
        table: list[tuple[str, ...]] = [header]
        for peer, row in rows.items():
            rtt = row.get("rtt_ms")
            table.append(
                (
                    peer,
                    row["state"] or "-",
                    *(
                        str(row.get(k, "-"))
                        for k in ("sent", "acked", "resent", "gave_up", "in_flight")
                    ),
                    str(row["duplicates"]),
                    "-" if rtt is None else f"{rtt:.2f}ms",
                )
            )
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        status = "closed" if self.closed else "open"
        lines = [f"node {self.node} (incarnation {self.incarnation}, {status})"]
        for r in table:
            cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
            cells += [c.rjust(w) for c, w in zip(r[2:], widths[2:], strict=True)]
            lines.append("  " + "  ".join(cells).rstrip())
        streams = [st for by_stream in self.streams.values() for st in by_stream.values()]
        inbound = self.inbound
        lines.append(
            f"  received: {sum(st.delivered for st in streams)} delivered, "
            f"{sum(st.reordered for st in streams)} reordered, "
            f"{sum(st.gap_events for st in streams)} gaps, "
            f"{sum(inbound.rejected.values())} rejected"
        )
        sec = self.security
        if sec.secure:
            lines.append(
                f"  security: CURVE, {sec.admitted} admitted, {sum(sec.refused.values())} refused"
            )
        else:
            lines.append("  security: plaintext")
        return "\n".join(lines)


class Node:
    """A running node; made by :func:`open_node`, valid inside its block.

    Once the block has ended the node is closed, and every call on it raises
    :class:`NodeClosed` at once (``id``, ``incarnation``, ``endpoint``,
    ``peers``, ``closed`` and :meth:`statistics` still answer). A call still
    waiting when the block ends wakes: a send with :class:`DeliveryFailed`
    ("the sending node shut down"), any other wait with :class:`NodeClosed`.
    """

    def __init__(
        self,
        node_id: NodeId,
        incarnation: Incarnation,
        config: NodeConfig,
        parts: _Parts,
        supervisor: Supervisor,
    ) -> None:
        self._id = node_id
        self._incarnation = incarnation
        self._config = config
        self._links = parts.links
        self._receiver = parts.receiver
        self._sequencers = parts.sequencers
        self._dispatcher = parts.dispatcher
        self._security = parts.security
        self._collectives = parts.collectives
        self._journal = parts.journal
        self._supervisor = supervisor
        self._closed = False
        #: The cancel scopes of the calls waiting now (see _waiting).
        self._waiters: set[trio.CancelScope] = set()

    @property
    def id(self) -> NodeId:
        """This node's id."""
        return self._id

    @property
    def incarnation(self) -> Incarnation:
        """This process start's incarnation number."""
        return self._incarnation

    @property
    def endpoint(self) -> str:
        """The endpoint the node's ROUTER is bound to (with the real port)."""
        endpoint = self._dispatcher.endpoint
        assert endpoint is not None
        return endpoint

    @property
    def peers(self) -> tuple[NodeId, ...]:
        """The peers this node sends to."""
        return tuple(self._links)

    @property
    def supervisor(self) -> Supervisor:
        """The node's supervisor, to start more actors beside the node's own."""
        return self._supervisor

    @property
    def closed(self) -> bool:
        """Whether the node's ``open_node`` block has ended."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise NodeClosed(self._id)

    @contextmanager
    def _waiting(self) -> Iterator[None]:
        """Run a wait that the node's close ends, with NodeClosed.

        The waits it guards (peer state, a query's answer) are woken by tasks
        that stop with the node: without this they would wait forever.
        """
        self._check_open()
        with trio.CancelScope() as scope:
            self._waiters.add(scope)
            try:
                yield
            finally:
                self._waiters.discard(scope)
        # Only _close cancels this scope.
        if scope.cancelled_caught:
            raise NodeClosed(self._id)

    def _close(self) -> None:
        """The block is ending: refuse every new call and wake every waiting one."""
        self._closed = True
        for scope in self._waiters:
            scope.cancel()
        now = trio.current_time()
        for link in self._links.values():
            link.handle(Close(), now)

    def _link(self, peer: str) -> PeerLink:
        self._check_open()
        link = self._links.get(NodeId(peer))
        if link is None:
            raise LocalProtocolError(
                f"{peer!r} is not a peer of {self._id!r}; known peers: {sorted(self._links)}. "
                "Add it to open_node(peers=...)"
            )
        return link

    @staticmethod
    def _user_stream(stream: str) -> StreamId:
        """``stream`` as a StreamId; LocalProtocolError for the collectives' reserved one."""
        if stream == COLLECTIVE_STREAM:
            raise LocalProtocolError(
                f"stream {stream!r} is reserved for the node's collectives "
                "(barrier, broadcast, gather, allreduce); pick another name"
            )
        return StreamId(stream)

    def _deadline(self, timeout: float | None, deadline: float | None) -> float | None:
        if timeout is not None and deadline is not None:
            raise LocalProtocolError("give either timeout (seconds) or deadline (trio time)")
        if timeout is not None:
            if not timeout > 0:
                raise LocalProtocolError(f"timeout must be > 0 seconds, got {timeout!r}")
            return trio.current_time() + timeout
        return deadline

    def _send_limit(self, timeout: float | None, deadline: float | None) -> float:
        """The deadline of a waiting send: the given one, or ``sender.send_timeout`` from now."""
        limit = self._deadline(timeout, deadline)
        if limit is None:
            limit = trio.current_time() + self._config.sender.send_timeout
        return limit

    @staticmethod
    async def _wait_window_until(link: PeerLink, limit: float) -> None:
        """Wait for room in the link's window; DeliveryFailed if none comes by ``limit``.

        A send still waiting here when the node closes was pending at close,
        like one waiting for its answer: it ends with the same DeliveryFailed.
        """
        if link.accepts_now():
            # The usual case: no cancel scope (entering one costs more than
            # the rest of a lone send's caller side).
            return
        with trio.move_on_at(limit) as scope:
            try:
                await link.wait_window()
            except NodeClosed:
                raise DeliveryFailed(
                    peer=link.peer, seq=None, reason="the sending node shut down", held=False
                ) from None
        if scope.cancelled_caught:
            raise DeliveryFailed(
                peer=link.peer, seq=None, reason="the link's window stayed full", held=False
            )

    def send_nowait(
        self,
        peer: str,
        payload: Payload,
        *,
        stream: str = DEFAULT_STREAM,
        frame_no: int | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> SendHandle:
        """Start a send without waiting; ``await handle.wait()`` for its outcome.

        Args:
            peer: the node to send to.
            payload: bytes (numpy arrays too) or plain data.
            stream: the ordered stream it belongs to.
            frame_no: your own frame number, delivered with it.
            timeout: seconds to keep trying (default: ``sender.send_timeout``).
            deadline: or an absolute ``trio.current_time()`` deadline.

        The payload is kept (not copied) until the final answer and encoded
        again for each resend: send bytes, or a numpy array you will not
        change until the send is answered (``arr.tobytes()`` is a safe copy).

        Returns:
            A :class:`SendHandle`; its ``seq`` is the message's id on this link.

        Raises:
            trio.WouldBlock: the link's window is full (too many unanswered
                messages or no credit from the peer); use :meth:`send`.
            NodeClosed: the node's block has ended.
            LocalProtocolError: unknown peer, or bad arguments.
        """
        msg = Submit(
            self._user_stream(stream), payload, frame_no, self._deadline(timeout, deadline)
        )
        return self._link(peer).handle(msg, trio.current_time())

    async def wait_window(self, peer: str) -> None:
        """Wait until the link to ``peer`` accepts a new message.

        ``await node.wait_window(p)`` then ``node.send_nowait(p, ...)`` keeps
        many sends in flight without a task per send (no checkpoint when the
        window is already open).

        Raises:
            NodeClosed: the node is closed, or closed while this waited.
            LocalProtocolError: unknown peer.
        """
        await self._link(peer).wait_window()

    async def send(
        self,
        peer: str,
        payload: Payload,
        *,
        stream: str = DEFAULT_STREAM,
        frame_no: int | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> Ack:
        """Send one message and wait until the peer's compute layer took it.

        Waits first for room in the link's window (backpressure), then for the
        final answer. The message is retransmitted with backoff while the peer
        is silent, and processed at most once by each receiver process: a
        receiver killed and restarted before it answered gets the message
        again, and processes it again if the dead process already had
        (docs/reliability.md), unless the receiver keeps a journal
        (``open_node(journal=...)``, "Durable receiving" there). Nothing of
        the send is kept on disk here.

        Args: as for :meth:`send_nowait`.

        Returns:
            The peer's :class:`Ack` (with its optional result).

        Raises:
            PeerError: the peer received it and answered ERR (see ``.code``).
            DeliveryFailed: no final answer before the deadline, or the node
                closed while this waited ("the sending node shut down").
            NodeClosed: the node was already closed when this was called.
            LocalProtocolError: unknown peer, or bad arguments.
        """
        sid = self._user_stream(stream)
        link = self._link(peer)
        limit = self._send_limit(timeout, deadline)
        await self._wait_window_until(link, limit)
        handle = link.handle(Submit(sid, payload, frame_no, limit), trio.current_time())
        return await handle.wait()

    def send_batch_nowait(
        self,
        peer: str,
        payloads: Sequence[Payload],
        *,
        stream: str = DEFAULT_STREAM,
        frame_no: int | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> BatchHandle:
        """Start a batch send: several messages that travel as one.

        A batch means exactly what the same ``send_nowait`` calls, one per
        payload, on that stream would mean: each item is delivered once, in
        order, as its own :class:`Delivery` (``item`` is its index), and ends
        in its own outcome. Only the transport differs: the items travel, are
        retransmitted, deduplicated, counted against the window and credit,
        and answered as one protocol message (one ``seq``, one
        ``stream_seq``), so most of the per-message cost is paid once. For the
        same reason the batch fails as a whole: :class:`DeliveryFailed` is
        raised for all of its items, never for some.

        Args:
            peer: the node to send to.
            payloads: the items, 1 to ``NodeConfig.limits.max_items`` (4096 by
                default); the encoded batch must fit the message size limits.
            stream / frame_no / timeout / deadline: as for :meth:`send_nowait`,
                for the batch.

        Returns:
            A :class:`BatchHandle`; ``await handle.wait()`` gives one
            :class:`Ack` or :class:`PeerError` per item, in order.

        Raises:
            trio.WouldBlock: the link's window is full; use :meth:`send_batch`.
            NodeClosed: the node's block has ended.
            LocalProtocolError: unknown peer, an empty or too large batch, or
                bad arguments.
        """
        link = self._link(peer)
        msg = SubmitItems(
            self._user_stream(stream), tuple(payloads), frame_no, self._deadline(timeout, deadline)
        )
        return link.handle(msg, trio.current_time())

    async def send_batch(
        self,
        peer: str,
        payloads: Sequence[Payload],
        *,
        stream: str = DEFAULT_STREAM,
        frame_no: int | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> list[Ack | PeerError]:
        """Send a batch and wait until the peer answered every item.

        Waits first for room in the link's window, like :meth:`send`; see
        :meth:`send_batch_nowait` for what a batch means.

        Args: as for :meth:`send_batch_nowait`.

        Returns:
            One outcome per item, in order: the peer's :class:`Ack` (with that
            item's result) or the :class:`PeerError` it answered for that item.

        Raises:
            DeliveryFailed: no final answer for the batch before the deadline
                (for every item: a batch is answered as a whole), or the node
                closed while this waited.
            NodeClosed: the node was already closed when this was called.
            LocalProtocolError: unknown peer, an empty or too large batch, or
                bad arguments.
        """
        sid = self._user_stream(stream)
        link = self._link(peer)
        items = tuple(payloads)
        limit = self._send_limit(timeout, deadline)
        # Before the wait: a batch that can never be sent fails at once.
        link.check_batch_size(len(items))
        await self._wait_window_until(link, limit)
        msg = SubmitItems(sid, items, frame_no, limit)
        return await link.handle(msg, trio.current_time()).wait()

    async def send_many(
        self,
        payloads: Mapping[str, Payload],
        *,
        stream: str = DEFAULT_STREAM,
        frame_no: int | None = None,
        timeout: float | None = None,
    ) -> dict[NodeId, Ack | SendError]:
        """Send to many peers at once (fan-out) and wait for every outcome.

        Args:
            payloads: peer -> message.
            stream / frame_no / timeout: as for :meth:`send`, for each.

        Returns:
            peer -> its :class:`Ack`, or the :class:`SendError` it ended in
            (:class:`DeliveryFailed` for each send still waiting when the
            node closes).

        Raises:
            NodeClosed: the node was already closed when this was called.
            LocalProtocolError: an unknown peer (nothing is sent then).
        """
        # Every peer checked before the first send, and outside the nursery:
        # raised inside it, the error would come out in an ExceptionGroup.
        for peer in payloads:
            self._link(peer)
        results: dict[NodeId, Ack | SendError] = {}

        async def one(peer: str, payload: Payload) -> None:
            try:
                results[NodeId(peer)] = await self.send(
                    peer, payload, stream=stream, frame_no=frame_no, timeout=timeout
                )
            except SendError as exc:
                results[NodeId(peer)] = exc

        async with trio.open_nursery() as nursery:
            for peer, payload in payloads.items():
                nursery.start_soon(one, peer, payload)
        return results

    async def query(self, peer: str, *, timeout: float = 2.0) -> ReqAnswer:
        """Ask ``peer`` for its view of its link to us ("why haven't I heard?").

        Args:
            peer: a node that sends to this one.
            timeout: seconds to wait for the answer.

        Returns:
            The peer's answer: per stream, the last stream sequence number it
            sent, how many are in flight and how many it gave up.

        Raises:
            trio.TooSlowError: no answer in time (the peer is down, or has
                never connected to us).
            NodeClosed: the node is closed, or closed while this waited.
        """
        waiter = QueryWaiter()
        receiver = self._receiver
        try:
            with self._waiting(), trio.fail_after(timeout):
                while True:
                    receiver.handle(Query(NodeId(peer), waiter), trio.current_time())
                    # REQs travel unconfirmed: ask again if the answer is slow.
                    with trio.move_on_after(min(0.5, timeout / 2)):
                        await waiter.event.wait()
                    if waiter.answer is not None:
                        return waiter.answer
        finally:
            receiver.handle(ForgetQuery(waiter), trio.current_time())

    def state(self, peer: str) -> PeerState:
        """The peer's liveness as this node's link sees it: UP, SUSPECT, DOWN or LOST.

        LOST: heard once, then DOWN for ``SenderConfig.lost_grace``; every
        send to it fails at once until it is heard again (docs/protocol.md §5.6).

        A closed node raises rather than answer: it has no link any more, and
        DOWN would say the *peer* is unreachable, which nobody measured.
        :attr:`closed` and :meth:`statistics` still answer on a closed node.

        Raises:
            NodeClosed: the node's block has ended.
            LocalProtocolError: unknown peer.
        """
        state: PeerState = self._link(peer).state.value
        return state

    async def wait_state(self, peer: str, state: PeerState) -> None:
        """Wait until the link to ``peer`` reports ``state``.

        ``await node.wait_state(peer, PeerState.LOST)`` is how an application
        hears that a rank is gone (silent for ``down_after + lost_grace``,
        10 s by default): every send to it fails at once from then on.

        Raises:
            NodeClosed: the node is closed, or closed while this waited.
            LocalProtocolError: unknown peer.
        """
        link = self._link(peer)
        with self._waiting():
            await link.state.wait_value(state)

    async def wait_all_up(self, *, timeout: float | None = None) -> None:
        """Wait until every outgoing link has heard from its peer.

        Args:
            timeout: seconds to wait; default: no limit.

        Raises:
            PeersNotUp: the timeout passed first; it names the peers still
                not UP, with their endpoints.
            NodeClosed: the node is closed, or closed while this waited.
            LocalProtocolError: a timeout that is not > 0.
        """
        limit = self._deadline(timeout, None)
        with self._waiting(), trio.move_on_at(math.inf if limit is None else limit) as scope:
            for link in self._links.values():
                await link.state.wait_value(PeerState.UP)
        if scope.cancelled_caught:
            assert timeout is not None
            missing: dict[str, str] = {
                peer: link.endpoint
                for peer, link in self._links.items()
                if link.state.value is not PeerState.UP
            }
            raise PeersNotUp(self._id, missing, timeout)

    # --- collectives (actors/_collectives.py) -------------------------------------

    async def _send_collective(self, peer: str, payload: Any, limit: float | None) -> SendHandle:
        """Start one collective message to ``peer``; waits for window room first."""
        link = self._link(peer)
        until = (
            limit if limit is not None else trio.current_time() + self._config.sender.send_timeout
        )
        await self._wait_window_until(link, until)
        return link.handle(Submit(COLLECTIVE_STREAM, payload, None, until), trio.current_time())

    def _group(self, group: Sequence[str] | None) -> list[str]:
        return _collectives.check_group(self, group, tuple(self._links))

    async def barrier(
        self, *, group: Sequence[str] | None = None, timeout: float | None = None
    ) -> None:
        """Wait until every rank of ``group`` has called ``barrier`` too.

        A dissemination barrier: ceil(log2 N) rounds of one message per rank.
        Every collective (this, :meth:`broadcast`, :meth:`gather`,
        :meth:`allreduce`) runs over the node's links, so drops, duplicates,
        reordering and a paused peer only delay it; it returns once every
        message it sent has been taken by its rank, so leaving the node's
        block right after it is safe.

        Args:
            group: the node ids taking part, in rank order, this node among
                them; every rank must pass the same list, and every member
                must be a peer of every other (a full mesh). Default: this
                node and all its peers, sorted (right when the topology links
                every node to every other). On a grid, see
                :meth:`neighbour_barrier`.
            timeout: seconds to wait; default: no limit.

        Raises:
            CollectiveTimeout: the timeout passed first; it names the ranks
                this node still waited for (``actors.collectives``).
            DeliveryFailed / PeerError: a message of ours failed.
            NodeClosed: the node is closed, or closed while this waited.
            LocalProtocolError: a bad group, or a collective on the same
                group already running on this node (a group's collectives
                run one at a time, in the same order on every rank).
        """
        members = self._group(group)
        with self._waiting():
            await _collectives.barrier(self, self._collectives, members, timeout)

    async def broadcast(
        self,
        value: Any,
        *,
        root: str | None = None,
        group: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Give ``root``'s value to every rank of ``group`` (a binomial tree).

        Args:
            value: on the root, what to send: anything a payload can carry
                (bytes, numbers, strings, lists, dicts: CBOR); ignored on
                the other ranks.
            root: the node id whose value every rank gets; default: the
                group's first.
            group / timeout: as for :meth:`barrier`.

        Returns:
            The root's value, on every rank (lists come back as lists).

        Raises:
            as for :meth:`barrier`; LocalProtocolError also for a root
            outside the group or a value no payload can carry.
        """
        members = self._group(group)
        with self._waiting():
            return await _collectives.broadcast(
                self, self._collectives, members, value, root, timeout
            )

    async def gather(
        self,
        value: Any,
        *,
        root: str | None = None,
        group: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> list[Any] | None:
        """Collect every rank's ``value`` on ``root`` (a binomial tree).

        Args:
            value: this rank's contribution (anything a payload can carry).
            root: the node id that gets them all; default: the group's first.
            group / timeout: as for :meth:`barrier`.

        Returns:
            On the root, every rank's value in group order; None elsewhere.

        Raises:
            as for :meth:`broadcast`.
        """
        members = self._group(group)
        with self._waiting():
            return await _collectives.gather(self, self._collectives, members, value, root, timeout)

    async def allreduce(
        self,
        value: Any,
        *,
        op: ReduceOp = "sum",
        group: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Combine every rank's ``value`` with ``op``; every rank gets the result.

        Recursive doubling: log2(N) rounds (two more when N is not a power of
        two). Every rank computes the same expression in rank order,
        ``v0 op v1 op ... op vN-1``, so the result is identical everywhere
        (bit for bit for floats) and ``op`` need be associative only.

        Args:
            value: this rank's contribution (anything a payload can carry).
            op: ``"sum"`` (``+``), ``"min"``, ``"max"`` (any values Python can
                add or compare), or a function ``(a, b) -> c``.
            group / timeout: as for :meth:`barrier`.

        Returns:
            The reduction of every rank's value.

        Raises:
            as for :meth:`barrier`; LocalProtocolError also for an unknown
            ``op`` name or a value no payload can carry; whatever ``op``
            raises.
        """
        members = self._group(group)
        _collectives.reduce_op(op)
        with self._waiting():
            return await _collectives.allreduce(
                self, self._collectives, members, value, op, timeout
            )

    async def neighbour_barrier(
        self, *, peers: Sequence[str] | None = None, timeout: float | None = None
    ) -> None:
        """A barrier with the neighbours only: for topologies that are not a full mesh.

        Two rounds with each of ``peers``: when it returns, every one of them
        has called ``neighbour_barrier`` naming this node, and has heard from
        all of its own. A grid starts its frame clocks with it, as MPI codes
        start from a barrier. Counted per pair of nodes, so each pair must
        share the same number of neighbour barriers.

        Args:
            peers: the neighbours to wait for; default: every peer this node
                sends to.
            timeout: seconds to wait; default: no limit.

        Raises:
            as for :meth:`barrier`; LocalProtocolError for a name that is not
            a peer this node sends to.
        """
        names = [str(p) for p in (self._links if peers is None else peers)]
        for name in names:
            self._link(name)
        if len(set(names)) != len(names):
            raise LocalProtocolError(f"peers {names} names a node twice")
        with self._waiting():
            await _collectives.neighbour_barrier(self, self._collectives, names, timeout)

    def statistics(self) -> NodeStatistics:
        """Counters of every link, of the receiving side and of every stream.

        It answers on a closed node too (``closed`` is then True), so what a
        node did can be read after its block has ended.
        """
        return NodeStatistics(
            node=self._id,
            closed=self._closed,
            incarnation=self._incarnation,
            links={peer: link.statistics() for peer, link in self._links.items()},
            inbound=self._receiver.statistics(),
            streams={peer: seq.statistics() for peer, seq in self._sequencers.items()},
            security=self._security.statistics(),
            collectives=self._collectives.statistics(),
            journal=None if self._journal is None else self._journal.statistics(),
            io=self._dispatcher.statistics(),
        )


ComputeFactory = Callable[[], Actor[Any, Any]]


@asynccontextmanager
async def open_node(
    node_id: str,
    *,
    bind: str,
    peers: Mapping[str, str | None] | None = None,
    compute: ComputeFactory | None = None,
    config: NodeConfig | None = None,
    incarnation: int | None = None,
    network: Network | None = None,
    security: Security | None = None,
    journal: str | os.PathLike[str] | None = None,
) -> AsyncIterator[Node]:
    """Open a node inside any Trio program; leaving the block shuts it down.

    Args:
        node_id: this node's id, unique in its topology.
        bind: where this node's ROUTER listens (``tcp://127.0.0.1:5601``,
            ``tcp://127.0.0.1:*``, ``ipc:///tmp/n1.sock``).
        peers: peer id -> endpoint for each peer this node sends to; an
            endpoint of None marks a peer that only sends to us. Frames from
            nodes not listed here are refused.
        compute: factory of the compute actor that gets this node's
            :class:`Delivery` (and :class:`Gap`) messages; returning from its
            ``receive`` answers ACK, raising ``Reject`` answers ERR. Without
            one, every message is answered ERR ``NO_HANDLER``.
        config: tuning; see :class:`NodeConfig`.
        incarnation: override the process start's incarnation (tests);
            default ``time.time_ns()``, so a restart always shows a greater one.
        network: where the node's sockets come from; default real ZeroMQ.
            Pass a ``MemoryNetwork`` (``actors.testing``) to run nodes in
            one process under virtual time with faults the test controls.
        security: this node's CURVE keys and its peers' public keys
            (:func:`load_security`). Every link is then encrypted, only the
            peers' keys may connect, and who sent a message is taken from its
            connection's key. Without it the node runs plaintext and says so
            in a warning on the ``cellmesh.security`` logger, once per process
            (none at all when ``CELLMESH_PLAINTEXT_WARNED=1`` is set: a parent
            process already said it).
        journal: a sqlite file that makes receiving durable: the compute
            actor's state (it must be an ``actors.journal.Durable``, one
            message at a time) and the node's receive state are committed
            together, each answer leaves only after its commit, and a node
            restarted with the same id and file resumes where the last
            commit left it: a message it answered is not processed again.
            See docs/reliability.md, "Durable receiving".

    Yields:
        The running :class:`Node`.

    Raises:
        SupervisorGaveUp: the node's actors kept failing beyond the restart
            intensity.
        BindError: ``bind`` could not be bound (the port is in use, or the
            endpoint is malformed); it names the endpoint.
        LocalProtocolError: ``security`` lacks a peer's key, or comes with
            a ``network`` (give the keys to ``ZmqNetwork(security=...)``);
            ``journal`` without ``compute``, or a journal of another node
            or of a later incarnation.
    """
    cfg = config if config is not None else NodeConfig()
    me = NodeId(node_id)
    inc = Incarnation(incarnation if incarnation is not None else time.time_ns())
    peer_map = {NodeId(p): e for p, e in (peers or {}).items()}
    if me in peer_map:
        raise LocalProtocolError(f"node {node_id!r} lists itself among its peers")
    if not 0.0 <= cfg.spin <= 1.0:
        raise LocalProtocolError(
            f"NodeConfig.spin must be 0 (off) to 1 second, got {cfg.spin!r} (default 0.0002)"
        )
    keys = _keys(node_id, bind, peer_map, network, security)
    guard = SecurityState(me, keys, frozenset(peer_map))
    store: JournalStore | None = None
    if journal is not None:
        if compute is None:
            raise LocalProtocolError(
                "a journal makes a compute actor's state durable: give open_node a compute= "
                "factory too"
            )
        store = JournalStore(journal, me, inc, sync=cfg.journal_sync, limits=cfg.limits)
    # The node closes only a network it made; a network passed in is the caller's.
    owned: ZmqNetwork | None = None
    try:
        if network is None:
            network = owned = ZmqNetwork(security=security)
        async with open_supervisor(
            name=f"node:{node_id}",
            strategy=Strategy.ONE_FOR_ONE,
            intensity=cfg.restart_intensity,
            period=cfg.restart_period,
            backoff=Backoff(initial=0.05, factor=2.0, maximum=2.0),
        ) as sup:
            compute_ref: ActorRef[Any, Any] | None = None
            cell: DurableCell | None = None
            if compute is not None:
                spec = ChildSpec(
                    "compute",
                    compute,
                    restart=Restart.PERMANENT,
                    mailbox_size=_compute_mailbox(cfg, len(peer_map)),
                    max_concurrency=cfg.compute_concurrency,
                )
                if store is None:
                    compute_ref = await sup.start_child(spec)
                else:
                    cell = DurableCell(spec, store)
                    compute_ref = await sup._start_cell(cell)
            parts = _build(me, inc, bind, peer_map, cfg, network, guard, compute_ref, store)
            if cell is not None:
                receiver = parts.receiver
                cell.bind(lambda state: receiver.handle(Commit(state), trio.current_time()))
            await _start_io(sup, parts, network, guard)
            node = Node(me, inc, cfg, parts, sup)
            try:
                yield node
            finally:
                node._close()
    finally:
        if owned is not None:
            owned.close()
        if store is not None:
            store.close()


@dataclass(frozen=True, slots=True)
class _Parts:
    """The protocol actors of one node and the dispatcher that runs them."""

    dispatcher: Dispatcher
    receiver: Receiver
    sequencers: dict[NodeId, Sequencer]
    links: dict[NodeId, PeerLink]
    security: SecurityState
    collectives: Collectives
    journal: JournalStore | None


def _keys(
    node_id: str,
    bind: str,
    peer_map: Mapping[NodeId, str | None],
    network: Network | None,
    security: Security | None,
) -> Security | None:
    """The keys the node runs with; warns when it runs plaintext on a real network."""
    if security is not None and network is not None:
        raise LocalProtocolError("give the keys to the network you pass: ZmqNetwork(security=...)")
    keys = network.security if isinstance(network, ZmqNetwork) else security
    if keys is not None:
        missing = sorted(p for p in peer_map if p not in keys.peers)
        if missing:
            raise LocalProtocolError(f"security has no public key for peers {missing}")
    elif network is None or isinstance(network, ZmqNetwork):
        _warn_plaintext(node_id, bind)
    return keys


def _warn_plaintext(node_id: str, bind: str) -> None:
    """Say once per run that nodes run plaintext: per node, a local demo printed five."""
    global _plaintext_warned
    if _plaintext_warned or os.environ.get(PLAINTEXT_WARNED_ENV) == "1":
        return
    _plaintext_warned = True
    logging.getLogger("cellmesh.security").warning(
        "node %s runs UNAUTHENTICATED, unencrypted: whoever reaches %s may send as any "
        "node. Fine on one machine; on a network give it keys (docs/security.md). "
        "Said once per run: later plaintext nodes are not reported",
        node_id,
        bind,
    )


def _compute_mailbox(cfg: NodeConfig, peers: int) -> int:
    """A compute mailbox the protocol bounds, so the dispatcher never waits on it.

    Each peer has at most ``receiver.window`` messages held by this node (a
    batch is one mailbox entry), so peers x window deliveries fit, plus room
    for the Gap notices of every stream.
    """
    return max(64, peers * cfg.receiver.window + 64)


def _build(
    me: NodeId,
    inc: Incarnation,
    bind: str,
    peer_map: Mapping[NodeId, str | None],
    cfg: NodeConfig,
    network: Network,
    guard: SecurityState,
    compute: ActorRef[Any, Any] | None,
    journal: JournalStore | None,
) -> _Parts:
    """Make the node's protocol actors and the dispatcher that will run them."""
    dispatcher = Dispatcher(network, bind, me.encode(), guard, spin=cfg.spin)
    receiver = Receiver(
        me,
        inc,
        frozenset(peer_map),
        dispatcher,
        config=cfg.receiver,
        faults=cfg.faults,
        limits=cfg.limits,
        security=guard,
        journal=journal,
    )
    streams = {StreamId(name): sc for name, sc in cfg.streams.items()}
    resume = {} if journal is None else journal.recovered.streams
    collectives = Collectives(receiver)
    own = {COLLECTIVE_STREAM: collectives}
    sequencers = {
        peer: Sequencer(receiver, peer, compute, streams, cfg.stream, own, resume.get(peer))
        for peer in peer_map
    }
    receiver.adopt(sequencers)
    links = {
        peer: PeerLink(
            me,
            inc,
            peer,
            endpoint,
            dispatcher,
            config=cfg.sender,
            faults=cfg.faults,
            limits=cfg.limits,
            seed=cfg.seed,
        )
        for peer, endpoint in peer_map.items()
        if endpoint is not None
    }
    dispatcher.serve(receiver, list(links.values()), list(sequencers.values()))
    return _Parts(dispatcher, receiver, sequencers, links, guard, collectives, journal)


async def _start_io(sup: Supervisor, parts: _Parts, network: Network, guard: SecurityState) -> None:
    """Start the gatekeeper (secure nodes) and the dispatcher, which binds the ROUTER."""
    if guard.secure:
        assert isinstance(network, ZmqNetwork)
        zmq_net = network
        # Before the ROUTER binds: with ZAP_ENFORCE_DOMAIN a peer
        # that connects while nobody answers ZAP is turned away.
        await sup.start_child(ChildSpec("gatekeeper", lambda: Gatekeeper(guard, zmq_net)))
    try:
        await sup.start_child(ChildSpec("dispatcher", parts.dispatcher.factory()))
    except ActorCrashed as exc:
        # A busy or bad endpoint is the caller's to fix: raise the
        # BindError that names it, not the internal task it failed in.
        cause = exc.__cause__
        if isinstance(cause, BindError):
            raise cause from cause.__cause__
        raise
