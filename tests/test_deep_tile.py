"""Deep halos: one exchange per ``depth`` frames gives the serial run, bit for bit."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from actors.grid import (
    HEAT,
    LIFE,
    Decomposition,
    DeepTile,
    GridError,
    Job,
    Model,
    assemble,
    auto_depth,
    get_model,
    run_demo,
    run_serial,
    scatter,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_deep(
    model: Model, decomp: Decomposition, grid: npt.NDArray[Any], frames: int, depth: int
) -> tuple[npt.NDArray[Any], int]:
    """Every tile a DeepTile, halos swapped in memory; the final grid and the exchanges."""
    tiles = {t: DeepTile(model, decomp, t, a, depth) for t, a in scatter(decomp, grid).items()}
    exchanges = 0
    for _ in range(frames):
        if next(iter(tiles.values())).needs_halos:
            exchanges += 1
            # Edges are taken from every tile before any halo is filled, as
            # on the network: a fill must not change what a neighbour sends.
            edges = {
                (t, d): deep.edge(d).tobytes() for t, deep in tiles.items() for d in deep.neighbours
            }
            for deep in tiles.values():
                for d, other in deep.neighbours.items():
                    deep.fill(d, edges[(other, d.opposite)])
        for deep in tiles.values():
            deep.step()
    return assemble(decomp, {t: deep.cells() for t, deep in tiles.items()}), exchanges


@FAST
@given(
    model=st.sampled_from([LIFE, HEAT]),
    rows=st.integers(min_value=1, max_value=4),
    cols=st.integers(min_value=1, max_value=4),
    depth=st.integers(min_value=1, max_value=6),
    frames=st.integers(min_value=0, max_value=14),
    seed=st.integers(min_value=0, max_value=2**16),
    extra=st.tuples(st.integers(0, 9), st.integers(0, 9)),
)
def test_deep_halos_equal_the_serial_run(
    model: Model,
    rows: int,
    cols: int,
    depth: int,
    frames: int,
    seed: int,
    extra: tuple[int, int],
) -> None:
    # Tiles of different sizes, some exactly as narrow as the halo is deep.
    shape = (rows * depth + extra[0], cols * depth + extra[1])
    decomp = Decomposition(shape, (rows, cols))
    assume(min(decomp.min_tile_shape()) >= depth)
    start = model.initial(shape, seed)
    deep, exchanges = run_deep(model, decomp, start, frames, depth)
    serial = run_serial(model, start, frames)
    assert deep.tobytes() == serial.tobytes()
    assert exchanges == -(-frames // depth)


def test_a_glider_crosses_tile_corners_with_deep_halos() -> None:
    # A glider travels diagonally through the corner where four tiles meet:
    # the diagonal (corner) halos carry it, and it stays five cells.
    glider = np.array([[0, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=np.uint8)
    start = np.zeros((40, 40), dtype=np.uint8)
    start[10:13, 10:13] = glider
    decomp = Decomposition((40, 40), (2, 2))
    deep, _ = run_deep(LIFE, decomp, start, 60, 5)
    assert np.array_equal(deep, run_serial(LIFE, start, 60))
    assert int(deep.sum()) == 5
    # It went from the top-left tile into the bottom-right one.
    assert deep[20:, 20:].sum() == 5


def test_depth_one_sends_what_the_old_loop_sent() -> None:
    decomp = Decomposition((8, 8), (1, 2))
    tile = decomp.tile_ids()[0]
    grid = np.arange(64, dtype=np.float64).reshape(8, 8)
    deep = DeepTile(HEAT, decomp, tile, grid[:, :4], 1)
    [direction] = deep.neighbours
    assert deep.width == 1
    assert np.array_equal(deep.edge(direction), grid[:, 3:4])


def test_a_halo_deeper_than_a_tile_is_refused() -> None:
    decomp = Decomposition((16, 16), (2, 2))
    tile = decomp.tile_ids()[0]
    with pytest.raises(GridError, match="halo width 9 is wider than the narrowest tile"):
        DeepTile(LIFE, decomp, tile, np.zeros((8, 8), dtype=np.uint8), 9)
    with pytest.raises(GridError, match="depth must be >= 1"):
        DeepTile(LIFE, decomp, tile, np.zeros((8, 8), dtype=np.uint8), 0)


def test_a_fill_of_the_wrong_size_is_refused() -> None:
    decomp = Decomposition((16, 16), (1, 2))
    deep = DeepTile(LIFE, decomp, decomp.tile_ids()[0], np.zeros((16, 8), dtype=np.uint8), 2)
    [direction] = deep.neighbours
    with pytest.raises(ValueError, match="reshape"):
        deep.fill(direction, b"\x00" * 3)


@pytest.mark.parametrize(
    ("size", "nodes", "expected"),
    [(1024, 2, 16), (1024, 4, 16), (2048, 4, 16), (256, 4, 4), (48, 4, 1), (32, 2, 1)],
)
def test_auto_depth_follows_the_tile_size(size: int, nodes: int, expected: int) -> None:
    decomp = Decomposition.for_nodes((size, size), nodes)
    assert auto_depth(decomp, get_model("life")) == expected


async def test_a_depth_the_tiles_cannot_take_fails_before_any_process_starts(
    tmp_path: Any,
) -> None:
    job = Job(size=16, frames=4, depth=9)
    with pytest.raises(GridError, match="halo width 9 is wider than the narrowest tile"):
        await run_demo(job, nodes=4, out=tmp_path, pauses=[], show=False, timeout=10)
    with pytest.raises(GridError, match="depth must be >= 1"):
        await run_demo(Job(depth=0), nodes=4, out=tmp_path, pauses=[], show=False, timeout=10)
