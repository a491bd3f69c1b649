"""Checks of a raddiffusion config's values, before anything is rendered, loaded or trained."""
from __future__ import annotations

from cxrjax.core.checks import all_finite, choice, positive, probability, train_block
from cxrjax.core.errors import ConfigError
from cxrjax.data.labels import UNCERTAIN_POLICIES
from cxrjax.models.vit import VIT_SIZES

DIFFMAE_DECODERS = ("joint", "cross_self")


def validate_config(c) -> None:
  """Raises ConfigError naming the first field whose value cannot work."""
  all_finite(c)
  d, m = c.data, c.model
  choice(d.uncertain, UNCERTAIN_POLICIES, "data.uncertain")
  for key in ("image_size", "max_views", "probe_train_studies"):
    positive(d[key], f"data.{key}")
  if len(d.splits) != 3 or len(set(d.splits)) != 3:
    raise ConfigError(f"data.splits={tuple(d.splits)} must name 3 distinct splits: train, "
                      "validation, test")
  choice(m.size, tuple(VIT_SIZES), "model.size")
  choice(m.diffmae_decoder, DIFFMAE_DECODERS, "model.diffmae_decoder")
  positive(m.image_size, "model.image_size")
  positive(m.patch_size, "model.patch_size")
  if m.image_size != d.image_size:
    raise ConfigError(f"model.image_size={m.image_size} differs from data.image_size="
                      f"{d.image_size}; set both")
  if m.image_size % m.patch_size:
    raise ConfigError(f"model.image_size={m.image_size} is not divisible by model.patch_size="
                      f"{m.patch_size}")
  for key in ("hidden", "depth", "heads", "mlp", "decoder_hidden", "decoder_depth",
              "decoder_heads", "decoder_mlp"):
    positive(m[key], f"model.{key}", allow_zero=True)  # 0: the size's own
  if m.mask_ratio:
    probability(m.mask_ratio, "model.mask_ratio")
  choice(m.dtype, ("float32", "bfloat16"), "model.dtype")
  dd = c.diffusion
  positive(dd.timesteps, "diffusion.timesteps")
  positive(dd.rho, "diffusion.rho")
  if not 0 < dd.beta_start < dd.beta_end < 1:
    raise ConfigError(f"diffusion.beta_start={dd.beta_start} and beta_end={dd.beta_end} must "
                      "satisfy 0 < beta_start < beta_end < 1")
  for field in ("pretrain", "finetune"):
    train_block(c[field], field)
  positive(c.probe.max_iter, "probe.max_iter")
  positive(c.probe.batch_size, "probe.batch_size")
  positive(c.probe.pixel_grid, "probe.pixel_grid")
  if d.image_size % c.probe.pixel_grid:
    raise ConfigError(f"probe.pixel_grid={c.probe.pixel_grid} does not divide data.image_size="
                      f"{d.image_size}")
  positive(c.eval.batch_size, "eval.batch_size")
  positive(c.eval.n_bootstrap, "eval.n_bootstrap")
  positive(c.eval.chain_steps, "eval.chain_steps")
  probability(c.eval.alpha, "eval.alpha")
