"""Phantom studies as dataset examples: attributes -> rendered views + report -> one record.

``make_example`` builds one study in exactly the ``features.study_features(phantom=True)``
layout (what the TFDS builder writes); ``make_arrays`` builds many as stacked numpy arrays for
in-memory use (notebooks, quick learnability checks) without a PNG round trip -- PNG is
lossless, so the pixels are the ones a data source would decode.

The renderer is injectable (``render(attrs, size) -> (images, view_names)``, images (size, size)
uint8); by default ``phantoms.render.render_views``, imported on first use so sampling and
reports work without it. Report wording draws from its own stream
``default_rng([seed, index, _REPORT_TAG])``, so it is as deterministic as the study.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from cxrjax.data.features import TABULAR_DIM, encode_image
from cxrjax.data.labels import NUM_LABELS, VIEW_INDEX, VIEWS
from cxrjax.data.phantoms.attributes import PhantomConfig, patient_of, sample_study
from cxrjax.data.phantoms.reports import write_report
from cxrjax.data.phantoms.study import StudyAttributes

__all__ = ["make_example", "make_arrays", "render_study", "MAX_VIEWS"]

MAX_VIEWS = 2  # a frontal (PA or AP) and optionally a lateral
_REPORT_TAG = 0x4E9087
Renderer = Callable[[StudyAttributes, int], tuple[Sequence[np.ndarray], Sequence[str]]]


def _default_render() -> Renderer:
  from cxrjax.data.phantoms.render import render_views  # lazy: the renderer is optional here
  return render_views


def render_study(attrs: StudyAttributes, size: int, render: Renderer | None = None):
  """-> (list of V (size, size) uint8 images, list of V view names in labels.VIEWS), checked."""
  images, views = (render or _default_render())(attrs, size)
  images, views = [np.asarray(im) for im in images], list(views)
  if not 1 <= len(images) <= MAX_VIEWS or len(images) != len(views):
    raise ValueError(f"renderer returned {len(images)} images and {len(views)} views "
                     f"(need 1..{MAX_VIEWS}, one name each)")
  for im, v in zip(images, views):
    if im.shape != (size, size) or im.dtype != np.uint8:
      raise ValueError(f"renderer image must be ({size}, {size}) uint8, got {im.shape} {im.dtype}")
    if v not in VIEWS:
      raise ValueError(f"renderer view {v!r} is not one of {VIEWS}")
  return images, views


def _report(seed: int, index: int, attrs: StudyAttributes) -> tuple[str, str]:
  return write_report(attrs, np.random.default_rng([seed, index, _REPORT_TAG]))


def make_example(seed: int, index: int, config: PhantomConfig = PhantomConfig(), size: int = 128,
                 render: Renderer | None = None, encoding: str = "jpeg") -> dict:
  """Study ``index`` as one record of ``study_features(phantom=True)`` (images encoded as
  ``encoding``: 'jpeg' or 'png')."""
  attrs = sample_study(seed, index, config)
  images, views = render_study(attrs, size, render)
  findings, impression = _report(seed, index, attrs)
  return {
      "study_id": attrs.study_id,
      "patient_id": attrs.patient_id,
      "images": [encode_image(im, encoding) for im in images],
      "views": views,
      "labels": attrs.labels.astype(np.float32),
      "age_years": np.float32(attrs.age_years),
      "sex_male": np.float32(attrs.sex_male),
      "race": attrs.race,
      "site": f"site_{attrs.site}",
      "findings": findings,
      "impression": impression,
      "phantom": {
          "severity": attrs.severity.astype(np.float32),
          "tabular": attrs.tabular.astype(np.float32),
          "grade": np.int64(attrs.grade),
          "pe": np.int64(attrs.pe),
          "shortcut": np.float32(attrs.shortcut),
      },
  }


def make_arrays(seed: int, indices, config: PhantomConfig = PhantomConfig(), size: int = 128,
                render: Renderer | None = None, *, reports: bool = False) -> dict[str, np.ndarray]:
  """Studies ``indices`` (N of them) as stacked arrays:

    images (N, 2, size, size) uint8 (zeros where a view is missing); view_mask (N, 2) bool;
    views (N, 2) int64 indices into labels.VIEWS (-1 where missing); labels (N, 14) float32 in
    {1, 0, -1, NaN}; truth (N, 14) bool; severity (N, 14) float32; age_years, sex_male,
    shortcut (N,) float32; site, patient, pe, grade, index (N,) int64; race, study_id (N,) str;
    tabular (N, 80) float32; and with ``reports`` findings, impression (N,) str.
  """
  indices = np.asarray(indices, np.int64).reshape(-1)
  n = len(indices)
  out = {"images": np.zeros((n, MAX_VIEWS, size, size), np.uint8),
         "view_mask": np.zeros((n, MAX_VIEWS), bool), "views": np.full((n, MAX_VIEWS), -1, np.int64),
         "labels": np.zeros((n, NUM_LABELS), np.float32), "truth": np.zeros((n, NUM_LABELS), bool),
         "severity": np.zeros((n, NUM_LABELS), np.float32), "tabular": np.zeros((n, TABULAR_DIM), np.float32)}
  scalars = {k: [] for k in ("age_years", "sex_male", "shortcut", "site", "pe", "grade", "race",
                             "study_id", "findings", "impression")}
  for row, index in enumerate(indices):
    attrs = sample_study(seed, int(index), config)
    images, views = render_study(attrs, size, render)
    for v, (im, name) in enumerate(zip(images, views)):
      out["images"][row, v], out["views"][row, v], out["view_mask"][row, v] = im, VIEW_INDEX[name], True
    for key in ("labels", "truth", "severity", "tabular"):
      out[key][row] = getattr(attrs, key)
    for key in ("age_years", "sex_male", "shortcut", "site", "pe", "grade", "race", "study_id"):
      scalars[key].append(getattr(attrs, key))
    if reports:
      f, imp = _report(seed, int(index), attrs)
      scalars["findings"].append(f), scalars["impression"].append(imp)
  dtypes = {"age_years": np.float32, "sex_male": np.float32, "shortcut": np.float32, "site": np.int64,
            "pe": np.int64, "grade": np.int64, "race": str, "study_id": str, "findings": str, "impression": str}
  for key, values in scalars.items():
    if values or key not in ("findings", "impression"):
      out[key] = np.asarray(values, dtypes[key]).reshape(n)
  out["patient"] = np.asarray(patient_of(indices, config), np.int64).reshape(n)
  out["index"] = indices
  return out
