"""Studies of the standard table -> examples of the study feature spec (data/features.py).

This is the part every real-data TFDS builder shares: group the table into studies, decode and
resize each view, encode it (JPEG or PNG), and carry labels, demographics and report along. Under
``skip_bad`` an image that is missing or cannot be decoded is logged (path, reason) and left
out; a study left with no image is dropped. Otherwise the first bad image raises a DataError
naming the image file and the CSV line it came from. With a ``ContentIndex`` (sources.identity)
each file read is hashed, and a file whose bytes were already written in another split is refused
(or, under ``skip_bad``, left out and logged).
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from cxrjax.data.errors import DataError
from cxrjax.data.features import encode_image
from cxrjax.data.sources.identity import ContentIndex
from cxrjax.data.sources.images import load_image, resize_square
from cxrjax.data.sources.table import SkipLog, Study, group_studies, label_columns


def _float(v) -> float:
  v = float(v)
  return math.nan if math.isnan(v) else v


def study_example(study: Study, *, image_size: int, skip_log: SkipLog | None = None,
                  encoding: str = "jpeg", contents: ContentIndex | None = None) -> dict | None:
  """One Study -> a study_features() example dict, or None when skip_log took every image."""
  images, views = [], []
  for row in study.rows.itertuples(index=False):
    try:
      img = load_image(row.image_path)
    except DataError as e:
      if skip_log is None:
        raise DataError(f"{e} (listed at {row.source})") from e
      skip_log.add(row.image_path, str(e), row.source)
      continue
    if contents is not None:
      leak = contents.check(row.image_path, split=study.split, patient=study.patient_id,
                            source=row.source, skip=skip_log is not None)
      if leak is not None:
        skip_log.add(row.image_path, leak, row.source, kind="copy in another split")
        continue
    images.append(encode_image(resize_square(img, image_size), encoding))
    views.append(row.view)
  if not images:
    return None
  first = study.first
  labels = np.array([first[n] for n in label_columns(study.rows)], np.float32)
  return {
      "study_id": study.study_id,
      "patient_id": study.patient_id,
      "images": images,
      "views": views,
      "labels": labels,
      "age_years": np.float32(_float(first.age_years)),
      "sex_male": np.float32(_float(first.sex_male)),
      "race": str(first.race),
      "site": str(first.site),
      "findings": str(first.findings),
      "impression": str(first.impression),
  }


def generate(table: pd.DataFrame, split: str, *, image_size: int, max_views: int,
             views: str | Sequence[str] = "*", skip_log: SkipLog | None = None,
             encoding: str = "jpeg", contents: ContentIndex | None = None
             ) -> Iterator[tuple[str, dict]]:
  """(key, example) for each study of `split`; the key is the study id (unique per split)."""
  for study in group_studies(table, max_views=max_views, views=views, split=split):
    ex = study_example(study, image_size=image_size, skip_log=skip_log, encoding=encoding,
                       contents=contents)
    if ex is not None:
      yield study.study_id, ex
