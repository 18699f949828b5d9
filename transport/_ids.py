"""Typed ids carried on the wire.

Each id gets its own ``NewType`` so that a link sequence number can never be
passed where a stream sequence number is expected, and mypy says so.
"""

from __future__ import annotations

from typing import NewType

#: A node's stable name, unique in a topology (``"n1"``, ``"tile-0-3"``).
NodeId = NewType("NodeId", str)

#: A number that grows with every process start of a node (the node uses
#: ``time.time_ns()`` at start). A peer showing a greater incarnation has
#: restarted: its old session state is dropped, never mixed; a smaller one is
#: a late frame of a replaced life and is refused.
Incarnation = NewType("Incarnation", int)

#: Per-link sequence number of a DATA frame, assigned by the sender, from 1.
LinkSeq = NewType("LinkSeq", int)

#: Name of an ordered stream of messages on a link (``"halo"``, ``"ctl"``).
StreamId = NewType("StreamId", str)

#: Per-(link, stream) sequence number, from 1: the order the receiver keeps.
StreamSeq = NewType("StreamSeq", int)
