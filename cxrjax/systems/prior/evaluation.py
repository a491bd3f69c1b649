"""Stage 4: PE diagnosis from test CXRs through h(prior(CXR)), against both baselines."""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from cxrjax.evaluate.classification import binary_report, confusion_at, youden_threshold
from cxrjax.evaluate.report import markdown_table, plot_roc

DISPLAY_NAMES = {
    "ctpa_only": "CTPA only classifier",
    "xray_only": "X-ray only classifier",
    "distilled": "Cross-Modal CXR-CTPA Knowledge Distillation",
}


def model_row(model: str, valid: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
              *, n_bootstrap: int, seed: int) -> dict:
  """Metrics on test at the Youden threshold chosen on validation, plus those at 0.5.

  valid, test: (labels (N,), probabilities (N,)).
  """
  threshold = youden_threshold(*valid)
  row = {"model": model, **binary_report(*test, threshold=threshold, n_resamples=n_bootstrap,
                                         seed=seed)}
  at_half = confusion_at(*test, 0.5)
  row["at_0.5"] = {k: float(at_half[k]) for k in ("accuracy", "sensitivity", "specificity")}
  return row


def cosine_summary(cxr: np.ndarray, ctpa: np.ndarray, generated: np.ndarray) -> dict:
  """The seed's logged similarities (normalised space), averaged over rows."""
  def cos(a, b):
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float(np.mean(np.sum(a * b, axis=1)))
  out = {"generated_vs_ctpa": cos(generated, ctpa)}
  if cxr.shape[1] == ctpa.shape[1]:
    out["cxr_vs_ctpa"] = cos(cxr, ctpa)
    out["cxr_vs_generated"] = cos(cxr, generated)
  return out


def write_results(workdir: str, rows: list[dict], *, config_dict: dict, n_test: int, n_valid: int,
                  cosine: dict, curves: dict) -> str:
  """Writes results.json, results.md and roc.png (process 0 only); returns the markdown table."""
  table = markdown_table(rows, names=DISPLAY_NAMES,
                         columns=("model", "auc", "accuracy", "specificity", "sensitivity",
                                  "auprc", "threshold"))
  if jax.process_index() == 0:
    results = {"rows": rows, "config": config_dict, "n_test": n_test, "n_valid": n_valid,
               "prior_cosine": cosine}
    tmp = os.path.join(workdir, "results.json.tmp")
    with open(tmp, "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(workdir, "results.json"))  # never a half-written results file
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(table + "\n")
    plot_roc({DISPLAY_NAMES[k]: v for k, v in curves.items()}, os.path.join(workdir, "roc.png"),
             title=f"PE from CXR: test set (n={n_test})")
  return table
