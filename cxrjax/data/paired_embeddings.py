"""Paired CXR/CTPA embeddings: the in-memory container, its on-disk forms (readers and
writers) and their checks.

The CXR->CTPA prior learns from pairs (cxr_i, ctpa_i): the CXR embedding is the
condition, the CTPA embedding the diffusion target. PE labels are needed only to
train or evaluate classifiers, so the optional "unlabelled" split has NaN labels.

Every loader returns ``PairedData`` (``dict[str, PairedSplit]``, keys among
``SPLITS``) that has passed ``validate``, or raises one ``DataError`` whose
message names the file and, where one applies, the CSV line or accession.

* ``load_seed_layout`` / ``to_seed_layout``: the seed's layout, ``root/y_{split}.csv``
  plus one ``.npy`` per accession in ``ctpa_dir`` and ``cxr_dir``.
* ``load_npz`` / ``to_npz``: one ``.npz`` with ``{split}_cxr``, ``{split}_ctpa``,
  ``{split}_label`` (may be absent for "unlabelled") and optional ``{split}_ids``.
* ``load_table`` / ``to_table``: parquet or CSV with columns ``split, id, label`` and
  either list-valued ``cxr``/``ctpa`` columns (parquet) or ``cxr_0..``/``ctpa_0..``.

Picking one of these, or the synthetic generator, from a config is ``paired_sources.load``;
this module knows no generator, so generators can build on its container.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from cxrjax.data.errors import DataError

__all__ = ["SPLITS", "REQUIRED_SPLITS", "CSV_COLUMNS", "PairedSplit", "PairedData", "make_split",
           "load_seed_layout", "load_npz", "load_table", "validate", "cxr_accession", "to_seed_layout",
           "to_npz", "to_table"]

SPLITS = ("train", "unlabelled", "valid", "test")
REQUIRED_SPLITS = ("train", "valid", "test")
CSV_COLUMNS = ("CT_Accession_number", "cxr_Accession_number", "PE")
_CT, _CXR, _PE = CSV_COLUMNS


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous
class PairedSplit:
  """One split of paired embeddings.

  cxr: (N, Dx) float32; ctpa: (N, Dc) float32; label: (N,) float32 in {0, 1},
  NaN for unlabelled pairs; ids: (N,) str, the CT accession of each pair; cxr_ids: (N,) str, the
  CXR accession of each pair, or None where the source does not say.
  """
  cxr: np.ndarray
  ctpa: np.ndarray
  label: np.ndarray
  ids: np.ndarray
  cxr_ids: np.ndarray | None = None

  def __len__(self) -> int:
    return int(self.ids.shape[0])

  def take(self, index) -> "PairedSplit":
    """Rows selected by an integer index array or boolean mask, in that order."""
    return PairedSplit(self.cxr[index], self.ctpa[index], self.label[index], self.ids[index],
                       None if self.cxr_ids is None else self.cxr_ids[index])

  def labelled(self) -> "PairedSplit":
    """Rows with a finite label."""
    return self.take(np.isfinite(self.label))


PairedData = dict[str, PairedSplit]


def make_split(cxr, ctpa, label, ids, cxr_ids=None) -> PairedSplit:
  """Coerce array-likes to the container's dtypes (float32 x3, str ids)."""
  return PairedSplit(np.asarray(cxr, np.float32), np.asarray(ctpa, np.float32),
                     np.asarray(label, np.float32), np.asarray(ids).astype(str),
                     None if cxr_ids is None else np.asarray(cxr_ids).astype(str))


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
def _first(items, n: int = 5) -> str:
  items = list(items)
  more = f" and {len(items) - n} more" if len(items) > n else ""
  return ", ".join(repr(str(i)) for i in items[:n]) + more


