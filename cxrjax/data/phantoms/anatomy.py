"""Normal chest anatomy of a phantom study: its geometry and the two views' base densities.

Densities are attenuation-like (dense = large = bright once the site's contrast curve maps them
to grey levels): about 0 for air outside the body, 0.45 for soft tissue, lungs 0.36 below their
surroundings, bone about +0.1 on top. The frontal frame has the patient's RIGHT on the image
LEFT; side index 0 is the patient's right (image direction -1), 1 the left (+1). On the lateral
the patient faces the image left (anterior = small x), and y is shared with the frontal view so
a finding sits at the same height on both.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from cxrjax.data.labels import LABEL_INDEX
from cxrjax.data.phantoms import study
from cxrjax.data.phantoms import textures as tx

AIR = 0.36  # how much darker aerated lung is than the soft tissue around it
AP_MAGNIFICATION = 1.1  # heart and mediastinum widths on an AP frontal film relative to PA
SIDES = (-1.0, 1.0)  # image direction of the patient's right and left
TRACHEA_LAT = (-0.05, 0.12)  # lateral view trachea centre: x at the top edge, and dx per unit y


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Study-level shape parameters in normalised [-1, 1] coordinates, shared by both views."""
  mid: float          # x of the mediastinal midline (rotation, atelectatic shift)
  tw: float           # thoracic inner half-width (the ribs)
  st: float           # soft-tissue thickness outside the ribs
  apex: float         # y of the lung apices
  dome: tuple         # y of each hemidiaphragm's dome (right, left); right higher
  heart_ext: tuple    # heart border distance from the midline (right, left): left-sided bulk
  heart_cy: float     # heart ellipse centre y (it sits on the left hemidiaphragm)
  heart_ry: float     # heart ellipse vertical radius
  med: tuple          # upper mediastinum half-widths (right, left) from the midline
  knob: float         # aortic knob bulge beyond the left mediastinal border
  hila: tuple         # ((x, y) right, (x, y) left) hilar points: vessel trees radiate from here
  old: float          # 0 young .. 1 very old: thinner soft tissue, fainter bone
  female: float
  habitus: float
  ap: bool

  def lung_width(self, side: int) -> float:
    """Horizontal extent of one lung at mid height (medial border to ribs)."""
    return self.tw - self.med[side]


def sides_of(code: int) -> tuple:
  """Laterality code -> sides (0 right, 1 left) it touches; NONE falls back to the right."""
  return {study.LEFT: (1,), study.BILATERAL: (0, 1)}.get(int(code), (0,))


def geometry(a: study.StudyAttributes) -> Geometry:
  """Derives the drawn geometry from the attributes (no randomness: both views must agree)."""
  old = float(np.clip((a.age_years - 40.0) / 50.0, 0.0, 1.0))
  male = float(a.sex_male)
  tw = 0.64 + 0.05 * a.habitus + 0.03 * male
  st = float(np.clip(0.07 + 0.05 * a.habitus + 0.015 * male, 0.025, 0.15) * (1.0 - 0.35 * old))
  mid = float(np.clip(0.012 * a.rotation, -0.06, 0.06))
  dome_r = 0.08 + 0.26 * float(a.inspiration) + (0.03 if a.frontal_view == "AP" else 0.0)
  dome = [dome_r, dome_r + 0.05]
  i = LABEL_INDEX["Atelectasis"]
  if a.truth[i]:
    sev = float(a.severity[i])
    sides = sides_of(a.laterality[i])
    for s in sides:
      dome[s] -= 0.03 + 0.17 * sev  # volume loss pulls the hemidiaphragm up
    if len(sides) == 1:
      mid += SIDES[sides[0]] * (0.005 + 0.06 * sev)  # ... and the mediastinum towards the collapse
  # An AP film (source close, heart far from the detector) magnifies the heart and mediastinum
  # by roughly a tenth: a normal heart can look borderline-enlarged, as on real supine films.
  magnify = AP_MAGNIFICATION if a.frontal_view == "AP" else 1.0
  width = float(a.ctr) * 2.0 * tw * magnify
  mw = float(a.mediastinum_width) * tw * magnify
  med = (0.85 * mw, 1.0 * mw)
  hila = ((mid - med[0] - 0.07, -0.10), (mid + med[1] + 0.07, -0.15))
  return Geometry(mid=mid, tw=tw, st=st, apex=-0.74 + 0.04 * (1.0 - a.inspiration), dome=tuple(dome),
                  heart_ext=(0.37 * width, 0.63 * width), heart_cy=dome[1] + 0.02,
                  heart_ry=0.26 + 0.3 * width, med=med, knob=0.045 + 0.03 * old, hila=hila, old=old,
                  female=1.0 - male, habitus=float(a.habitus), ap=a.frontal_view == "AP")


