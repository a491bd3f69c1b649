"""FMKD stages 5-6: per-class metrics over seeds, direct transfer, bias analysis, results files.

Metrics (spec B.5), per class and macro, mean +- SD (ddof 1) over the seeds: AUC-ROC, AUC-PR
(step-wise AP), max Youden J and J at the ROC point with FPR closest to eval.target_fpr.
Bias (B.6): de-duplicate -> PCA(0.99) -> per-race stratified samples -> KS on PCA modes 1-4 for
the disease control, every race pair and Male vs Female -> BY over all -> bucketed -> score.
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np

from cxrjax.core.writers import say
from cxrjax.data.labels import CHEXPERT_LABELS
from cxrjax.evaluate.bias import Comparison, analyse_bias, fit_pca, pairs_of
from cxrjax.evaluate.bias_plots import plot_modes, plot_tsne
from cxrjax.evaluate.report import evaluation_dir, markdown_rows, write_results_files
from cxrjax.evaluate.subgroups import LABELS_BY_RELEVANCE, mean_sd_over_seeds, per_class_metrics

MODELS = ("teacher_lp", "fmkd_lp", "fmkd_direct_lp", "fmkd_ft", "scratch")
DISPLAY = {"teacher_lp": "CXR-FM-LP (teacher)", "fmkd_lp": "CXR-FMKD-LP",
           "fmkd_direct_lp": "CXR-FMKD-Direct-LP", "fmkd_ft": "CXR-FMKD-FFT",
           "scratch": "CXR-Model-FFT (scratch)"}
BIAS_DISPLAY = {"teacher": "CXR-FM (teacher)", "fmkd": "CXR-FMKD (student)",
                "fmkd_ft": "CXR-FMKD-FFT", "scratch": "CXR-Model (scratch)"}
METRICS = ("auc", "auprc", "max_j", "j_at_fpr")
METRIC_NAMES = {"auc": "AUC-ROC", "auprc": "AUC-PR", "max_j": "max J", "j_at_fpr": "J at FPR"}
MIN_GROUP = 5  # smallest race group for the stratified sampler; below it all rows are used


def _clean(x):
  """JSON-safe: NaN -> None, numpy -> Python."""
  if isinstance(x, dict):
    return {str(k): _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return None if math.isnan(float(x)) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.ndarray):
    return _clean(x.tolist())
  return x


def performance(probs: dict, labels: np.ndarray, rows: np.ndarray, target_fpr: float) -> dict:
  """{model: {'per_seed': [{label: {metric}}], 'summary': {label: {metric: {mean, sd, pct_sd}}}}}
  on test rows `rows`; probs[model] is a list over seeds of (N_test, 14)."""
  out = {}
  for model, per_seed in probs.items():
    seeds = []
    for p in per_seed:
      table = per_class_metrics(labels[rows], p[rows], list(CHEXPERT_LABELS), target_fpr)
      seeds.append({r["label"]: {k: r[k] for k in METRICS} for r in table})
    flat = [{f"{lab}|{k}": v for lab, d in s.items() for k, v in d.items()} for s in seeds]
    summary: dict = {}
    for key, stats in mean_sd_over_seeds(flat).items():
      lab, k = key.split("|")
      summary.setdefault(lab, {})[k] = stats
    out[model] = {"per_seed": seeds, "summary": summary}
  return out


def _pm(stats: dict, decimals: int = 3) -> str:
  m, s = stats["mean"], stats["sd"]
  if m is None or (isinstance(m, float) and math.isnan(m)):
    return "n/a"
  sd = "" if s is None or (isinstance(s, float) and math.isnan(s)) else f" ± {s:.{decimals}f}"
  return f"{m:.{decimals}f}{sd}"


def per_class_table(perf: dict, metric: str = "auc") -> str:
  """Rows: labels by relevance + Macro; columns: models; cells mean ± SD over seeds."""
  models = [m for m in MODELS if m in perf]
  rows = [[lab] + [_pm(perf[m]["summary"][lab][metric]) for m in models]
          for lab in (*LABELS_BY_RELEVANCE, "Macro")]
  return markdown_rows(["label"] + [DISPLAY[m] for m in models], rows)


def macro_table(perf: dict) -> str:
  rows = [[DISPLAY[m]] + [_pm(perf[m]["summary"]["Macro"][k]) for k in METRICS]
          for m in MODELS if m in perf]
  return markdown_rows(["model"] + [METRIC_NAMES[k] for k in METRICS], rows)


def transfer_table(by_domain: dict) -> str:
  """Macro AUC-ROC in-domain vs on unseen sites, with the change."""
  rows = []
  for m in MODELS:
    a = by_domain["in_domain"][m]["summary"]["Macro"]["auc"]
    b = by_domain["transfer"][m]["summary"]["Macro"]["auc"]
    rows.append([DISPLAY[m], _pm(a), _pm(b), f"{b['mean'] - a['mean']:+.3f}"])
  header = ["model", "in-domain macro AUC-ROC", "unseen sites macro AUC-ROC", "change"]
  return markdown_rows(header, rows)


def comparisons_for(groups: dict) -> tuple:
  """Disease control, race pairs (those present, sorted), Male vs Female (spec B.6.6)."""
  out = [Comparison("disease", "Pleural Effusion", "No Finding", scored=False)]
  out += list(pairs_of("race", sorted(set(groups["race"]) - {"unknown"})))
  out.append(Comparison("sex", "Male", "Female"))
  return tuple(out)


def bias_analysis(feats: dict, test, *, config, workdir: str) -> tuple[dict, str]:
  """analyse_bias on each model's test features; PCA and t-SNE PNGs coloured by race.
  Returns ({model: scores and p-values}, markdown)."""
  bc = config.bias
  groups = test.groups()
  comparisons = comparisons_for(groups)
  sizes = {g: int((groups["race"] == g).sum()) for g in set(groups["race"])}
  smallest = min(sizes.values())
  n_per_group = min(bc.n_per_group, smallest)
  balanced = smallest >= MIN_GROUP
  out, md = {}, []
  for model in bc.models:
    if model not in feats:
      continue
    x = np.asarray(feats[model], np.float64)
    res = analyse_bias(x, groups, comparisons=comparisons,
                       balance_key="race" if balanced else None, n_per_group=n_per_group,
                       n_simulations=bc.n_simulations, seed=bc.seed)
    out[model] = {"combined": res.combined, "attribute": res.scores["attribute"],
                  "pair": res.scores["pair"], "combined_mode1": res.scores_mode1["combined"],
                  "columns_average": res.scores["columns_average"],
                  "explained_variance_ratio": res.explained_variance_ratio,
                  "p_adjusted": {c.name: res.p_adjusted[:, j] for j, c in enumerate(comparisons)},
                  "n_simulations": res.n_simulations, "n_unique": res.n_unique,
                  "n_per_group": n_per_group if balanced else None, "feature_dim": x.shape[1]}
    md.append(f"#### {BIAS_DISPLAY[model]} ({x.shape[1]}-d)\n\n{res.to_markdown()}")
    if jax.process_index() == 0:
      pca = fit_pca(x, 0.99, bc.seed)
      z = pca.projections
      plot_modes(z[:, :4], groups["race"], title=f"{BIAS_DISPLAY[model]}: PCA by race",
                 path=os.path.join(workdir, f"bias_pca_{model}.png"))
      plot_tsne(z, groups["race"], n_subsample=bc.tsne_subsample, seed=bc.seed,
                title=f"{BIAS_DISPLAY[model]}: t-SNE by race",
                path=os.path.join(workdir, f"bias_tsne_{model}.png"))
  # Two decimals, as the per-model tables print them: a small nonzero score must not read as 0.
  rows = [[BIAS_DISPLAY[m], f"{r['attribute'].get('race', float('nan')):.2f}",
           f"{r['attribute'].get('sex', float('nan')):.2f}", f"{r['combined']:.2f}",
           f"{r['combined_mode1']:.2f}"] for m, r in out.items()]
  sampling = (f"{n_per_group} per race group (smallest group: {smallest}), "
              f"{bc.n_simulations} simulations" if balanced else
              f"all {len(test)} test rows, no rebalancing (smallest race group: {smallest} < {MIN_GROUP})")
  header = ["model", "race score", "sex score", "combined", "combined (PCA mode 1)"]
  summary = markdown_rows(header, rows)
  return out, f"Sampling: {sampling}.\n\n{summary}\n\n" + "\n\n".join(md)


def evaluate(probs: dict, bias_feats: dict, test, domains: dict, *, config, workdir: str,
             counts: dict) -> dict:
  """Computes every table, writes results.json / results.md / PNGs, prints the tables (beside an
  earlier result made with other eval / bias settings: evaluate.report.evaluation_dir)."""
  workdir = evaluation_dir(workdir, config.to_dict(), ("eval", "bias"))
  fpr = config.eval.target_fpr
  by_domain = {d: performance(probs, test.labels, rows, fpr) for d, rows in domains.items()}
  bias, bias_md = bias_analysis(bias_feats, test, config=config, workdir=workdir)
  seeds = tuple(config.eval.seeds)
  parts = [f"# CXR-FMKD on phantoms ({config.variant}): {len(seeds)} seed(s) {seeds}",
           f"Studies: {counts}. Test metrics, mean ± SD over seeds; J at FPR {fpr}."]
  for d in by_domain:
    title = "in-domain test (source sites)" if d == "in_domain" else "direct transfer (unseen sites)"
    parts += [f"## Macro metrics, {title}", macro_table(by_domain[d]),
              f"## Per-class AUC-ROC, {title}", per_class_table(by_domain[d])]
  if {"in_domain", "transfer"} <= set(by_domain):
    parts += ["## Direct transfer: source sites -> unseen sites, no retraining",
              transfer_table(by_domain)]
  parts += ["## Bias analysis (test features; higher = more subgroup information)", bias_md]
  text = "\n\n".join(parts)
  results = _clean({"config": config.to_dict(), "counts": counts, "seeds": list(seeds),
                    "performance": by_domain, "bias": bias, "models": DISPLAY})
  if jax.process_index() == 0:
    write_results_files(workdir, results, text)
  say("\n" + text + f"\n\nresults: {os.path.join(workdir, 'results.json')}")
  return results