def _validate_split(name: str, sp: PairedSplit, dims: dict[str, tuple[str, int]]) -> None:
  where = f"split {name!r}"
  for field in ("cxr", "ctpa"):
    x = getattr(sp, field)
    if x.ndim != 2:
      raise DataError(f"{where}: {field} must be 2-D (N, D), found shape {x.shape}")
  if sp.label.ndim != 1 or sp.ids.ndim != 1:
    raise DataError(f"{where}: label and ids must be 1-D, found shapes {sp.label.shape}, {sp.ids.shape}")
  sizes = {f: getattr(sp, f).shape[0] for f in ("cxr", "ctpa", "label", "ids")}
  if len(set(sizes.values())) > 1:
    raise DataError(f"{where}: fields differ in length {sizes}")
  if len(sp) == 0:
    raise DataError(f"{where} is empty")
  for field in ("cxr", "ctpa"):
    x = getattr(sp, field)
    seen = dims.setdefault(field, (name, x.shape[1]))
    if x.shape[1] != seen[1]:
      raise DataError(f"{where}: {field} dim {x.shape[1]} differs from split {seen[0]!r} ({seen[1]})")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
      raise DataError(f"{where}: {field} embedding of id {str(sp.ids[bad[0]])!r} (row {bad[0]}) contains "
                      f"NaN/inf; {bad.size} row(s) affected: {_first(sp.ids[bad])}")
  lab = sp.label
  bad = np.flatnonzero(np.isfinite(lab) & (lab != 0) & (lab != 1))
  if name != "unlabelled":  # only pairs used solely by the prior may lack a label
    bad = np.union1d(bad, np.flatnonzero(~np.isfinite(lab)))
  if bad.size:
    raise DataError(f"{where}: label of id {str(sp.ids[bad[0]])!r} is {lab[bad[0]]}; labels must be 0 or 1 "
                    f"(NaN only in 'unlabelled'); {bad.size} bad row(s): {_first(sp.ids[bad])}")
  ids, counts = np.unique(sp.ids, return_counts=True)
  if (counts > 1).any():
    raise DataError(f"{where}: duplicate id(s) {_first(ids[counts > 1])}")


def validate(data: Mapping[str, PairedSplit], *, required: Sequence[str] = REQUIRED_SPLITS) -> None:
  """Raise ``DataError`` unless ``data`` is usable as is.

  Checks: split names known and ``required`` present; no empty split; one cxr and
  one ctpa dim across all splits; finite embeddings; labels in {0, 1} (NaN only in
  "unlabelled"); unique ids within a split; no id in two splits, on either side: no CT
  accession and (where known) no CXR accession in two splits. The last holds for
  "unlabelled" too: a valid/test pair the prior trained on leaks, and a train pair repeated
  there would be weighted twice.
  """
  unknown = [s for s in data if s not in SPLITS]
  if unknown:
    raise DataError(f"unknown split name(s) {unknown}; expected among {list(SPLITS)}")
  missing = [s for s in required if s not in data]
  if missing:
    raise DataError(f"missing required split(s) {missing}; found {list(data)}")
  dims: dict[str, tuple[str, int]] = {}
  for name, sp in data.items():
    _validate_split(name, sp, dims)
  for a, b in itertools.combinations(data, 2):
    sides = [("CT", data[a].ids, data[b].ids)]
    if data[a].cxr_ids is not None and data[b].cxr_ids is not None:
      sides.append(("CXR", data[a].cxr_ids, data[b].cxr_ids))
    for side, ids_a, ids_b in sides:
      shared = np.intersect1d(ids_a, ids_b)
      if shared.size:
        raise DataError(f"leakage: {shared.size} {side} accession(s) appear in both {a!r} and {b!r}: "
                        f"{_first(shared)}; each study must belong to exactly one split")


def _validated(data: PairedData, source: Path, required: Sequence[str]) -> PairedData:
  """``validate`` with the source file prefixed to the message."""
  try:
    validate(data, required=required)
  except DataError as e:
    raise DataError(f"{source}: {e}") from None
  return data


