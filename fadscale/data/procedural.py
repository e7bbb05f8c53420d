"""Deterministic, procedural histology-like tiles in the eight classes of Kather et al. (2016).

For demos and tests: no download, any size from 8 px, RGB or grayscale, and tile `index` of a seed
is always the same image, so a data set can be generated in shards or regenerated later.

How a tile is made. Each class renders two stain-concentration maps, hematoxylin (H: nuclei) and
eosin (E: cytoplasm, fibres, membranes), from vectorised primitives: gradient noise, elliptical
nuclei splatted on jittered grids, distance-to-centre and Voronoi fields, wavy fibre bands.
Colour follows the Beer-Lambert law with Ruifrok & Johnston's H&E optical-density vectors,
OD = cH * OD_H + cE * OD_E + background and RGB = 255 * exp(-OD), with per-tile stain strength,
stain hue, focus blur and pixel noise. Feature sizes are fractions of the tile (Kather's tiles are
150 px = 74 um), so a (seed, index) pair shows the same scene at every size; structures thinner
than a pixel fade instead of aliasing.

Determinism. Tile i draws its numbers only from `np.random.default_rng([seed, start_index + i,
label])` (PCG64), always the same sequence of draws for its class and size. Tiles of a class are
rendered together as [batch, H, W] stacks with elementwise operations and np.bincount (per-pixel
sums in a fixed order), so a tile is bit-identical in any batch. Per-pixel and geometric
arithmetic is limited to operations IEEE 754 rounds exactly (+ - * / sqrt floor; sines and
cosines come from a polynomial), so another machine with the same NumPy gives the same tiles;
exp() runs once, in float64, to build the OD -> RGB lookup table.

`python -m fadscale.data.procedural --out sheet.png` writes a contact sheet (one row per class).
"""

from __future__ import annotations

import argparse
import io
import math
import operator
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from fadscale.errors import FadscaleError
from fadscale.runtime.io import atomic_write_bytes

CLASS_NAMES: tuple[str, ...] = (
    "TUMOR", "STROMA", "COMPLEX", "LYMPHO", "DEBRIS", "MUCOSA", "ADIPOSE", "EMPTY",
)
FOLDER_NAMES: tuple[str, ...] = (
    "01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA", "07_ADIPOSE", "08_EMPTY",
)

MIN_SIZE = 8

# Ruifrok & Johnston (2001) optical-density vectors, unit length, RGB order.
OD_HEMATOXYLIN = np.array([0.650, 0.704, 0.286])
OD_EOSIN = np.array([0.072, 0.990, 0.105])

F32 = np.float32


# ----------------------------------------------------------------------------------------------
# Batch context and primitives. Maps are [B, H, W] float32, per-tile parameters [B, 1, 1] float32
# (Python scalars keep float32). Coordinates are in tile units, pixel centres at (i + 0.5) / size,
# so every feature scales with the tile size.

_BLOCK = 8192  # uniforms fetched from each tile's generator at a time
_BATCH_PIXELS = 1 << 20  # pixels rendered together (tiles of one class)


class _Batch:
    """Tiles of one class rendered together: their random streams and the shared pixel grid.

    Every tile consumes exactly the same sequence of draws (shapes depend only on the class and
    the size), so tile i's numbers never depend on which other tiles share its batch.
    """

    def __init__(self, rngs: list[np.random.Generator], size: int):
        self.rngs = rngs
        self.n = len(rngs)
        self.size = size
        self.pixels = (np.arange(size, dtype=F32) + 0.5) / size
        self.x = self.pixels[None, None, :]
        self.y = self.pixels[None, :, None]
        self._block = np.empty((self.n, 0), F32)
        self._used = 0

    def draw(self, *shape: int) -> np.ndarray:
        """Uniform [0, 1) numbers shaped [B, *shape], each tile's from its own generator."""
        count = math.prod(shape)
        if count >= _BLOCK:  # big requests (pixel noise) go straight to the generators
            return self._fetch(count).reshape(self.n, *shape)
        if count > self._block.shape[1] - self._used:
            # Top up: leftovers are kept, so the sequence of numbers a tile gets depends only on
            # the sequence of requests, which is the same for every tile of a class and size.
            self._block = np.concatenate([self._block[:, self._used :], self._fetch(_BLOCK)], axis=1)
            self._used = 0
        out = self._block[:, self._used : self._used + count]
        self._used += count
        return out.reshape(self.n, *shape)

    def _fetch(self, count: int) -> np.ndarray:
        fresh = np.empty((self.n, count))
        for rng, row in zip(self.rngs, fresh):
            rng.random(out=row)  # float64: the fastest of numpy's uniform samplers
        return fresh.astype(F32)

    def uniform(self, low: float, high: float, *shape: int) -> np.ndarray:
        """Uniform in [low, high): one per tile shaped [B, 1, 1], or [B, *shape] when given."""
        return low + (high - low) * self.draw(*(shape or (1, 1)))

    def direction(self) -> tuple[np.ndarray, np.ndarray]:
        """A random unit vector (cos, sin) per tile, [B, 1, 1] each."""
        return _unit(self.uniform(-math.pi, math.pi))

    def _axis(self, cells: float):
        """Lattice cell index, position in the cell, and its smoothstep, along one image axis."""
        g = self.pixels * cells
        i = np.floor(g)
        f = g - i
        return i.astype(np.intp), f, _smooth(f)

    def noise(self, cells: float) -> np.ndarray:
        """Gradient (Perlin) noise in about [0, 1] (mean 0.5, sd 0.17), `cells` lattice cells
        across the tile. Value noise would be cheaper but shows its square lattice.

        Evaluated separably: with smoothstep weights Sx, Sy and corner gradients (gx, gy),
        n = sum_corners Sx * Sy * (gx * dx + gy * dy) splits into y-sums over lattice rows (small
        arrays) and one gather-and-weight pass over the full image."""
        n = int(cells) + 2
        grad = self.draw(2, n, n) * 2 - 1
        gx, gy = grad[:, 0], grad[:, 1]
        i, f, s = self._axis(cells)
        a = gx[:, i, :] * (1 - s)[:, None] + gx[:, i + 1, :] * s[:, None]
        c = gy[:, i, :] * ((1 - s) * f)[:, None] + gy[:, i + 1, :] * (s * (f - 1))[:, None]
        left = a[:, :, i] * ((1 - s) * f) + c[:, :, i] * (1 - s)
        return 0.5 + left + a[:, :, i + 1] * (s * (f - 1)) + c[:, :, i + 1] * s

    def line(self, t: np.ndarray, cells: float) -> np.ndarray:
        """1-D smooth value noise of a coordinate map `t` (within [-0.5, 1.5]): streaks that run
        along the level lines of `t`."""
        n = int(2 * cells) + 3
        lattice = self.draw(n).ravel()
        g = np.clip((t + 0.5) * cells, 0, n - 1.01)
        start = np.floor(g)
        f = g - start
        i = start.astype(np.intp) + (np.arange(self.n) * n)[:, None, None]
        a = lattice[i]
        return a + (lattice[i + 1] - a) * _smooth(f)

    def fbm(self, cells: float, octaves: int = 3) -> np.ndarray:
        """Octaves of noise, renormalised to mean 0.5: blotchy, multi-scale texture."""
        total = self.noise(cells)
        for k in range(1, octaves):
            total += self.noise(cells * 2**k) * 0.5**k
        return total / (2 - 0.5 ** (octaves - 1))


