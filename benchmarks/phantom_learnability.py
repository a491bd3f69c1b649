"""Phantom learnability: can a small CNN read every label's sign, and are mild cases harder?

  python benchmarks/phantom_learnability.py [--train 4000] [--test 2000] [--size 128] [--steps 1200]
      [--targets stored|stored_nf|truth] [--train_min_high 0] [--out results.json] [--plot auroc.png]
      [--scores scores.npz] [--workdir DIR]

Trains ``models.small_cnn.SmallCNN`` with the core loop on frontal phantoms (by default on the
stored labels with U-ignore and masked BCE, what a user of the phantom dataset trains on;
``--targets truth`` gives the ceiling set by the images alone), then scores the held-out phantoms
against the *truth* (not the noisy, sparsely mentioned stored labels). Per label: AUROC over all
test studies; AUROC of high-severity positives (severity >= 0.6) against all negatives; AUROC of
mild positives (0 < severity < 0.3) against all negatives; each with a 95% percentile bootstrap CI
and its counts; and high minus mild with a paired bootstrap CI (mild cases are measurably harder
where it excludes 0). Support Devices has severity 1 whenever present (its "high" row is its overall
one, no mild cases) and No Finding severity 0 (neither bucket).

Which studies. Under the default PhantomConfig some labels are rare (Pleural Other 1.3%, Fracture
2.5%, Lung Lesion 3.5%) and high-severity positives are ~9% of positives, so a natural sample of
2000 test studies holds one or two high-severity Pleural Other cases. PhantomConfig has no
prevalence knob, and the generator is not ours to tune here, so instead a larger pool of studies
is *sampled* (attributes only: ~0.25 ms each, nothing rendered) and enriched: for each of the 12
pathologies the earliest pool studies that bring it up to a quota (training: positives, and
with --train_min_high also high-severity positives; test: high-severity and mild positives) are
taken first, then the earliest remaining studies fill the
split (natural prevalence). Enrichment selects whole studies, so co-occurring findings come along
as the generator made them. Train and test pools are disjoint index ranges, hence disjoint patients.

Deterministic for given flags on one machine (fixed seeds, the loop's fold_in(rng, step) and the
iterator's seeded permutations).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from typing import Sequence

import jax
import numpy as np

from cxrjax.data.labels import (CHEXPERT_LABELS, LABEL_INDEX, NUM_LABELS, apply_uncertain_policy,
                                no_finding_implies_negatives)
from cxrjax.data.phantoms.attributes import PATHOLOGIES, PhantomConfig, sample_study
from cxrjax.data.phantoms.render import render_frontal
from cxrjax.data.phantoms.world import make_arrays
from cxrjax.evaluate.classification import bootstrap_ci, paired_auc_difference, roc_auc
from cxrjax.models.small_cnn import SmallCNN
from cxrjax.tasks.small_cnn import DEFAULT_OPTIM, predict, train_cnn

HIGH, MILD = 0.6, 0.3  # severity >= HIGH is "high", severity < MILD is "mild"
TEST_START = 10_000_000  # first study index of the test pool: far from the training pool


# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #
def frontal_renderer(attrs, size: int):
  """world.Renderer drawing the frontal view only: the lateral would cost as much and go unused."""
  return [render_frontal(attrs, size)], [attrs.frontal_view]


def _quota_masks(truth: np.ndarray, severity: np.ndarray, j: int, quotas: dict) -> list:
  """[(mask over the pool (P,), quota)] of label j for the positive / high / mild quotas."""
  pos = truth[:, j]
  sev = severity[:, j]
  return [(pos, quotas.get("pos", 0)), (pos & (sev >= HIGH), quotas.get("high", 0)),
          (pos & (sev > 0) & (sev < MILD), quotas.get("mild", 0))]


def select_studies(seed: int, start: int, n: int, *, config: PhantomConfig = PhantomConfig(),
                   quotas: dict | None = None, labels: Sequence[str] = PATHOLOGIES, chunk: int = 5000,
                   max_pool: int = 200_000) -> np.ndarray:
  """(n,) sorted study indices from start, enriched so each of `labels` meets `quotas`.

  quotas: {'pos': positives, 'high': positives with severity >= HIGH, 'mild': positives with
  0 < severity < MILD} per label. The pool start.. grows by `chunk` studies until it can meet
  every quota (or reaches max_pool: then a quota may fall short, and the counts printed by the
  evaluation say so). See the module docstring for the selection rule.
  """
  quotas = quotas or {}
  label_idx = [LABEL_INDEX[name] for name in labels]
  truth, severity = np.zeros((0, NUM_LABELS), bool), np.zeros((0, NUM_LABELS), np.float32)
  while True:
    first = start + len(truth)
    drawn = [sample_study(seed, i, config) for i in range(first, first + chunk)]
    truth = np.concatenate([truth, np.stack([a.truth for a in drawn])])
    severity = np.concatenate([severity, np.stack([a.severity for a in drawn])])
    enough = all(mask.sum() >= q for j in label_idx
                 for mask, q in _quota_masks(truth, severity, j, quotas))
    if (enough and len(truth) >= n) or len(truth) >= max_pool:
      break
  chosen = np.zeros(len(truth), bool)
  for j in label_idx:
    for mask, q in _quota_masks(truth, severity, j, quotas):
      need = q - int((chosen & mask).sum())
      if need > 0:
        chosen[np.flatnonzero(mask & ~chosen)[:need]] = True
  if chosen.sum() > n:
    raise ValueError(f"the quotas {quotas} need {int(chosen.sum())} studies, more than n={n}")
  chosen[np.flatnonzero(~chosen)[:n - int(chosen.sum())]] = True
  return start + np.flatnonzero(chosen)


def make_split(seed: int, indices, size: int, config: PhantomConfig = PhantomConfig()) -> dict:
  """Frontal images (N, size, size) uint8, labels (N, 14) float32 {1, 0, -1, NaN}, truth (N, 14)
  bool, severity (N, 14) float32, shortcut (N,) float32 (the token drawn), index (N,) of the
  given studies."""
  arr = make_arrays(seed, indices, config, size, render=frontal_renderer)
  return {"images": arr["images"][:, 0], "labels": arr["labels"], "truth": arr["truth"],
          "severity": arr["severity"], "shortcut": arr["shortcut"], "index": arr["index"]}


TARGETS = ("stored", "stored_nf", "truth")


def training_targets(split: dict, targets: str = "stored") -> np.ndarray:
  """(N, 14) float32 training targets in {1, 0, NaN} (NaN: masked out of the loss).

  stored: the stored labels, U-ignore (-1 and unmentioned -> NaN) -- what a dataset user has;
  stored_nf: the same after the MIMIC rule No Finding = 1 => unmentioned pathologies 0
    (labels.no_finding_implies_negatives);
  truth: the generator's truth, every entry labelled -- the ceiling set by the images alone.
  """
  if targets == "stored":
    return apply_uncertain_policy(split["labels"], "ignore")
  if targets == "stored_nf":
    return apply_uncertain_policy(no_finding_implies_negatives(split["labels"]), "ignore")
  if targets == "truth":
    return split["truth"].astype(np.float32)
  raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")


# --------------------------------------------------------------------------- #
# evaluation
# --------------------------------------------------------------------------- #
def _auc_entry(y: np.ndarray, s: np.ndarray, n_resamples: int, seed: int) -> dict:
  """{'auc', 'ci': [lo, hi], 'n_pos', 'n_neg'}; auc/ci None when a class is missing."""
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if n_pos == 0 or n_neg == 0:
    return {"auc": None, "ci": None, "n_pos": n_pos, "n_neg": n_neg}
  lo, hi = bootstrap_ci(y, s, "auc", n_resamples=n_resamples, seed=seed)
  return {"auc": roc_auc(y, s), "ci": [lo, hi], "n_pos": n_pos, "n_neg": n_neg}


def _gap_entry(y: np.ndarray, s: np.ndarray, high: np.ndarray, mild: np.ndarray, n_resamples: int,
               seed: int) -> dict:
  """{'gap', 'ci'}: high-severity minus mild AUROC (both against every negative) with its paired
  95% bootstrap CI (evaluate.classification.paired_auc_difference); None when a bucket is empty."""
  if not (high.any() and mild.any() and (~y).any()):
    return {"gap": None, "ci": None}
  gap, lo, hi = paired_auc_difference(y, s, high, mild, n_resamples=n_resamples, seed=seed)
  return {"gap": gap, "ci": [lo, hi]}


def learnability(truth: np.ndarray, severity: np.ndarray, scores: np.ndarray, *,
                 labels: Sequence[str] = CHEXPERT_LABELS, n_resamples: int = 1000, seed: int = 0) -> list:
  """Per label: overall / high-severity / mild AUROC against the truth, with CIs and counts.

  truth (N, 14) bool, severity (N, 14), scores (N, 14). Returns one dict per label:
  {'label', 'overall', 'high', 'mild', 'gap'}: the first three as in _auc_entry ('high' and 'mild'
  compare those positives with every negative), 'gap' high minus mild as in _gap_entry (a mild
  case is measurably harder when its CI lies above 0).
  """
  rows = []
  for name in labels:
    j = LABEL_INDEX[name]
    y, sev, s = truth[:, j], severity[:, j], scores[:, j]
    row = {"label": name, "overall": _auc_entry(y, s, n_resamples, seed)}
    # sev > 0: No Finding's positives carry severity 0 and belong to neither bucket.
    buckets = {"high": y & (sev >= HIGH), "mild": y & (sev > 0) & (sev < MILD)}
    for bucket, pos in buckets.items():
      sel = ~y | pos
      row[bucket] = _auc_entry(y[sel], s[sel], n_resamples, seed)
    row["gap"] = _gap_entry(y, s, buckets["high"], buckets["mild"], n_resamples, seed)
    rows.append(row)
  return rows


def _fmt(e: dict) -> str:
  if e["auc"] is None:
    return f"n/a ({e['n_pos']})"
  return f"{e['auc']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}] ({e['n_pos']})"


def markdown_table(rows: list) -> str:
  """Rows of learnability() as a markdown table; (k) is the number of positives in the bucket."""
  out = ["| label | AUROC all (positives) | high sev >= 0.6 | mild sev < 0.3 | high - mild [paired 95% CI] |",
         "|---|---|---|---|---|"]
  for r in rows:
    g = r["gap"]
    gap = f"{g['gap']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]" if g["gap"] is not None else ""
    out.append(f"| {r['label']} | {_fmt(r['overall'])} | {_fmt(r['high'])} | {_fmt(r['mild'])} | {gap} |")
  return "\n".join(out)


def plot(rows: list, path: str, title: str = "") -> None:
  """Bar plot of high- vs mild-severity AUROC per label, 95% CI whiskers, the 0.9 target line."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(12, 4.5))
  x = np.arange(len(rows))
  for k, (bucket, colour) in enumerate((("high", "tab:red"), ("mild", "tab:blue"))):
    auc = np.array([r[bucket]["auc"] if r[bucket]["auc"] is not None else np.nan for r in rows])
    ci = np.array([r[bucket]["ci"] if r[bucket]["ci"] is not None else [np.nan] * 2 for r in rows])
    err = np.stack([auc - ci[:, 0], ci[:, 1] - auc])
    label = f"severity >= {HIGH}" if bucket == "high" else f"severity < {MILD}"
    ax.bar(x + (k - 0.5) * 0.38, auc, 0.38, yerr=err, capsize=2, color=colour, label=label)
  ax.axhline(0.9, color="k", ls="--", lw=0.8)
  ax.axhline(0.5, color="grey", ls=":", lw=0.8)
  ax.set_xticks(x, [r["label"] for r in rows], rotation=35, ha="right", fontsize=8)
  ax.set_ylim(0.4, 1.0)
  ax.set_ylabel("AUROC vs all negatives (truth)")
  ax.set_title(title, fontsize=9)
  ax.legend(loc="lower left", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #
def phantom_source_version() -> dict:
  """The git commit, and a hash of the phantom generator/renderer sources as they are on disk
  (they may differ from the commit), so a result can be matched to the renderer it measured."""
  here = os.path.dirname(os.path.abspath(__file__))
  src = os.path.join(os.path.dirname(here), "cxrjax", "data", "phantoms")
  digest = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(src, "*.py"))):
    digest.update(os.path.basename(path).encode())
    with open(path, "rb") as f:
      digest.update(f.read())
  try:
    git = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True,
                                    check=True).stdout.strip()
    commit, dirty = git("rev-parse", "--short", "HEAD"), bool(git("status", "--porcelain", src))
  except (OSError, subprocess.CalledProcessError):
    commit, dirty = None, None
  return {"commit": commit, "phantoms_dirty": dirty, "phantoms_sha256": digest.hexdigest()[:16]}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--train", type=int, default=4000, help="training studies")
  ap.add_argument("--test", type=int, default=2000, help="test studies")
  ap.add_argument("--size", type=int, default=128, help="image side in pixels")
  ap.add_argument("--steps", type=int, default=1200)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--lr", type=float, default=DEFAULT_OPTIM["lr"])
  ap.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 128])
  ap.add_argument("--convs", type=int, nargs="+", default=[1, 2, 2, 2], help="convs per stage")
  ap.add_argument("--train_min_pos", type=int, default=200, help="training positives per pathology")
  ap.add_argument("--train_min_high", type=int, default=0,
                  help="training positives with severity >= 0.6 per pathology")
  ap.add_argument("--test_min_high", type=int, default=40, help="test high-severity positives per pathology")
  ap.add_argument("--test_min_mild", type=int, default=60, help="test mild positives per pathology")
  ap.add_argument("--targets", choices=TARGETS, default="stored",
                  help="training targets (see training_targets); evaluation is always against the truth")
  ap.add_argument("--seed", type=int, default=0, help="phantom world seed (and training seed)")
  ap.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples per CI")
  ap.add_argument("--workdir", default=None, help="loop workdir (default: a temporary directory)")
  ap.add_argument("--out", default=None, help="write the results as JSON here")
  ap.add_argument("--plot", default=None, help="write the high vs mild bar plot (PNG) here")
  ap.add_argument("--scores", default=None,
                  help="write the test studies' index, truth, severity and scores (.npz) here")
  args = ap.parse_args()

  t0 = time.perf_counter()
  source = phantom_source_version()  # before rendering: the sources may change while we train
  print(f"phantom sources: {source}")
  config = PhantomConfig()
  train_idx = select_studies(args.seed, 0, args.train, config=config, quotas={"pos": args.train_min_pos,
                                                                           "high": args.train_min_high})
  test_idx = select_studies(args.seed, TEST_START, args.test, config=config,
                            quotas={"high": args.test_min_high, "mild": args.test_min_mild})
  t_select = time.perf_counter() - t0
  train, test = make_split(args.seed, train_idx, args.size, config), make_split(args.seed, test_idx, args.size, config)
  t_render = time.perf_counter() - t0 - t_select
  print(f"selected {len(train_idx)} + {len(test_idx)} studies in {t_select:.0f} s (pools up to "
        f"index {train_idx.max()} and {TEST_START} + {test_idx.max() - TEST_START}), rendered in {t_render:.0f} s")
  print("training positives (truth) per label:",
        dict(zip(CHEXPERT_LABELS, train["truth"].sum(0).tolist())))

  model = SmallCNN(widths=tuple(args.widths), convs_per_stage=tuple(args.convs), num_labels=NUM_LABELS)
  optim = dict(DEFAULT_OPTIM, lr=args.lr)
  with tempfile.TemporaryDirectory() as tmp:
    t1 = time.perf_counter()
    params = train_cnn(train["images"], training_targets(train, args.targets), model=model,
                       steps=args.steps, batch_size=args.batch, seed=args.seed,
                       workdir=args.workdir or tmp, optim=optim,
                       fingerprint={"targets": args.targets, "index_sum": int(train["index"].sum())})
    t_train = time.perf_counter() - t1
  scores = predict(model, params, test["images"])
  rows = learnability(test["truth"], test["severity"], scores, n_resamples=args.resamples, seed=args.seed)
  t_total = time.perf_counter() - t0

  table = markdown_table(rows)
  print(table)
  below = [r["label"] for r in rows if r["high"]["auc"] is not None and r["high"]["auc"] < 0.9]
  print(f"high-severity AUROC < 0.9: {below or 'none'}")
  not_harder = [r["label"] for r in rows if r["gap"]["gap"] is not None and r["gap"]["ci"][0] <= 0.0]
  print(f"mild not measurably harder (paired CI of high - mild reaches 0): {not_harder or 'none'}")
  print(f"train {t_train:.0f} s ({args.steps} steps, batch {args.batch}), total {t_total:.0f} s")
  record = {
      "args": vars(args), "model": repr(model), "optim": optim, "high": HIGH, "mild": MILD,
      "train_indices": [int(train_idx.min()), int(train_idx.max())],
      "test_indices": [int(test_idx.min()), int(test_idx.max())],
      "train_positives": dict(zip(CHEXPERT_LABELS, train["truth"].sum(0).tolist())),
      "results": rows, "below_target_high": below, "mild_not_harder": not_harder,
      "phantom_sources": source,
      "seconds": {"select": t_select, "render": t_render, "train": t_train, "total": t_total},
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                  "jax": jax.__version__, "backend": jax.default_backend()},
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  if args.out:
    with open(args.out, "w") as f:
      json.dump(record, f, indent=1)
  if args.scores:
    np.savez_compressed(args.scores, index=test["index"], truth=test["truth"],
                        severity=test["severity"], scores=scores, labels=np.array(CHEXPERT_LABELS))
  if args.plot:
    plot(rows, args.plot, f"SmallCNN, {len(train_idx)} train / {len(test_idx)} test frontal phantoms at "
         f"{args.size} px, {args.steps} steps x {args.batch}")


if __name__ == "__main__":
  main()
