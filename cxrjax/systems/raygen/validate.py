"""Checks of a raygen config's values, before anything is rendered, loaded or trained."""
from __future__ import annotations

import os

from cxrjax.core.checks import all_finite, choice, positive, probability, train_block
from cxrjax.core.errors import ConfigError
from cxrjax.data.labels import UNCERTAIN_POLICIES, VIEWS

STAGES = ("tokenizer", "all")
INTENSITIES = ("unit", "xrv", "raw")
NORMALIZE = ("sequence", "token")
SAMPLING_VARIANTS = ("raygen", "maskgit")


def validate_config(c) -> None:
  """Raises ConfigError naming the first field whose value cannot work."""
  all_finite(c)
  choice(c.stages, STAGES, "stages")
  d = c.data
  choice(d.uncertain, UNCERTAIN_POLICIES, "data.uncertain")
  positive(d.image_size, "data.image_size")
  if len(d.splits) != 3 or len(set(d.splits)) != 3:
    raise ConfigError(f"data.splits={tuple(d.splits)} must name 3 distinct splits: train, "
                      "validation, test")
  if not d.views or not set(d.views) <= set(VIEWS):
    raise ConfigError(f"data.views={tuple(d.views)} must be a non-empty subset of {VIEWS}")
  if not d.report_fields:
    raise ConfigError("data.report_fields is empty: name the report fields the text comes from "
                      "(e.g. ('impression',))")
  v = c.vqgan
  if v.init_from:
    _exists(v.init_from, "vqgan.init_from")
  else:
    for key in ("ch", "num_res_blocks", "z_channels", "embed_dim", "n_embed", "norm_groups",
                "disc_ndf", "disc_layers"):
      positive(v[key], f"vqgan.{key}")
    if not v.ch_mult or any(m < 1 for m in v.ch_mult):
      raise ConfigError(f"vqgan.ch_mult={tuple(v.ch_mult)} must be non-empty positive multipliers")
    factor = 2 ** (len(v.ch_mult) - 1)
    if d.image_size % factor:
      raise ConfigError(f"data.image_size={d.image_size} is not a multiple of the VQ-GAN's "
                        f"downsampling factor {factor} (2**(len(vqgan.ch_mult)-1))")
    widths = [v.ch] + [v.ch * m for m in v.ch_mult] + [v.z_channels]
    if any(w % v.norm_groups for w in widths):
      raise ConfigError(f"vqgan.norm_groups={v.norm_groups} must divide every width {widths}")
    for key in ("pixel_weight", "perceptual_weight", "codebook_weight", "entropy_weight",
                "disc_weight", "disc_start"):
      positive(v[key], f"vqgan.{key}", allow_zero=True)
    positive(v.entropy_temperature, "vqgan.entropy_temperature")
    for part in ("generator", "discriminator"):
      if part not in c.vqgan_train.optim:
        raise ConfigError(f"vqgan_train.optim needs a '{part}' block (one optimizer per update)")
    train_block(c.vqgan_train, "vqgan_train", updates=("generator", "discriminator"))
  p = c.perceptual
  choice(p.intensity, INTENSITIES, "perceptual.intensity")
  if p.init_from:
    _exists(p.init_from, "perceptual.init_from")
  elif not v.init_from and v.perceptual_weight:
    train_block(p.train, "perceptual.train")
    if len(p.block_config) < 1 or max(p.blocks) >= len(p.block_config) or min(p.blocks) < 0:
      raise ConfigError(f"perceptual.blocks={tuple(p.blocks)} must index perceptual.block_config "
                        f"({len(p.block_config)} blocks)")
  t = c.text
  choice(t.normalize, NORMALIZE, "text.normalize")
  if t.max_length < 3:
    raise ConfigError(f"text.max_length={t.max_length} leaves no room for a word between [CLS] "
                      "and [SEP]")
  if t.init_from:
    _exists(t.init_from, "text.init_from")
  else:
    for key in ("vocab_size", "layers", "hidden", "heads", "intermediate"):
      positive(t[key], f"text.{key}")
    if t.hidden % t.heads:
      raise ConfigError(f"text.hidden={t.hidden} is not divisible by text.heads={t.heads}")
    probability(t.dropout, "text.dropout")
    probability(t.mask_rate, "text.mask_rate")
    train_block(c.text_train, "text_train")
  e = c.eval
  for key in ("batch_size", "show", "n_generate", "n_diversity", "n_fidelity", "n_bootstrap"):
    positive(e[key], f"eval.{key}")
  probability(e.alpha, "eval.alpha")
  if e.fid_network:
    _exists(e.fid_network, "eval.fid_network")
  if c.stages == "all":
    _generator(c)


def _generator(c) -> None:
  g = c.generator
  for key in ("width", "depth", "heads", "ffn_hidden"):
    positive(g[key], f"generator.{key}")
  if g.width % g.heads:
    raise ConfigError(f"generator.width={g.width} is not divisible by generator.heads={g.heads}")
  probability(g.attention_dropout, "generator.attention_dropout")
  probability(g.text_dropout, "generator.text_dropout")
  train_block(c.generator_train, "generator_train")
  s = c.sampling
  choice(s.variant, SAMPLING_VARIANTS, "sampling.variant")
  positive(s.steps, "sampling.steps")
  positive(s.temperature, "sampling.temperature", allow_zero=True)
  if not 0.0 <= s.topk_filter < 1.0:
    raise ConfigError(f"sampling.topk_filter={s.topk_filter} must be in [0, 1): the share of the "
                      "codebook filtered out before sampling")
  positive(s.guidance_scale, "sampling.guidance_scale", allow_zero=True)
  if s.guidance_scale and not g.text_dropout:
    raise ConfigError(f"sampling.guidance_scale={s.guidance_scale} needs a generator trained with "
                      "text dropout (generator.text_dropout > 0): without it the unconditional "
                      "logits are never learned")
  if c.downstream.enabled:
    positive(c.downstream.max_synthetic, "downstream.max_synthetic")
    train_block(c.downstream_train, "downstream_train")


def _exists(path: str, field: str) -> None:
  if not os.path.exists(os.path.expanduser(path)):
    raise ConfigError(f"{field}={path} does not exist (weights are never downloaded: give a local "
                      "file or directory)")
