"""Every frame of the wire protocol, as frozen values.

One module holds them all (h11's ``_events.py`` habit), so the wire
vocabulary is in one obvious place. ``docs/protocol.md`` gives the CDDL;
``_codec.py`` turns these into CBOR and back. The protocol core only ever
sees these values, never bytes.

Conventions that hold for every frame:

* ``node`` and ``incarnation`` name the node that *sent this frame* and the
  process start it comes from.
* DATA_ITEMS is DATA carrying several items (a send batch): it is one message
  to the protocol (one link seq, one stream seq, one answer), and everything
  said about DATA below holds for it too.
* Answers to DATA (RECEIVED, ACK, ACK_RANGE, ACK_ITEMS, ERR, RETRY_LATER) come from the receiving
  node and also carry ``peer_incarnation``: the incarnation of the sender
  whose DATA they answer, so a restarted sender never takes an answer meant
  for its previous life. They carry ``credit`` too: the highest link sequence
  number the sender may use for *new* DATA (resends are always allowed).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeAlias

from ._ids import Incarnation, LinkSeq, NodeId, StreamId, StreamSeq

#: What a message can carry: bytes (numpy arrays travel as bytes) or plain
#: CBOR data: None, bool, int, float, str, bytes, lists and str-keyed maps.
Payload: TypeAlias = Any


class FrameKind(IntEnum):
    """The first element of every encoded frame."""

    HELLO = 1
    DATA = 2
    RECEIVED = 3
    ACK = 4
    ERR = 5
    RETRY_LATER = 6
    REQ = 7
    REQ_ANSWER = 8
    BATCH = 9
    ACK_RANGE = 10
    DATA_ITEMS = 11
    ACK_ITEMS = 12


class ErrCode(IntEnum):
    """ERR codes reserved by the protocol. Application codes are >= 100."""

    #: The compute actor raised something other than ``Reject``.
    COMPUTE_FAILED = 1
    #: No compute actor on the receiving node takes this stream.
    NO_HANDLER = 2
    #: The DATA names an older incarnation of its sender than the live one.
    STALE_SESSION = 3
    #: The stream's gap policy is ``fail`` and an earlier message is missing.
    GAP_FAILED = 4
    #: The receiving node is shutting down and will not process the message.
    SHUTTING_DOWN = 5
    #: The stream's gap policy is ``skip`` and this message arrived after the
    #: receiver had already skipped past it: it was not processed.
    SKIPPED = 6


#: The smallest code an application may use in ``Reject(code, ...)``.
APP_ERR_MIN = 100

#: The version of the wire protocol this package speaks (docs/protocol.md
#: §5.7). Every HELLO carries it; the HELLO layout up to ``version`` is the one
#: thing that never changes between versions, so that two nodes of different
#: versions can always tell each other which one they speak.
PROTOCOL_VERSION = 1


class RetryReason(IntEnum):
    """Why a RETRY_LATER was sent. It always means "not held: send again"."""

    #: The DATA's link sequence number is beyond the credit granted.
    WINDOW_FULL = 1
    #: The stream's reorder buffer is full.
    BUFFER_FULL = 2


class MissingStatus(IntEnum):
    """The sender's answer about one message a receiver asked for."""

    #: Sent again now, in answer to this request.
    RESENT = 1
    #: Still in flight and waiting for its retry timer.
    IN_FLIGHT = 2
    #: Its deadline passed: it will never be sent again.
    GIVEN_UP = 3
    #: No message with this stream sequence number was ever sent.
    NEVER_SENT = 4
    #: The sender already holds a final answer for it.
    ANSWERED = 5


