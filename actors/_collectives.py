"""Collectives: barrier, broadcast, gather and allreduce over a node's reliable links.

Every collective message is an ordinary DATA on one reserved stream,
:data:`COLLECTIVE_STREAM`: sent by ``PeerLink``, retried, deduplicated and
put in order like any other, so the fault network (drop, duplicate, reorder,
pause) is the links' problem, not this module's. At the receiving end the
peer's Sequencer hands what it releases on that stream to the node's
:class:`Collectives` actor instead of the compute actor: the user's compute
never sees a collective message, and a node without a compute actor still
takes part in collectives.

:class:`Collectives` is a synchronous actor like the protocol actors
(docs/architecture.md, rule 2): its handler files each arrival under its tag
and never awaits; the collective running in the caller's task takes what it
needs from it. A message is answered ACK only when its collective takes it,
so an arrival from a rank that is one collective ahead holds one of that
peer's credits until this node gets there: the receive window bounds what
is buffered, and a rank can never run more than one collective ahead of a
rank it sends to (each collective waits for its own sends' ACKs before it
returns, which also makes leaving the node's block right after a collective
safe: every message it sent has been taken).

A message is ``[key, seq, round, value]``: ``key`` names the group (a 63-bit
hash of its member list, in order; 0 for :meth:`Node.neighbour_barrier`, whose
counters are per pair of nodes), ``seq`` counts this group's collectives on
this node (successive collectives never mix), ``round`` is the algorithm's
step. Values travel as any payload does (CBOR, docs/protocol.md §3): what a
send can carry, a collective can carry.

The algorithms are the classic O(log N) ones (MPICH; Thakur, Rabenseifner and
Gropp, "Optimization of Collective Communication Operations in MPICH", 2005):

- barrier: dissemination (Hensgen, Finkel and Manber, 1988), ceil(log2 N)
  rounds for any N, one message per rank per round, no root to wait on;
- broadcast and gather: a binomial tree rooted at ``root``, ceil(log2 N)
  rounds;
- allreduce: recursive doubling, log2 of the largest power of two <= N
  rounds, plus one round before and one after for the ranks beyond it. Each
  step combines the lower ranks' partial result on the left, so every rank
  computes the same expression in rank order, ``v0 op v1 op ... op vN-1``:
  the result is identical on every rank (bit for bit, for floats) and ``op``
  need be associative only, not commutative.
"""

from __future__ import annotations

import hashlib
import logging
import math
import operator
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from transport import ErrCode, LocalProtocolError, NodeId, StreamId
from transport.events import Admitted

from ._errors import ActorError
from ._inbound import Completed, Failed
from ._link import SendHandle
from ._outcomes import Gap

if TYPE_CHECKING:
    from ._inbound import Receiver
    from ._node import Node

log = logging.getLogger("cellmesh.collectives")

#: The stream collective messages travel on. Reserved: ``node.send`` refuses
#: it, and what arrives on it goes to the node's collectives, never to the
#: compute actor.
COLLECTIVE_STREAM = StreamId("cellmesh.collective")

#: A reduction: ``"sum"``, ``"min"``, ``"max"``, or a function ``(a, b) -> c``.
ReduceOp = str | Callable[[Any, Any], Any]

_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "sum": operator.add,
    "min": min,
    "max": max,
}

#: The key of :meth:`Node.neighbour_barrier`'s messages (counted per pair).
_PAIRWISE = 0

#: A collective on one node: a group key, or a pair for neighbour barriers.
_Channel = int | tuple[int, NodeId]


