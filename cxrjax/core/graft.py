"""Grafting pretrained subtrees into a new stage's variables (an encoder from pretraining into a
fine-tune model, a distilled backbone under a fresh head, converted weights).

Paths are '/'-joined keys into the variables tree, e.g. 'params/encoder' or 'batch_stats/backbone';
'params' alone replaces every parameter. Every mismatch is collected and reported at once.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core.errors import CheckpointError

_SHOWN = 12


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    return out
  return {prefix: tree}


def _unflatten_into(tree: Any, path: list[str], value: Any) -> Any:
  if not path:
    return value
  head, *rest = path
  return {**tree, head: _unflatten_into(tree[head], rest, value)}


def _subtree(tree: Any, path: list[str]) -> Any:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def graft(target: Mapping[str, Any], sources: Mapping[str, Any]) -> dict:
  """Returns `target` with each subtree at a path of `sources` replaced by the given one.

  target: the new stage's variables ({'params': ..., collections...}) as initialised.
  sources: {path: subtree}. Each given leaf takes the dtype of the leaf it replaces; its shape
    must match. Raises CheckpointError listing every path that is missing, extra or of another
    shape, so a user sees all mismatches of a pretrained encoder at once.
  """
  problems: list[str] = []
  out = dict(target)
  for path, source in sources.items():
    keys = [k for k in path.split("/") if k]
    want = _subtree(out, keys)
    if want is None:
      problems.append(f"{path}: no such subtree in the new model")
      continue
    want_leaves, got_leaves = _flatten(want, path), _flatten(source, path)
    problems += [f"{p}: missing from the given weights" for p in want_leaves if p not in got_leaves]
    problems += [f"{p}: not in the new model" for p in got_leaves if p not in want_leaves]
    for p in want_leaves.keys() & got_leaves.keys():
      w, g = want_leaves[p], got_leaves[p]
      if tuple(np.shape(g)) != tuple(w.shape):
        problems.append(f"{p}: shape {tuple(np.shape(g))} given, {tuple(w.shape)} expected")
    if not problems:
      cast = jax.tree.map(lambda g, w: jnp.asarray(g, w.dtype), source, want)
      out = _unflatten_into(out, keys, cast)
  if problems:
    shown = "; ".join(sorted(problems)[:_SHOWN])
    more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
    raise CheckpointError(f"the weights to graft do not fit this model: {shown}{more}")
  return out
