"""Synthetic paired CXR/CTPA embeddings with a latent pulmonary-embolism state.

The default data of cxrjax. It returns ``paired_embeddings.PairedData``; writing it to the
seed's on-disk layout, an .npz or a table is ``paired_embeddings.to_*``'s job, and choosing it
from a config (``data.source=synthetic``) is ``paired_sources.load``'s.

Generative model
================
World (drawn once from ``seed``; the same for every split size):
  A_c (k, Dc), A_x (k, Dx)   anatomy loadings, entries N(0, 1/k)
  N_c (4, Dc), N_x (6, Dx)   acquisition loadings, entries N(0, 1/4), N(0, 1/6)
  u_clot, u_strain (Dc), u_x (Dx)   unit-norm random directions
  beta_c (Dc) ~ N(0, 0.5^2)  CTPA feature offsets (which features tend to be "on")

Patient (independent draws; rows are i.i.d.):
  a ~ N(0, I_k)                        anatomy/habitus, seen by both modalities
  l = rho a_1 + sqrt(1 - rho^2) xi      liability: risk factors (age, habitus) live in a_1
  y = [l > Phi^-1(1 - prevalence)]      PE present; P(y = 1) = prevalence exactly
  b = y * Gamma(kappa, 1/kappa)         clot burden, mean 1; small (subsegmental) PE common
  s = b * exp(sigma_s zeta - sigma_s^2 / 2)   right-heart strain, varies with cardiac reserve
  v ~ Bernoulli(f)                      PE has a CXR sign (enlarged PA, Westermark, Hampton hump)
  n_c ~ N(0, I_4), n_x ~ N(0, I_6)      acquisition nuisance (contrast timing, noise, motion /
                                        exposure, rotation, inspiration, AP vs PA, ...)
  e_ctpa = softplus(a A_c + g_c n_c N_c + alpha_c (b u_clot + s u_strain) + beta_c) + sd_c eps
  e_cxr  = a A_x + g_x n_x N_x + alpha_x v s u_x + sd_x eps'         eps, eps' ~ N(0, I)

CTPA embeddings are positive-ish, DenseNet-like and show the clot directly; CXR
embeddings show PE only through a sign in a fraction f of cases and through risk
factors shared with anatomy. Signals are in norm units along unit directions, so the
AUCs below barely depend on D. A CXR->CTPA map can carry only what the CXR holds, so
the CXR's ceiling bounds every CXR-based method; what unlabelled pairs can add is label
efficiency, not information.

Defaults: k = 12, prevalence 0.35, rho 0.3, kappa 1.5, sigma_s 0.5, f 0.4,
alpha_c 3.0, g_c 0.5, sd_c 0.3, alpha_x 3.0, g_x 1.0, sd_x 0.5; sizes 300 labelled
train, 3000 unlabelled, 300 valid, 500 test; Dx = Dc = 128.

Measured AUCs (logistic regression on standardised inputs, fitted and tested on
50 000 fresh rows each, i.e. unlimited data; defaults, D = 128):
  seed 0: CTPA 0.955, CXR 0.728; over seeds 0-2 and D in {64, 128}: CTPA 0.936-0.955,
  CXR 0.714-0.732. Fitted on 300 labelled rows instead: CTPA 0.90-0.92, CXR 0.63-0.67
  (the seed reports CTPA-only 0.85 and CXR-only 0.69 on its real test set).

Splits: "train" (n_labelled, labelled), "unlabelled" (n_unlabelled, label NaN; omitted
when 0), "valid", "test". Split j draws one standard-normal block, row by row, from
its own stream ``default_rng([seed, 1, j])`` (Gamma and Bernoulli draws by inverse
CDF), so row i depends only on (seed, split, i): a larger split extends a smaller one.
Ids are numeric strings "<j><i:07d>" (train ids start with "0": loaders must keep
leading zeros).
"""

from __future__ import annotations

import numpy as np
from scipy.special import gammainccinv, ndtr, ndtri

from cxrjax.core.errors import ConfigError
from cxrjax.data.paired_embeddings import SPLITS, PairedData, cxr_accession, make_split

__all__ = ["generate"]

_N_CTPA_NUISANCE, _N_CXR_NUISANCE = 4, 6


def _unit(rng: np.random.Generator, d: int) -> np.ndarray:
  v = rng.normal(size=d)
  return v / np.linalg.norm(v)


def _world(seed: int, k: int, ctpa_dim: int, cxr_dim: int) -> dict[str, np.ndarray]:
  """Fixed projections; drawn from their own stream so split sizes never change them."""
  r = np.random.default_rng([seed, 0])
  return {
      "A_c": r.normal(size=(k, ctpa_dim)) / np.sqrt(k),
      "A_x": r.normal(size=(k, cxr_dim)) / np.sqrt(k),
      "N_c": r.normal(size=(_N_CTPA_NUISANCE, ctpa_dim)) / np.sqrt(_N_CTPA_NUISANCE),
      "N_x": r.normal(size=(_N_CXR_NUISANCE, cxr_dim)) / np.sqrt(_N_CXR_NUISANCE),
      "u_clot": _unit(r, ctpa_dim), "u_strain": _unit(r, ctpa_dim), "u_x": _unit(r, cxr_dim),
      "beta_c": r.normal(size=ctpa_dim) * 0.5,
  }


