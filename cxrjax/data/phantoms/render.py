"""Phantom chest radiographs: a StudyAttributes in, uint8 PA/AP and lateral images out.

Pipeline per view (why it is fast enough for ~500 images/s on two cores at 256 x 256):
  1. geometry(attrs): a few floats shared by both views, so the views agree by construction;
  2. smooth anatomy and signs at half resolution on cached coordinate grids, with textures
     (vessel trees, blobs, Kerley lines, parenchyma) cut from cached banks instead of synthesised;
  3. bilinear upsampling by two small matmuls;
  4. the broken rib of a fracture (in a small window), devices, grain, the site's contrast curve
     (a lookup table), burned-in marker/text and the shortcut token at full resolution.
Randomness comes only from ``render_seed``, through one named stream per component
(``default_rng([render_seed, k])``), so switching one finding on never reshuffles the others.
"""
from __future__ import annotations

import numpy as np

from cxrjax.data.phantoms import anatomy, devices, signs, site
from cxrjax.data.phantoms import textures as tx
from cxrjax.data.phantoms.study import StudyAttributes

_ANATOMY, _SITE, _FILM = 0, 300, 400  # stream ids (signs use 100 + label, devices 200)


def _check(size: int) -> None:
  if not 16 <= int(size) <= 1024:
    raise ValueError(f"size must be in [16, 1024] (designed for 64..512), got {size}")


def _upsampled(dens: np.ndarray, a: StudyAttributes, size: int, stream: int) -> tuple:
  """(n, n) density + film mottle -> ((size, size) float32 density, the view's film rng)."""
  rng = np.random.default_rng([int(a.render_seed), _FILM + stream])
  n = dens.shape[0]
  dens += 0.008 * tx.crop(tx.fine_bank(n), rng, n, n)
  return tx.upsample(dens, size), rng


def _to_image(full: np.ndarray, a: StudyAttributes, view: str, rng: np.random.Generator) -> np.ndarray:
  """(size, size) density -> uint8: grain, the site's curve, burn-in, then (last, rng-free) the shortcut."""
  site.add_noise(full, a.site, rng)
  img = site.to_grey(full, a.site)
  site.burn_in(img, a.site, view, np.random.default_rng([int(a.render_seed), _SITE]))
  if a.shortcut >= 0.5:
    site.shortcut(img)
  return img


def render_frontal(attrs: StudyAttributes, size: int) -> np.ndarray:
  """(size, size) uint8 PA or AP view (attrs.frontal_view); patient's right on the image left."""
  _check(size)
  n = tx.work_size(size)
  g = anatomy.geometry(attrs)
  canvas = anatomy.frontal(attrs, g, n, np.random.default_rng([int(attrs.render_seed), _ANATOMY]))
  signs.frontal(canvas, g, signs.plan(attrs, g))
  full, rng = _upsampled(canvas.compose(), attrs, size, 0)
  anatomy.fracture_frontal(full, attrs, g)
  devices.frontal(full, attrs, g)
  return _to_image(full, attrs, attrs.frontal_view, rng)


def render_lateral(attrs: StudyAttributes, size: int) -> np.ndarray:
  """(size, size) uint8 lateral view, patient facing the image left; same geometry and signs."""
  _check(size)
  n = tx.work_size(size)
  g = anatomy.geometry(attrs)
  canvas, lf = anatomy.lateral(attrs, g, n, np.random.default_rng([int(attrs.render_seed), _ANATOMY + 1]))
  signs.lateral(canvas, g, lf, signs.plan(attrs, g))
  full, rng = _upsampled(canvas.compose(), attrs, size, 1)
  devices.lateral(full, attrs, g, lf)
  return _to_image(full, attrs, "L", rng)


def render_views(attrs: StudyAttributes, size: int) -> tuple[list[np.ndarray], list[str]]:
  """All views of a study: the frontal, then the lateral when attrs.has_lateral."""
  images, views = [render_frontal(attrs, size)], [attrs.frontal_view]
  if attrs.has_lateral:
    images.append(render_lateral(attrs, size))
    views.append("L")
  return images, views
