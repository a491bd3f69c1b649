"""Phantom radiograph renderer: output contract, determinism, and that each sign shows where it should."""
import numpy as np
import pytest

from cxrjax.data.labels import LABEL_INDEX, NUM_LABELS
from cxrjax.data.phantoms import anatomy, render, site, study

S = 128


def make(findings=None, seed=0, **kw):
  """A hand-built StudyAttributes; findings maps label -> (severity, laterality code)."""
  findings = findings or {}
  truth = np.zeros(NUM_LABELS, bool)
  sev = np.zeros(NUM_LABELS, np.float32)
  lat = np.zeros(NUM_LABELS, np.int8)
  for name, (s, side) in findings.items():
    i = LABEL_INDEX[name]
    truth[i], sev[i], lat[i] = True, s, side
  if not truth.any():
    truth[LABEL_INDEX["No Finding"]] = True
  fields = dict(
      study_id="s0", patient_id="p0", render_seed=seed, age_years=50.0, sex_male=1.0, race="group_a",
      site=0, habitus=0.0, inspiration=0.7, rotation=0.0, frontal_view="PA", has_lateral=True, ctr=0.45,
      mediastinum_width=0.27, labels=truth.astype(np.float32), truth=truth, severity=sev, laterality=lat,
      lesion_xy=np.array([0.5, 0.4], np.float32), lesion_radius=0.15, fracture_rib=-1, devices=0,
      shortcut=0.0, pe=0, grade=0, tabular=np.zeros(80, np.float32))
  fields.update(kw)
  return study.StudyAttributes(**fields)


def region(img, x0, x1, y0, y1):
  """Mean grey level of a box given in normalised [-1, 1] coordinates (x right, y down)."""
  n = img.shape[0]
  px = lambda v: int((v + 1.0) * 0.5 * n)
  return float(img[px(y0):px(y1), px(x0):px(x1)].astype(np.float64).mean())


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("view", ["PA", "AP"])
def test_shape_dtype_range(size, view):
  a = make({"Support Devices": (1.0, 0)}, devices=15, frontal_view=view, site=size % 5)
  images, views = render.render_views(a, size)
  assert views == [view, "L"]
  for img in images:
    assert img.shape == (size, size) and img.dtype == np.uint8
    assert img.min() < 40 and img.max() > 200  # air outside the body and bright bone/text both present
  images, views = render.render_views(make(has_lateral=False), size)
  assert views == ["PA"] and len(images) == 1


def test_deterministic():
  a = make({"Consolidation": (0.7, study.LEFT), "Edema": (0.5, study.BILATERAL)}, seed=7)
  assert np.array_equal(render.render_frontal(a, S), render.render_frontal(a, S))
  assert np.array_equal(render.render_lateral(a, S), render.render_lateral(a, S))
  b = make({"Consolidation": (0.7, study.LEFT), "Edema": (0.5, study.BILATERAL)}, seed=8)
  assert not np.array_equal(render.render_frontal(a, S), render.render_frontal(b, S))


def _effect(name, side, sev, box, view=render.render_frontal, seed=3, **kw):
  """Mean grey change inside box when the finding is added (same seed, so only the sign differs)."""
  base = view(make(seed=seed, **kw), S)
  sick = view(make({name: (sev, side)}, seed=seed, **kw), S)
  return region(sick, *box) - region(base, *box)


RIGHT_BASE, LEFT_BASE = (-0.6, -0.3, 0.2, 0.45), (0.3, 0.6, 0.25, 0.5)


def test_effusion_right_brightens_image_left_base_and_grows_with_severity():
  small = _effect("Pleural Effusion", study.RIGHT, 0.3, RIGHT_BASE)
  large = _effect("Pleural Effusion", study.RIGHT, 0.9, RIGHT_BASE)
  assert 0 < small < large and large > 20
  assert abs(_effect("Pleural Effusion", study.RIGHT, 0.9, LEFT_BASE)) < 3  # the other side untouched