def _patients(r: np.random.Generator, n: int, w: dict, kw: dict):
  """n i.i.d. patients -> (e_cxr (n, Dx), e_ctpa (n, Dc), y (n,)), all vectorised.

  Everything comes from one (n, m) standard-normal block, filled row by row, with the
  Gamma and Bernoulli draws made by inverse CDF; so row i never depends on n.
  """
  k, dc, dx = w["A_c"].shape[0], w["A_c"].shape[1], w["A_x"].shape[1]
  widths = [k, 1, 1, 1, 1, _N_CTPA_NUISANCE, _N_CXR_NUISANCE, dc, dx]
  z = r.standard_normal((n, sum(widths)))
  a, xi, z_burden, zeta, z_visible, n_c, n_x, eps_c, eps_x = np.split(z, np.cumsum(widths)[:-1], axis=1)
  xi, z_burden, zeta, z_visible = (v[:, 0] for v in (xi, z_burden, zeta, z_visible))
  rho, kappa, ss = kw["risk_correlation"], kw["burden_shape"], kw["strain_spread"]
  liability = rho * a[:, 0] + np.sqrt(1.0 - rho**2) * xi
  y = (liability > ndtri(1.0 - kw["prevalence"])).astype(np.float64)
  b = y * gammainccinv(kappa, ndtr(-z_burden)) / kappa  # Gamma(kappa, 1/kappa) by inverse CDF
  s = b * np.exp(ss * zeta - ss**2 / 2)
  visible = z_visible < ndtri(kw["cxr_visible_fraction"])  # P = cxr_visible_fraction
  h = (a @ w["A_c"] + kw["ctpa_nuisance"] * n_c @ w["N_c"] + w["beta_c"]
       + kw["ctpa_signal"] * (b[:, None] * w["u_clot"] + s[:, None] * w["u_strain"]))
  ctpa = np.logaddexp(0.0, h) + kw["ctpa_noise"] * eps_c  # softplus
  cxr = (a @ w["A_x"] + kw["cxr_nuisance"] * n_x @ w["N_x"]
         + kw["cxr_signal"] * (visible * s)[:, None] * w["u_x"] + kw["cxr_noise"] * eps_x)
  return cxr, ctpa, y


def generate(*, seed: int = 0, n_labelled: int = 300, n_unlabelled: int = 3000,
             n_valid: int = 300, n_test: int = 500, cxr_dim: int = 128, ctpa_dim: int = 128,
             prevalence: float = 0.35, n_anatomy: int = 12, risk_correlation: float = 0.3,
             burden_shape: float = 1.5, strain_spread: float = 0.5,
             ctpa_signal: float = 3.0, ctpa_nuisance: float = 0.5, ctpa_noise: float = 0.3,
             cxr_signal: float = 3.0, cxr_visible_fraction: float = 0.4,
             cxr_nuisance: float = 1.0, cxr_noise: float = 0.5) -> PairedData:
  """Draw the four splits of the model in the module docstring.

  Knobs (symbols of the module docstring): ``n_anatomy`` k; ``risk_correlation`` rho;
  ``burden_shape`` kappa; ``strain_spread`` sigma_s; ``ctpa_signal``/``cxr_signal``
  alpha_c/alpha_x; ``cxr_visible_fraction`` f; ``*_nuisance`` g_c/g_x; ``*_noise``
  sd_c/sd_x. Returns PairedData with cxr (N, cxr_dim), ctpa (N, ctpa_dim) float32.
  """
  kw = dict(prevalence=prevalence, risk_correlation=risk_correlation, burden_shape=burden_shape,
            strain_spread=strain_spread, ctpa_signal=ctpa_signal, ctpa_nuisance=ctpa_nuisance,
            ctpa_noise=ctpa_noise, cxr_signal=cxr_signal, cxr_visible_fraction=cxr_visible_fraction,
            cxr_nuisance=cxr_nuisance, cxr_noise=cxr_noise)
  sizes = {"train": n_labelled, "unlabelled": n_unlabelled, "valid": n_valid, "test": n_test}
  if bad := {k: v for k, v in sizes.items() if int(v) != v or v < (0 if k == "unlabelled" else 1)}:
    raise ConfigError(f"synthetic split sizes must be integers >= 1 (unlabelled >= 0), got {bad}")
  if min(cxr_dim, ctpa_dim, n_anatomy) < 1:
    raise ConfigError(f"cxr_dim, ctpa_dim, n_anatomy must be >= 1, got {cxr_dim}, {ctpa_dim}, {n_anatomy}")
  if not (0 < prevalence < 1 and 0 <= risk_correlation < 1 and 0 <= cxr_visible_fraction <= 1):
    raise ConfigError("need 0 < prevalence < 1, 0 <= risk_correlation < 1, 0 <= cxr_visible_fraction <= 1")
  if burden_shape <= 0 or min(strain_spread, ctpa_nuisance, ctpa_noise, cxr_nuisance, cxr_noise) < 0:
    raise ConfigError("burden_shape must be > 0 and spreads/nuisance/noise levels >= 0")
  w = _world(seed, n_anatomy, ctpa_dim, cxr_dim)
  data: PairedData = {}
  for j, split in enumerate(SPLITS):
    n = int(sizes[split])
    if n == 0:
      continue
    cxr, ctpa, y = _patients(np.random.default_rng([seed, 1, j]), n, w, kw)
    label = np.full(n, np.nan) if split == "unlabelled" else y
    ids = [f"{j}{i:07d}" for i in range(n)]
    data[split] = make_split(cxr, ctpa, label, ids, [cxr_accession(i) for i in ids])
  return data
