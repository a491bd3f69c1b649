"""The user's tabular table for a real dataset: one row per study or per patient, read and checked.

  data.table         path of a .csv or .parquet file
  data.table_id      'study_id' or 'patient_id': the column that keys a row (a patient's row is
                     shared by all their studies, as the seed gives every ROI its patient's vector)
  data.table_label   the column holding the class, integers 0..model.num_classes-1
  data.table_columns the feature columns, in order; () = every other column

Every problem is one DataError naming the file and the column (or ids) to fix: a missing file or
column, repeated ids, studies with no row and rows with no study (both ways, as either usually
means the table belongs to another dataset), non-numeric or missing (NaN) values, classes out of
range. The width is checked against model.input_dim by the caller.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from cxrjax.data.errors import DataError

ID_KINDS = ("study_id", "patient_id")
_SHOW = 3


def _read(path: str) -> pd.DataFrame:
  if not os.path.isfile(path):
    raise DataError(f"data.table={path!r}: no such file")
  try:
    if path.endswith(".parquet"):
      return pd.read_parquet(path)
    return pd.read_csv(path, dtype={0: str}, keep_default_na=True)
  except Exception as e:  # pylint: disable=broad-except  (the reader's own message, on one line)
    raise DataError(f"data.table={path!r} cannot be read as {'parquet' if path.endswith('.parquet') else 'CSV'}: "
                    f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


def _few(values) -> str:
  values = list(values)
  return ", ".join(map(str, values[:_SHOW])) + (f" (and {len(values) - _SHOW} more)" if len(values) > _SHOW else "")


def read_table(dc, study_ids: np.ndarray, patient_ids: np.ndarray, num_classes: int
               ) -> tuple[np.ndarray, np.ndarray]:
  """(tabular (N, D) float32, labels (N,) int32) for the studies, row-aligned with study_ids."""
  path, key, label = dc.table, dc.table_id, dc.table_label
  if key not in ID_KINDS:
    raise DataError(f"data.table_id={key!r}; choose one of {ID_KINDS}")
  df = _read(path)
  for field, column in (("data.table_id", key), ("data.table_label", label)):
    if column not in df.columns:
      raise DataError(f"{path}: no column {column!r} ({field}); it has {_few(df.columns)}")
  df[key] = df[key].astype(str)
  repeated = df[key][df[key].duplicated()].unique()
  if len(repeated):
    raise DataError(f"{path}: column {key!r} repeats ids {_few(repeated)}; one row per id")
  columns = list(dc.table_columns) or [c for c in df.columns if c not in (key, label)]
  absent = [c for c in columns if c not in df.columns]
  if absent:
    raise DataError(f"{path}: data.table_columns names {_few(absent)}, not columns of the table")
  wanted = np.asarray(study_ids if key == "study_id" else patient_ids).astype(str)
  have = set(df[key])
  missing = sorted({w for w in wanted if w not in have})
  if missing:
    raise DataError(f"{path}: {len(missing)} {key}(s) of the images have no row in the table "
                    f"(column {key!r}), e.g. {_few(missing)}")
  extra = sorted(have - set(wanted))
  if extra:
    raise DataError(f"{path}: {len(extra)} row(s) name a {key} with no study in the dataset "
                    f"(column {key!r}), e.g. {_few(extra)}; remove them or check data.builder")
  df = df.set_index(key).loc[wanted]
  for column in columns:
    values = pd.to_numeric(df[column], errors="coerce")
    bad = values.isna() & df[column].notna()
    if bad.any():
      first = df.index[bad.to_numpy()][0]
      raise DataError(f"{path}: column {column!r} is not numeric ({df[column][bad].iloc[0]!r} "
                      f"for {key} {first})")
    if values.isna().any():
      first = df.index[values.isna().to_numpy()][0]
      raise DataError(f"{path}: column {column!r} has missing (NaN) values, e.g. for {key} "
                      f"{first}; impute or drop them first")
    df[column] = values
  classes = pd.to_numeric(df[label], errors="coerce")
  ok = classes.notna() & (classes == classes.round()) & (classes >= 0) & (classes < num_classes)
  if not ok.all():
    first = df.index[~ok.to_numpy()][0]
    raise DataError(f"{path}: column {label!r} must hold classes 0..{num_classes - 1} "
                    f"(model.num_classes); {key} {first} has {df[label][~ok].iloc[0]!r}")
  return df[columns].to_numpy(np.float32), classes.to_numpy().astype(np.int32)
