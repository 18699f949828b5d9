"""The grid demo's simulations: Conway's Life and heat diffusion.

Each model is a step function from a padded array (halo width 1) to the new
interior. A serial run is that same function applied to the whole grid padded
with the model's boundary value; a tiled run applies it to each tile padded
with its neighbours' edges. Every output cell is computed by the same
element-wise operations on the same inputs in the same order, with no
reductions, so the two runs agree bit for bit — for heat's float64 too.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ._decomp import Decomposition, assemble, fill_halos, pad, scatter

Grid = npt.NDArray[Any]

#: The largest stable explicit-Euler coefficient of the 5-point stencil in 2-D.
HEAT_ALPHA_MAX: Final = 0.25


class RleError(ValueError):
    """A pattern file is not valid RLE for Conway's Life; the message says where."""


def _check_padded(padded: Grid, dtype: type[np.generic], model: str) -> tuple[int, int]:
    if padded.ndim != 2 or padded.shape[0] < 3 or padded.shape[1] < 3:
        raise ValueError(f"{model} needs a 2-D array padded by 1, at least 3x3; got {padded.shape}")
    if padded.dtype != dtype:
        raise ValueError(f"{model} steps {np.dtype(dtype).name} grids, got {padded.dtype}")
    h, w = padded.shape
    return h, w


