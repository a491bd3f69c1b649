"""Feature-space bias analysis of CXR-FMKD (spec §B.6), usable on any model's features.

Pipeline (§B.7 checklist): de-duplicate -> PCA keeping 99 % variance, fit on all
unique rows -> per-"race" weighted sampling (n per group, no replacement), once with
seed 42 ("main sample") and for seeds 1..n_simulations -> two-sided KS tests on PCA
modes 1-4 for every comparison pair -> Benjamini-Yekutieli over all modes x pairs
jointly -> buckets FALSE / TRUE / TRUE+ -> explained-variance-weighted score.

The PCA and t-SNE plots are in ``cxrjax.evaluate.bias_plots``.

Shapes: ``features`` (N, D); every label array (N,) of hashable values (str or int).
``M`` = number of PCA modes tested (4), ``P`` = number of comparisons.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy import stats

from cxrjax.evaluate.report import markdown_table

__all__ = [
  "Comparison", "pairs_of", "DEFAULT_COMPARISONS", "CATEGORIES", "POINTS",
  "deduplicate", "PCAModes", "fit_pca", "stratified_sample", "benjamini_yekutieli",
  "ks_pvalues", "categorise", "BiasResult", "bias_score", "analyse_bias",
]

CATEGORIES = ("FALSE", "TRUE", "TRUE+")  # §B.6.7, on BY-adjusted p
POINTS = np.array([0.0, 100.0, 150.0])   # §B.6.8


@dataclass(frozen=True)
class Comparison:
  """One KS comparison ``a`` vs ``b`` of label ``attribute``. ``scored=False`` marks a
  control (the disease pair): it enters the joint BY family but not the score."""
  attribute: str
  a: object
  b: object
  scored: bool = True

  @property
  def name(self) -> str:
    return f"{self.a} vs {self.b}"


def pairs_of(attribute: str, values: Sequence, scored: bool = True) -> tuple[Comparison, ...]:
  """All pairs of ``values`` in ``itertools.combinations`` order: W-A, W-B, A-B for
  ``("White", "Asian", "Black")``, the seed's order."""
  return tuple(Comparison(attribute, a, b, scored) for a, b in combinations(values, 2))


# §B.6.6: disease positive control, then race pairs, then sex.
DEFAULT_COMPARISONS = (
  Comparison("disease", "Pleural Effusion", "No Finding", scored=False),
  *pairs_of("race", ("White", "Asian", "Black")),
  Comparison("sex", "Male", "Female"),
)


def deduplicate(features, key=None) -> np.ndarray:
  """Indices (ascending) of the first occurrence of each distinct row (§B.6.1).

  The seed drops duplicate rows of the *test CSV* (the resampled test set repeats
  images). Pass that row identity as ``key`` (N,) (e.g. image paths); by default the
  feature rows themselves are the key, equivalent whenever equal images give equal
  features and distinct images do not.
  """
  x = np.asarray(features)
  k = np.ascontiguousarray(x.reshape(x.shape[0], -1)) if key is None else np.asarray(key)
  if k.ndim == 1:
    _, first = np.unique(k, return_index=True)
  else:
    _, first = np.unique(k, axis=0, return_index=True)
  return np.sort(first)


@dataclass(frozen=True)
class PCAModes:
  """``projections`` (N, K) on all K kept modes; ``explained_variance_ratio`` (K,)."""
  projections: np.ndarray
  explained_variance_ratio: np.ndarray
  model: object


def fit_pca(features, variance: float = 0.99, random_state: int = 42) -> PCAModes:
  """``PCA(n_components=variance, whiten=False, random_state=42)`` fit on *all* rows
  given, i.e. all unique test embeddings (§B.6.2; Glocker fit with duplicates)."""
  from sklearn.decomposition import PCA

  x = np.asarray(features, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f"features must be (N, D); got {x.shape}")
  pca = PCA(n_components=variance, whiten=False, random_state=random_state)
  z = pca.fit_transform(x)
  return PCAModes(z, np.asarray(pca.explained_variance_ratio_), pca)


