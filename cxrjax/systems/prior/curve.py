"""The label-efficiency curve: when do unlabelled CXR-CTPA pairs and a CTPA teacher help?

For each number of labelled CXRs in `curve.labelled` and each number of unlabelled pairs in
`curve.unlabelled`, the whole job runs on those sizes of the embedded synthetic world (its own
workdir, `<workdir>/curve/labelled<N>_unlabelled<M>`, every stage resumable; validation and test
are the same rows at every point) and its table is read back. The curve is test AUC against the
number of labels for the X-ray-only head, the distilled model and the two linear references, with
bootstrap CIs, and the paired difference distilled - X-ray only: `curve.json`, `curve.md` and
`curve.png` in the workdir.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import jax
import numpy as np
from matplotlib.ticker import NullLocator

from cxrjax.core.writers import say
from cxrjax.evaluate.figures import figure
from cxrjax.evaluate.report import markdown_rows

MODELS = ("xray_only", "distilled", "soft_label_lr", "ridge_teacher")
LEGEND = {"xray_only": "X-ray only head", "distilled": "distilled (diffusion prior)",
          "soft_label_lr": "CXR regression on teacher soft labels", "ridge_teacher": "ridge map, then teacher"}


def point_dir(workdir: str, labelled: int, unlabelled: int) -> str:
  return os.path.join(workdir, "curve", f"labelled{labelled}_unlabelled{unlabelled}")


def point_config(config, labelled: int, unlabelled: int):
  """The job's config at one point of the curve (no curve of its own)."""
  point = config.copy_and_resolve_references()
  point.unlock()
  point.data.synthetic.n_labelled = int(labelled)
  point.data.synthetic.n_unlabelled = int(unlabelled)
  point.curve.labelled = ()
  point.curve.unlabelled = ()
  point.lock()
  return point


def run_curve(config, workdir: str, run_point: Callable, own: dict | None = None) -> dict:
  """Runs (or loads) every point with `run_point(config, workdir) -> results` and writes the
  curve. `own`: the job's own results, used for the point at its own sizes."""
  s = config.data.synthetic
  points = [(n, m) for m in config.curve.unlabelled for n in config.curve.labelled]
  results = {}
  for i, (n, m) in enumerate(points):
    if own is not None and (n, m) == (s.n_labelled, s.n_unlabelled):
      results[(n, m)] = own
      continue
    say(f"\n[curve] point {i + 1}/{len(points)}: {n} labelled CXRs, {m} unlabelled pairs")
    results[(n, m)] = run_point(point_config(config, n, m), point_dir(workdir, n, m))
  curve = {"points": [_point_summary(n, m, results[(n, m)]) for n, m in points],
           "n_test": next(iter(results.values()))["n_test"]}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "curve.json"), "w") as f:
      json.dump(curve, f, indent=2)
    text = curve_markdown(curve)
    with open(os.path.join(workdir, "curve.md"), "w") as f:
      f.write(text)
    plot_curve(curve, os.path.join(workdir, "curve.png"))
    say(f"\n[curve] test AUC against labelled CXRs:\n\n{text}\ncurve: "
        f"{os.path.join(workdir, 'curve.png')}")
  return curve


def _point_summary(labelled: int, unlabelled: int, results: dict) -> dict:
  rows = {r["model"]: r for r in results["rows"]}
  return {"labelled": labelled, "unlabelled": unlabelled,
          "auc": {m: {"value": rows[m]["auc"], "lo": rows[m]["auc_ci"][0], "hi": rows[m]["auc_ci"][1]}
                  for m in MODELS + ("ctpa_only",)},
          "distilled_minus_xray_only": results["paired_auc"]["distilled_minus_xray_only"]}


def _ci(d: dict, signed: bool = False) -> str:
  f = "{:+.3f}" if signed else "{:.3f}"
  return f"{f.format(d['value'])} [{f.format(d['lo'])}, {f.format(d['hi'])}]"


def curve_markdown(curve: dict) -> str:
  header = ["unlabelled pairs", "labelled CXRs", *[LEGEND[m] for m in MODELS],
            "distilled - X-ray only (paired)", "CTPA teacher"]
  body = [[str(p["unlabelled"]), str(p["labelled"]), *[_ci(p["auc"][m]) for m in MODELS],
           _ci(p["distilled_minus_xray_only"], signed=True), f"{p['auc']['ctpa_only']['value']:.3f}"]
          for p in curve["points"]]
  return (f"Test AUC [95% bootstrap CI], n = {curve['n_test']} test CXRs at every point.\n\n"
          + markdown_rows(header, body) + "\n")


def plot_curve(curve: dict, path: str) -> str:
  """One column per number of unlabelled pairs: AUC against labels (top), the paired difference
  distilled - X-ray only (bottom)."""
  unlabelled = sorted({p["unlabelled"] for p in curve["points"]})
  fig = figure(5.0 * len(unlabelled), 7.0)
  for j, m in enumerate(unlabelled):
    pts = sorted((p for p in curve["points"] if p["unlabelled"] == m), key=lambda p: p["labelled"])
    x = np.array([p["labelled"] for p in pts])
    top = fig.add_subplot(2, len(unlabelled), j + 1)
    for model in MODELS:
      v = np.array([[p["auc"][model][k] for k in ("value", "lo", "hi")] for p in pts])
      line, = top.plot(x, v[:, 0], marker="o", label=LEGEND[model])
      top.fill_between(x, v[:, 1], v[:, 2], color=line.get_color(), alpha=0.15)
    top.set_xscale("log")
    top.set_title(f"{m} unlabelled pairs")
    top.set_ylabel("test AUC")
    top.grid(alpha=0.3)
    if j == 0:
      top.legend(fontsize="small")
    bottom = fig.add_subplot(2, len(unlabelled), len(unlabelled) + j + 1, sharex=top)
    d = np.array([[p["distilled_minus_xray_only"][k] for k in ("value", "lo", "hi")] for p in pts])
    bottom.axhline(0.0, color="black", lw=0.8)
    bottom.errorbar(x, d[:, 0], yerr=[d[:, 0] - d[:, 1], d[:, 2] - d[:, 0]], marker="o", capsize=3)
    bottom.set_xticks(x, [str(v) for v in x])  # the points' sizes, not powers of ten
    bottom.xaxis.set_minor_locator(NullLocator())
    bottom.set_xlabel("labelled CXRs")
    bottom.set_ylabel("AUC distilled - X-ray only")
    bottom.grid(alpha=0.3)
  fig.suptitle(f"PE from CXR: label efficiency (test n = {curve['n_test']})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path
