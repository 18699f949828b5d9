"""Life and heat: known patterns, the RLE parser, and tiled == serial bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from actors.grid import (
    HEAT,
    LIFE,
    MODELS,
    Decomposition,
    GridError,
    RleError,
    get_model,
    grid_digest,
    heat_initial,
    heat_step,
    life_step,
    load_rle,
    pad,
    parse_rle,
    place_center,
    random_soup,
    run_serial,
    run_tiled,
)

PATTERNS = Path(__file__).resolve().parent.parent / "examples" / "patterns"

GLIDER = """#N Glider
x = 3, y = 3, rule = B3/S23
bob$2bo$3o!
"""


def _life_by_definition(grid: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    # Cell by cell, straight from B3/S23 with dead cells outside: the oracle.
    h, w = grid.shape
    out = np.zeros_like(grid)
    for y in range(h):
        for x in range(w):
            n = sum(
                int(grid[y + dy, x + dx])
                for dy in (-1, 0, 1)
                for dx in (-1, 0, 1)
                if (dy, dx) != (0, 0) and 0 <= y + dy < h and 0 <= x + dx < w
            )
            out[y, x] = 1 if n == 3 or (n == 2 and grid[y, x]) else 0
    return out


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_life_step_matches_the_rule_cell_by_cell(h: int, w: int, seed: int) -> None:
    grid = random_soup((h, w), seed, density=0.4)
    assert (life_step(pad(grid)) == _life_by_definition(grid)).all()


def test_glider_moves_one_cell_diagonally_every_4_generations() -> None:
    glider = parse_rle(GLIDER)
    grid = np.zeros((12, 12), dtype=np.uint8)
    grid[1:4, 1:4] = glider
    after = run_serial(LIFE, grid, 8)
    expected = np.zeros_like(grid)
    expected[3:6, 3:6] = glider
    assert (after == expected).all()


def test_still_life_oscillator_and_edge_death() -> None:
    block = np.zeros((4, 4), dtype=np.uint8)
    block[1:3, 1:3] = 1
    assert (run_serial("life", block, 5) == block).all()
    blinker = np.zeros((5, 5), dtype=np.uint8)
    blinker[2, 1:4] = 1
    once = run_serial("life", blinker, 1)
    assert once[1:4, 2].all()
    assert once.sum() == 3
    assert (run_serial("life", blinker, 2) == blinker).all()
    # A block cut by the grid's edge is 2 cells: dead outside means it dies.
    assert run_serial("life", np.ones((1, 2), dtype=np.uint8), 1).sum() == 0


def test_gosper_gun_emits_a_glider_every_30_generations() -> None:
    gun = load_rle(PATTERNS / "gosper_glider_gun.rle")
    assert gun.shape == (9, 36)
    assert int(gun.sum()) == 36
    grid = place_center(gun, (60, 80))
    pops = [int(run_serial(LIFE, grid, k).sum()) for k in (30, 60)]
    assert pops == [41, 46]
    # The gun itself is back in its first phase after one period.
    ys, xs = slice(25, 34), slice(22, 58)
    assert (grid[ys, xs] == gun).all()
    assert (run_serial(LIFE, grid, 30)[ys, xs] == gun).all()


@pytest.mark.parametrize(
    ("name", "shape", "cells"),
    [
        ("glider", (3, 3), 5),
        ("gosper_glider_gun", (9, 36), 36),
        ("r_pentomino", (3, 3), 5),
        ("acorn", (3, 7), 7),
    ],
)
def test_shipped_patterns_parse(name: str, shape: tuple[int, int], cells: int) -> None:
    p = load_rle(PATTERNS / f"{name}.rle")
    assert p.shape == shape
    assert p.dtype == np.uint8
    assert int(p.sum()) == cells


def test_rle_details() -> None:
    assert parse_rle(GLIDER).tolist() == [[0, 1, 0], [0, 0, 1], [1, 1, 1]]
    # No rule, old S/B notation, lower case, counts on '$', spaces and line breaks,
    # trailing rows and columns left dead, text after '!' ignored.
    text = "#C x\nx=4,y=4\n2o\n2b$\n$ 3o!ignored $$ zz"
    assert parse_rle(text).tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    assert parse_rle("x = 2, y = 3, rule = 23/3\no2$bo!").tolist() == [[1, 0], [0, 0], [0, 1]]
    assert parse_rle("x = 1, y = 1, rule = b3/s23\no!").tolist() == [[1]]
    assert parse_rle("x = 12, y = 1\n12o!").sum() == 12


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "no header"),
        ("#N only comments\n", "no header"),
        ("bob$2bo$3o!", "not an RLE header"),
        ("x = 3, y = 3, rule = B36/S23\nbob!", "not Conway's Life"),
        ("x = 3, y = 1\n2A!", "unknown tag 'A'"),
        ("x = 3, y = 1\n4o!", "past the header's box"),
        ("x = 3, y = 1\nbo$o!", "past the header's box"),
        ("x = 3, y = 1\nobo", "does not end with '!'"),
        ("x = 3, y = 1\no3!", "followed by '!'"),
        ("x = 3, y = 1\n0o!", "count of 0"),
    ],
)
def test_rle_errors(text: str, match: str) -> None:
    with pytest.raises(RleError, match=match):
        parse_rle(text)


def test_load_rle_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.rle"
    bad.write_text("x = 1, y = 1, rule = B2/S\no!")
    with pytest.raises(RleError, match=r"bad\.rle: rule 'B2/S'"):
        load_rle(bad)


def test_place_center() -> None:
    p = np.ones((2, 3), dtype=np.uint8)
    g = place_center(p, (5, 6))
    assert g.dtype == np.uint8
    assert g.sum() == 6
    assert (g[1:3, 1:4] == 1).all()
    assert (place_center(p, (2, 3)) == p).all()
    with pytest.raises(ValueError, match="does not fit"):
        place_center(p, (1, 9))


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 8), w=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_heat_step_is_the_documented_formula_bit_for_bit(h: int, w: int, seed: int) -> None:
    # Python floats are IEEE doubles: this loop is the documented operation
    # order, element by element, the oracle the networked demo must also meet.
    p = pad(np.random.default_rng(seed).random((h, w)) * 100.0, value=0.0)
    out = heat_step(p, alpha=0.2)
    for y in range(1, h + 1):
        for x in range(1, w + 1):
            c = float(p[y, x])
            ns = float(p[y - 1, x]) + float(p[y + 1, x])
            we = float(p[y, x - 1]) + float(p[y, x + 1])
            assert out[y - 1, x - 1] == c + 0.2 * ((ns + we) - 4.0 * c)


def test_heat_step_concrete_and_conserving() -> None:
    grid = np.zeros((3, 3))
    grid[1, 1] = 100.0
    out = heat_step(pad(grid), alpha=0.25)
    assert out[1, 1] == 0.0
    assert out[0, 1] == out[1, 0] == out[1, 2] == out[2, 1] == 25.0
    assert out[0, 0] == 0.0
    # Away from the cold boundary, diffusion only moves heat around.
    big = np.zeros((21, 21))
    big[10, 10] = 1.0
    stepped = run_serial(HEAT, big, 5)
    assert stepped.sum() == pytest.approx(1.0, rel=1e-12)
    assert stepped[10, 10] < 1.0
    # At the wall heat leaks out into the fixed 0.0 boundary.
    edge = np.zeros((3, 3))
    edge[0, 0] = 1.0
    assert run_serial(HEAT, edge, 1).sum() < 1.0


def test_step_input_checks() -> None:
    with pytest.raises(ValueError, match="stable"):
        heat_step(np.zeros((3, 3)), alpha=0.3)
    with pytest.raises(ValueError, match="float64"):
        heat_step(np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        life_step(np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="at least 3x3"):
        life_step(np.zeros((2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="frames"):
        run_serial(LIFE, np.zeros((3, 3), dtype=np.uint8), -1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    h=st.integers(1, 120),
    w=st.integers(1, 120),
    n=st.integers(1, 16),
    model=st.sampled_from(sorted(MODELS)),
    seed=st.integers(0, 2**32 - 1),
)
def test_tiled_run_equals_serial_run_bit_for_bit(
    h: int, w: int, n: int, model: str, seed: int
) -> None:
    assume(any(n % ty == 0 and ty <= h and n // ty <= w for ty in range(1, n + 1)))
    decomp = Decomposition.for_nodes((h, w), n)
    m = get_model(model)
    grid = m.initial((h, w), seed)
    assert grid.dtype == m.dtype
    frames = 6
    serial = run_serial(m, grid, frames)
    tiled = run_tiled(m, decomp, grid, frames)
    assert tiled.dtype == serial.dtype
    assert tiled.tobytes() == serial.tobytes()
    assert grid_digest(tiled) == grid_digest(serial)


def test_heat_tiled_is_bit_identical_on_a_long_run() -> None:
    grid = heat_initial((64, 48), seed=7)
    assert grid.max() >= 50.0
    decomp = Decomposition.for_nodes((64, 48), 12)
    serial = run_serial(HEAT, grid, 200)
    # The run went somewhere: equality is not trivially of two zero grids.
    assert 0.0 < serial.max() < grid.max()
    assert grid_digest(run_tiled(HEAT, decomp, grid, 200)) == grid_digest(serial)


def test_run_tiled_rejects_a_mismatched_grid() -> None:
    with pytest.raises(GridError, match="expects"):
        run_tiled(LIFE, Decomposition((4, 4), (2, 2)), np.zeros((5, 4), dtype=np.uint8), 1)


def test_initial_conditions_are_seeded() -> None:
    a, b = random_soup((50, 50), 1), random_soup((50, 50), 1)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != random_soup((50, 50), 2).tobytes()
    assert 0.2 < a.mean() < 0.4
    assert random_soup((10, 10), 0, density=0.0).sum() == 0
    with pytest.raises(ValueError, match="density"):
        random_soup((3, 3), 0, density=1.5)
    assert heat_initial((30, 30), 3).tobytes() == heat_initial((30, 30), 3).tobytes()
    assert heat_initial((1, 1), 0).shape == (1, 1)


def test_grid_digest_sees_dtype_shape_and_bits() -> None:
    z = np.zeros((2, 3))
    assert grid_digest(z) == grid_digest(np.zeros((2, 3)))
    assert grid_digest(z) != grid_digest(np.zeros((3, 2)))
    assert grid_digest(z) != grid_digest(np.zeros((2, 3), dtype=np.float32))
    assert grid_digest(z) != grid_digest(np.full((2, 3), -0.0))
    # Layout does not matter, only the values in C order.
    f = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    assert grid_digest(f) == grid_digest(np.arange(6.0).reshape(2, 3))
    assert len(grid_digest(z)) == 64


def test_registry() -> None:
    assert set(MODELS) == {"life", "heat"}
    assert get_model("life") is LIFE
    assert HEAT.dtype == np.float64
    assert LIFE.boundary == 0
    with pytest.raises(ValueError, match="unknown model 'wave'; known: life, heat"):
        get_model("wave")
