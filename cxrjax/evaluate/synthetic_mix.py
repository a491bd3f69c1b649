"""RayGen's downstream synthetic-data mix (spec raygen_and_raddiffusion.md C.9.4).

The seed adds class-prompted synthetic images to the real training set of its 10-class
DenseNet-121 classifier: per-class counts inversely proportional to the real positives
(`inverse_frequency_counts`), a "50 %" variant taking the first half of each class
(`first_fraction`), and a one-hot label of the prompt's class per image (`prompt_labels`), where
the seed's table sends 'pneumothorax' to Pneumonia's index (the faithful bug, behind a switch).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

# src/auroc_testing/cls.py CLASS_NAMES: the classifier's label order.
RAYGEN_CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Fracture",
                  "Lung Lesion", "Lung Opacity", "Pleural Effusion", "Pneumonia", "Pneumothorax")

# The paper's number of real training images, the seed's `total`.
RAYGEN_TOTAL = 4684


def inverse_frequency_counts(positive_counts: Sequence[int], names: Sequence[str] = RAYGEN_CLASSES,
                             total: int = RAYGEN_TOTAL) -> dict[str, int]:
  """Synthetic images per class, rarest class first, as the seed's synthetic_json.py.

  positive_counts: (L,) real positives per class, in the order of names. The classes are
  sorted by ascending count (stable, so ties keep names' order); the normalised proportions
  count / sum in that order are reversed, so the rarest class takes the commonest's share;
  each share times total is truncated by int(). The truncation loses up to L images (4679 of
  4684 for RayGen's counts). Returns {name: count} in the ascending-positives order.
  """
  counts = np.asarray(positive_counts, np.float64)
  if counts.ndim != 1 or len(counts) != len(names):
    raise ValueError(f"need one count per name; got {counts.shape} counts for {len(names)} names")
  if (counts < 0).any() or counts.sum() <= 0:
    raise ValueError(f"positive counts must be non-negative with a positive sum; got {counts}")
  order = np.argsort(counts, kind="stable")
  proportions = counts[order] / counts.sum()
  return {names[i]: int(p * total) for i, p in zip(order, proportions[::-1])}


def first_fraction(counts: Mapping[str, int], fraction: float = 0.5) -> dict[str, int]:
  """The reduced synthetic set: the first int(count * fraction) images of each class (the "50 %"
  set of RayGen's 4679 is 2337). The spec gives only the 2,337 total; of the obvious readings,
  int() truncation gives it (rounding, half to even or half up, would give 2342)."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
  return {name: int(n * fraction) for name, n in counts.items()}


def prompt_labels(class_names: Sequence[str], label_names: Sequence[str] = RAYGEN_CLASSES,
                  faithful_pneumothorax_bug: bool = False) -> np.ndarray:
  """One-hot labels (n, L) float32 for n synthetic images, each prompted with one class name.

  class_names: (n,) prompt classes, matched to label_names without regard to case (the seed's
  table is keyed by lower-case names). faithful_pneumothorax_bug=True reproduces the seed's
  table, which gives 'pneumothorax' Pneumonia's index (8 in RAYGEN_CLASSES), so Pneumothorax
  is never positive in synthetic data; the default labels it as itself.
  """
  index = {name.lower(): j for j, name in enumerate(label_names)}
  if len(index) != len(label_names):
    raise ValueError(f"label names repeat when lower-cased: {list(label_names)}")
  if faithful_pneumothorax_bug:
    if "pneumonia" not in index:
      raise ValueError("the faithful pneumothorax bug needs a 'Pneumonia' label")
    index["pneumothorax"] = index["pneumonia"]
  unknown = sorted({c for c in class_names if c.lower() not in index})
  if unknown:
    raise ValueError(f"prompt classes not among the labels: {unknown}")
  out = np.zeros((len(class_names), len(label_names)), np.float32)
  out[np.arange(len(class_names)), [index[c.lower()] for c in class_names]] = 1.0
  return out
