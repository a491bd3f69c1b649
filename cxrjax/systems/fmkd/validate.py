"""Checks of an fmkd config's values, before anything is rendered, loaded or trained."""
from __future__ import annotations

from cxrjax.core.checks import all_finite, choice as _choice, densenet_block as _densenet, positive as _positive
from cxrjax.core.checks import probability, train_block as _train_block
from cxrjax.core.errors import ConfigError
from cxrjax.data.embeddings import LAYOUTS
from cxrjax.data.labels import CHEXPERT_LABELS
from cxrjax.losses.embedding import KINDS

TEACHER_SOURCES = ("train", "files")
BIAS_MODELS = ("teacher", "fmkd", "fmkd_ft", "scratch")
NUM_SITES = 5  # the phantom world's acquisition sites


def validate_config(c) -> None:
  """Raises ConfigError naming the first field whose value cannot work."""
  all_finite(c)
  d = c.data
  _positive(d.num_studies, "data.num_studies")
  if not 64 <= d.builder_size <= 512:
    raise ConfigError(f"data.builder_size={d.builder_size} must be in 64..512 (the phantom "
                      "builder's range; data.image_size may be smaller)")
  if not 16 <= d.image_size <= d.builder_size:
    raise ConfigError(f"data.image_size={d.image_size} must be in 16..data.builder_size")
  if d.shortcut_label and d.shortcut_label not in CHEXPERT_LABELS:
    raise ConfigError(f"data.shortcut_label={d.shortcut_label!r} is not a CheXpert label")
  if not 0 <= d.shortcut_strength <= 1:
    raise ConfigError(f"data.shortcut_strength={d.shortcut_strength} must be in [0, 1]")
  src, tgt = set(d.source_sites), set(d.target_sites)
  if not src or not src <= set(range(NUM_SITES)) or not tgt <= set(range(NUM_SITES)) or src & tgt:
    raise ConfigError(f"data.source_sites={tuple(d.source_sites)} and data.target_sites="
                      f"{tuple(d.target_sites)} must be disjoint subsets of 0..{NUM_SITES - 1} "
                      "(source non-empty)")
  for key in ("hflip_prob", "translate", "brightness", "contrast"):
    probability(c.augment[key], f"augment.{key}", closed_high=True)
  t = c.teacher
  _choice(t.source, TEACHER_SOURCES, "teacher.source")
  _choice(t.layout, LAYOUTS, "teacher.layout")
  _positive(t.dim, "teacher.dim")
  if t.source == "files" and not t.path:
    raise ConfigError("teacher.source='files' needs --config.teacher.path (a directory of "
                      "<study_id>.npy/.dat/.tfrecord files or an .npz)")
  _densenet(t, "teacher")
  _train_block(t.train, "teacher.train")
  _densenet(c.student, "student")
  lc = c.distill.loss
  _choice(lc.kind, KINDS, "distill.loss.kind")
  if not 0 <= lc.alpha <= 1:
    raise ConfigError(f"distill.loss.alpha={lc.alpha} must be in [0, 1]")
  for key in ("mse_scale", "cos_scale", "huber_delta"):
    _positive(lc[key], f"distill.loss.{key}")
  for field in ("distill", "probe", "finetune"):
    _train_block(c[field], field)
  seeds = tuple(c.eval.seeds)
  if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
    raise ConfigError(f"eval.seeds={seeds} must be distinct non-negative integers (>= 1 of them)")
  _positive(c.eval.batch_size, "eval.batch_size")
  if not 0 < c.eval.target_fpr < 1:
    raise ConfigError(f"eval.target_fpr={c.eval.target_fpr} must be in (0, 1)")
  for m in c.bias.models:
    _choice(m, BIAS_MODELS, "bias.models entry")
  _positive(c.bias.n_per_group, "bias.n_per_group")
  _positive(c.bias.n_simulations, "bias.n_simulations", allow_zero=True)