@dataclasses.dataclass
class Frame:
  """One lung's window of the frontal grid: columns from the midline outwards.

  ax (1, w): distance from the midline towards this side; y (n, 1); xl, xm (n, 1): lateral
  (rib) and medial (mediastinum/heart) lung borders; ydia (1, w): hemidiaphragm height;
  top (1, w): lung apex height; lung (n, w): soft lung mask. Signs draw in these windows only.
  """
  side: int
  cols: slice
  ax: np.ndarray
  y: np.ndarray
  xl: np.ndarray
  xm: np.ndarray
  ydia: np.ndarray
  top: np.ndarray
  lung: np.ndarray


@dataclasses.dataclass
class Canvas:
  """Working-resolution layers a view is composed from; signs edit fill/extra/keep in place.

  base: everything but lung air; lung: lung mask; vessels: vascular markings; fill: fraction of
  lung air replaced by fluid/tissue; extra: added density; keep: vessel visibility (0 in a
  pneumothorax); dark: extra lucency (free pleural air). All (n, n) float32.
  """
  n: int
  base: np.ndarray
  lung: np.ndarray
  vessels: np.ndarray
  fill: np.ndarray
  extra: np.ndarray
  keep: np.ndarray
  dark: np.ndarray
  frames: list

  def compose(self) -> np.ndarray:
    """(n, n) density: aerated lung is dark; fill removes air and hides the vessels behind it."""
    air = self.lung * (1.0 - np.minimum(self.fill, 1.0))
    return self.base + self.extra + air * (self.vessels * self.keep - AIR - self.dark)


def _canvas(n: int, base, lung, vessels, frames) -> Canvas:
  z = np.zeros((n, n), np.float32)
  return Canvas(n, base, lung, vessels, z, z.copy(), np.ones((n, n), np.float32), z.copy(), frames)


def _rib_band(p: np.ndarray) -> np.ndarray:
  """Rib 'phase' -> rib density profile: a band over f in [0, 0.45] of each period, brighter cortex."""
  f = p - np.floor(p)
  band = np.clip(np.minimum(f, 0.45 - f) * 12.0, 0.0, 0.6)
  return band + 0.5 * np.clip(1.0 - np.abs(f - 0.04) * 20.0, 0.0, 1.0)  # brighter lower cortex


FRACTURE_U = 0.74  # where along a rib (fraction of the thoracic half-width) a fracture breaks it


def fracture_step(sev: float) -> float:
  """Step-off of the lateral fragment (normalised units): a posterior rib is ~0.05 thick, so
  from a fraction of a rib (mild, hard to see) to more than a rib's thickness (severe)."""
  return 0.01 + 0.075 * sev


