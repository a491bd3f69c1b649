"""Why a batch holds nothing to learn from: a sample of the source, and the error that names the
filter responsible.

A stage whose batches have no usable example trains on nothing without a word (loss 0, gradient
0, AUROC 0). The pipeline (data.pipeline) and the one-image adapter (data.image_batches) look at
the first batch they serve; when it is empty they call here, to tell an unlucky batch from data
that the view filter or the label policy empties, and to say which.
"""
from __future__ import annotations

import collections
from typing import Any, Sequence

import numpy as np

from cxrjax.data.errors import DataError
from cxrjax.data.labels import VIEWS, apply_uncertain_policy

SAMPLE = 256  # studies read (evenly spaced) to decide; the decision is the same at any resume point


def _sample(source: Sequence[Any]) -> list[int]:
  n = len(source)
  return sorted(set(np.linspace(0, n - 1, min(n, SAMPLE)).astype(int).tolist()))


def sample_views(source: Sequence[Any], keep: frozenset[int] | None
                 ) -> tuple[collections.Counter, bool]:
  """(view name -> images in the sample, whether any sampled study has a view in ``keep``)."""
  counts, kept = collections.Counter(), False
  for i in _sample(source):
    views = [int(v) for v in source[i]["views"]]
    counts.update(VIEWS[v] for v in views)
    kept = kept or keep is None or any(v in keep for v in views)
  return counts, kept


def no_view_error(views: Sequence[str] | None, counts: collections.Counter) -> DataError:
  have = ", ".join(f"{v} {c}" for v, c in counts.most_common()) or "none"
  wider = tuple(dict.fromkeys([*(views or ()), *counts]))
  return DataError(
      f"no usable study: the view filter views={tuple(views or ())} (data.views in the system "
      f"configs) removes every study of a sample of {sum(counts.values())} images, whose views "
      f"are: {have}; widen it, e.g. --config.data.views=\"{wider}\"")


def sample_has_labels(source: Sequence[Any], uncertain: str) -> tuple[int, int, int]:
  """(studies sampled, of them with any label 1 or 0 after the uncertain policy, with any -1)."""
  rows = _sample(source)
  labels = np.stack([np.asarray(source[i]["labels"], np.float32) for i in rows])
  after = apply_uncertain_policy(labels, uncertain)
  return len(rows), int(np.isfinite(after).any(axis=1).sum()), int((labels == -1).any(axis=1).sum())


def no_label_error(sampled: int, uncertain_studies: int, uncertain: str,
                   names: Sequence[str]) -> DataError:
  why = (f"{uncertain_studies} have only uncertain (-1) labels, which uncertain='{uncertain}' "
         f"masks (data.uncertain=ones or zeros keeps them)" if uncertain_studies else
         "the dataset has no label values: were its label columns named when it was prepared? "
         "(cxr_folder: --config labels=NAME:COLUMN,...)")
  shown = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
  return DataError(f"no usable study: none of {sampled} sampled studies has a label 1 or 0 "
                   f"(labels: {shown}); {why}")
