"""A rank's node from its launcher's environment: ``open_node_from_env``.

One program, whoever starts it. ``cellmesh run -n N -- CMD`` writes the job's
topology to a file and names it in ``CELLMESH_TOPOLOGY``; ``mpiexec`` and
``srun`` give a rank and a rank count and nothing else, so without that
variable every rank makes the same topology from the count alone: N nodes
``"0"`` .. ``"N-1"``, each linked to every other (MPI's ``COMM_WORLD``), rank r
listening on ``tcp://127.0.0.1:BASE+r``. The ranks agree on the ports without
talking because BASE is fixed: ``CELLMESH_BASE_PORT`` or 27500, below Linux's
ephemeral range (32768 and up) so that no outgoing connection can hold one.
``CELLMESH_GRID=RxC`` lays them out as a tile grid instead (``t{r}-{c}``, 8
neighbours, :meth:`Topology.from_grid`). A generated topology is one host's:
for several hosts, write the file and name it in ``CELLMESH_TOPOLOGY``.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from itertools import combinations
from typing import Final

from transport import Network
from transport.security import Security

from ._node import ComputeFactory, Node, NodeConfig, open_node
from ._security import load_security
from ._topology import NODE_ID_ENV, RANK_ENV, NodeSpec, Topology, TopologyError, node_id_from_env

#: The topology file of the job (``cellmesh run`` writes one).
TOPOLOGY_ENV: Final = "CELLMESH_TOPOLOGY"
#: Without a topology file: rank r listens on 127.0.0.1, port BASE + r.
BASE_PORT_ENV: Final = "CELLMESH_BASE_PORT"
#: Without a topology file: ``RxC`` lays the ranks out as a tile grid.
GRID_ENV: Final = "CELLMESH_GRID"
#: A folder holding ``<node id>.key_secret`` files: run every link over CURVE.
KEYS_ENV: Final = "CELLMESH_KEYS"
#: The base port when ``CELLMESH_BASE_PORT`` is not set.
DEFAULT_BASE_PORT: Final = 27500

#: The rank count each launcher sets beside its rank variable (``RANK_ENV``).
#: prterun (PMIx) sets Open MPI's count beside ``PMIX_RANK``.
SIZE_ENV: Final = {
    "SLURM_PROCID": "SLURM_NTASKS",
    "PMI_RANK": "PMI_SIZE",
    "PMIX_RANK": "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK": "OMPI_COMM_WORLD_SIZE",
}

_GRID = re.compile(r"([0-9]+)x([0-9]+)")

_NO_RANK = (
    "no rank in the environment: start the program with `cellmesh run -n N -- CMD`, "
    f"mpiexec or srun, or set {NODE_ID_ENV} and {TOPOLOGY_ENV}"
)


def parse_grid(text: str, where: str) -> tuple[int, int]:
    """``"RxC"`` as ``(rows, columns)``, both >= 1.

    Raises:
        TopologyError: another shape; ``where`` names the input.
    """
    m = _GRID.fullmatch(text.strip())
    if m is None or int(m[1]) < 1 or int(m[2]) < 1:
        raise TopologyError(f"{where}: wants ROWSxCOLUMNS such as 2x3, got {text!r}")
    return int(m[1]), int(m[2])


def local_topology(
    size: int, endpoint_for: Callable[[int], str], grid: tuple[int, int] | None = None
) -> Topology:
    """The topology of ``size`` ranks on one host.

    Args:
        size: the rank count (>= 1).
        endpoint_for: ``rank -> endpoint``.
        grid: ``(rows, columns)`` with ``rows * columns == size``: a tile grid
            as :meth:`Topology.from_grid` makes it; None: nodes ``"0"`` ..
            ``"size-1"``, every pair linked.

    Raises:
        TopologyError: a grid of another size than ``size``.
    """
    if grid is not None:
        rows, cols = grid
        if rows * cols != size:
            raise TopologyError(
                f"a {rows}x{cols} grid holds {rows * cols} ranks, not {size}; give as many "
                "ranks as the grid has tiles"
            )
        return Topology.from_grid(rows, cols, lambda r, c: endpoint_for(r * cols + c))
    nodes = [NodeSpec(str(rank), endpoint_for(rank)) for rank in range(size)]
    return Topology.build(nodes, combinations((n.id for n in nodes), 2))


def _rank(env: Mapping[str, str]) -> tuple[str, int] | None:
    """The launcher's rank variable that ``node_id_from_env`` reads, and its rank."""
    for var in RANK_ENV:
        raw = env.get(var, "")
        if raw:
            if not raw.isdecimal():
                raise TopologyError(f"{var}={raw!r} is not a non-negative integer rank")
            return var, int(raw)
    return None


def _size(env: Mapping[str, str], rank_var: str) -> tuple[str, int] | None:
    """The rank count set beside ``rank_var``, or any launcher's count."""
    for var in (SIZE_ENV[rank_var], *SIZE_ENV.values()):
        raw = env.get(var, "")
        if raw:
            if not raw.isdecimal() or int(raw) < 1:
                raise TopologyError(f"{var}={raw!r} is not a positive rank count")
            return var, int(raw)
    return None


