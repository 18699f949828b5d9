"""What the sans-IO protocol cores report: the values ``take_events()`` returns.

Apart from the top-level face because only the code that drives a core (the
node's protocol actors, a test of a core) reads them. Two are named so as not
to clash with what a compute actor receives: :class:`Admitted` (the receiving
core took a new message in; the compute actor later gets an
``actors.Delivery``) and :class:`GapEvent` (the sequencer's record of a lost
run; the compute actor gets an ``actors.Gap``).

Beside them, the plain data a receiving core hands out and takes back to
survive a restart (``LinkReceiver.snapshot`` / ``restore``):
:class:`SessionSnapshot` and its :class:`CachedAnswer` values.
"""

from __future__ import annotations

from ._proto_link import (
    Admitted,
    Answered,
    CachedAnswer,
    GaveUp,
    Held,
    PeerRestarted,
    PeerStateChanged,
    QueryAnswered,
    ReceiverEvent,
    Rejected,
    SenderEvent,
    SessionEnded,
    SessionSnapshot,
    SessionStarted,
)
from ._proto_sequencer import (
    AskMissing,
    GapEvent,
    GapReason,
    OfferResult,
    Release,
    SequencerEvent,
    StreamFailed,
)

__all__ = [
    "Admitted",
    "Answered",
    "AskMissing",
    "CachedAnswer",
    "GapEvent",
    "GapReason",
    "GaveUp",
    "Held",
    "OfferResult",
    "PeerRestarted",
    "PeerStateChanged",
    "QueryAnswered",
    "ReceiverEvent",
    "Rejected",
    "Release",
    "SenderEvent",
    "SequencerEvent",
    "SessionEnded",
    "SessionSnapshot",
    "SessionStarted",
    "StreamFailed",
]