class CollectiveTimeout(ActorError, trio.TooSlowError):
    """A collective's ``timeout`` passed before it completed on this node.

    It is a :class:`trio.TooSlowError`, so code written for ``trio.fail_after``
    catches it too. The group's collectives are out of step afterwards (some
    ranks may have completed it): end the job, as MPI would.

    Attributes:
        node: the id of the waiting node.
        collective: ``"barrier"``, ``"broadcast"``, ``"gather"``,
            ``"allreduce"`` or ``"neighbour_barrier"``.
        waiting_for: the ranks this node still waited for: a message not
            yet arrived, or a message of ours not yet taken. A rank named
            here may itself be waiting for another: the rank that never
            arrived is named by the ranks that wait on it directly.
        timeout: the timeout, in seconds.
    """

    def __init__(
        self, node: str, collective: str, waiting_for: Sequence[str], timeout: float
    ) -> None:
        missing = ", ".join(waiting_for) or "nobody (the deadline passed between steps)"
        super().__init__(
            f"node {node!r}: {collective} did not complete in {timeout} s; still waiting "
            f"for: {missing}. Check that these ranks run and call {collective} too, with "
            "the same group"
        )
        self.node = node
        self.collective = collective
        self.waiting_for = tuple(waiting_for)
        self.timeout = timeout


@dataclass(frozen=True, slots=True)
class CollectiveStatistics:
    """Counters of a node's collectives.

    Attributes:
        taken: collective messages taken by a collective of this node.
        buffered: messages arrived and not yet taken (a faster rank's).
        refused: messages refused, by reason: ``malformed`` (not a
            collective message), ``batch`` (a batch on the collective
            stream), ``duplicate`` (a tag seen twice).
        stale: messages of a collective already over here (after a timeout),
            answered and dropped.
        gaps: messages on the collective stream known lost (a Gap).
    """

    taken: int
    buffered: int
    refused: dict[str, int]
    stale: int
    gaps: int


_Tag = tuple[_Channel, int, int]


class Collectives:
    """The actor that holds collective messages until a collective takes them.

    Synchronous (actors/_dispatch.py): the Sequencers post arrivals
    (:meth:`handle`), the node's collectives (in the callers' tasks) open a
    collective (:meth:`begin`), take its messages (:meth:`take`, which waits)
    and close it (:meth:`end`). Nothing else touches its fields.
    """

    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver
        #: Arrived and not yet taken: tag -> sender -> (value, message).
        self._arrived: dict[_Tag, dict[NodeId, tuple[Any, Admitted]]] = {}
        #: Who waits for what: tag -> sender -> event.
        self._waiting: dict[_Tag, dict[NodeId, trio.Event]] = {}
        #: The next seq of each channel; a channel in _active runs seq - 1.
        self._next: dict[_Channel, int] = {}
        self._active: set[_Channel] = set()
        self._taken = 0
        self._stale = 0
        self._gaps = 0
        self._refused: Counter[str] = Counter()

    def statistics(self) -> CollectiveStatistics:
        """A snapshot of the counters."""
        return CollectiveStatistics(
            taken=self._taken,
            buffered=sum(len(by) for by in self._arrived.values()),
            refused=dict(self._refused),
            stale=self._stale,
            gaps=self._gaps,
        )

    def handle(self, msg: Admitted | Gap, now: float) -> None:
        """File one arrival on the collective stream (from a Sequencer)."""
        if isinstance(msg, Gap):
            # The sender gave a message up: its own collective failed with
            # DeliveryFailed, and ours ends at its timeout naming it.
            self._gaps += 1
            log.warning("collective message(s) from %s lost for good: %s", msg.peer, msg)
            return
        reason = self._file(msg)
        if reason is not None:
            self._refused[reason] += 1
            self._receiver.handle(
                Failed(msg, ErrCode.NO_HANDLER, f"not a collective message ({reason})"), now
            )

    def _file(self, msg: Admitted) -> str | None:
        """Store ``msg`` under its tag and wake its taker; the refusal reason, if any."""
        if msg.items:
            return "batch"
        payload = msg.payload
        if not (
            isinstance(payload, list | tuple)
            and len(payload) == 4
            and all(type(x) is int and x >= 0 for x in payload[:3])
        ):
            return "malformed"
        key, seq, round_no, value = payload
        sender = msg.peer
        channel: _Channel = (_PAIRWISE, sender) if key == _PAIRWISE else key
        running = self._next.get(channel, 0) - (1 if channel in self._active else 0)
        if seq < running:
            # A collective that is over here (it timed out): nobody will
            # take it. Answered, so the sender's send ends.
            self._stale += 1
            self._receiver.handle(Completed(msg, None), trio.current_time())
            return None
        tag = (channel, seq, round_no)
        by_sender = self._arrived.setdefault(tag, {})
        if sender in by_sender:
            return "duplicate"
        by_sender[sender] = (value, msg)
        waiter = self._waiting.get(tag, {}).get(sender)
        if waiter is not None:
            waiter.set()
        return None

    def begin(self, channel: _Channel, what: str) -> int:
        """Open the next collective of ``channel`` on this node; its seq."""
        if channel in self._active:
            raise LocalProtocolError(
                f"a collective on this group is already running on this node; {what} "
                "must wait for it: every rank must call a group's collectives in the "
                "same order, which concurrent calls on one node cannot promise"
            )
        seq = self._next.get(channel, 0)
        self._next[channel] = seq + 1
        self._active.add(channel)
        return seq

    def end(self, channel: _Channel, seq: int) -> None:
        """Close ``channel``'s collective ``seq``: what it left untaken is answered and dropped."""
        self._active.discard(channel)
        now = trio.current_time()
        for tag in [t for t in self._arrived if t[0] == channel and t[1] <= seq]:
            for _value, msg in self._arrived.pop(tag).values():
                self._stale += 1
                self._receiver.handle(Completed(msg, None), now)

    async def take(self, channel: _Channel, seq: int, round_no: int, sender: NodeId) -> Any:
        """Wait for ``sender``'s message of this round, answer it ACK, return its value."""
        tag = (channel, seq, round_no)
        if sender not in self._arrived.get(tag, {}):
            event = trio.Event()
            self._waiting.setdefault(tag, {})[sender] = event
            try:
                await event.wait()
            finally:
                waiters = self._waiting[tag]
                del waiters[sender]
                if not waiters:
                    del self._waiting[tag]
        else:
            await trio.lowlevel.checkpoint()
        by_sender = self._arrived[tag]
        value, msg = by_sender.pop(sender)
        if not by_sender:
            del self._arrived[tag]
        self._taken += 1
        self._receiver.handle(Completed(msg, None), trio.current_time())
        return value


