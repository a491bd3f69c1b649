"""Phantom study sampling: determinism, the label hierarchy, geometry that matches the truth,
prevalences, uncertainty, the injected shortcut, patients and splits, tabular and CTPA signal."""
import dataclasses

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cxrjax.core.errors import ConfigError
from cxrjax.data.labels import CHEXPERT_LABELS, LABEL_INDEX
from cxrjax.data.phantoms import (PATHOLOGIES, PhantomConfig, make_arrays, make_example, num_patients,
                                  paired_embeddings, patient_of, sample_study, split_of_patient)
from cxrjax.data.phantoms import study as st

I = LABEL_INDEX
N = 2000


def stand_in(attrs, size):
  """Trivial renderer: a flat frontal (grey level = site) and a black lateral when present."""
  images, views = [np.full((size, size), 10 * attrs.site, np.uint8)], [attrs.frontal_view]
  if attrs.has_lateral:
    images.append(np.zeros((size, size), np.uint8)), views.append("L")
  return images, views


@pytest.fixture(scope="module")
def studies():
  return [sample_study(0, i) for i in range(N)]


def _same(a, b):
  for f in dataclasses.fields(a):
    x, y = getattr(a, f.name), getattr(b, f.name)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f.name)


def test_deterministic_per_index_and_independent_of_batch(studies):
  for i in (0, 7, 1234):
    _same(sample_study(0, i), studies[i])
  arrays = make_arrays(0, [1234, 7], size=64, render=stand_in)
  alone = make_arrays(0, [7], size=64, render=stand_in)
  for key in ("labels", "tabular", "severity", "age_years", "images"):
    np.testing.assert_array_equal(arrays[key][1], alone[key][0], err_msg=key)
  other = sample_study(1, 7)
  assert not np.array_equal(other.tabular, studies[7].tabular)


def test_hierarchy_geometry_and_no_finding(studies):
  for a in studies:
    t = a.truth
    for child in ("Consolidation", "Edema", "Atelectasis", "Lung Lesion", "Pneumonia"):
      assert not t[I[child]] or t[I["Lung Opacity"]], (a.study_id, child)
    assert (a.ctr > 0.5) == t[I["Cardiomegaly"]]
    assert (a.mediastinum_width > 0.33) == t[I["Enlarged Cardiomediastinum"]]
    assert t[I["No Finding"]] == (not any(t[I[n]] for n in PATHOLOGIES))
    assert ((a.severity > 0) == (t & (np.arange(14) != I["No Finding"]))).all()
    assert ((a.laterality != st.NONE) <= t).all()
    assert (a.devices != 0) == t[I["Support Devices"]]
    assert (a.fracture_rib >= 0) == t[I["Fracture"]] and (a.lesion_radius > 0) == t[I["Lung Lesion"]]
    assert 18 <= a.age_years <= 95 and a.frontal_view in ("PA", "AP")
    # Stored labels: present -> 1/-1, absent -> 0/NaN (no label noise by default).
    assert np.isin(a.labels[t], (1.0, -1.0)).all()
    assert (np.isnan(a.labels[~t]) | (a.labels[~t] == 0)).all()
  nf = np.array([a.truth[I["No Finding"]] for a in studies])
  devices = np.array([a.truth[I["Support Devices"]] for a in studies])
  assert (nf & devices).any()  # devices do not block No Finding
  cardio = np.array([a.truth[I["Cardiomegaly"]] for a in studies])
  ecm = np.array([a.truth[I["Enlarged Cardiomediastinum"]] for a in studies])
  assert ecm[cardio].mean() > 0.75