@dataclass(frozen=True, slots=True)
class Hello:
    """Session announcement and heartbeat, in both directions.

    A HELLO with ``reply=False`` asks for a HELLO with ``reply=True`` and the
    same ``nonce`` back; the round trip measures latency and proves liveness.
    ``version`` is the protocol version its sender speaks: a node answers a
    HELLO request of any version, and a sender whose peer speaks another
    version fails its sends at once (docs/protocol.md §5.7).
    """

    node: NodeId
    incarnation: Incarnation
    nonce: int
    reply: bool
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Data:
    """One application message on a link.

    Attributes:
        seq: link sequence number, from 1, in send order.
        stream: the ordered stream it belongs to.
        stream_seq: its place in that stream, from 1.
        stream_floor: the lowest stream sequence number of this stream that
            the sender still waits on; everything below has a final outcome
            at the sender (answered or given up).
        frame_no: the application's own frame number, delivered with it.
        payload: the message body.
        watermark: every link sequence number below it has a final outcome
            at the sender; the receiver may forget those answers.
    """

    node: NodeId
    incarnation: Incarnation
    seq: LinkSeq
    stream: StreamId
    stream_seq: StreamSeq
    stream_floor: StreamSeq
    frame_no: int | None
    payload: Payload
    watermark: LinkSeq


@dataclass(frozen=True, slots=True)
class DataItems:
    """Several application messages (the items of a send batch) as one message.

    The same fields and rules as :class:`Data`, with ``items`` instead of
    ``payload``: one link sequence number, one stream sequence number, one
    retransmission timer, one entry in the receiver's dedup table, one final
    answer. The receiver hands the items to its compute layer one by one, in
    order, and answers ACK (or ACK_RANGE) when every item was processed
    without a result, ERR when the whole message was refused, and
    :class:`AckItems` (one outcome per item) otherwise.

    Attributes:
        items: the items' payloads, in order; 1 to ``Limits.max_items`` of them.
    """

    node: NodeId
    incarnation: Incarnation
    seq: LinkSeq
    stream: StreamId
    stream_seq: StreamSeq
    stream_floor: StreamSeq
    frame_no: int | None
    items: tuple[Payload, ...]
    watermark: LinkSeq


@dataclass(frozen=True, slots=True)
class Received:
    """The receiver holds the DATA; its final answer follows later."""

    node: NodeId
    incarnation: Incarnation
    peer_incarnation: Incarnation
    seq: LinkSeq
    credit: LinkSeq


@dataclass(frozen=True, slots=True)
class AckFrame:
    """Final answer: handed to the compute layer and processed without error."""

    node: NodeId
    incarnation: Incarnation
    peer_incarnation: Incarnation
    seq: LinkSeq
    credit: LinkSeq
    result: Payload = None


@dataclass(frozen=True, slots=True)
class AckRange:
    """Final answer ACK, without a result, for every link sequence number ``first..last``.

    The common answer of a busy link (every message processed, nothing to
    return) in one frame instead of one :class:`AckFrame` per message: the same
    meaning, sequence number by sequence number, as ``AckFrame(..., seq, credit,
    None)`` for each one. ``first <= last``.
    """

    node: NodeId
    incarnation: Incarnation
    peer_incarnation: Incarnation
    first: LinkSeq
    last: LinkSeq
    credit: LinkSeq


@dataclass(frozen=True, slots=True)
class ItemAck:
    """One item of a DATA_ITEMS was processed without error; ``result`` is its reply."""

    result: Payload = None


@dataclass(frozen=True, slots=True)
class ItemErr:
    """One item of a DATA_ITEMS could not be processed (its own ERR code and detail)."""

    code: int
    detail: str


#: The final outcome of one item of a DATA_ITEMS.
ItemOutcome: TypeAlias = ItemAck | ItemErr


@dataclass(frozen=True, slots=True)
class AckItems:
    """Final answer to a DATA_ITEMS: one outcome per item, in item order.

    Used only when some item has a result or an error: when every item was
    processed without a result the answer is a plain :class:`AckFrame` (or part of
    an :class:`AckRange`), and when the whole message was refused it is an
    :class:`ErrFrame`, which then stands for every item.
    """

    node: NodeId
    incarnation: Incarnation
    peer_incarnation: Incarnation
    seq: LinkSeq
    credit: LinkSeq
    outcomes: tuple[ItemOutcome, ...]


