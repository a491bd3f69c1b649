"""Gaussian diffusion maths: schedules, parametrisations, posterior, DDPM / DDIM samplers.

Pure functions on ``jax.numpy`` arrays; no Flax modules and no global state, so everything
here can be jitted. Semantics follow the DALLE-2 diffusion prior as written in
``shared/spec/prior_and_fmkd.md`` §A.3 (cosine schedule, ancestral DDPM, upstream DDIM quirk).

Shapes: ``x0``, ``x_t``, ``noise``: ``(B, ...)`` (e.g. ``(B, 512)`` embeddings); ``t``: int ``(B,)``.
A ``denoise_fn(x_t, t_vec) -> output`` takes ``x_t: (B, ...)`` and ``t_vec: int32 (B,)`` and
returns the model output of the same shape as ``x_t`` in the chosen parametrisation.
"""
from __future__ import annotations

from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PARAMETRISATIONS = ("x0", "eps", "v")
SCHEDULE_KINDS = ("cosine", "linear")

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


@flax.struct.dataclass
class Schedule:
  """Per-timestep diffusion coefficients, each a float32 array of shape ``(T,)``."""

  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array

  @property
  def num_timesteps(self) -> int:
    # Shapes are static under jit, so this is a Python int even inside traced code.
    return int(self.betas.shape[0])


# ----------------------------------------------------------------------------- schedules


def cosine_beta_schedule(T: int, s: float = 0.008) -> np.ndarray:
  """Nichol & Dhariwal cosine schedule, float64 ``(T,)``, betas clipped to [0, 0.999]."""
  x = np.linspace(0, T, T + 1, dtype=np.float64)
  abar = np.cos(((x / T) + s) / (1 + s) * np.pi * 0.5) ** 2
  abar = abar / abar[0]
  betas = 1.0 - (abar[1:] / abar[:-1])
  return np.clip(betas, 0.0, 0.999)


def linear_beta_schedule(T: int) -> np.ndarray:
  """DALLE-2 linear schedule, float64 ``(T,)``: rescaled so T=1000 gives 1e-4 .. 0.02."""
  scale = 1000.0 / T
  return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)


def schedule_from_betas(betas) -> Schedule:
  """A :class:`Schedule` from any float ``(T,)`` betas; maths in float64, stored as float32.

  The one place the coefficients are derived: :func:`make_schedule` and RadDiffusion's
  :func:`power_linspace_schedule` only choose the betas.
  """
  betas = np.asarray(betas, dtype=np.float64)
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
  f32 = lambda a: jnp.asarray(np.asarray(a, dtype=np.float32))  # noqa: E731
  return Schedule(
      betas=f32(betas),
      alphas_cumprod=f32(abar),
      alphas_cumprod_prev=f32(abar_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(abar)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - abar)),
      sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / abar)),
      sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / abar - 1.0)),
      posterior_variance=f32(post_var),
      # beta~_0 is exactly 0; the floor keeps the log finite (that step adds no noise anyway).
      posterior_log_variance_clipped=f32(np.log(np.maximum(post_var, 1e-20))),
      posterior_mean_coef1=f32(betas * np.sqrt(abar_prev) / (1.0 - abar)),
      posterior_mean_coef2=f32((1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)),
  )


def make_schedule(kind: str, T: int) -> Schedule:
  """Build a :class:`Schedule` of length ``T`` over the ``kind`` betas (``SCHEDULE_KINDS``)."""
  if kind == "cosine":
    betas = cosine_beta_schedule(T)
  elif kind == "linear":
    betas = linear_beta_schedule(T)
  else:
    raise ValueError(f"unknown beta schedule {kind!r}; choose one of {SCHEDULE_KINDS}")
  return schedule_from_betas(betas)


def extract(arr: jax.Array, t: jax.Array, x_shape) -> jax.Array:
  """Gather ``arr[t]`` (``t``: int ``(B,)``) and reshape to ``(B, 1, ..., 1)`` matching ``x_shape``."""
  out = jnp.take(arr, t, axis=0)
  return out.reshape((t.shape[0],) + (1,) * (len(x_shape) - 1))


def diffusion_timestep_sample(rng: jax.Array, batch: int, T: int) -> jax.Array:
  """Uniform training timesteps, int32 ``(batch,)`` in ``[0, T)``."""
  return jax.random.randint(rng, (batch,), 0, T, dtype=jnp.int32)


# ----------------------------------------------------------------------------- forward process


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. ``x0, noise: (B, ...)``, ``t: (B,)``."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
          + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)