# --------------------------------------------------------------------------- #
# seed layout: CSV index + one .npy per accession
# --------------------------------------------------------------------------- #
def _load_vector(path: Path, what: str, shapes: dict, where: str) -> np.ndarray:
  """One embedding file -> (D,) float32; (1, D) files (torch ``features[None]``) are flattened."""
  if not path.is_file():
    raise DataError(f"{where}: {what} embedding file not found: {path}")
  try:
    arr = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise DataError(f"{path}: cannot read as a numeric .npy ({e}); {where}") from None
  vec = arr.reshape(-1) if arr.ndim == 2 and arr.shape[0] == 1 else arr
  if vec.ndim != 1 or arr.dtype.kind not in "fiu":
    raise DataError(f"{path}: expected a numeric embedding of shape (D,) or (1, D), found "
                    f"shape {arr.shape} dtype {arr.dtype}; {where}")
  first_path, first_shape = shapes.setdefault(what, (path, vec.shape))
  if vec.shape != first_shape:
    raise DataError(f"{path}: {what} embedding has shape {arr.shape}, expected {first_shape} "
                    f"(as in {first_path.name}); {where}")
  if not np.isfinite(vec).all():
    raise DataError(f"{path}: {what} embedding contains NaN/inf; {where}")
  return vec.astype(np.float32)


def _read_seed_csv(csv: Path, split: str) -> pd.DataFrame:
  if not csv.is_file():
    raise DataError(f"{csv}: index file for split {split!r} not found")
  try:  # str keeps numeric accessions' leading zeros; no NA parsing of ids
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
  except pd.errors.EmptyDataError:
    raise DataError(f"{csv}: file is empty; expected columns {list(CSV_COLUMNS)}") from None
  needed = CSV_COLUMNS[:2] if split == "unlabelled" else CSV_COLUMNS
  missing = [c for c in needed if c not in df.columns]
  if missing:
    raise DataError(f"{csv}: missing column(s) {missing}; expected columns {list(CSV_COLUMNS)}, "
                    f"found {list(df.columns)}")
  if len(df) == 0:
    raise DataError(f"{csv}: no rows, split {split!r} is empty")
  return df


def _parse_label(text: str, split: str, where: str) -> float:
  text = text.strip()
  if text == "" and split == "unlabelled":
    return float("nan")
  try:
    value = float(text)
  except ValueError:
    value = None
  if value not in (0.0, 1.0):
    raise DataError(f"{where}: PE must be 0 or 1, found {text!r}"
                    + ("" if split == "unlabelled" else " (unlabelled pairs go in y_unlabelled.csv)"))
  return value