def _ribs(g: Geometry, ax, y, side: int, fracture: tuple, eps: float, broken: bool = False) -> np.ndarray:
  """Posterior ribs as curved bands: one 'rib phase' field for all ribs instead of one per rib.

  The centre line rises slightly from the spine and turns down laterally; spacing widens
  caudally. fracture = (side, rib index k, severity): the working-resolution cage leaves out
  rib k's lateral part (faded out just medial to the break), and ``broken=True`` returns that
  part alone, broken at FRACTURE_U, for drawing at output resolution: a lucent gap cut across
  both cortices, the lateral fragment stepped down and angulated (its offset grows towards the
  chest wall), so a reader sees a displaced cortical break.
  """
  u = ax * (1.0 / g.tw)
  v = y - (g.apex - 0.10) - (-0.12 * u + 0.42 * u * u)
  p = v * (9.0 - 1.2 * v)
  band = _rib_band(p)
  if fracture[0] == side and fracture[1] >= 0:
    k, sev = float(fracture[1]), fracture[2]
    own = np.floor(p) == k
    medial = tx.ramp(FRACTURE_U - 0.08 - u, 0.05)  # cross-fade between the two resolutions
    if not broken:
      band = band * (1.0 - own * (1.0 - medial))
    else:
      # The fracture line crosses the rib at right angles; signed distance along the rib from it.
      slope = (-0.12 + 0.84 * FRACTURE_U) / g.tw
      norm = 1.0 / np.sqrt(1.0 + slope * slope)
      yb = rib_y(g, side, k, FRACTURE_U)
      step, w = fracture_step(sev), 0.006 + 0.02 * sev  # step-off; half-width of the lucent gap
      dy = step + 0.12 * sev * (u - FRACTURE_U)  # lateral fragment: stepped down, slightly angulated
      v2 = v - dy
      p2 = v2 * (9.0 - 1.2 * v2)
      dx = (u - FRACTURE_U) * g.tw
      med_part = band * own * (1.0 - medial) * tx.ramp(-(dx + slope * (y - yb)) * norm - w, eps)
      lat_part = _rib_band(p2) * (np.floor(p2) == k) * tx.ramp((dx + slope * (y - yb - step)) * norm - w, eps)
      band = (1.15 + 0.45 * sev) * (med_part + lat_part)  # the ribs at the break read brighter
  elif broken:
    return np.zeros(np.broadcast_shapes(np.shape(ax), np.shape(y)), np.float32)
  inside = tx.ramp(g.tw + 0.04 - ax, eps) * (p > 0)
  inside = inside * tx.ramp(g.dome[side] + 0.25 - y, 0.1) * tx.ramp(u - 0.08, 0.1)
  return band * inside


def fracture_of(a: study.StudyAttributes) -> tuple:
  """(side, rib index, severity) of the study's rib fracture, or (-1, -1, 0) without one."""
  j = LABEL_INDEX["Fracture"]
  if a.truth[j] and a.fracture_rib >= 0:
    return (sides_of(a.laterality[j])[0], int(a.fracture_rib), float(a.severity[j]))
  return (-1, -1, 0.0)


def fracture_frontal(full: np.ndarray, a: study.StudyAttributes, g: Geometry) -> None:
  """Draws the broken rib's lateral part at output resolution (in place): a break a few pixels
  wide would be blurred away at working resolution, where that part of the rib was left out."""
  fr = fracture_of(a)
  if fr[0] < 0:
    return
  size = full.shape[0]
  side, k = fr[0], fr[1]
  x, y = tx.grid(size)
  y0, y1 = rib_y(g, side, k, FRACTURE_U - 0.22), rib_y(g, side, k, 1.0)
  r = tx.rows(size, y0 - 0.12, y1 + 0.16)
  xs = sorted((g.mid + SIDES[side] * (FRACTURE_U - 0.22) * g.tw, g.mid + SIDES[side] * (g.tw + 0.08)))
  c = slice(tx.to_pixel(xs[0], size), tx.to_pixel(xs[1], size) + 1)
  ax = (x[:, c] - g.mid) * SIDES[side]
  yr = y[r]
  eps = 3.0 / size
  bone = 0.13 * (1.0 - 0.45 * g.old)
  xl = g.tw - 2.6 * np.maximum(-0.28 - yr, 0.0) ** 2
  fac = bone * (1.0 + 0.8 * tx.ramp(xl - ax, 6.0 / size))
  full[r, c] += fac * _ribs(g, ax, yr, side, fr, eps, broken=True)
  sev = fr[2]
  if sev > 0.2:  # extrapleural haematoma / callus: a soft lenticular density along the wall at the break
    xb, yb = FRACTURE_U * g.tw, rib_y(g, side, k, FRACTURE_U) + 0.5 * fracture_step(sev)
    ra, rb = 0.05 + 0.12 * sev, 0.04 + 0.08 * sev
    full[r, c] += (0.9 * (sev - 0.2)) * np.exp(-((ax - xb) / ra) ** 2 - ((yr - yb) / rb) ** 2)


def rib_y(g: Geometry, side: int, k: float, u: float) -> float:
  """y of the middle of posterior rib k (phase k + 0.22) at fraction u of the half-width."""
  ph = k + 0.22
  v = (9.0 - np.sqrt(81.0 - 4.8 * ph)) / 2.4  # solves v (9 - 1.2 v) = ph
  return float(v + (g.apex - 0.10) + (-0.12 * u + 0.42 * u * u))


