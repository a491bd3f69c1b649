"""Linear reference points for the distilled model, on the same pairs and the same teacher.

Both use what the prior uses (every CXR/CTPA pair, no labels, the frozen CTPA teacher head h) and
nothing else, so a row that beats the distilled one says how much of the pairs' value the diffusion
prior leaves unused:
  soft_label_lr  logistic regression on the CXR embedding fitted to h(CTPA) of every pair
                 (distillation without a prior);
  ridge_teacher  a ridge map CXR -> CTPA fitted on every pair, then h (a prior that predicts the
                 conditional mean in one linear step).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler

Scorer = Callable[[np.ndarray], np.ndarray]  # CXR embeddings (N, D) -> P(PE) (N,)


def soft_label_regression(pairs_cxr: np.ndarray, soft_labels: np.ndarray, *,
                          inverse_regularisation: float) -> Scorer:
  """Logistic regression of soft_labels (N,) in [0, 1] on standardised pairs_cxr (N, D).

  A soft label p enters as the row twice, labelled 1 with weight p and 0 with weight 1 - p: the
  weighted log-loss is then exactly the cross-entropy against p."""
  scaler = StandardScaler().fit(pairs_cxr)
  x = scaler.transform(pairs_cxr)
  p = np.clip(np.asarray(soft_labels, np.float64), 0.0, 1.0)
  model = LogisticRegression(C=inverse_regularisation, max_iter=5000).fit(
      np.concatenate([x, x]), np.r_[np.ones(len(x)), np.zeros(len(x))], sample_weight=np.r_[p, 1 - p])
  return lambda cxr: model.predict_proba(scaler.transform(cxr))[:, 1]


def ridge_map(pairs_cxr: np.ndarray, pairs_ctpa: np.ndarray, *, alpha: float
              ) -> Callable[[np.ndarray], np.ndarray]:
  """A ridge regression from standardised CXR (N, Dx) to CTPA (N, Dc) embeddings; returns the map
  (M, Dx) -> (M, Dc) in the CTPA embeddings' own units."""
  scaler = StandardScaler().fit(pairs_cxr)
  model = Ridge(alpha=alpha).fit(scaler.transform(pairs_cxr), pairs_ctpa)
  return lambda cxr: model.predict(scaler.transform(cxr)).astype(np.float32)
