"""Repeated sub-runs of one experiment: k cross-validation folds, or several seeds.

Each replica is a resumable sub-run: its stages are named `<stage>_<replica>` (their own
checkpoints), its seed is derived from the run's, and its fingerprint adds the replica's key, so
a rerun loads finished replicas, resumes the interrupted one and starts the rest. Stages that a
system builds once (one Task object, data through the batch and frozen inputs, never baked into
the loss) share one compiled program across replicas through `Run.programs`.

    for rep in replicas("fold", range(5), seed=config.seed):
      train_rows, test_rows = folds[rep.key]
      result = run.stage(task, data(train_rows), block, seed=rep.seed, name=rep.stage("teacher"),
                         parent=rep.fingerprint(parent))
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from cxrjax.core.errors import ConfigError
from cxrjax.core.writers import say

KINDS = ("fold", "seed")


@dataclasses.dataclass(frozen=True)
class Replica:
  """One sub-run. kind 'fold' (key = fold index) or 'seed' (key = the seed itself).

  seed: the seed its stages use: the key for kind 'seed'; for a fold, derived from the run's
  seed and the fold index (numpy SeedSequence), so folds do not share random streams.
  """
  kind: str
  key: int
  index: int
  count: int
  seed: int

  @property
  def name(self) -> str:
    return f"fold{self.key}" if self.kind == "fold" else f"s{self.key}"

  def stage(self, base: str) -> str:
    """The stage name of `base` in this replica, e.g. 'teacher_fold2'."""
    return f"{base}_{self.name}"

  def fingerprint(self, parent: Mapping[str, Any] | None = None) -> dict:
    return {**(parent or {}), self.kind: self.key}


def derive_seed(seed: int, kind: str, key: int) -> int:
  """A seed for replica `key` of `kind` from the run's seed: stable across Python runs."""
  words = np.random.SeedSequence([int(seed), KINDS.index(kind), int(key)]).generate_state(1)
  return int(words[0] % (2**31 - 1))


def replicas(kind: str, keys: Iterable[int], *, seed: int = 0) -> list[Replica]:
  """The replicas of `kind` for `keys` (fold indices, or seeds)."""
  if kind not in KINDS:
    raise ConfigError(f"replica kind {kind!r}; choose one of {KINDS}")
  keys = [int(k) for k in keys]
  if not keys or len(set(keys)) != len(keys):
    raise ConfigError(f"{kind} keys {keys} must be distinct and at least one")
  return [Replica(kind, k, i, len(keys), k if kind == "seed" else derive_seed(seed, kind, k))
          for i, k in enumerate(keys)]


def run_replicas(reps: Sequence[Replica], fn: Callable[[Replica], Any]) -> dict[int, Any]:
  """{replica key: fn(replica)} in order, with a progress line per replica."""
  out = {}
  for rep in reps:
    say(f"[{rep.kind} {rep.key}] {rep.index + 1} of {rep.count} (seed {rep.seed})")
    out[rep.key] = fn(rep)
  return out


def kfold_rows(groups: np.ndarray, k: int, *, seed: int, labels: np.ndarray | None = None
               ) -> list[tuple[np.ndarray, np.ndarray]]:
  """k (train rows, test rows) pairs with every group (patient) on one side only.

  groups: (N,) patient ids. labels: (N,) class labels to stratify by (scikit-learn's
  StratifiedGroupKFold), or None (GroupKFold); both shuffled with `seed`.
  """
  from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
  groups = np.asarray(groups)
  n_groups = len(np.unique(groups))
  if not 2 <= k <= n_groups:
    raise ConfigError(f"{k}-fold cross-validation needs 2 <= k <= the {n_groups} patients")
  rows = np.arange(len(groups))
  if labels is not None:
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in splitter.split(rows, np.asarray(labels), groups)]
  splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
  return [(tr, te) for tr, te in splitter.split(rows, groups=groups)]
