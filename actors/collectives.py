"""The names that go with the node's collectives.

``node.barrier()``, ``node.broadcast()``, ``node.gather()``,
``node.allreduce()`` and ``node.neighbour_barrier()`` are methods of
:class:`~actors.Node`; this face holds what a program names around them:
the error a collective's timeout raises, the type of a reduction, and the
stream their messages travel on (reserved: ``node.send`` refuses it). See
docs/guide.md, "Collectives".
"""

from __future__ import annotations

from ._collectives import COLLECTIVE_STREAM, CollectiveTimeout, ReduceOp

__all__ = [
    "COLLECTIVE_STREAM",
    "CollectiveTimeout",
    "ReduceOp",
]
