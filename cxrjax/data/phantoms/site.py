"""What the acquisition site adds: contrast curve, noise, burned-in marker and text, the shortcut.

Sites differ in exactly the ways a classifier could pick up on real data: the film/detector
characteristic curve (gain, gamma, black and white levels), the noise level, where and how the
laterality marker letter and the annotation strip are burned in. The optional shortcut token is
drawn last with no randomness, so toggling it changes only its own corner.
"""
from __future__ import annotations

import functools

import numpy as np

from cxrjax.data.phantoms import textures as tx

_LO, _HI, _LUT = -0.2, 1.3, 1024  # density range the contrast curve covers, and its resolution

# Per site: (sigmoid gain, centre, gamma, black, white, noise sigma, marker, marker (row, col),
# text (row, col) anchor as fractions of the size, text on a dark box?). Marker and text avoid the
# bottom-left corner, which belongs to the shortcut token.
_SITES = (
    (5.0, 0.42, 1.00, 6, 250, 0.010, "L", (0.06, 0.86), (0.03, 0.04), False),
    (6.5, 0.45, 0.85, 14, 240, 0.018, "R", (0.20, 0.05), (0.93, 0.55), True),
    (4.2, 0.40, 1.15, 2, 255, 0.014, "L", (0.45, 0.92), (0.03, 0.58), False),
    (7.5, 0.47, 0.95, 20, 235, 0.024, "R", (0.10, 0.12), (0.02, 0.30), True),
    (5.5, 0.44, 1.25, 8, 248, 0.026, "L", (0.82, 0.90), (0.94, 0.30), False),
)

# 3x5 block glyphs, rows top to bottom.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", "L": "100100100100111", "R": "110101110101101",
    "A": "010101111101101", "P": "110101110100100", "-": "000000111000000", ":": "000010000010000",
    " ": "000000000000000",
}


def params(site: int) -> tuple:
  return _SITES[int(site) % len(_SITES)]


@functools.lru_cache(maxsize=16)
def _lut(site: int) -> np.ndarray:
  """(_LUT,) uint8 characteristic curve of a site: density -> grey level."""
  gain, centre, gamma, black, white = params(site)[:5]
  d = np.linspace(_LO, _HI, _LUT)
  s = 1.0 / (1.0 + np.exp(-gain * (d - centre)))
  s = (s - s[0]) / (s[-1] - s[0])
  out = np.rint(black + (white - black) * s ** gamma).astype(np.uint8)
  out.flags.writeable = False
  return out


def to_grey(dens: np.ndarray, site: int) -> np.ndarray:
  """(S, S) float density -> uint8 through the site's curve via a lookup table (no pow per pixel)."""
  idx = (dens - _LO) * ((_LUT - 1) / (_HI - _LO))
  np.clip(idx, 0, _LUT - 1, out=idx)
  return _lut(site)[idx.astype(np.int32)]


def add_noise(dens: np.ndarray, site: int, rng: np.random.Generator) -> None:
  """Quantum/detector grain at output resolution, in place; level set by the site."""
  size = dens.shape[0]
  dens += params(site)[5] * tx.crop(tx.grain_bank(size), rng, size, size)


@functools.lru_cache(maxsize=256)
def _glyph(ch: str, cell: int) -> np.ndarray:
  """(5 cell, 3 cell) bool bitmap of one character (cached: glyphs are drawn per image)."""
  bits = np.array([int(b) for b in _FONT.get(ch, _FONT[" "])], bool).reshape(5, 3)
  out = np.kron(bits, np.ones((cell, cell), bool))
  out.flags.writeable = False
  return out


def _text(img: np.ndarray, s: str, row: int, col: int, cell: int, value: int) -> tuple:
  """Burns block glyphs into a uint8 image at (row, col); returns the (rows, cols) it covered."""
  h, w = img.shape
  for k, ch in enumerate(s):
    blk = _glyph(ch, cell)
    r0, c0 = row, col + k * 4 * cell
    r1, c1 = min(h, r0 + blk.shape[0]), min(w, c0 + blk.shape[1])
    if r1 > r0 and c1 > c0:
      img[r0:r1, c0:c1][blk[:r1 - r0, :c1 - c0]] = value
  return (row, row + 5 * cell), (col, col + 4 * cell * len(s))


def burn_in(img: np.ndarray, site: int, view: str, rng: np.random.Generator) -> None:
  """Laterality marker and annotation strip (date/time/view), positions and style per site."""
  size = img.shape[0]
  p = params(site)
  cell = max(1, size // 128)
  mr, mc = (int(f * size) for f in p[7])
  big = 2 * cell
  if p[9]:  # boxed style: the letter sits on a black tab
    img[max(0, mr - cell):mr + 5 * big + cell, max(0, mc - cell):mc + 3 * big + cell] = 0
  _text(img, p[6], mr, mc, big, 255)
  d = rng.integers(0, 10, 8)
  s = f"{d[0]}{d[1]}-{d[2]}{d[3]} {d[4]}{d[5]}:{d[6]}{d[7]} {'L' if view == 'L' else view}"
  tr, tc = int(p[8][0] * size), int(p[8][1] * size)
  tc = min(tc, max(0, size - 4 * cell * len(s) - cell))
  tr = min(tr, size - 5 * cell - 1)
  if p[9]:
    img[max(0, tr - cell):tr + 6 * cell, max(0, tc - cell):tc + 4 * cell * len(s) + cell] = 8
  _text(img, s, tr, tc, cell, 235)


def shortcut_box(size: int) -> tuple:
  """(r0, r1, c0, c1) of the shortcut token: bottom-left corner, nothing else is drawn there."""
  a = max(3, size // 20)
  r1 = size - max(2, size // 16)
  c0 = max(2, size // 16)
  return r1 - a, r1, c0, c0 + a


def shortcut(img: np.ndarray) -> None:
  """A bright square with a dark centre: distinctive, tiny, deterministic."""
  r0, r1, c0, c1 = shortcut_box(img.shape[0])
  img[r0:r1, c0:c1] = 255
  k = max(1, (r1 - r0) // 3)
  img[r0 + k:r1 - k, c0 + k:c1 - k] = 40
