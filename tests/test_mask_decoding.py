"""Tests for masked-token decoding (models.mask_decoding, spec C.8) and the training masking and
loss (losses.masked_tokens, spec C.6). Tiny stand-in "models" (pure functions of the ids) keep
every program small."""
import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.losses import masked_tokens as L
from cxrjax.models import mask_decoding as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, N, C = 3, 48, 64  # batch, tokens, codebook; the mask id is C
_rng = np.random.default_rng(0)
_EMB = jnp.asarray(_rng.normal(size=(C + 1, 16)), jnp.float32)
_OUT = jnp.asarray(_rng.normal(size=(2, 16, C)), jnp.float32)  # conditional, unconditional
_POS = jnp.asarray(_rng.normal(size=(N, C)), jnp.float32)


def toy_logits(ids, conditional=True):
  """A sequence-dependent stand-in for the transformer: (B, N) -> (B, N, C)."""
  h = _EMB[ids]
  h = h + jnp.mean(h, axis=1, keepdims=True)
  return h @ _OUT[0 if conditional else 1] + _POS


def count_logits(ids, conditional=True):
  """Predicts token (#masked in the row) % C by a margin of 30, plus a small per-position
  preference, so every re-masked slot changes value and confidences differ by position."""
  masked = jnp.sum(ids == C, axis=1)
  return 30.0 * jax.nn.one_hot(masked % C, C)[:, None, :] + 0.5 * _POS


@functools.partial(jax.jit, static_argnums=(0, *range(2, 8)))
def _decode(fn, key, steps=3, variant="raygen", temperature=1.3, topk_filter=0.5,
            guidance_scale=0.0, batch=B):
  """decode jitted with every setting static (positional, so equal settings share a program)."""
  return D.decode(fn, key, batch, N, C, steps=steps, variant=variant, temperature=temperature,
                  topk_filter=topk_filter, guidance_scale=guidance_scale)


# ----------------------------------------------------------------------------- schedules
def test_raygen_schedule_worked_example():
  """C.8's production setting (N=1024, K=3, T0=1.3, alpha=0.5)."""
  assert D.mask_counts(1024, 3) == (1024, 724, 1)
  np.testing.assert_allclose(D.token_temperatures(3, 1.3), (0.8667, 0.4333, 0.0), atol=1e-4)
  assert D.topk_count(1024, 0.5) == 512 and D.topk_count(1024, 0.9) == 103
  assert D.mask_counts(1024, 1) == (1024,) and D.token_temperatures(1, 1.3) == (0.0,)
  # the seed: max(int(cos(linspace(0, 1, K)[k] * pi * 0.5) * 1024), 1) in float32
  t = np.linspace(0, 1, 18)
  want = [max(int(np.float32(np.cos(np.float32(x) * np.float32(math.pi) * np.float32(0.5)))
                  * np.float32(1024)), 1) for x in t]
  assert D.mask_counts(1024, 18) == tuple(want)
  plan = D.schedule(1024, 3, "raygen", temperature=1.3)
  assert plan.mask_counts == (1024, 724, 1) and plan.choice_temperatures == (0.0,) * 3


def test_maskgit_schedule_counts():
  """MaskGIT: m_0 = N, then max(1, min(m - 1, floor(N clip(cos(pi/2 k/K), 1e-6, 1)))) as its
  float32 jnp code computes it."""
  for n, k in ((1024, 3), (256, 8), (48, 12), (16, 20)):
    counts, unknown = [n], n
    for step in range(k - 1):
      ratio = 1.0 * (jnp.int32(step) + 1) / k
      ratio = jnp.clip(jax.lax.cos(math.pi / 2.0 * ratio), 1e-6, 1.0)
      length = int(jnp.floor(jnp.int32(n) * ratio))
      unknown = max(1, min(unknown - 1, length))
      counts.append(unknown)
    assert D.mask_counts(n, k, "maskgit") == tuple(counts), (n, k)
  assert D.mask_counts(1024, 3, "maskgit") == (1024, 886, 511)  # float32: 1024 * 0.49999997
  assert D.mask_counts(16, 20, "maskgit")[-3:] == (1, 1, 1)
  np.testing.assert_allclose(D.choice_temperatures(3, 4.5), (3.0, 1.5, 0.0))
  with pytest.raises(ValueError, match="unknown decoding variant"):
    D.mask_counts(16, 3, "muse")


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("variant", ["raygen", "maskgit"])
def test_fixed_tokens_never_change(variant):
  """With count_logits every re-masked slot changes value, so the positions that change between
  steps are exactly the re-masked ones: the scheduled count, and only slots filled at the step
  before (tokens fixed earlier never change)."""
  steps = 6
  ids, per_step = _decode(count_logits, jax.random.PRNGKey(0), steps, variant)
  per_step = np.asarray(per_step)
  assert per_step.shape == (steps, B, N) and per_step.dtype == np.int32
  np.testing.assert_array_equal(np.asarray(ids), per_step[-1])
  counts = D.mask_counts(N, steps, variant)
  assert len(set(counts)) == steps  # distinct, so predictions differ from step to step
  changed = per_step[1:] != per_step[:-1]  # (K - 1, B, N)
  for k in range(1, steps):
    np.testing.assert_array_equal(changed[k - 1].sum(axis=1), counts[k])
    np.testing.assert_array_equal(per_step[k][changed[k - 1]], counts[k] % C)
  assert not np.any(changed[1:] & ~changed[:-1])  # re-masked at k+1 => filled at k