def life_step(padded: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """One generation of Conway's Life (B3/S23) on the interior of ``padded``.

    Args:
        padded: uint8 cells (0 dead, 1 alive) with a halo of 1 on every side.

    Returns:
        A new uint8 array, the next state of the interior (2 smaller per axis).

    Raises:
        ValueError: not a uint8 2-D array of at least 3x3.
    """
    h, w = _check_padded(padded, np.uint8, "life")
    rows = (slice(0, h - 2), slice(1, h - 1), slice(2, h))
    cols = (slice(0, w - 2), slice(1, w - 1), slice(2, w))
    # The sum of the 8 shifted views counts neighbours (at most 8: uint8 is enough).
    count = np.zeros((h - 2, w - 2), dtype=np.uint8)
    for i, ys in enumerate(rows):
        for j, xs in enumerate(cols):
            if i != 1 or j != 1:
                count += padded[ys, xs]
    alive = padded[1 : h - 1, 1 : w - 1] != 0
    out: npt.NDArray[np.uint8] = ((count == 3) | (alive & (count == 2))).astype(np.uint8)
    return out


def heat_step(padded: npt.NDArray[np.float64], alpha: float = 0.2) -> npt.NDArray[np.float64]:
    """One explicit step of heat diffusion with the 5-point stencil.

    ``new = c + alpha * ((n + s) + (w + e) - 4 c)``, in exactly that order,
    element by element; the boundary is whatever the halo holds.

    Args:
        padded: float64 temperatures with a halo of 1 on every side.
        alpha: diffusion number ``D dt / dx^2``, in (0, 0.25] for stability.

    Returns:
        A new float64 array, the next state of the interior.

    Raises:
        ValueError: not a float64 2-D array of at least 3x3, or ``alpha``
            outside (0, 0.25].
    """
    if not 0.0 < alpha <= HEAT_ALPHA_MAX:
        raise ValueError(f"alpha must be in (0, {HEAT_ALPHA_MAX}] to be stable, got {alpha}")
    h, w = _check_padded(padded, np.float64, "heat")
    c = padded[1 : h - 1, 1 : w - 1]
    # The formula's operations, in its order, into two reused buffers: half the
    # time of fresh temporaries on 1000x1000. `x *= alpha` and `x += c` swap
    # operands of `alpha * x` and `c + x`, which IEEE 754 rounds identically.
    out = np.add(padded[0 : h - 2, 1 : w - 1], padded[2:h, 1 : w - 1])
    tmp = np.add(padded[1 : h - 1, 0 : w - 2], padded[1 : h - 1, 2:w])
    out += tmp
    np.multiply(c, 4.0, out=tmp)
    out -= tmp
    out *= alpha
    out += c
    return out


def random_soup(shape: tuple[int, int], seed: int, density: float = 0.3) -> npt.NDArray[np.uint8]:
    """A seeded random Life grid: each cell alive with probability ``density``.

    Raises:
        ValueError: ``density`` outside [0, 1].
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    rng = np.random.default_rng(seed)
    return (rng.random(shape) < density).astype(np.uint8)


def heat_initial(shape: tuple[int, int], seed: int) -> npt.NDArray[np.float64]:
    """A seeded cold plate (0.0) with a few round hot spots of 50..100 degrees."""
    rng = np.random.default_rng(seed)
    h, w = shape
    grid = np.zeros(shape, dtype=np.float64)
    radius = max(1, min(h, w) // 10)
    spots = int(np.clip(h * w // (40 * radius * radius), 1, 8))
    yy, xx = np.ogrid[0:h, 0:w]
    for _ in range(spots):
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        grid[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius * radius] = rng.uniform(50.0, 100.0)
    return grid


_HEADER = re.compile(
    r"x\s*=\s*(?P<x>\d+)\s*,\s*y\s*=\s*(?P<y>\d+)\s*(?:,\s*rule\s*=\s*(?P<rule>\S+)\s*)?"
)
# Conway's Life as the new (B/S) and the old (S/B) notation write it.
_LIFE_RULES: Final = frozenset({"B3/S23", "23/3"})


def parse_rle(text: str) -> npt.NDArray[np.uint8]:
    """Parse a Life pattern in the RLE format of the Life community (LifeWiki's spec).

    ``#`` lines are comments; the header ``x = W, y = H[, rule = B3/S23]``
    gives the bounding box; the body is ``<count><tag>`` items with tags ``b``
    (dead), ``o`` (alive) and ``$`` (end of row), ending with ``!``. Counts
    default to 1, whitespace and line breaks between items are ignored, and
    so is everything after ``!``.

    Args:
        text: the file's contents.

    Returns:
        A uint8 array of shape ``(H, W)``, 1 where a cell is alive.

    Raises:
        RleError: no header, a rule other than B3/S23, an unknown tag (e.g. a
            multi-state pattern), a cell outside the header's box, a count
            with no tag, or a missing ``!``.
    """
    lines = text.splitlines()
    at = next((i for i, line in enumerate(lines) if line.strip()[:1] not in ("", "#")), None)
    if at is None:
        raise RleError("no header line 'x = <width>, y = <height>, rule = B3/S23'")
    stripped = lines[at].strip()
    m = _HEADER.fullmatch(stripped)
    if m is None:
        raise RleError(
            f"line {at + 1}: {stripped!r} is not an RLE header 'x = <width>, y = <height>, "
            "rule = B3/S23'"
        )
    rule = m["rule"]
    if rule is not None and rule.upper() not in _LIFE_RULES:
        raise RleError(
            f"rule {rule!r} is not Conway's Life (B3/S23), the only rule this model runs"
        )
    width, height = int(m["x"]), int(m["y"])
    grid = np.zeros((height, width), dtype=np.uint8)
    y = x = 0
    count = ""
    for char in "".join(lines[at + 1 :]):
        if char.isdigit():
            count += char
            continue
        if char.isspace():
            continue
        if char == "!":
            if count:
                raise RleError(f"run count {count} is followed by '!', not by a tag")
            return grid
        n = int(count) if count else 1
        if n == 0:
            raise RleError("a run count of 0 is not allowed")
        count = ""
        if char == "$":
            y, x = y + n, 0
        elif char in "bo":
            if x + n > width or y >= height:
                raise RleError(
                    f"row {y + 1} runs past the header's box of x = {width}, y = {height}"
                )
            if char == "o":
                grid[y, x : x + n] = 1
            x += n
        else:
            raise RleError(
                f"unknown tag {char!r}: only b (dead), o (alive), $ (end of row) and ! "
                "(end) are two-state Life RLE"
            )
    raise RleError("the pattern does not end with '!'")


def load_rle(path: str | os.PathLike[str]) -> npt.NDArray[np.uint8]:
    """Read and parse an RLE file (see :func:`parse_rle`).

    Raises:
        OSError: the file cannot be read.
        RleError: it is not valid Life RLE; the message names the file.
    """
    try:
        return parse_rle(Path(path).read_text(encoding="utf-8"))
    except RleError as exc:
        raise RleError(f"{os.fspath(path)}: {exc}") from None


def place_center(pattern: Grid, shape: tuple[int, int]) -> Grid:
    """A zero grid of ``shape`` with ``pattern`` in its centre (rounding up and left).

    Raises:
        ValueError: the pattern is larger than the grid.
    """
    ph, pw = pattern.shape
    h, w = shape
    if ph > h or pw > w:
        raise ValueError(f"a {ph}x{pw} pattern does not fit a {h}x{w} grid")
    grid = np.zeros(shape, dtype=pattern.dtype)
    oy, ox = (h - ph) // 2, (w - pw) // 2
    grid[oy : oy + ph, ox : ox + pw] = pattern
    return grid


def grid_digest(grid: Grid) -> str:
    """SHA-256 hex of a grid's dtype, shape and C-order bytes: equal iff bit-identical."""
    digest = hashlib.sha256(f"{grid.dtype.str}{grid.shape}".encode())
    digest.update(np.ascontiguousarray(grid).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Model:
    """A grid simulation the demo can run tiled or serially.

    Attributes:
        name: registry key (``"life"``, ``"heat"``).
        dtype: the cells' dtype.
        boundary: the fixed value of every cell outside the grid.
        halo: the halo width one step reads.
        step: padded array -> new interior.
        initial: ``(shape, seed) -> grid``, the default initial condition.
    """

    name: str
    dtype: np.dtype[Any]
    boundary: float
    halo: int
    step: Callable[[Grid], Grid]
    initial: Callable[[tuple[int, int], int], Grid]


LIFE: Final = Model("life", np.dtype(np.uint8), 0, 1, life_step, random_soup)
HEAT: Final = Model("heat", np.dtype(np.float64), 0.0, 1, heat_step, heat_initial)

#: The models by name.
MODELS: Final[Mapping[str, Model]] = MappingProxyType({m.name: m for m in (LIFE, HEAT)})


def get_model(name: str) -> Model:
    """The model called ``name``.

    Raises:
        ValueError: no such model; the message lists the known ones.
    """
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def run_serial(model: Model | str, grid: Grid, frames: int) -> Grid:
    """Step the whole grid ``frames`` times, padded with the model's boundary value.

    Returns:
        A new array (a copy when ``frames`` is 0).

    Raises:
        ValueError: unknown model name, negative ``frames``, wrong dtype.
    """
    m = get_model(model) if isinstance(model, str) else model
    if frames < 0:
        raise ValueError(f"frames must be >= 0, got {frames}")
    out = np.array(grid, copy=True)
    for _ in range(frames):
        out = m.step(pad(out, m.halo, m.boundary))
    return out


def run_tiled(model: Model | str, decomp: Decomposition, grid: Grid, frames: int) -> Grid:
    """Step ``grid`` ``frames`` times as tiles exchanging halos in memory.

    The single-process twin of the networked demo: each frame, every tile is
    padded with the boundary value, its halos are filled from its neighbours'
    edges, and it is stepped on its own. Equal, bit for bit, to
    :func:`run_serial`.

    Raises:
        ValueError: unknown model, negative ``frames``, wrong dtype.
        GridError: the grid does not match ``decomp``, or a tile is narrower
            than the model's halo.
    """
    m = get_model(model) if isinstance(model, str) else model
    if frames < 0:
        raise ValueError(f"frames must be >= 0, got {frames}")
    decomp.check_halo(m.halo)
    tiles = scatter(decomp, grid)
    for _ in range(frames):
        padded = {t: pad(a, m.halo, m.boundary) for t, a in tiles.items()}
        fill_halos(decomp, padded, m.halo)
        tiles = {t: m.step(p) for t, p in padded.items()}
    return assemble(decomp, tiles)
