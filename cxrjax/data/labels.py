"""Label, view and demographic conventions shared by every CXR source (torchxrayvision's).

Datasets store labels as prepared, in CheXpert's four-valued form: 1 positive, 0 negative,
-1 uncertain, NaN not mentioned. The uncertain policy is applied when a pipeline reads them
(``apply_uncertain_policy``), so one prepared dataset serves U-ignore, U-ones and U-zeros runs.
Losses and metrics mask NaN per class.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from cxrjax.data.errors import DataError

# The 14 CheXpert labels in the column order of mimic-cxr-2.0.0-chexpert.csv (alphabetical).
CHEXPERT_LABELS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
    "Pneumonia", "Pneumothorax", "Support Devices")
NUM_LABELS = len(CHEXPERT_LABELS)
LABEL_INDEX = {name: i for i, name in enumerate(CHEXPERT_LABELS)}

# View vocabulary; stored as ClassLabel indices in this order.
VIEWS: tuple[str, ...] = ("PA", "AP", "L", "UNKNOWN")
VIEW_INDEX = {v: i for i, v in enumerate(VIEWS)}

# Raw view strings of MIMIC-CXR (ViewPosition), CheXpert (AP/PA column, Frontal/Lateral) and DICOM
# (ViewPosition / ViewCodeSequence meanings), upper-cased, mapped onto VIEWS.
_VIEW_ALIASES = {
    "PA": "PA", "POSTERO-ANTERIOR": "PA", "POSTEROANTERIOR": "PA",
    "AP": "AP", "AP SUPINE": "AP", "AP AXIAL": "AP", "ANTERO-POSTERIOR": "AP", "ANTEROPOSTERIOR": "AP",
    "L": "L", "LL": "L", "RL": "L", "LATERAL": "L", "LAT": "L", "LEFT LATERAL": "L",
    "RIGHT LATERAL": "L", "LAO": "UNKNOWN", "RAO": "UNKNOWN", "PA LLD": "PA", "AP LLD": "AP",
    "AP RLD": "AP", "PA RLD": "PA", "XTABLE LATERAL": "L", "SWIMMERS": "UNKNOWN",
    "": "UNKNOWN", "UNKNOWN": "UNKNOWN", "NAN": "UNKNOWN",
}

UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")

# Standard demographic columns (torchxrayvision names); NaN / '' when unknown.
DEMOGRAPHIC_COLUMNS = ("age_years", "sex_male", "race", "site")


def normalize_view(raw: object, *, where: str = "") -> str:
  """Maps a raw view string onto VIEWS; blank/missing -> 'UNKNOWN'. Raises DataError on an
  unrecognised non-empty value so a typo in a CSV is not silently dropped."""
  if raw is None or (isinstance(raw, float) and math.isnan(raw)):
    return "UNKNOWN"
  key = " ".join(str(raw).strip().upper().replace("_", " ").split())
  if key not in _VIEW_ALIASES:
    raise DataError(f"{where}unknown view {raw!r}; known: {sorted(k for k in _VIEW_ALIASES if k)}")
  return _VIEW_ALIASES[key]


def parse_label(raw: object, *, where: str = "") -> float:
  """One raw CSV cell -> 1.0, 0.0, -1.0 or NaN (blank). Anything else is a DataError."""
  if raw is None:
    return math.nan
  shown = raw.strip() if isinstance(raw, str) else raw  # the cell as written: '2', not 2.0
  if isinstance(raw, str):
    if shown == "" or shown.lower() == "nan":
      return math.nan
    try:
      raw = float(shown)
    except ValueError:
      raise DataError(f"{where}label {shown!r} is not one of 1, 0, -1 or blank") from None
  v = float(raw)
  if math.isnan(v):
    return math.nan
  if v not in (1.0, 0.0, -1.0):
    raise DataError(f"{where}label {shown} is not one of 1, 0, -1 or blank")
  return v


def parse_label_row(values: Iterable[object], *, where: str = "") -> np.ndarray:
  """A row of raw label cells in CHEXPERT_LABELS order -> (14,) float32 in {1, 0, -1, NaN}."""
  out = np.array([parse_label(v, where=where) for v in values], np.float32)
  if out.shape != (NUM_LABELS,):
    raise DataError(f"{where}expected {NUM_LABELS} label values, got {out.shape[0]}")
  return out


def apply_uncertain_policy(labels: np.ndarray, policy: str = "ignore") -> np.ndarray:
  """Stored labels (..., 14) in {1, 0, -1, NaN} -> training targets in {1, 0, NaN}.

  'ignore' (default): -1 -> NaN (masked out); 'ones': -1 -> 1 (U-Ones); 'zeros': -1 -> 0.
  """
  if policy not in UNCERTAIN_POLICIES:
    raise ValueError(f"uncertain policy must be one of {UNCERTAIN_POLICIES}, got {policy!r}")
  labels = np.asarray(labels, np.float32)
  fill = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[policy]
  return np.where(labels == -1.0, np.float32(fill), labels)


def no_finding_implies_negatives(labels: np.ndarray) -> np.ndarray:
  """torchxrayvision's MIMIC rule: where 'No Finding' == 1, unmentioned pathologies become 0
  (Support Devices excepted, which 'No Finding' does not exclude). labels: (..., 14)."""
  labels = np.array(labels, np.float32, copy=True)
  nf = labels[..., LABEL_INDEX["No Finding"]] == 1.0
  keep = np.array([name in ("No Finding", "Support Devices") for name in CHEXPERT_LABELS])
  fill = nf[..., None] & np.isnan(labels) & ~keep
  labels[fill] = 0.0
  return labels


def _name_key(name: str) -> str:
  return " ".join(str(name).replace("_", " ").split()).casefold()


def match_label_names(model_names, data_names) -> tuple[list[int], list[int], list[str], list[str]]:
  """A model trained on one label set, evaluated on data with another: the labels both have,
  matched by name (case, spaces and underscores ignored: 'No finding' is 'No Finding').

  Returns (model columns, data columns, names only the model has, names only the data has);
  the first two are aligned and follow the model's order.
  """
  data_keys = {_name_key(n): j for j, n in enumerate(data_names)}
  model_cols, data_cols = [], []
  for i, name in enumerate(model_names):
    j = data_keys.get(_name_key(name))
    if j is not None:
      model_cols.append(i)
      data_cols.append(j)
  model_only = [n for i, n in enumerate(model_names) if i not in model_cols]
  data_only = [n for j, n in enumerate(data_names) if j not in data_cols]
  return model_cols, data_cols, model_only, data_only
