"""Who the nodes are, where they listen, and who talks to whom.

A :class:`Topology` is a value: node specs (id, endpoint, optional CURVE public
key) and undirected links. It is written by hand as a TOML file, built in code,
or derived from a tile grid; every form is validated on construction, so a bad
file fails at start-up with a message naming the offending entry, not later as
a silent ZeroMQ connect to nowhere.

The same program starts on many hosts by giving each process its node id, from
the command line or, via :func:`node_id_from_env`, from the launcher's rank
variables (SLURM, MPICH/Hydra, PMIx, Open MPI).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

#: UTF-8 size limit of a node id, the codec's default ``Limits.max_id_bytes``.
MAX_ID_BYTES: Final = 256

#: Environment variables read by :func:`node_id_from_env`, in order. The first
#: names the node directly; the others are launcher ranks (0-based) that index
#: the topology's node order.
NODE_ID_ENV: Final = "CELLMESH_NODE_ID"
RANK_ENV: Final = ("SLURM_PROCID", "PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")

# Hostname / IPv4 or a bracketed IPv6 literal, then a port. libzmq also accepts
# `tcp://src;dst` and interface names; a topology names peers to connect to,
# so the plain form is all it needs.
_TCP = re.compile(r"tcp://(?P<host>\[[0-9A-Za-z:.%]+\]|[A-Za-z0-9_.-]+):(?P<port>[^:]*)")
# Z85 alphabet (ZeroMQ RFC 32); a CURVE public key is 32 bytes = 40 Z85 chars.
_Z85 = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")

_NODE_KEYS: Final = frozenset({"id", "endpoint", "public_key", "neighbours"})
_LINK_KEYS: Final = frozenset({"a", "b"})
_TOP_KEYS: Final = frozenset({"node", "link"})


class TopologyError(ValueError):
    """A topology (file, code or environment) is inconsistent; the message says where."""


def tile_node_id(row: int, col: int) -> str:
    """The default node id of the tile at (row, col): ``"t{row}-{col}"``."""
    return f"t{row}-{col}"


def check_node_id(node_id: object, where: str = "node id") -> str:
    """Return ``node_id`` if it is a usable node id.

    Args:
        node_id: the candidate.
        where: names the entry in the error message.

    Returns:
        The id, unchanged.

    Raises:
        TopologyError: not a string, empty, longer than 256 UTF-8 bytes (the
            wire limit), or holding whitespace at its ends or control characters.
    """
    if not isinstance(node_id, str):
        raise TopologyError(f"{where}: must be a string, got {node_id!r}")
    if not node_id:
        raise TopologyError(f"{where}: must not be empty")
    if len(node_id.encode()) > MAX_ID_BYTES:
        raise TopologyError(f"{where}: {node_id[:20]!r}... is over {MAX_ID_BYTES} UTF-8 bytes")
    if node_id.strip() != node_id or not node_id.isprintable():
        raise TopologyError(
            f"{where}: {node_id!r} has surrounding whitespace or control characters"
        )
    return node_id


def check_endpoint(endpoint: object, where: str = "endpoint") -> str:
    """Return ``endpoint`` if peers can connect to it.

    Args:
        endpoint: the candidate, ``tcp://host:port`` (port 1..65535, IPv6 in
            brackets) or ``ipc://path``.
        where: names the entry in the error message.

    Returns:
        The endpoint, unchanged.

    Raises:
        TopologyError: any other shape, a wildcard host or port, a port out of range.
    """
    if not isinstance(endpoint, str):
        raise TopologyError(f"{where}: must be a string, got {endpoint!r}")
    if endpoint.startswith("ipc://"):
        if len(endpoint) == len("ipc://") or endpoint.strip() != endpoint:
            raise TopologyError(f"{where}: {endpoint!r} needs a path, e.g. ipc:///tmp/n1.sock")
        return endpoint
    m = _TCP.fullmatch(endpoint)
    if m is None:
        hint = " (a wildcard can be bound, not connected to)" if "*" in endpoint else ""
        raise TopologyError(f"{where}: {endpoint!r} must be tcp://host:port or ipc://path{hint}")
    port = m["port"]
    if not port.isdecimal() or not 1 <= int(port) <= 65535:
        raise TopologyError(f"{where}: {endpoint!r} needs a port in 1..65535, got {port!r}")
    return endpoint


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node of a topology.

    Attributes:
        id: unique node id (``"n1"``, ``"t0-3"``).
        endpoint: where its ROUTER listens and its peers connect.
        public_key: its CURVE public key in Z85 (40 characters), or None.
    """

    id: str
    endpoint: str
    public_key: str | None = None

    def __post_init__(self) -> None:
        check_node_id(self.id)
        check_endpoint(self.endpoint, f"node {self.id!r}: endpoint")
        if self.public_key is not None and (
            not isinstance(self.public_key, str) or _Z85.fullmatch(self.public_key) is None
        ):
            raise TopologyError(
                f"node {self.id!r}: public_key must be a 40-character Z85 CURVE key "
                "(zmq.curve_keypair() makes one)"
            )


