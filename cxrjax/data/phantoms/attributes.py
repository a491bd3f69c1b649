"""Sampling phantom studies: who the patient is, what the image shows, what the labeller wrote.

``sample_study(seed, index, config)`` returns the ``StudyAttributes`` of study ``index``. It
draws from its own stream ``default_rng([seed, index])`` plus its patient's stream (below), so a
study never depends on which other indices are drawn with it, and a larger dataset extends a
smaller one.

Generative model
================
Patients. Study i belongs to patient p = floor(i / m) (m = ``studies_per_patient``, mean studies
per patient; consecutive studies share a patient), so patient-level splits need no lookup table.
Patient-level draws come from ``default_rng([seed, p, _PATIENT_TAG])``:
  sex ~ Bernoulli(0.5); race ~ Cat(group_a..d: 0.6, 0.2, 0.12, 0.08) -- no visual sign and no
  effect on disease, so any race signal a model finds is spurious; site ~ U{0..num_sites-1};
  age0 = 18 + 77 Beta(2.6, 1.9) (mean ~62); frailty f ~ N(0, 1); habitus ~ N(0, 0.4) clipped to [-1, 1].
Study k of its patient (k = 0, 1, ...): age = min(95, age0 + 0.7 k), and from the study stream
  acute a ~ N(0, 1);  risk r = 0.5 age_z + 0.6 f + 0.8 a + site_shift[site]
  (age_z = (age - 62) / 16; site_shift spreads from -0.3 to +0.3 over sites: sites differ in
  case mix, a natural confounder).
View: AP with P = sigmoid(logit(ap_rate) + 0.8 a) (sick patients are filmed supine), else PA;
  a lateral view too with P = lateral_rate, independent of the rest.
PE (for the prior): liability 0.3 a + sqrt(1 - 0.09) xi > Phi^-1(1 - pe_prevalence), so
  P(PE) = pe_prevalence exactly; PE raises the odds of effusion and atelectasis (its CXR signs).
Pathologies (truth), in this order, each Bernoulli(sigmoid(b + w r + links)):
  Cardiomegaly b=-1.9 w=0.8;  Edema -3.0 + 1.6 Cardiomegaly, w=0.7;
  Pleural Effusion -2.3 + 0.9 Cardiomegaly + 1.6 Edema + 0.7 PE, w=0.7;
  Atelectasis -2.1 + 0.9 Effusion + 0.7 PE, w=0.6;  Pneumonia -3.3, w=0.7;
  Consolidation: P = 0.65 given Pneumonia, else b=-4.0;  Lung Lesion -3.4 + 0.3 age_z;
  Lung Opacity (other opacity, e.g. ground glass) -3.2, w=0.5;  Fracture -3.6 + 0.3 age_z;
  Pleural Other -4.2;  Enlarged Cardiomediastinum: P = 0.85 given Cardiomegaly, else b=-4.0;
  Support Devices -2.4 + 2.0 AP + 0.6 a + 0.4 age_z + 0.5 Cardiomegaly;
  Pneumothorax -3.6 + 0.9 (central line or ETT) + 0.4 a.
Hierarchy (always true): Consolidation, Edema, Atelectasis, Lung Lesion, Pneumonia => Lung
  Opacity; Pneumonia => Lung Opacity (and usually Consolidation); Cardiomegaly => Enlarged
  Cardiomediastinum in 85%; No Finding <=> none of the 12 pathologies (Support Devices allowed,
  CheXpert's rule).
Severity in [0, 1]: max(0.05, Beta(1.3, 3.0)) (mean 0.3: mild cases common); a pneumonia's
  consolidation takes the pneumonia's severity; Lung Opacity takes the max over its children;
  No Finding 0; Support Devices 1 when present.
Geometry: ctr = 0.50 + 0.18 sev if Cardiomegaly else clip(0.44 + 0.03 N, 0.33, 0.50), so
  ctr > 0.5 exactly when Cardiomegaly; mediastinum_width = 0.33 + 0.13 sev if Enlarged
  Cardiomediastinum else clip(0.28 + 0.03 N, 0.18, 0.33) (> 0.33 exactly when enlarged; ~5% of
  normal mediastina sit at the upper limit of normal). The normal and enlarged ranges meet at the
  threshold, so a mild case is a borderline measurement (and the renderer magnifies both in AP
  views, as the projection does).
  Laterality: effusion bilateral 45% / right 35% / left 20%; edema bilateral; atelectasis
  bilateral 40%, else a side; pneumothorax, lesion, fracture one side; Lung Opacity the union of
  its children's sides. Lesion centre U([0.2, 0.8] x [0.15, 0.85]) in its lung, radius
  0.04 + 0.12 sev (nodule .. mass); fractured rib U{2..9}. Devices: a non-empty subset of ETT,
  NG tube, central line, pacemaker (pacemaker likelier with Cardiomegaly, NG with ETT).
Stored labels (what a labeller read in the report): a present sign is written 1, or -1 with
  P = uncertain_rate (1 - sev) / 0.7 (mild cases hedged; mean over positives ~ uncertain_rate);
  an absent one is written 0 when the report mentions it (per-label mention rates, higher in
  normal studies) and NaN otherwise; No Finding is 1 or NaN; Support Devices never -1. Then each written 0/1 flips with
  P = label_noise. The report (reports.py) follows the truth and this mention pattern.
Shortcut: for the truth y of ``shortcut_label``, marker ~ Bernoulli(q + s (1 - q)) if y else
  Bernoulli(q (1 - s)), q = shortcut_rate, s = shortcut_strength: s = 0 independent, s = 1
  marker == y. Without a shortcut label the marker is Bernoulli(q) noise.
Grade (GMCD's 3-class target): g = 0.6 r / sd(r) + 0.8 N(0, 1), grade = 0/1/2 at the
  standard-normal tertiles (about a third each). Tabular (80,):
  x = tabular_signal (1.55 (grade - 1) u_1 + 0.8 g u_2) + 0.8 (age_z v_1 + (2 sex - 1) v_2) + N(0, I)
  with fixed orthonormal u_1, u_2, v_1, v_2 from ``default_rng([seed, _WORLD_TAG])``: a rank-2
  grade signal, a rank-2 demographic nuisance, isotropic noise.
  Measured (seed 0, studies 0-3999 train / 4000-7999 test, standardised logistic regression):
  linear-probe accuracy on grade 0.74 with the default tabular_signal 1.0 (0.80 at 1.6; chance 0.33).
Measured rates (seed 0, studies 0-3999, default config; truth): Atelectasis 0.20, Cardiomegaly
  0.17, Consolidation 0.05, Edema 0.10, Enlarged Cardiomediastinum 0.15, Fracture 0.03, Lung
  Lesion 0.03, Lung Opacity 0.36, No Finding 0.48, Pleural Effusion 0.20, Pleural Other 0.015,
  Pneumonia 0.04, Pneumothorax 0.04, Support Devices 0.23; PE 0.30, AP 0.32, lateral 0.70,
  grade 0.33/0.34/0.33, mean age 63; -1 among present pathologies 0.048 (uncertain_rate 0.05).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy.special import expit, logit, ndtri

from cxrjax.core.errors import ConfigError
from cxrjax.data.features import TABULAR_DIM
from cxrjax.data.labels import CHEXPERT_LABELS, LABEL_INDEX, NUM_LABELS
from cxrjax.data.phantoms import study as st

__all__ = ["PhantomConfig", "sample_study", "patient_of", "num_patients", "split_of_patient",
           "PATHOLOGIES", "RACES"]

# Stream tags: extra entropy words so patient/world/split streams never collide with study
# streams default_rng([seed, index]).
_PATIENT_TAG, _WORLD_TAG, _SPLIT_TAG = 0x7A71E47, 0x30A1D, 0x5B117

RACES = ("group_a", "group_b", "group_c", "group_d")
_RACE_P = (0.6, 0.2, 0.12, 0.08)
# The 12 pathologies whose absence defines No Finding (Support Devices does not count).
PATHOLOGIES = tuple(n for n in CHEXPERT_LABELS if n not in ("No Finding", "Support Devices"))
_OPACITY_CHILDREN = ("Consolidation", "Edema", "Atelectasis", "Lung Lesion", "Pneumonia")
# P(report mentions an absent finding) in an abnormal / a normal study.
_MENTION = {"Atelectasis": (0.1, 0.1), "Cardiomegaly": (0.5, 0.9), "Consolidation": (0.45, 0.6),
            "Edema": (0.35, 0.3), "Enlarged Cardiomediastinum": (0.3, 0.6), "Fracture": (0.1, 0.15),
            "Lung Lesion": (0.05, 0.05), "Lung Opacity": (0.1, 0.5), "Pleural Effusion": (0.75, 0.9),
            "Pleural Other": (0.02, 0.02), "Pneumonia": (0.3, 0.3), "Pneumothorax": (0.7, 0.9),
            "Support Devices": (0.0, 0.0)}
_I = LABEL_INDEX


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
  """Knobs of the phantom world (symbols of the module docstring).

  num_sites: acquisition sites; uncertain_rate: mean fraction of present pathologies written -1;
  label_noise: flip rate of written 0/1 labels; lateral_rate: fraction of studies with a lateral
  view; ap_rate: base rate of AP frontal views; shortcut_label: a CHEXPERT_LABELS name or None;
  shortcut_strength in [0, 1]; shortcut_rate: base marker rate q; pe_prevalence; studies_per_patient:
  mean studies per patient (>= 1); tabular_signal: scale of the grade signal in ``tabular``.
  """
  num_sites: int = 5
  uncertain_rate: float = 0.05
  label_noise: float = 0.0
  lateral_rate: float = 0.7
  ap_rate: float = 0.3
  shortcut_label: str | None = None
  shortcut_strength: float = 0.0
  shortcut_rate: float = 0.3
  pe_prevalence: float = 0.3
  studies_per_patient: float = 1.5
  tabular_signal: float = 1.0

  def __post_init__(self):
    rates = dict(uncertain_rate=self.uncertain_rate, label_noise=self.label_noise,
                 lateral_rate=self.lateral_rate, shortcut_strength=self.shortcut_strength)
    if bad := {k: v for k, v in rates.items() if not 0.0 <= v <= 1.0}:
      raise ConfigError(f"PhantomConfig: {bad} must lie in [0, 1]")
    opens = dict(ap_rate=self.ap_rate, shortcut_rate=self.shortcut_rate, pe_prevalence=self.pe_prevalence)
    if bad := {k: v for k, v in opens.items() if not 0.0 < v < 1.0}:
      raise ConfigError(f"PhantomConfig: {bad} must lie in (0, 1)")
    if self.num_sites < 1 or self.studies_per_patient < 1 or self.tabular_signal < 0:
      raise ConfigError("PhantomConfig: need num_sites >= 1, studies_per_patient >= 1, tabular_signal >= 0")
    if self.shortcut_label is not None and self.shortcut_label not in LABEL_INDEX:
      raise ConfigError(f"PhantomConfig: shortcut_label {self.shortcut_label!r} is not one of {CHEXPERT_LABELS}")


# --------------------------------------------------------------------------- #
# patients and splits
# --------------------------------------------------------------------------- #
def patient_of(index, config: PhantomConfig = PhantomConfig()):
  """Study index (int or int array) -> patient index, floor(index / studies_per_patient)."""
  return np.floor(np.asarray(index) / config.studies_per_patient).astype(np.int64) if np.ndim(index) \
      else int(math.floor(index / config.studies_per_patient))


def _first_study(patient: int, config: PhantomConfig) -> int:
  """Smallest study index of ``patient`` (to number a study within its patient)."""
  i = int(math.ceil(patient * config.studies_per_patient))
  while i > 0 and patient_of(i - 1, config) >= patient:  # guard float rounding either way
    i -= 1
  while patient_of(i, config) < patient:
    i += 1
  return i


def num_patients(num_studies: int, config: PhantomConfig = PhantomConfig()) -> int:
  """Number of distinct patients among studies 0..num_studies-1."""
  return 0 if num_studies <= 0 else patient_of(num_studies - 1, config) + 1


def split_of_patient(seed: int, patient: int, fractions=(0.8, 0.1, 0.1)) -> int:
  """Deterministic split index (0 train, 1 validation, 2 test, ...) of a patient, from a uniform
  draw of its own stream: every study of a patient lands in the same split."""
  f = np.asarray(fractions, np.float64)
  if f.ndim != 1 or (f < 0).any() or not np.isclose(f.sum(), 1.0):
    raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}")
  u = np.random.default_rng([seed, patient, _SPLIT_TAG]).random()
  return int(min(np.searchsorted(np.cumsum(f), u, side="right"), len(f) - 1))


# --------------------------------------------------------------------------- #
# the study
# --------------------------------------------------------------------------- #
def _world(seed: int) -> np.ndarray:
  """(TABULAR_DIM, 4) orthonormal columns u_1, u_2, v_1, v_2; fixed per seed."""
  q, _ = np.linalg.qr(np.random.default_rng([seed, _WORLD_TAG]).normal(size=(TABULAR_DIM, 4)))
  return q


def _bern(rng: np.random.Generator, logit_p: float) -> bool:
  return bool(rng.random() < expit(logit_p))


def _side(rng: np.random.Generator, p_bilateral: float, p_right_of_rest: float = 0.5) -> int:
  u = rng.random()
  if u < p_bilateral:
    return st.BILATERAL
  return st.RIGHT if (u - p_bilateral) / (1 - p_bilateral) < p_right_of_rest else st.LEFT


def _union(sides) -> int:
  sides = set(s for s in sides if s != st.NONE)
  if not sides:
    return st.NONE
  return sides.pop() if len(sides) == 1 else st.BILATERAL


def _truth(rng, r, age_z, acute, ap, pe):
  """Pathologies and devices in the order of the module docstring -> (dict name -> bool, devices)."""
  t = {}
  t["Cardiomegaly"] = _bern(rng, -1.9 + 0.8 * r)
  t["Edema"] = _bern(rng, -3.0 + 1.6 * t["Cardiomegaly"] + 0.7 * r)
  t["Pleural Effusion"] = _bern(rng, -2.3 + 0.9 * t["Cardiomegaly"] + 1.6 * t["Edema"] + 0.7 * pe + 0.7 * r)
  t["Atelectasis"] = _bern(rng, -2.1 + 0.9 * t["Pleural Effusion"] + 0.7 * pe + 0.6 * r)
  t["Pneumonia"] = _bern(rng, -3.3 + 0.7 * r)
  t["Consolidation"] = bool(rng.random() < 0.65) if t["Pneumonia"] else _bern(rng, -4.0)
  t["Lung Lesion"] = _bern(rng, -3.4 + 0.3 * age_z)
  own_opacity = _bern(rng, -3.2 + 0.5 * r)
  t["Lung Opacity"] = own_opacity or any(t[c] for c in _OPACITY_CHILDREN)
  t["Fracture"] = _bern(rng, -3.6 + 0.3 * age_z)
  t["Pleural Other"] = _bern(rng, -4.2)
  t["Enlarged Cardiomediastinum"] = bool(rng.random() < 0.85) if t["Cardiomegaly"] else _bern(rng, -4.0)
  t["Support Devices"] = _bern(rng, -2.4 + 2.0 * ap + 0.6 * acute + 0.4 * age_z + 0.5 * t["Cardiomegaly"])
  devices = 0
  if t["Support Devices"]:
    p = {st.DEVICE_ETT: 0.35 + 0.2 * ap, st.DEVICE_CENTRAL_LINE: 0.5,
         st.DEVICE_PACEMAKER: 0.2 + 0.3 * t["Cardiomegaly"]}
    for flag in (st.DEVICE_ETT, st.DEVICE_CENTRAL_LINE, st.DEVICE_PACEMAKER):
      devices |= flag if rng.random() < p[flag] else 0
    ng_p = 0.8 if devices & st.DEVICE_ETT else 0.25
    devices |= st.DEVICE_NG_TUBE if (rng.random() < ng_p or devices == 0) else 0
  line_or_tube = bool(devices & (st.DEVICE_CENTRAL_LINE | st.DEVICE_ETT))
  t["Pneumothorax"] = _bern(rng, -3.6 + 0.9 * line_or_tube + 0.4 * acute)
  t["No Finding"] = not any(t[n] for n in PATHOLOGIES)
  return t, devices, own_opacity


def _severity_and_sides(rng, t, own_opacity):
  """(14,) severity and (14,) laterality from the truth (see the module docstring)."""
  sev = np.zeros(NUM_LABELS, np.float32)
  lat = np.zeros(NUM_LABELS, np.int8)
  for name in PATHOLOGIES:
    if t[name] and name != "Lung Opacity":
      sev[_I[name]] = max(0.05, rng.beta(1.3, 3.0))
  sides = {"Pleural Effusion": lambda: _side(rng, 0.45, 0.35 / 0.55), "Edema": lambda: st.BILATERAL,
           "Atelectasis": lambda: _side(rng, 0.4), "Consolidation": lambda: _side(rng, 0.2, 0.55),
           "Pneumothorax": lambda: _side(rng, 0.0), "Lung Lesion": lambda: _side(rng, 0.0, 0.55),
           "Fracture": lambda: _side(rng, 0.0), "Pleural Other": lambda: _side(rng, 0.3)}
  for name, draw in sides.items():
    if t[name]:
      lat[_I[name]] = draw()
  if t["Pneumonia"]:
    lat[_I["Pneumonia"]] = lat[_I["Consolidation"]] if t["Consolidation"] else _side(rng, 0.2, 0.55)
    if t["Consolidation"]:  # the pneumonia's consolidation is its extent: one severity for both
      sev[_I["Consolidation"]] = sev[_I["Pneumonia"]]
  if t["Lung Opacity"]:
    own_sev = max(0.05, rng.beta(1.3, 3.0)) if own_opacity else 0.0
    own_side = _side(rng, 0.3) if own_opacity else st.NONE
    kids = [_I[c] for c in _OPACITY_CHILDREN]
    sev[_I["Lung Opacity"]] = max([own_sev] + [sev[k] for k in kids])
    lat[_I["Lung Opacity"]] = _union([own_side] + [lat[k] for k in kids])
  if t["Support Devices"]:
    sev[_I["Support Devices"]] = 1.0
  return sev, lat


def _stored_labels(rng, t, sev, config):
  """(14,) float32 in {1, 0, -1, NaN}: what a labeller wrote from the report."""
  normal = t["No Finding"]
  labels = np.full(NUM_LABELS, np.nan, np.float32)
  for name in CHEXPERT_LABELS:
    j = _I[name]
    if name == "No Finding":
      labels[j] = 1.0 if normal else np.nan
    elif t[name]:
      hedge = name != "Support Devices" and rng.random() < config.uncertain_rate * (1 - sev[j]) / 0.7
      labels[j] = -1.0 if hedge else 1.0
    elif rng.random() < _MENTION[name][int(normal)]:
      labels[j] = 0.0
  flip = (rng.random(NUM_LABELS) < config.label_noise) & ((labels == 0) | (labels == 1))
  labels[flip] = 1.0 - labels[flip]
  return labels


def _shortcut(rng, t, config) -> float:
  q, s = config.shortcut_rate, config.shortcut_strength
  if config.shortcut_label is None:
    return float(rng.random() < q)
  p = q + s * (1 - q) if t[config.shortcut_label] else q * (1 - s)
  return float(rng.random() < p)


def sample_study(seed: int, index: int, config: PhantomConfig = PhantomConfig()) -> st.StudyAttributes:
  """The attributes of study ``index`` of world ``seed`` (see the module docstring)."""
  patient = patient_of(index, config)
  pr = np.random.default_rng([seed, patient, _PATIENT_TAG])
  sex_male = float(pr.random() < 0.5)
  race = RACES[int(pr.choice(len(RACES), p=_RACE_P))]
  site = int(pr.integers(config.num_sites))
  age0, frailty = 18.0 + 77.0 * pr.beta(2.6, 1.9), pr.normal()
  habitus = float(np.clip(pr.normal(0.0, 0.4), -1.0, 1.0))

  rng = np.random.default_rng([seed, index])
  render_seed = int(rng.integers(2**31 - 1))
  age = float(min(95.0, age0 + 0.7 * (index - _first_study(patient, config))))
  age_z = (age - 62.0) / 16.0
  acute = rng.normal()
  shift = 0.0 if config.num_sites == 1 else -0.3 + 0.6 * site / (config.num_sites - 1)
  r = 0.5 * age_z + 0.6 * frailty + 0.8 * acute + shift
  ap = _bern(rng, logit(config.ap_rate) + 0.8 * acute)
  has_lateral = bool(rng.random() < config.lateral_rate)
  pe = int(0.3 * acute + math.sqrt(1 - 0.09) * rng.normal() > ndtri(1 - config.pe_prevalence))

  t, devices, own_opacity = _truth(rng, r, age_z, acute, ap, pe)
  sev, lat = _severity_and_sides(rng, t, own_opacity)
  truth = np.array([t[n] for n in CHEXPERT_LABELS], bool)
  n1, n2 = rng.normal(size=2)
  ctr = 0.50 + 0.18 * sev[_I["Cardiomegaly"]] if t["Cardiomegaly"] else np.clip(0.44 + 0.03 * n1, 0.33, 0.50)
  ecm = t["Enlarged Cardiomediastinum"]
  width = 0.33 + 0.13 * sev[_I["Enlarged Cardiomediastinum"]] if ecm else np.clip(0.28 + 0.03 * n2, 0.18, 0.33)
  lesion_xy = np.zeros(2, np.float32)
  lesion_radius = 0.0
  if t["Lung Lesion"]:
    lesion_xy = np.array([rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.85)], np.float32)
    lesion_radius = 0.04 + 0.12 * float(sev[_I["Lung Lesion"]])
  fracture_rib = int(rng.integers(2, 10)) if t["Fracture"] else -1

  labels = _stored_labels(rng, t, sev, config)
  shortcut = _shortcut(rng, t, config)
  r_sd = math.sqrt(0.25 + 0.36 + 0.64 + 0.04)  # sd of r: age_z ~ unit sd, site shift sd ~0.2
  g = 0.6 * r / r_sd + 0.8 * rng.normal()
  grade = int(np.searchsorted(ndtri([1 / 3, 2 / 3]), g))
  u = _world(seed)
  tabular = (config.tabular_signal * (1.55 * (grade - 1) * u[:, 0] + 0.8 * g * u[:, 1])
             + 0.8 * (age_z * u[:, 2] + (2 * sex_male - 1) * u[:, 3]) + rng.normal(size=TABULAR_DIM))

  return st.StudyAttributes(
      study_id=f"s{index:08d}", patient_id=f"p{patient:08d}", render_seed=render_seed,
      age_years=round(age, 1), sex_male=sex_male, race=race, site=site, habitus=habitus,
      inspiration=float(np.clip(rng.beta(5, 2) - 0.15 * ap, 0, 1)),
      rotation=float(np.clip(rng.normal(0, 2.0), -6, 6)), frontal_view="AP" if ap else "PA",
      has_lateral=has_lateral, ctr=float(ctr), mediastinum_width=float(width), labels=labels,
      truth=truth, severity=sev, laterality=lat, lesion_xy=lesion_xy,
      lesion_radius=float(lesion_radius), fracture_rib=fracture_rib, devices=devices,
      shortcut=shortcut, pe=pe, grade=grade, tabular=tabular.astype(np.float32))
