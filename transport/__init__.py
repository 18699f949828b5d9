"""cellmesh's wire layer: typed frames, the CBOR codec, the sans-IO protocol
core and the Trio-driven ZeroMQ sockets. It never imports ``actors``.
"""

from __future__ import annotations

from ._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ._frames import (
    APP_ERR_MIN,
    Ack,
    Answer,
    Batch,
    Data,
    Err,
    ErrCode,
    Frame,
    FrameKind,
    Hello,
    MissingItem,
    MissingStatus,
    Payload,
    Received,
    Req,
    ReqAnswer,
    RetryLater,
    RetryReason,
    StreamStatus,
)
from ._ids import Incarnation, LinkSeq, NodeId, StreamId, StreamSeq

__all__ = [
    "APP_ERR_MIN",
    "Ack",
    "Answer",
    "Batch",
    "Data",
    "Err",
    "ErrCode",
    "Frame",
    "FrameKind",
    "Hello",
    "Incarnation",
    "LinkSeq",
    "LocalProtocolError",
    "MissingItem",
    "MissingStatus",
    "NodeId",
    "Payload",
    "ProtocolError",
    "Received",
    "RemoteProtocolError",
    "Req",
    "ReqAnswer",
    "RetryLater",
    "RetryReason",
    "StreamId",
    "StreamSeq",
    "StreamStatus",
]
