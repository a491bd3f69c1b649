"""The radiographic sign of each CheXpert label, drawn into a view's Canvas.

``plan`` draws every random choice of every present sign once per study (each label from its own
stream, so adding one finding never moves another), and both views read the same plan: a
consolidation is in the same lobe, at the same height, on the frontal and the lateral. Signs
edit the canvas' fill (air replaced), extra (added density), keep (vessel visibility) and dark
(free air) layers inside lung windows only. Severity scales size and density; laterality picks
the side(s). Cardiomegaly, Enlarged Cardiomediastinum, Fracture and Atelectasis' volume loss
live in the geometry/anatomy (they change shapes, not layers).
"""
from __future__ import annotations

import numpy as np

from cxrjax.data.labels import LABEL_INDEX
from cxrjax.data.phantoms import study
from cxrjax.data.phantoms import textures as tx
from cxrjax.data.phantoms.anatomy import Canvas, Geometry, sides_of

ATEL, CONS, EDEMA, LESION, OPAC, EFF, PLOTH, PNA, PTX = (LABEL_INDEX[k] for k in (
    "Atelectasis", "Consolidation", "Edema", "Lung Lesion", "Lung Opacity", "Pleural Effusion",
    "Pleural Other", "Pneumonia", "Pneumothorax"))


def plan(a: study.StudyAttributes, g: Geometry) -> dict:
  """label index -> dict(sev, sides, ...): every random parameter of the study's signs."""
  out = {}
  for i in (ATEL, CONS, EDEMA, LESION, OPAC, EFF, PLOTH, PNA, PTX):
    if not a.truth[i]:
      continue
    rng = np.random.default_rng([int(a.render_seed), 100 + i])
    p = dict(sev=float(np.clip(a.severity[i], 0.05, 1.0)), sides=sides_of(a.laterality[i]),
             seed=int(rng.integers(1 << 30)), zone=int(rng.integers(0, 2)),
             depth=float(rng.uniform(0.2, 0.8)),
             level=float(rng.uniform(-0.04, 0.04)))
    if i == EDEMA:
      p["sides"] = (0, 1)  # edema is bilateral whatever the laterality says
    if i == PNA:
      p["zone"] = 1 if rng.random() < 0.75 else 0  # pneumonia mostly in the lower zones
    if i == LESION:
      side = p["sides"][0]
      lx, ly = (float(v) for v in np.clip(a.lesion_xy, 0.0, 1.0))
      # lesion_xy: x from the lung's image-left to image-right edge, y from apex to base.
      x0, x1 = (g.mid - g.tw, g.mid - g.med[0]) if side == 0 else (g.mid + g.med[1], g.mid + g.tw)
      p["xy"] = (x0 + (0.12 + 0.76 * lx) * (x1 - x0), g.apex + (0.12 + 0.7 * ly) * (g.dome[side] - g.apex))
      p["r"] = float(np.clip(a.lesion_radius, 0.02, 0.5)) * g.lung_width(side)
    out[i] = p
  return out


def _zone_y(g: Geometry, side: int, zone: int) -> tuple:
  """(top, bottom) y of the upper (0) or lower (1) zone of a lung; the hilum splits them."""
  h = g.hila[side][1]
  return (g.apex, h + 0.02) if zone == 0 else (h - 0.02, g.dome[side] + 0.2)


