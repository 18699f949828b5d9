"""Durable receiving: what a compute actor of a node with a journal provides.

``open_node(..., journal=PATH)`` commits the compute actor's state and the
node's receive state together and answers a message only once that commit
is on disk; a node restarted with the same id and journal resumes from it
(docs/reliability.md, "Durable receiving"; docs/guide.md, "A durable
receiver"). The compute actor implements :class:`Durable`: ``snapshot()``
returns its state as plain data, ``restore(state)`` takes it back. The
journal's counters are ``node.statistics().journal``
(:class:`~actors.statistics.JournalStatistics`).
"""

from __future__ import annotations

from ._journal import Durable, JournalSync

__all__ = [
    "Durable",
    "JournalSync",
]
