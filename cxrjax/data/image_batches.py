"""One image per study for the training loop: the adapter every image system puts on a
StudyPipeline (data.pipeline), and the row view that restricts a source to some of its studies."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from cxrjax.data import usable
from cxrjax.data.pipeline import StudyPipeline


class RowSubset:
  """Random-access view of rows `rows` of a source (len and getitem, what StudyPipeline reads)."""

  def __init__(self, source, rows: np.ndarray):
    self.source, self.rows = source, np.asarray(rows)

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i):
    return self.source[int(self.rows[i])]


class ImageBatches:
  """A StudyPipeline's batches as {'image': (B, S, S) uint8, the first kept view of each study}
  plus, with labels=True, 'labels': (B, C) float32 from the pipeline (NaN = unlabelled, and all
  NaN for a study with no kept view: no image, so no targets), plus per-row arrays looked up by
  each study's position (the pipeline's 'index', mapped through `rows` when the pipeline reads a
  RowSubset), plus '_mask' (B,) bool with with_mask (eval mode: a real study with a kept view).
  The loop's BatchIterator.

  With labels=True the first batch is checked too: when no study in it has a known label (all
  NaN after the uncertain policy) and neither has any in a sample of the source, a DataError says
  why (data.usable), instead of a stage training on a loss of 0.
  """

  def __init__(self, pipeline: StudyPipeline, *, labels: bool = True,
               per_row: Mapping[str, np.ndarray] | None = None, rows: np.ndarray | None = None,
               with_mask: bool = False):
    self.pipeline, self.labels, self.with_mask = pipeline, labels, with_mask
    self.per_row = {k: np.asarray(v) for k, v in (per_row or {}).items()}
    self.rows = None if rows is None else np.asarray(rows)
    self._checked = not labels

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    b = next(self.pipeline)
    has_view = b["view_mask"][:, 0]
    out = {"image": b["images"][:, 0]}
    if self.labels:
      out["labels"] = np.where(has_view[:, None], b["labels"], np.nan).astype(np.float32)
      if not self._checked:
        self._checked = True
        if not np.isfinite(out["labels"]).any():
          self._check_labels()
    if self.per_row:
      rows = b["index"] if self.rows is None else self.rows[b["index"]]
      out.update({k: v[rows] for k, v in self.per_row.items()})
    if self.with_mask:
      out["_mask"] = b["_mask"] & has_view
    return out

  def _check_labels(self) -> None:
    from cxrjax.data.features import label_names  # late: it imports TFDS
    source, uncertain = self.pipeline.source, self.pipeline.config.uncertain
    sampled, known, unsure = usable.sample_has_labels(source, uncertain)
    if not known:
      raise usable.no_label_error(sampled, unsure, uncertain, label_names(source))

  def get_state(self) -> dict:
    return self.pipeline.get_state()

  def set_state(self, state: dict) -> None:
    self.pipeline.set_state(state)
    self._checked = not self.labels
