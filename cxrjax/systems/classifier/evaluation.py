"""The classifier's test report: per-label and macro AUROC / AUPRC with bootstrap CIs
(evaluate.multilabel), results files and ROC curves."""
from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np

from cxrjax.core.writers import say
from cxrjax.data.labels import CHEXPERT_LABELS
from cxrjax.evaluate.multilabel import macro, macro_value, per_label, table  # noqa: F401
from cxrjax.evaluate.report import evaluation_dir, plot_roc, write_results_files


def report(labels: np.ndarray, probs: np.ndarray, *, config, workdir: str, counts: dict,
           best_step: int, names: Sequence[str] = CHEXPERT_LABELS, dataset: str = "",
           unmatched: dict | None = None) -> dict:
  """Computes the metrics, writes results.json / results.md / roc.png, prints the table (beside an
  earlier result made with other eval settings: evaluate.report.evaluation_dir). ``names``: the
  label names of the columns; ``dataset``: the prepared dataset scored ('cxr_folder/covid');
  ``unmatched``: {'model_only', 'data_only'} names when it is not the training dataset."""
  workdir = evaluation_dir(workdir, config.to_dict(), ("eval",))
  ec = config.eval
  kw = dict(n_resamples=ec.n_bootstrap, alpha=ec.alpha, seed=ec.seed)
  rows, mac = per_label(labels, probs, names=list(names), **kw), macro(labels, probs, **kw)
  split = ec.split if unmatched is not None else "test"
  parts = [f"# DenseNet classifier on {dataset or config.data.builder} ({config.variant}), {split} split",
           f"Studies: {counts}; checkpoint of step {best_step} (best validation macro AUROC); "
           f"{ec.n_bootstrap} bootstrap resamples over studies."]
  if unmatched is not None:
    parts.append(f"Labels matched by name; not scored: the model's {unmatched['model_only'] or 'none'}, "
                 f"the data's {unmatched['data_only'] or 'none'}.")
  text = "\n\n".join([*parts, table(rows, mac, 1 - ec.alpha)])
  results = {"config": config.to_dict(), "counts": counts, "best_step": best_step,
             "dataset": dataset, "per_label": rows, "macro": mac}
  if unmatched is not None:
    results["unmatched_labels"] = unmatched
  if jax.process_index() == 0:
    write_results_files(workdir, results, text)
    ranked = sorted((r for r in rows if r["auroc"]), key=lambda r: -r["positives"])[:6]
    if ranked:
      curves = {}
      for r in ranked:
        j = list(names).index(r["label"])
        known = np.isfinite(labels[:, j])
        curves[r["label"]] = (labels[known, j], probs[known, j])
      plot_roc(curves, os.path.join(workdir, "roc.png"), title="Test ROC, most frequent labels")
  say("\n" + text + f"\n\nresults: {os.path.join(workdir, 'results.json')}")
  return results