def predict_x0_from_eps(schedule: Schedule, x_t, t, eps):
  """x0 = x_t / sqrt(abar) - sqrt(1/abar - 1) eps."""
  return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
          - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)


def predict_eps_from_x0(schedule: Schedule, x_t, t, x0):
  """eps = (x_t / sqrt(abar) - x0) / sqrt(1/abar - 1)  (inverse of :func:`predict_x0_from_eps`)."""
  return ((extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0)
          / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape))


def v_target(schedule: Schedule, x0, t, noise):
  """v = sqrt(abar) noise - sqrt(1 - abar) x0 (Salimans & Ho)."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * noise
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0)


def predict_x0_from_v(schedule: Schedule, x_t, t, v):
  """x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x_t.shape) * x_t
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)


def _check_param(parametrisation: str) -> None:
  if parametrisation not in PARAMETRISATIONS:
    raise ValueError(f"unknown parametrisation {parametrisation!r}; choose one of {PARAMETRISATIONS}")


def model_output_to_x0(schedule: Schedule, output, x_t, t, parametrisation: str):
  """Convert a network output (``(B, ...)``) in ``parametrisation`` to an x0 estimate."""
  _check_param(parametrisation)
  if parametrisation == "x0":
    return output
  if parametrisation == "eps":
    return predict_x0_from_eps(schedule, x_t, t, output)
  return predict_x0_from_v(schedule, x_t, t, output)


def training_target(schedule: Schedule, x0, noise, t, parametrisation: str):
  """Regression target for the network in ``parametrisation``: x0, noise, or v."""
  _check_param(parametrisation)
  if parametrisation == "x0":
    return x0
  if parametrisation == "eps":
    return noise
  return v_target(schedule, x0, t, noise)


def q_posterior(schedule: Schedule, x0, x_t, t):
  """q(x_{t-1} | x_t, x0): returns ``(mean (B, ...), variance (B,1..), log_variance (B,1..))``."""
  mean = (extract(schedule.posterior_mean_coef1, t, x_t.shape) * x0
          + extract(schedule.posterior_mean_coef2, t, x_t.shape) * x_t)
  var = extract(schedule.posterior_variance, t, x_t.shape)
  logvar = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
  return mean, var, logvar


def classifier_free_guidance(cond_out, uncond_out, scale):
  """uncond + (cond - uncond) * scale; scale = 1 returns ``cond_out``."""
  return uncond_out + (cond_out - uncond_out) * scale


# ----------------------------------------------------------------------------- samplers


def _x0_estimate(schedule, denoise_fn, x, t_vec, parametrisation, clip_denoised):
  out = denoise_fn(x, t_vec).astype(x.dtype)  # keep the loop carry dtype fixed (e.g. bf16 nets)
  x0 = model_output_to_x0(schedule, out, x, t_vec, parametrisation)
  if clip_denoised is not None:
    x0 = jnp.clip(x0, -clip_denoised, clip_denoised)
  return x0


def ddpm_sample(denoise_fn: DenoiseFn, schedule: Schedule, shape, rng: jax.Array, *,
                parametrisation: str = "x0", clip_denoised: Optional[float] = None,
                dtype=jnp.float32) -> jax.Array:
  """Ancestral DDPM sampling over all T steps (i = T-1 .. 0). Returns x of ``shape`` = (B, ...).

  Each step: x0_hat from the net, mu = c1_i x0_hat + c2_i x, x <- mu + 1[i>0] exp(logvar_i / 2) z.
  ``clip_denoised=c`` clamps x0_hat to [-c, c] (upstream uses 1.0 unless predicting x0).
  Step i draws z from ``fold_in(loop_key, i)``, so results do not depend on how the loop is run.
  """
  _check_param(parametrisation)
  T = schedule.num_timesteps
  init_key, loop_key = jax.random.split(rng)
  x = jax.random.normal(init_key, shape, dtype)

  def body(k, x):
    i = T - 1 - k
    t_vec = jnp.full((shape[0],), i, dtype=jnp.int32)
    x0 = _x0_estimate(schedule, denoise_fn, x, t_vec, parametrisation, clip_denoised)
    mean, _, logvar = q_posterior(schedule, x0, x, t_vec)
    z = jax.random.normal(jax.random.fold_in(loop_key, i), shape, dtype)
    nonzero = (i > 0).astype(dtype)  # the final step returns the posterior mean, no noise
    return (mean + nonzero * jnp.exp(0.5 * logvar) * z).astype(dtype)

  return jax.lax.fori_loop(0, T, body, x)


