"""Embedding normalisers: fitted on the train split, saved with the checkpoint, inverted
before a frozen classifier head sees a generated embedding.

``apply``/``invert`` use only ``*``, ``+``, ``.sum`` and ``**`` so one code path serves
numpy arrays, jax arrays and jax tracers under ``jit``. Inputs are (..., D); the
normaliser acts on the last axis. Parameters are cast to the input's float dtype.

Kinds:
  * ``minmax``: the seed's global scalar min/max over the whole train matrix,
    z = 2 (x - min) / (max - min) - 1, so train lies exactly in [-1, 1]. The inverse
    is the seed's ``unNormalize``: x = (z (max - min) + max + min) / 2.
  * ``standardize``: per-dimension z = (x - mean) / std, std floored at 1e-6.
  * ``l2_sqrt_d``: z = x / ||x|| * sqrt(D) per row (DALLE-2's image-embedding scale).
    The norm is discarded, so no exact inverse exists. ``invert`` returns
    z / sqrt(D) * mean_norm: the same direction at the mean train norm. A head that
    reads the norm sees every case at the average norm, so ``exact_inverse`` is False.
    (Keeping the norm would need a D+1-th coordinate, which the prior cannot take.)
  * ``none``: the identity.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import numpy as np

from cxrjax.data.errors import DataError

__all__ = ["KINDS", "Normalizer", "fit_normalizer"]

KINDS = ("minmax", "l2_sqrt_d", "standardize", "none")
_PARAMS = {"minmax": ("min", "max"), "l2_sqrt_d": ("dim", "mean_norm"),
           "standardize": ("mean", "std"), "none": ()}
_STD_FLOOR = 1e-6
_NORM_EPS2 = 1e-24  # added to ||x||^2 so an all-zero row maps to zero, not NaN


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"unknown normaliser kind {kind!r}; choose one of {list(KINDS)}")


def _cast(p, x):
  """Parameter ``p`` as an array of ``x``'s float dtype (float32 for integer input)."""
  dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
  return np.asarray(p, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class Normalizer:
  """A fitted map on the last axis. params: minmax {min, max} floats; standardize
  {mean, std} lists of length D; l2_sqrt_d {dim, mean_norm}; none {}."""
  kind: str
  params: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    _check_kind(self.kind)
    if missing := [k for k in _PARAMS[self.kind] if k not in self.params]:
      raise ValueError(f"normaliser {self.kind!r} is missing param(s) {missing}")

  @property
  def exact_inverse(self) -> bool:
    """Whether ``invert(apply(x)) == x`` up to rounding (False only for l2_sqrt_d)."""
    return self.kind != "l2_sqrt_d"

  def _check_dim(self, x) -> None:
    d = len(self.params["mean"]) if self.kind == "standardize" else self.params.get("dim")
    if d is not None and x.shape[-1] != d:
      raise ValueError(f"normaliser {self.kind!r} was fitted on dim {d}, got input of shape {x.shape}")

  def apply(self, x):
    """x (..., D) numpy or jax -> normalised z of the same shape and type."""
    self._check_dim(x)
    p = self.params
    if self.kind == "minmax":
      return (x - _cast(p["min"], x)) * _cast(2.0 / (p["max"] - p["min"]), x) - _cast(1.0, x)
    if self.kind == "standardize":
      return (x - _cast(p["mean"], x)) * _cast(1.0 / np.asarray(p["std"]), x)
    if self.kind == "l2_sqrt_d":
      sq = (x * x).sum(axis=-1, keepdims=True) + _cast(_NORM_EPS2, x)
      return x * (sq ** _cast(-0.5, x)) * _cast(np.sqrt(p["dim"]), x)
    return x

  def invert(self, z):
    """z (..., D) -> embedding in the original space (l2_sqrt_d: direction only, see module doc)."""
    self._check_dim(z)
    p = self.params
    if self.kind == "minmax":  # the seed's unNormalize, written as z * a + b
      return z * _cast((p["max"] - p["min"]) / 2.0, z) + _cast((p["max"] + p["min"]) / 2.0, z)
    if self.kind == "standardize":
      return z * _cast(p["std"], z) + _cast(p["mean"], z)
    if self.kind == "l2_sqrt_d":
      return z * _cast(p["mean_norm"] / np.sqrt(p["dim"]), z)
    return z

  def to_json(self) -> dict[str, Any]:
    """A dict of plain JSON types; ``json.dumps`` it next to the checkpoint."""
    return {"kind": self.kind, "params": json.loads(json.dumps(self.params))}

  @classmethod
  def from_json(cls, d: Mapping[str, Any] | str) -> "Normalizer":
    """Inverse of ``to_json``; also accepts the JSON text."""
    if isinstance(d, str):
      d = json.loads(d)
    if "kind" not in d:
      raise ValueError(f"normaliser JSON needs 'kind' and 'params', got keys {list(d)}")
    return cls(kind=d["kind"], params=dict(d.get("params", {})))


def fit_normalizer(kind: str, x_train) -> Normalizer:
  """Fit ``kind`` on the train matrix x_train (N, D); raises DataError on unusable data."""
  _check_kind(kind)
  x = np.asarray(x_train, dtype=np.float64)  # float64 so the fitted constants are exact
  if x.ndim != 2 or x.shape[0] == 0:
    raise DataError(f"normaliser {kind!r}: x_train must be a non-empty (N, D) matrix, got shape {x.shape}")
  if not np.isfinite(x).all():
    raise DataError(f"normaliser {kind!r}: x_train contains NaN/inf")
  if kind == "minmax":
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
      raise DataError(f"normaliser 'minmax': train data is constant ({lo}); min == max leaves "
                      "nothing to scale")
    return Normalizer(kind, {"min": lo, "max": hi})
  if kind == "standardize":
    std = np.maximum(x.std(axis=0), _STD_FLOOR)
    return Normalizer(kind, {"mean": x.mean(axis=0).tolist(), "std": std.tolist()})
  if kind == "l2_sqrt_d":
    return Normalizer(kind, {"dim": int(x.shape[1]),
                             "mean_norm": float(np.linalg.norm(x, axis=1).mean())})
  return Normalizer(kind, {})
