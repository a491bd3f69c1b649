"""Cached grids, texture banks and resampling shared by the phantom renderer.

Everything here depends only on the working size, never on a study, so it is built once per
size (``functools.lru_cache``) from fixed seeds and handed out read-only. A study picks a bank
entry and a crop offset with its own rng: that is what makes rendering cheap (no per-study
texture synthesis) yet different from study to study.

Coordinates: a working grid of n x n pixels covers [-1, 1]^2; x grows to the image right, y grows
downwards. Banks are (2n, 2n) so that any crop of n x n (or any n-row window whose "anchor" lands
anywhere in the image) is valid.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from scipy import ndimage

_BANK = 4  # entries per bank: enough variety, small enough to build in well under a second


def work_size(size: int) -> int:
  """Smooth anatomy is drawn at half the output size (a quarter of the pixels) and upsampled."""
  return max(32, size // 2)


def _frozen(a: np.ndarray) -> np.ndarray:
  a = np.ascontiguousarray(a, np.float32)
  a.flags.writeable = False
  return a


@functools.lru_cache(maxsize=8)
def grid(n: int) -> tuple[np.ndarray, np.ndarray]:
  """(1, n) x and (n, 1) y pixel-centre coordinates in [-1, 1]; broadcast instead of meshgrid."""
  c = (np.arange(n, dtype=np.float32) + 0.5) * (2.0 / n) - 1.0
  return _frozen(c[None, :]), _frozen(c[:, None])


def to_pixel(v: float, n: int) -> int:
  """Normalised coordinate -> nearest pixel index of an n grid (clipped into the grid)."""
  return int(min(n - 1, max(0, round((v + 1.0) * 0.5 * n - 0.5))))


def ramp(d: np.ndarray, eps: float) -> np.ndarray:
  """Soft step 0 -> 1 across d in [-eps/2, eps/2]: a cheap anti-aliased inside test (d > 0 inside).

  In-place ufuncs rather than np.clip: this runs thousands of times per second and np.clip's
  Python-level wrapper costs more than the arithmetic on a small window.
  """
  t = d * (1.0 / eps)
  t += 0.5
  np.maximum(t, 0.0, out=t)
  return np.minimum(t, 1.0, out=t)


def rows(n: int, y0: float, y1: float) -> slice:
  """Rows of an n grid covering y in [y0, y1] (at least one row): where a local shape can be."""
  r0 = min(n - 1, max(0, math.floor((y0 + 1.0) * 0.5 * n)))
  return slice(r0, min(n, max(r0 + 1, math.ceil((y1 + 1.0) * 0.5 * n))))


@functools.lru_cache(maxsize=8)
def _upsample_matrix(n: int, size: int) -> np.ndarray:
  """(size, n) bilinear interpolation matrix (pixel-centre aligned, edge-clamped)."""
  src = (np.arange(size, dtype=np.float64) + 0.5) * (n / size) - 0.5
  lo = np.clip(np.floor(src).astype(int), 0, n - 1)
  hi = np.clip(lo + 1, 0, n - 1)
  w = np.clip(src - np.floor(src), 0.0, 1.0)
  m = np.zeros((size, n))
  m[np.arange(size), lo] += 1.0 - w
  m[np.arange(size), hi] += w
  return _frozen(m)


@functools.lru_cache(maxsize=1)
def _blas_controller():
  from threadpoolctl import ThreadpoolController
  return ThreadpoolController()


def upsample(a: np.ndarray, size: int) -> np.ndarray:
  """(n, n) -> (size, size) bilinear via two small matmuls: faster than ndimage.zoom by ~10x.

  The matmuls run on one BLAS thread: these are far too small to split, and a multithreaded
  OpenBLAS spinning on a busy machine made rendering ~10x slower (1.9 -> 24 ms per 256^2 image).
  """
  if a.shape[0] == size:
    return a.astype(np.float32, copy=True)
  m = _upsample_matrix(a.shape[0], size)
  with _blas_controller().limit(limits=1, user_api="blas"):
    return m @ a @ m.T


def _blurred_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
  z = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
  return (z - z.mean()) / (z.std() + 1e-8)


@functools.lru_cache(maxsize=8)
def smooth_bank(n: int) -> np.ndarray:
  """(B, 2n, 2n) unit-variance low-frequency noise (blobs ~n/10 across): patchy opacities, mottle."""
  rng = np.random.default_rng(1001)
  return _frozen(np.stack([_blurred_noise(rng, (2 * n, 2 * n), n / 24.0) for _ in range(_BANK)]))


@functools.lru_cache(maxsize=8)
def fine_bank(n: int) -> np.ndarray:
  """(B, 2n, 2n) unit-variance mid-frequency noise: film/lung parenchymal texture."""
  rng = np.random.default_rng(1002)
  return _frozen(np.stack([_blurred_noise(rng, (2 * n, 2 * n), max(0.8, n / 128.0)) for _ in range(_BANK)]))


@functools.lru_cache(maxsize=4)
def grain_bank(size: int) -> np.ndarray:
  """(B, 2 size, 2 size) unit-variance grain at output resolution (quantum noise is not smooth)."""
  rng = np.random.default_rng(1003)
  return _frozen(np.stack([_blurred_noise(rng, (2 * size, 2 * size), 0.6) for _ in range(2)]))


def _splat(img: np.ndarray, pts: np.ndarray, w: np.ndarray) -> None:
  """Adds weights w at float pixel positions pts (k, 2) = (row, col), nearest pixel, in place."""
  r = np.rint(pts[:, 0]).astype(int)
  c = np.rint(pts[:, 1]).astype(int)
  ok = (r >= 0) & (r < img.shape[0]) & (c >= 0) & (c < img.shape[1])
  np.add.at(img, (r[ok], c[ok]), w[ok])


def _tree(n: int, rng: np.random.Generator) -> np.ndarray:
  """(2n, 2n) branching, tapering vessel tree radiating from the centre pixel (the hilum).

  Segments branch in two, shrinking in length, width and brightness, so markings are thick and
  bright near the hilum and fade towards the periphery. Widths fall into three classes, each
  blurred with its own sigma, because a per-segment blur would cost a filter per segment.
  """
  size = 2 * n
  layers = np.zeros((3, size, size), np.float32)
  stack = [(np.array([n, n], float), a, 0.16 * n, 0, 1.0)
           for a in np.linspace(0, 2 * np.pi, 12, endpoint=False) + rng.uniform(0, 0.5)]
  while stack:
    p, ang, length, depth, amp = stack.pop()
    steps = max(2, int(length * 2))
    bend = rng.normal(0, 0.25) / steps
    angs = ang + bend * np.arange(steps)
    d = np.stack([np.sin(angs), np.cos(angs)], 1) * (length / steps)
    pts = p + np.cumsum(d, 0)
    _splat(layers[min(depth, 4) // 2], pts, np.full(steps, amp, np.float32))
    if depth < 5:
      for sgn in (-1, 1):
        stack.append((pts[-1], angs[-1] + sgn * rng.uniform(0.25, 0.6), length * rng.uniform(0.62, 0.82),
                      depth + 1, amp * 0.78))
  scale = n / 128.0
  out = sum(ndimage.gaussian_filter(layers[k], s * scale) * (s * scale) ** 1.2
            for k, s in enumerate((1.6, 1.0, 0.6)))
  return out / np.percentile(out[out > 0], 99)


@functools.lru_cache(maxsize=8)
def vessel_bank(n: int) -> np.ndarray:
  """(B, 2n, 2n) vessel trees with the hilum at pixel (n, n); crop so (n, n) lands on a hilum."""
  rng = np.random.default_rng(1004)
  return _frozen(np.clip(np.stack([_tree(n, rng) for _ in range(_BANK)]), 0.0, 1.5))


@functools.lru_cache(maxsize=8)
def kerley_bank(n: int) -> np.ndarray:
  """(B, 2n, 2n) short horizontal line segments (Kerley B septal lines) scattered at random."""
  rng = np.random.default_rng(1005)
  out = np.zeros((_BANK, 2 * n, 2 * n), np.float32)
  seg = max(3, n // 22)
  for b in range(_BANK):
    for _ in range(n):
      r, c = rng.integers(0, 2 * n), rng.integers(0, 2 * n - seg)
      out[b, r, c:c + rng.integers(seg // 2 + 1, seg + 1)] = 1.0
  return _frozen(ndimage.gaussian_filter(out, (0, 0.5 * n / 128, 0.5 * n / 128)) * 1.6)


def crop(bank: np.ndarray, rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
  """A random (rows, cols) view of a random bank entry (no copy)."""
  b = bank[rng.integers(0, bank.shape[0])]
  r = rng.integers(0, b.shape[0] - rows + 1)
  c = rng.integers(0, b.shape[1] - cols + 1)
  return b[r:r + rows, c:c + cols]


def anchored(bank_entry: np.ndarray, n: int, row: int, col: int, cols: slice) -> np.ndarray:
  """(n, len(cols)) view of a (2n, 2n) texture whose centre lands on pixel (row, col) of the grid."""
  r0, c0 = n - row, n - col
  return bank_entry[r0:r0 + n, c0 + cols.start:c0 + cols.stop]
