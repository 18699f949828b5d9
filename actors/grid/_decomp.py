"""Split a 2-D grid into tiles, one per node, and say which halo goes where.

A :class:`Decomposition` cuts an ``H x W`` grid into ``ty x tx`` rectangular
tiles whose sizes differ by at most one cell per axis. Each tile keeps a local
array padded by a halo of ``width`` cells on every side; before a step it
receives, from each of its up to 8 neighbours, the strip or corner of their
interior that borders it. The grid does not wrap: halo cells beyond the grid
keep the model's fixed boundary value (dead cells for Life, a cold wall for
heat), exactly as a serial run padded with that value sees them.

Conventions: a *local* array is a tile's own cells, shape
:meth:`Decomposition.tile_shape`; a *padded* array has ``width`` extra cells on
each side. Slices returned here index those arrays.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import numpy.typing as npt

# The default tile ids are Topology.from_grid's: one rule, kept in the runtime.
from .._topology import tile_node_id

Slices = tuple[slice, slice]


class GridError(ValueError):
    """A decomposition or halo request that cannot work; the message says why."""


class Direction(enum.Enum):
    """The 8 neighbour directions; north is row 0 (the top of the array)."""

    N = "N"
    S = "S"
    E = "E"
    W = "W"
    NE = "NE"
    NW = "NW"
    SE = "SE"
    SW = "SW"

    @property
    def offset(self) -> tuple[int, int]:
        """``(dy, dx)`` from a tile to its neighbour in this direction."""
        return _OFFSETS[self]

    @property
    def opposite(self) -> Direction:
        """The direction pointing back: a halo sent towards ``d`` arrives from ``d.opposite``."""
        dy, dx = self.offset
        return _BY_OFFSET[(-dy, -dx)]


_OFFSETS: dict[Direction, tuple[int, int]] = {
    Direction.N: (-1, 0),
    Direction.S: (1, 0),
    Direction.E: (0, 1),
    Direction.W: (0, -1),
    Direction.NE: (-1, 1),
    Direction.NW: (-1, -1),
    Direction.SE: (1, 1),
    Direction.SW: (1, -1),
}
_BY_OFFSET = {offset: d for d, offset in _OFFSETS.items()}


@dataclass(frozen=True, slots=True, order=True)
class TilePos:
    """A tile's position in the tile grid (row, column), from the top left.

    Only a position, no cells: the arrays are the caller's. Not ``Tile``,
    the name a program gives its tile's compute actor (README's
    ``class Tile(Actor)``); not ``GridTile`` or ``TileSpec``, which promise
    cells or a shape that this does not hold.
    """

    row: int
    col: int


def _start(n: int, parts: int, i: int) -> int:
    # floor(i * n / parts): sizes differ by at most one and the larger tiles are
    # spread along the axis instead of piled at one end.
    return i * n // parts


def _part_of(n: int, parts: int, y: int) -> int:
    # The largest i with floor(i * n / parts) <= y, i.e. i * n < (y + 1) * parts.
    return ((y + 1) * parts - 1) // n


@dataclass(frozen=True, slots=True)
class Decomposition:
    """An ``H x W`` grid cut into ``ty x tx`` tiles, each owned by one node.

    Attributes:
        shape: ``(H, W)`` of the whole grid.
        tiles: ``(ty, tx)``, tile rows and columns.
        names: node id of each tile in row-major order; default
            ``"t{row}-{col}"`` (the ids of ``Topology.from_grid``).

    Raises:
        GridError: a non-positive size, more tiles than cells along an axis
            (every tile holds at least one cell), or bad names.
    """

    shape: tuple[int, int]
    tiles: tuple[int, int]
    names: tuple[str, ...] | None = None
    _tile_by_name: Mapping[str, TilePos] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        (h, w), (ty, tx) = self.shape, self.tiles
        if h < 1 or w < 1:
            raise GridError(f"grid shape must be positive, got {h}x{w}")
        if ty < 1 or tx < 1:
            raise GridError(f"tile counts must be positive, got {ty}x{tx}")
        if ty > h or tx > w:
            raise GridError(
                f"{ty}x{tx} tiles do not fit a {h}x{w} grid: each tile needs at least one row "
                "and one column"
            )
        names = self.names
        if names is None:
            names = tuple(tile_node_id(r, c) for r in range(ty) for c in range(tx))
        elif len(names) != ty * tx:
            raise GridError(f"{len(names)} names for {ty * tx} tiles")
        by_name = {name: TilePos(i // tx, i % tx) for i, name in enumerate(names)}
        if len(by_name) != len(names):
            raise GridError("tile names must be unique")
        object.__setattr__(self, "_tile_by_name", by_name)

    @classmethod
    def for_nodes(
        cls, shape: tuple[int, int], n: int, names: Sequence[str] | None = None
    ) -> Decomposition:
        """Cut ``shape`` into ``n`` tiles, arranged ``ty x tx`` with ``ty * tx == n``.

        Of the arrangements that fit, it picks the one whose tiles are closest
        to square, which sends the fewest halo cells per step; a tie goes to
        more tile rows, whose tiles are contiguous in C order.

        Args:
            shape: ``(H, W)``.
            n: number of nodes, >= 1.
            names: node id per tile in row-major order (e.g. ``topology.ids``).

        Returns:
            The decomposition.

        Raises:
            GridError: no ``ty x tx == n`` arrangement fits (e.g. a prime ``n``
                larger than both sides).
        """
        h, w = shape
        if n < 1:
            raise GridError(f"need at least one node, got {n}")
        options = [
            (ty, n // ty) for ty in range(1, n + 1) if n % ty == 0 and ty <= h and n // ty <= w
        ]
        if not options:
            raise GridError(
                f"{n} nodes cannot tile a {h}x{w} grid: no ty x tx = {n} with ty <= {h} and "
                f"tx <= {w}; use another node count"
            )

        def squareness(t: tuple[int, int]) -> tuple[Fraction, int]:
            # A tile's aspect is (h / ty) / (w / tx) = h * tx / (w * ty); its
            # distance from square, exact, is max/min of the two products.
            a, b = h * t[1], w * t[0]
            return (Fraction(max(a, b), min(a, b)), -t[0])

        best = min(options, key=squareness)
        return cls((h, w), best, None if names is None else tuple(names))

    @property
    def count(self) -> int:
        """Number of tiles (= nodes)."""
        return self.tiles[0] * self.tiles[1]

    def tile_ids(self) -> tuple[TilePos, ...]:
        """All tiles in row-major (rank) order."""
        ty, tx = self.tiles
        return tuple(TilePos(r, c) for r in range(ty) for c in range(tx))

    def node_ids(self) -> tuple[str, ...]:
        """Node id of every tile, in row-major (rank) order."""
        return tuple(self._tile_by_name)

    def node_id(self, tile: TilePos) -> str:
        """The node id that owns ``tile``.

        Raises:
            GridError: no such tile.
        """
        self._check(tile)
        return self.node_ids()[tile.row * self.tiles[1] + tile.col]

    def tile_of(self, node_id: str) -> TilePos:
        """The tile owned by ``node_id``.

        Raises:
            GridError: no tile has that name.
        """
        try:
            return self._tile_by_name[node_id]
        except KeyError:
            raise GridError(f"no tile is owned by node {node_id!r}") from None

    def tile_slices(self, tile: TilePos) -> Slices:
        """``(rows, cols)`` slices of ``tile`` in the global grid.

        Raises:
            GridError: no such tile.
        """
        self._check(tile)
        (h, w), (ty, tx) = self.shape, self.tiles
        r, c = tile.row, tile.col
        return (
            slice(_start(h, ty, r), _start(h, ty, r + 1)),
            slice(_start(w, tx, c), _start(w, tx, c + 1)),
        )

    def tile_shape(self, tile: TilePos) -> tuple[int, int]:
        """``(rows, cols)`` of ``tile``'s local array.

        Raises:
            GridError: no such tile.
        """
        ys, xs = self.tile_slices(tile)
        return (ys.stop - ys.start, xs.stop - xs.start)

    def min_tile_shape(self) -> tuple[int, int]:
        """The smallest tile extent along each axis: the widest halo this grid supports."""
        (h, w), (ty, tx) = self.shape, self.tiles
        return (h // ty, w // tx)

    def check_halo(self, width: int) -> None:
        """Check up front that every tile can serve a halo of ``width``.

        Raises:
            GridError: ``width < 1``, or some tile has fewer than ``width`` rows
                or columns (its neighbours' halos would need cells of tiles two
                steps away).
        """
        if width < 1:
            raise GridError(f"halo width must be >= 1, got {width}")
        my, mx = self.min_tile_shape()
        if min(my, mx) < width:
            raise GridError(
                f"halo width {width} is wider than the narrowest tile ({my}x{mx} cells) of "
                f"{self.tiles[0]}x{self.tiles[1]} tiles on {self.shape[0]}x{self.shape[1]}; "
                "use fewer tiles or a narrower halo"
            )

    def owner_of(self, y: int, x: int) -> TilePos:
        """The tile holding global cell ``(y, x)``.

        Raises:
            GridError: the cell is outside the grid.
        """
        (h, w), (ty, tx) = self.shape, self.tiles
        if not (0 <= y < h and 0 <= x < w):
            raise GridError(f"cell ({y}, {x}) is outside the {h}x{w} grid")
        return TilePos(_part_of(h, ty, y), _part_of(w, tx, x))

    def neighbours(self, tile: TilePos) -> dict[Direction, TilePos]:
        """``tile``'s neighbours by direction, corners included, without wrapping.

        Raises:
            GridError: no such tile.
        """
        self._check(tile)
        ty, tx = self.tiles
        out: dict[Direction, TilePos] = {}
        for d in Direction:
            dy, dx = d.offset
            r, c = tile.row + dy, tile.col + dx
            if 0 <= r < ty and 0 <= c < tx:
                out[d] = TilePos(r, c)
        return out

    def direction_of(self, tile: TilePos, other: TilePos) -> Direction:
        """The direction in which ``other`` lies as seen from ``tile``, its neighbour.

        A node uses it to file a halo received from a peer: the data of the
        peer in direction ``d`` goes to ``halo_recv_slices(tile, d)``.

        Raises:
            GridError: the two tiles are not neighbours.
        """
        self._check(tile)
        self._check(other)
        d = _BY_OFFSET.get((other.row - tile.row, other.col - tile.col))
        if d is None:
            raise GridError(f"{other} is not a neighbour of {tile}")
        return d

    def halo_send_slices(self, tile: TilePos, direction: Direction, width: int = 1) -> Slices:
        """The part of ``tile``'s local array that its neighbour towards ``direction`` needs.

        Args:
            tile: the sender.
            direction: where the receiving neighbour lies.
            width: halo width.

        Returns:
            ``(rows, cols)`` slices of the local (unpadded) array: ``width``
            edge rows for N/S, columns for E/W, a ``width x width`` corner for
            the diagonals.

        Raises:
            GridError: no neighbour there, ``width < 1``, or ``tile`` is
                narrower than ``width`` along the sent axis.
        """
        self._neighbour(tile, direction, width)
        self._fits(tile, direction, width)
        h, w = self.tile_shape(tile)
        dy, dx = direction.offset
        return (_edge(h, dy, width), _edge(w, dx, width))

    def halo_recv_slices(self, tile: TilePos, direction: Direction, width: int = 1) -> Slices:
        """Where the data from the neighbour towards ``direction`` goes in ``tile``'s padded array.

        It has the shape of that neighbour's ``halo_send_slices(neighbour,
        direction.opposite, width)``.

        Args:
            tile: the receiver.
            direction: where the sending neighbour lies.
            width: halo width.

        Returns:
            ``(rows, cols)`` slices of the padded array.

        Raises:
            GridError: no neighbour there, ``width < 1``, or the neighbour is
                narrower than ``width`` along the sent axis.
        """
        other = self._neighbour(tile, direction, width)
        self._fits(other, direction, width)
        h, w = self.tile_shape(tile)
        dy, dx = direction.offset
        return (_halo(h, dy, width), _halo(w, dx, width))

    def _check(self, tile: TilePos) -> None:
        ty, tx = self.tiles
        if not (0 <= tile.row < ty and 0 <= tile.col < tx):
            raise GridError(f"{tile} is outside the {ty}x{tx} tile grid")

    def _neighbour(self, tile: TilePos, direction: Direction, width: int) -> TilePos:
        if width < 1:
            raise GridError(f"halo width must be >= 1, got {width}")
        other = self.neighbours(tile).get(direction)
        if other is None:
            raise GridError(f"{tile} has no neighbour to the {direction.value}: that is the edge")
        return other

    def _fits(self, sender: TilePos, direction: Direction, width: int) -> None:
        h, w = self.tile_shape(sender)
        dy, dx = direction.offset
        if (dy and h < width) or (dx and w < width):
            raise GridError(
                f"{sender} is {h}x{w} cells, narrower than the halo width {width}: its "
                "neighbours' halos would reach past it; use fewer tiles or a narrower halo"
            )


def _edge(n: int, d: int, width: int) -> slice:
    # Sender side: the first/last `width` cells towards d, or the whole axis.
    if d < 0:
        return slice(0, width)
    if d > 0:
        return slice(n - width, n)
    return slice(0, n)


def _halo(n: int, d: int, width: int) -> slice:
    # Receiver side, in padded coordinates: the pad before/after, or the interior.
    if d < 0:
        return slice(0, width)
    if d > 0:
        return slice(width + n, 2 * width + n)
    return slice(width, width + n)


def interior(padded: npt.NDArray[Any], width: int = 1) -> npt.NDArray[Any]:
    """The view of ``padded`` without its halo of ``width``."""
    h, w = padded.shape
    return padded[width : h - width, width : w - width]


def pad(local: npt.NDArray[Any], width: int = 1, value: float = 0) -> npt.NDArray[Any]:
    """A new padded array: ``local`` surrounded by ``width`` cells of ``value``.

    ``value`` is the model's boundary value; halo cells that face a neighbour
    are overwritten by its data before each step.
    """
    return np.pad(local, width, mode="constant", constant_values=value)


def scatter(decomp: Decomposition, grid: npt.NDArray[Any]) -> dict[TilePos, npt.NDArray[Any]]:
    """Cut ``grid`` into its tiles (copies, C-contiguous).

    Raises:
        GridError: ``grid`` does not have the decomposition's shape.
    """
    if grid.shape != decomp.shape:
        raise GridError(f"grid is {grid.shape}, the decomposition expects {decomp.shape}")
    return {t: np.array(grid[decomp.tile_slices(t)], order="C") for t in decomp.tile_ids()}


def assemble(decomp: Decomposition, parts: Mapping[TilePos, npt.NDArray[Any]]) -> npt.NDArray[Any]:
    """Put every tile's local array back into one grid.

    Raises:
        GridError: a tile is missing or has the wrong shape.
    """
    tiles = decomp.tile_ids()
    missing = [t for t in tiles if t not in parts]
    if missing:
        raise GridError(f"missing tiles: {missing}")
    out = np.empty(decomp.shape, dtype=parts[tiles[0]].dtype)
    for t in tiles:
        if parts[t].shape != decomp.tile_shape(t):
            raise GridError(f"{t} is {parts[t].shape}, expected {decomp.tile_shape(t)}")
        out[decomp.tile_slices(t)] = parts[t]
    return out


def fill_halos(
    decomp: Decomposition, padded: Mapping[TilePos, npt.NDArray[Any]], width: int = 1
) -> None:
    """Copy every tile's edges into its neighbours' halos, in one process.

    What the nodes do over the network, done in memory: the single-process
    reference of the demo and its tests. Halo cells facing the grid's edge are
    left as they are (the boundary value from :func:`pad`).

    Raises:
        GridError: see :meth:`Decomposition.halo_send_slices`.
    """
    for tile, arr in padded.items():
        local = interior(arr, width)
        for d, other in decomp.neighbours(tile).items():
            src = local[decomp.halo_send_slices(tile, d, width)]
            padded[other][decomp.halo_recv_slices(other, d.opposite, width)] = src
