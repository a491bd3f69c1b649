"""Stage 4: PE diagnosis from test CXRs through h(prior(CXR)), against both baselines."""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from cxrjax.core.writers import say
from cxrjax.evaluate.classification import binary_report, confusion_at, youden_threshold
from cxrjax.evaluate.report import evaluation_dir, markdown_table, plot_roc, write_results_files

EVALUATION_KEYS = ("sampling", "eval")  # what may change on trained stages
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


def evaluate(sampler, prior_params, teacher, xray, cxr_norm, ctpa_norm, valid, test, *, config, mesh,
             workdir: str) -> dict:
  """Stage 4: samples CTPA embeddings for the validation and test CXRs, scores all three models,
  writes results.json / results.md / roc.png / generated_test.npz, prints the table. New
  sampling / eval settings on a finished workdir write beside the first result
  (evaluate.report.evaluation_dir)."""
  workdir = evaluation_dir(workdir, config.to_dict(), EVALUATION_KEYS)
  sc = config.sampling
  say(f"[evaluation] sampling {sc.num_samples} CTPA embedding(s) per validation and test CXR "
      f"({sc.steps} {'DDPM' if sc.steps == config.diffusion.timesteps else 'DDIM'} steps, "
      f"best of {sc.best_of})")
  gen, probs = {}, {}
  for name, split in (("valid", valid), ("test", test)):
    gen[name] = sampler.generate(prior_params, cxr_norm.apply(split.cxr), mesh)
    n, k, d = gen[name].shape
    # The distilled prediction averages the teacher over the prior's samples: a Monte Carlo
    # estimate of E[h(CTPA) | CXR] (one sample when num_samples=1, as in the seed).
    raw = np.asarray(ctpa_norm.invert(gen[name].reshape(n * k, d)))
    probs[name] = {
        "ctpa_only": teacher.predict_proba(split.ctpa, mesh),
        "xray_only": xray.predict_proba(split.cxr, mesh),
        "distilled": teacher.predict_proba(raw, mesh).reshape(n, k).mean(axis=1),
    }
  ec = config.eval
  rows = [model_row(m, (valid.label, probs["valid"][m]), (test.label, probs["test"][m]),
                    n_bootstrap=ec.n_bootstrap, seed=ec.seed) for m in DISPLAY_NAMES]
  cosine = cosine_summary(cxr_norm.apply(test.cxr), ctpa_norm.apply(test.ctpa), gen["test"][:, 0])
  if jax.process_index() == 0:
    np.savez(os.path.join(workdir, "generated_test.npz"), generated=gen["test"][:, 0],
             samples=gen["test"], ids=test.ids, label=test.label,
             **{f"prob_{k}": v for k, v in probs["test"].items()})
  table = write_results(workdir, rows, config_dict=config.to_dict(), n_test=len(test),
                        n_valid=len(valid), cosine=cosine,
                        curves={m: (test.label, probs["test"][m]) for m in DISPLAY_NAMES})
  say(f"\nPE classification on the test set (n={len(test)}), thresholds by Youden's J on "
      f"validation; AUC with 95% bootstrap CI ({ec.n_bootstrap} resamples):\n\n{table}\n\n"
      f"results: {os.path.join(workdir, 'results.json')}  ROC: {os.path.join(workdir, 'roc.png')}")
  if jax.process_index() != 0:
    return {"rows": rows}
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def write_results(workdir: str, rows: list[dict], *, config_dict: dict, n_test: int, n_valid: int,
                  cosine: dict, curves: dict) -> str:
  """Writes results.json, results.md and roc.png (process 0 only); returns the markdown table."""
  table = markdown_table(rows, names=DISPLAY_NAMES,
                         columns=("model", "auc", "accuracy", "specificity", "sensitivity",
                                  "auprc", "threshold"))
  if jax.process_index() == 0:
    results = {"rows": rows, "config": config_dict, "n_test": n_test, "n_valid": n_valid,
               "prior_cosine": cosine}
    write_results_files(workdir, results, table, indent=2)
    plot_roc({DISPLAY_NAMES[k]: v for k, v in curves.items()}, os.path.join(workdir, "roc.png"),
             title=f"PE from CXR: test set (n={n_test})")
  return table
