"""Array operations of the DenseNet (models.densenet) chosen for XLA CPU's speed, each exact.

- ``max_pool_3x3_s2``: torch's 3x3/2 max pool with a gather-form custom VJP (ties go where torch
  sends them) instead of XLA's select-and-scatter.
- ``avg_pool_2x2``: torch's 2x2/2 average pool as four strided slices.
- ``fusion_barrier`` / ``barrier_predicate`` / ``use_fusion_barriers``: an identity XLA cannot fuse
  across, forward and backward, and when to use it.

Why each is shaped as it is, with the measurements: the docstrings here and
benchmarks/RESULTS.md (DenseNet-121 train step).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def barrier_predicate(x: Array) -> Array:
  """A scalar bool that is True at run time but that XLA cannot fold: x's first element == itself.

  (False only if that element is NaN, which fusion_barrier does not care about.) Compute it once
  per program and share it: under a sharded batch, reading x's first element is a collective.
  """
  first = x.reshape(-1)[0]
  return first == first


def fusion_barrier(x: Array, pred: Array) -> Array:
  """Identity (any shape -> same) that XLA cannot fuse across, forward and backward.

  An identity ``lax.cond`` on the runtime predicate `pred` (``barrier_predicate``): XLA never
  fuses across a conditional, so the operand is computed once into a buffer that every consumer
  reads, and, since JAX differentiates a cond into a cond, the same holds for the cotangent in the
  backward pass. ``jax.lax.optimization_barrier`` does not do this on CPU (XLA expands it before
  fusion). On GPUs a conditional usually waits for the host to read its predicate, and the fusion
  problem it solves was measured on CPU only, so the models use it on CPU only.
  """
  # The second branch is `v * 1`, not `v`: JAX drops a cond whose branches are the same jaxpr.
  return jax.lax.cond(pred, lambda v: v, lambda v: v * 1, x)


def use_fusion_barriers(setting: bool | None) -> bool:
  """`setting`, or when None, whether the default backend is the CPU (where barriers pay)."""
  return jax.default_backend() == "cpu" if setting is None else setting


def _pool_views(xp: Array, out_hw: tuple[int, int]):
  """(tap k = 3 dy + dx, view) for the 9 taps of a 3x3/2 window over padded xp (B, H+2, W+2, C)."""
  b, _, _, c = xp.shape
  ho, wo = out_hw
  for dy in range(3):
    for dx in range(3):
      yield dy * 3 + dx, jax.lax.slice(xp, (0, dy, dx, 0), (b, dy + 2 * (ho - 1) + 1,
                                                            dx + 2 * (wo - 1) + 1, c), (1, 2, 2, 1))


@jax.custom_vjp
def max_pool_3x3_s2(x: Array) -> Array:
  """torch MaxPool2d(3, stride=2, padding=1): (B, H, W, C) -> (B, (H-1)//2+1, (W-1)//2+1, C).

  Same values as reduce_window; the gradient goes to the first maximal element of each window
  in row-major order, as torch's CPU kernel picks it. Why custom: XLA CPU differentiates
  reduce_window with select-and-scatter over an iota of the padded input, ~0.2 s of a
  DenseNet-121 step at 224 px (benchmarks/RESULTS.md); here the forward also records each
  window's winning tap (int8) and the backward gathers: an input pixel of row parity p receives
  from 1 (p even) or 2 (p odd) output rows, likewise for columns, so each of the 4 parity
  classes is a sum of at most 4 selects, written out interleaved in one pass.
  """
  return _max_pool_fwd(x)[0]


def _max_pool_fwd(x: Array):
  h, w = x.shape[1:3]
  out_hw = ((h - 1) // 2 + 1, (w - 1) // 2 + 1)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  views = list(_pool_views(xp, out_hw))
  out = views[0][1]
  for _, v in views[1:]:
    out = jnp.maximum(out, v)
  winner = jnp.full(out.shape, 8, jnp.int8)
  for k, v in reversed(views):  # ends at the first tap equal to the maximum
    winner = jnp.where(v == out, jnp.int8(k), winner)
  return out, (winner, (h, w))


def _max_pool_bwd(residuals, g):
  winner, (h, w) = residuals
  b, ho, wo, c = g.shape

  def next_output(a, fill, rows: bool, cols: bool):
    """a[oy + rows, ox + cols], `fill` past the end."""
    if rows:
      a = jnp.pad(a[:, 1:], ((0, 0), (0, 1), (0, 0), (0, 0)), constant_values=fill)
    if cols:
      a = jnp.pad(a[:, :, 1:], ((0, 0), (0, 0), (0, 1), (0, 0)), constant_values=fill)
    return a

  # Input row 2k (parity 0) is tap dy=1 of output row k; row 2k+1 is tap dy=2 of output row k
  # and tap dy=0 of output row k+1. Columns alike.
  sources = {0: ((1, False),), 1: ((2, False), (0, True))}
  classes = []
  for py in (0, 1):
    row = []
    for px in (0, 1):
      acc = jnp.zeros_like(g)
      for dy, sy in sources[py]:
        for dx, sx in sources[px]:
          hit = next_output(winner, -1, sy, sx) == dy * 3 + dx
          acc = acc + jnp.where(hit, next_output(g, 0, sy, sx), 0)
      row.append(acc)
    classes.append(jnp.stack(row, axis=3))  # (B, Ho, Wo, 2, C)
  grad = jnp.stack(classes, axis=2).reshape(b, 2 * ho, 2 * wo, c)  # rows 2k + py, cols 2k + px
  return (grad[:, :h, :w],)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


def avg_pool_2x2(x: Array) -> Array:
  """torch AvgPool2d(2, stride=2): (B, H, W, C) -> (B, H // 2, W // 2, C), odd edges dropped.

  Four strided slices: in a DenseNet step on XLA CPU their forward and backward cost less than
  reduce_window's or a reshape-mean's (transition 1, fwd + bwd: 33 vs 53 / 49 ms).
  """
  h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  x = x[:, :h, :w]
  return 0.25 * ((x[:, 0::2, 0::2] + x[:, 1::2, 0::2]) + (x[:, 0::2, 1::2] + x[:, 1::2, 1::2]))
