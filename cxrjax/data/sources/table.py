"""The standard image table every real-data source produces, its checks and shared parsers.

A source (``mimic_cxr``, ``chexpert``, ``folder``) turns a user's download into one pandas
DataFrame with ONE ROW PER IMAGE and these columns (``TABLE_COLUMNS``):

  patient_id, study_id : str
  image_path           : str, absolute
  view                 : str in labels.VIEWS
  <label columns>      : float in {1, 0, -1, NaN}, one per label name of the dataset, in its order
                         (the 14 labels.CHEXPERT_LABELS unless a source declares its own;
                         ``label_columns`` lists them)
  age_years, sex_male  : float, NaN when unknown
  race, site           : str, '' when unknown
  findings, impression : str, '' when there is no report
  split                : str in SPLITS
  source               : str, 'FILE line N' of the row the image came from (for error messages)

``finalize`` coerces and checks a table (views known, splits known, no patient in two splits, an
image listed twice kept once or, with conflicting values, refused: sources.identity).
``group_studies`` turns it into studies of up to K views, frontal first.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from cxrjax.data.errors import DataError
from cxrjax.data.labels import CHEXPERT_LABELS, VIEWS, parse_label
from cxrjax.data.sources.identity import drop_repeated_rows

SPLITS: tuple[str, ...] = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation",
                  "validate": "validation", "valid": "validation", "val": "validation",
                  "dev": "validation", "test": "test", "testing": "test"}
TEXT_COLUMNS = ("patient_id", "study_id", "image_path", "view", "race", "site", "findings",
                "impression", "split", "source")
# Every column but the labels, which sit between 'view' and 'age_years'.
FIXED_COLUMNS: tuple[str, ...] = (
    "patient_id", "study_id", "image_path", "view", "age_years", "sex_male", "race", "site",
    "findings", "impression", "split", "source")
TABLE_COLUMNS: tuple[str, ...] = (*FIXED_COLUMNS[:4], *CHEXPERT_LABELS, *FIXED_COLUMNS[4:])
# Within a study: PA, then AP, then lateral, then unknown (labels.VIEWS order).
_VIEW_RANK = {v: i for i, v in enumerate(VIEWS)}
FRONTAL_VIEWS = ("PA", "AP")


# --------------------------------------------------------------------------- #
# reading CSVs
# --------------------------------------------------------------------------- #
def line_of(path: Path | str, row: int) -> str:
  """'FILE line N' for the 0-based data row `row` of a CSV with one header line."""
  return f"{path} line {row + 2}"


def _not_utf8(path: Path, error: UnicodeDecodeError) -> DataError:
  """The line holding the first byte that is not UTF-8, and what to do about it. Guessing the
  encoding instead would read any bytes as Latin-1 and turn names into mojibake without a word."""
  import gzip
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    for number, line in enumerate(f, start=1):
      try:
        line.decode("utf-8")
      except UnicodeDecodeError as e:
        byte = line[e.start:e.start + 1].hex()
        return DataError(f"{path} line {number}: not UTF-8 text (byte 0x{byte} at column "
                         f"{e.start + 1}); re-save the CSV as UTF-8 (e.g. 'CSV UTF-8' in a "
                         f"spreadsheet, or iconv -f latin1 -t utf-8)")
  return DataError(f"{path}: not UTF-8 text ({error}); re-save the CSV as UTF-8")


def read_csv(path: Path | str) -> pd.DataFrame:
  """Reads a CSV (gzip by suffix; UTF-8, a byte-order mark allowed) with every cell as a
  stripped str ('' for blank).

  Strings, not pandas' guesses, so ids keep leading zeros and label cells are parsed by one
  function that can name the bad cell.
  """
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: file not found")
  try:
    df = pd.read_csv(path, dtype=str, keep_default_na=False, compression="infer",
                     encoding="utf-8-sig")
  except UnicodeDecodeError as e:
    raise _not_utf8(path, e) from None
  except Exception as e:  # pandas raises several types for malformed files
    raise DataError(f"{path}: cannot read CSV ({type(e).__name__}: {e})") from e
  df.columns = [str(c).strip() for c in df.columns]
  return df.apply(lambda col: col.str.strip())


def find_file(root: Path, names: Sequence[str], *, what: str) -> Path:
  """The first of `names` (relative to root) that exists, else a DataError listing them."""
  for name in names:
    if (root / name).is_file():
      return root / name
  raise DataError(f"{root}: no {what} found (looked for {', '.join(names)})")


def require_columns(df: pd.DataFrame, columns: Sequence[str], path: Path | str) -> None:
  missing = [c for c in columns if c not in df.columns]
  if missing:
    raise DataError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")


def parse_label_columns(df: pd.DataFrame, columns: Mapping[str, str | None],
                        path: Path | str, names: Sequence[str] = CHEXPERT_LABELS) -> np.ndarray:
  """Label cells -> (N, len(names)) float32 in `names` order (CheXpert's by default).

  columns maps each label name to its CSV column, or None where the source lacks that label
  (NaN). A cell outside {1, 0, -1, blank} is a DataError naming file, line, column.
  """
  out = np.full((len(df), len(names)), np.nan, np.float32)
  for j, name in enumerate(names):
    col = columns.get(name)
    if col is None:
      continue
    for i, cell in enumerate(df[col].tolist()):
      out[i, j] = parse_label(cell, where=f"{line_of(path, i)}, column {col!r}: ")
  return out


def parse_age(raw: str, *, where: str) -> float:
  """'' / 'unknown' -> NaN; '90+' -> 90; anything else non-numeric is a DataError."""
  s = str(raw).strip().rstrip("+")
  if s == "" or s.lower() in ("nan", "unknown", "na", "n/a"):
    return math.nan
  try:
    return float(s)
  except ValueError:
    raise DataError(f"{where}age {raw!r} is not a number") from None


def parse_sex(raw: str) -> float:
  """Male -> 1.0, Female -> 0.0, anything else (Unknown, blank) -> NaN."""
  s = str(raw).strip().lower()
  if s in ("m", "male", "man"):
    return 1.0
  if s in ("f", "female", "woman"):
    return 0.0
  return math.nan


def parse_split(raw: str, *, where: str) -> str:
  key = str(raw).strip().lower()
  if key not in _SPLIT_ALIASES:
    raise DataError(f"{where}split {raw!r} is not one of {sorted(_SPLIT_ALIASES)}")
  return _SPLIT_ALIASES[key]


def hash_split(patient_id: str, *, validation_fraction: float, test_fraction: float,
               seed: int = 0) -> str:
  """A patient's split from a hash of (seed, patient id): stable across runs and machines,
  independent of row order, and the same for every image of the patient."""
  if not (0 <= validation_fraction and 0 <= test_fraction
          and validation_fraction + test_fraction < 1):
    raise ValueError("need 0 <= validation_fraction, test_fraction and their sum < 1; got "
                     f"{validation_fraction}, {test_fraction}")
  digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  if u < test_fraction:
    return "test"
  if u < test_fraction + validation_fraction:
    return "validation"
  return "train"


# --------------------------------------------------------------------------- #
# the table
# --------------------------------------------------------------------------- #
def make_table(columns: Mapping[str, object], labels: np.ndarray,
               label_names: Sequence[str] = CHEXPERT_LABELS) -> pd.DataFrame:
  """Assembles a table from per-column arrays/lists (any missing demographic/report column
  gets its 'unknown' value) and the (N, C) label matrix of `label_names`, in table order."""
  n = labels.shape[0]
  if labels.shape[1] != len(label_names):
    raise ValueError(f"{labels.shape[1]} label columns for {len(label_names)} names")
  if clash := [c for c in label_names if c in FIXED_COLUMNS]:
    raise DataError(f"label name(s) {clash} clash with the table's own columns; rename them")
  data = dict(columns)
  for j, name in enumerate(label_names):
    data[name] = labels[:, j].astype(np.float64)
  defaults = {"age_years": math.nan, "sex_male": math.nan, "race": "", "site": "",
              "findings": "", "impression": "", "split": "", "source": ""}
  for name, value in defaults.items():
    data.setdefault(name, [value] * n)
  order = (*FIXED_COLUMNS[:4], *label_names, *FIXED_COLUMNS[4:])
  return pd.DataFrame({c: data[c] for c in order})


def label_columns(table: pd.DataFrame) -> tuple[str, ...]:
  """The table's label names, in order: every column that is not one of FIXED_COLUMNS."""
  return tuple(c for c in table.columns if c not in FIXED_COLUMNS and not c.startswith("_"))


def check_patient_splits(table: pd.DataFrame, *, where: str) -> None:
  """DataError if any patient has images in two splits (leakage)."""
  per_patient = table.groupby("patient_id")["split"].nunique()
  leaked = per_patient[per_patient > 1]
  if len(leaked):
    pid = leaked.index[0]
    splits = sorted(table.loc[table.patient_id == pid, "split"].unique())
    row = table.loc[table.patient_id == pid, "source"].iloc[0]
    raise DataError(f"{where}: {len(leaked)} patient(s) appear in more than one split, e.g. "
                    f"patient {pid!r} in {splits} ({row}); splits must be patient-level")


def finalize(table: pd.DataFrame, *, where: str) -> pd.DataFrame:
  """Coerces dtypes and checks the table invariants; returns a new table sorted by
  (split, patient, study, image) so downstream order never depends on CSV order.

  An image listed twice with identical values is kept once; the repeats dropped are in
  ``result.attrs["repeated"]`` as (image path, CSV line, reason) for the builder to report.
  Listed twice with different values, it is a DataError (sources.identity).
  """
  if len(table) == 0:
    raise DataError(f"{where}: no images listed")
  names = label_columns(table)
  table = table.loc[:, [*FIXED_COLUMNS[:4], *names, *FIXED_COLUMNS[4:]]].copy()
  for col in TEXT_COLUMNS:
    table[col] = table[col].fillna("").astype(str)
  for col in (*names, "age_years", "sex_male"):
    table[col] = table[col].astype(np.float64)
  table, repeated = drop_repeated_rows(table)
  bad_view = ~table.view.isin(VIEWS)
  if bad_view.any():
    r = table[bad_view].iloc[0]
    raise DataError(f"{r.source}: view {r.view!r} is not one of {VIEWS}")
  bad_split = ~table.split.isin(SPLITS)
  if bad_split.any():
    r = table[bad_split].iloc[0]
    raise DataError(f"{r.source}: split {r.split!r} is not one of {SPLITS}")
  empty_id = (table.patient_id == "") | (table.study_id == "")
  if empty_id.any():
    raise DataError(f"{table[empty_id].iloc[0].source}: empty patient or study id")
  check_patient_splits(table, where=where)
  # A study id must belong to one patient; sources that reuse study names per patient
  # (CheXpert's 'study1') already prefix them with the patient.
  owners = table.groupby("study_id")["patient_id"].nunique()
  if (owners > 1).any():
    sid = owners[owners > 1].index[0]
    raise DataError(f"{where}: study {sid!r} is listed under more than one patient")
  out = table.sort_values(["split", "patient_id", "study_id", "image_path"],
                          kind="stable").reset_index(drop=True)
  out.attrs["repeated"] = repeated
  return out


# --------------------------------------------------------------------------- #
# studies
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class Study:
  """One study: its table rows (images), frontal first, at most max_views of them.

  Study-level fields (labels, demographics, report) are read from the first row: sources
  label whole studies (MIMIC) or repeat the labels on every image row (CheXpert).
  """
  study_id: str
  patient_id: str
  split: str
  rows: pd.DataFrame

  @property
  def first(self) -> pd.Series:
    return self.rows.iloc[0]


def select_views(table: pd.DataFrame, views: str | Sequence[str] = "*") -> pd.DataFrame:
  """Rows whose view is in `views` ('*' keeps all; torchxrayvision's wildcard)."""
  if isinstance(views, str):
    views = ("*",) if views == "*" else (views,)
  if "*" in views:
    return table
  unknown = [v for v in views if v not in VIEWS]
  if unknown:
    raise ValueError(f"unknown view(s) {unknown} in view filter; known: {VIEWS} or '*'")
  return table[table.view.isin(views)]


def group_studies(table: pd.DataFrame, *, max_views: int, views: str | Sequence[str] = "*",
                  split: str | None = None) -> list[Study]:
  """Groups a finalized table into studies (optionally of one split).

  Images are filtered by `views`, ordered PA, AP, L, UNKNOWN (ties by path) and cut to
  `max_views`; studies left with no image are dropped. Studies come sorted by study id.
  """
  if max_views < 1:
    raise ValueError(f"max_views must be >= 1, got {max_views}")
  t = select_views(table, views)
  if split is not None:
    t = t[t.split == split]
  t = t.assign(_rank=t.view.map(_VIEW_RANK)).sort_values(
      ["study_id", "_rank", "image_path"], kind="stable")
  out = []
  for sid, rows in t.groupby("study_id", sort=True):
    rows = rows.drop(columns="_rank").head(max_views).reset_index(drop=True)
    out.append(Study(str(sid), str(rows.patient_id.iloc[0]), str(rows.split.iloc[0]), rows))
  return out


# --------------------------------------------------------------------------- #
# skipped images
# --------------------------------------------------------------------------- #
class SkipLog:
  """Images left out of a prepared dataset: bad files under ``skip_bad``, rows listed twice, a
  copy in another split; (path, CSV line, reason) triples, written as skipped.csv."""

  def __init__(self):
    self.entries: list[tuple[str, str, str]] = []
    self.kinds: collections.Counter = collections.Counter()

  def add(self, path: str, reason: str, source: str = "", kind: str = "bad image") -> None:
    self.entries.append((str(path), str(source), str(reason)))
    self.kinds[kind] += 1

  def summary(self) -> str:
    """'2 bad image(s), 1 repeated row(s)'."""
    return ", ".join(f"{n} {kind}(s)" for kind, n in self.kinds.items())

  def __len__(self) -> int:
    return len(self.entries)

  def write(self, directory: Path | str, filename: str = "skipped.csv") -> Path:
    path = Path(directory) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(self.entries, columns=["path", "csv_line", "reason"]).to_csv(path, index=False)
    return path
