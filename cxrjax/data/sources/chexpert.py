"""CheXpert (Stanford, registration) -> the standard image table.

Layout: ``root`` is the folder that CONTAINS ``CheXpert-v1.0-small/`` (or ``CheXpert-v1.0/``),
or that folder itself::

  CheXpert-v1.0-small/train.csv   Path, Sex, Age, Frontal/Lateral, AP/PA, <14 labels>
  CheXpert-v1.0-small/valid.csv   same columns
  CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg
  CHEXPERT DEMO.csv | .xlsx       optional: PATIENT, GENDER, AGE_AT_CXR, PRIMARY_RACE, ETHNICITY

``Path`` is relative to the parent of the ``CheXpert-v1.0-small`` folder. CheXpert's label
columns come in its own order (No Finding, Enlarged Cardiomediastinum, ...); they are mapped by
NAME onto labels.CHEXPERT_LABELS. Patient = the ``patientNNNNN`` path component; study =
``patientNNNNN/studyN`` (CheXpert numbers studies per patient).

Splits, patient-level: valid.csv -> 'validation'; train.csv patients -> 'train' or 'test' by a
hash of the patient id (``test_fraction``, ``seed``), since CheXpert's own test set is separate.
Demographics: Sex/Age from the CSV row; the DEMO file fills race (PRIMARY_RACE) and any
missing age/sex (AGE_AT_CXR, GENDER).
"""
from __future__ import annotations

import math
from pathlib import Path, PurePosixPath

import pandas as pd

from cxrjax.data.errors import DataError
from cxrjax.data.labels import CHEXPERT_LABELS, normalize_view
from cxrjax.data.sources import table as tbl

FOLDERS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
CSV_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS)
DEMO_NAMES = ("CHEXPERT DEMO.csv", "CHEXPERT DEMO.xlsx", "chexpert_demo.csv")
DEMO_COLUMNS = ("PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE")


def _dataset_dir(root: Path) -> Path:
  """The folder holding train.csv: root itself or root/CheXpert-v1.0[-small]."""
  for d in (root, *(root / f for f in FOLDERS)):
    if (d / "train.csv").is_file() or (d / "valid.csv").is_file():
      return d
  raise DataError(f"{root}: no CheXpert train.csv/valid.csv found (looked in {root} and "
                  f"{', '.join(str(root / f) for f in FOLDERS)})")


def _read_demo(path: Path) -> pd.DataFrame:
  if path.suffix.lower() == ".xlsx":
    try:
      import openpyxl  # noqa: F401  (pandas' xlsx engine)
    except ImportError:
      raise DataError(f"{path}: reading .xlsx needs openpyxl (pip install openpyxl), or save "
                      "the sheet as CSV beside it") from None
    try:
      df = pd.read_excel(path, dtype=str).fillna("")
    except Exception as e:
      raise DataError(f"{path}: cannot read spreadsheet ({type(e).__name__}: {e})") from e
    df.columns = [str(c).strip() for c in df.columns]
    df = df.apply(lambda col: col.str.strip())
  else:
    df = tbl.read_csv(path)
  tbl.require_columns(df, DEMO_COLUMNS, path)
  return df.drop_duplicates("PATIENT").set_index("PATIENT")


def _view(frontal_lateral: str, ap_pa: str, *, where: str) -> str:
  kind = frontal_lateral.strip().lower()
  if kind == "lateral":
    return "L"
  if kind not in ("frontal", ""):
    raise DataError(f"{where}Frontal/Lateral {frontal_lateral!r} is not Frontal or Lateral")
  view = normalize_view(ap_pa, where=where)
  return "UNKNOWN" if view == "L" else view  # a 'Frontal' row cannot be lateral: distrust it


def _read_split_csv(path: Path, data_dir: Path, demo: pd.DataFrame | None) -> pd.DataFrame:
  df = tbl.read_csv(path)
  tbl.require_columns(df, CSV_COLUMNS, path)
  labels = tbl.parse_label_columns(df, {n: n for n in CHEXPERT_LABELS}, path)
  cols = {k: [] for k in ("patient_id", "study_id", "image_path", "view", "age_years",
                          "sex_male", "race", "source")}
  for i, r in enumerate(df.to_dict("records")):
    where = tbl.line_of(path, i)
    rel = PurePosixPath(r["Path"].replace("\\", "/"))
    parts = rel.parts
    patient = next((p for p in parts if p.startswith("patient")), None)
    if patient is None or parts.index(patient) + 2 >= len(parts):
      raise DataError(f"{where}: Path {r['Path']!r} is not .../patientN/studyN/<image>")
    study = parts[parts.index(patient) + 1]
    # Path starts with the dataset folder's name, so it is relative to that folder's parent.
    base = data_dir.parent if parts[0] == data_dir.name else data_dir
    age = tbl.parse_age(r["Age"], where=f"{where}: ")
    sex = tbl.parse_sex(r["Sex"])
    race = ""
    if demo is not None and patient in demo.index:
      d = demo.loc[patient]
      race = d["PRIMARY_RACE"]
      if math.isnan(age):
        age = tbl.parse_age(d["AGE_AT_CXR"], where=f"demographics of {patient}: ")
      if math.isnan(sex):
        sex = tbl.parse_sex(d["GENDER"])
    cols["patient_id"].append(patient)
    cols["study_id"].append(f"{patient}/{study}")
    cols["image_path"].append(str(base.joinpath(*parts)))
    cols["view"].append(_view(r["Frontal/Lateral"], r["AP/PA"], where=f"{where}: "))
    cols["age_years"].append(age)
    cols["sex_male"].append(sex)
    cols["race"].append(race)
    cols["source"].append(where)
  cols["site"] = ["Stanford"] * len(df)
  return tbl.make_table(cols, labels)


def load_table(root: Path | str, *, test_fraction: float = 0.1, seed: int = 0,
               demographics: Path | str | None = None) -> pd.DataFrame:
  """The CheXpert download at `root` -> the standard table (see sources.table).

  test_fraction: share of train.csv PATIENTS held out as 'test' (hash of the patient id).
  demographics: the CHEXPERT DEMO file; default: looked for in root and the dataset folder.
  """
  root = Path(root).expanduser().resolve()
  if not root.is_dir():
    raise DataError(f"{root}: CheXpert folder not found")
  data_dir = _dataset_dir(root)
  demo = None
  if demographics is not None:
    demo = _read_demo(Path(demographics))
  else:
    for d in (root, data_dir, root.parent):
      found = [d / n for n in DEMO_NAMES if (d / n).is_file()]
      if found:
        demo = _read_demo(found[0])
        break
  parts = []
  train_csv, valid_csv = data_dir / "train.csv", data_dir / "valid.csv"
  if train_csv.is_file():
    t = _read_split_csv(train_csv, data_dir, demo)
    t["split"] = [tbl.hash_split(p, validation_fraction=0.0, test_fraction=test_fraction,
                                 seed=seed) for p in t.patient_id]
    parts.append(t)
  if valid_csv.is_file():
    v = _read_split_csv(valid_csv, data_dir, demo)
    v["split"] = "validation"
    parts.append(v)
  table = pd.concat(parts, ignore_index=True)
  return tbl.finalize(table, where=f"{train_csv} + {valid_csv}")