def load_seed_layout(root, ctpa_dir, cxr_dir, *,
                     splits: Sequence[str] = REQUIRED_SPLITS) -> PairedData:
  """Read the seed's layout; ``root/y_unlabelled.csv`` is added when it exists.

  ``root/y_{split}.csv`` has columns ``CT_Accession_number, cxr_Accession_number, PE``
  (PE may be blank or absent in y_unlabelled.csv); the embeddings are
  ``ctpa_dir/<CT_Accession_number>.npy`` and ``cxr_dir/<cxr_Accession_number>.npy``,
  each (D,) or (1, D). Relative ``ctpa_dir``/``cxr_dir`` are taken relative to ``root``.
  Messages cite CSV lines counting the header as line 1.
  """
  root = Path(root)
  ctpa_dir, cxr_dir = root / ctpa_dir, root / cxr_dir  # an absolute right side wins
  splits = tuple(splits)
  if unknown := [s for s in splits if s not in SPLITS]:
    raise DataError(f"{root}: unknown split name(s) {unknown}; expected among {list(SPLITS)}")
  if "unlabelled" not in splits and (root / "y_unlabelled.csv").is_file():
    splits += ("unlabelled",)
  shapes: dict[str, tuple[Path, tuple]] = {}  # one shape per modality across all splits
  data: PairedData = {}
  for split in splits:
    csv = root / f"y_{split}.csv"
    df = _read_seed_csv(csv, split)
    seen: dict[str, int] = {}
    cxr, ctpa, label, cxr_ids = [], [], [], []
    pe = df[_PE] if _PE in df.columns else [""] * len(df)
    for i, (ct_acc, cxr_acc, pe_text) in enumerate(zip(df[_CT], df[_CXR], pe)):
      where = f"{csv} line {i + 2} ({_CT}={ct_acc!r})"
      ct_acc, cxr_acc = ct_acc.strip(), cxr_acc.strip()
      if not ct_acc or not cxr_acc:
        raise DataError(f"{where}: empty accession number")
      if ct_acc in seen:
        raise DataError(f"{where}: duplicate {_CT} {ct_acc!r}, first on line {seen[ct_acc]}")
      seen[ct_acc] = i + 2
      label.append(_parse_label(pe_text, split, where))
      ctpa.append(_load_vector(ctpa_dir / f"{ct_acc}.npy", "CTPA", shapes, where))
      cxr.append(_load_vector(cxr_dir / f"{cxr_acc}.npy", "CXR", shapes, where))
      cxr_ids.append(cxr_acc)
    data[split] = make_split(np.stack(cxr), np.stack(ctpa), label, list(seen), cxr_ids)
  return _validated(data, root, splits)


