"""Per-image teacher embeddings on disk (CXR-FMKD's targets), aligned to a list of image ids.

Accepted layouts (spec prior_and_fmkd.md B.1; the seed converts Google CXR Foundation TFRecords
to one raw float32 ``.dat`` per image, 1376 values, named after the image):
  * a directory of ``<id>.npy`` files, each a float32 (D,) (or (1, D)) array;
  * a directory of ``<id>.dat`` files, each D raw little-endian float32 values (no header).
    A file of exactly 8 D bytes is refused with a hint: the Glocker bias repository stores the
    same embeddings as float64, and the two formats must not be mixed;
  * one ``.npz`` with ``ids`` (N,) str and ``embeddings`` (N, D) float;
  * a directory of ``<id>.tfrecord`` files as Google's CXR Foundation tool writes them: the
    first record's float feature ``embedding`` (what the seed's ``tfrecord_to_dat.py`` reads),
    decoded without TensorFlow (``cxrjax.data.tf_example``).

``load_embeddings(path, ids, dim)`` returns (len(ids), D) float32 rows in the order of ``ids``
and raises ``DataError`` -- listing the first offending ids/files -- when any image has no
embedding, an id repeats, a vector has the wrong dimension or a value is not finite: nothing is
ever trained on misaligned pairs. Extra embeddings for ids not asked for are ignored (a real
export usually covers more images than one split).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from cxrjax.data.errors import DataError
from cxrjax.data.tf_example import read_float_feature

LAYOUTS = ("auto", "npy", "dat", "npz", "tfrecord")
_DIR_LAYOUTS = ("npy", "dat", "tfrecord")
_SHOW = 5  # offending items listed in an error message


def _first(items: Sequence, n: int = _SHOW) -> str:
  items = list(items)
  more = f" (+{len(items) - n} more)" if len(items) > n else ""
  return ", ".join(map(str, items[:n])) + more


def _as_str(ids) -> list[str]:
  return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]


def detect_layout(path: str) -> str:
  """'npz' for a .npz file; for a directory, 'npy' or 'dat' by the files it holds."""
  if os.path.isfile(path):
    if path.endswith(".npz"):
      return "npz"
    raise DataError(f"teacher embeddings {path}: a single file must be an .npz with 'ids' and "
                    "'embeddings'; per-image files (.npy, .dat, .tfrecord) go in a directory")
  if not os.path.isdir(path):
    raise DataError(f"teacher embeddings {path} does not exist")
  exts = {os.path.splitext(f)[1] for f in os.listdir(path)}
  found = [e for e in _DIR_LAYOUTS if "." + e in exts]
  if len(found) != 1:
    raise DataError(f"teacher embeddings directory {path} must hold one kind of per-image file, "
                    f"<id>.npy, <id>.dat or <id>.tfrecord; found extensions {sorted(exts)}")
  return found[0]


def _check_ids(ids: list[str]) -> None:
  seen, dup = set(), []
  for i in ids:
    if i in seen:
      dup.append(i)
    seen.add(i)
  if dup:
    raise DataError(f"image ids repeat: {_first(dup)}")


def _read_file(path: str, layout: str, dim: int) -> np.ndarray:
  if layout in ("npy", "tfrecord"):
    x = np.load(path, allow_pickle=False) if layout == "npy" else read_float_feature(path)
    if x.ndim == 2 and x.shape[0] == 1:
      x = x[0]
    if x.ndim != 1 or x.shape[0] != dim:
      raise DataError(f"{path}: embedding of shape {x.shape}, expected ({dim},) (teacher.dim)")
    return x.astype(np.float32)
  size = os.path.getsize(path)
  if size != 4 * dim:
    hint = (" -- this is float64 (the Glocker layout); write float32" if size == 8 * dim else "")
    raise DataError(f"{path}: {size} bytes, expected {4 * dim} ({dim} float32 values, "
                    f"teacher.dim){hint}")
  return np.fromfile(path, dtype="<f4")


def _load_npz(path: str, ids: list[str], dim: int) -> np.ndarray:
  with np.load(path, allow_pickle=False) as f:
    missing = {"ids", "embeddings"} - set(f.files)
    if missing:
      raise DataError(f"{path}: missing array(s) {sorted(missing)}; need 'ids' (N,) and "
                      "'embeddings' (N, D)")
    file_ids, emb = _as_str(f["ids"]), np.asarray(f["embeddings"])
  if emb.ndim != 2 or emb.shape[0] != len(file_ids):
    raise DataError(f"{path}: {len(file_ids)} ids but embeddings of shape {emb.shape} (need one "
                    "row per id)")
  if emb.shape[1] != dim:
    raise DataError(f"{path}: embeddings have dimension {emb.shape[1]}, expected {dim} "
                    "(teacher.dim)")
  try:
    _check_ids(file_ids)
  except DataError as e:
    raise DataError(f"{path}: {e}") from None
  row = {i: k for k, i in enumerate(file_ids)}
  absent = [i for i in ids if i not in row]
  if absent:
    raise DataError(f"{path}: {len(absent)} of {len(ids)} images have no embedding; first "
                    f"missing ids: {_first(absent)}; first ids in the file: {_first(file_ids)}")
  return emb[[row[i] for i in ids]].astype(np.float32)


def load_embeddings(path: str, ids: Sequence, dim: int, layout: str = "auto") -> np.ndarray:
  """(len(ids), dim) float32 embeddings of `ids` (str or bytes) from `path`; see module doc."""
  if layout not in LAYOUTS:
    raise DataError(f"embedding layout {layout!r}; choose one of {LAYOUTS}")
  ids = _as_str(ids)
  _check_ids(ids)
  layout = detect_layout(path) if layout == "auto" else layout
  if layout == "npz":
    out = _load_npz(path, ids, dim)
  else:
    files = [os.path.join(path, f"{i}.{layout}") for i in ids]
    absent = [i for i, f in zip(ids, files) if not os.path.isfile(f)]
    if absent:
      present = sorted(f for f in os.listdir(path) if f.endswith("." + layout))
      raise DataError(f"{path}: {len(absent)} of {len(ids)} images have no {layout} embedding "
                      f"file; first missing: {_first(f'{i}.{layout}' for i in absent)}; "
                      f"first files there: {_first(present)}")
    out = np.stack([_read_file(f, layout, dim) for f in files]) if files else \
        np.zeros((0, dim), np.float32)
  bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
  if bad.size:
    raise DataError(f"{path}: non-finite values in the embeddings of {_first(ids[k] for k in bad)}")
  return out


def write_embeddings(path: str, ids: Sequence, embeddings: np.ndarray, layout: str = "npy") -> None:
  """Writes (N, D) `embeddings` for `ids` in `layout` ('npy', 'dat' or 'npz'; the seed's
  layouts). Files are written to a temporary name and renamed, so a crash leaves no half file."""
  ids = _as_str(ids)
  x = np.asarray(embeddings, np.float32)
  if x.ndim != 2 or x.shape[0] != len(ids):
    raise ValueError(f"need (N={len(ids)}, D) embeddings, got {x.shape}")
  _check_ids(ids)
  if layout == "npz":
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, ids=np.array(ids), embeddings=x)
    os.replace(tmp, path)
    return
  if layout not in ("npy", "dat"):
    raise ValueError(f"layout must be 'npy', 'dat' or 'npz', got {layout!r}")
  os.makedirs(path, exist_ok=True)
  for i, row in zip(ids, x):
    final = os.path.join(path, f"{i}.{layout}")
    tmp = final + ".tmp"
    with open(tmp, "wb") as f:
      if layout == "npy":
        np.save(f, row)
      else:
        row.astype("<f4").tofile(f)
    os.replace(tmp, final)
