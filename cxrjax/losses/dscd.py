"""DSCD, GMCD's discrepancy-supervised contrastive distillation, and vanilla CRD (spec gmcd.md §3.3, §3.4).

DSCD follows the seed's ``CL_utils/CRD_loss_v2.CRDLoss``, built on ``memory_new.ContrastMemory_v4``
and ``ContrastLoss_v2``. Vanilla CRD (``kind="crd"``, the ablation) follows ``CRD_criterion_v3``.

Shapes: B batch, D embedding (128), N training samples of the fold (memory rows), P same-class
candidates (300), K negatives (1024), P2 selected positives (20).
  q_s, q_t        (B, D) L2-normalised projections of the student / teacher features. The caller
                  owns the trainable ``Linear(128, 128)`` heads and applies ``l2_normalize``.
  batch_index     (B,) int, the batch's rows in the fold's training set, all distinct
  contrast_index  (B, P + K) int, from ``sample_contrast_indices``: columns 0..P-1 are same-class
                  candidates (column 0 = the sample itself), P.. are other-class negatives

State (``init_state``) is a dict the caller keeps in a non-gradient collection, fresh per fold:
  memory_s, memory_t  (N, D)  student / teacher banks, U(−σ, σ) with σ = 1/√(D/3) at first; rows
                              that have been updated are unit-norm
  z_s, z_t            ()      NCE normalisers, −1 until the first call sets them, fixed afterwards
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NUM_CANDIDATES = 300
NUM_NEGATIVES = 1024
NUM_POSITIVES = 20
TEMPERATURE = 0.07
MOMENTUM = 0.5
NCE_EPS = 1e-7
KINDS = ("dscd", "crd")


def init_state(key, num_samples: int, dim: int = 128, dtype=jnp.float32):
  """Fresh banks and unset normalisers, like ``ContrastMemory_v4.__init__``."""
  stdv = 1.0 / (dim / 3) ** 0.5
  banks = jax.random.uniform(key, (2, num_samples, dim), dtype, -stdv, stdv)
  return {"memory_s": banks[0], "memory_t": banks[1],
          "z_s": jnp.asarray(-1.0, dtype), "z_t": jnp.asarray(-1.0, dtype)}


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows divided by their L2 norm (the seed's ``Normalize(2)``; eps only guards a zero row)."""
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _draw(order_keys, picks, member: jax.Array, always_replace: bool = False) -> jax.Array:
  """len(picks) indices of the True entries of ``member`` (n,). They are distinct and uniform when
  there are at least that many members (and not ``always_replace``), and drawn uniformly with
  replacement otherwise. order_keys (n,), picks (count,): i.i.d. U[0, 1) draws."""
  n, count = member.shape[0], picks.shape[0]
  size = jnp.sum(member)
  members_first = jnp.argsort(jnp.logical_not(member).astype(jnp.int32), stable=True)
  j = jnp.minimum(jnp.floor(picks * size).astype(jnp.int32), jnp.maximum(size - 1, 0))
  with_replacement = members_first[j]
  if always_replace or count > n:  # static: the draw can only be with replacement
    return with_replacement
  # Random keys order the members; non-members (key 2) sort after all of them.
  order = jnp.argsort(jnp.where(member, order_keys, 2.0))
  return jnp.where(size >= count, order[:count], with_replacement)


