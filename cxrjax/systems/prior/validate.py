"""Checks of a prior config's values, before anything is loaded or trained."""
from __future__ import annotations

import os

from cxrjax.core.diffusion import PARAMETRISATIONS, SCHEDULE_KINDS
from cxrjax.core.checks import all_finite, choice as _choice, positive as _positive, probability, train_block
from cxrjax.core.errors import ConfigError
from cxrjax.losses.diffusion import CLS_TARGETS

SOURCES = ("synthetic", "seed_layout", "npz", "table", "phantoms")
NORMALIZERS = ("minmax", "l2_sqrt_d", "standardize", "none")


def validate_config(c) -> None:
  """Raises ConfigError naming the first field whose value cannot work."""
  all_finite(c)
  _choice(c.data.source, SOURCES, "data.source")
  _choice(c.data.normalize, NORMALIZERS, "data.normalize")
  _choice(c.diffusion.schedule, SCHEDULE_KINDS, "diffusion.schedule")
  _choice(c.diffusion.parametrisation, PARAMETRISATIONS, "diffusion.parametrisation")
  _choice(c.loss.cls_target, CLS_TARGETS, "loss.cls_target")
  for field in ("classifier_train", "train"):
    train_block(c[field], field)
  probability(c.classifier.dropout, "classifier.dropout")
  for key in ("depth", "heads", "dim_head", "ff_mult", "num_timesteps", "max_text_len"):
    _positive(c.prior[key], f"prior.{key}")
  _positive(c.prior.dim, "prior.dim", allow_zero=True)
  for key in ("attn_dropout", "ff_dropout"):
    probability(c.prior[key], f"prior.{key}")
  probability(c.diffusion.cond_drop_prob, "diffusion.cond_drop_prob", closed_high=True)
  if c.train.ema.enabled:
    probability(c.train.ema.beta, "train.ema.beta", closed_high=True)
  _positive(c.diffusion.timesteps, "diffusion.timesteps")
  if c.diffusion.timesteps > c.prior.num_timesteps:
    raise ConfigError(f"diffusion.timesteps={c.diffusion.timesteps} exceeds the time-embedding "
                      f"table prior.num_timesteps={c.prior.num_timesteps}")
  if not 2 <= c.sampling.steps <= c.diffusion.timesteps:
    raise ConfigError(f"sampling.steps={c.sampling.steps} must be in [2, diffusion.timesteps="
                      f"{c.diffusion.timesteps}] (equal to it for ancestral DDPM)")
  _positive(c.sampling.best_of, "sampling.best_of")
  _positive(c.sampling.num_samples, "sampling.num_samples")
  _positive(c.sampling.batch_size, "sampling.batch_size")
  _positive(c.loss.w_diff, "loss.w_diff", allow_zero=True)
  _positive(c.loss.w_cls, "loss.w_cls", allow_zero=True)
  if c.eval.n_bootstrap < 100:
    raise ConfigError(f"eval.n_bootstrap={c.eval.n_bootstrap} is too few for a 95% CI (>= 100; "
                      "1000 or more for reporting)")
  if c.data.source == "seed_layout" and not c.data.seed_layout.root:
    raise ConfigError("data.source='seed_layout' needs --config.data.seed_layout.root (and "
                      "ctpa_dir, cxr_dir)")
  if c.data.source in ("npz", "table") and not c.data.path:
    raise ConfigError(f"data.source={c.data.source!r} needs --config.data.path")
  _positive(c.eval.references.ridge_alpha, "eval.references.ridge_alpha")
  _positive(c.eval.references.soft_label_C, "eval.references.soft_label_C")
  validate_curve(c)
  if c.data.source == "phantoms":
    validate_phantoms(c)


def validate_phantoms(c) -> None:
  from cxrjax.systems.classifier.validate import validate_config as validate_encoder
  from cxrjax.tasks.image_classifier import INTENSITIES

  pc = c.phantoms
  _positive(pc.n_labelled, "phantoms.n_labelled")
  _positive(pc.ctpa_dim, "phantoms.ctpa_dim")
  if pc.encoder.data.builder != "cxr_phantoms":
    raise ConfigError(f"phantoms.encoder.data.builder must be 'cxr_phantoms' (the CTPA side comes "
                      f"from the phantom world), got {pc.encoder.data.builder!r}")
  if pc.encoder_file:
    if not os.path.isfile(pc.encoder_file):
      raise ConfigError(f"phantoms.encoder_file {pc.encoder_file!r} is not a file")
    _choice(pc.encoder_intensity, INTENSITIES, "phantoms.encoder_intensity")
  try:
    validate_encoder(pc.encoder)
  except ConfigError as e:
    raise ConfigError(f"phantoms.encoder: {e}") from None
  if c.sampling.best_of > 1:
    raise ConfigError("sampling.best_of > 1 ranks samples by their similarity to the CXR "
                      "embedding, which needs equal dimensions; the phantoms source's CXR features "
                      "are the encoder's width: set sampling.best_of=1")


def validate_curve(c) -> None:
  labelled, unlabelled = tuple(c.curve.labelled), tuple(c.curve.unlabelled)
  if not labelled and not unlabelled:
    return
  if c.data.source != "synthetic":
    raise ConfigError(f"curve.labelled needs data.source='synthetic' (the curve draws each point's "
                      f"labelled and unlabelled rows from the embedded world), got {c.data.source!r}")
  if not labelled or not unlabelled:
    raise ConfigError("curve.labelled and curve.unlabelled must both be given (e.g. "
                      "--config.curve.labelled='(50, 300)' --config.curve.unlabelled='(3000,)')")
  for field, values, low in (("curve.labelled", labelled, 2), ("curve.unlabelled", unlabelled, 0)):
    if any(int(v) != v or v < low for v in values) or len(set(values)) != len(values):
      raise ConfigError(f"{field} must hold distinct integers >= {low}, got {values}")