def _frame(g: Geometry, n: int, side: int) -> tuple:
  """(Frame, cols) for one lung: the lung mask built from four soft borders."""
  x, y = tx.grid(n)
  eps = 3.0 / n
  c_mid = tx.to_pixel(g.mid, n)
  cols = slice(0, c_mid) if side == 0 else slice(c_mid, n)
  ax = (x[:, cols] - g.mid) * SIDES[side]
  xl = g.tw - 2.6 * np.maximum(-0.28 - y, 0.0) ** 2
  he = g.heart_ext[side] * np.sqrt(np.maximum(1.0 - ((y - g.heart_cy) / g.heart_ry) ** 2, 0.0))
  mb = g.med[side] + (g.knob * np.exp(-((y + 0.40) / 0.06) ** 2) if side == 1 else 0.0)
  xm = np.maximum(mb, he)
  xpk = 0.5 * g.tw
  q = (ax - xpk) / (g.tw - xpk)
  ydia = g.dome[side] + 0.20 * q * q * np.where(q > 0, 1.0, 0.6)
  ac, hw = 0.5 * (g.med[side] + g.tw), 0.5 * (g.tw - g.med[side]) + 0.03
  top = g.apex + 0.3 * (1.0 - np.sqrt(np.maximum(1.0 - ((ax - ac) / hw) ** 2, 0.0)))  # domed apex
  lung = tx.ramp(xl - ax, eps) * tx.ramp(ax - xm, eps) * tx.ramp(ydia - y, eps) * tx.ramp(y - top, 2 * eps)
  return Frame(side, cols, ax, y, xl, xm, ydia, top, lung.astype(np.float32))


def frontal(a: study.StudyAttributes, g: Geometry, n: int, rng: np.random.Generator) -> Canvas:
  """Normal PA/AP anatomy on an n x n grid (the caller upsamples). Local structures are drawn on
  the rows they can occupy only (tx.rows): most of the cost of a full-grid op is wasted otherwise."""
  x, y = tx.grid(n)
  eps = 3.0 / n
  dx = x - g.mid
  adx = np.abs(dx)
  bw = g.tw + g.st + 0.3 * np.clip((-0.55 - y) / 0.45, 0.0, 1.0) ** 1.5  # shoulders widen upwards
  body = tx.ramp(bw - adx, eps)
  soft = body * (0.40 + 0.04 * g.habitus + 0.10 * np.maximum(1.0 - (adx / bw) ** 2, 0.0))
  bone = 0.13 * (1.0 - 0.45 * g.old)  # osteopenia: old bone is fainter
  # Spine behind the mediastinum, with darker disc spaces; seen faintly through the heart.
  vert = (np.modf((y + 1.0) / 0.085)[0] > 0.17) * 0.8 + 0.2
  base = soft + (bone * 0.8) * tx.ramp(0.065 - adx, eps) * vert
  r = tx.rows(n, g.heart_cy - g.heart_ry, g.dome[1] + 0.08)
  e = np.sqrt(np.maximum(1.0 - ((y[r] - g.heart_cy) / g.heart_ry) ** 2, 0.0))
  base[r] += 0.03 * tx.ramp(dx + g.heart_ext[0] * e, eps) * tx.ramp(g.heart_ext[1] * e - dx, eps)
  # Trachea: an air column in the upper mediastinum ending at the carina.
  r = tx.rows(n, -1.0, -0.28)
  yr = y[r]
  tr = tx.ramp(0.032 - np.abs(dx + 0.02 * np.exp(-((yr + 0.4) / 0.1) ** 2)), eps) * tx.ramp(-0.30 - yr, eps)
  base[r] -= 0.10 * tr * body[r]
  fr = fracture_of(a)  # the broken rib's lateral part is left to fracture_frontal (full resolution)
  lung = np.zeros((n, n), np.float32)
  vessels = np.empty((n, n), np.float32)
  frames = []
  vb = tx.vessel_bank(n)
  for side in (0, 1):
    f = _frame(g, n, side)
    frames.append(f)
    c = f.cols
    lung[:, c] = f.lung
    ax = f.ax
    r = tx.rows(n, -1.0, g.dome[side] + 0.3)
    add = bone * _ribs(g, ax, y[r], side, fr, eps) * (1.0 + 0.8 * f.lung[r])  # ribs stand out over air
    bc = base[r, c]
    # Clavicles: S-curved bands from the sternal notch out to the shoulders.
    rc = tx.rows(n, -1.0, -0.45)
    t = (ax - 0.05) / 0.6
    yc = -0.70 - (0.06 if g.ap else 0.0) - 0.12 * t + 0.03 * np.sin(6.28 * t)
    clav = tx.ramp(0.022 - np.abs(y[rc] - yc), eps) * tx.ramp(t, 0.05) * tx.ramp(1.0 - t, 0.05)
    add[rc] += (bone * 1.2) * clav
    # Scapulae: outside the lungs on a PA (rotated forward), over the upper lungs on an AP.
    rs = tx.rows(n, -0.85, 0.02)
    ys = y[rs]
    sb = (0.45 if g.ap else 0.70) * g.tw + 0.12 * (ys + 0.8) + 0.6 * np.clip((ys + 0.2) / 0.2, 0.0, 1.0)
    add[rs] += 0.06 * tx.ramp(ax - sb, eps) * tx.ramp(ys + 0.80, eps) * tx.ramp(g.tw + g.st - ax, eps)
    if g.female > 0.01:  # breast shadows over the lower zones: sharp inferior edge, fading upwards
      bx, by, br = 0.5 * g.tw, g.dome[side] - 0.02, 0.26 + 0.05 * g.habitus
      rb = tx.rows(n, by - br, min(by + br, g.dome[side] + 0.3))
      yb = y[rb]
      rr = ((ax - bx) / (1.2 * br)) ** 2 + ((yb - by) / br) ** 2
      add[rb] += (0.045 * g.female) * tx.ramp(1.0 - rr, 0.25) * np.clip((yb - by + br) / br, 0.0, 1.0) ** 2
    bc += add * body[r, c]
    base[r, c] = bc
    h = g.hila[side]
    tree = tx.anchored(vb[rng.integers(0, vb.shape[0])], n, tx.to_pixel(h[1], n), tx.to_pixel(h[0], n), c)
    vs = 0.15 * tree
    vs[tx.rows(n, 0.0, 1.0)] *= 1.3  # lower-zone vessels are larger (gravity-dependent flow)
    rh = tx.rows(n, h[1] - 0.2, h[1] + 0.2)
    vs[rh] += 0.12 * np.exp(-((ax - abs(h[0] - g.mid)) ** 2 + (y[rh] - h[1]) ** 2) * (1.0 / 0.006))
    vessels[:, c] = vs
    if side == 1:  # gastric air bubble under the left hemidiaphragm
      rg = tx.rows(n, g.dome[1], g.dome[1] + 0.14)
      yg = y[rg]
      gb = ((ax - 0.33) / 0.12) ** 2 + ((yg - g.dome[1] - 0.12) / 0.07) ** 2
      base[rg, c] -= 0.14 * tx.ramp(1.0 - gb, 0.2) * (yg > f.ydia + 0.03)
  vessels += 0.012 * tx.crop(tx.fine_bank(n), rng, n, n)  # parenchymal texture: lungs are not flat
  return _canvas(n, base.astype(np.float32, copy=False), lung, vessels, frames)