def topology_from_env(environ: Mapping[str, str] | None = None) -> Topology:
    """The job's topology, as this rank's launcher gave it.

    ``CELLMESH_TOPOLOGY`` names a topology file; without it, the topology is
    made from the launcher's rank count (``PMI_SIZE``, ``SLURM_NTASKS``,
    ``OMPI_COMM_WORLD_SIZE``): every rank makes the same one (see the module's
    docstring for the ports and ``CELLMESH_GRID``).

    Args:
        environ: the environment to read; default ``os.environ``.

    Returns:
        The topology; its node order is the rank order.

    Raises:
        TopologyError: no topology file and no rank count; an unreadable or
            invalid file; a rank count the topology does not have; a bad
            ``CELLMESH_BASE_PORT`` or ``CELLMESH_GRID``.
    """
    env = os.environ if environ is None else environ
    ranked = _rank(env)
    counted = _size(env, ranked[0]) if ranked is not None else None
    path = env.get(TOPOLOGY_ENV, "")
    if path:
        try:
            topology = Topology.load(path)
        except OSError as exc:
            raise TopologyError(
                f"{TOPOLOGY_ENV}={path}: cannot read it ({exc.strerror}); name a topology TOML file"
            ) from None
        if counted is not None and counted[1] != len(topology):
            raise TopologyError(
                f"{counted[0]}={counted[1]} but {path} has {len(topology)} nodes; launch as "
                "many ranks as the topology has nodes"
            )
        return topology
    if ranked is None:
        if env.get(NODE_ID_ENV, ""):
            raise TopologyError(
                f"{NODE_ID_ENV} names this node but no topology says where the others are; "
                f"set {TOPOLOGY_ENV} to a topology file"
            )
        raise TopologyError(_NO_RANK)
    if counted is None:
        raise TopologyError(
            f"{ranked[0]} gives this rank but no variable gives the rank count; set "
            f"{TOPOLOGY_ENV} to a topology file"
        )
    size = counted[1]
    raw_base = env.get(BASE_PORT_ENV, "") or str(DEFAULT_BASE_PORT)
    if not raw_base.isdecimal() or not 1 <= int(raw_base) <= 65536 - size:
        raise TopologyError(
            f"{BASE_PORT_ENV}={raw_base!r}: wants a port such that {size} ports from it fit "
            "in 1..65535"
        )
    base = int(raw_base)
    grid = parse_grid(env[GRID_ENV], GRID_ENV) if env.get(GRID_ENV, "") else None
    return local_topology(size, lambda rank: f"tcp://127.0.0.1:{base + rank}", grid)


@asynccontextmanager
async def open_node_from_env(
    *,
    compute: ComputeFactory | None = None,
    config: NodeConfig | None = None,
    bind: str | None = None,
    security: Security | None = None,
    network: Network | None = None,
    incarnation: int | None = None,
    environ: Mapping[str, str] | None = None,
    journal: str | os.PathLike[str] | None = None,
) -> AsyncIterator[Node]:
    """Open this rank's node, whoever launched the program.

    ``cellmesh run``, ``mpiexec`` or ``srun`` say which rank this process is
    (:func:`actors.launch.node_id_from_env`) and where every rank listens
    (:func:`actors.launch.topology_from_env`); the node binds its topology
    endpoint and links to its topology neighbours. ``CELLMESH_KEYS=DIR`` runs
    it secure with ``DIR/<id>.key_secret`` and the topology's public keys
    (:func:`load_security`); ``cellmesh run --secure`` sets it.

    Args:
        compute: factory of the compute actor, as for :func:`open_node`.
        config: tuning, as for :func:`open_node`.
        bind: bind here instead of the topology's endpoint (e.g. an interface
            name, ``tcp://ib0:5601``, where the file holds a host name).
        security: this node's keys; default from ``CELLMESH_KEYS``, else plaintext.
        network: as for :func:`open_node` (tests).
        incarnation: as for :func:`open_node` (tests).
        environ: the environment to read; default ``os.environ``.
        journal: as for :func:`open_node`: durable receiving (give each rank
            its own file, e.g. named by its node id).

    Yields:
        The running :class:`Node`.

    Raises:
        TopologyError: the environment names no rank, or no topology, or one
            that does not fit (see :func:`actors.launch.topology_from_env`);
            the message says which variable to set.
        KeyFileError: ``CELLMESH_KEYS`` lacks this node's secret key.
        BindError: the endpoint is in use.
    """
    env = os.environ if environ is None else environ
    topology = topology_from_env(env)
    node_id = node_id_from_env(env, topology)
    if node_id is None:
        raise TopologyError(_NO_RANK)
    keys = env.get(KEYS_ENV, "")
    if security is None and keys:
        security = load_security(topology, node_id, keys)
    async with open_node(
        node_id,
        bind=bind or topology.endpoint_of(node_id),
        peers=topology.peers_of(node_id),
        compute=compute,
        config=config,
        incarnation=incarnation,
        network=network,
        security=security,
        journal=journal,
    ) as node:
        yield node
