"""Who this rank is and where the others are, from the launcher's environment.

:func:`actors.open_node_from_env` is what a program calls; these are its two
halves, for a program that needs its rank or the whole topology (its rank
count, the other ranks' ids): ``topology_from_env().rank_of(node.id)``.
``cellmesh run``, ``mpiexec`` and ``srun`` all set what they read; the
variables are listed in docs/guide.md, "Launching ranks".
"""

from __future__ import annotations

from ._fromenv import topology_from_env
from ._topology import node_id_from_env

__all__ = ["node_id_from_env", "topology_from_env"]