# --------------------------------------------------------------------------- #
# npz and table
# --------------------------------------------------------------------------- #
def load_npz(path, *, required: Sequence[str] = REQUIRED_SPLITS) -> PairedData:
  """One .npz with ``{split}_cxr`` (N, Dx), ``{split}_ctpa`` (N, Dc), ``{split}_label`` (N,)
  and optional ``{split}_ids`` (N,) str (CT accessions) and ``{split}_cxr_ids`` (CXR
  accessions); without ids, rows get ids ``"{split}:{i}"`` (so leakage cannot be checked).
  ``unlabelled_label`` may be absent (all NaN)."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: npz file not found")
  if not zipfile.is_zipfile(path):  # np.load would read text as a pickle and talk about that
    raise DataError(f"{path}: not an .npz file (an .npz is a zip archive of .npy arrays, "
                    "e.g. written by numpy.savez)")
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise DataError(f"{path}: cannot read as .npz ({e})") from None
  fields = ("cxr", "ctpa", "label", "ids", "cxr_ids")

  def known(key: str) -> bool:
    return any(key.startswith(s + "_") and key[len(s) + 1:] in fields for s in SPLITS)

  bad = [k for k in arrays if not known(k)]
  if bad:
    raise DataError(f"{path}: unexpected array(s) {bad}; expected '{{split}}_{{field}}' with split in "
                    f"{list(SPLITS)} and field in {list(fields)}")
  data: PairedData = {}
  for split in (s for s in SPLITS if any(k.startswith(s + "_") for k in arrays)):
    need = ("cxr", "ctpa") if split == "unlabelled" else ("cxr", "ctpa", "label")
    if missing := [f"{split}_{f}" for f in need if f"{split}_{f}" not in arrays]:
      raise DataError(f"{path}: missing array(s) {missing}")
    n = len(arrays[f"{split}_cxr"])
    label = arrays.get(f"{split}_label", np.full(n, np.nan))
    ids = arrays.get(f"{split}_ids", np.array([f"{split}:{i}" for i in range(n)]))
    data[split] = make_split(arrays[f"{split}_cxr"], arrays[f"{split}_ctpa"], label, ids,
                             arrays.get(f"{split}_cxr_ids"))
  return _validated(data, path, required)


def _table_matrix(df: pd.DataFrame, name: str, path: Path) -> np.ndarray:
  """(N, D) from a list-valued column ``name`` or flattened ``name_0..name_{D-1}``."""
  if name in df.columns:
    values = df[name].to_numpy()
    for i, v in enumerate(values):
      if v is None or isinstance(v, str) or np.ndim(v) != 1:
        raise DataError(f"{path}: row {i} (id {df['id'].iloc[i]!r}): column {name!r} must hold a "
                        f"list of numbers (list columns need parquet; in CSV use {name}_0, {name}_1, ...)")
      if len(v) != len(values[0]):
        raise DataError(f"{path}: row {i} (id {df['id'].iloc[i]!r}): {name} has length {len(v)}, "
                        f"expected {len(values[0])} as in row 0")
    return np.stack([np.asarray(v, np.float32) for v in values])
  idx = sorted(int(m.group(1)) for c in df.columns if (m := re.fullmatch(rf"{name}_(\d+)", str(c))))
  if not idx:
    raise DataError(f"{path}: no {name!r} embedding; expected a list column {name!r} or "
                    f"columns {name}_0..{name}_{{D-1}}; found {list(df.columns)[:12]}")
  if idx != list(range(len(idx))):
    gaps = sorted(set(range(idx[-1] + 1)) - set(idx))
    raise DataError(f"{path}: flattened columns {name}_0..{name}_{idx[-1]} are missing {gaps[:10]}")
  try:
    return df[[f"{name}_{j}" for j in idx]].to_numpy(np.float32)
  except ValueError as e:
    raise DataError(f"{path}: non-numeric value in the {name}_* columns ({e})") from None


def load_table(path, *, required: Sequence[str] = REQUIRED_SPLITS) -> PairedData:
  """Parquet (``.parquet``/``.pq``) or CSV with columns ``split, id, label`` (label NaN or
  blank only for split "unlabelled"), optional ``cxr_id`` (the CXR accession), and the
  embeddings as list-valued ``cxr``/``ctpa`` columns or flattened ``cxr_0..``/``ctpa_0..``
  columns. Row order is kept per split."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: table file not found")
  try:
    if path.suffix.lower() in (".parquet", ".pq"):
      df = pd.read_parquet(path)
    else:  # ids as str; only blank/NaN labels are missing values
      df = pd.read_csv(path, dtype={"split": str, "id": str, "cxr_id": str}, keep_default_na=False,
                       na_values={"label": ["", "nan", "NaN", "NA"]})
  except Exception as e:  # parquet/CSV readers raise many unrelated types
    raise DataError(f"{path}: cannot read table ({type(e).__name__}: {e})") from None
  if missing := [c for c in ("split", "id", "label") if c not in df.columns]:
    raise DataError(f"{path}: missing column(s) {missing}; expected 'split', 'id', 'label' and "
                    "'cxr'/'ctpa' (lists) or 'cxr_0..'/'ctpa_0..'")
  df = df.reset_index(drop=True)
  df["id"] = df["id"].astype(str)
  label = pd.to_numeric(df["label"], errors="coerce")
  if (bad := np.flatnonzero(label.isna() & df["label"].notna())).size:
    i = bad[0]
    raise DataError(f"{path}: row {i} (id {df['id'].iloc[i]!r}): label {df['label'].iloc[i]!r} is not a number")
  if unknown := sorted(set(df["split"].astype(str)) - set(SPLITS)):
    raise DataError(f"{path}: unknown split value(s) {unknown}; expected among {list(SPLITS)}")
  cxr, ctpa = _table_matrix(df, "cxr", path), _table_matrix(df, "ctpa", path)
  ids, label = df["id"].to_numpy(), label.to_numpy(np.float32)
  cxr_ids = df["cxr_id"].astype(str).to_numpy() if "cxr_id" in df.columns else None
  data = {s: make_split(cxr[m], ctpa[m], label[m], ids[m], None if cxr_ids is None else cxr_ids[m])
          for s in SPLITS if (m := (df["split"] == s).to_numpy()).any()}
  return _validated(data, path, required)


