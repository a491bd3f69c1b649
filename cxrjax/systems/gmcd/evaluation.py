"""GMCD's metrics (spec gmcd.md §5), the ablation table over folds, the paired comparison and plots.

Per fold and method, on the test fold's studies: micro AUC and micro AP over the one-hot classes
(scikit-learn, average='micro', on the log-probabilities: a monotone transform changes neither),
micro F1 (= accuracy for single-label classes; reported, as the seed does), the F1 of the top
class (grade IV in the seed), accuracy. Across folds: mean ± population SD (the seed's np.std).
"""
from __future__ import annotations

import numpy as np

from cxrjax.core.writers import read_stage_metrics
from cxrjax.evaluate.report import markdown_rows

METRICS = ("auc", "ap", "f1", "f1_top", "acc")
METRIC_NAMES = {"auc": "micro AUC", "ap": "micro AP", "f1": "micro F1", "f1_top": "F1 top class",
                "acc": "accuracy"}
# The seed's ablation, in its order: teacher heads, then the students.
METHODS = ("teacher", "tabular_head", "image_head", "student_ce", "student_kd", "student_dscd",
           "student_dscd_gkm")
METHOD_NAMES = {"teacher": "multimodal teacher (fused head)", "tabular_head": "tabular-only head",
                "image_head": "image-only head (teacher)", "student_ce": "student, CE only",
                "student_kd": "student, + logit KD", "student_dscd": "student, + DSCD",
                "student_dscd_gkm": "student, + DSCD + GKM (GMCD)"}


def classification_metrics(labels: np.ndarray, log_probs: np.ndarray) -> dict:
  """labels (N,) int, log_probs (N, C) -> {metric: float} (METRICS) plus 'select', the seed's
  stage-2 model-selection score: the mean of AUC, AP, F1 and the top class's F1."""
  from sklearn.metrics import average_precision_score, f1_score, roc_auc_score
  labels = np.asarray(labels)
  c = log_probs.shape[1]
  onehot = np.eye(c)[labels]
  pred = np.argmax(log_probs, axis=1)
  scores = np.nan_to_num(np.asarray(log_probs, np.float64), nan=-1e9, neginf=-1e9)
  out = {"auc": float(roc_auc_score(onehot, scores, average="micro")),
         "ap": float(average_precision_score(onehot, scores, average="micro")),
         "f1": float(f1_score(labels, pred, average="micro")),
         "f1_top": float(f1_score(labels, pred, labels=[c - 1], average="macro", zero_division=0)),
         "acc": float(np.mean(pred == labels))}
  out["select"] = float(np.mean([out["auc"], out["ap"], out["f1"], out["f1_top"]]))
  return out


def summarize(per_fold: dict) -> dict:
  """{method: {fold: metrics}} -> {method: {metric: {'mean', 'sd', 'folds'}}}."""
  out = {}
  for method, folds in per_fold.items():
    out[method] = {}
    for m in METRICS:
      values = np.array([folds[f][m] for f in sorted(folds)])
      out[method][m] = {"mean": float(values.mean()), "sd": float(values.std()),
                        "folds": values.tolist()}
  return out


def paired(per_fold: dict, a: str, b: str) -> dict:
  """method a minus method b over the same folds, per metric: mean difference, its SD, the folds
  a wins, and a paired t-test's two-sided p (NaN with fewer than 3 folds or no spread)."""
  from scipy import stats
  folds = sorted(set(per_fold[a]) & set(per_fold[b]))
  out = {}
  for m in METRICS:
    x = np.array([per_fold[a][f][m] for f in folds])
    y = np.array([per_fold[b][f][m] for f in folds])
    d = x - y
    p = float("nan")
    if len(d) >= 3 and np.std(d) > 0:
      p = float(stats.ttest_rel(x, y).pvalue)
    out[m] = {"mean_diff": float(d.mean()), "sd_diff": float(d.std()), "wins": int((d > 0).sum()),
              "folds": len(d), "p": p}
  return out


