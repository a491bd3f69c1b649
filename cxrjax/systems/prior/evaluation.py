"""Stage 4: PE diagnosis from test CXRs through h(prior(CXR)), against both baselines."""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from cxrjax.core.writers import say
from cxrjax.evaluate.classification import (binary_report, confusion_at, model_auc_difference,
                                            youden_threshold)
from cxrjax.evaluate.report import evaluation_dir, markdown_table, plot_roc, write_results_files
from cxrjax.systems.prior import references

EVALUATION_KEYS = ("sampling", "eval")  # what may change on trained stages
DISPLAY_NAMES = {
    "ctpa_only": "CTPA only classifier",
    "xray_only": "X-ray only classifier",
    "distilled": "Cross-Modal CXR-CTPA Knowledge Distillation",
    "soft_label_lr": "reference: CXR logistic regression on the teacher's soft labels, all pairs",
    "ridge_teacher": "reference: ridge map CXR->CTPA on all pairs, then the teacher",
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


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
  """Mean over rows of the cosine similarity of a (N, D) and b (N, D)."""
  a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
  return float(np.mean(np.sum(a * b, axis=1)))


def cosine_summary(cxr: np.ndarray, ctpa: np.ndarray, generated: np.ndarray) -> dict:
  """The seed's logged similarities (normalised space), averaged over rows."""
  out = {"generated_vs_ctpa": _cosine(generated, ctpa)}
  if cxr.shape[1] == ctpa.shape[1]:
    out["cxr_vs_ctpa"] = _cosine(cxr, ctpa)
    out["cxr_vs_generated"] = _cosine(cxr, generated)
  return out


def evaluate(sampler, prior_params, teacher, xray, cxr_norm, ctpa_norm, valid, test, pairs, *,
             config, mesh, workdir: str) -> dict:
  """Stage 4: samples CTPA embeddings for the validation and test CXRs, scores the three models
  and the two linear references (`references`, fitted on `pairs` = (cxr, ctpa) raw embeddings of
  every training pair), writes results.json / results.md / roc.png / generated_test.npz, prints
  the table. New sampling / eval settings on a finished workdir write beside the first result
  (evaluate.report.evaluation_dir)."""
  workdir = evaluation_dir(workdir, config.to_dict(), EVALUATION_KEYS)
  sc = config.sampling
  say(f"[evaluation] sampling {sc.num_samples} CTPA embedding(s) per validation and test CXR "
      f"({sc.steps} {'DDPM' if sc.steps == config.diffusion.timesteps else 'DDIM'} steps, "
      f"best of {sc.best_of})")
  ec = config.eval
  pairs_cxr, pairs_ctpa = pairs
  soft_label_lr = references.soft_label_regression(
      pairs_cxr, teacher.predict_proba(pairs_ctpa, mesh),
      inverse_regularisation=ec.references.soft_label_C)
  ridge = references.ridge_map(pairs_cxr, pairs_ctpa, alpha=ec.references.ridge_alpha)
  gen, probs, mapped = {}, {}, {}
  for name, split in (("valid", valid), ("test", test)):
    gen[name] = sampler.generate(prior_params, cxr_norm.apply(split.cxr), mesh)
    n, k, d = gen[name].shape
    # The distilled prediction averages the teacher over the prior's samples: a Monte Carlo
    # estimate of E[h(CTPA) | CXR] (one sample when num_samples=1, as in the seed).
    raw = np.asarray(ctpa_norm.invert(gen[name].reshape(n * k, d)))
    mapped[name] = ridge(split.cxr)
    probs[name] = {
        "ctpa_only": teacher.predict_proba(split.ctpa, mesh),
        "xray_only": xray.predict_proba(split.cxr, mesh),
        "distilled": teacher.predict_proba(raw, mesh).reshape(n, k).mean(axis=1),
        "soft_label_lr": soft_label_lr(split.cxr),
        "ridge_teacher": teacher.predict_proba(mapped[name], mesh),
    }
  rows = [model_row(m, (valid.label, probs["valid"][m]), (test.label, probs["test"][m]),
                    n_bootstrap=ec.n_bootstrap, seed=ec.seed) for m in DISPLAY_NAMES]
  paired = {f"distilled_minus_{b}": dict(zip(("value", "lo", "hi"), model_auc_difference(
      test.label, probs["test"]["distilled"], probs["test"][b], n_resamples=ec.n_bootstrap,
      seed=ec.seed))) for b in ("xray_only", "ridge_teacher")}
  cosine = cosine_summary(cxr_norm.apply(test.cxr), ctpa_norm.apply(test.ctpa), gen["test"][:, 0])
  # The seed's diagnostic of a prior, for the prior and the ridge map side by side (validation,
  # normalised space): how close a prediction of the CTPA embedding lies to the true one. Every
  # embedding shares a large mean, so the cosine is also given after subtracting the training
  # pairs' mean CTPA embedding: what is left is the patient-specific part.
  true_valid = np.asarray(ctpa_norm.apply(valid.ctpa))
  mean = np.asarray(ctpa_norm.apply(pairs_ctpa)).mean(axis=0)
  predicted = {"prior_sample": gen["valid"][:, 0], "prior_sample_mean": gen["valid"].mean(axis=1),
               "ridge_map": np.asarray(ctpa_norm.apply(mapped["valid"]))}
  cosine["validation"] = {k: _cosine(v, true_valid) for k, v in predicted.items()}
  cosine["validation_centred"] = {k: _cosine(v - mean, true_valid - mean) for k, v in predicted.items()}
  if jax.process_index() == 0:
    np.savez(os.path.join(workdir, "generated_test.npz"), generated=gen["test"][:, 0],
             samples=gen["test"], ids=test.ids, label=test.label,
             **{f"prob_{k}": v for k, v in probs["test"].items()})
  table = write_results(workdir, rows, config_dict=config.to_dict(), n_test=len(test),
                        n_valid=len(valid), cosine=cosine, paired=paired,
                        curves={m: (test.label, probs["test"][m]) for m in DISPLAY_NAMES})
  say(f"\nPE classification on the test set (n={len(test)}), thresholds by Youden's J on "
      f"validation; AUC with 95% bootstrap CI ({ec.n_bootstrap} resamples):\n\n{table}\n"
      f"results: {os.path.join(workdir, 'results.json')}  ROC: {os.path.join(workdir, 'roc.png')}")
  if jax.process_index() != 0:  # the files are process 0's; the numbers are everyone's
    return {"rows": rows, "paired_auc": paired, "n_test": len(test), "prior_cosine": cosine}
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def paired_lines(paired: dict, cosine: dict) -> str:
  """The lines under the table: the paired AUC differences and the prior's diagnostic."""
  def diff(key):
    d = paired[key]
    return f"{d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
  lines = [f"AUC distilled - X-ray only: {diff('distilled_minus_xray_only')}; distilled - ridge "
           f"reference: {diff('distilled_minus_ridge_teacher')} (paired bootstrap 95% CIs)."]
  if "validation" in cosine:
    v, c = cosine["validation"], cosine["validation_centred"]
    lines.append(
        f"Cosine to the true CTPA embedding (validation; after subtracting the mean embedding): "
        f"prior sample {v['prior_sample']:.3f} ({c['prior_sample']:.3f}), mean of the prior's "
        f"samples {v['prior_sample_mean']:.3f} ({c['prior_sample_mean']:.3f}), ridge map "
        f"{v['ridge_map']:.3f} ({c['ridge_map']:.3f}).")
  return "\n".join(lines) + "\n"


def write_results(workdir: str, rows: list[dict], *, config_dict: dict, n_test: int, n_valid: int,
                  cosine: dict, paired: dict, curves: dict) -> str:
  """Writes results.json, results.md and roc.png (process 0 only); returns the markdown table
  with the paired differences under it."""
  table = markdown_table(rows, names=DISPLAY_NAMES,
                         columns=("model", "auc", "accuracy", "specificity", "sensitivity",
                                  "auprc", "threshold")) + "\n" + paired_lines(paired, cosine)
  if jax.process_index() == 0:
    results = {"rows": rows, "config": config_dict, "n_test": n_test, "n_valid": n_valid,
               "prior_cosine": cosine, "paired_auc": paired}
    write_results_files(workdir, results, table, indent=2)
    plot_roc({DISPLAY_NAMES[k]: v for k, v in curves.items()}, os.path.join(workdir, "roc.png"),
             title=f"PE from CXR: test set (n={n_test})")
  return table