def ddim_timesteps(T: int, S: int) -> list[tuple[int, int]]:
  """Upstream DALLE-2 DDIM (t, t_next) pairs: int(linspace(-1, T, S+1)[:-1]), reversed, zipped.

  Gives S - 1 pairs (S - 1 network calls); the last pair's ``t_next`` is -1.
  The k-th linspace point is -1 + k (T+1) / S; it is truncated toward zero in exact integer
  arithmetic. Upstream's float32 linspace agrees except possibly where that value is an exact
  integer (e.g. T=1000, S=49, k=7), where torch's rounding, platform-dependent, may land one lower.
  """
  times = []
  for k in range(S):
    num = k * (T + 1) - S  # value = num / S
    times.append(num // S if num >= 0 else -((-num) // S))  # .int() truncates toward zero
  times = times[::-1]
  return list(zip(times[:-1], times[1:]))


def ddim_sample(denoise_fn: DenoiseFn, schedule: Schedule, shape, rng: jax.Array, *,
                num_steps: int, eta: float = 1.0, parametrisation: str = "x0",
                use_upstream_alpha_quirk: bool = True, clip_denoised: Optional[float] = None,
                dtype=jnp.float32) -> jax.Array:
  """DDIM sampling over :func:`ddim_timesteps` (``num_steps`` static). Returns x of ``shape``.

  eps_hat is derived from x0_hat with the true abar_t buffers. With ``use_upstream_alpha_quirk``
  the DDIM coefficients use a = abar_prev[t], a' = abar_prev[t_next] (as upstream does);
  otherwise a = abar[t], a' = abar[t_next] (textbook DDIM). When t_next < 0, x = x0_hat.
  """
  _check_param(parametrisation)
  T = schedule.num_timesteps
  if not 2 <= num_steps <= T:
    raise ValueError(f"DDIM num_steps must be in [2, {T}], got {num_steps}")
  pairs = np.asarray(ddim_timesteps(T, num_steps), dtype=np.int32)
  alphas = schedule.alphas_cumprod_prev if use_upstream_alpha_quirk else schedule.alphas_cumprod
  init_key, loop_key = jax.random.split(rng)
  x = jax.random.normal(init_key, shape, dtype)

  def step(x, pair):
    t, t_next = pair[0], pair[1]
    t_vec = jnp.full((shape[0],), t, dtype=jnp.int32)
    x0 = _x0_estimate(schedule, denoise_fn, x, t_vec, parametrisation, clip_denoised)
    eps = predict_eps_from_x0(schedule, x, t_vec, x0)
    a = alphas[t]
    a_next = alphas[jnp.maximum(t_next, 0)]  # t_next = -1 is handled by the final where
    # Guard 1 - a = 0 (quirk with t = 0 gives a = 1); that branch is discarded anyway.
    c1 = eta * jnp.sqrt(jnp.maximum((1 - a / a_next) * (1 - a_next), 0.0)
                        / jnp.maximum(1 - a, 1e-20))
    c2 = jnp.sqrt(jnp.maximum(1 - a_next - c1 ** 2, 0.0))
    z = jax.random.normal(jax.random.fold_in(loop_key, t), shape, dtype)
    x_new = jnp.sqrt(a_next) * x0 + c1 * z + c2 * eps
    return jnp.where(t_next < 0, x0, x_new).astype(dtype), None

  x, _ = jax.lax.scan(step, x, jnp.asarray(pairs))
  return x


def sample(denoise_fn: DenoiseFn, schedule: Schedule, shape, rng: jax.Array, *,
           num_steps: Optional[int] = None, eta: float = 1.0, parametrisation: str = "x0",
           clip_denoised: Optional[float] = None, dtype=jnp.float32) -> jax.Array:
  """Upstream dispatch: DDPM when ``num_steps`` is None or T, DDIM when ``num_steps < T``."""
  T = schedule.num_timesteps
  if num_steps is None or num_steps == T:
    return ddpm_sample(denoise_fn, schedule, shape, rng, parametrisation=parametrisation,
                       clip_denoised=clip_denoised, dtype=dtype)
  if num_steps > T:
    raise ValueError(f"num_steps={num_steps} exceeds the schedule's T={T}")
  return ddim_sample(denoise_fn, schedule, shape, rng, num_steps=num_steps, eta=eta,
                     parametrisation=parametrisation, clip_denoised=clip_denoised, dtype=dtype)


# ----------------------------------------------------------------------------- RadDiffusion (D.6)
# The seed's diffusion-MAE schedule and forward noising (spec raygen_and_raddiffusion.md D.6.1-3).
# Appended as separate functions so make_schedule's kinds stay as they were; the Schedule itself
# comes from schedule_from_betas, as make_schedule's does.


def power_linspace_betas(T: int = 100, lo: float = 1e-4, hi: float = 0.2,
                         rho: float = 2.0) -> np.ndarray:
  """RadDiffusion betas, float64 ``(T,)``: ``linspace(lo, hi, T) ** rho`` (D.6.1).

  The seed's default is T = 100, rho = 2 (betas 1e-8 .. 0.04): abar_99 ~ 0.257, so the chain
  never reaches pure noise; rho = 1 (an earlier commit) reaches abar_99 ~ 2e-5.
  """
  return np.linspace(lo, hi, T, dtype=np.float64) ** rho


def power_linspace_schedule(T: int = 100, lo: float = 1e-4, hi: float = 0.2,
                            rho: float = 2.0) -> Schedule:
  """:class:`Schedule` over :func:`power_linspace_betas` (RadDiffusion's, D.6.1)."""
  return schedule_from_betas(power_linspace_betas(T, lo, hi, rho))


def sample_timesteps(key: jax.Array, n: int, T: int) -> jax.Array:
  """One uniform step per image, int32 ``(n,)`` in ``[0, T)`` (D.6.3, the seed's 1 sparse step)."""
  return diffusion_timestep_sample(key, n, T)


def sample_sparse_timesteps(key: jax.Array, n: int, T: int, k: int) -> jax.Array:
  """``k`` distinct uniform steps per image, sorted descending, int32 ``(n, k)`` (D.6.3, k > 1)."""
  if not 1 <= k <= T:
    raise ValueError(f"need 1 <= k <= T, got k={k}, T={T}")
  # The first k of a uniform random permutation are k distinct uniform draws.
  perm = jnp.argsort(jax.random.uniform(key, (n, T)), axis=-1)[:, :k]
  return -jnp.sort(-perm, axis=-1).astype(jnp.int32)


def noise_masked_patches(key: jax.Array, images: jax.Array, mask: jax.Array, t: jax.Array,
                         schedule: Schedule, patch: int) -> jax.Array:
  """The seed's ``add_noise`` (D.6.2): the noisy composite the diffusion-MAE decoder reads.

  ``images: (..., H, W, C)`` in [0, 1]; ``mask: (..., L)`` with 1 = masked patch, L = (H/p)(W/p)
  in row-major order; ``t: int (...)`` one step per image. ``x_noisy = sqrt(abar_t) x +
  sqrt(1 - abar_t) eps`` over the whole image; masked patches come from ``x_noisy``, visible ones
  from ``x``; the composite is clipped to [-1, 1] (with data in [0, 1] only the lower side can
  bite). Returns ``(..., H, W, C)`` with no gradient (the seed computes it under ``no_grad``).
  """
  *lead, H, W, C = images.shape
  gh, gw = H // patch, W // patch
  if gh * patch != H or gw * patch != W or mask.shape[-1] != gh * gw:
    raise ValueError(f"mask of {mask.shape[-1]} patches does not tile a {H}x{W} image with "
                     f"{patch}x{patch} patches")
  # Drawn flat, then reshaped: the same numbers (every generator counts elements in row-major
  # order), but XLA:CPU compiles a threefry draw of rank 4 or 5 some 10x slower than a flat one
  # (a (2, 2, 8, 12, 1) draw: 5.2 s, flat 0.3 s).
  eps = jax.random.normal(key, (images.size,), images.dtype).reshape(images.shape)
  shape = tuple(lead) + (1, 1, 1)
  a = jnp.take(schedule.sqrt_alphas_cumprod, t).reshape(shape).astype(images.dtype)
  s = jnp.take(schedule.sqrt_one_minus_alphas_cumprod, t).reshape(shape).astype(images.dtype)
  noisy = a * images + s * eps
  # Patch mask -> pixel mask: (..., gh, gw) repeated p times along rows and columns.
  pix = mask.reshape(*lead, gh, 1, gw, 1, 1) > 0
  pix = jnp.broadcast_to(pix, (*lead, gh, patch, gw, patch, 1)).reshape(*lead, H, W, 1)
  return jax.lax.stop_gradient(jnp.clip(jnp.where(pix, noisy, images), -1.0, 1.0))
