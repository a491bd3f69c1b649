"""Per-class and per-subgroup performance as in CXR-FMKD (spec §B.5).

Works on any model's outputs: ``y_true`` / ``probs`` are ``(N,)`` for one label or
``(N, C)`` for C labels; subgroup labels are ``(N,)`` arrays of any hashable values.
AUROC and AUPRC come from :mod:`cxrjax.evaluate.classification`; only the seed's
operating-point rules (sklearn ``roc_curve`` *with* ``drop_intermediate=True``,
FPR closest to 0.2) are added here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
import warnings

import numpy as np

from cxrjax.evaluate.classification import average_precision, roc_auc, roc_curve_points
from cxrjax.evaluate.report import markdown_table

__all__ = [
  "LABELS_BY_RELEVANCE",
  "roc_points_sklearn",
  "threshold_at_fpr",
  "max_youden_j",
  "youden_j_at_fpr",
  "per_class_metrics",
  "focused_summary",
  "mean_sd_over_seeds",
  "SubgroupPerformance",
  "subgroup_performance",
]

# §B.1 reporting order; the "focus" group is the first 7.
LABELS_BY_RELEVANCE = (
  "Pleural Effusion", "No Finding", "Cardiomegaly", "Pneumothorax", "Atelectasis",
  "Consolidation", "Edema", "Pleural Other", "Enlarged Cardiomediastinum", "Pneumonia",
  "Lung Lesion", "Lung Opacity", "Fracture", "Support Devices",
)


def roc_points_sklearn(y_true, scores):
  """ROC points exactly as ``sklearn.metrics.roc_curve`` with its default
  ``drop_intermediate=True``: returns ``(fpr, tpr, thresholds)``, thresholds decreasing
  from ``inf``.

  The seed picks "the point whose FPR is closest to 0.2" among *these* points, so
  the collinear points that sklearn drops must be dropped here too (§B.5).
  """
  fpr, tpr, thr = roc_curve_points(y_true, scores)
  y = np.asarray(y_true).astype(bool)
  # Back to integer counts so that the second-difference test is exact, as in sklearn.
  fps = np.rint(fpr[1:] * (~y).sum())
  tps = np.rint(tpr[1:] * y.sum())
  if fps.size > 2:
    keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
    keep = np.r_[True, keep]  # the prepended (0, 0) / inf point always stays
    fpr, tpr, thr = fpr[keep], tpr[keep], thr[keep]
  return fpr, tpr, thr


def _index_at_fpr(fpr: np.ndarray, target_fpr: float) -> int:
  # np.argmin returns the first index on ties, as the seed's code does.
  return int(np.argmin(np.abs(fpr - target_fpr)))


def threshold_at_fpr(y_true, scores, target_fpr: float = 0.2) -> float:
  """ROC threshold whose FPR is closest to ``target_fpr`` (first on ties; may be
  ``inf`` when the closest point is (0, 0)). Positive means ``score >= threshold``."""
  fpr, _, thr = roc_points_sklearn(y_true, scores)
  return float(thr[_index_at_fpr(fpr, target_fpr)])


def max_youden_j(y_true, scores) -> float:
  """max over ROC points of TPR - FPR (§B.5 "Max Youden's J")."""
  fpr, tpr, _ = roc_points_sklearn(y_true, scores)
  return float(np.max(tpr - fpr))


def youden_j_at_fpr(y_true, scores, target_fpr: float = 0.2) -> float:
  """TPR - FPR at the ROC point whose FPR is closest to ``target_fpr`` (§B.5)."""
  fpr, tpr, _ = roc_points_sklearn(y_true, scores)
  i = _index_at_fpr(fpr, target_fpr)
  return float(tpr[i] - fpr[i])


def per_class_metrics(y_true, probs, class_names: Sequence[str], target_fpr: float = 0.2):
  """Per-class AUROC, AUPRC, max J and J at ``target_fpr``, plus a "Macro" row.

  ``y_true`` and ``probs`` are ``(N, C)``; returns ``C + 1`` dicts with keys
  ``label, auc, auprc, max_j, j_at_fpr`` (macro = unweighted mean, §B.5). A class
  with a single label value gets NaN and is left out of the macro mean.
  """
  y = np.asarray(y_true)
  p = np.asarray(probs, dtype=np.float64)
  if y.ndim != 2 or y.shape != p.shape or y.shape[1] != len(class_names):
    raise ValueError(f"need (N, C) arrays for {len(class_names)} classes; got {y.shape}, {p.shape}")
  rows = []
  for c, name in enumerate(class_names):
    yc, pc = y[:, c], p[:, c]
    if np.unique(yc).size < 2:
      rows.append({"label": name, "auc": np.nan, "auprc": np.nan, "max_j": np.nan, "j_at_fpr": np.nan})
      continue
    rows.append({"label": name, "auc": roc_auc(yc, pc), "auprc": average_precision(yc, pc),
                 "max_j": max_youden_j(yc, pc), "j_at_fpr": youden_j_at_fpr(yc, pc, target_fpr)})
  keys = ("auc", "auprc", "max_j", "j_at_fpr")
  rows.append({"label": "Macro", **{k: float(np.nanmean([r[k] for r in rows])) for k in keys}})
  return rows


def focused_summary(values: Mapping[str, float], order: Sequence[str] = LABELS_BY_RELEVANCE,
                    n_focus: int = 7) -> dict:
  """The seed's "focused" view: the first ``n_focus`` labels of ``order`` individually,
  their mean ("Average Classes 1 to 7") and the mean of the rest ("Others")."""
  out = {name: float(values[name]) for name in order[:n_focus]}
  out[f"Average Classes 1 to {n_focus}"] = float(np.mean([values[n] for n in order[:n_focus]]))
  out["Others"] = float(np.mean([values[n] for n in order[n_focus:]]))
  return out


def mean_sd_over_seeds(per_seed: Sequence[Mapping[str, float]]) -> dict:
  """Mean, SD (ddof = 1, as pandas) and %SD = 100 SD / mean of each key across seeds.

  ``per_seed`` holds one ``{key: value}`` mapping per seed; returns
  ``{key: {"mean", "sd", "pct_sd"}}``. One seed gives SD = NaN (pandas does too);
  a zero mean gives %SD = 0 as in the seed's code.
  """
  if not per_seed:
    raise ValueError("per_seed is empty")
  out = {}
  for key in per_seed[0]:
    v = np.array([float(m[key]) for m in per_seed])
    mean = float(v.mean())
    sd = float(v.std(ddof=1)) if v.size > 1 else float("nan")
    out[key] = {"mean": mean, "sd": sd, "pct_sd": 0.0 if mean == 0 else 100.0 * sd / mean}
  return out


# --------------------------------------------------------------------------- #
# subgroup bootstrap with a global threshold (§B.5, evaluate_models_disease_prediction)
# --------------------------------------------------------------------------- #
_METRICS = ("auc", "tpr", "fpr", "youden_j")


@dataclass(frozen=True)
class SubgroupPerformance:
  """Output of :func:`subgroup_performance`.

  ``estimate[metric][group]`` is iteration 0 (the original set); ``ci[metric][group]``
  the ``(lo, hi)`` quantiles over iterations 1..n_bootstrap; ``samples[metric]`` is
  ``(n_bootstrap + 1, G)`` over ``groups`` (column order). Metrics: auc, tpr, fpr,
  youden_j and their ``relative_*`` = 100 (subgroup - Average) / Average.
  """
  groups: tuple
  estimate: dict
  ci: dict
  samples: dict
  threshold: float

  def to_markdown(self, metrics: Sequence[str] = ("auc", "youden_j"), decimals: int = 3) -> str:
    """One row per group: ``estimate [lo, hi]`` for each of ``metrics``."""
    # "auc" is special-cased by markdown_table (reads auc_ci), so rename its key.
    keys = [{"auc": "auroc"}.get(m, m) for m in metrics]
    f = f"{{:.{decimals}f}}"
    rows = []
    for g in self.groups:
      row = {"group": str(g)}
      for m, k in zip(metrics, keys):
        lo, hi = self.ci[m][g]
        row[k] = f"{f.format(self.estimate[m][g])} [{f.format(lo)}, {f.format(hi)}]"
      rows.append(row)
    return markdown_table(rows, ("group", *keys), decimals=decimals)


def _rates_at(y: np.ndarray, s: np.ndarray, thr: float):
  pred = s >= thr
  pos, neg = y.sum(), (~y).sum()
  tpr = (pred & y).sum() / pos if pos else np.nan
  fpr = (pred & ~y).sum() / neg if neg else np.nan
  return tpr, fpr


def subgroup_performance(y_true, probs, attributes: Mapping[str, np.ndarray],
                         subgroups: Mapping[str, Sequence] | None = None, *,
                         n_bootstrap: int = 2000, target_fpr: float = 0.2,
                         ci_level: float = 0.95, seed: int = 42) -> SubgroupPerformance:
  """AUC, TPR, FPR and Youden J per subgroup with stratified-bootstrap CIs (§B.5).

  ``y_true`` (N,) binary, ``probs`` (N,); ``attributes`` maps a name to an (N,)
  label array (e.g. ``{"race": ..., "sex": ...}``); ``subgroups`` lists, per
  attribute, the values to report in order (default: sorted unique values).
  Iteration 0 is the original set; iterations 1..n_bootstrap draw
  ``sklearn.utils.resample(indices, stratify=y)`` from a ``RandomState(seed)``
  (the seed used the global numpy RNG seeded 42). Each iteration fixes one
  *global* threshold (FPR closest to ``target_fpr`` over the whole resample) and
  evaluates every group at it. "Average" is the mean over the subgroups (not
  "All"). A subgroup lacking a class in some resample yields NaN there (the seed
  would raise); quantiles ignore NaNs.
  """
  from sklearn.utils import resample  # sklearn's stratified allocation, for fidelity

  y = np.asarray(y_true).astype(bool)
  s = np.asarray(probs, dtype=np.float64)
  if y.ndim != 1 or y.shape != s.shape:
    raise ValueError(f"y_true and probs must be equal-length 1-D; got {y.shape}, {s.shape}")
  masks = {"All": np.ones(y.size, bool)}
  for attr, values in attributes.items():
    values = np.asarray(values)
    if values.shape != y.shape:
      raise ValueError(f"attribute {attr!r} has shape {values.shape}, expected {y.shape}")
    order = (subgroups or {}).get(attr, sorted(np.unique(values).tolist()))
    for v in order:
      masks[v] = values == v
  names = list(masks)
  sub = [i for i, g in enumerate(names) if g != "All"]
  rng = np.random.RandomState(seed)
  out = {m: np.full((n_bootstrap + 1, len(names)), np.nan) for m in _METRICS}
  thr0 = np.nan
  for it in range(n_bootstrap + 1):
    idx = np.arange(y.size) if it == 0 else resample(np.arange(y.size), stratify=y, random_state=rng)
    yi, si = y[idx], s[idx]
    thr = threshold_at_fpr(yi, si, target_fpr)
    thr0 = thr if it == 0 else thr0
    for j, g in enumerate(names):
      m = masks[g][idx]
      yg, sg = yi[m], si[m]
      if yg.size == 0:
        continue
      tpr, fpr = _rates_at(yg, sg, thr)
      out["tpr"][it, j], out["fpr"][it, j] = tpr, fpr
      out["youden_j"][it, j] = tpr - fpr
      if 0 < yg.sum() < yg.size:
        out["auc"][it, j] = roc_auc(yg, sg)
  names.append("Average")
  for m in _METRICS:
    avg = out[m][:, sub].mean(axis=1, keepdims=True)
    out[m] = np.concatenate([out[m], avg], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
      out[f"relative_{m}"] = 100.0 * (out[m] - avg) / avg
  a = (1.0 - ci_level) / 2.0
  estimate, ci = {}, {}
  for m, v in out.items():
    estimate[m] = dict(zip(names, v[0].tolist()))
    if n_bootstrap > 0:
      with warnings.catch_warnings():  # an all-NaN column (group never valid) -> NaN CI
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanquantile(v[1:], [a, 1.0 - a], axis=0)
    else:
      lo = hi = np.full(len(names), np.nan)
    ci[m] = {g: (float(l), float(h)) for g, l, h in zip(names, lo, hi)}
  return SubgroupPerformance(tuple(names), estimate, ci, out, float(thr0))
