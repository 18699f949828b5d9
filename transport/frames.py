"""The wire frames of docs/protocol.md as typed, frozen values, and their enums.

Apart from the top-level face because only code that speaks the protocol
itself needs them: a protocol core, a foreign peer's test, the codec's
benchmark. A node's user sends payloads and reads outcomes, never frames.
The frame classes that share a word with a user-facing outcome carry the
suffix ``Frame`` (:class:`AckFrame`, :class:`ErrFrame`), so that
``actors.Ack`` names one thing only.
"""

from __future__ import annotations

from ._frames import (
    AckFrame,
    AckItems,
    AckRange,
    Answer,
    Batch,
    Data,
    DataItems,
    ErrFrame,
    Frame,
    FrameKind,
    Hello,
    ItemAck,
    ItemErr,
    ItemOutcome,
    MissingItem,
    MissingStatus,
    Received,
    Req,
    ReqAnswer,
    RetryLater,
    RetryReason,
    StreamStatus,
)

__all__ = [
    "AckFrame",
    "AckItems",
    "AckRange",
    "Answer",
    "Batch",
    "Data",
    "DataItems",
    "ErrFrame",
    "Frame",
    "FrameKind",
    "Hello",
    "ItemAck",
    "ItemErr",
    "ItemOutcome",
    "MissingItem",
    "MissingStatus",
    "Received",
    "Req",
    "ReqAnswer",
    "RetryLater",
    "RetryReason",
    "StreamStatus",
]
