"""M3LR, GMCD's momentum-enriched multimodal low-rank constraint (spec gmcd.md §2.4-2.6).

Each view is a batch feature matrix F_v (B, D). Its relation matrix A_v = rownorm(F_v F_vᵀ) (B, B)
(a raw Gram matrix with L2-normalised rows, not cosines). The V views of one modality stack into
𝒜 (B, B, V), and stage 1 builds two such tensors, path and omic (``pathomic_relations``). The
auxiliary tensor 𝒢 is the tensor-nuclear-norm proximal step of the stop-gradient copy of 𝒜 at
τ = Λ/μ (``update_aux``). The loss μ/2 Σ‖𝒜 − 𝒢‖²_F then pulls the live relation matrices towards a
jointly low-rank tensor. μ grows ×ρ per refresh up to ``max_mu``, so 𝒢 ≈ 0 for the first ~70 steps.

The seed's solver (``my_utils/TSVD_update_aux``) was never released. ``update_aux`` is the
reconstruction of §2.6: the t-SVD singular-value thresholding of t-SVD-MSC (Xie et al. 2018,
``wshrinkObj`` mode 3). Steps: rotate Y[j, v, i] = A[i, j, v]; FFT along the tube axis; soft-threshold
the singular values of every frontal slice by τ, without scaling τ by n₃; inverse FFT; rotate back.
``rotate=False`` is ablation knob (a) of §2.6: the FFT then runs over the V views and the slices are
B x B. To scale τ by n₃ (knob b), pass a scaled τ.

Tensor nuclear norm here means Σ_k ‖Ŷ_k‖_* over all n₃ Fourier slices. That is t-SVD-MSC's ``objV``,
without the 1/n₃ of Lu et al.'s TNN. Only the first ⌈(n₃+1)/2⌉ slices are computed (``rfft``); the
others are their conjugates and give the same singular values.

State (``init_m3lr_state``) is a dict the caller keeps in a non-gradient collection, fresh per fold:
  mu   ()            μ before this step (μ₀ = 1e-5)
  aux  (T, B, B, V)  the auxiliary tensors 𝒢 last computed (zeros at first, as in the seed)
  tnn  (T,)          their tensor nuclear norms (the seed logs them as "g-TNN")
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

MU0 = 1e-5
RHO = 1.1
MAX_MU = 1.0
LAMBDA_GLOBAL = 0.1


def relation_matrix(features: jax.Array, eps: float = 1e-12) -> jax.Array:
  """(B, D) -> (B, B): F Fᵀ with each row divided by max(‖row‖, eps), like torch's F.normalize."""
  gram = features @ features.T
  # sqrt(max(., eps²)) == max(norm, eps), and it keeps a finite gradient at an all-zero (ReLU) row.
  norm = jnp.sqrt(jnp.maximum(jnp.sum(gram * gram, axis=1, keepdims=True), eps * eps))
  return gram / norm


def relation_tensor(views: Sequence[jax.Array]) -> jax.Array:
  """V views (B, D_v) -> (B, B, V): their relation matrices stacked along the last axis."""
  return jnp.stack([relation_matrix(v) for v in views], axis=-1)


def pathomic_views(h_f, h_f_ema, h_p, h_p_ema, h_o, h_o_ema, n_views: int = 4):
  """The seed's stage-1 views (§2.4). Returns (path_views, omic_views), two lists of (B, D) matrices.

  h_*: fused / path / omic features (B, D) of the online model; h_*_ema: those of the EMA model.
  Only the online unimodal feature (h_p or h_o) keeps its gradient. The fused feature is detached in
  the seed and the EMA outputs are no-grad there. n_views: 4 (the GMCD setting) is
  [h_f, h_f_ema, h_x, h_x_ema]; 2 is [h_x, h_x_ema]; 6 and 8 append convex mixes of the max-normalised
  EMA features of the two modalities (0.9/0.1 and 0.8/0.2, then also 0.7/0.3 and 0.6/0.4).
  """
  sg = jax.lax.stop_gradient
  f, f_ema, p_ema, o_ema = sg(h_f), sg(h_f_ema), sg(h_p_ema), sg(h_o_ema)
  if n_views == 2:
    return [h_p, p_ema], [h_o, o_ema]
  path, omic = [f, f_ema, h_p, p_ema], [f, f_ema, h_o, o_ema]
  if n_views == 4:
    return path, omic
  if n_views not in (6, 8):
    raise ValueError(f"n_views must be 2, 4, 6 or 8, got {n_views}")
  # The seed divides by the matrix's global max; its (unused) fused mix is left out.
  p_n, o_n = p_ema / jnp.max(p_ema), o_ema / jnp.max(o_ema)
  for a in (0.9, 0.8, 0.7, 0.6)[: (n_views - 4)]:
    path.append(a * p_n + (1 - a) * o_n)
    omic.append(a * o_n + (1 - a) * p_n)
  return path, omic


def pathomic_relations(h_f, h_f_ema, h_p, h_p_ema, h_o, h_o_ema, n_views: int = 4) -> jax.Array:
  """(2, B, B, V): the path and omic relation tensors of ``pathomic_views``."""
  path, omic = pathomic_views(h_f, h_f_ema, h_p, h_p_ema, h_o, h_o_ema, n_views)
  return jnp.stack([relation_tensor(path), relation_tensor(omic)])


def _tube_last(x, rotate):
  # t-SVD-MSC mode 3 (shiftdim(X, 1)): Y[j, v, i] = X[i, j, v].
  return jnp.transpose(x, (1, 2, 0)) if rotate else x


def _tube_back(y, rotate):
  return jnp.transpose(y, (2, 0, 1)) if rotate else y