@functools.partial(jax.jit, static_argnames=("num_candidates", "num_negatives", "mode"))
def sample_contrast_indices(key, labels: jax.Array, batch_index: jax.Array,
                            num_candidates: int = NUM_CANDIDATES,
                            num_negatives: int = NUM_NEGATIVES, mode: str = "multi_pos"):
  """The seed's ``Pathomic_InstanceSample`` contrast indices: (B,) -> (B, num_candidates + num_negatives).

  labels: (N,) int class of every training sample; batch_index: (B,) rows of the batch.
  mode "multi_pos" (the default, DSCD): ``num_candidates`` same-class indices drawn without
  replacement, then column 0 overwritten by the sample itself (so it may appear twice). If a class
  has fewer than ``num_candidates`` samples, they are drawn WITH replacement instead. The seed's
  ``np.random.choice(replace=False)`` raises in that case. Then ``num_negatives`` indices of the
  other classes, without replacement when there are enough and with replacement otherwise (the
  seed's rule). At least two classes must be present.
  mode "exact" (vanilla CRD): ``num_candidates`` must be 1. The one candidate is the sample itself,
  and the negatives are drawn with replacement from all other samples, whatever their class.
  """
  labels = jnp.asarray(labels)
  batch_index = jnp.asarray(batch_index)
  if mode not in ("multi_pos", "exact"):
    raise ValueError(f"unknown contrast sampling mode {mode!r}; choose 'multi_pos' or 'exact'")
  if mode == "exact" and num_candidates != 1:
    raise ValueError("mode 'exact' has exactly one candidate (the sample); set num_candidates=1")
  n, b = labels.shape[0], batch_index.shape[0]
  # All randomness drawn at once, outside the vmap: four uniform calls compile far faster on CPU
  # than per-example key splits and bounded randint.
  k_op, k_pp, k_on, k_pn = jax.random.split(key, 4)
  u = lambda k, m: jax.random.uniform(k, (b, m))
  rows = jnp.arange(n)

  def one(i, o_pos, p_pos, o_neg, p_neg):
    if mode == "exact":
      # with replacement whatever the pool size, as the seed does in this mode
      return jnp.concatenate([i[None], _draw(o_neg, p_neg, rows != i, always_replace=True)])
    same = labels == labels[i]
    pos = _draw(o_pos, p_pos, same).at[0].set(i)
    return jnp.concatenate([pos, _draw(o_neg, p_neg, jnp.logical_not(same))])

  out = jax.vmap(one)(batch_index, u(k_op, n), u(k_pp, num_candidates), u(k_on, n),
                      u(k_pn, num_negatives))
  return out.astype(jnp.int32)


def contrast_scores(memory: jax.Array, query: jax.Array, index: jax.Array,
                    temperature: float = TEMPERATURE) -> jax.Array:
  """exp(⟨memory[index[b, j]], query[b]⟩ / T): memory (N, D), query (B, D), index (B, J) -> (B, J).
  Memory rows are constants; the gradient reaches only the query."""
  rows = jax.lax.stop_gradient(memory)[index]
  return jnp.exp(jnp.einsum("bjd,bd->bj", rows, query) / temperature)


def relations(memory: jax.Array, query: jax.Array, index: jax.Array) -> jax.Array:
  """cos(memory[index[b, j]], query[b]) (B, J), without gradient (the selection's input)."""
  rows = l2_normalize(memory[index])
  return jax.lax.stop_gradient(jnp.einsum("bjd,bd->bj", rows, l2_normalize(query)))


def select_hard_positives(r_t: jax.Array, r_s: jax.Array, num_pos: int = NUM_POSITIVES) -> jax.Array:
  """(B, P), (B, P) -> (B, num_pos) candidate columns: the num_pos largest r_t − r_s, descending.

  These are the positives the teacher already holds close and the student does not. Slot 0 is then
  overwritten by column 0 (the sample itself), as in the seed: the self-positive is always in, the
  hardest candidate is dropped, and column 0 may appear twice.
  """
  _, top = jax.lax.top_k(r_t - r_s, num_pos)
  return top.at[:, 0].set(0)


def gather_positives(x: jax.Array, selected: jax.Array, num_candidates: int) -> jax.Array:
  """(B, P + K) scores -> (B, P2 + K): the selected candidate columns, then all K negatives."""
  pos = jnp.take_along_axis(x[:, :num_candidates], selected, axis=1)
  return jnp.concatenate([pos, x[:, num_candidates:]], axis=1)


def nce_loss(x: jax.Array, num_pos: int, num_samples: int, eps: float = NCE_EPS) -> jax.Array:
  """The seed's NCE (``ContrastLoss_v2``, ``sample_KD="False"``), x (B, P2 + K) normalised scores.

  With m = K and P_n = 1/N:
  −(1/B) Σ_b [(1/P2) Σ_p log(x_bp / (x_bp + m P_n + ε)) + Σ_n log(m P_n / (x_bn + m P_n + ε))].
  The positive term is averaged over the P2 positives; the negative term is not. With P2 = 1 this is
  CRD's ``ContrastLoss``.
  """
  m = x.shape[1] - num_pos
  c = m / num_samples
  pos, neg = x[:, :num_pos], x[:, num_pos:]
  log_d1 = jnp.log(pos / (pos + c + eps))
  log_d0 = jnp.log(c / (neg + c + eps))
  return -jnp.mean(jnp.sum(log_d1, axis=1) / num_pos + jnp.sum(log_d0, axis=1))