def _composite(labels: Mapping[str, np.ndarray], keys: Sequence[str], n: int) -> np.ndarray:
  if not keys:
    return np.zeros(n, dtype=np.int64)
  s = np.asarray(labels[keys[0]]).astype(str).astype(object)
  for k in keys[1:]:
    s = s + "-" + np.asarray(labels[k]).astype(str).astype(object)
  return np.unique(s.astype(str), return_inverse=True)[1]


def stratified_sample(group, strata, n_per_group: int = 1000, seed: int = 42) -> np.ndarray:
  """Indices of ``n_per_group`` rows per value of ``group`` (§B.6.5, stratified_sample_by_race).

  ``strata`` (N,) is the composite stratum (sex-disease-age_bin) as integer codes.
  Weights per row: avg_prop(stratum) / prop_in_group(stratum), the average being
  over groups, so every group is drawn towards the same stratum mix. Draws are
  without replacement, successive and proportional to weight, like
  ``WeightedRandomSampler(replacement=False)``; implemented with exponential keys
  (smallest E/w) from ``np.random.default_rng(seed)``, so the seed's torch stream
  is not reproduced bit-for-bit. Groups are concatenated in order of first
  appearance. Raises if a group has fewer than ``n_per_group`` rows (torch does too).
  """
  g = np.asarray(group)
  s = np.asarray(strata)
  uniq_g, first = np.unique(g, return_index=True)
  order = uniq_g[np.argsort(first)]
  n_s = int(s.max()) + 1
  props = np.stack([np.bincount(s[g == v], minlength=n_s) / np.sum(g == v) for v in order])
  avg = props.mean(axis=0)
  rng = np.random.default_rng(seed)
  out = []
  for i, v in enumerate(order):
    rows = np.flatnonzero(g == v)
    if rows.size < n_per_group:
      raise ValueError(f"group {v!r} has {rows.size} rows < n_per_group={n_per_group}")
    w = avg[s[rows]] / props[i, s[rows]]
    keys = rng.exponential(size=rows.size) / w
    out.append(rows[np.argsort(keys, kind="stable")[:n_per_group]])
  return np.concatenate(out)


def _by_numpy(p: np.ndarray) -> np.ndarray:
  """BY on a 1-D array: sort ascending, p_(i) * m / i * sum_{j<=m} 1/j, running
  minimum from the largest p down, clip to 1 (statsmodels' 'fdr_by')."""
  m = p.size
  order = np.argsort(p, kind="mergesort")
  i = np.arange(1, m + 1)
  adj = np.minimum.accumulate((p[order] * m / i * np.sum(1.0 / i))[::-1])[::-1]
  out = np.empty(m)
  out[order] = np.minimum(adj, 1.0)
  return out


def benjamini_yekutieli(pvalues, *, use_scipy: bool = True) -> np.ndarray:
  """Benjamini-Yekutieli adjusted p-values, same shape, the family being *every* entry
  (the seed adjusts all modes x pairs jointly with statsmodels
  ``multipletests(method='fdr_by')``). Uses ``scipy.stats.false_discovery_control
  (method='by')`` when scipy has it (>= 1.11), else the same formula in numpy."""
  p = np.asarray(pvalues, dtype=np.float64)
  if p.size == 0:
    return p.copy()
  if np.isnan(p).any() or np.any((p < 0) | (p > 1)):
    raise ValueError("p-values must lie in [0, 1]")
  fdc = getattr(stats, "false_discovery_control", None)
  flat = fdc(p.ravel(), method="by") if (use_scipy and fdc is not None) else _by_numpy(p.ravel())
  return np.asarray(flat, dtype=np.float64).reshape(p.shape)


def ks_pvalues(modes, labels: Mapping[str, np.ndarray], comparisons: Sequence[Comparison],
               rows=None) -> np.ndarray:
  """Raw two-sided ``ks_2samp`` p-values (M, P), default 'auto' method (§B.6.6).

  ``modes`` (N, M) PCA projections; ``rows`` optional indices selecting the sample.
  A comparison with an empty side gets p = 1 (nothing to reject).
  """
  z = np.asarray(modes)
  rows = np.arange(z.shape[0]) if rows is None else np.asarray(rows)
  out = np.ones((z.shape[1], len(comparisons)))
  for j, c in enumerate(comparisons):
    lab = np.asarray(labels[c.attribute])[rows]
    ia, ib = rows[lab == c.a], rows[lab == c.b]
    if ia.size == 0 or ib.size == 0:
      continue
    out[:, j] = [stats.ks_2samp(z[ia, m], z[ib, m]).pvalue for m in range(z.shape[1])]
  return out


