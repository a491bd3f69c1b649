"""Iterative parallel decoding of masked image tokens: RayGen's sampler and MaskGIT's (spec
raygen_and_raddiffusion.md C.8, C.11). Pure functions of arrays and a model-agnostic
``tokens_to_logits``; the schedules are static Python numbers.

Shapes: B images, N tokens, C codebook entries (the mask id is >= C), K steps.

``tokens_to_logits(ids, conditional) -> logits``: ids (B, N) int32, ``conditional`` a static
Python bool, logits (B, N, C) float. Without guidance ``decode`` calls it once per step with
``conditional=True``; with ``guidance_scale`` s > 0 it also calls it with ``False`` (the null
condition: models.maskgit.null_condition) and uses (1 + s) * cond - s * uncond as the logits,
for sampling and for the confidence scores alike (lucidrains' MUSE with cond_scale = 1 + s).
models.maskgit.make_tokens_to_logits builds it for a TokenTransformer.

Both variants run as one ``lax.scan`` over the K steps, so ``tokens_to_logits`` is traced once and
the whole decode jits with it closed over. Every operation is per row (sorts, top-k, sampling
along N or C), so a batch sharded over a mesh stays sharded; there are no host callbacks.

Each step k: re-mask the ``mask_counts(...)[k]`` positions of highest priority, compute logits,
sample, fill only the masked slots, and set the next priorities:
  raygen  (the seed's ``ModelV2.generate``): priority = 1 - softmax(logits)[pred] on newly filled
          slots and -1e5 on tokens fixed earlier (zeros at the start, so step 0 masks all);
          tokens by Gumbel-max over the top-ceil((1 - topk_filter) C) logits at temperature
          T0 (K - 1 - k) / K (clamped at 1e-10, so the last step is an argmax).
  maskgit (google-research/maskgit libml/parallel_decode.py): tokens by categorical sampling of
          the plain logits (no filter, no temperature); priority = -(log p[pred] +
          choice_temperature (1 - (k + 1) / K) Gumbel) on new slots, -inf on known ones.
Ties in priority go to the lower position (stable sort); the top-k filter keeps every logit tied
with the k-th (torch keeps exactly k), which matters only for exactly equal logits. MaskGIT masks
``confidence < cut_off`` and so masks fewer under ties; here exactly the scheduled count is masked.
The per-step output is the filled sequence after each step (MaskGIT's ``final_seqs``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
TokensToLogits = Callable[[Array, bool], Array]

VARIANTS = ("raygen", "maskgit")
_FIXED = -1e5  # the seed's score for tokens fixed at an earlier step
_TEMPERATURE_FLOOR = 1e-10  # the seed's gumbel_sample clamp
_MASKGIT_MIN_RATIO = 1e-6  # mask_schedule.schedule clips its ratio to [1e-6, 1]


def _check(steps: int, variant: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"unknown decoding variant {variant!r}; expected one of {VARIANTS}")
  if not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"steps must be a positive int, got {steps!r}")


def raygen_times(steps: int) -> np.ndarray:
  """t_k = k / (K - 1) as float32 ``torch.linspace(0, 1, K)`` (K = 1: [0]): (K,) float32.

  torch fills the first half as start + i * step and the second as end - (K - 1 - i) * step.
  """
  if steps == 1:
    return np.zeros(1, np.float32)
  step = np.float32(1.0) / np.float32(steps - 1)
  i = np.arange(steps)
  return np.where(i < steps // 2, i * step, np.float32(1.0) - (steps - 1 - i) * step).astype(
      np.float32)


def mask_counts(num_tokens: int, steps: int, variant: str = "raygen") -> tuple[int, ...]:
  """How many of ``num_tokens`` are masked in the model's input at each of the K steps.

  raygen:  max(int(N cos(pi/2 t_k)), 1), float32 as the seed (N=1024, K=3: 1024, 724, 1).
  maskgit: N at step 0; then m_k = max(1, min(m_{k-1} - 1, floor(N clip(cos(pi/2 (k/K)),
           1e-6, 1)))), the count MaskGIT re-masks after step k - 1 (float32 as its jnp code).
  """
  _check(steps, variant)
  n = np.float32(num_tokens)
  if variant == "raygen":
    # torch: cos(t * math.pi * 0.5) on float32, times seq_len, .item(), int() truncation
    p = np.cos(raygen_times(steps) * np.float32(math.pi) * np.float32(0.5), dtype=np.float32)
    return tuple(max(int(v), 1) for v in (p * n).astype(np.float32))
  counts = [num_tokens]
  for k in range(1, steps):
    ratio = np.float32(k) / np.float32(steps)
    p = np.clip(np.cos(np.float32(math.pi / 2.0) * ratio, dtype=np.float32),
                np.float32(_MASKGIT_MIN_RATIO), np.float32(1.0))
    counts.append(max(1, min(counts[-1] - 1, int(np.floor(n * p)))))
  return tuple(counts)


def token_temperatures(steps: int, temperature: float) -> tuple[float, ...]:
  """RayGen's annealed sampling temperatures T0 (K - 1 - k) / K (K=3, T0=1.3: 0.867, 0.433, 0)."""
  return tuple(temperature * (steps - 1 - k) / steps for k in range(steps))


def choice_temperatures(steps: int, choice_temperature: float) -> tuple[float, ...]:
  """MaskGIT's re-masking noise scales choice_temperature * (1 - (k + 1) / K)."""
  return tuple(choice_temperature * (1.0 - (k + 1) / steps) for k in range(steps))