@dataclass(frozen=True, slots=True)
class Topology:
    """Nodes and the undirected links between them.

    The node order is meaningful: a launcher's rank ``r`` is ``nodes[r]``.

    Attributes:
        nodes: the nodes, in rank order.
        links: each link as the frozenset of its two node ids.

    Raises:
        TopologyError: duplicate id or endpoint, a link naming an unknown node,
            a self-link, or an invalid node spec.
    """

    nodes: tuple[NodeSpec, ...]
    links: frozenset[frozenset[str]] = frozenset()
    _by_id: Mapping[str, NodeSpec] = field(init=False, repr=False, compare=False)
    _adjacency: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_id: dict[str, NodeSpec] = {}
        endpoints: dict[str, str] = {}
        for spec in self.nodes:
            if spec.id in by_id:
                raise TopologyError(f"duplicate node id {spec.id!r}")
            if spec.endpoint in endpoints:
                raise TopologyError(
                    f"nodes {endpoints[spec.endpoint]!r} and {spec.id!r} share endpoint "
                    f"{spec.endpoint!r}; each node needs its own"
                )
            by_id[spec.id] = spec
            endpoints[spec.endpoint] = spec.id
        near: dict[str, set[str]] = {nid: set() for nid in by_id}
        for link in self.links:
            ends = sorted(link)
            if len(ends) != 2:
                raise TopologyError(f"node {ends[0]!r} is linked to itself")
            for end in ends:
                if end not in by_id:
                    raise TopologyError(
                        f"link {ends[0]!r} - {ends[1]!r} names unknown node {end!r}; "
                        f"known: {', '.join(sorted(by_id))}"
                    )
            near[ends[0]].add(ends[1])
            near[ends[1]].add(ends[0])
        rank = {nid: i for i, nid in enumerate(by_id)}
        adjacency = {nid: tuple(sorted(ns, key=rank.__getitem__)) for nid, ns in near.items()}
        object.__setattr__(self, "_by_id", by_id)
        object.__setattr__(self, "_adjacency", adjacency)

    @classmethod
    def build(cls, nodes: Iterable[NodeSpec], links: Iterable[tuple[str, str]] = ()) -> Topology:
        """Build a topology from node specs and ``(a, b)`` link pairs.

        Raises:
            TopologyError: see :class:`Topology`.
        """
        pairs = []
        for a, b in links:
            if a == b:
                raise TopologyError(f"node {a!r} is linked to itself")
            pairs.append(frozenset((a, b)))
        return cls(tuple(nodes), frozenset(pairs))

    @classmethod
    def from_grid(
        cls,
        tiles_y: int,
        tiles_x: int,
        endpoint_for: Callable[[int, int], str],
        node_id_for: Callable[[int, int], str] = tile_node_id,
    ) -> Topology:
        """One node per tile of a ``tiles_y`` x ``tiles_x`` grid, linked to its 8 neighbours.

        Edges do not wrap: a corner tile has 3 neighbours, an edge tile 5, an
        inner tile 8. Nodes are in row-major order, so rank ``r`` is tile
        ``(r // tiles_x, r % tiles_x)``.

        Args:
            tiles_y: tile rows (>= 1).
            tiles_x: tile columns (>= 1).
            endpoint_for: ``(row, col) -> endpoint`` of that tile's node, e.g.
                ``lambda r, c: f"tcp://127.0.0.1:{5600 + r * tiles_x + c}"``.
            node_id_for: ``(row, col) -> node id``; default ``"t{row}-{col}"``.

        Returns:
            The topology.

        Raises:
            TopologyError: a non-positive tile count, or invalid ids/endpoints.
        """
        if tiles_y < 1 or tiles_x < 1:
            raise TopologyError(f"a tile grid needs >= 1 row and column, got {tiles_y}x{tiles_x}")
        nodes = [
            NodeSpec(node_id_for(r, c), endpoint_for(r, c))
            for r in range(tiles_y)
            for c in range(tiles_x)
        ]
        links = [
            (node_id_for(r, c), node_id_for(r + dy, c + dx))
            for r in range(tiles_y)
            for c in range(tiles_x)
            # Half of the 8 directions (E, SW, S, SE) names each link once.
            for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1))
            if 0 <= r + dy < tiles_y and 0 <= c + dx < tiles_x
        ]
        return cls.build(nodes, links)

    @classmethod
    def loads(cls, text: str, source: str = "<string>") -> Topology:
        """Parse a topology from TOML text; the format is described in :meth:`load`.

        Raises:
            TopologyError: invalid TOML or an invalid topology; ``source`` names it.
        """
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise TopologyError(f"{source}: not valid TOML: {exc}") from exc
        try:
            return _from_document(doc)
        except TopologyError as exc:
            raise TopologyError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Topology:
        """Read a topology TOML file.

        The format: one ``[[node]]`` table per node, in rank order, and links
        either as ``[[link]]`` tables or as a node's ``neighbours`` list (both
        may be mixed; links are undirected, so naming one twice is harmless)::

            [[node]]
            id = "n1"
            endpoint = "tcp://10.0.0.1:5601"
            public_key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # optional
            neighbours = ["n2"]                                      # optional

            [[node]]
            id = "n2"
            endpoint = "ipc:///tmp/cellmesh/n2.sock"

            [[link]]
            a = "n1"
            b = "n2"

        Unknown keys are errors, so a typo cannot silently drop a link.

        Args:
            path: the file.

        Returns:
            The topology.

        Raises:
            OSError: the file cannot be read.
            TopologyError: not UTF-8 text, invalid TOML or an invalid topology;
                the message names the file and the entry.
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise TopologyError(
                f"{os.fspath(path)}: not a TOML text file (byte {exc.start} is not UTF-8)"
            ) from None
        return cls.loads(text, source=os.fspath(path))

    def dumps(self) -> str:
        """This topology as TOML text that :meth:`loads` reads back to an equal value."""
        out: list[str] = []
        for spec in self.nodes:
            out += [
                "[[node]]",
                f"id = {_toml_str(spec.id)}",
                f"endpoint = {_toml_str(spec.endpoint)}",
            ]
            if spec.public_key is not None:
                out.append(f"public_key = {_toml_str(spec.public_key)}")
            out.append("")
        for a, b in self.link_pairs():
            out += ["[[link]]", f"a = {_toml_str(a)}", f"b = {_toml_str(b)}", ""]
        return "\n".join(out)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`dumps` to ``path`` (UTF-8).

        Raises:
            OSError: the file cannot be written.
        """
        Path(path).write_text(self.dumps(), encoding="utf-8")

    @property
    def ids(self) -> tuple[str, ...]:
        """Node ids in rank order."""
        return tuple(self._by_id)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._by_id

    def __len__(self) -> int:
        return len(self.nodes)

    def node(self, node_id: str) -> NodeSpec:
        """The spec of ``node_id``.

        Raises:
            TopologyError: no such node.
        """
        try:
            return self._by_id[node_id]
        except KeyError:
            raise TopologyError(
                f"unknown node {node_id!r}; known: {', '.join(self._by_id)}"
            ) from None

    def endpoint_of(self, node_id: str) -> str:
        """The endpoint of ``node_id``.

        Raises:
            TopologyError: no such node.
        """
        return self.node(node_id).endpoint

    def rank_of(self, node_id: str) -> int:
        """The 0-based position of ``node_id`` in :attr:`nodes`.

        Raises:
            TopologyError: no such node.
        """
        self.node(node_id)
        return self.ids.index(node_id)

    def neighbours_of(self, node_id: str) -> tuple[str, ...]:
        """The ids linked to ``node_id``, in rank order.

        Raises:
            TopologyError: no such node.
        """
        self.node(node_id)
        return self._adjacency[node_id]

    def peers_of(self, node_id: str) -> dict[str, str]:
        """Neighbour id -> endpoint for ``node_id``: the ``peers=`` of ``open_node``.

        Raises:
            TopologyError: no such node.
        """
        return {n: self._by_id[n].endpoint for n in self.neighbours_of(node_id)}

    def with_public_keys(self, keys: Mapping[str, str]) -> Topology:
        """A copy with the given nodes' CURVE public keys set (others unchanged).

        Raises:
            TopologyError: a key names an unknown node or is not a Z85 key.
        """
        for node_id in keys:
            self.node(node_id)
        nodes = tuple(NodeSpec(n.id, n.endpoint, keys.get(n.id, n.public_key)) for n in self.nodes)
        return Topology(nodes, self.links)

    def link_pairs(self) -> tuple[tuple[str, str], ...]:
        """Each link once as ``(a, b)`` with ``a`` before ``b`` in rank order, sorted."""
        rank = {nid: i for i, nid in enumerate(self._by_id)}
        pairs = (tuple(sorted(link, key=rank.__getitem__)) for link in self.links)
        return tuple(sorted(((p[0], p[1]) for p in pairs), key=lambda p: (rank[p[0]], rank[p[1]])))