def group_key(group: Sequence[str]) -> int:
    """The key that tags a group's messages: a hash of its members, in order."""
    digest = hashlib.blake2b("\x00".join(group).encode(), digest_size=8).digest()
    # 63 bits: a CBOR unsigned int everywhere; never 0, the pairwise key.
    return (int.from_bytes(digest, "big") >> 1) or 1


def reduce_op(op: ReduceOp) -> Callable[[Any, Any], Any]:
    """The function behind ``op``; LocalProtocolError for an unknown name."""
    if callable(op):
        return op
    fn = _OPS.get(op)
    if fn is None:
        raise LocalProtocolError(
            f"unknown reduction {op!r}: give one of {sorted(_OPS)} or a function (a, b) -> c"
        )
    return fn


class _Run:
    """One collective call on one node: its tag, sends, and what it waits for."""

    def __init__(
        self,
        node: Node,
        collectives: Collectives,
        what: str,
        channel: _Channel,
        key: int,
        limit: float | None,
    ) -> None:
        self.node = node
        self.collectives = collectives
        self.what = what
        self.channel = channel
        self.key = key
        self.limit = limit
        self.seq = collectives.begin(channel, what)
        self.sent: list[SendHandle] = []
        #: The ranks this call waits on now, for the timeout's message.
        self.waiting: set[str] = set()

    async def send(self, peer: str, round_no: int, value: Any) -> None:
        """Send ``value`` to ``peer`` for ``round_no``; its outcome is awaited in :meth:`finish`."""
        self.waiting.add(peer)
        handle = await self.node._send_collective(
            peer, [self.key, self.seq, round_no, value], self.limit
        )
        self.waiting.discard(peer)
        self.sent.append(handle)

    async def take(self, peer: str, round_no: int) -> Any:
        """Wait for ``peer``'s message of ``round_no``; its value."""
        self.waiting.add(peer)
        value = await self.collectives.take(self.channel, self.seq, round_no, NodeId(peer))
        self.waiting.discard(peer)
        return value

    async def finish(self) -> None:
        """Wait until every message this call sent has been taken (ACK)."""
        for handle in self.sent:
            if not handle.done:
                self.waiting.add(handle.peer)
            await handle.wait()
            self.waiting.discard(handle.peer)


