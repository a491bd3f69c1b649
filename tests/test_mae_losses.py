"""Tests for cxrjax.losses.mae against HF ViTMAEForPreTraining (patchify, norm_pix_loss, masked MSE)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from cxrjax.losses import mae as M


def _hf_model(channels=3, norm_pix=True, image=16, patch=4):
  torch.manual_seed(0)
  cfg = ViTMAEConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, image_size=image, patch_size=patch,
                     num_channels=channels, decoder_hidden_size=8, decoder_num_hidden_layers=1,
                     decoder_num_attention_heads=2, decoder_intermediate_size=16, mask_ratio=0.75,
                     norm_pix_loss=norm_pix, attn_implementation="eager")
  return ViTMAEForPreTraining(cfg).eval()


def _nchw_to_nhwc(x):
  return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def test_patchify_matches_hf_and_inverts():
  model = _hf_model(channels=3)
  x = torch.rand(2, 3, 16, 16)
  want = model.patchify(x).numpy()
  got = M.patchify(_nchw_to_nhwc(x), 4)
  assert got.shape == (2, 16, 48)
  np.testing.assert_array_equal(np.asarray(got), want)
  back = M.unpatchify(got, 4, 16, 16)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(_nchw_to_nhwc(x)))
  np.testing.assert_array_equal(np.asarray(back),
                                model.unpatchify(torch.from_numpy(want)).permute(0, 2, 3, 1).numpy())


def test_patchify_leading_dims_and_rectangles():
  x = jax.random.uniform(jax.random.key(0), (2, 3, 8, 12, 2))  # (B, V, H, W, C)
  p = M.patchify(x, 4)
  assert p.shape == (2, 3, 6, 32)
  np.testing.assert_array_equal(np.asarray(p[1, 2]), np.asarray(M.patchify(x[1, 2][None], 4)[0]))
  # Patch 4 = grid (row 1, col 1); its value 5 is pixel (row 1, col 1) inside the patch, channel 1.
  assert float(p[0, 0, 4, (1 * 4 + 1) * 2 + 1]) == float(x[0, 0, 4 + 1, 4 + 1, 1])
  np.testing.assert_array_equal(np.asarray(M.unpatchify(p, 4, 8, 12)), np.asarray(x))
  with pytest.raises(ValueError, match="patches"):
    M.patchify(x[..., :7, :, :], 4)


def test_normalize_patches_unbiased_and_inverse():
  x = jax.random.normal(jax.random.key(1), (3, 5, 16)) * 3 + 1
  n, mean, var = M.normalize_patches(x)
  assert n.shape == x.shape and mean.shape == var.shape == (3, 5, 1)
  t = torch.tensor(np.asarray(x))
  np.testing.assert_allclose(np.asarray(var)[..., 0], t.var(dim=-1).numpy(), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(M.denormalize(n, mean, var)), np.asarray(x),
                             rtol=1e-5, atol=1e-5)
  flat = jnp.full((1, 1, 16), 0.3)
  np.testing.assert_array_equal(np.asarray(M.normalize_patches(flat)[0]), 0.0)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_matches_hf_forward(norm_pix):
  model = _hf_model(channels=1, norm_pix=norm_pix)
  torch.manual_seed(1)
  x = torch.rand(3, 1, 16, 16)
  noise = torch.rand(3, 16)
  with torch.no_grad():
    out = model(pixel_values=x, noise=noise)
  pred = jnp.asarray(out.logits.numpy())
  mask = jnp.asarray(out.mask.numpy())
  got = M.mae_loss(pred, _nchw_to_nhwc(x), mask, 4, norm_pix=norm_pix)
  np.testing.assert_allclose(float(got), float(out.loss), rtol=1e-6, atol=1e-6)


def _batch(seed=0, shape=(4, 6, 8)):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  pred = jax.random.normal(k1, shape)
  target = jax.random.normal(k2, shape)
  mask = (jax.random.uniform(k3, shape[:-1]) < 0.5).astype(jnp.float32)
  return pred, target, mask


def test_masked_mse_pools_masked_patches_over_the_batch():
  pred, target, mask = _batch()
  l = np.mean((np.asarray(pred) - np.asarray(target)) ** 2, axis=-1)
  m = np.asarray(mask)
  want = (l * m).sum() / m.sum()
  np.testing.assert_allclose(float(M.masked_mse(pred, target, mask)), want, rtol=1e-6)
  # Pooled, not the mean of per-image means (the images have different numbers of masked patches).
  per_image = ((l * m).sum(1) / m.sum(1)).mean()
  assert abs(want - per_image) > 1e-3


def test_masked_mse_ignores_visible_patches_and_weighted_views():
  pred, target, mask = _batch(1)
  base = float(M.masked_mse(pred, target, mask))
  visible = (mask == 0)[..., None]
  assert float(M.masked_mse(jnp.where(visible, 1e3, pred), target, mask)) == base
  assert float(M.masked_mse(jnp.where(visible, pred, pred + 1), target, mask)) != base
  # Weight 0 = an absent view: its predictions, even inf, change nothing; it equals dropping it.
  w = jnp.array([1.0, 0.0, 1.0, 1.0])
  weighted = float(M.masked_mse(pred, target, mask, w))
  bad = pred.at[1].set(jnp.inf)
  assert float(M.masked_mse(bad, target, mask, w)) == weighted
  keep = np.array([0, 2, 3])
  np.testing.assert_allclose(weighted, float(M.masked_mse(pred[keep], target[keep], mask[keep])),
                             rtol=1e-6)
  # (B, V) leading dims with (B, V) weights are the same pool.
  np.testing.assert_allclose(
      float(M.masked_mse(pred.reshape(2, 2, 6, 8), target.reshape(2, 2, 6, 8),
                         mask.reshape(2, 2, 6), w.reshape(2, 2))), weighted, rtol=1e-6)
  assert float(M.masked_mse(pred, target, jnp.zeros_like(mask))) == 0.0


def test_mae_loss_has_no_target_gradient():
  x = jax.random.uniform(jax.random.key(2), (2, 8, 8, 1))
  pred = jnp.zeros((2, 4, 16))
  mask = jnp.ones((2, 4))
  g = jax.grad(lambda im: M.mae_loss(pred, im, mask, 4))(x)
  assert float(jnp.abs(g).max()) == 0.0