def test_raygen_remasks_the_least_confident():
  """Step 1 re-masks the n positions with the largest 1 - p(pred) under step 0's logits."""
  _, per_step = _decode(count_logits, jax.random.PRNGKey(1), 6, "raygen")
  per_step = np.asarray(per_step)
  probs = np.asarray(jax.nn.softmax(count_logits(jnp.full((B, N), C, jnp.int32)), axis=-1))
  p_pred = np.take_along_axis(probs, per_step[0][..., None], axis=-1)[..., 0]
  n = D.mask_counts(N, 6)[1]
  for b in range(B):
    want = set(np.argsort(-(1 - p_pred[b]), kind="stable")[:n])
    assert set(np.flatnonzero(per_step[1][b] != per_step[0][b])) == want


def test_one_step_at_zero_temperature_is_the_argmax():
  """K = 1 at temperature 0 (any T0 anneals to 0 at K = 1) is the argmax of the logits of the
  all-masked input (the filter keeps the argmax)."""
  all_masked = jnp.full((B, N), C, jnp.int32)
  want = np.argmax(np.asarray(toy_logits(all_masked)), axis=-1)
  ids, per_step = _decode(toy_logits, jax.random.PRNGKey(3), 1, "raygen", 0.0)
  np.testing.assert_array_equal(np.asarray(ids), want)
  assert per_step.shape == (1, B, N)


def test_topk_filter_bounds_the_samples():
  """Step 0 (temperature 0.87) samples only from the top ceil((1 - alpha) C) logits, and does
  sample beyond the argmax."""
  all_masked = jnp.full((B, N), C, jnp.int32)
  logits = np.asarray(toy_logits(all_masked))
  ranks = np.argsort(np.argsort(-logits, axis=-1), axis=-1)
  _, per_step = _decode(toy_logits, jax.random.PRNGKey(4), 3, "raygen", 1.3, 0.9)
  first = np.asarray(per_step[0])
  rank = np.take_along_axis(ranks, first[..., None], axis=-1)[..., 0]
  assert rank.max() < D.topk_count(C, 0.9) == 7 and rank.max() > 0
  f = np.asarray(D.topk_filter_logits(jnp.asarray(logits), 7))
  np.testing.assert_array_equal(np.isfinite(f).sum(axis=-1), 7)


@pytest.mark.parametrize("variant", ["raygen", "maskgit"])
def test_reproducible_valid_and_key_dependent(variant):
  run = lambda seed: _decode(toy_logits, jax.random.PRNGKey(seed), 3, variant, 1.3, 0.9)
  a, per_a = run(5)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(run(5)[0]))
  assert np.mean(np.asarray(a) != np.asarray(run(6)[0])) > 0.1
  per_a = np.asarray(per_a)
  assert per_a.min() >= 0 and per_a.max() < C  # no mask id left, at any step


def test_guidance():
  calls = []

  def spy(ids, conditional=True):
    calls.append(conditional)
    return toy_logits(ids, conditional)

  key = jax.random.PRNGKey(7)
  for scale, want_calls in ((0.0, {True}), (1.0, {True, False})):  # tracing only, no compile
    calls.clear()
    jax.eval_shape(lambda k: D.decode(spy, k, B, N, C, guidance_scale=scale), key)
    assert set(calls) == want_calls
  # s = 1 with identical conditional and null logits: 2c - c == c exactly, so scale 1 with a
  # null equal to the condition decodes exactly as no guidance (scale 0)
  plain, _ = _decode(toy_logits, key, 3, "raygen", 1.3, 0.9)
  same, _ = _decode(lambda ids, cond: toy_logits(ids, True), key, 3, "raygen", 1.3, 0.9, 1.0)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(plain))
  # known answer: one step at temperature 0 is the argmax of (1 + s) cond - s uncond
  all_masked = jnp.full((B, N), C, jnp.int32)
  s = 2.5
  want = np.argmax(np.asarray((1 + s) * toy_logits(all_masked, True)
                              - s * toy_logits(all_masked, False)), axis=-1)
  got, _ = _decode(toy_logits, key, 1, "raygen", 0.0, 0.5, s)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert np.mean(want != np.argmax(np.asarray(toy_logits(all_masked)), axis=-1)) > 0.3
  with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
    D.decode(toy_logits, key, B, N, C, guidance_scale=-1.0)
  with pytest.raises(ValueError, match="inside the logits' codebook"):
    jax.eval_shape(lambda k: D.decode(toy_logits, k, B, N, C - 1), key)


