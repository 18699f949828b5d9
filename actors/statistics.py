"""The value types the runtime's ``statistics()`` methods return.

Apart from the top-level face because a program reads these through
``node.statistics()``, ``ref.statistics()`` and the like and rarely names the
types; a test or a monitoring tool that annotates them imports them from here.
"""

from __future__ import annotations

from ._actor import ActorStatistics
from ._collectives import CollectiveStatistics
from ._dispatch import IoStatistics
from ._inbound import InboundStatistics
from ._journal import JournalStatistics
from ._link import LinkStatistics
from ._node import NodeStatistics
from ._security import SecurityStatistics
from ._supervisor import SupervisorStatistics

__all__ = [
    "ActorStatistics",
    "CollectiveStatistics",
    "InboundStatistics",
    "IoStatistics",
    "JournalStatistics",
    "LinkStatistics",
    "NodeStatistics",
    "SecurityStatistics",
    "SupervisorStatistics",
]
