"""Masked-language-model pretraining of a BERT text encoder (BERT's recipe, as transformers'
``DataCollatorForLanguageModeling``): choose ~15% of the real, non-special tokens; of those, 80%
become [MASK], 10% a random token, 10% stay; predict the originals there.

Pure functions on ``jax.numpy`` arrays. Shapes: B texts, L tokens, V vocabulary.

Differences from the collator, both so that every step trains on something sensible:
- a sequence with at least one candidate token always gets at least one target (its candidate
  with the smallest draw), so short reports never drop out of the loss;
- random replacements are drawn from the non-special ids (the collator draws from the whole
  vocabulary, [PAD] and [CLS] included).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

MLM_RATE = 0.15
MASK_FRACTION, RANDOM_FRACTION = 0.8, 0.1  # the rest (0.1) keep their token


def _non_special(key: jax.Array, shape: tuple[int, ...], vocab_size: int,
                 special_ids: Sequence[int]) -> jax.Array:
  """Uniform ids in [0, vocab_size) other than special_ids: draw among the non-special count,
  then step over each special id in ascending order (an order-preserving map onto the rest)."""
  specials = sorted({int(s) for s in special_ids if 0 <= int(s) < vocab_size})
  r = jax.random.randint(key, shape, 0, vocab_size - len(specials), jnp.int32)
  for s in specials:
    r = r + (r >= s)
  return r


def mask_tokens(key: jax.Array, ids: jax.Array, mask: jax.Array, mask_id: int, vocab_size: int,
                special_ids: Sequence[int], rate: float = MLM_RATE
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """BERT masking of ids (B, L) int with attention mask (B, L) bool.

  Candidates are positions where ``mask`` is True and the id is not in ``special_ids`` (give
  [PAD], [CLS], [SEP], [MASK], [UNK] ids; padding is excluded by ``mask`` whatever its id). Each
  is chosen with probability ``rate``, plus one per sequence that would otherwise have none.
  Returns (inputs (B, L) int32: ids with the chosen positions replaced, targets (B, L) int32: the
  original ids, target_mask (B, L) bool: the chosen positions). mask_id, vocab_size and
  special_ids must be static under jit.
  """
  if not 0.0 < rate <= 1.0:
    raise ValueError(f"rate must be in (0, 1], got {rate}")
  ids = jnp.asarray(ids, jnp.int32)
  k_pick, k_kind, k_rand = jax.random.split(key, 3)
  special = jnp.isin(ids, jnp.asarray(list(special_ids), jnp.int32))
  candidate = jnp.asarray(mask, bool) & ~special
  u = jnp.where(candidate, jax.random.uniform(k_pick, ids.shape), jnp.inf)
  # The candidate with the smallest draw is chosen when any candidate is (u < rate), so forcing
  # it adds a target exactly to the sequences that had none.
  first = jnp.arange(ids.shape[1]) == jnp.argmin(u, axis=1)[:, None]
  chosen = candidate & ((u < rate) | first)
  kind = jax.random.uniform(k_kind, ids.shape)
  random_ids = _non_special(k_rand, ids.shape, vocab_size, special_ids)
  inputs = jnp.where(chosen & (kind < MASK_FRACTION), jnp.int32(mask_id), ids)
  inputs = jnp.where(chosen & (kind >= MASK_FRACTION) & (kind < MASK_FRACTION + RANDOM_FRACTION),
                     random_ids, inputs)
  return inputs, ids, chosen


def mlm_loss(logits: jax.Array, targets: jax.Array, target_mask: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy and accuracy over the masked positions of the whole batch (torch's mean over
  non-ignored tokens, not a mean of per-sequence means): logits (B, L, V), targets (B, L) int,
  target_mask (B, L) bool -> (loss, accuracy) float32 scalars; both 0 with no masked position."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  weight = target_mask.astype(jnp.float32)
  count = jnp.maximum(weight.sum(), 1.0)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return (nll * weight).sum() / count, (correct * weight).sum() / count
