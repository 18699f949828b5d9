"""What a send ends in, and what a compute actor receives.

Every send ends in exactly one of three outcomes: an :class:`Ack`, a
:class:`PeerError` (the peer answered ERR) or :class:`DeliveryFailed` (no
final answer before the deadline). Both ACK and ERR mean the peer *received*
the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transport import (
    APP_ERR_MIN,
    LinkSeq,
    LocalProtocolError,
    NodeId,
    Payload,
    StreamId,
    StreamSeq,
)


@dataclass(frozen=True, slots=True)
class Ack:
    """The peer's compute layer took the message and processed it without error.

    Attributes:
        peer: who answered.
        seq: the message's link sequence number (its message id on this link).
        stream / stream_seq: where it sits in its stream.
        result: the small value the peer's compute actor returned, or None.
        rtt: seconds from the moment the node accepted the send (after any
            wait for the window) to the moment its final answer was taken,
            across every resend: the message's delivery latency, not an RTT
            sample (the link's smoothed RTT is in ``statistics()``).
            docs/protocol.md §9.
        attempts: how many times it was transmitted (resends and held
            re-probes included).
    """

    peer: NodeId
    seq: LinkSeq
    stream: StreamId
    stream_seq: StreamSeq
    result: Payload
    rtt: float
    attempts: int


class SendError(Exception):
    """Base class of the two ways a send can fail."""

    def __init__(self, message: str, *, peer: NodeId, seq: LinkSeq | None) -> None:
        super().__init__(message)
        self.peer = peer
        self.seq = seq


class PeerError(SendError):
    """The peer received the message but could not process it (it answered ERR).

    ``code`` is one of :class:`transport.ErrCode` (below 100) or an
    application code from the peer's ``Reject(code, ...)`` (100 and up).
    """

    def __init__(self, *, peer: NodeId, seq: LinkSeq, code: int, detail: str) -> None:
        super().__init__(f"{peer} answered ERR {code} for #{seq}: {detail}", peer=peer, seq=seq)
        self.code = code
        self.detail = detail


class DeliveryFailed(SendError):
    """No final answer arrived: the deadline passed, or the peer cannot take it.

    ``reason`` says which: the deadline passed, the peer speaks another
    protocol version (docs/protocol.md §5.7; the send failed at once), the
    peer is LOST (DOWN longer than ``SenderConfig.lost_grace``; then
    ``down_for`` is how long, in seconds, and the send failed at once), or
    the node shut down. The message may or may not have reached the peer: if
    it did, that peer process holds it under its link sequence number and
    will never process a resend of it twice (a restarted one has forgotten
    it). ``held`` says whether the peer had confirmed holding it.
    """

    def __init__(
        self,
        *,
        peer: NodeId,
        seq: LinkSeq | None,
        reason: str,
        held: bool,
        down_for: float | None = None,
    ) -> None:
        super().__init__(f"no final answer from {peer} for #{seq}: {reason}", peer=peer, seq=seq)
        self.reason = reason
        self.held = held
        #: How long the peer had been DOWN when it was declared LOST; None
        #: when the send failed for another reason.
        self.down_for = down_for

    @property
    def peer_lost(self) -> bool:
        """Whether the send failed because its peer is LOST (``down_for`` is set)."""
        return self.down_for is not None


class Reject(Exception):
    """Raised by a compute actor to answer ERR with an application code.

    Args:
        code: an application code, 100 or above (below is reserved for the
            protocol's own codes in :class:`transport.ErrCode`).
        detail: a short text for the sender's logs.

    Raises:
        LocalProtocolError: the code is reserved.
    """

    def __init__(self, code: int, detail: str = "") -> None:
        if type(code) is not int or code < APP_ERR_MIN:
            raise LocalProtocolError(f"Reject code must be an int >= {APP_ERR_MIN}, got {code!r}")
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message handed to a compute actor, in stream order.

    Attributes:
        peer: the node that sent it.
        stream: its stream; stream_seq: its place there (1, 2, ...).
        frame_no: the sender's own frame number, if it gave one.
        payload: the message body (bytes or plain data). Binary data of
            1 MiB or more that travelled out of band may arrive as a
            read-only memoryview of the received buffer: it is not copied.
        seq: its link sequence number.
        item: 0 for a message sent alone; for an item of a batch
            (``Node.send_batch``), its index in the batch. The items of one
            batch share ``seq`` and ``stream_seq`` and arrive in index order.
    """

    peer: NodeId
    stream: StreamId
    stream_seq: StreamSeq
    frame_no: int | None
    payload: Payload
    seq: LinkSeq
    item: int = 0


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages of a stream that will never be delivered, said out loud.

    A compute actor receives this instead of the missing messages when the
    stream's gap policy is ``skip``, or when the sender confirmed that it gave
    them up (deadline passed) or restarted before they could arrive.

    Attributes:
        first / last: the missing stream sequence numbers, inclusive.
        reason: "given-up" / "never-sent" (the sender said so), "answered"
            (the sender holds an answer this receiver lost in a restart),
            "passed-floor" (the sender moved past it), "skipped" (policy
            skip), "stream-failed" (policy fail) or "session-ended" (the
            sender restarted before it could arrive).
    """

    peer: NodeId
    stream: StreamId
    first: StreamSeq
    last: StreamSeq
    reason: str


# --- the per-message values' __init__ ----------------------------------------------
#
# Each message sent ends in an Ack and each message received is a Delivery,
# one per item of a batch too. A frozen dataclass's generated __init__ sets
# each field with ``object.__setattr__``, a lookup by name per field; these
# call each slot's descriptor directly instead: 0.7 against 1.3 µs for Ack,
# 0.7 against 1.2 µs for Delivery (process time, best of 9, issue 15). Written
# out by hand, not generated with exec; tests/test_values.py pins each one
# equal to the dataclass's own (signature, defaults, values built, frozen).


def _ack_init() -> Any:
    v = vars(Ack)
    s0, s1, s2, s3, s4, s5, s6 = (
        v[name].__set__
        for name in ("peer", "seq", "stream", "stream_seq", "result", "rtt", "attempts")
    )

    def __init__(
        self: Ack,
        peer: NodeId,
        seq: LinkSeq,
        stream: StreamId,
        stream_seq: StreamSeq,
        result: Payload,
        rtt: float,
        attempts: int,
    ) -> None:
        s0(self, peer)
        s1(self, seq)
        s2(self, stream)
        s3(self, stream_seq)
        s4(self, result)
        s5(self, rtt)
        s6(self, attempts)

    return __init__


def _delivery_init() -> Any:
    v = vars(Delivery)
    s0, s1, s2, s3, s4, s5, s6 = (
        v[name].__set__
        for name in ("peer", "stream", "stream_seq", "frame_no", "payload", "seq", "item")
    )

    def __init__(
        self: Delivery,
        peer: NodeId,
        stream: StreamId,
        stream_seq: StreamSeq,
        frame_no: int | None,
        payload: Payload,
        seq: LinkSeq,
        item: int = 0,
    ) -> None:
        s0(self, peer)
        s1(self, stream)
        s2(self, stream_seq)
        s3(self, frame_no)
        s4(self, payload)
        s5(self, seq)
        s6(self, item)

    return __init__


type.__setattr__(Ack, "__init__", _ack_init())
type.__setattr__(Delivery, "__init__", _delivery_init())
