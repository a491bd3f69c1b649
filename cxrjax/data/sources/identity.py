"""Image identity in a table: one image listed twice, and one file under two patients.

Two checks, both about what a CSV row points at rather than what it says:

* ``drop_repeated_rows``: rows naming the same image path. Rows that agree on every field are one
  image listed twice (a CSV concatenated with itself, a copy-paste): the first is kept and the
  others are returned to be reported. Rows that disagree (labels 0 then 1, two patient ids, two
  splits) cannot be resolved by a rule, so they are a DataError naming both CSV lines and the
  fields that differ, whatever ``skip_bad`` says: which row is right is for the user to decide.
* ``ContentIndex``: the same bytes under two paths (a file copied into two patients' folders).
  Across splits that is leakage the patient-level split cannot see; the builder hashes each file
  it reads and asks the index, which refuses (or, under ``skip_bad``, leaves the later copy out).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pandas as pd

from cxrjax.data.errors import DataError


def _same(a, b) -> bool:
  if isinstance(a, float) and isinstance(b, float):
    return a == b or (math.isnan(a) and math.isnan(b))
  return a == b


def _show(v) -> str:
  """A cell as the user wrote it: 1 not 1.0, blank for NaN, strings quoted."""
  if isinstance(v, (float, int)) and not isinstance(v, bool):
    v = float(v)
    return "blank" if math.isnan(v) else f"{v:g}"
  return repr(str(v))


def drop_repeated_rows(table: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, str, str]]]:
  """(table without repeated rows, [(image path, CSV line, reason)] of the rows dropped).

  Rows with the same ``image_path`` must agree on every column but ``source``; a disagreement
  is a DataError naming the two lines and up to three differing columns.
  """
  repeated = table.image_path.duplicated(keep=False)
  if not repeated.any():
    return table, []
  fields = [c for c in table.columns if c != "source"]
  dropped, drop_index = [], []
  for path, rows in table[repeated].groupby("image_path", sort=False):
    first = rows.iloc[0]
    for index, row in rows.iloc[1:].iterrows():
      differ = [c for c in fields if not _same(first[c], row[c])]
      if differ:
        shown = "; ".join(f"{c} {_show(first[c])} vs {_show(row[c])}" for c in differ[:3])
        more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
        raise DataError(
            f"{row.source}: image {path} is listed again with other values than at "
            f"{first.source}: {shown}{more}; keep one row per image (or make the rows identical)")
      dropped.append((str(path), str(row.source), f"exact repeat of {first.source}; kept once"))
      drop_index.append(index)
  return table.drop(index=drop_index), dropped


def file_digest(path: str | Path) -> str:
  """SHA-1 of the file's bytes (identical files, not merely identical pixels)."""
  h = hashlib.sha1()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


class ContentIndex:
  """Remembers (split, patient, CSV line) of each file content seen while a dataset is written.

  ``check`` returns None for a new content or a copy within the same split, and for a copy in
  another split raises a DataError (``skip`` False) or returns the reason to log (``skip``
  True, the caller leaves the image out).
  """

  def __init__(self):
    self.seen: dict[str, tuple[str, str, str, str]] = {}

  def check(self, path: str, *, split: str, patient: str, source: str, skip: bool) -> str | None:
    try:
      digest = file_digest(path)
    except OSError:  # unreadable files are reported by the image reader
      return None
    first = self.seen.setdefault(digest, (str(path), split, patient, source))
    if first[1] == split:
      return None
    reason = (f"same file content as {first[0]} ({first[3]}, patient {first[2]!r}, split "
              f"{first[1]}) but here in split {split} (patient {patient!r}): one image in two "
              f"splits leaks between them")
    if skip:
      return reason + "; this copy left out"
    raise DataError(f"{path}: {reason}; remove one of the rows, or give both the same patient id "
                    f"(listed at {source})")