def frontal(c: Canvas, g: Geometry, pl: dict) -> None:
  """Draws every planned sign into a frontal canvas (in place)."""
  n = c.n
  eps = 3.0 / n
  for f in c.frames:
    s, cols, ax, y, lung = f.side, f.cols, f.ax, f.y, f.lung
    u = np.clip((ax - f.xm) / (f.xl - f.xm + 1e-3), 0.0, 1.0)  # 0 medial .. 1 lateral within the lung
    fill = np.zeros_like(lung)
    extra = np.zeros_like(lung)
    on = lambda i: i in pl and s in pl[i]["sides"]
    if on(OPAC):
      p = pl[OPAC]
      t, b = _zone_y(g, s, p["zone"])
      zone = tx.ramp(y - t, 0.15) * tx.ramp(b - y, 0.15)
      blob = tx.crop(tx.smooth_bank(n), np.random.default_rng(p["seed"]), n, ax.shape[1])
      blob = np.clip(blob * 0.6 + 0.4, 0.0, 1.0)
      fill += (0.2 + 0.35 * p["sev"]) * zone * blob * tx.ramp(u - 0.6 * (1 - p["sev"]), 0.3)
    if on(PNA):
      p = pl[PNA]
      t, b = _zone_y(g, s, p["zone"])
      blob = tx.crop(tx.smooth_bank(n), np.random.default_rng(p["seed"]), n, ax.shape[1])
      patch = np.clip(blob * 1.5 + 2.0 * p["sev"] - 1.2, 0.0, 1.0)
      fill += (0.45 + 0.4 * p["sev"]) * patch * tx.ramp(y - t, 0.1) * tx.ramp(b - y, 0.1)
    if on(CONS):
      p = pl[CONS]
      t, b = _zone_y(g, s, p["zone"])
      # A lobe: bounded by a sharp fissure (horizontal for the upper lobe), growing medially.
      lobe = tx.ramp(y - t, eps) * tx.ramp(b - y, eps if p["zone"] == 0 else 0.1)
      lobe = lobe * tx.ramp(u - (1.0 - (0.4 + 0.6 * p["sev"])), 0.12) * lung
      fill += (0.6 + 0.4 * p["sev"]) * lobe
      rng = np.random.default_rng(p["seed"])
      h = g.hila[s]
      tree = tx.vessel_bank(n)[rng.integers(0, 4)]
      br = tx.anchored(tree, n, tx.to_pixel(h[1], n), tx.to_pixel(h[0], n), cols)
      extra -= (0.09 + 0.07 * p["sev"]) * np.clip(br, 0.0, 1.0) * lobe  # air bronchograms
    if on(ATEL):
      p = pl[ATEL]
      yc = g.dome[s] - 0.12 - 0.10 * p["depth"] + 0.10 * (u - 0.5) * (p["level"] * 10)
      plate = tx.ramp(0.008 + 0.025 * p["sev"] - np.abs(y - yc), 2 * eps)
      plate = plate * tx.ramp(u - 0.15, 0.15) * tx.ramp(0.9 - u, 0.15)
      fill += (0.35 + 0.55 * p["sev"]) * plate
      extra += 0.03 * p["sev"] * plate
    if on(EDEMA):
      p = pl[EDEMA]
      h = g.hila[s]
      spread = 0.22 + 0.2 * p["sev"]
      d2 = ((ax - abs(h[0] - g.mid)) / spread) ** 2 + ((y - h[1]) / (spread + 0.06)) ** 2
      fill += (0.3 + 0.45 * p["sev"]) * np.exp(-d2)  # perihilar bat-wing haze
      kb = tx.crop(tx.kerley_bank(n), np.random.default_rng(p["seed"]), n, ax.shape[1])
      peri = tx.ramp(u - 0.75, 0.05) * tx.ramp(y - (g.dome[s] - 0.4), 0.1)
      extra += (0.10 + 0.10 * p["sev"]) * kb * peri * lung  # Kerley B lines at the bases
      c.keep[:, cols] *= 1.0 - 0.3 * p["sev"]  # vessels lose their sharp outline
    if on(LESION):
      p = pl[LESION]
      r = np.sqrt((ax - abs(p["xy"][0] - g.mid)) ** 2 + (y - p["xy"][1]) ** 2)
      disk = tx.ramp(p["r"] - r, 1.5 * eps)
      fill += disk
      extra += (0.06 + 0.06 * p["sev"]) * disk * (1.0 - 0.3 * r / p["r"])
    if on(EFF):
      p = pl[EFF]
      cp = g.dome[s] + 0.2
      level = cp - 0.04 - (0.9 * p["sev"] ** 1.3) * (cp - g.apex) * 0.8
      ym = level + 0.10 * (1.0 - u) ** 2  # meniscus: climbs the lateral chest wall
      fluid = np.clip((y - ym) / 0.06, 0.0, 1.0)
      wall = tx.ramp(g.tw + 0.02 - ax, eps)
      fill += fluid * 1.2
      extra += 0.05 * fluid * wall * (1.0 - lung)  # dense base hides the hemidiaphragm
    if on(PLOTH):
      p = pl[PLOTH]
      lob = tx.crop(tx.smooth_bank(n), np.random.default_rng(p["seed"]), n, ax.shape[1])
      th = (0.015 + 0.045 * p["sev"]) * np.clip(1.0 + 0.5 * lob, 0.3, 2.0)
      band = tx.ramp(th - (f.xl - ax), eps) * tx.ramp(y + 0.55, 0.1) * tx.ramp(f.ydia - y, eps)
      fill += band
      extra += 0.05 * band
    if on(PTX):
      p = pl[PTX]
      cx = g.med[s] + 0.35 * (g.tw - g.med[s])  # the lung collapses towards the hilum
      cy = 0.5 * (g.apex + g.dome[s]) + 0.12
      rx, ry = 0.5 * (g.tw - g.med[s]) + 0.05, 0.5 * (g.dome[s] - g.apex) + 0.12
      r = np.sqrt(((ax - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
      r0 = 1.0 - (0.12 + 0.35 * p["sev"])
      free = tx.ramp(r - r0, eps * 2.0) * lung
      c.keep[:, cols] *= 1.0 - free  # no lung markings beyond the pleural line
      c.dark[:, cols] += 0.09 * free
      extra += 0.06 * tx.ramp(0.018 - np.abs(r - r0), 0.015) * lung  # the visceral pleural line
      fill += 0.08 * p["sev"] * (1.0 - free) * lung  # the collapsed lung is a little denser
    c.fill[:, cols] += fill
    c.extra[:, cols] += extra


def lateral(c: Canvas, g: Geometry, lf, pl: dict) -> None:
  """Draws the planned signs into a lateral canvas: same height, a plausible AP position."""
  n = c.n
  eps = 3.0 / n
  x, y = tx.grid(n)
  u = np.clip((x - lf.front) / (lf.back - lf.front), 0.0, 1.0)  # 0 anterior .. 1 posterior
  fill = np.zeros((n, n), np.float32)
  extra = np.zeros((n, n), np.float32)
  nside = lambda i: len(pl[i]["sides"])
  if OPAC in pl:
    p = pl[OPAC]
    t, b = _zone_y(g, p["sides"][0], p["zone"])
    blob = np.clip(tx.crop(tx.smooth_bank(n), np.random.default_rng(p["seed"]), n, n) * 0.6 + 0.4, 0, 1)
    fill += (0.15 + 0.3 * p["sev"]) * blob * tx.ramp(y - t, 0.15) * tx.ramp(b - y, 0.15)
  if PNA in pl:
    p = pl[PNA]
    t, b = _zone_y(g, p["sides"][0], p["zone"])
    blob = tx.crop(tx.smooth_bank(n), np.random.default_rng(p["seed"]), n, n)
    patch = np.clip(blob * 1.5 + 2.0 * p["sev"] - 1.2, 0.0, 1.0)
    patch = patch * tx.ramp(y - t, 0.1) * tx.ramp(b - y, 0.1) * tx.ramp(u - 0.3, 0.2)  # posterior lower lobe
    fill += (0.4 + 0.35 * p["sev"]) * patch
  if CONS in pl:
    p = pl[CONS]
    t, b = _zone_y(g, p["sides"][0], p["zone"])
    # Upper lobe: anterior-superior; lower lobe: posterior-inferior behind the oblique fissure.
    h = (y - t) / (b - t + 1e-3)
    obl = h - (0.9 - u) if p["zone"] == 0 else u - 0.25 - 0.6 * (1.0 - h)
    lobe = tx.ramp(-obl if p["zone"] == 0 else obl, eps) * tx.ramp(y - t, eps) * tx.ramp(b - y, 0.1)
    fill += (0.5 + 0.4 * p["sev"]) * lobe
  if ATEL in pl:
    p = pl[ATEL]
    yc = np.mean([g.dome[s] for s in p["sides"]]) - 0.12 - 0.10 * p["depth"]
    plate = tx.ramp(0.008 + 0.02 * p["sev"] - np.abs(y - yc - 0.1 * (u - 0.5)), 2 * eps)
    fill += (0.3 + 0.5 * p["sev"]) * plate * tx.ramp(u - 0.2, 0.15) * tx.ramp(0.85 - u, 0.15)
  if EDEMA in pl:
    p = pl[EDEMA]
    fill += (0.3 + 0.4 * p["sev"]) * np.exp(-(((u - 0.45) / 0.35) ** 2 + ((y + 0.1) / 0.35) ** 2))
  if LESION in pl:
    p = pl[LESION]
    lx = lf.front + (0.2 + 0.6 * p["depth"]) * (lf.back - lf.front)
    r = np.sqrt((x - lx) ** 2 + (y - p["xy"][1]) ** 2)
    disk = tx.ramp(p["r"] - r, 1.5 * eps)
    fill += disk
    extra += (0.05 + 0.05 * p["sev"]) * disk
  if EFF in pl:
    p = pl[EFF]
    s = p["sides"][0]
    cp = g.dome[s] + 0.25
    level = cp - 0.05 - (0.9 * p["sev"] ** 1.3) * (cp - g.apex) * 0.8 * (1.0 + 0.2 * (nside(EFF) - 1))
    ym = level + 0.25 * (1.0 - u) ** 2  # meniscus rising up the posterior wall
    fluid = np.clip((y - ym) / 0.06, 0.0, 1.0)
    fill += 1.2 * fluid
    extra += 0.05 * fluid * tx.ramp(x - lf.front, eps) * tx.ramp(lf.back + 0.05 - x, eps) * (1.0 - c.lung)
  if PLOTH in pl:
    p = pl[PLOTH]
    th = 0.015 + 0.04 * p["sev"]
    fill += tx.ramp(th - np.abs(x - (lf.spine[0] - 0.02 - th)), eps) * tx.ramp(y + 0.5, 0.1)
  if PTX in pl:
    p = pl[PTX]
    r = np.sqrt(((x - lf.front - 0.1) / 0.35) ** 2 + ((y - g.apex - 0.05) / 0.3) ** 2)
    free = tx.ramp(0.4 + 0.4 * p["sev"] - r, eps * 4) * c.lung
    c.keep *= 1.0 - 0.7 * free
    c.dark += 0.05 * free
  c.fill += fill
  c.extra += extra