@dataclass(frozen=True, slots=True)
class ErrFrame:
    """Final answer: received, but it could not be processed."""

    node: NodeId
    incarnation: Incarnation
    peer_incarnation: Incarnation
    seq: LinkSeq
    credit: LinkSeq
    code: int
    detail: str


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Not held (window or buffer full): back off and send it again."""

    node: NodeId
    incarnation: Incarnation
    peer_incarnation: Incarnation
    seq: LinkSeq
    credit: LinkSeq
    reason: RetryReason


@dataclass(frozen=True, slots=True)
class Req:
    """A question to the sender of a link.

    With ``missing`` empty it is a status query ("why haven't I heard from
    you?"); otherwise it names the stream sequence numbers of ``stream`` that
    the asker is waiting for.
    """

    node: NodeId
    incarnation: Incarnation
    query_id: int
    stream: StreamId | None
    missing: tuple[StreamSeq, ...]


@dataclass(frozen=True, slots=True)
class MissingItem:
    """What became of one message a REQ asked for."""

    stream_seq: StreamSeq
    status: MissingStatus


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """The sender's view of one of its streams on a link."""

    stream: StreamId
    last_sent: StreamSeq
    in_flight: int
    given_up: int


@dataclass(frozen=True, slots=True)
class ReqAnswer:
    """The answer to a :class:`Req`, matched by ``query_id``."""

    node: NodeId
    incarnation: Incarnation
    query_id: int
    stream: StreamId | None
    missing: tuple[MissingItem, ...]
    streams: tuple[StreamStatus, ...]


@dataclass(frozen=True, slots=True)
class Batch:
    """Several frames in one ZeroMQ message. Batches do not nest."""

    frames: tuple[Frame, ...]


#: Anything that can stand alone in a ZeroMQ message.
Frame: TypeAlias = (
    Hello
    | Data
    | DataItems
    | Received
    | AckFrame
    | AckRange
    | AckItems
    | ErrFrame
    | RetryLater
    | Req
    | ReqAnswer
    | Batch
)

#: The answers a receiver gives to DATA and DATA_ITEMS.
Answer: TypeAlias = Received | AckFrame | AckRange | AckItems | ErrFrame | RetryLater


# --- the per-message frames' __init__ ----------------------------------------------
#
# A frozen dataclass's generated __init__ sets each field with
# ``object.__setattr__(self, name, value)``, a lookup by name per field. Data
# and AckFrame are built for every message sent and every message decoded, so
# they get an __init__ that calls each slot's descriptor directly instead:
# 0.85 against 1.6 µs for Data, 0.65 against 1.1 µs for AckFrame (process time,
# best of 9, issue 15). Written out by hand, not generated with exec;
# tests/test_values.py pins each one equal to the dataclass's own (signature,
# defaults, the values it builds, still frozen).


def _data_init() -> Any:
    v = vars(Data)
    s0, s1, s2, s3, s4, s5, s6, s7, s8 = (
        v[name].__set__
        for name in (
            "node",
            "incarnation",
            "seq",
            "stream",
            "stream_seq",
            "stream_floor",
            "frame_no",
            "payload",
            "watermark",
        )
    )

    def __init__(
        self: Data,
        node: NodeId,
        incarnation: Incarnation,
        seq: LinkSeq,
        stream: StreamId,
        stream_seq: StreamSeq,
        stream_floor: StreamSeq,
        frame_no: int | None,
        payload: Payload,
        watermark: LinkSeq,
    ) -> None:
        s0(self, node)
        s1(self, incarnation)
        s2(self, seq)
        s3(self, stream)
        s4(self, stream_seq)
        s5(self, stream_floor)
        s6(self, frame_no)
        s7(self, payload)
        s8(self, watermark)

    return __init__


def _ack_frame_init() -> Any:
    v = vars(AckFrame)
    s0, s1, s2, s3, s4, s5 = (
        v[name].__set__
        for name in ("node", "incarnation", "peer_incarnation", "seq", "credit", "result")
    )

    def __init__(
        self: AckFrame,
        node: NodeId,
        incarnation: Incarnation,
        peer_incarnation: Incarnation,
        seq: LinkSeq,
        credit: LinkSeq,
        result: Payload = None,
    ) -> None:
        s0(self, node)
        s1(self, incarnation)
        s2(self, peer_incarnation)
        s3(self, seq)
        s4(self, credit)
        s5(self, result)

    return __init__


type.__setattr__(Data, "__init__", _data_init())
type.__setattr__(AckFrame, "__init__", _ack_frame_init())
