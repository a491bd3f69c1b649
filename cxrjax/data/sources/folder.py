"""A generic folder of radiographs (PNG / JPEG / DICOM) plus one CSV -> the standard image table.

Layout under ``root``::

  labels.csv            one row per image; column names are given by a FolderSpec
  images/...            any tree; the CSV's path column is relative to root/<image_dir>

Example CSV for ``FolderSpec(study_id='study', view='view', age='age', sex='sex')``::

  path,patient_id,study,view,age,sex,Cardiomegaly,Edema
  p1/s1/frontal.png,p1,s1,PA,61,M,1,
  p1/s1/lateral.dcm,p1,s1,LATERAL,61,M,1,

Splits are patient-level: from the spec's split column when it has one (train / validation /
test, with the usual aliases; a patient in two splits is a DataError), otherwise a hash of the
patient id with the spec's fractions.

Labels are CheXpert's 14 by default; a folder with labels of its own (COVID-19, tuberculosis,
...) names them in ``FolderSpec.labels`` and the prepared dataset carries those names instead
(``FolderSpec.label_names``).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Mapping

import pandas as pd

from cxrjax.core.errors import ConfigError
from cxrjax.data.errors import DataError
from cxrjax.data.labels import CHEXPERT_LABELS, LABEL_INDEX, normalize_view
from cxrjax.data.sources import table as tbl
from cxrjax.data.sources.images import dicom_view
from cxrjax.data.sources.reports import sections, split_report


@dataclasses.dataclass(frozen=True)
class FolderSpec:
  """Which CSV columns hold what. ``path`` and ``patient_id`` are required; every other field
  names an optional column, None meaning the CSV has none. A column that is named here but
  absent from the CSV is a DataError.

  csv: the CSV, relative to root (or absolute).
  image_dir: folder the path column is relative to, relative to root ('' = root).
  study_id: None -> each image is its own study.  view: None -> a DICOM's ViewPosition where it
    has one, else 'UNKNOWN' (a blank cell of a view column reads the DICOM header too).
  sex: M / Male -> sex_male 1, F / Female -> 0, anything else unknown (NaN).
  labels: label name -> CSV column; None -> every CSV column named like a CheXpert label
    (labels.CHEXPERT_LABELS). Which names the dataset has is label_set's choice:
  label_set: 'auto' -> CheXpert's 14 when every name in labels is a CheXpert label (the others
    blank, so models stay comparable with CheXpert-trained ones), else the names of labels, in
    their order (e.g. labels={'COVID-19': 'covid', 'No Finding': 'normal'}); 'chexpert' or
    'own' force one or the other.
  report: a free-text report column, split into FINDINGS / IMPRESSION (a report without
    section headers goes whole into findings); findings / impression: columns holding those.
  split: split column; None -> hash of the patient id with validation/test_fraction and seed.
  """
  csv: str = "labels.csv"
  image_dir: str = ""
  path: str = "path"
  patient_id: str = "patient_id"
  study_id: str | None = None
  view: str | None = None
  labels: Mapping[str, str] | None = None
  age: str | None = None
  sex: str | None = None
  race: str | None = None
  site: str | None = None
  report: str | None = None
  findings: str | None = None
  impression: str | None = None
  split: str | None = None
  validation_fraction: float = 0.1
  test_fraction: float = 0.1
  seed: int = 0
  label_set: str = "auto"

  def label_names(self) -> tuple[str, ...]:
    """The dataset's label names, in order (see label_set)."""
    if self.label_set not in ("auto", "chexpert", "own"):
      raise ConfigError(f"label_set={self.label_set!r}: use 'auto', 'chexpert' or 'own'")
    if self.labels is None:
      if self.label_set == "own":
        raise ConfigError("label_set='own' needs labels=NAME:COLUMN,... naming them")
      return CHEXPERT_LABELS
    names = tuple(self.labels)
    if not names:
      raise ConfigError("labels is empty; leave it unset for the CheXpert columns, or name some")
    unknown = [n for n in names if n not in LABEL_INDEX]
    if self.label_set == "chexpert" and unknown:
      raise ConfigError(f"labels names {unknown}, not CheXpert labels {list(CHEXPERT_LABELS)}; "
                      f"with label_set=own (or auto) the dataset keeps its own names")
    if self.label_set == "own" or (self.label_set == "auto" and unknown):
      if clash := [n for n in names if n in tbl.FIXED_COLUMNS]:
        raise ConfigError(f"label name(s) {clash} clash with the table's own columns; rename them")
      return names
    return CHEXPERT_LABELS


