"""Multi-label metrics with bootstrap CIs: per label and macro AUROC / AUPRC.

Per label: the metric on studies where the label is known (not NaN) and a percentile-bootstrap CI
over those studies (evaluate.classification.bootstrap_ci; resamples holding one class are
redrawn). Macro: the mean over labels with both classes in the test split; its CI resamples
studies jointly for all labels (one draw of rows, each label scored on its known rows there,
labels left with one class in a draw skipped), so correlated labels are not treated as
independent; the resampling is evaluate.classification.bootstrap_statistic.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from cxrjax.data.labels import CHEXPERT_LABELS
from cxrjax.evaluate.classification import (average_precision, bootstrap_ci, bootstrap_statistic,
                                           roc_auc)
from cxrjax.evaluate.report import markdown_rows

METRICS = {"auroc": (roc_auc, "auc"), "auprc": (average_precision, "auprc")}


def _both_classes(y: np.ndarray) -> bool:
  return y.size > 0 and 0 < y.sum() < y.size


def per_label(labels: np.ndarray, probs: np.ndarray, *, n_resamples: int, alpha: float,
              seed: int, names: Sequence[str] = CHEXPERT_LABELS) -> list[dict]:
  """labels (N, C) {1, 0, NaN}, probs (N, C) -> one row per label (named by `names`): n,
  positives, and each metric with its CI (None where the label lacks a class)."""
  rows = []
  for j, name in enumerate(names):
    known = np.isfinite(labels[:, j])
    y, s = labels[known, j], probs[known, j]
    row = {"label": name, "n": int(known.sum()), "positives": int(np.nansum(y))}
    for metric, (fn, kind) in METRICS.items():
      if _both_classes(y):
        lo, hi = bootstrap_ci(y, s, kind, n_resamples=n_resamples, alpha=alpha, seed=seed + j)
        row[metric] = {"value": fn(y, s), "lo": lo, "hi": hi}
      else:
        row[metric] = None
    rows.append(row)
  return rows


def macro_value(labels: np.ndarray, scores: np.ndarray, fn=roc_auc,
                labels_to_use: list[int] | None = None) -> float:
  """Mean of fn(y, s) over labels with both classes among their known rows (NaN if none)."""
  vals = []
  for j in range(labels.shape[1]) if labels_to_use is None else labels_to_use:
    known = np.isfinite(labels[:, j])
    if _both_classes(labels[known, j]):
      vals.append(fn(labels[known, j], scores[known, j]))
  return float(np.mean(vals)) if vals else math.nan


def macro(labels: np.ndarray, probs: np.ndarray, *, n_resamples: int, alpha: float, seed: int) -> dict:
  """labels (N, C) {1, 0, NaN}, probs (N, C) -> {metric: {'value', 'lo', 'hi', 'labels': how many
  labels enter}} of the macro average (None for each metric when no label has both classes)."""
  usable = [j for j in range(labels.shape[1]) if _both_classes(labels[np.isfinite(labels[:, j]), j])]
  out = {}
  for metric, (fn, _) in METRICS.items():
    if not usable:
      out[metric] = None
      continue

    def statistic(idx, fn=fn):
      # A draw leaving every usable label with one class gives NaN: skipped, not redrawn.
      return np.array([macro_value(labels[r], probs[r], fn, usable) for r in idx])

    # The same seed for every metric: all metrics are scored on the same draws of rows.
    lo, hi, _ = bootstrap_statistic(statistic, len(labels), n_resamples=n_resamples, alpha=alpha,
                                    seed=seed)
    out[metric] = {"value": macro_value(labels, probs, fn, usable), "lo": lo, "hi": hi,
                   "labels": len(usable)}
  return out


def _cell(m) -> str:
  return "n/a" if m is None else f"{m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"


def table(rows: list[dict], mac: dict, level: float) -> str:
  """Markdown: one row per label of per_label(), then the macro row of macro(); unpadded cells."""
  pct = f"{100 * level:g} %"
  header = ["label", "n", "positives", f"AUROC [{pct} CI]", f"AUPRC [{pct} CI]"]
  body = [[r["label"], str(r["n"]), str(r["positives"]), _cell(r["auroc"]), _cell(r["auprc"])]
          for r in rows]
  k = mac["auroc"]["labels"] if mac.get("auroc") else 0
  body.append([f"**macro** ({k} labels)", "", "", _cell(mac["auroc"]), _cell(mac["auprc"])])
  return markdown_rows(header, body)


def f1_at_half(labels: np.ndarray, probs: np.ndarray) -> dict:
  """Per-label F1 at p > 0.5 (the seed's) and their mean, over labels with a positive."""
  out = {}
  for j in range(labels.shape[1]):
    y, pred = labels[:, j] == 1, probs[:, j] > 0.5
    if y.any():
      tp = float((y & pred).sum())
      out[j] = 2 * tp / max(float(y.sum() + pred.sum()), 1.0)
  return {"per_label": out, "mean": float(np.mean(list(out.values()))) if out else float("nan")}