def _smooth(t):
    return t * t * (3 - 2 * t)


def _grain(noise: np.ndarray, amount: float) -> np.ndarray:
    """Multiplicative texture around 1 from a fine noise map: granular cytoplasm, fibrils."""
    return 1 + (noise - 0.5) * (2 * amount)


def _ramp(a, low, high):
    """0 below `low`, 1 above `high`, smooth in between (low > high gives the reverse ramp)."""
    return _smooth(np.clip((a - low) / (high - low), 0, 1))


def _unit(angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) for angles in [-pi, pi] with + - * only: Taylor series at a quarter of the angle,
    then two double-angle steps. Unlike libm, this rounds the same way on every machine."""
    a = angle * 0.25
    a2 = a * a
    c = 1 - a2 / 2 * (1 - a2 / 12 * (1 - a2 / 30 * (1 - a2 / 56)))
    s = a * (1 - a2 / 6 * (1 - a2 / 20 * (1 - a2 / 42 * (1 - a2 / 72))))
    for _ in range(2):
        c, s = c * c - s * s, 2 * c * s
    return c, s


def _turn(cos, sin, angle):
    """Rotate the unit vectors (cos, sin) by `angle`."""
    c, s = _unit(angle)
    return cos * c - sin * s, sin * c + cos * s


def _blur(a: np.ndarray, passes: int) -> np.ndarray:
    """Separable [1, 2, 1] / 4 binomial blur along H and W, `passes` times, edges clamped."""
    for _ in range(passes):
        p = np.pad(a, ((0, 0), (1, 1), (0, 0)), mode="edge")
        a = (p[:, :-2] + p[:, 1:-1] * 2 + p[:, 2:]) * 0.25
        p = np.pad(a, ((0, 0), (0, 0), (1, 1)), mode="edge")
        a = (p[:, :, :-2] + p[:, :, 1:-1] * 2 + p[:, :, 2:]) * 0.25
    return a


class _Points:
    """Points on a jittered grid in every tile: even but irregular, like packed cells.

    The grid has a fixed number of candidates (set by the smallest spacing the class allows), so
    every tile draws the same numbers; a tile's own spacing pushes surplus candidates off the
    tile, and `keep` thins the rest. Attributes are drawn for all candidates, then selected.
    """

    def __init__(self, b: _Batch, spacing, keep, margin: float, smallest: float, jitter: float = 1.0):
        self.b = b
        n = math.ceil((1 + 2 * margin) / smallest)
        self.shape = (n, n)
        shift = 0.5 + (b.draw(2, n, n) - 0.5) * jitter  # position inside the grid cell
        grid = np.arange(n, dtype=F32)
        self.grid_x = (grid[None, None, :] + shift[:, 0]) * spacing - margin
        self.grid_y = (grid[None, :, None] + shift[:, 1]) * spacing - margin
        self.sel = (self.grid_x <= 1 + margin) & (self.grid_y <= 1 + margin) & (b.draw(n, n) < keep)
        self.tile = np.nonzero(self.sel)[0]
        self.x, self.y = self.grid_x[self.sel], self.grid_y[self.sel]

    def uniform(self, low: float, high: float) -> np.ndarray:
        """One uniform number per kept point."""
        return self.b.uniform(low, high, *self.shape)[self.sel]

    def of_tile(self, per_tile: np.ndarray) -> np.ndarray:
        """A per-tile parameter ([B, 1, 1]) repeated for each kept point."""
        return per_tile.reshape(-1)[self.tile]


def _splat(b: _Batch, tile, x, y, rx, ry, cos, sin, dens, texture=None, rough: float = 0.0,
           hollow: float = 0.0) -> np.ndarray:
    """Sum of elliptical blobs (nuclei, vacuoles, specks) per pixel, anti-aliased over ~1 pixel.

    Blob k of tile `tile[k]` sits at (x, y) with semi-axes rx along (cos, sin) and ry across, in
    tile units, and adds `dens` where it covers a pixel. `texture` ([B, H, W] in [0, 1]) makes
    outlines ragged (`rough`) and the chromatin grainy; `hollow` lightens blob centres (vesicular
    nuclei with a dark rim).

    Only pixels inside each (padded) ellipse are visited: per blob the pixel rows it spans, per
    row the exact run of columns, expanded into flat arrays. np.bincount then sums each pixel's
    contributions in blob order, so a tile's result does not depend on the rest of its batch.
    """
    size = b.size
    rx, ry = np.maximum(rx * size, 0.3), np.maximum(ry * size, 0.3)
    minor = np.minimum(rx, ry)
    # Normalised distance where coverage reaches 0: ragged outline and the 1-px soft edge.
    limit = 1 + rough / 2 + 0.5 / minor
    cx, cy = x * size, y * size
    # The blob is the quadratic form kxx dx^2 + kxy dx dy + kyy dy^2 < limit^2 (pixel offsets).
    irx2, iry2 = 1 / (rx * rx), 1 / (ry * ry)
    kxx = cos * cos * irx2 + sin * sin * iry2
    kyy = sin * sin * irx2 + cos * cos * iry2
    kxy = 2 * cos * sin * (irx2 - iry2)
    reach_y = np.sqrt((rx * sin) ** 2 + (ry * cos) ** 2) * limit
    top = np.maximum(np.floor(cy - reach_y), 0).astype(np.intp)
    rows = np.maximum(np.minimum(np.floor(cy + reach_y), size - 1).astype(np.intp) - top + 1, 0)
    # One entry per (blob, pixel row).
    blob = np.repeat(np.arange(tile.size), rows)
    py = top[blob] + (np.arange(blob.size) - np.repeat(np.cumsum(rows) - rows, rows))
    dy = py.astype(F32) + 0.5 - cy[blob]
    a, bq, c = kxx[blob], kxy[blob] * dy, kyy[blob] * dy * dy
    disc = bq * bq - 4 * a * (c - limit[blob] ** 2)
    root = np.sqrt(np.maximum(disc, 0))
    left = np.maximum(np.ceil(cx[blob] + (-bq - root) / (2 * a) - 0.5), 0)
    right = np.minimum(np.floor(cx[blob] + (-bq + root) / (2 * a) - 0.5), size - 1)
    runs = np.where(disc > 0, np.maximum(right - left + 1, 0), 0).astype(np.intp)
    # One entry per covered pixel.
    local = np.arange(runs.sum()) - np.repeat(np.cumsum(runs) - runs, runs)
    flat = np.repeat((tile[blob] * size + py) * size + left.astype(np.intp), runs) + local
    dx = local.astype(F32) + np.repeat(left + 0.5 - cx[blob], runs)
    dist = np.sqrt(np.maximum((np.repeat(a, runs) * dx + np.repeat(bq, runs)) * dx + np.repeat(c, runs), 0))
    d = np.repeat(dens[blob], runs)
    if texture is not None:
        grain = np.clip(texture.reshape(-1)[flat] - 0.5, -0.5, 0.5)  # bounded, so `limit` holds
        dist += rough * grain
        d *= 1 - 0.8 * grain
    m = np.repeat(minor[blob], runs)
    value = np.clip(m + 0.5 - m * dist, 0, 1) * d
    if hollow:
        value *= 1 - hollow * np.clip(1 - dist, 0, 1)
    out = np.bincount(flat, value, minlength=b.n * size * size)
    return out.reshape(b.n, size, size).astype(F32)


def _fibres(b: _Batch, cos, sin, per_tile: tuple[float, float], wave: float, jitter: np.ndarray):
    """Wavy parallel fibre bands running along (cos, sin); `jitter` (a noise map) makes bands
    merge and split.

    Returns the bands (in [0, 1]) and `wavy`, the across-fibre coordinate bent with the bands:
    1-D noise of `wavy` gives streaks and clefts that follow the same waves.
    """
    across = 0.5 + (b.y - 0.5) * cos - (b.x - 0.5) * sin
    freq = b.uniform(*per_tile)
    wavy = across + (b.noise(2) - 0.5) * wave / freq
    phase = wavy * freq + (jitter - 0.5) * 0.8
    frac = phase - np.floor(phase)
    return 4 * frac * (1 - frac), wavy


# ----------------------------------------------------------------------------------------------
# Classes. Each returns (cH, cE) concentration maps. Parameter ranges overlap a little between
# classes (tumor/complex, stroma/debris), as real tissue does.


def _tumour_nuclei(b: _Batch, spacing, keep, radius, elongation, disorder, dens, hollow: float, texture):
    """Crowded, large, irregular, partly aligned (pseudostratified) nuclei."""
    p = _Points(b, b.uniform(*spacing), b.uniform(*keep), margin=0.05, smallest=spacing[0])
    r = p.of_tile(b.uniform(*radius)) * p.uniform(0.75, 1.25)
    e = np.sqrt(p.of_tile(b.uniform(*elongation)) * p.uniform(0.8, 1.2))
    cos, sin = b.direction()
    cos, sin = _turn(p.of_tile(cos), p.of_tile(sin), p.of_tile(b.uniform(*disorder)) * p.uniform(-1, 1))
    d = p.of_tile(b.uniform(*dens)) * p.uniform(0.75, 1.2)
    return _splat(b, p.tile, p.x, p.y, r * e, r / e, cos, sin, d, texture, rough=0.5, hollow=hollow)


def _round_nuclei(b: _Batch, spacing, keep, radius, dens, margin: float = 0.05, texture=None):
    """Small round nuclei (lymphocytes, plasma cells) on a jittered grid; radius relative to spacing."""
    sp = b.uniform(*spacing)
    p = _Points(b, sp, b.uniform(*keep), margin=margin, smallest=spacing[0])
    r = p.of_tile(sp) * p.uniform(*radius)
    cos, sin = _unit(p.uniform(-math.pi, math.pi))
    ry = r * p.uniform(0.8, 1.0)
    return _splat(b, p.tile, p.x, p.y, r, ry, cos, sin, p.uniform(*dens), texture, rough=0.25)


def _specks(b: _Batch, count: tuple[int, int], radius: tuple[float, float], dens, big: float = 0.0):
    """Scattered dust or nuclear fragments, count[0] to count[1] per tile, uniformly placed; a
    share `big` of them are 2.2 times larger (shrunken whole nuclei)."""
    most = count[1]
    n = b.uniform(count[0], most + 1)
    sel = np.arange(most) < n.reshape(-1, 1)
    tile = np.nonzero(sel)[0]
    x, y = b.draw(most)[sel], b.draw(most)[sel]
    r = b.uniform(*radius, most)[sel] * np.where(b.draw(most)[sel] < big, 2.2, 1.0).astype(F32)
    cos, sin = _unit(b.uniform(-math.pi, math.pi, most)[sel])
    ry = r * b.uniform(0.6, 1.0, most)[sel]
    return _splat(b, tile, x, y, r, ry, cos, sin, b.uniform(*dens, most)[sel])


def _render_tumor(b: _Batch):
    """Dense, large, irregular dark nuclei in purple-pink cytoplasm; sometimes gland lumens."""
    cyto = b.fbm(4, 2)
    fine = b.noise(30)
    grain = _grain(fine, 0.6)
    h = b.uniform(0.35, 0.8) * (0.5 + cyto) * grain
    e = b.uniform(0.8, 1.6) * (0.3 + 1.4 * cyto) * grain
    nuclei = _tumour_nuclei(
        b, spacing=(0.1, 0.14), keep=(0.85, 1.0), radius=(0.038, 0.05), elongation=(1.3, 2.2),
        disorder=(0.3, 1.2), dens=(1.4, 2.4), hollow=0.35, texture=fine,
    )
    # Glandular lumens and retraction gaps: white where a slow noise crosses a per-tile level.
    tissue = 1 - _ramp(b.noise(2.5) + b.uniform(-0.5, 0.0), 0.62, 0.68)
    return (h + nuclei) * tissue, e * (1 - 0.4 * np.minimum(nuclei, 1)) * tissue


def _render_stroma(b: _Batch):
    """Pink, wavy, oriented fibre bundles with white clefts and sparse spindle nuclei."""
    cos, sin = b.direction()
    breaks = b.noise(5)
    band, wavy = _fibres(b, cos, sin, (9, 20), wave=2.5, jitter=breaks)
    streaks = b.line(wavy, 36)
    fibril = (0.4 * band + 1.2 * (streaks - 0.5) + 0.5) * (0.6 + 0.6 * breaks)
    fine = b.noise(30)
    e = b.uniform(1.0, 1.8) * (0.25 + 0.9 * np.maximum(fibril, 0)) * _grain(fine, 0.3)
    h = b.uniform(0.1, 0.3) * (0.5 + breaks)
    # Clefts: long thin white cracks between bundles, following the waves.
    cleft = _ramp(b.line(wavy, 9) + (b.noise(2.5) - 0.5) * 0.8 + b.uniform(-0.35, 0.1), 0.72, 0.8)
    # Sparse spindle-shaped fibroblast nuclei, aligned with the fibres.
    p = _Points(b, b.uniform(0.12, 0.2), b.uniform(0.15, 0.5), margin=0.05, smallest=0.12)
    c, s = _turn(p.of_tile(cos), p.of_tile(sin), p.uniform(-0.2, 0.2))
    minor = p.uniform(0.01, 0.016)
    major = minor * p.uniform(2.5, 4.5)
    nuclei = _splat(b, p.tile, p.x, p.y, major, minor, c, s, p.uniform(1.6, 2.6), fine, rough=0.2)
    tissue = 1 - cleft
    return (h + nuclei) * tissue, e * tissue


def _render_complex(b: _Batch):
    """Stroma invaded in patches by tumour nuclei, with scattered immune cells."""
    h, e = _render_stroma(b)
    # Tumour cells invade a blotchy part of the stroma; immune cells scatter everywhere.
    invaded = _ramp(b.noise(2.5) + b.uniform(-0.2, 0.2), 0.45, 0.55)
    tumour = _tumour_nuclei(
        b, spacing=(0.1, 0.15), keep=(0.5, 0.9), radius=(0.03, 0.045), elongation=(1.1, 2.2),
        disorder=(0.5, 1.5), dens=(1.3, 2.3), hollow=0.3, texture=b.noise(20),
    )
    immune = _round_nuclei(b, spacing=(0.06, 0.09), keep=(0.05, 0.35), radius=(0.25, 0.3), dens=(2.0, 3.0))
    return h * (1 - 0.3 * invaded) + tumour * invaded + immune, e * (1 - 0.25 * invaded)


def _render_lympho(b: _Batch):
    """Packed small round dark nuclei (lymphocytes), a few gaps."""
    back = b.fbm(4, 2)
    fine = b.noise(30)
    grain = _grain(fine, 0.6)
    h = b.uniform(0.3, 0.6) * (0.5 + back) * grain
    e = b.uniform(0.3, 0.8) * (0.5 + back) * grain
    nuclei = _round_nuclei(b, spacing=(0.06, 0.08), keep=(0.75, 0.97), radius=(0.38, 0.5), dens=(2.2, 3.4),
                           margin=0.04, texture=fine)
    tissue = 1 - _ramp(b.noise(2.5) + b.uniform(-0.4, 0.0), 0.64, 0.7)
    return (h + nuclei) * tissue, e * tissue


def _ridges(n: np.ndarray, squarings: int) -> np.ndarray:
    """Thin lines along the 0.5 level set of a noise map: a foamy, mesh-like network. The
    profile is sharpened by squaring (exact, unlike pow()), thinner with more squarings."""
    r = np.clip(1 - np.abs(2 * n - 1), 0, 1)
    for _ in range(squarings):
        r *= r
    return r


def _render_debris(b: _Batch):
    """Mucus and necrosis: pale mesh, eosinophilic fragments, dark nuclear specks."""
    # Mucus and necrotic mesh: pale lavender fill crossed by a fine network of ridges.
    mucus = _ramp(b.noise(2.5) + b.uniform(-0.2, 0.2), 0.42, 0.52)
    mesh = 0.6 * _ridges(b.noise(9), 3) + 0.4 * _ridges(b.noise(18), 3)
    h = mucus * b.uniform(0.1, 0.3) * (0.6 + 1.2 * mesh) + 0.03
    # Eosinophilic fragments; in some tiles they are fibrous, overlapping with stroma.
    blotches = b.noise(10)
    frag = _ramp(b.noise(3) + (blotches - 0.5) * 0.4 + b.uniform(-0.2, 0.12), 0.52, 0.58)  # ragged edges
    band, _ = _fibres(b, *b.direction(), (7, 14), wave=3.0, jitter=blotches)
    fibrous = (b.draw(1, 1) < 0.35).astype(F32)
    texture = fibrous * band + (1 - fibrous) * blotches
    e = frag * b.uniform(0.6, 1.6) * (0.3 + 0.9 * texture) + mucus * mesh * 0.15 + 0.04
    # Karyorrhectic specks and a few shrunken (pyknotic) nuclei.
    specks = _specks(b, (15, 120), (0.004, 0.012), (1.5, 3.0), big=0.12)
    return h + frag * 0.15 + specks, e


def _render_mucosa(b: _Batch):
    """Crypts cut across: pale lumen, a ring of goblet cells, basal nuclei; lamina propria between."""
    back = b.fbm(5, 2)
    fine = b.noise(30)
    grain = _grain(fine, 0.6)
    lamina_h = b.uniform(0.35, 0.6) * (0.5 + back) * grain
    lamina_e = b.uniform(0.45, 0.9) * (0.5 + back) * grain
    epi_h, epi_e = b.uniform(0.3, 0.5), b.uniform(0.25, 0.5)
    lumen = b.uniform(0.12, 0.3)  # lumen radius / crypt radius
    spacing = b.uniform(0.5, 0.8)
    crypts = _Points(b, spacing, 1.0, margin=0.35, smallest=0.5, jitter=0.5)  # crypts sit in rows
    cx, cy = crypts.grid_x.reshape(b.n, -1), crypts.grid_y.reshape(b.n, -1)  # [B, K]
    valid = crypts.sel.reshape(b.n, -1)
    # Radius: a share of the spacing, but never reaching a neighbour (crypts do not overlap).
    gap = np.sqrt((cx[:, :, None] - cx[:, None, :]) ** 2 + (cy[:, :, None] - cy[:, None, :]) ** 2)
    gap[~(valid[:, :, None] & valid[:, None, :]) | np.eye(cx.shape[1], dtype=bool)] = np.inf
    radius = np.minimum(spacing.reshape(-1, 1) * b.uniform(0.42, 0.5, cx.shape[1]), 0.49 * gap.min(2))
    # Distance to the nearest crypt centre in units of its radius, min over crypts; each term is
    # an outer sum of an x-part and a y-part.
    qx = ((b.pixels[None, None, :] - cx[:, :, None]) / radius[:, :, None]) ** 2
    qy = ((b.pixels[None, None, :] - cy[:, :, None]) / radius[:, :, None]) ** 2
    qx[~valid] = np.inf
    crypt = np.full((b.n, b.size, b.size), np.inf, F32)
    for k in range(cx.shape[1]):
        np.minimum(crypt, qy[:, k, :, None] + qx[:, k, None, :], out=crypt)
    crypt = np.sqrt(crypt) + (b.noise(6) - 0.5) * 0.25  # a little ragged

    # Goblet cells: columnar, elongated along the radius, packed side by side around the lumen.
    inner, outer = lumen.reshape(-1, 1, 1) * radius[:, :, None], 0.84 * radius[:, :, None]
    ring, half_width = (inner + outer) / 2, (outer - inner) / 2
    most = 10  # goblets per crypt at the largest lumen share
    count = np.rint(2 * math.pi * (lumen + 0.84) / (1.2 * (0.84 - lumen))).reshape(-1, 1, 1)
    j = np.arange(most, dtype=F32)
    turn = b.uniform(0, 2 * math.pi, cx.shape[1], 1)
    angle = (j + b.uniform(-0.15, 0.15, cx.shape[1], most)) * (2 * math.pi) / count + turn
    keep = valid[:, :, None] & (j < count) & (b.draw(cx.shape[1], most) < b.uniform(0.6, 1.0))
    gc, gs = _unit((angle + math.pi) % (2 * math.pi) - math.pi)
    length = half_width * b.uniform(0.8, 1.0, cx.shape[1], most)
    goblets = _splat(
        b, np.nonzero(keep)[0], (cx[:, :, None] + ring * gc)[keep], (cy[:, :, None] + ring * gs)[keep],
        length[keep], (length * b.uniform(0.7, 0.85, cx.shape[1], most))[keep], gc[keep], gs[keep],
        b.uniform(0.7, 1.0, cx.shape[1], most)[keep], fine, rough=0.3,
    )
    mucin = np.minimum(goblets, 1)
    # Basal nuclei, elongated towards the centre, at a slightly uneven height.
    most = math.ceil(2 * math.pi * (0.8 * 0.5) * 0.88 / 0.024)  # at the largest radius, 0.8 x 0.5
    count = np.maximum(np.floor(2 * math.pi * radius * 0.88 / 0.024), 1)[:, :, None]
    j = np.arange(most, dtype=F32)
    angle = (j + b.uniform(-0.3, 0.3, cx.shape[1], most)) * (2 * math.pi) / count
    nc, ns = _unit((angle + math.pi) % (2 * math.pi) - math.pi)
    at = radius[:, :, None] * b.uniform(0.84, 0.93, cx.shape[1], most)
    minor = b.uniform(0.008, 0.012, cx.shape[1], most)
    keep = valid[:, :, None] & (j < count) & (b.draw(cx.shape[1], most) < 0.9)
    nuclei = _splat(
        b, np.nonzero(keep)[0], (cx[:, :, None] + at * nc)[keep], (cy[:, :, None] + at * ns)[keep],
        (minor * b.uniform(1.6, 2.4, cx.shape[1], most))[keep], minor[keep], nc[keep], ns[keep],
        b.uniform(1.6, 2.4, cx.shape[1], most)[keep], fine, rough=0.3,
    )
    epithelium = _ramp(crypt, 1.0, 0.94)
    immune = _round_nuclei(b, spacing=(0.06, 0.07), keep=(0.2, 0.5), radius=(0.22, 0.32), dens=(1.8, 2.8))
    immune *= 1 - epithelium
    h = lamina_h + (epi_h - lamina_h) * epithelium
    e = lamina_e + (epi_e - lamina_e) * epithelium
    # Goblet mucin stains pale blue-grey with a faint mesh; lumens are nearly empty.
    h = h * (1 - mucin) + mucin * 0.2 * (0.5 + _ridges(fine, 2))
    e = e * (1 - 0.9 * mucin)
    clear = 1 - 0.92 * _ramp(crypt, lumen * 1.1, lumen * 0.8)
    return (h + nuclei + immune) * clear, e * clear


def _render_adipose(b: _Batch):
    """Large pale fat cells: thin membranes on the borders of a (weighted) Voronoi diagram."""
    cells = _Points(b, b.uniform(0.45, 0.85), 1.0, margin=0.3, smallest=0.45)
    cx, cy = cells.grid_x.reshape(b.n, -1), cells.grid_y.reshape(b.n, -1)
    # Multiplicative weights bend the borders into arcs, like real, slightly collapsed cells.
    weight = b.uniform(0.85, 1.15, cx.shape[1])
    qx = ((b.pixels[None, None, :] - cx[:, :, None]) * weight[:, :, None]) ** 2
    qy = ((b.pixels[None, None, :] - cy[:, :, None]) * weight[:, :, None]) ** 2
    qx[~cells.sel.reshape(b.n, -1)] = np.inf
    first = np.full((b.n, b.size, b.size), np.inf, F32)
    second = first.copy()
    for k in range(cx.shape[1]):
        d = qy[:, k, :, None] + qx[:, k, None, :]
        np.minimum(second, np.maximum(first, d), out=second)
        np.minimum(first, d, out=first)
    border = (np.sqrt(second) - np.sqrt(first)) * 0.5  # about the distance to the nearest border
    thick = b.uniform(0.003, 0.009) * (0.5 + 1.5 * b.noise(4))  # membranes vary in thickness
    drawn = np.maximum(thick, 0.6 / b.size)  # at least ~1 px wide, lighter when thinner
    membrane = _ramp(border / drawn, 1.0, 0.4) * (thick / drawn) * _ramp(b.noise(5), 0.25, 0.35)
    strength = b.uniform(0.4, 1.0)
    e = membrane * strength + 0.03 * b.noise(6)
    h = membrane * strength * b.uniform(0.35, 0.7) + 0.01
    nuclei = _specks(b, (0, 2), (0.01, 0.015), (1.5, 2.5))
    return h + nuclei, e


def _render_empty(b: _Batch):
    """Bare glass: near white, faint haze, a few specks of dust; sometimes a faint smear."""
    haze = b.noise(3)
    h = b.uniform(0.0, 0.05) * haze
    smear = (b.draw(1, 1) < 0.15) * b.uniform(0.03, 0.12) * _ramp(b.noise(2), 0.55, 0.65)
    e = b.uniform(0.0, 0.06) * haze + smear
    return h + _specks(b, (0, 12), (0.003, 0.01), (0.6, 2.0)), e


_RENDERERS: tuple[Callable[[_Batch], tuple[np.ndarray, np.ndarray]], ...] = (
    _render_tumor, _render_stroma, _render_complex, _render_lympho,
    _render_debris, _render_mucosa, _render_adipose, _render_empty,
)
# Background optical density (glass and mounting medium are not perfectly clear), per class:
# empty tiles show little else, with a faint grey cast.
_BACKGROUND = ((0.04, 0.1),) * 7 + ((0.1, 0.2),)

# Beer-Lambert through a lookup table: OD in steps of 1/_OD_STEPS (an error below 0.07 grey levels)
# -> round(255 * exp(-OD)). Per pixel that is one multiply-add and an index, and the table is the
# only place exp() runs, so results cannot drift with a machine's libm.
_OD_STEPS = 2048
_OD_TABLE = np.rint(255 * np.exp(-np.arange(8 * _OD_STEPS + 1) / _OD_STEPS)).astype(np.uint8)


def _stain(b: _Batch, label: int, h: np.ndarray, e: np.ndarray) -> np.ndarray:
    """RGB from H and E maps: per-tile focus, stain strength and hue, background, pixel noise."""
    size = b.size
    focus = b.uniform(0.2, 1.0)
    # Blur width in proportion to the tile (variance grows with passes), capped for big tiles.
    passes = min(max(1, round((size * 0.008) ** 2)), 16)
    h = h + (_blur(h, passes) - h) * focus
    e = e + (_blur(e, passes) - e) * focus
    vectors = np.stack([OD_HEMATOXYLIN, OD_EOSIN]).astype(F32) + b.uniform(-0.06, 0.06, 2, 3)
    vectors *= b.uniform(0.75, 1.3, 2, 1) / np.sqrt((vectors * vectors).sum(2, keepdims=True))
    tint = b.uniform(*_BACKGROUND[label]).reshape(-1, 1) * b.uniform(0.7, 1.3, 3)
    # Pixel noise, shared by the channels (cheaper; camera and JPEG noise is mostly luminance).
    noise = (b.draw(size, size) - 0.5) * (2 * _OD_STEPS * b.uniform(0.01, 0.04))
    # Everything in table steps: index = OD * _OD_STEPS + 0.5, truncated (OD >= 0 after clipping).
    vectors *= _OD_STEPS
    offset = tint * _OD_STEPS + 0.5
    rgb = np.empty((b.n, size, size, 3), np.uint8)
    for c in range(3):
        steps = h * vectors[:, 0, c, None, None] + e * vectors[:, 1, c, None, None]
        steps += offset[:, c, None, None]
        steps += noise
        np.clip(steps, 0, len(_OD_TABLE) - 1, out=steps)
        rgb[..., c] = _OD_TABLE[steps.astype(np.intp)]
    return rgb


def to_luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, rounded exactly as PIL's RGB -> "L" conversion does (integer arithmetic)."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def generate_tiles(
    labels, size: int = 64, seed: int = 0, grayscale: bool = False, start_index: int = 0
) -> np.ndarray:
    """uint8 array [N, size, size, 3] (or [N, size, size] when grayscale) for class indices `labels`.

    Tile i depends only on (seed, start_index + i, labels[i], size, grayscale): generating a subset
    or a different batch split gives bit-identical tiles (so shards of it are stable).
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    size, seed, start_index = operator.index(size), operator.index(seed), operator.index(start_index)
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise FadscaleError(f"procedural: class labels must be in 0..{len(CLASS_NAMES) - 1}")
    if size < MIN_SIZE:
        raise FadscaleError(f"procedural: size={size}: expected an integer >= {MIN_SIZE}")
    if seed < 0 or start_index < 0:
        raise FadscaleError(f"procedural: seed={seed}, start_index={start_index}: expected integers >= 0")
    out = np.empty((labels.size, size, size, 3), np.uint8)
    # Render class by class, in chunks of about _BATCH_PIXELS pixels: bounded memory, arrays that
    # stay near the cache, and (by construction) the same tiles whatever the chunking.
    chunk = max(1, _BATCH_PIXELS // (size * size))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        for where in np.split(members, range(chunk, members.size, chunk)):
            rngs = [np.random.default_rng([seed, start_index + int(i), int(label)]) for i in where]
            batch = _Batch(rngs, size)
            h, e = _RENDERERS[label](batch)
            out[where] = _stain(batch, int(label), h, e)
    return to_luma(out) if grayscale else out


# ----------------------------------------------------------------------------------------------
# Data-set specs: "procedural" or "procedural:per_class=200,size=64,seed=3,grayscale=1".


@dataclass(frozen=True)
class ProceduralSpec:
    """A procedural data set: `per_class` tiles of each of the 8 classes, `size` x `size` px."""

    per_class: int = 100
    size: int = 64
    seed: int = 0
    grayscale: bool = False

    @property
    def total(self) -> int:
        return self.per_class * len(CLASS_NAMES)


def _parse_int(key: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise FadscaleError(f"procedural spec: {key}={value!r}: expected an integer >= {minimum}")
    return number


def _parse_bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise FadscaleError(f"procedural spec: {key}={value!r}: expected 0/1 (or true/false)")


MAX_PROCEDURAL_PIXELS = 4 * 2**30  # 4 GiB of raw pixels (e.g. 100,000 tiles per class at 64 px, RGB: 9.2 GiB: refused)


def parse_spec(text: str) -> ProceduralSpec:
    """Parse "procedural" or "procedural:key=value,..." (keys: per_class, size, seed, grayscale)."""
    head, sep, rest = text.strip().partition(":")
    if head.strip() != "procedural":
        raise FadscaleError(f"data spec {text!r}: expected 'procedural' or 'procedural:key=value,...'")
    values: dict[str, object] = {}
    for item in rest.split(",") if sep and rest.strip() else []:
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq:
            raise FadscaleError(f"procedural spec: {item.strip()!r}: expected key=value")
        if key in values:
            raise FadscaleError(f"procedural spec: {key} given twice")
        if key == "per_class":
            values[key] = _parse_int(key, value, 1)
        elif key == "size":
            values[key] = _parse_int(key, value, MIN_SIZE)
        elif key == "seed":
            values[key] = _parse_int(key, value, 0)
        elif key == "grayscale":
            values[key] = _parse_bool(key, value)
        else:
            raise FadscaleError(
                f"procedural spec: unknown key {key!r} (={value!r}): "
                "expected per_class, size, seed or grayscale"
            )
    spec = ProceduralSpec(**values)
    # The tiles are generated in memory (as PNG bytes) before sharding: bound what that can take.
    pixels = spec.total * spec.size * spec.size * (1 if spec.grayscale else 3)
    if pixels > MAX_PROCEDURAL_PIXELS:
        raise FadscaleError(
            f"procedural spec {text!r}: {spec.total} tiles of {spec.size} px is {pixels / 2**30:.1f} GiB of pixels, "
            f"more than the {MAX_PROCEDURAL_PIXELS / 2**30:.0f} GiB the generator holds in memory; use a smaller "
            f"per_class or size")
    return spec


def tile_name(index: int, label: int) -> str:
    """Relative file name of data-set tile `index` (of class `label`)."""
    return f"{FOLDER_NAMES[label]}/proc_{index:06d}.png"


def iter_spec(spec: ProceduralSpec, batch: int = 256) -> Iterator[tuple[str, int, np.ndarray]]:
    """Yield (relative_name, class_index, image) for every tile of the spec, in vectorised batches.

    Classes are interleaved (tile `index` has class `index % 8`), so a larger per_class only
    appends tiles: the first 100 per class of per_class=200 are exactly those of per_class=100.
    """
    if batch < 1:
        raise ValueError(f"batch={batch}: expected >= 1")
    classes = len(CLASS_NAMES)
    for start in range(0, spec.total, batch):
        indices = np.arange(start, min(start + batch, spec.total))
        labels = indices % classes
        tiles = generate_tiles(labels, spec.size, spec.seed, spec.grayscale, start_index=start)
        for index, label, tile in zip(indices, labels, tiles):
            yield tile_name(int(index), int(label)), int(label), tile


# ----------------------------------------------------------------------------------------------
# Contact sheet.

SHEET_GAP = 2  # white pixels around and between tiles


def contact_sheet(path, per_class: int = 6, size: int = 64, seed: int = 0, grayscale: bool = False) -> None:
    """Write a PNG with one row per class: its name, then its first `per_class` data-set tiles.

    Layout: a label column, then tiles at x = label_width + j * (size + SHEET_GAP) and
    y = SHEET_GAP + c * (row + SHEET_GAP), where row = max(size, text height).
    """
    from PIL import Image, ImageDraw

    if per_class < 1:
        raise FadscaleError(f"contact sheet: per_class={per_class}: expected an integer >= 1")
    classes = len(CLASS_NAMES)
    indices = np.arange(per_class * classes)
    tiles = generate_tiles(indices % classes, size, seed, grayscale)
    mode = "L" if grayscale else "RGB"
    probe = ImageDraw.Draw(Image.new(mode, (1, 1)))
    boxes = [probe.textbbox((0, 0), name) for name in CLASS_NAMES]
    label_width = max(box[2] for box in boxes) + 3 * SHEET_GAP
    row = max(size, max(box[3] for box in boxes))
    width = label_width + per_class * (size + SHEET_GAP)
    sheet = Image.new(mode, (width, SHEET_GAP + classes * (row + SHEET_GAP)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(CLASS_NAMES):
        top = SHEET_GAP + c * (row + SHEET_GAP)
        draw.text((SHEET_GAP, top + (row - boxes[c][3]) // 2), name, fill="black")
        for j in range(per_class):
            left = label_width + j * (size + SHEET_GAP)
            sheet.paste(Image.fromarray(tiles[j * classes + c]), (left, top))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fadscale.data.procedural",
        description="Write a contact sheet of procedural histology tiles (one row per class).",
    )
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--size", type=int, default=64, help="tile size in pixels (>= 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=6, help="tiles per class (row)")
    parser.add_argument("--grayscale", action="store_true")
    args = parser.parse_args(argv)
    try:
        contact_sheet(args.out, args.per_class, args.size, args.seed, args.grayscale)
    except FadscaleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