def tables(results: dict) -> str:
  """The markdown of results.md: the ablation (mean ± SD), per-fold rows, the paired comparison."""
  summary, per_fold = results["summary"], results["per_fold"]
  methods = [m for m in METHODS if m in summary]
  rows = [[METHOD_NAMES[m]] + [f"{summary[m][k]['mean']:.3f} ± {summary[m][k]['sd']:.3f}"
                               for k in METRICS] for m in methods]
  parts = ["## Ablation (test folds, mean ± SD over folds)",
           markdown_rows(["method"] + [METRIC_NAMES[k] for k in METRICS], rows)]
  fold_rows = [[METHOD_NAMES[m], str(f)] + [f"{per_fold[m][f][k]:.3f}" for k in METRICS]
               for m in methods for f in sorted(per_fold[m])]
  parts += ["## Per fold", markdown_rows(["method", "fold"] + [METRIC_NAMES[k] for k in METRICS],
                                         fold_rows)]
  if results.get("paired"):
    cmp = results["paired"]
    rows = [[METRIC_NAMES[k], f"{cmp[k]['mean_diff']:+.3f} ± {cmp[k]['sd_diff']:.3f}",
             f"{cmp[k]['wins']}/{cmp[k]['folds']}", "n/a" if np.isnan(cmp[k]["p"]) else f"{cmp[k]['p']:.3f}"]
            for k in METRICS]
    parts += [f"## {METHOD_NAMES['student_dscd_gkm']} minus {METHOD_NAMES['student_ce']}, paired over folds",
              markdown_rows(["metric", "difference (mean ± SD)", "folds won", "paired t-test p"], rows),
              results.get("verdict", "")]
  return "\n\n".join(parts)


def verdict(cmp: dict) -> str:
  """One honest sentence on whether GMCD beat the CE-only student (micro AUC, paired over folds)."""
  auc = cmp["auc"]
  p_text = "" if np.isnan(auc["p"]) else f", paired t-test p = {auc['p']:.3f}"
  facts = f"{auc['mean_diff']:+.3f}, GMCD better on {auc['wins']}/{auc['folds']} folds{p_text}"
  if not np.isnan(auc["p"]) and auc["p"] < 0.05:
    word = "beat" if auc["mean_diff"] > 0 else "fell behind"
    return f"On these folds GMCD significantly {word} the CE-only student on micro AUC ({facts})."
  return (f"On these folds GMCD did not measurably beat the CE-only student on micro AUC ({facts}): "
          "the difference is within fold-to-fold noise.")


def gkm_weights(workdir: str, stage: str) -> dict:
  """{'step': [...], 'gkm_w0'..: [...]} from a stage's metrics.jsonl (the last row per step)."""
  rows = read_stage_metrics(workdir, stage, "gkm_w0")
  steps = sorted(rows)
  keys = sorted(k for k in (rows[steps[0]] if steps else {}) if k.startswith("gkm_w"))
  return {"step": steps, **{k: [rows[s][k] for s in steps] for k in keys}}


def plot_folds(per_fold: dict, path: str, metric: str = "auc") -> None:
  """One marker per fold and method, the mean as a bar: how much the folds disagree."""
  from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is
  methods = [m for m in METHODS if m in per_fold]
  fig = Figure(figsize=(1.3 * len(methods) + 2, 4))
  ax = fig.subplots()
  for i, m in enumerate(methods):
    values = [per_fold[m][f][metric] for f in sorted(per_fold[m])]
    ax.bar(i, np.mean(values), color="#cfd8e3")
    ax.scatter(np.full(len(values), i) + np.linspace(-0.2, 0.2, len(values)), values, s=18,
               c=np.arange(len(values)), cmap="viridis", zorder=3)
  ax.set_xticks(range(len(methods)), [METHOD_NAMES[m].replace(", ", "\n") for m in methods],
                fontsize=7)
  ax.set_ylabel(f"test {METRIC_NAMES[metric]}")
  ax.set_title("Per fold (dots, coloured by fold) and mean (bars)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def plot_gkm(curves: dict, path: str, names=("KL(teacher)", "KL(EMA)", "DSCD(teacher)", "DSCD(EMA)")
             ) -> None:
  """The running GKM weights of the four distillation terms over training, one panel per fold."""
  from matplotlib.figure import Figure
  folds = sorted(curves)
  fig = Figure(figsize=(3.2 * len(folds), 3))
  axes = fig.subplots(1, len(folds), squeeze=False, sharey=True)
  for ax, f in zip(axes[0], folds):
    c = curves[f]
    for i, name in enumerate(names):
      if f"gkm_w{i}" in c:
        ax.plot(c["step"], c[f"gkm_w{i}"], label=name)
    ax.set_title(f"fold {f}")
    ax.set_xlabel("step")
  axes[0][0].set_ylabel("GKM weight (0..5)")
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