@contextmanager
def _running(
    node: Node,
    collectives: Collectives,
    what: str,
    channel: _Channel,
    key: int,
    timeout: float | None,
) -> Iterator[_Run]:
    """Run one collective: its seq, its deadline, and the CollectiveTimeout it raises."""
    limit = node._deadline(timeout, None)
    run = _Run(node, collectives, what, channel, key, limit)
    try:
        with trio.move_on_at(math.inf if limit is None else limit) as scope:
            yield run
    finally:
        collectives.end(channel, run.seq)
    if scope.cancelled_caught:
        assert timeout is not None
        raise CollectiveTimeout(node.id, what, sorted(run.waiting), timeout)


def check_group(node: Node, group: Sequence[str] | None, sendable: Sequence[str]) -> list[str]:
    """The group as a list of ids in rank order; LocalProtocolError if it cannot run here."""
    me = node.id
    members = sorted({me, *sendable}) if group is None else [str(m) for m in group]
    if len(set(members)) != len(members):
        raise LocalProtocolError(f"group {members} names a node twice")
    if me not in members:
        raise LocalProtocolError(f"group {members} does not hold this node, {me!r}")
    unlinked = sorted(set(members) - {me} - set(sendable))
    if unlinked:
        raise LocalProtocolError(
            f"group members {unlinked} are not peers that {me!r} sends to: the members of "
            "a group must all be peers of one another (open_node(peers=...)); on a grid, "
            "where nodes link to their neighbours only, use neighbour_barrier"
        )
    return members


def _root_rank(members: list[str], root: str | None) -> int:
    if root is None:
        return 0
    if root not in members:
        raise LocalProtocolError(f"root {root!r} is not in the group {members}")
    return members.index(root)


async def barrier(
    node: Node, collectives: Collectives, members: list[str], timeout: float | None
) -> None:
    """Dissemination barrier: in round k, rank i tells i + 2^k and hears from i - 2^k."""
    n = len(members)
    rank = members.index(node.id)
    with _running(node, collectives, "barrier", *_channel(members), timeout) as run:
        step = 1
        round_no = 0
        while step < n:
            await run.send(members[(rank + step) % n], round_no, None)
            await run.take(members[(rank - step) % n], round_no)
            step *= 2
            round_no += 1
        await run.finish()


async def broadcast(
    node: Node,
    collectives: Collectives,
    members: list[str],
    value: Any,
    root: str | None,
    timeout: float | None,
) -> Any:
    """Binomial-tree broadcast from ``root``: the root's value on every rank."""
    n = len(members)
    root_rank = _root_rank(members, root)
    rank = members.index(node.id)
    rel = (rank - root_rank) % n
    with _running(node, collectives, "broadcast", *_channel(members), timeout) as run:
        mask = 1
        # Receive from the parent: the rank that differs in our lowest set bit.
        while mask < n:
            if rel & mask:
                value = await run.take(members[(rank - mask) % n], mask)
                break
            mask *= 2
        # Then pass it to the children below that bit, the farthest first.
        mask //= 2
        while mask > 0:
            if rel + mask < n:
                await run.send(members[(rank + mask) % n], mask, value)
            mask //= 2
        await run.finish()
    return value


async def gather(
    node: Node,
    collectives: Collectives,
    members: list[str],
    value: Any,
    root: str | None,
    timeout: float | None,
) -> list[Any] | None:
    """Binomial-tree gather to ``root``: every rank's value there, in group order."""
    n = len(members)
    root_rank = _root_rank(members, root)
    rank = members.index(node.id)
    rel = (rank - root_rank) % n
    held: list[list[Any]] = [[rel, value]]
    with _running(node, collectives, "gather", *_channel(members), timeout) as run:
        mask = 1
        while mask < n:
            if rel & mask:
                await run.send(members[(rank - mask) % n], mask, held)
                break
            if rel + mask < n:
                subtree = await run.take(members[(rank + mask) % n], mask)
                held.extend(_pairs(subtree, n, node.id))
            mask *= 2
        await run.finish()
    if rel != 0:
        return None
    by_rel = {int(r): v for r, v in held}
    if len(by_rel) != n:
        raise LocalProtocolError(
            f"node {node.id!r}: the gather brought {sorted(by_rel)} of {n} ranks; "
            "is every rank running the same cellmesh version?"
        )
    return [by_rel[(r - root_rank) % n] for r in range(n)]