def test_prevalences_and_rates(studies):
  truth = np.array([a.truth for a in studies]).mean(0)
  ranges = {"No Finding": (0.35, 0.6), "Lung Opacity": (0.2, 0.45), "Pleural Effusion": (0.12, 0.3),
            "Cardiomegaly": (0.1, 0.25), "Atelectasis": (0.12, 0.3), "Support Devices": (0.15, 0.35),
            "Edema": (0.05, 0.15), "Pneumonia": (0.02, 0.08), "Pneumothorax": (0.015, 0.07),
            "Consolidation": (0.02, 0.08), "Fracture": (0.01, 0.06), "Pleural Other": (0.003, 0.04),
            "Lung Lesion": (0.015, 0.07), "Enlarged Cardiomediastinum": (0.08, 0.25)}
  for name, (lo, hi) in ranges.items():
    assert lo <= truth[I[name]] <= hi, (name, truth[I[name]])
  assert abs(np.mean([a.pe for a in studies]) - 0.3) < 0.04
  assert abs(np.mean([a.has_lateral for a in studies]) - 0.7) < 0.04
  assert 0.22 < np.mean([a.frontal_view == "AP" for a in studies]) < 0.4
  assert np.all(np.abs(np.bincount([a.grade for a in studies], minlength=3) / N - 1 / 3) < 0.05)
  # Co-occurrence: edema goes with cardiomegaly and effusion.
  t = np.array([a.truth for a in studies])
  ed = t[:, I["Edema"]]
  assert t[ed, I["Pleural Effusion"]].mean() > 2 * t[~ed, I["Pleural Effusion"]].mean()
  assert t[ed, I["Cardiomegaly"]].mean() > 2 * t[~ed, I["Cardiomegaly"]].mean()


@pytest.mark.parametrize("rate", [0.05, 0.2])
def test_uncertain_rate_near_config(rate):
  cfg = PhantomConfig(uncertain_rate=rate)
  cols = [I[n] for n in PATHOLOGIES]
  labels, truth = zip(*((a.labels[cols], a.truth[cols]) for a in (sample_study(2, i, cfg) for i in range(N))))
  labels, truth = np.array(labels), np.array(truth)
  assert abs((labels[truth] == -1).mean() - rate) < 0.3 * rate + 0.01


def test_label_noise_flips_written_labels():
  cfg = PhantomConfig(label_noise=0.1, uncertain_rate=0.0)
  wrong = written = 0
  for i in range(500):
    a = sample_study(0, i, cfg)
    w = (a.labels == 0) | (a.labels == 1)
    wrong += int(((a.labels[w] == 1) != a.truth[w]).sum())
    written += int(w.sum())
  assert 0.07 < wrong / written < 0.13


def test_shortcut_strength():
  for strength in (0.0, 1.0):
    cfg = PhantomConfig(shortcut_label="Pleural Effusion", shortcut_strength=strength)
    pairs = np.array([(a.shortcut, a.truth[I["Pleural Effusion"]])
                      for a in (sample_study(5, i, cfg) for i in range(N))], np.float64)
    if strength == 0.0:
      assert abs(np.corrcoef(pairs.T)[0, 1]) < 0.07 and 0.25 < pairs[:, 0].mean() < 0.35
    else:
      np.testing.assert_array_equal(pairs[:, 0], pairs[:, 1])
  with pytest.raises(ConfigError):
    PhantomConfig(shortcut_label="Nope")


def test_patients_and_splits_are_disjoint():
  cfg = PhantomConfig()
  idx = np.arange(3000)
  patients = patient_of(idx, cfg)
  assert num_patients(3000, cfg) == patients.max() + 1 == 2000
  assert patient_of(1234, cfg) == patients[1234]
  a, b = sample_study(0, 2), sample_study(0, 3)
  if patient_of(2) == patient_of(3):
    assert (a.patient_id, a.sex_male, a.race, a.site) == (b.patient_id, b.sex_male, b.race, b.site)
  split = np.array([split_of_patient(0, p) for p in patients])
  by_split = [set(patients[split == k]) for k in range(3)]
  assert not (by_split[0] & by_split[1] or by_split[0] & by_split[2] or by_split[1] & by_split[2])
  fractions = np.bincount([split_of_patient(0, p) for p in range(2000)], minlength=3) / 2000
  np.testing.assert_allclose(fractions, (0.8, 0.1, 0.1), atol=0.03)
  assert split_of_patient(0, 17) == split_of_patient(0, 17)


