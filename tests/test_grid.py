"""Grid decomposition: tiles cover the grid once, halos carry the right cells."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from actors import Topology
from actors.grid import (
    Decomposition,
    Direction,
    GridError,
    TilePos,
    assemble,
    fill_halos,
    interior,
    pad,
    scatter,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sides = st.integers(min_value=1, max_value=200)
node_counts = st.integers(min_value=1, max_value=16)


def _fits(shape: tuple[int, int], n: int) -> bool:
    return any(n % ty == 0 and ty <= shape[0] and n // ty <= shape[1] for ty in range(1, n + 1))


@st.composite
def decompositions(draw: st.DrawFn) -> Decomposition:
    shape = (draw(sides), draw(sides))
    n = draw(node_counts)
    assume(_fits(shape, n))
    return Decomposition.for_nodes(shape, n)


def _padded_window(
    decomp: Decomposition, global_padded: npt.NDArray[Any], tile: TilePos, width: int
) -> npt.NDArray[Any]:
    ys, xs = decomp.tile_slices(tile)
    return global_padded[ys.start : ys.stop + 2 * width, xs.start : xs.stop + 2 * width]


@FAST
@given(shape=st.tuples(sides, sides), n=node_counts)
def test_for_nodes_fits_exactly_when_a_factorisation_does(shape: tuple[int, int], n: int) -> None:
    if not _fits(shape, n):
        with pytest.raises(GridError, match="cannot tile"):
            Decomposition.for_nodes(shape, n)
        return
    d = Decomposition.for_nodes(shape, n)
    ty, tx = d.tiles
    assert ty * tx == n
    assert ty <= shape[0]
    assert tx <= shape[1]
    assert d.count == n
    assert len(d.tile_ids()) == n


@FAST
@given(decomp=decompositions())
def test_tiles_cover_every_cell_exactly_once(decomp: Decomposition) -> None:
    cover = np.zeros(decomp.shape, dtype=np.int32)
    for tile in decomp.tile_ids():
        cover[decomp.tile_slices(tile)] += 1
        h, w = decomp.tile_shape(tile)
        assert h >= 1
        assert w >= 1
    assert (cover == 1).all()
    # Near-equal: per axis, tile extents differ by at most one cell.
    heights = {decomp.tile_shape(TilePos(r, 0))[0] for r in range(decomp.tiles[0])}
    widths = {decomp.tile_shape(TilePos(0, c))[1] for c in range(decomp.tiles[1])}
    assert max(heights) - min(heights) <= 1
    assert max(widths) - min(widths) <= 1
    assert decomp.min_tile_shape() == (min(heights), min(widths))


@FAST
@given(decomp=decompositions(), data=st.data())
def test_owner_of_agrees_with_tile_slices(decomp: Decomposition, data: st.DataObject) -> None:
    owners = np.full(decomp.shape, -1, dtype=np.int32)
    for i, tile in enumerate(decomp.tile_ids()):
        owners[decomp.tile_slices(tile)] = i
    for _ in range(20):
        y = data.draw(st.integers(0, decomp.shape[0] - 1))
        x = data.draw(st.integers(0, decomp.shape[1] - 1))
        tile = decomp.owner_of(y, x)
        assert decomp.tile_ids()[owners[y, x]] == tile
        ys, xs = decomp.tile_slices(tile)
        assert ys.start <= y < ys.stop
        assert xs.start <= x < xs.stop


def test_owner_of_every_cell_small_grid() -> None:
    d = Decomposition((7, 5), (3, 2))
    for y in range(7):
        for x in range(5):
            ys, xs = d.tile_slices(d.owner_of(y, x))
            assert ys.start <= y < ys.stop
            assert xs.start <= x < xs.stop
    with pytest.raises(GridError, match="outside"):
        d.owner_of(7, 0)
    with pytest.raises(GridError, match="outside"):
        d.owner_of(0, -1)


@FAST
@given(decomp=decompositions(), width=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_halos_equal_the_global_padded_window(decomp: Decomposition, width: int, seed: int) -> None:
    assume(min(decomp.min_tile_shape()) >= width)
    rng = np.random.default_rng(seed)
    grid = rng.integers(1, 1000, size=decomp.shape, dtype=np.int32)
    global_padded = pad(grid, width, value=-1)
    local = scatter(decomp, grid)
    padded = {t: pad(a, width, value=-1) for t, a in local.items()}
    # Done by hand from the slice API (fill_halos is checked against it below).
    for tile in decomp.tile_ids():
        for d, other in decomp.neighbours(tile).items():
            send = local[other][decomp.halo_send_slices(other, d.opposite, width)]
            slot = decomp.halo_recv_slices(tile, d, width)
            assert padded[tile][slot].shape == send.shape
            padded[tile][slot] = send
    for tile in decomp.tile_ids():
        np.testing.assert_array_equal(
            padded[tile], _padded_window(decomp, global_padded, tile, width)
        )
    by_helper = {t: pad(a, width, value=-1) for t, a in local.items()}
    fill_halos(decomp, by_helper, width)
    for tile in decomp.tile_ids():
        np.testing.assert_array_equal(by_helper[tile], padded[tile])


@FAST
@given(decomp=decompositions(), seed=st.integers(0, 2**32 - 1))
def test_scatter_then_assemble_is_identity(decomp: Decomposition, seed: int) -> None:
    grid = np.random.default_rng(seed).random(decomp.shape)
    parts = scatter(decomp, grid)
    assert all(a.flags.c_contiguous for a in parts.values())
    out = assemble(decomp, parts)
    assert out.tobytes() == grid.tobytes()


@FAST
@given(ty=st.integers(1, 6), tx=st.integers(1, 6))
def test_neighbours_match_from_grid_topology(ty: int, tx: int) -> None:
    decomp = Decomposition((50, 50), (ty, tx))
    topo = Topology.from_grid(ty, tx, lambda r, c: f"tcp://127.0.0.1:{5600 + r * tx + c}")
    assert topo.ids == decomp.node_ids()
    for tile in decomp.tile_ids():
        near = decomp.neighbours(tile)
        expected = {decomp.node_id(t) for t in near.values()}
        assert set(topo.neighbours_of(decomp.node_id(tile))) == expected
        for d, other in near.items():
            assert decomp.neighbours(other)[d.opposite] == tile
            assert decomp.direction_of(tile, other) is d


def test_directions() -> None:
    assert {d.offset for d in Direction} == {
        (dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
    }
    for d in Direction:
        assert d.opposite.opposite is d
        assert d.opposite.offset == (-d.offset[0], -d.offset[1])
    assert Direction.NE.opposite is Direction.SW


def test_neighbour_counts_3x3() -> None:
    d = Decomposition((9, 9), (3, 3))
    assert set(d.neighbours(TilePos(0, 0))) == {Direction.E, Direction.S, Direction.SE}
    assert len(d.neighbours(TilePos(0, 1))) == 5
    assert len(d.neighbours(TilePos(1, 1))) == 8
    assert d.neighbours(TilePos(1, 1))[Direction.NW] == TilePos(0, 0)


def test_for_nodes_prefers_square_tiles() -> None:
    assert Decomposition.for_nodes((100, 100), 4).tiles == (2, 2)
    assert Decomposition.for_nodes((100, 400), 4).tiles == (1, 4)
    assert Decomposition.for_nodes((400, 100), 4).tiles == (4, 1)
    assert Decomposition.for_nodes((100, 100), 12).tiles == (4, 3)
    # A tie between 2x1 and 1x2 goes to more tile rows.
    assert Decomposition.for_nodes((10, 10), 2).tiles == (2, 1)
    # 7 is prime: only 7x1 or 1x7, and 7 > 5 rows forces 1x7.
    assert Decomposition.for_nodes((5, 9), 7).tiles == (1, 7)
    with pytest.raises(GridError, match="7 nodes cannot tile a 5x5 grid"):
        Decomposition.for_nodes((5, 5), 7)
    with pytest.raises(GridError, match="at least one node"):
        Decomposition.for_nodes((5, 5), 0)


def test_unequal_split_spreads_the_remainder() -> None:
    d = Decomposition((10, 7), (4, 3))
    assert [d.tile_shape(TilePos(r, 0))[0] for r in range(4)] == [2, 3, 2, 3]
    assert [d.tile_shape(TilePos(0, c))[1] for c in range(3)] == [2, 2, 3]
    assert d.tile_slices(TilePos(3, 2)) == (slice(7, 10), slice(4, 7))


def test_send_and_recv_slices_concrete() -> None:
    d = Decomposition((10, 10), (2, 2))  # four 5x5 tiles
    t = TilePos(0, 0)
    assert d.halo_send_slices(t, Direction.S, 2) == (slice(3, 5), slice(0, 5))
    assert d.halo_send_slices(t, Direction.SE, 1) == (slice(4, 5), slice(4, 5))
    assert d.halo_recv_slices(t, Direction.E, 2) == (slice(2, 7), slice(7, 9))
    assert d.halo_recv_slices(t, Direction.SE, 1) == (slice(6, 7), slice(6, 7))


def test_one_cell_wide_tiles_work_with_width_1() -> None:
    d = Decomposition((3, 4), (3, 4))  # every tile is a single cell
    grid = np.arange(12, dtype=np.int64).reshape(3, 4)
    padded = {t: pad(a, 1, value=-1) for t, a in scatter(d, grid).items()}
    fill_halos(d, padded, 1)
    g = pad(grid, 1, value=-1)
    assert (padded[TilePos(1, 1)] == g[1:4, 1:4]).all()
    assert (padded[TilePos(0, 0)] == g[0:3, 0:3]).all()


def test_halo_wider_than_a_tile_is_a_clear_error() -> None:
    d = Decomposition((5, 20), (3, 2))  # tile rows of 1, 2, 2 cells
    assert d.min_tile_shape() == (1, 10)
    d.check_halo(1)
    with pytest.raises(GridError, match="wider than the narrowest tile"):
        d.check_halo(2)
    # TilePos (0, 0) is 1 row tall: it cannot send 2 rows south...
    with pytest.raises(GridError, match="narrower than the halo width 2"):
        d.halo_send_slices(TilePos(0, 0), Direction.S, 2)
    # ...so its southern neighbour cannot receive them from the north.
    with pytest.raises(GridError, match="narrower than the halo width 2"):
        d.halo_recv_slices(TilePos(1, 0), Direction.N, 2)
    # Along the other axis it is 10 wide: an east halo of 2 is fine.
    assert d.halo_send_slices(TilePos(0, 0), Direction.E, 2) == (slice(0, 1), slice(8, 10))
    with pytest.raises(GridError, match=">= 1"):
        d.check_halo(0)


def test_edges_and_bad_tiles_are_errors() -> None:
    d = Decomposition((6, 6), (2, 2))
    with pytest.raises(GridError, match="no neighbour to the N"):
        d.halo_send_slices(TilePos(0, 1), Direction.N)
    with pytest.raises(GridError, match="no neighbour to the W"):
        d.halo_recv_slices(TilePos(1, 0), Direction.W)
    with pytest.raises(GridError, match="outside the 2x2 tile grid"):
        d.tile_slices(TilePos(2, 0))
    with pytest.raises(GridError, match="width must be >= 1"):
        d.halo_send_slices(TilePos(0, 0), Direction.E, 0)
    with pytest.raises(GridError, match="not a neighbour"):
        d.direction_of(TilePos(0, 0), TilePos(0, 0))
    with pytest.raises(GridError, match="outside"):
        d.direction_of(TilePos(0, 0), TilePos(-1, -1))


def test_constructor_validation() -> None:
    with pytest.raises(GridError, match="do not fit"):
        Decomposition((3, 10), (4, 1))
    with pytest.raises(GridError, match="positive"):
        Decomposition((0, 10), (1, 1))
    with pytest.raises(GridError, match="positive"):
        Decomposition((10, 10), (0, 1))
    with pytest.raises(GridError, match="3 names for 4 tiles"):
        Decomposition((10, 10), (2, 2), ("a", "b", "c"))
    with pytest.raises(GridError, match="unique"):
        Decomposition((10, 10), (1, 2), ("a", "a"))


def test_names_map_both_ways() -> None:
    d = Decomposition.for_nodes((8, 8), 4, names=["a", "b", "c", "d"])
    assert d.node_id(TilePos(1, 0)) == "c"
    assert d.tile_of("b") == TilePos(0, 1)
    default = Decomposition((8, 8), (2, 2))
    assert default.node_ids() == ("t0-0", "t0-1", "t1-0", "t1-1")
    with pytest.raises(GridError, match="no tile is owned by node 'zz'"):
        d.tile_of("zz")


def test_pad_interior_and_assemble_errors() -> None:
    a = np.ones((2, 3), dtype=np.uint8)
    p = pad(a, 2, value=7)
    assert p.shape == (6, 7)
    assert (p[0] == 7).all()
    assert (interior(p, 2) == a).all()
    d = Decomposition((4, 4), (2, 2))
    parts = scatter(d, np.zeros((4, 4)))
    with pytest.raises(GridError, match="expects"):
        scatter(d, np.zeros((4, 5)))
    del parts[TilePos(1, 1)]
    with pytest.raises(GridError, match="missing tiles"):
        assemble(d, parts)
    parts[TilePos(1, 1)] = np.zeros((3, 2))
    with pytest.raises(GridError, match="expected"):
        assemble(d, parts)
