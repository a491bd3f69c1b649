"""MIMIC-CXR-JPG v2.0.0 (PhysioNet, credentialed) -> the standard image table.

Layout under ``root`` (the unpacked ``mimic-cxr-jpg/2.0.0`` folder), CSVs plain or ``.gz``::

  mimic-cxr-2.0.0-metadata.csv   dicom_id, subject_id, study_id, PerformedProcedureStepDescription,
                                 ViewPosition, Rows, Columns, StudyDate, StudyTime, ...
  mimic-cxr-2.0.0-chexpert.csv   subject_id, study_id, <14 labels, alphabetical>
  mimic-cxr-2.0.0-negbio.csv     same columns, NegBio labeler
  mimic-cxr-2.0.0-split.csv      dicom_id, study_id, subject_id, split (train/validate/test)
  files/p10/p10000032/s50414267/02aa804e-....jpg
  files/p10/p10000032/s50414267.txt            optional report (MIMIC-CXR's mimic-cxr-reports;
                                               also looked for under mimic-cxr-reports/files/)
  patients.csv, admissions.csv                 optional MIMIC-IV hosp tables (root or root/hosp/):
                                               subject_id, gender, anchor_age, anchor_year / race

Age at the study is anchor_age + (StudyDate year - anchor_year): MIMIC shifts both dates into
the same de-identified timeline. Race is the subject's most frequent admissions.race.
Studies the labeler file lacks keep NaN labels (no information), as torchxrayvision does.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from cxrjax.data.errors import DataError
from cxrjax.data.labels import CHEXPERT_LABELS, normalize_view
from cxrjax.data.sources import table as tbl
from cxrjax.data.sources.reports import split_report

LABELERS = ("chexpert", "negbio")
PREFIX = "mimic-cxr-2.0.0-"
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")


def _csv(root: Path, name: str, *, dirs=("",), required: bool = True) -> Path | None:
  names = [str(Path(d) / f"{name}{ext}") for d in dirs for ext in (".csv.gz", ".csv")]
  try:
    return tbl.find_file(root, names, what=f"{name} table")
  except DataError:
    if required:
      raise
    return None


def study_dir(root: Path, subject_id: str, study_id: str) -> Path:
  """root/files/pXX/pSUBJECT/sSTUDY: XX is the subject id's first two digits."""
  return root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}"


def _read_report(root: Path, subject_id: str, study_id: str) -> tuple[str, str]:
  for base in (root, root / "mimic-cxr-reports"):
    path = study_dir(base, subject_id, study_id).with_suffix(".txt")
    if path.is_file():
      return split_report(path.read_text(errors="replace"))
  return "", ""


def _labels(root: Path, labeler: str) -> dict[str, np.ndarray]:
  """study_id -> (14,) labels from the chosen labeler's CSV."""
  path = _csv(root, f"{PREFIX}{labeler}")
  df = tbl.read_csv(path)
  tbl.require_columns(df, ("subject_id", "study_id", *CHEXPERT_LABELS), path)
  values = tbl.parse_label_columns(df, {n: n for n in CHEXPERT_LABELS}, path)
  return dict(zip(df.study_id.tolist(), values))


def _demographics(root: Path) -> tuple[dict[str, tuple[float, float, float]], dict[str, str]]:
  """subject -> (sex_male, anchor_age, anchor_year) and subject -> race; empty if absent."""
  people, races = {}, {}
  path = _csv(root, "patients", dirs=("", "hosp"), required=False)
  if path is not None:
    df = tbl.read_csv(path)
    tbl.require_columns(df, ("subject_id", "gender", "anchor_age", "anchor_year"), path)
    for i, r in enumerate(df.itertuples(index=False)):
      where = f"{tbl.line_of(path, i)}: "
      people[r.subject_id] = (tbl.parse_sex(r.gender), tbl.parse_age(r.anchor_age, where=where),
                              tbl.parse_age(r.anchor_year, where=where))
  path = _csv(root, "admissions", dirs=("", "hosp"), required=False)
  if path is not None:
    df = tbl.read_csv(path)
    tbl.require_columns(df, ("subject_id", "race"), path)
    df = df[df.race != ""]
    # Most frequent race per subject; ties broken by the earliest row.
    counts = df.groupby(["subject_id", "race"], sort=False).size().reset_index(name="n")
    best = counts.sort_values("n", ascending=False, kind="stable").drop_duplicates("subject_id")
    races = dict(zip(best.subject_id, best.race))
  return people, races