# --------------------------------------------------------------------------- #
# writers: the inverse of each loader
# --------------------------------------------------------------------------- #
def cxr_accession(ct_id: str) -> str:
  """The CXR accession ``to_seed_layout`` pairs with CT accession ``ct_id``."""
  return "9" + ct_id


def to_seed_layout(data: PairedData, root, *, ctpa_dir: str = "ctpa", cxr_dir: str = "cxr"):
  """Write the seed's layout and return (root, ctpa_dir, cxr_dir) as absolute Paths:

  root/y_{split}.csv   CT_Accession_number,cxr_Accession_number,PE (blank PE if NaN)
  ctpa_dir/<CT_Accession_number>.npy    (Dc,) float32
  cxr_dir/<cxr_Accession_number>.npy    (Dx,) float32, the split's cxr_ids, or "9" + CT
                                        accession where the data has none
  """
  root = Path(root).absolute()
  ctpa_path, cxr_path = root / ctpa_dir, root / cxr_dir
  for d in (root, ctpa_path, cxr_path):
    d.mkdir(parents=True, exist_ok=True)
  ct_col, cxr_col, pe_col = CSV_COLUMNS
  for split, sp in data.items():
    if bad := [i for i in sp.ids if not i or "/" in i or i in (".", "..")]:
      raise DataError(f"split {split!r}: id(s) {bad[:5]} cannot be file names")
    cx_ids = list(sp.cxr_ids) if sp.cxr_ids is not None else [cxr_accession(i) for i in sp.ids]
    for ct_id, cx_id, c, x in zip(sp.ids, cx_ids, sp.ctpa, sp.cxr):
      np.save(ctpa_path / f"{ct_id}.npy", c)
      np.save(cxr_path / f"{cx_id}.npy", x)
    pe = ["" if not np.isfinite(v) else str(int(v)) for v in sp.label]
    pd.DataFrame({ct_col: sp.ids, cxr_col: cx_ids, pe_col: pe}).to_csv(root / f"y_{split}.csv", index=False)
  return root, ctpa_path, cxr_path


def to_npz(data: PairedData, path) -> Path:
  """Write ``{split}_cxr/_ctpa/_label/_ids`` (+ ``_cxr_ids`` when known) arrays (uncompressed)
  and return the path."""
  path = Path(path)
  arrays = {}
  for split, sp in data.items():
    arrays.update({f"{split}_cxr": sp.cxr, f"{split}_ctpa": sp.ctpa,
                   f"{split}_label": sp.label, f"{split}_ids": sp.ids.astype(str)})
    if sp.cxr_ids is not None:
      arrays[f"{split}_cxr_ids"] = sp.cxr_ids.astype(str)
  np.savez(path, **arrays)
  return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def to_table(data: PairedData, path, *, flat: bool = False) -> Path:
  """Write one table (parquet, or CSV by suffix) with columns split, id, label (cxr_id when
  known) and the embeddings as list columns ``cxr``/``ctpa`` or, with ``flat`` (required for CSV),
  ``cxr_0..``/``ctpa_0..``."""
  path = Path(path)
  is_csv = path.suffix.lower() == ".csv"
  if is_csv and not flat:
    raise ValueError(f"{path}: CSV cannot hold list columns; pass flat=True")
  frames = []
  for split, sp in data.items():
    cols = {"split": split, "id": sp.ids, "label": sp.label}
    if sp.cxr_ids is not None:
      cols["cxr_id"] = sp.cxr_ids
    for name in ("cxr", "ctpa"):
      x = getattr(sp, name)
      if flat:
        cols.update({f"{name}_{j}": x[:, j] for j in range(x.shape[1])})
      else:
        cols[name] = list(x)
    frames.append(pd.DataFrame(cols))
  df = pd.concat(frames, ignore_index=True)
  if is_csv:
    df.to_csv(path, index=False, float_format="%.9g")  # 9 digits round-trip float32 exactly
  else:
    df.to_parquet(path, index=False)
  return path