_MESH_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from cxrjax.models import mask_decoding as D
B, N, C = 8, 16, 32
w = jnp.asarray(np.random.default_rng(0).normal(size=(C + 1, C)), jnp.float32)
cond = jnp.asarray(np.random.default_rng(1).normal(size=(B, C)), jnp.float32)

def run(cond, key, variant):
  def fn(ids, conditional):
    h = w[ids] + jnp.mean(w[ids], axis=1, keepdims=True)
    return h + (cond[:, None, :] if conditional else 0.0)
  return D.decode(fn, key, B, N, C, steps=4, variant=variant, guidance_scale=1.5)

mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
rows = NamedSharding(mesh, P("data"))
for variant in ("raygen",):
  f = jax.jit(run, static_argnums=2)
  want = jax.device_get(f(cond, jax.random.PRNGKey(0), variant))
  steps = NamedSharding(mesh, P(None, "data"))
  sharded = jax.jit(run, static_argnums=2, out_shardings=(rows, steps))
  got = sharded(jax.device_put(cond, rows), jax.random.PRNGKey(0), variant)
  assert got[0].sharding.spec == P("data") and len(got[0].addressable_shards) == 4
  for a, b in zip(want, jax.device_get(got)):
    np.testing.assert_array_equal(a, b)
print("ok")
"""


def test_decode_with_the_batch_sharded_over_a_mesh():
  """Jitted with the text rows sharded over 4 devices: same tokens as on one device (RayGen's
  variant with guidance; MaskGIT's differs only in row-wise sampling and sorting)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- training side
def test_cosine_mask_counts_and_statistics():
  key = jax.random.PRNGKey(11)
  mask, r = jax.jit(L.sample_cosine_mask, static_argnums=(1, 2))(key, 2000, 64)
  mask, r = np.asarray(mask), np.asarray(r)
  np.testing.assert_array_equal(r, np.asarray(jax.random.uniform(jax.random.split(key)[0],
                                                                 (2000,))))
  want = np.maximum(1, np.round(64 * np.cos(np.pi * r.astype(np.float64) / 2)))
  np.testing.assert_array_equal(mask.sum(axis=1), want)
  assert abs(mask.mean() - 2 / np.pi) < 0.03  # E[cos(pi r / 2)] = 2 / pi
  assert np.abs(mask.mean(axis=0) - mask.mean()).max() < 0.06  # no position preferred
  np.testing.assert_array_equal(
      np.asarray(L.mask_counts_from_ratio(jnp.array([0.0, 0.5, 0.9999999]), 1024)), [1024, 724, 1])
  np.testing.assert_array_equal(
      np.asarray(L.mask_inputs(jnp.array([[3, 4, 5]]), jnp.array([[True, False, True]]), 9)),
      [[9, 4, 9]])


def test_masked_token_loss_averages_over_all_masked_tokens():
  logits = np.log(np.array([
      [[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]],
      [[0.5, 0.2, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7], [0.3, 0.3, 0.2, 0.2]]], np.float32))
  targets = np.array([[0, 2, -1], [3, 3, 1]])  # -1 (the seed's ignore label) sits unmasked
  mask = np.array([[True, False, False], [True, True, True]])
  loss, acc = L.masked_token_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  ce = -np.log([0.7, 0.1, 0.7, 0.3])  # row 0: one masked token; row 1: three
  np.testing.assert_allclose(float(loss), ce.sum() / 4, rtol=1e-6)
  assert abs(float(loss) - (ce[0] + ce[1:].mean()) / 2) > 0.1  # not a mean of per-row means
  np.testing.assert_allclose(float(acc), 2 / 4)  # row 0 token 0 and row 1 token 1 are argmax hits
  loss, acc = L.masked_token_loss(jnp.asarray(logits), jnp.asarray(targets),
                                  jnp.zeros((2, 3), bool))
  assert float(loss) == 0.0 and float(acc) == 0.0


def test_drop_text():
  text = jnp.ones((64, 5, 4))
  mask = jnp.asarray(np.arange(5) < np.arange(64)[:, None] % 5 + 1)
  same, same_mask = L.drop_text(jax.random.PRNGKey(0), text, mask, 0.0)
  assert same is text and same_mask is mask
  t, m = L.drop_text(jax.random.PRNGKey(0), text, None, 1.0)
  assert not np.any(np.asarray(t)) and not np.any(np.asarray(m))
  t, m = L.drop_text(jax.random.PRNGKey(1), text, mask, 0.5)
  t, m = np.asarray(t), np.asarray(m)
  dropped = ~m.any(axis=1)
  assert 10 < dropped.sum() < 54
  assert not np.any(t[dropped]) and np.all(t[~dropped] == 1.0)
  np.testing.assert_array_equal(m[~dropped], np.asarray(mask)[~dropped])
  with pytest.raises(ValueError, match="drop rate"):
    L.drop_text(jax.random.PRNGKey(0), text, mask, 1.5)