def _pairs(subtree: Any, n: int, me: str) -> list[list[Any]]:
    """A gathered subtree's ``[rel, value]`` pairs, checked: a peer's input."""
    if not isinstance(subtree, list) or not all(
        isinstance(p, list | tuple) and len(p) == 2 and type(p[0]) is int and 0 <= p[0] < n
        for p in subtree
    ):
        raise LocalProtocolError(
            f"node {me!r}: a gather message is not a list of [rank, value] pairs; "
            "is every rank running the same cellmesh version?"
        )
    return [list(p) for p in subtree]


async def allreduce(
    node: Node,
    collectives: Collectives,
    members: list[str],
    value: Any,
    op: ReduceOp,
    timeout: float | None,
) -> Any:
    """Recursive doubling; the ranks beyond the largest power of two fold in first."""
    fn = reduce_op(op)
    n = len(members)
    rank = members.index(node.id)
    pof2 = 1 << (n.bit_length() - 1)
    rem = n - pof2
    with _running(node, collectives, "allreduce", *_channel(members), timeout) as run:
        # Fold: among the first 2*rem ranks each even rank hands its value to
        # the odd one after it and sits the doubling out.
        if rank < 2 * rem:
            if rank % 2 == 0:
                await run.send(members[rank + 1], 0, value)
                newrank = -1
            else:
                value = fn(await run.take(members[rank - 1], 0), value)
                newrank = rank // 2
        else:
            newrank = rank - rem
        if newrank >= 0:
            mask = 1
            round_no = 1
            while mask < pof2:
                partner_new = newrank ^ mask
                partner = partner_new * 2 + 1 if partner_new < rem else partner_new + rem
                await run.send(members[partner], round_no, value)
                theirs = await run.take(members[partner], round_no)
                # The lower ranks' part on the left: rank order on every rank.
                value = fn(theirs, value) if partner_new < newrank else fn(value, theirs)
                mask *= 2
                round_no += 1
        # Unfold: the odd ranks give the result back to the ranks that sat out.
        last = 1 + max(0, pof2.bit_length() - 1)
        if rank < 2 * rem:
            if rank % 2 == 0:
                value = await run.take(members[rank + 1], last)
            else:
                await run.send(members[rank - 1], last, value)
        await run.finish()
    return value


async def neighbour_barrier(
    node: Node, collectives: Collectives, peers: list[str], timeout: float | None
) -> None:
    """Two rounds with each peer: all of them entered, and each heard from all of its own."""
    limit = node._deadline(timeout, None)
    # One Run (one seq) per pair; they share the deadline and the timeout message.
    runs: list[_Run] = []
    try:
        for peer in peers:
            channel = (_PAIRWISE, NodeId(peer))
            runs.append(_Run(node, collectives, "neighbour_barrier", channel, _PAIRWISE, limit))
        with trio.move_on_at(math.inf if limit is None else limit) as scope:
            for round_no in (0, 1):
                for peer, run in zip(peers, runs, strict=True):
                    await run.send(peer, round_no, None)
                for peer, run in zip(peers, runs, strict=True):
                    await run.take(peer, round_no)
            for run in runs:
                await run.finish()
    finally:
        for run in runs:
            collectives.end(run.channel, run.seq)
    if scope.cancelled_caught:
        assert timeout is not None
        waiting = sorted({p for run in runs for p in run.waiting})
        raise CollectiveTimeout(node.id, "neighbour_barrier", waiting, timeout)


def _channel(members: list[str]) -> tuple[_Channel, int]:
    key = group_key(members)
    return key, key