def test_consolidation_severity_monotonic():
  box = (0.25, 0.6, -0.55, -0.2)
  eff = [_effect("Consolidation", study.LEFT, s, box, seed=5) for s in (0.2, 0.5, 0.9)]
  if eff[-1] < 5:  # the plan drew the lower lobe for this seed
    box = (0.25, 0.6, -0.05, 0.35)
    eff = [_effect("Consolidation", study.LEFT, s, box, seed=5) for s in (0.2, 0.5, 0.9)]
  assert 0 < eff[0] < eff[1] < eff[2]


def test_pneumothorax_darkens_its_side_periphery():
  box = (-0.72, -0.55, -0.5, -0.1)  # patient's right = image left, lateral upper zone
  assert _effect("Pneumothorax", study.RIGHT, 0.8, box) < -5
  assert abs(_effect("Pneumothorax", study.RIGHT, 0.8, (0.55, 0.72, -0.5, -0.1))) < 3


def test_cardiomegaly_widens_heart_silhouette():
  def heart_width(ctr):
    img = render.render_frontal(make(ctr=ctr, seed=2), S).astype(float)
    row = img[int(0.58 * S), :]  # a row through the lower heart, above the domes
    bright = row > 0.5 * (np.percentile(row, 95) + np.percentile(row[S // 5:4 * S // 5], 5))
    centre = S // 2
    return int(np.argmin(bright[centre:]) + np.argmin(bright[:centre][::-1]))
  assert heart_width(0.62) > heart_width(0.45) + S * 0.05


def test_lesion_brightens_its_location():
  a = make({"Lung Lesion": (0.7, study.LEFT)}, lesion_xy=np.array([0.5, 0.4], np.float32), seed=4)
  b = make(seed=4)
  fa, fb = render.render_frontal(a, S), render.render_frontal(b, S)
  diff = fa.astype(int) - fb.astype(int)
  r, c = np.unravel_index(np.argmax(diff), diff.shape)
  assert diff.max() > 30 and c > S // 2  # patient's left = image right


def test_shortcut_changes_only_its_corner():
  a, b = make(seed=9, shortcut=0.0), make(seed=9, shortcut=1.0)
  for view in (render.render_frontal, render.render_lateral):
    d = view(a, S) != view(b, S)
    r0, r1, c0, c1 = site.shortcut_box(S)
    assert d[r0:r1, c0:c1].any()
    d[r0:r1, c0:c1] = False
    assert not d.any()


def test_lateral_differs_and_agrees():
  a = make({"Pleural Effusion": (0.8, study.RIGHT)}, seed=1)
  f, l = render.render_frontal(a, S), render.render_lateral(a, S)
  assert l.shape == f.shape and not np.array_equal(l, f)
  # effusion on the lateral: the posterior costophrenic sulcus (lower, posterior = image right) fills
  box = (0.1, 0.4, 0.35, 0.55)
  assert _effect("Pleural Effusion", study.RIGHT, 0.8, box, view=render.render_lateral, seed=1) > 10


@pytest.mark.parametrize("name,box", [
    ("Atelectasis", (-0.6, -0.3, 0.0, 0.45)),
    ("Pneumonia", (-0.65, -0.25, -0.2, 0.5)), ("Lung Opacity", (-0.7, -0.25, -0.7, 0.5)),
    ("Pleural Other", (-0.7, -0.55, -0.4, 0.3))])
def test_sign_changes_its_side(name, box):
  near = _effect(name, study.RIGHT, 0.8, box)
  mirror = (-box[1], -box[0], box[2], box[3])
  far = _effect(name, study.RIGHT, 0.8, mirror)
  assert near > 1.0 and near > 2 * abs(far), (near, far)


def test_edema_is_bilateral_perihilar():
  assert _effect("Edema", study.RIGHT, 0.8, (-0.5, -0.25, -0.3, 0.1)) > 5
  assert _effect("Edema", study.RIGHT, 0.8, (0.25, 0.5, -0.3, 0.1)) > 5


def test_fracture_is_a_local_lateral_change():
  a = make({"Fracture": (0.8, study.LEFT)}, fracture_rib=4, seed=6)
  diff = np.abs(render.render_frontal(a, S).astype(int) - render.render_frontal(make(seed=6), S).astype(int))
  rows, cols = np.nonzero(diff > 8)
  # only on the patient's left (image right) chest wall: the break and its haematoma, lateral to mid-lung
  assert diff.max() > 15 and cols.min() > 0.62 * S
  assert rows.max() - rows.min() < 0.25 * S  # one rib, not the whole cage


def test_devices_and_enlarged_mediastinum_visible():
  with_ett = render.render_frontal(make({"Support Devices": (1.0, 0)}, seed=1, devices=study.DEVICE_ETT), S)
  plain = render.render_frontal(make(seed=1), S)
  d = np.abs(with_ett.astype(int) - plain.astype(int)) > 10
  assert d[:S // 3, S // 2 - S // 10:S // 2 + S // 10].sum() > 20 and not d[S // 2:].any()
  wide = render.render_frontal(make(seed=1, mediastinum_width=0.42), S)
  norm = render.render_frontal(make(seed=1, mediastinum_width=0.27), S)
  assert region(wide, -0.3, 0.3, -0.55, -0.3) > region(norm, -0.3, 0.3, -0.55, -0.3) + 5


def _profile(img, x0, x1, y0, y1):
  """Mean grey level per column of a box in normalised coordinates (columns x0..x1)."""
  n = img.shape[0]
  px = lambda v: int((v + 1.0) * 0.5 * n)
  return img[px(y0):px(y1), px(x0):px(x1)].astype(np.float64).mean(0)


def test_pneumothorax_pleural_line_between_dark_periphery_and_lung():
  size = 256
  a, b = make({"Pneumothorax": (0.8, study.RIGHT)}, seed=3), make(seed=3)
  g = anatomy.geometry(a)
  x0, x1 = g.mid - g.tw, g.mid - g.tw + 0.35  # from the right chest wall inwards, mid height
  sick = _profile(render.render_frontal(a, size), x0, x1, -0.22, -0.12)
  base = _profile(render.render_frontal(b, size), x0, x1, -0.22, -0.12)
  k = int(np.argmax(sick[2:-2])) + 2  # the brightest column: the visceral pleural line
  periph, lung = sick[max(0, k - 10):k - 3], sick[k + 3:k + 12]
  assert 4 <= k <= 0.45 * len(sick), k  # a distance in from the wall (~1/3 of the lung), not at it
  assert sick[k] > periph.max() + 25 and sick[k] > lung.max() + 8  # a thin bright ridge
  assert periph.mean() < base[max(0, k - 10):k - 3].mean() - 15  # the free air is darker
  # ... and it lies further in from the wall for a larger pneumothorax.
  small = _profile(render.render_frontal(make({"Pneumothorax": (0.3, study.RIGHT)}, seed=3), size), x0, x1, -0.22, -0.12)
  assert int(np.argmax(small[2:-2])) + 2 < k
  # The lateral view shows it too: an anterior lucency.
  lat = _effect("Pneumothorax", study.RIGHT, 0.8, (-0.62, -0.5, -0.4, 0.0), view=render.render_lateral)
  assert lat < -8


def test_effusion_meniscus_rises_laterally():
  size = 256
  base = render.render_frontal(make(seed=3), size).astype(float)
  for sev in (0.3, 0.8):
    a = make({"Pleural Effusion": (sev, study.RIGHT)}, seed=3)
    g = anatomy.geometry(a)
    d = render.render_frontal(a, size).astype(float) - base
    def top(u):  # first row (from mid height down) where the fluid brightens this column
      c = int((g.mid - (g.med[0] + u * (g.tw - g.med[0])) + 1.0) * 0.5 * size)
      rows = np.nonzero(d[size // 4:, c - 2:c + 3].mean(1) > 12)[0]
      return int(rows[0]) + size // 4 if rows.size else size  # none: the fluid stays below the lung
    lateral, middle, medial = top(0.9), top(0.6), top(0.3)
    assert lateral < middle - 0.03 * size and lateral < medial - 0.05 * size, (sev, lateral, middle, medial)


def test_atelectasis_raises_ipsilateral_hemidiaphragm():
  size = 256
  px = lambda v: int((v + 1.0) * 0.5 * size)
  def dome_row(img, x):  # lowest row of the lung (darker than halfway to the abdomen) in a column
    col = img[:, px(x) - 2:px(x) + 3].astype(float).mean(1)
    thr = 0.5 * (np.median(col[px(-0.3):px(0.0)]) + np.median(col[px(0.7):px(0.9)]))
    return int(np.nonzero(col[:px(0.8)] < thr)[0].max())
  base = render.render_frontal(make(seed=3), size)
  sick = render.render_frontal(make({"Atelectasis": (0.8, study.RIGHT)}, seed=3), size)
  assert dome_row(sick, -0.45) < dome_row(base, -0.45) - 0.04 * size  # right dome up
  assert abs(dome_row(sick, 0.45) - dome_row(base, 0.45)) < 0.025 * size  # left dome stays


def test_fracture_breaks_the_rib_with_a_step_and_shows_on_the_lateral():
  size = 256

  def frontal_change(sev):
    a = make({"Fracture": (sev, study.LEFT)}, fracture_rib=4, seed=6)
    d = render.render_frontal(a, size).astype(int) - render.render_frontal(make(seed=6), size).astype(int)
    return a, d

  a, d = frontal_change(0.6)
  g = anatomy.geometry(a)
  rows, cols = np.nonzero(np.abs(d) > 10)
  yb = anatomy.rib_y(g, 1, 4, anatomy.FRACTURE_U)
  ys = (rows + 0.5) * 2.0 / size - 1.0
  assert ys.min() - 0.02 < yb < ys.max() + 0.02 and ys.max() - ys.min() < 0.45  # at the broken rib only
  assert (d > 20).sum() > 15 and (d < -20).sum() > 15  # fragment moved: new bone and lost bone (step-off)
  # Worse breaks bring a larger extrapleural haematoma: more changed pixels, still local (its
  # density now covers the gap the fragment left, which reads against the blob, not the baseline).
  _, d8 = frontal_change(0.8)
  rows8, _ = np.nonzero(np.abs(d8) > 10)
  ys8 = (rows8 + 0.5) * 2.0 / size - 1.0
  assert (d8 > 20).sum() > 1.3 * (d > 20).sum() and ys8.max() - ys8.min() < 0.5
  lat = render.render_lateral(a, size).astype(int) - render.render_lateral(make(seed=6), size).astype(int)
  assert lat.max() > 15 and (np.abs(lat) > 10).sum() < 0.01 * size * size  # a small callus on the lateral


def test_pleural_thickening_brightens_the_chest_wall_band():
  a = make({"Pleural Other": (0.8, study.RIGHT)}, seed=3)
  g = anatomy.geometry(a)
  band = (g.mid - g.tw + 0.01, g.mid - g.tw + 0.06, -0.2, 0.1)
  inner = (g.mid - g.tw + 0.2, g.mid - g.tw + 0.3, -0.2, 0.1)
  assert _effect("Pleural Other", study.RIGHT, 0.8, band) > 15
  assert _effect("Pleural Other", study.RIGHT, 0.8, band) > _effect("Pleural Other", study.RIGHT, 0.3, band) > 5
  assert abs(_effect("Pleural Other", study.RIGHT, 0.8, inner)) < 3  # the lung inside it is untouched
  # lateral view: a posterior band along the spine and an apical cap
  apex = (-0.3, 0.1, g.apex + 0.02, g.apex + 0.1)
  assert _effect("Pleural Other", study.RIGHT, 0.8, apex, view=render.render_lateral) > 10