def topk_count(codebook_size: int, topk_filter: float) -> int:
  """Candidates kept per position by RayGen's filter: ceil((1 - alpha) C) (alpha=0.5, C=1024: 512;
  alpha=0.9: 103)."""
  if not 0.0 <= topk_filter < 1.0:
    raise ValueError(f"topk_filter must be in [0, 1), got {topk_filter}")
  return min(codebook_size, math.ceil((1 - topk_filter) * codebook_size))


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A decode's static per-step numbers (each a K-tuple): masked tokens in the model's input,
  token-sampling temperatures (raygen; zeros for maskgit, which samples plainly) and re-masking
  noise scales (maskgit; zeros for raygen)."""
  mask_counts: tuple[int, ...]
  temperatures: tuple[float, ...]
  choice_temperatures: tuple[float, ...]


def schedule(num_tokens: int, steps: int, variant: str = "raygen", temperature: float = 1.3,
             choice_temperature: float = 4.5) -> Schedule:
  counts = mask_counts(num_tokens, steps, variant)
  zeros = (0.0,) * steps
  if variant == "raygen":
    return Schedule(counts, token_temperatures(steps, temperature), zeros)
  return Schedule(counts, zeros, choice_temperatures(steps, choice_temperature))


# ----------------------------------------------------------------------------- per-step pieces
def top_n_mask(priority: Array, n: Array) -> Array:
  """(B, N) bool, True at the n highest-priority positions of each row (n a traced int scalar);
  ties go to the lower position."""
  order = jnp.argsort(-priority, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1)
  return ranks < n


def topk_filter_logits(logits: Array, k: int) -> Array:
  """logits (..., C) with everything below the per-position k-th largest set to -inf."""
  if k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits >= kth, logits, -jnp.inf)


def _take(x: Array, ids: Array) -> Array:
  return jnp.take_along_axis(x, ids[..., None], axis=-1)[..., 0]


def decode(tokens_to_logits: TokensToLogits, key: Array, batch: int, seq_len: int, mask_id: int,
           *, steps: int = 3, temperature: float = 1.3, topk_filter: float = 0.5,
           variant: str = "raygen", choice_temperature: float = 4.5,
           guidance_scale: float = 0.0) -> tuple[Array, Array]:
  """Generates (B, N) token ids from all-masked inputs in K = ``steps`` parallel steps.

  tokens_to_logits: see the module doc; key: a PRNG key (step k uses fold_in(key, k)).
  temperature, topk_filter: RayGen's T0 and alpha (raygen only; RayGen's production setting is
    K=3, T0=1.3, alpha=0.5, the defaults). choice_temperature: MaskGIT's (maskgit only).
  guidance_scale: s >= 0; 0 calls only the conditional logits.
  Returns (ids (B, N) int32, per-step ids (K, B, N) int32), ids == per-step[-1], every id in
  [0, C).
  """
  _check(steps, variant)
  if guidance_scale < 0:
    raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
  plan = schedule(seq_len, steps, variant, temperature, choice_temperature)
  s = float(guidance_scale)

  def logits_of(ids):
    logits = tokens_to_logits(ids, True).astype(jnp.float32)
    if logits.shape[-1] > mask_id:
      raise ValueError(f"mask id {mask_id} is inside the logits' codebook of {logits.shape[-1]}")
    if s > 0:
      logits = (1.0 + s) * logits - s * tokens_to_logits(ids, False).astype(jnp.float32)
    return logits

  def step(carry, xs):
    ids, priority = carry
    k, n_mask, temp, choice_temp = xs
    ids = jnp.where(top_n_mask(priority, n_mask), mask_id, ids)
    was_mask = ids == mask_id
    logits = logits_of(ids)
    key_sample, key_choice = jax.random.split(jax.random.fold_in(key, k))
    if variant == "raygen":
      filtered = topk_filter_logits(logits, topk_count(logits.shape[-1], topk_filter))
      noise = jax.random.gumbel(key_sample, logits.shape, jnp.float32)
      pred = jnp.argmax(filtered / jnp.maximum(temp, _TEMPERATURE_FLOOR) + noise, axis=-1)
      p_pred = _take(jax.nn.softmax(logits, axis=-1), pred)  # unfiltered, untempered
      ids = jnp.where(was_mask, pred, ids).astype(jnp.int32)
      priority = jnp.where(was_mask, 1.0 - p_pred, _FIXED)
    else:
      pred = jax.random.categorical(key_sample, logits, axis=-1)
      ids = jnp.where(was_mask, pred, ids).astype(jnp.int32)
      confidence = _take(jax.nn.log_softmax(logits, axis=-1), ids) + choice_temp * (
          jax.random.gumbel(key_choice, ids.shape, jnp.float32))
      priority = jnp.where(was_mask, -confidence, -jnp.inf)
    return (ids, priority), ids

  init = (jnp.full((batch, seq_len), mask_id, jnp.int32), jnp.zeros((batch, seq_len), jnp.float32))
  xs = (jnp.arange(steps, dtype=jnp.int32), jnp.asarray(plan.mask_counts, jnp.int32),
        jnp.asarray(plan.temperatures, jnp.float32),
        jnp.asarray(plan.choice_temperatures, jnp.float32))
  (ids, _), per_step = jax.lax.scan(step, init, xs)
  return ids, per_step