def _toml_str(value: str) -> str:
    # JSON's string escapes (\" \\ \n \t \uXXXX ...) are a subset of TOML's
    # basic-string escapes, and ensure_ascii keeps the file 7-bit.
    return json.dumps(value)


def _check_keys(table: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise TopologyError(f"{where}: unknown key(s) {extra}; allowed: {sorted(allowed)}")


def _tables(doc: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise TopologyError(f"'{key}' must be an array of tables, written [[{key}]]")
    return value


def _from_document(doc: Mapping[str, Any]) -> Topology:
    _check_keys(doc, _TOP_KEYS, "top level")
    nodes: list[NodeSpec] = []
    pairs: list[tuple[str, str]] = []
    for i, table in enumerate(_tables(doc, "node")):
        where = f"[[node]] #{i + 1}"
        _check_keys(table, _NODE_KEYS, where)
        for key in ("id", "endpoint"):
            if key not in table:
                raise TopologyError(f"{where}: missing '{key}'")
        node_id = check_node_id(table["id"], f"{where}: id")
        nodes.append(NodeSpec(node_id, table["endpoint"], table.get("public_key")))
        neighbours = table.get("neighbours", [])
        if not isinstance(neighbours, list):
            raise TopologyError(f"node {node_id!r}: neighbours must be a list of node ids")
        for other in neighbours:
            pairs.append((node_id, check_node_id(other, f"node {node_id!r}: neighbour")))
    if not nodes:
        raise TopologyError("no [[node]] tables: a topology needs at least one node")
    for i, table in enumerate(_tables(doc, "link")):
        where = f"[[link]] #{i + 1}"
        _check_keys(table, _LINK_KEYS, where)
        if "a" not in table or "b" not in table:
            raise TopologyError(f"{where}: needs both 'a' and 'b'")
        pairs.append(
            (check_node_id(table["a"], f"{where}: a"), check_node_id(table["b"], f"{where}: b"))
        )
    return Topology.build(nodes, pairs)


def node_id_from_env(
    environ: Mapping[str, str] | None = None, topology: Topology | None = None
) -> str | None:
    """This process's node id as its launcher gave it, or None.

    Variables are read in this order, and the first one set (non-empty) wins:

    1. ``CELLMESH_NODE_ID``: the id itself.
    2. ``SLURM_PROCID`` (srun), ``PMI_RANK`` (MPICH / Hydra), ``PMIX_RANK``
       (PMIx, prterun), ``OMPI_COMM_WORLD_RANK`` (Open MPI): a 0-based rank,
       mapped to ``topology.nodes[rank]``; without a topology the rank's
       decimal string is the id.

    So ``srun -n 9 python -m demo --topology grid.toml`` starts the 9 nodes of
    the file, one per task, with no per-host arguments.

    Args:
        environ: the environment to read; default ``os.environ``.
        topology: where ranks index, and what a given id is checked against.

    Returns:
        The node id, or None when no variable is set.

    Raises:
        TopologyError: a rank that is not a non-negative integer, a rank past
            the topology's last node, or an id the topology does not hold.
    """
    env = os.environ if environ is None else environ
    direct = env.get(NODE_ID_ENV, "")
    if direct:
        check_node_id(direct, NODE_ID_ENV)
        if topology is not None and direct not in topology:
            raise TopologyError(
                f"{NODE_ID_ENV}={direct!r} is not in the topology; known: {', '.join(topology.ids)}"
            )
        return direct
    for var in RANK_ENV:
        raw = env.get(var, "")
        if not raw:
            continue
        if not raw.isdecimal():
            raise TopologyError(f"{var}={raw!r} is not a non-negative integer rank")
        rank = int(raw)
        if topology is None:
            return str(rank)
        if rank >= len(topology):
            raise TopologyError(
                f"{var}={rank} but the topology has {len(topology)} nodes (ranks 0.."
                f"{len(topology) - 1}); launch as many tasks as it has nodes"
            )
        return topology.nodes[rank].id
    return None
