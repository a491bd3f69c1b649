"""What the embedded synthetic PE data allows: linear reference points for the prior's table.

  python benchmarks/prior_data_ceiling.py [--n_labelled 300] [--n_unlabelled 3000]

Not a speed benchmark: it fits closed-form / convex models with scikit-learn on the same
splits `configs/prior.py` generates and prints one JSON line each, so the prior's
distilled AUC can be read against what the data holds:
  ctpa_lr            logistic regression on CTPA embeddings, labelled train rows (the teacher's role)
  xray_lr            logistic regression on CXR embeddings, labelled train rows (the baseline's role)
  distill_soft_lr    logistic regression on CXR fitted to the CTPA teacher's soft labels on all pairs
  ridge_map_teacher  ridge CXR->CTPA map fitted on all pairs, then the CTPA teacher
  xray_ceiling_lr    logistic regression on CXR with 50 000 labelled rows (what the CXR holds)
"""
from __future__ import annotations

import argparse
import json

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from cxrjax.data import synthetic_pe
from cxrjax.systems.prior import references


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n_labelled", type=int, default=300)
  parser.add_argument("--n_unlabelled", type=int, default=3000)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  data = synthetic_pe.generate(seed=args.seed, n_labelled=args.n_labelled,
                               n_unlabelled=args.n_unlabelled, cxr_dim=args.dim, ctpa_dim=args.dim)
  train, pairs_extra, test = data["train"], data.get("unlabelled"), data["test"]
  pairs_cxr = np.concatenate([train.cxr] + ([pairs_extra.cxr] if pairs_extra else []))
  pairs_ctpa = np.concatenate([train.ctpa] + ([pairs_extra.ctpa] if pairs_extra else []))

  def report(name, scores):
    print(json.dumps({"model": name, "test_auc": round(float(roc_auc_score(test.label, scores)), 4),
                      "n_labelled": args.n_labelled, "n_pairs": len(pairs_cxr)}), flush=True)

  ct = StandardScaler().fit(train.ctpa)
  teacher = LogisticRegression(C=0.1, max_iter=5000).fit(ct.transform(train.ctpa), train.label)
  report("ctpa_lr", teacher.predict_proba(ct.transform(test.ctpa))[:, 1])
  cx = StandardScaler().fit(pairs_cxr)
  xray = LogisticRegression(C=0.1, max_iter=5000).fit(cx.transform(train.cxr), train.label)
  report("xray_lr", xray.predict_proba(cx.transform(test.cxr))[:, 1])
  # The main job's table fits the same two references with its own trained teacher head.
  soft = teacher.predict_proba(ct.transform(pairs_ctpa))[:, 1]
  distill = references.soft_label_regression(pairs_cxr, soft, inverse_regularisation=0.1)
  report("distill_soft_lr", distill(test.cxr))
  ridge = references.ridge_map(pairs_cxr, pairs_ctpa, alpha=100.0)
  report("ridge_map_teacher", teacher.predict_proba(ct.transform(ridge(test.cxr)))[:, 1])
  big = synthetic_pe.generate(seed=args.seed, n_labelled=50_000, n_unlabelled=0, n_valid=10,
                              n_test=len(test), cxr_dim=args.dim, ctpa_dim=args.dim)
  bx = StandardScaler().fit(big["train"].cxr)
  ceiling = LogisticRegression(C=1.0, max_iter=5000).fit(bx.transform(big["train"].cxr),
                                                         big["train"].label)
  report("xray_ceiling_lr", ceiling.predict_proba(bx.transform(test.cxr))[:, 1])


if __name__ == "__main__":
  main()