def test_tabular_probe_and_ctpa_signal():
  cfg = PhantomConfig()
  train = [sample_study(0, i, cfg) for i in range(1500)]
  test = [sample_study(0, i, cfg) for i in range(1500, 2500)]
  clf = LogisticRegression(max_iter=2000).fit([a.tabular for a in train], [a.grade for a in train])
  acc = clf.score([a.tabular for a in test], [a.grade for a in test])
  assert 0.65 < acc < 0.85, acc  # docstring: 0.74 with 4000 training studies
  ctpa, pe = paired_embeddings(0, range(1200), cfg, ctpa_dim=32)
  assert ctpa.shape == (1200, 32) and ctpa.dtype == np.float32
  np.testing.assert_array_equal(pe, [sample_study(0, i, cfg).pe for i in range(1200)])
  clf = LogisticRegression(max_iter=3000).fit(ctpa[:800], pe[:800])
  assert roc_auc_score(pe[800:], clf.decision_function(ctpa[800:])) > 0.85
  one, _ = paired_embeddings(0, [5], cfg, ctpa_dim=32)
  np.testing.assert_array_equal(one[0], ctpa[5])


def test_make_example_layout():
  ex = make_example(0, 3, PhantomConfig(), 64, render=stand_in)
  assert set(ex) == {"study_id", "patient_id", "images", "views", "labels", "age_years", "sex_male",
                     "race", "site", "findings", "impression", "phantom"}
  assert set(ex["phantom"]) == {"severity", "tabular", "grade", "pe", "shortcut"}
  assert len(ex["images"]) == len(ex["views"]) and ex["site"].startswith("site_")
  assert ex["labels"].shape == (len(CHEXPERT_LABELS),) and ex["phantom"]["tabular"].shape == (80,)
  with pytest.raises(ValueError, match="uint8"):
    make_example(0, 3, PhantomConfig(), 64, render=lambda a, s: ([np.zeros((s, s))], ["PA"]))


def test_default_renderer_smoke():
  pytest.importorskip("cxrjax.data.phantoms.render")
  cfg = PhantomConfig()
  arrays = make_arrays(0, range(4), cfg, 64)
  lateral = np.array([sample_study(0, i, cfg).has_lateral for i in range(4)])
  assert arrays["images"].shape == (4, 2, 64, 64) and arrays["images"].dtype == np.uint8
  np.testing.assert_array_equal(arrays["view_mask"].sum(1), 1 + lateral)
  assert arrays["images"][:, 0].std() > 0


def test_phantom_pairs_feed_the_prior_npz_source(tmp_path):
  """Phantom CXR embeddings (here: 16 x 16 thumbnails of the rendered frontal, a stand-in for any
  encoder) + the CTPA side -> the .npz the prior reads with data.source=npz."""
  from cxrjax.data.paired_embeddings import load_npz
  from cxrjax.data.phantoms.prior_pairs import write_prior_npz
  from cxrjax.data.phantoms.render import render_frontal

  cfg = PhantomConfig()
  patients = patient_of(np.arange(240), cfg)
  split = np.array([split_of_patient(0, int(p), (0.6, 0.2, 0.2)) for p in patients])
  names = {0: "train", 1: "valid", 2: "test"}

  def thumbs(indices):
    imgs = [render_frontal(sample_study(0, int(i), cfg), 64) for i in indices]
    return np.stack([im.reshape(16, 4, 16, 4).mean((1, 3)).ravel() for im in imgs]) / 255.0

  cxr = {names[k]: (np.flatnonzero(split == k), thumbs(np.flatnonzero(split == k))) for k in names}
  path = write_prior_npz(tmp_path / "pairs.npz", 0, cxr, cfg, ctpa_dim=24)
  data = load_npz(path)
  for k, name in names.items():
    idx = np.flatnonzero(split == k)
    assert data[name].cxr.shape == (len(idx), 256) and data[name].ctpa.shape == (len(idx), 24)
    np.testing.assert_array_equal(data[name].label, [sample_study(0, int(i), cfg).pe for i in idx])
    assert list(data[name].ids) == [f"s{i:08d}" for i in idx]
  with pytest.raises(ValueError, match="do not match"):
    write_prior_npz(tmp_path / "bad.npz", 0, {"train": (np.arange(3), np.zeros((2, 4)))}, cfg)