def categorise(p_adjusted) -> np.ndarray:
  """0 = FALSE (p >= 0.05), 1 = TRUE (0.001 <= p < 0.05), 2 = TRUE+ (p < 0.001) (§B.6.7)."""
  p = np.asarray(p_adjusted)
  return np.where(p < 0.001, 2, np.where(p < 0.05, 1, 0))


def _points(frac) -> np.ndarray:
  return np.asarray(frac) @ POINTS


def bias_score(counts, explained_variance_ratio, comparisons: Sequence[Comparison]) -> dict:
  """Variance-weighted bias score (§B.6.8, extract_model_bias_scores.py).

  ``counts`` (M, P, 3) bucket counts per mode and comparison over simulations;
  ``explained_variance_ratio`` (M,) of the tested modes. With
  w_m = EV_m / sum_m' EV_m' and f_{c,m,k} = count / total,
  S_{c,k} = sum_m w_m f_{c,m,k} and Score_c = 100 S_{c,TRUE} + 150 S_{c,TRUE+}
  in [0, 150]. Attribute fractions average their pairs; the combined score
  ("Attributes Average") averages attribute fractions with equal weights;
  "columns_average" averages all scored pairs. Unscored (control) pairs are
  excluded. Returns ``{"pair", "attribute": {name: score}, "combined",
  "columns_average", "fractions": {pair: (3,)}, "total_ev"}``; the seed's
  "unnormalised" scores are these times ``total_ev``.
  """
  c = np.asarray(counts, dtype=np.float64)
  ev = np.asarray(explained_variance_ratio, dtype=np.float64)
  if c.ndim != 3 or c.shape[0] != ev.size or c.shape[1] != len(comparisons) or c.shape[2] != 3:
    raise ValueError(f"counts must be (M={ev.size}, P={len(comparisons)}, 3); got {c.shape}")
  w = ev / ev.sum()
  tot = c.sum(axis=2, keepdims=True)
  f = np.divide(c, tot, out=np.zeros_like(c), where=tot > 0)  # seed skips empty cells
  frac = np.einsum("m,mpk->pk", w, f)
  scored = [(j, comp) for j, comp in enumerate(comparisons) if comp.scored]
  if not scored:
    raise ValueError("no scored comparisons")
  pair = {comp.name: float(_points(frac[j])) for j, comp in scored}
  attrs: dict[str, list] = {}
  for j, comp in scored:
    attrs.setdefault(comp.attribute, []).append(frac[j])
  attr_frac = {a: np.mean(v, axis=0) for a, v in attrs.items()}
  return {
    "pair": pair,
    "attribute": {a: float(_points(v)) for a, v in attr_frac.items()},
    "combined": float(_points(np.mean(list(attr_frac.values()), axis=0))),
    "columns_average": float(_points(np.mean([frac[j] for j, _ in scored], axis=0))),
    "fractions": {comp.name: frac[j] for j, comp in scored},
    "total_ev": float(ev.sum()),
  }


