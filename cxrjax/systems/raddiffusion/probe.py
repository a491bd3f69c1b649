"""The linear probe of RadDiffusion's study features (spec D.7.2).

Features: the encoder on every view without masking, the study's shared bottleneck CLS before the
final LayerNorm (one vector per study: the seed's index bug, D.8.3, cannot happen). Classifier:
per label, scikit-learn's LogisticRegression(solver='saga', class_weight='balanced', no penalty:
C = inf, scikit-learn 1.8's spelling of penalty=None), as the seed; a label with one class in the probe's training or test rows is skipped and reported.
With standardize (the default; probe.standardize) the features are first standardised with the
probe-train rows' statistics: the same model class, but saga converges within its iterations
(without it, as in the seed, it rarely does and the probe measures the optimiser as much as the
features).

``pixel_features`` gives the same probe a reference without any encoder: the views' pixels
averaged over a coarse grid of blocks (probe.pixel_grid).
"""
from __future__ import annotations

import functools
import warnings

import numpy as np

from cxrjax.core.predict import sharded_map
from cxrjax.data.labels import CHEXPERT_LABELS
from cxrjax.evaluate.classification import roc_auc
from cxrjax.systems.raddiffusion.data import Studies
from cxrjax.systems.raddiffusion.pretrain import views_input


@functools.lru_cache(maxsize=8)
def _features_fn(encoder):
  """One long-lived feature function per encoder (sharded_map keys its program on it)."""

  def fn(batch, params):
    _, aux = encoder.apply({"params": params}, views_input(batch["images"]), batch["view_mask"])
    return aux["cls_pre_ln"]

  return fn


def study_features(encoder, params, studies: Studies, mesh, batch_size: int) -> np.ndarray:
  """(N, D) float32 study features of `studies` (their view masks decide which views count)."""
  return sharded_map(_features_fn(encoder), {"images": studies.images,
                                             "view_mask": studies.view_mask},
                     mesh, batch_size=batch_size, params=params)


def pixel_features(studies: Studies, grid: int) -> np.ndarray:
  """(N, V * grid * grid) float32: each view's pixels in [0, 1] averaged over a grid x grid array
  of square blocks, views concatenated in slot order; absent views are zeros.

  The probe's reference without an encoder: what a linear readout of the raw (pooled) pixels
  finds, so the table shows how much of it the study CLS keeps (random or pretrained).
  """
  n, v, s, _ = studies.images.shape
  if s % grid:
    raise ValueError(f"probe.pixel_grid={grid} does not divide the {s} px views")
  blocks = studies.images.reshape(n, v, grid, s // grid, grid, s // grid)
  pooled = blocks.mean(axis=(3, 5), dtype=np.float32) / 255.0  # no float copy of the images
  return (pooled * studies.view_mask[:, :, None, None]).reshape(n, v * grid * grid)


def _both(y: np.ndarray) -> bool:
  return 0 < y.sum() < y.size


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
              max_iter: int, seed: int = 0, standardize: bool = True) -> dict:
  """Per-label logistic regressions on (N, D) features and (N, 14) {0, 1} labels.

  Returns {'scores': (N_test, 14) probabilities (NaN for skipped labels), 'auroc': {label: AUROC},
  'macro_auroc': mean over the scored labels (NaN if none), 'skipped': [labels with one class]}.
  """
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import LogisticRegression

  if standardize:
    mean, std = train_x.mean(axis=0), np.maximum(train_x.std(axis=0), 1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  scores = np.full(test_y.shape, np.nan, np.float32)
  auroc, skipped = {}, []
  for j, name in enumerate(CHEXPERT_LABELS):
    if not (_both(train_y[:, j]) and _both(test_y[:, j])):
      skipped.append(name)
      continue
    model = LogisticRegression(solver="saga", class_weight="balanced", C=np.inf,
                               max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
      # saga without feature scaling rarely converges in the seed's 100 iterations; the seed
      # used the result as it was, and so do we.
      warnings.simplefilter("ignore", ConvergenceWarning)
      model.fit(train_x, train_y[:, j])
    scores[:, j] = model.predict_proba(test_x)[:, 1]
    auroc[name] = roc_auc(test_y[:, j], scores[:, j])
  macro = float(np.mean(list(auroc.values()))) if auroc else float("nan")
  return {"scores": scores, "auroc": auroc, "macro_auroc": macro, "skipped": skipped}
