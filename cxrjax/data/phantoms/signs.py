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


def ptx_gap(g: Geometry, side: int, sev: float, y):
  """Pneumothorax: width of the free pleural air inside the chest wall, widest at the apex.

  A fraction of the hemithorax width: ~8-12% for a small (mild) one, 30-50% for a large one
  whose lung has collapsed towards the hilum; narrower towards the base (air rises)."""
  taper = np.clip((g.dome[side] + 0.15 - y) * (1.0 / (g.dome[side] + 0.15 - g.apex)), 0.45, 1.0)
  return (0.05 + 0.45 * sev ** 1.2) * g.lung_width(side) * taper


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
      rng = np.random.default_rng(p["seed"])
      # A segment growing to a lobe with severity: a lumpy ellipse with fluffy (noise-eroded)
      # margins; an upper-lobe consolidation stops at the minor fissure, which bows downwards.
      h = (y - t) * (1.0 / (b - t))
      hc = 0.45 if p["zone"] == 0 else 0.62
      uc = 0.45 + 0.3 * p["depth"]
      ext = 0.2 + 0.62 * p["sev"]
      fluff = tx.crop(tx.smooth_bank(n), rng, n, ax.shape[1])
      r2 = ((u - uc) / (ext + 0.1)) ** 2 + ((h - hc) / ext) ** 2
      lobe = tx.ramp(1.0 - r2 + 0.3 * fluff, 0.25)
      if p["zone"] == 0:
        lobe *= tx.ramp(b + 0.03 * (1.0 - (2.0 * u - 1.0) ** 2) - y, eps)
      lobe *= lung
      fill += (0.55 + 0.5 * p["sev"]) * lobe  # a mild one: a small, less dense segment
      h = g.hila[s]
      tree = tx.vessel_bank(n)[rng.integers(0, 4)]
      br = tx.anchored(tree, n, tx.to_pixel(h[1], n), tx.to_pixel(h[0], n), cols)
      extra -= (0.09 + 0.07 * p["sev"]) * np.clip(br, 0.0, 1.0) * lobe  # air bronchograms
    if on(ATEL):
      p = pl[ATEL]
      yc = g.dome[s] - 0.12 - 0.10 * p["depth"] + 0.10 * (u - 0.5) * (p["level"] * 10)
      plate = tx.ramp(0.008 + 0.025 * p["sev"] - np.abs(y - yc), 2 * eps)
      plate = plate * tx.ramp(u - 0.15, 0.15) * tx.ramp(0.9 - u, 0.15)
      fill += (0.2 + 0.7 * p["sev"]) * plate
      extra += 0.03 * p["sev"] * plate
      # Collapsed lower lobe: a dense wedge against the mediastinum above the (raised) dome.
      wedge = tx.ramp((0.08 + 0.37 * p["sev"]) * (1.0 - (f.ydia - y) / 0.35) - u, 0.08) * tx.ramp(f.ydia - y, eps)
      fill += (0.1 + 0.7 * p["sev"]) * wedge * lung
    if on(EDEMA):
      p = pl[EDEMA]
      h = g.hila[s]
      spread = 0.22 + 0.2 * p["sev"]
      d2 = ((ax - abs(h[0] - g.mid)) / spread) ** 2 + ((y - h[1]) / (spread + 0.06)) ** 2
      fill += (0.12 + 0.63 * p["sev"]) * np.exp(-d2)  # perihilar bat-wing haze, faint when mild
      kb = tx.crop(tx.kerley_bank(n), np.random.default_rng(p["seed"]), n, ax.shape[1])
      peri = tx.ramp(u - 0.75, 0.05) * tx.ramp(y - (g.dome[s] - 0.4), 0.1)
      extra += (0.04 + 0.16 * p["sev"]) * kb * peri * lung  # Kerley B lines at the bases
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
      level = cp - 0.04 - (0.9 * p["sev"] ** 1.3) * (cp - g.apex) * 0.75
      # Meniscus: concave upwards, climbing steeply along the lateral chest wall; a small
      # effusion only blunts the costophrenic angle (a thin layer of fluid, fainter), a large
      # one hides the hemidiaphragm.
      ym = level + (0.08 + 0.16 * p["sev"]) * (1.0 - np.exp((u - 1.0) * 4.0))
      fluid = np.clip((y - ym) * (1.0 / 0.07), 0.0, 1.0)
      wall = tx.ramp(g.tw + 0.02 - ax, eps)
      fill += fluid * (0.7 + 0.5 * min(1.0, 2.0 * p["sev"]))
      # Fluid in the posterior recess overlies the base below the dome; a mild effusion holds
      # too little to show there (only the blunted angle), a large one hides the dome.
      extra += 0.08 * p["sev"] ** 1.5 * fluid * wall * (1.0 - lung)
    if on(PLOTH):
      p = pl[PLOTH]
      lob = tx.crop(tx.smooth_bank(n), np.random.default_rng(p["seed"]), n, ax.shape[1])
      # Smooth pleural thickening along the lateral chest wall and over the apex (apical cap).
      th = (0.012 + 0.063 * p["sev"]) * np.clip(1.0 + 0.25 * lob, 0.5, 1.6)  # mild: a thin line
      wall = tx.ramp(th - (f.xl - ax), eps) * tx.ramp(f.ydia - 0.06 - y, 0.12)
      cap = tx.ramp(th + 0.015 - (y - f.top), eps)
      band = np.maximum(wall, cap) * lung
      fill += band
      extra += (0.03 + 0.09 * p["sev"]) * band
    if on(PTX):
      p = pl[PTX]
      sev = p["sev"]
      gap = ptx_gap(g, s, sev, y)
      # Distance in from the lateral wall / down from the apex, with a rounded corner (a smooth
      # min), so the visceral pleural line runs as one convex curve from the apex down the side.
      a_, b_ = f.xl - ax, y - f.top
      k = 0.6 * gap + eps
      d = 0.5 * (a_ + b_ - np.sqrt((a_ - b_) ** 2 + k * k))
      free = tx.ramp(gap - d, eps) * lung
      inner = d - gap  # > 0 inside the collapsed lung
      c.keep[:, cols] *= (1.0 - free) * (1.0 + 0.35 * sev * tx.ramp(0.08 - inner, 0.08))  # no markings beyond; crowded inside
      c.dark[:, cols] += (0.12 + 0.04 * sev) * free  # uniformly black free air
      extra += 0.22 * tx.ramp(0.008 - np.abs(inner - 0.007), 0.01) * lung  # visceral pleural line
      edge = tx.ramp(0.03 + 0.07 * sev - inner, 0.06)  # the collapsed lung is denser, most at its edge
      fill += sev * (0.06 + 0.22 * edge) * (1.0 - free) * lung
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
    fluff = tx.crop(tx.smooth_bank(n), np.random.default_rng(p["seed"] + 1), n, n)
    lobe = tx.ramp(-obl if p["zone"] == 0 else obl, eps)  # the oblique fissure: a sharp edge
    lobe = lobe * tx.ramp(y - t + 0.06 * fluff, 0.12) * tx.ramp(b - y + 0.06 * fluff, 0.12)
    lobe = lobe * tx.ramp(0.25 + 0.45 * p["sev"] + 0.15 * fluff - np.abs(u - (0.3 if p["zone"] == 0 else 0.7)), 0.2)
    fill += (0.5 + 0.4 * p["sev"]) * lobe
  if ATEL in pl:
    p = pl[ATEL]
    yc = np.mean([g.dome[s] for s in p["sides"]]) - 0.12 - 0.10 * p["depth"]
    plate = tx.ramp(0.008 + 0.02 * p["sev"] - np.abs(y - yc - 0.1 * (u - 0.5)), 2 * eps)
    fill += (0.3 + 0.5 * p["sev"]) * plate * tx.ramp(u - 0.2, 0.15) * tx.ramp(0.85 - u, 0.15)
  if EDEMA in pl:
    p = pl[EDEMA]
    fill += (0.12 + 0.58 * p["sev"]) * np.exp(-(((u - 0.45) / 0.35) ** 2 + ((y + 0.1) / 0.35) ** 2))
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
    level = cp - 0.10 - (0.9 * p["sev"] ** 1.3) * (cp - g.apex) * 0.75 * (1.0 + 0.2 * (nside(EFF) - 1))
    ym = level + (0.2 + 0.1 * p["sev"]) * (1.0 - np.exp((u - 1.0) * 3.0))  # meniscus up the posterior wall
    fluid = np.clip((y - ym) / 0.06, 0.0, 1.0)
    fill += 1.2 * fluid
    behind = tx.ramp(x - lf.front, eps) * tx.ramp(lf.back + 0.05 - x, eps) * (1.0 - c.lung)
    extra += 0.07 * p["sev"] ** 1.5 * fluid * behind
  if PLOTH in pl:
    p = pl[PLOTH]
    th = 0.012 + 0.063 * p["sev"]
    wall = tx.ramp(th - (lf.spine[0] - 0.02 - x), eps) * tx.ramp(lf.ydia - 0.06 - y, 0.12)
    band = np.maximum(wall, tx.ramp(th + 0.015 - (y - lf.top), eps)) * c.lung  # posterior + apical
    fill += band
    extra += (0.03 + 0.09 * p["sev"]) * band
  if PTX in pl:
    p = pl[PTX]
    d = np.minimum(x - lf.front, y - lf.top)  # anterior and apical: where free air rises
    gap = 0.8 * ptx_gap(g, p["sides"][0], p["sev"], y)
    free = tx.ramp(gap - d, eps) * c.lung
    c.keep *= 1.0 - free
    c.dark += 0.10 * free
    extra += 0.11 * tx.ramp(0.008 - np.abs(d - gap - 0.006), 0.012) * c.lung
  c.fill += fill
  c.extra += extra