def set_normalizer(z: jax.Array, x: jax.Array, num_samples: int) -> jax.Array:
  """Z: mean(x) N on the first call (z < 0), unchanged afterwards; a constant either way."""
  return jax.lax.stop_gradient(jnp.where(z < 0, jnp.mean(x) * num_samples, z))


def update_memory(memory: jax.Array, batch_index: jax.Array, query: jax.Array,
                  momentum: float = MOMENTUM) -> jax.Array:
  """memory[y] ← ℓ2norm(m memory[y] + (1 − m) query) for the batch rows y (distinct); no gradient."""
  mixed = momentum * memory[batch_index] + (1.0 - momentum) * jax.lax.stop_gradient(query)
  return memory.at[batch_index].set(l2_normalize(mixed).astype(memory.dtype))


def dscd_loss(q_s: jax.Array, q_t: jax.Array, state, batch_index: jax.Array,
              contrast_index: jax.Array, *, kind: str = "dscd",
              num_candidates: int = NUM_CANDIDATES, num_pos: int = NUM_POSITIVES,
              temperature: float = TEMPERATURE, momentum: float = MOMENTUM, num_samples=None):
  """One DSCD (or vanilla CRD) instance for one step. Returns ``(loss, new_state, terms)``.

  num_samples: N of the NCE (Z = mean(x) N, P_n = 1/N); None = the banks' rows. A bank padded to a
  fixed row count (one compiled step for folds of different sizes, rows split over devices) passes
  the fold's true N, possibly traced.

  Scores: x_s = exp(⟨M_t[idx], q_s⟩/T), the student anchor against the teacher bank, and
  x_t = exp(⟨M_s[idx], q_t⟩/T), the teacher anchor against the student bank.
  kind "dscd": rank the candidates by r_t − r_s, where r_t = cos(M_t[idx], q_t) and
  r_s = cos(M_s[idx], q_s). Keep the ``num_pos`` largest, with slot 0 set to the sample itself, and
  gather the same columns from x_s and x_t. Keep all K negatives.
  kind "crd": the one positive is column 0 and the negatives are the columns from
  ``num_candidates`` on. With indices of ``mode="exact"``, pass num_candidates=1. The v3 path's
  ramp (loss × epoch/niter_decay) is a scalar the caller applies.
  Then x ← x/Z (Z set on the first call) and loss = NCE(x_s) + NCE(x_t). Both banks get the batch's
  momentum update. The loss is computed against the banks before the update, as in the seed.
  Gradients reach q_s (through x_s) and q_t (through x_t, i.e. the teacher's projection head).
  terms: ``nce_s``, ``nce_t``.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown contrastive distillation {kind!r}; choose one of {KINDS}")
  if contrast_index.shape[1] <= num_candidates:
    raise ValueError(f"contrast_index has {contrast_index.shape[1]} columns: no negatives after "
                     f"the {num_candidates} candidates")
  if kind == "dscd" and not 0 < num_pos <= num_candidates:
    raise ValueError(f"num_pos={num_pos} must be in 1..num_candidates={num_candidates}")
  mem_s, mem_t = state["memory_s"], state["memory_t"]
  n = mem_s.shape[0] if num_samples is None else num_samples
  x_s = contrast_scores(mem_t, q_s, contrast_index, temperature)
  x_t = contrast_scores(mem_s, q_t, contrast_index, temperature)
  if kind == "dscd":
    cand = contrast_index[:, :num_candidates]
    sel = select_hard_positives(relations(mem_t, q_t, cand), relations(mem_s, q_s, cand), num_pos)
    x_s = gather_positives(x_s, sel, num_candidates)
    x_t = gather_positives(x_t, sel, num_candidates)
    p = num_pos
  else:
    x_s = jnp.concatenate([x_s[:, :1], x_s[:, num_candidates:]], axis=1)
    x_t = jnp.concatenate([x_t[:, :1], x_t[:, num_candidates:]], axis=1)
    p = 1
  z_s = set_normalizer(state["z_s"], x_s, n)
  z_t = set_normalizer(state["z_t"], x_t, n)
  nce_s = nce_loss(x_s / z_s, p, n)
  nce_t = nce_loss(x_t / z_t, p, n)
  new_state = {"memory_s": update_memory(mem_s, batch_index, q_s, momentum),
               "memory_t": update_memory(mem_t, batch_index, q_t, momentum),
               "z_s": z_s.astype(state["z_s"].dtype), "z_t": z_t.astype(state["z_t"].dtype)}
  return nce_s + nce_t, new_state, {"nce_s": nce_s, "nce_t": nce_t}
