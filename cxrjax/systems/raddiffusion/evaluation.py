"""RadDiffusion's results: probe and fine-tune tables, the probing curve, reconstruction figures."""
from __future__ import annotations

import numpy as np

from cxrjax.core.writers import read_stage_metrics
from cxrjax.evaluate.classification import bootstrap_statistic
from cxrjax.evaluate.figures import figure
from cxrjax.evaluate.multilabel import macro_value
from cxrjax.evaluate.report import markdown_rows

ENCODERS = ("random", "mae", "diffmae")
PROBED = ENCODERS + ("pixels",)  # the probe's rows: the encoders, then the pixels without one
DISPLAY = {"random": "random init (floor)", "mae": "MAE", "diffmae": "diffusion-MAE"}


def _display(name: str, results: dict) -> str:
  if name != "pixels":
    return DISPLAY[name]
  g = results["config"]["probe"]["pixel_grid"]
  return f"pixels, each view's means over a {g} x {g} grid of blocks (no encoder)"


def probe_curve(workdir: str, stage: str) -> list[tuple[int, float]]:
  """(step, validation probe macro AUROC) of a pretraining stage, from its metrics.jsonl (the last
  value per step: an evaluation repeated after a resume counts once)."""
  key = "eval/probe_macro_auroc"
  return sorted((step, float(row[key])) for step, row in read_stage_metrics(workdir, stage, key).items())


def paired_difference(labels: np.ndarray, a: np.ndarray, b: np.ndarray, *, n_resamples: int,
                      alpha: float, seed: int) -> dict:
  """Macro AUROC of scores a minus scores b on the same studies, with a paired bootstrap CI over
  studies (labels (N, C) {0, 1}; a, b (N, C), NaN columns = labels neither scored)."""
  cols = [j for j in range(labels.shape[1]) if np.isfinite(a[:, j]).all() and np.isfinite(b[:, j]).all()]

  def diff(idx):
    return np.array([macro_value(labels[r], a[r], labels_to_use=cols) -
                     macro_value(labels[r], b[r], labels_to_use=cols) for r in idx])

  value = float(diff(np.arange(len(labels))[None])[0])
  lo, hi, _ = bootstrap_statistic(diff, len(labels), n_resamples=n_resamples, alpha=alpha, seed=seed)
  return {"value": value, "lo": lo, "hi": hi, "labels": len(cols)}


def _ci(m) -> str:
  return "n/a" if m is None else f"{m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"


def tables(results: dict) -> str:
  """The markdown of results.md."""
  probe, mv, ft = results["probe"], results["multi_view"], results["finetune"]
  level = f"{100 * (1 - results['alpha']):g} %"
  parts = ["## Linear probe of the study features (test split; per-label logistic regression "
           "fitted on the probe-train studies)",
           markdown_rows(["features", f"macro AUROC [{level} CI]", f"minus random [{level} CI, paired]"],
                         [[_display(e, results), _ci(probe[e]["macro"]),
                           _ci(probe[e].get("minus_random")) if e != "random" else ""]
                          for e in PROBED])]
  parts += ["## What the lateral view adds (probe macro AUROC, test split)",
            markdown_rows(["features", "frontal only", "frontal + lateral"],
                          [[_display(e, results), f"{mv[e]['frontal']:.3f}", f"{mv[e]['all']:.3f}"]
                           for e in PROBED])]
  head_norm = results["config"]["model"].get("finetune_head_norm")
  head = "BatchNorm (no affine) and linear head" if head_norm else "linear head"
  parts += [f"## Fine-tuned (whole network, {head} on the study CLS; test split)",
            markdown_rows(["initialisation", f"macro AUROC [{level} CI]", f"macro AUPRC [{level} CI]",
                           "mean F1 at 0.5", "best step"],
                          [[DISPLAY[e], _ci(ft[e]["macro"]["auroc"]), _ci(ft[e]["macro"]["auprc"]),
                            f"{ft[e]['f1']['mean']:.3f}", str(ft[e]["best_step"])] for e in ENCODERS])]
  curve = results["probe_curve"]
  rows = sorted({s for e in ("mae", "diffmae") for s, _ in curve[e]})
  lookup = {e: dict(curve[e]) for e in ("mae", "diffmae")}
  floor = results.get("probe_curve_random", float("nan"))
  pixels = results.get("probe_curve_pixels", float("nan"))
  parts += [f"## Probe during pretraining (validation macro AUROC; random init {floor:.3f}, "
            f"pixels {pixels:.3f})",
            markdown_rows(["step", "MAE", "diffusion-MAE"],
                          [[str(s)] + [f"{lookup[e][s]:.3f}" if s in lookup[e] else ""
                                       for e in ("mae", "diffmae")] for s in rows])]
  return "\n\n".join(parts)


def plot_probe_curve(curve: dict, floor: float, path: str, pixels: float | None = None) -> str:
  """Probe macro AUROC against pretraining step, MAE vs diffusion-MAE, the random encoder's probe
  and (when given) the pixel probe on the same (validation) split as lines."""
  fig = figure(7.5, 4)
  ax = fig.add_subplot(1, 1, 1)
  for scheme, marker in (("mae", "o"), ("diffmae", "s")):
    if curve[scheme]:
      steps, values = zip(*curve[scheme])
      ax.plot(steps, values, marker=marker, label=DISPLAY[scheme])
  ax.axhline(floor, ls="--", color="grey", label=DISPLAY["random"])
  if pixels is not None:
    ax.axhline(pixels, ls=":", color="black", label="pixels, block means\n(no encoder)")
  ax.set_xlabel("pretraining step")
  ax.set_ylabel("probe macro AUROC (validation)")
  ax.set_title("Linear probe of the bottleneck CLS during pretraining")
  ax.grid(alpha=0.3)
  # Outside the axes: the lines may run anywhere between 0.5 and 1.
  ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=150)
  return path