def _slice_counts(n3: int) -> jax.Array:
  """How many of the n3 Fourier slices each rfft slice stands for (itself and its conjugate)."""
  k = n3 // 2 + 1
  counts = jnp.full((k,), 2.0).at[0].set(1.0)
  return counts.at[k - 1].set(1.0) if n3 % 2 == 0 else counts


def _fourier_slices(x, rotate):
  y = _tube_last(x, rotate)
  return jnp.moveaxis(jnp.fft.rfft(y, axis=-1), -1, 0), y.shape[-1]  # (n3//2+1, n1, n2)


def tensor_nuclear_norm(x: jax.Array, *, rotate: bool = True) -> jax.Array:
  """Σ over all n₃ Fourier slices of their nuclear norms, for x (n1, n2, n3) (rotated first)."""
  slices, n3 = _fourier_slices(x, rotate)
  s = jnp.linalg.svd(slices, compute_uv=False)
  return jnp.sum(_slice_counts(n3) * jnp.sum(s, axis=-1))


def tsvd_shrink(x: jax.Array, tau, *, rotate: bool = True):
  """t-SVD singular-value soft-thresholding, prox of τ·TNN. x (n1, n2, n3) real -> (same, TNN).

  Every Fourier slice Ŷ_k = U S Vᴴ becomes U max(S − τ, 0) Vᴴ, and the inverse FFT gives a real
  tensor. The second output is the TNN of the result, i.e. Σ of the kept singular values over all
  n₃ slices. Not meant to be differentiated (``update_aux`` stops the gradient).
  """
  slices, n3 = _fourier_slices(x, rotate)
  u, s, vh = jnp.linalg.svd(slices, full_matrices=False)
  s = jnp.maximum(s - tau, 0.0)
  shrunk = (u * s[..., None, :].astype(u.dtype)) @ vh
  # The DC (and even-n3 Nyquist) slices are real, so their shrinkage is too, and the
  # irfft of the half spectrum equals Re(ifft) of the full conjugate-symmetric one.
  y = jnp.fft.irfft(jnp.moveaxis(shrunk, 0, -1), n=n3, axis=-1).astype(x.dtype)
  return _tube_back(y, rotate), jnp.sum(_slice_counts(n3) * jnp.sum(s, axis=-1))


def update_aux(adj: jax.Array, threshold, *, rotate: bool = True):
  """The seed's ``(aux, TNN) = update_aux(adj, threshold)``: adj (B, B, V) -> aux (B, B, V), TNN ().

  Both outputs are constants (gradient stopped), as the seed computes them from detached tensors.
  """
  aux, tnn = tsvd_shrink(jax.lax.stop_gradient(adj), threshold, rotate=rotate)
  return jax.lax.stop_gradient(aux), jax.lax.stop_gradient(tnn)


def shrink_threshold(mu, lambda_global: float = LAMBDA_GLOBAL):
  """τ = Λ / μ, the threshold of ``update_aux``."""
  return lambda_global / mu


def next_mu(mu, rho: float = RHO, max_mu: float = MAX_MU):
  """μ ← min(ρ μ, max_mu), applied once per refresh of 𝒢, after both tensors are shrunk."""
  return jnp.minimum(mu * rho, max_mu)


def mu_after(steps, mu0: float = MU0, rho: float = RHO, max_mu: float = MAX_MU):
  """Closed form of μ after ``steps`` refreshes: min(μ₀ ρ^steps, max_mu)."""
  return jnp.minimum(mu0 * jnp.power(rho, steps), max_mu)


def init_m3lr_state(batch_size: int, num_views: int = 4, num_tensors: int = 2, mu0: float = MU0,
                    dtype=jnp.float32):
  """Fresh M3LR state (see the module docstring); reset at the start of every fold."""
  return {"mu": jnp.asarray(mu0, dtype),
          "aux": jnp.zeros((num_tensors, batch_size, batch_size, num_views), dtype),
          "tnn": jnp.zeros((num_tensors,), dtype)}


def m3lr_loss(relations: jax.Array, state, *, lambda_global: float = LAMBDA_GLOBAL,
              rho: float = RHO, max_mu: float = MAX_MU, refresh=True, rotate: bool = True):
  """One stage-1 step of the constraint. Returns ``(loss, new_state, terms)``.

  relations: (T, B, B, V) live relation tensors (``pathomic_relations``). Gradients flow into the
  views the caller left attached. state: as ``init_m3lr_state``.
  refresh: bool (may be traced). When true, recompute 𝒢 from sg(relations) at τ = Λ/μ and then
  μ ← min(ρμ, max_mu). This is the seed's ``batch_idx % aux_iter == 0``, always true at its
  aux_iter = 1. Otherwise keep 𝒢 and μ. The loss uses the updated μ, as the seed does:
  μ'/2 Σ_{t,v} ‖A_{t,v} − 𝒢_{t,v}‖²_F.
  terms: ``m3lr`` (the loss), ``mu`` (the new μ), ``tnn_<t>`` (per tensor).
  """
  mu = state["mu"]
  tau = shrink_threshold(mu, lambda_global)
  aux, tnn = jax.vmap(lambda a: update_aux(a, tau, rotate=rotate))(relations)
  aux = jnp.where(refresh, aux.astype(state["aux"].dtype), state["aux"])
  tnn = jnp.where(refresh, tnn.astype(state["tnn"].dtype), state["tnn"])
  mu = jnp.where(refresh, next_mu(mu, rho, max_mu), mu)
  loss = 0.5 * mu * jnp.sum(jnp.square(relations - aux))
  terms = {"m3lr": loss, "mu": mu}
  terms.update({f"tnn_{t}": tnn[t] for t in range(tnn.shape[0])})
  return loss, {"mu": mu, "aux": aux, "tnn": tnn}, terms