@dataclasses.dataclass
class LateralFrame:
  """Lateral view geometry: x anterior (-1) to posterior (+1). Rows (n,1) / cols (1,n) arrays."""
  front: float        # anterior inner chest wall (behind the sternum)
  back: float         # posterior lung edge (in front of the ribs' posterior arcs)
  spine: tuple        # (anterior, posterior) x of the vertebral bodies
  heart: tuple        # (anterior x, posterior x, centre y, vertical radius)
  ydia: np.ndarray    # (1, n) diaphragm height along x: deepest posteriorly (posterior sulcus)
  top: np.ndarray     # (1, n) lung apex height along x
  lung: np.ndarray    # (n, n) lung mask


def lateral(a: study.StudyAttributes, g: Geometry, n: int, rng: np.random.Generator) -> tuple:
  """Normal lateral anatomy -> (Canvas, LateralFrame). Heart depth follows the same ctr."""
  x, y = tx.grid(n)
  eps = 3.0 / n
  depth = 0.62 + 0.08 * g.habitus + 0.03 * (1.0 - g.female)
  cx = 0.0
  front, back = cx - depth + g.st, cx + depth - 0.1
  body = tx.ramp(depth + g.st - np.abs(x - cx), eps)
  # Shoulders and arms overlap the apices.
  arms = tx.ramp(-0.45 - y, 0.2) * tx.ramp(0.35 - np.abs(x - cx + 0.1), 0.2)
  base = body * (0.46 + 0.05 * g.habitus + 0.12 * arms)
  bone = 0.13 * (1.0 - 0.45 * g.old)
  # Thoracic spine: vertebral blocks with disc spaces, a gentle kyphosis.
  sx = back - 0.30 + 0.06 * (y + 0.2) ** 2
  vert = (np.modf((y + 1.0) / 0.085)[0] > 0.17) * 0.8 + 0.2
  spine = tx.ramp(x - sx, eps) * tx.ramp(sx + 0.17 - x, eps)
  posterior = tx.ramp(x - sx - 0.2, eps) * tx.ramp(sx + 0.32 - x, eps)  # pedicles and spinous processes
  base = base + bone * (1.4 * spine * vert + 0.7 * posterior)
  ster = tx.ramp(0.03 - np.abs(x - (front - 0.02 + 0.04 * (y + 0.6))), eps)
  ster = ster * tx.ramp(y + 0.65, eps) * tx.ramp(0.3 - y, eps)
  base = base + bone * ster
  ud = (x - front) / (back - front) - 0.4
  # Domed, deepest at the posterior costophrenic sulcus.
  ydia = np.minimum(g.dome[0], g.dome[1]) + 0.03 + np.where(ud > 0, 0.7, 0.35) * ud * ud
  lung = tx.ramp(x - front, eps) * tx.ramp(sx - 0.02 - x, eps) * tx.ramp(ydia - y, eps)
  top = g.apex + 0.35 * ((x - 0.5 * (front + back - 0.3)) / depth) ** 2
  lung = lung * tx.ramp(y - g.apex - 0.35 * ((x - 0.5 * (front + sx)) / depth) ** 2, 2 * eps)
  # Heart: anterior-inferior; its depth grows with the same ctr as the frontal width.
  ha = front - 0.06  # abuts the anterior chest wall below the retrosternal clear space
  hp = ha + 0.06 + (float(a.ctr) / 0.45) * 0.5 * (back - front)
  hcy, hry = g.heart_cy + 0.12, g.heart_ry + 0.05  # sits on (and is cut by) the diaphragm
  hx = (x - 0.5 * (ha + hp)) / (0.5 * (hp - ha))
  heart = tx.ramp(1.0 - hx * hx - ((y - hcy) / hry) ** 2, 0.08)
  # Trachea: air column running down and back to the carina; aortic arch over it.
  tx_c = TRACHEA_LAT[0] + TRACHEA_LAT[1] * (y + 1.0)
  trach = tx.ramp(0.035 - np.abs(x - tx_c), eps) * tx.ramp(-0.30 - y, eps)
  arch = tx.ramp(0.045 - np.abs(np.sqrt(((x - cx) / 1.3) ** 2 + (y + 0.32) ** 2) - 0.13), eps) * (y < -0.32)
  lung = lung * (1.0 - heart)
  base = base + 0.04 * heart * (y < ydia) - 0.14 * trach * body + 0.06 * arch
  side, k, sev = fracture_of(a)
  if side >= 0:  # the healing break seen obliquely: callus + fracture line
    fy = rib_y(g, side, k, FRACTURE_U)
    fx = back - 0.45
    rr = tx.rows(n, fy - 0.12, fy + 0.12)
    xr, yr = x - fx, y[rr] - fy
    along, across = 0.83 * xr + 0.55 * yr, -0.55 * xr + 0.83 * yr  # ribs run down and forwards
    seg = tx.ramp(0.018 - np.abs(across), eps) * tx.ramp(0.10 - np.abs(along), eps)
    callus = tx.ramp(1.0 - (along / 0.05) ** 2 - (across / (0.025 + 0.02 * sev)) ** 2, 0.4)
    cut = 1.0 - tx.ramp(0.006 + 0.006 * sev - np.abs(along + 0.25 * across), eps)
    base[rr] += bone * (0.8 * seg + (0.4 + 0.4 * sev) * callus) * cut
  tree = tx.crop(tx.vessel_bank(n), rng, n, n)
  vessels = 0.07 * tree + 0.012 * tx.crop(tx.fine_bank(n), rng, n, n)
  hil = 0.08 * np.exp(-((x - cx - 0.05) ** 2 + (y + 0.12) ** 2) / 0.01)
  lf = LateralFrame(front, back, (sx, sx + 0.17), (ha, hp, hcy, hry), ydia, top, lung.astype(np.float32))
  return _canvas(n, base.astype(np.float32), lf.lung, (vessels + hil).astype(np.float32), [lf]), lf