def _label_columns(spec: FolderSpec, df: pd.DataFrame, path: Path) -> dict[str, str | None]:
  if spec.labels is None:
    found = {n: (n if n in df.columns else None) for n in CHEXPERT_LABELS}
    if not any(found.values()):  # legal (unlabelled data), but rarely what was meant
      print(f"warning: {path} has no column named like a CheXpert label, so every label is "
            f"blank; name your label columns with --config labels=NAME:COLUMN,...",
            file=sys.stderr)
    return found
  tbl.require_columns(df, list(spec.labels.values()), path)
  return {n: spec.labels.get(n) for n in spec.label_names()}


def _view(raw: str, image: Path, where: str) -> str:
  """The CSV's view when it has one, else the DICOM header's ViewPosition, else UNKNOWN. A
  header value outside the vocabulary is UNKNOWN (it is not the user's typo to fix)."""
  if raw:
    return normalize_view(raw, where=f"{where}: ")
  header = dicom_view(image)
  try:
    return normalize_view(header) if header else "UNKNOWN"
  except DataError:
    return "UNKNOWN"


def _report(text: str) -> tuple[str, str]:
  if not sections(text):
    return " ".join(text.split()), ""
  return split_report(text)


def load_table(root: Path | str, spec: FolderSpec = FolderSpec()) -> pd.DataFrame:
  """The folder at `root`, described by `spec` -> the standard table (see sources.table)."""
  root = Path(root).expanduser().resolve()
  if not root.is_dir():
    raise DataError(f"{root}: image folder not found")
  if not any(root.iterdir()):
    raise DataError(f"{root}: folder is empty (expected {spec.csv} and images)")
  csv_path = Path(spec.csv) if Path(spec.csv).is_absolute() else root / spec.csv
  df = tbl.read_csv(csv_path)
  optional = {k: getattr(spec, k) for k in ("study_id", "view", "age", "sex", "race", "site",
                                            "report", "findings", "impression", "split")}
  tbl.require_columns(df, [spec.path, spec.patient_id,
                           *(c for c in optional.values() if c is not None)], csv_path)
  if len(df) == 0:
    raise DataError(f"{csv_path}: no images listed")
  names = spec.label_names()
  labels = tbl.parse_label_columns(df, _label_columns(spec, df, csv_path), csv_path, names)
  image_root = root / spec.image_dir

  def col(field: str, default: str = "") -> list[str]:
    name = optional[field]
    return df[name].tolist() if name is not None else [default] * len(df)

  cols = {k: [] for k in ("patient_id", "study_id", "image_path", "view", "age_years",
                          "sex_male", "findings", "impression", "split", "source")}
  rows = zip(df[spec.path], df[spec.patient_id], col("study_id"), col("view"), col("age"),
             col("sex"), col("report"), col("findings"), col("impression"), col("split"))
  for i, (rel, patient, study, view, age, sex, report, findings, impression, split) in (
      enumerate(rows)):
    where = tbl.line_of(csv_path, i)
    if rel == "" or patient == "":
      raise DataError(f"{where}: empty {spec.path!r} or {spec.patient_id!r}")
    if report:
      findings, impression = _report(report)
    cols["patient_id"].append(patient)
    # Prefixed with the patient, so per-patient study names ('s1') stay distinct; without a
    # study column the image is its own study.
    cols["study_id"].append(f"{patient}/{study or rel}")
    image = (image_root / rel).resolve()
    cols["image_path"].append(str(image))
    cols["view"].append(_view(view, image, where))
    cols["age_years"].append(tbl.parse_age(age, where=f"{where}: "))
    cols["sex_male"].append(tbl.parse_sex(sex))
    cols["findings"].append(" ".join(findings.split()))
    cols["impression"].append(" ".join(impression.split()))
    cols["split"].append(
        tbl.parse_split(split, where=f"{where}: ") if spec.split is not None else
        tbl.hash_split(patient, validation_fraction=spec.validation_fraction,
                       test_fraction=spec.test_fraction, seed=spec.seed))
    cols["source"].append(where)
  cols["race"], cols["site"] = col("race"), col("site")
  return tbl.finalize(tbl.make_table(cols, labels, names), where=str(csv_path))