def _age(study_date: str, person: tuple[float, float, float] | None) -> float:
  if person is None or len(study_date) < 4 or not study_date[:4].isdigit():
    return math.nan
  _, anchor_age, anchor_year = person
  return anchor_age + (int(study_date[:4]) - anchor_year)


def load_table(root: Path | str, *, labeler: str = "chexpert", reports: bool = True
               ) -> pd.DataFrame:
  """The MIMIC-CXR-JPG download at `root` -> the standard table (see sources.table).

  labeler: 'chexpert' or 'negbio' (which label CSV to read).
  reports: read FINDINGS/IMPRESSION from the report .txt files where present.
  """
  if labeler not in LABELERS:
    raise ValueError(f"labeler must be one of {LABELERS}, got {labeler!r}")
  root = Path(root).expanduser().resolve()
  if not root.is_dir():
    raise DataError(f"{root}: MIMIC-CXR-JPG folder not found")
  meta_path = _csv(root, f"{PREFIX}metadata")
  meta = tbl.read_csv(meta_path)
  tbl.require_columns(meta, METADATA_COLUMNS, meta_path)
  if len(meta) == 0:
    raise DataError(f"{meta_path}: no images listed")
  split_path = _csv(root, f"{PREFIX}split")
  splits = tbl.read_csv(split_path)
  tbl.require_columns(splits, SPLIT_COLUMNS, split_path)
  split_of = {}
  for i, r in enumerate(splits.itertuples(index=False)):
    split_of[r.dicom_id] = tbl.parse_split(r.split, where=f"{tbl.line_of(split_path, i)}: ")
  labels = _labels(root, labeler)
  people, races = _demographics(root)
  dates = meta["StudyDate"].tolist() if "StudyDate" in meta.columns else [""] * len(meta)

  cols = {k: [] for k in ("patient_id", "study_id", "image_path", "view", "age_years",
                          "sex_male", "race", "findings", "impression", "split", "source")}
  label_rows = []
  report_cache: dict[str, tuple[str, str]] = {}
  nan_labels = np.full(len(CHEXPERT_LABELS), np.nan, np.float32)
  for i, r in enumerate(meta.itertuples(index=False)):
    where = tbl.line_of(meta_path, i)
    if r.dicom_id not in split_of:
      raise DataError(f"{where}: dicom_id {r.dicom_id!r} has no row in {split_path}")
    subject, study = r.subject_id, r.study_id
    if reports and study not in report_cache:
      report_cache[study] = _read_report(root, subject, study)
    findings, impression = report_cache.get(study, ("", ""))
    person = people.get(subject)
    cols["patient_id"].append(subject)
    cols["study_id"].append(study)
    cols["image_path"].append(str(study_dir(root, subject, study) / f"{r.dicom_id}.jpg"))
    cols["view"].append(normalize_view(r.ViewPosition, where=f"{where}: "))
    cols["age_years"].append(_age(dates[i], person))
    cols["sex_male"].append(person[0] if person else math.nan)
    cols["race"].append(races.get(subject, ""))
    cols["findings"].append(findings)
    cols["impression"].append(impression)
    cols["split"].append(split_of[r.dicom_id])
    cols["source"].append(where)
    label_rows.append(labels.get(study, nan_labels))
  cols["site"] = ["BIDMC"] * len(meta)  # MIMIC is one hospital (Beth Israel Deaconess)
  table = tbl.make_table(cols, np.stack(label_rows))
  return tbl.finalize(table, where=str(split_path))
