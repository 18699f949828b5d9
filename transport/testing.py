"""Tools for testing code that runs over ``transport``, as ``trio.testing`` is trio's.

An in-process network in virtual time (:class:`MemoryNetwork`), seeded fault
injection (:class:`FaultPlan`, :class:`FaultInjector`) and a proxy that
injects faults between real processes on real sockets
(:func:`open_fault_proxy`). Apart from the top-level face because production
code needs none of it; a node imports :class:`FaultPlan` and
:class:`FaultInjector` from here only to honour ``NodeConfig.faults``, which
is itself a testing aid. See docs/testing.md.
"""

from __future__ import annotations

from ._faults import FaultInjector, FaultPlan, FaultStatistics
from ._memnet import MemoryNetwork, MemorySocket, NetworkStatistics
from ._proxy import FaultProxy, ProxyStatistics, open_fault_proxy

__all__ = [
    "FaultInjector",
    "FaultPlan",
    "FaultProxy",
    "FaultStatistics",
    "MemoryNetwork",
    "MemorySocket",
    "NetworkStatistics",
    "ProxyStatistics",
    "open_fault_proxy",
]