@dataclass(frozen=True)
class BiasResult:
  """Everything :func:`analyse_bias` computes; ``combined`` is the number §B.6.9 plots.

  ``p_raw`` / ``p_adjusted`` / ``categories``: (M, P) for the main sample (seed 42);
  ``counts``: (M, P, 3) bucket counts over the simulations (the score's input);
  ``scores``: :func:`bias_score` on all M modes; ``scores_mode1``: mode 1 only (the
  seed's "filtered" variant).
  """
  comparisons: tuple
  explained_variance_ratio: np.ndarray
  p_raw: np.ndarray
  p_adjusted: np.ndarray
  categories: np.ndarray
  counts: np.ndarray
  scores: dict
  scores_mode1: dict
  n_simulations: int
  n_unique: int

  @property
  def combined(self) -> float:
    return self.scores["combined"]

  def to_markdown(self, decimals: int = 2) -> str:
    """Adjusted p per mode with its bucket and share of TRUE/TRUE+ over simulations,
    the per-pair score, then attribute and combined scores."""
    m = self.p_adjusted.shape[0]
    rows = []
    for j, c in enumerate(self.comparisons):
      row = {"comparison": c.name + ("" if c.scored else " (control)")}
      for k in range(m):
        share = self.counts[k, j, 1:].sum() / max(self.counts[k, j].sum(), 1)
        row[f"mode_{k + 1}"] = (f"{self.p_adjusted[k, j]:.2g} {CATEGORIES[self.categories[k, j]]}"
                                f" ({100 * share:.0f}%)")
      row["score"] = self.scores["pair"].get(c.name, float("nan"))
      rows.append(row)
    ev = ", ".join(f"{v:.3f}" for v in self.explained_variance_ratio)
    cols = ("comparison", *[f"mode_{k + 1}" for k in range(m)], "score")
    out = [f"PCA modes EV ratio: {ev}; {self.n_unique} unique rows, {self.n_simulations} simulations.",
           "Cells: BY-adjusted p on the main sample, its bucket, (% of simulations rejecting).", "",
           markdown_table(rows, cols, decimals=decimals)]
    summary = [{"score": f"attribute: {a}", "value": v} for a, v in self.scores["attribute"].items()]
    summary += [{"score": "combined (attributes average)", "value": self.combined},
                {"score": "columns average", "value": self.scores["columns_average"]},
                {"score": "combined, PCA mode 1 only", "value": self.scores_mode1["combined"]}]
    return "\n".join(out) + "\n" + markdown_table(summary, ("score", "value"), decimals=decimals)


def _run_once(z, labels, comparisons, rows):
  p = ks_pvalues(z, labels, comparisons, rows)
  adj = benjamini_yekutieli(p)  # jointly over all M x P (§B.6.6)
  return p, adj, categorise(adj)


def analyse_bias(features, labels: Mapping[str, np.ndarray], *,
                 comparisons: Sequence[Comparison] = DEFAULT_COMPARISONS,
                 balance_key: str | None = "race",
                 strata_keys: Sequence[str] = ("sex", "disease", "age_bin"),
                 n_per_group: int | None = 1000, n_simulations: int = 5000,
                 n_modes: int = 4, variance: float = 0.99, seed: int = 42,
                 dedupe: bool = True, dedupe_key=None) -> BiasResult:
  """Full §B.6 analysis of one model's ``features`` (N, D) with ``labels`` {name: (N,)}.

  Main sample: :func:`stratified_sample` of ``n_per_group`` rows per ``balance_key``
  value with ``seed``; the score counts buckets over ``n_simulations`` samples drawn
  with seeds 1..n_simulations (the spec's [I] reading of which table feeds the
  score). ``balance_key=None`` or ``n_per_group=None`` uses all unique rows without
  rebalancing (the seed's "all unique data points" run); there is then one
  "simulation", the main run. Modes beyond those PCA keeps are dropped.
  """
  x = np.asarray(features, dtype=np.float64)
  keep = deduplicate(x, dedupe_key) if dedupe else np.arange(x.shape[0])
  x = x[keep]
  labs = {k: np.asarray(v)[keep] for k, v in labels.items()}
  pca = fit_pca(x, variance, seed)
  m = min(n_modes, pca.projections.shape[1])
  z, ev = pca.projections[:, :m], pca.explained_variance_ratio[:m]
  comparisons = tuple(comparisons)
  balanced = balance_key is not None and n_per_group is not None
  strata = _composite(labs, tuple(strata_keys), x.shape[0]) if balanced else None

  def sample(s):
    return stratified_sample(labs[balance_key], strata, n_per_group, s) if balanced else None

  p, adj, cat = _run_once(z, labs, comparisons, sample(seed))
  if balanced and n_simulations > 0:
    cats = [_run_once(z, labs, comparisons, sample(s))[2] for s in range(1, n_simulations + 1)]
  else:
    cats = [cat]
  counts = np.stack([(np.stack(cats) == k).sum(axis=0) for k in range(3)], axis=-1)
  return BiasResult(comparisons, ev, p, adj, cat, counts,
                    bias_score(counts, ev, comparisons),
                    bias_score(counts[:1], ev[:1], comparisons),
                    len(cats) if balanced and n_simulations > 0 else 0, int(x.shape[0]))
