"""Support devices (tubes, lines, a pacemaker) drawn at output resolution.

Devices are thin and radio-opaque, so they are drawn after upsampling (a line drawn at half
resolution would be blurred twice). Each device is a few anchor points in normalised
coordinates, joined by a smooth curve, sampled at half-pixel steps and stamped with a small
disk; placing points uses the study's device stream, so frontal and lateral agree.
"""
from __future__ import annotations

import numpy as np

from cxrjax.data.phantoms import study
from cxrjax.data.phantoms.anatomy import TRACHEA_LAT, Geometry, LateralFrame

_DENSE = 0.22  # radio-opaque plastic/metal line density added on top of the anatomy


def _curve(pts, size: int) -> np.ndarray:
  """(k, 2) (x, y) anchors -> (m, 2) points every ~half pixel along a Catmull-Rom-ish spline."""
  p = np.asarray(pts, np.float64)
  t = np.linspace(0.0, 1.0, len(p))
  seg = np.sum(np.hypot(*np.diff(p, axis=0).T)) * size
  s = np.linspace(0.0, 1.0, max(8, int(seg)))
  # Quadratic smoothing of the polyline: interpolate, then average with a shifted copy.
  q = np.stack([np.interp(s, t, p[:, 0]), np.interp(s, t, p[:, 1])], 1)
  k = max(1, len(s) // (4 * len(p)))
  ker = np.ones(2 * k + 1) / (2 * k + 1)
  pad = np.pad(q, ((k, k), (0, 0)), mode="edge")
  return np.stack([np.convolve(pad[:, 0], ker, "valid"), np.convolve(pad[:, 1], ker, "valid")], 1)


def _stamp(img: np.ndarray, pts: np.ndarray, value: float, width: float) -> None:
  """Adds value once per pixel covered by the curve (unique pixels, so overlaps do not stack)."""
  size = img.shape[0]
  rc = (pts[:, ::-1] + 1.0) * (0.5 * size) - 0.5
  r = max(0, int(round(width * size / 2.0 - 0.5)))
  offs = [(i, j) for i in range(-r, r + 1) for j in range(-r, r + 1) if i * i + j * j <= r * r + r]
  rr = (np.rint(rc[:, 0])[:, None] + [o[0] for o in offs]).astype(np.int64).ravel()
  cc = (np.rint(rc[:, 1])[:, None] + [o[1] for o in offs]).astype(np.int64).ravel()
  ok = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
  idx = np.unique(rr[ok] * size + cc[ok])
  img.ravel()[idx] += value


def _box(img: np.ndarray, x: float, y: float, w: float, h: float, value: float) -> None:
  """Adds a filled rectangle (the pacemaker generator) centred at (x, y)."""
  size = img.shape[0]
  to = lambda v: int(np.clip((v + 1.0) * 0.5 * size, 0, size))
  img[to(y - h / 2):to(y + h / 2), to(x - w / 2):to(x + w / 2)] += value


def frontal(img: np.ndarray, a: study.StudyAttributes, g: Geometry) -> None:
  """Draws the study's devices on a frontal (size, size) density image in place."""
  if not a.devices:
    return
  rng = np.random.default_rng([int(a.render_seed), 200])
  j = rng.uniform(-1.0, 1.0, 8) * 0.02
  m = g.mid
  lw = 1.0 / img.shape[0]
  if a.devices & study.DEVICE_ETT:  # two walls of the tube, tip above the carina
    tip = -0.42 + j[0]
    for off in (-0.018, 0.018):
      _stamp(img, _curve([(m + off, -1.0), (m + off + 0.01, -0.7), (m + off, tip)], img.shape[0]), _DENSE, lw)
  if a.devices & study.DEVICE_NG_TUBE:  # down the oesophagus, across the diaphragm, into the stomach
    pts = [(m + 0.03, -1.0), (m + 0.02, -0.5), (m + 0.04, 0.0), (m + 0.08, g.dome[1] + 0.05),
           (m + 0.3 + j[1], g.dome[1] + 0.16), (m + 0.38 + j[2], g.dome[1] + 0.10)]
    _stamp(img, _curve(pts, img.shape[0]), _DENSE, lw)
  if a.devices & study.DEVICE_CENTRAL_LINE:  # right subclavian -> brachiocephalic -> SVC
    pts = [(m - 0.75, -0.86), (m - 0.45, -0.76 + j[3]), (m - 0.15, -0.62), (m - 0.08, -0.40),
           (m - 0.07, -0.22 + j[4])]
    _stamp(img, _curve(pts, img.shape[0]), _DENSE, lw)
  if a.devices & study.DEVICE_PACEMAKER:  # generator in the left upper chest, leads to RA and RV
    bx, by = m + 0.5 + j[5], -0.62 + j[6]
    _box(img, bx, by, 0.16, 0.11, 0.55)
    ra = [(bx - 0.03, by), (m + 0.25, -0.72), (m - 0.02, -0.55), (m - 0.06, -0.20), (m - 0.05, -0.05)]
    rv = ra[:4] + [(m - 0.03, 0.02), (m + 0.5 * g.heart_ext[1], g.dome[1] - 0.06)]
    for lead in (ra, rv):
      _stamp(img, _curve(lead, img.shape[0]), 0.35, 2 * lw)


def lateral(img: np.ndarray, a: study.StudyAttributes, g: Geometry, lf: LateralFrame) -> None:
  """The same devices on the lateral: tubes in the trachea/oesophagus, line in the SVC, box in front."""
  if not a.devices:
    return
  rng = np.random.default_rng([int(a.render_seed), 200])
  j = rng.uniform(-1.0, 1.0, 8) * 0.02
  size = img.shape[0]
  lw = 1.0 / size
  tr = lambda y: TRACHEA_LAT[0] + TRACHEA_LAT[1] * (y + 1.0)
  if a.devices & study.DEVICE_ETT:
    tip = -0.42 + j[0]
    for off in (-0.015, 0.015):
      _stamp(img, _curve([(tr(-1.0) + off, -1.0), (tr(tip) + off, tip)], size), _DENSE, lw)
  if a.devices & study.DEVICE_NG_TUBE:
    pts = [(tr(-1.0) + 0.07, -1.0), (tr(-0.3) + 0.08, -0.3), (tr(0.0) + 0.05, g.dome[1]),
           (lf.front + 0.3 + j[1], g.dome[1] + 0.18)]
    _stamp(img, _curve(pts, size), _DENSE, lw)
  if a.devices & study.DEVICE_CENTRAL_LINE:
    pts = [(lf.front + 0.05, -0.9), (lf.front + 0.2, -0.6 + j[3]), (lf.front + 0.3, -0.22 + j[4])]
    _stamp(img, _curve(pts, size), _DENSE, lw)
  if a.devices & study.DEVICE_PACEMAKER:
    bx, by = lf.front - 0.06, -0.62 + j[6]
    _box(img, bx, by, 0.05, 0.12, 0.55)
    h = lf.heart
    _stamp(img, _curve([(bx, by), (lf.front + 0.15, -0.55), (0.5 * (h[0] + h[1]), h[2] - 0.2),
                        (h[0] + 0.1, h[2] + 0.05)], size), 0.35, 2 * lw)
