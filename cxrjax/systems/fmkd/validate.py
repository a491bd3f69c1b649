"""Checks of an fmkd config's values, before anything is rendered, loaded or trained."""
from __future__ import annotations

from cxrjax.core.errors import ConfigError
from cxrjax.core.optim import DECAY_MASKS, SCHEDULES
from cxrjax.data.embeddings import LAYOUTS
from cxrjax.data.labels import CHEXPERT_LABELS
from cxrjax.losses.embedding import KINDS

TEACHER_SOURCES = ("train", "files")
BIAS_MODELS = ("teacher", "fmkd", "fmkd_ft", "scratch")
NUM_SITES = 5  # the phantom world's acquisition sites


def _choice(value, choices, field):
  if value not in choices:
    raise ConfigError(f"{field}={value!r}; choose one of {', '.join(map(str, choices))}")


def _positive(value, field, allow_zero=False):
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
      (value == 0 and not allow_zero):
    raise ConfigError(f"{field}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _train_block(b, field):
  for key in ("steps", "batch_size", "log_every", "checkpoint_every"):
    _positive(b[key], f"{field}.{key}")
  _positive(b.eval_every, f"{field}.eval_every", allow_zero=True)
  o = b.optim
  _choice(o.schedule, SCHEDULES, f"{field}.optim.schedule")
  _choice(o.weight_decay_mask, DECAY_MASKS, f"{field}.optim.weight_decay_mask")
  _choice(o.name, ("adamw", "sgd"), f"{field}.optim.name")
  _positive(o.lr, f"{field}.optim.lr")
  _positive(o.weight_decay, f"{field}.optim.weight_decay", allow_zero=True)
  _positive(o.grad_clip, f"{field}.optim.grad_clip", allow_zero=True)
  if o.schedule == "one_cycle" and o.warmup_steps:
    raise ConfigError(f"{field}.optim.schedule='one_cycle' has its own warm-up; set "
                      f"{field}.optim.warmup_steps=0")


def _densenet(b, field, min_blocks=1):
  blocks = tuple(b.block_config)
  if len(blocks) < min_blocks or any(not isinstance(n, int) or n < 1 for n in blocks):
    raise ConfigError(f"{field}.block_config={blocks} needs >= {min_blocks} positive layer counts")
  for key in ("growth_rate", "num_init_features", "bn_size"):
    _positive(b[key], f"{field}.{key}")


def validate_config(c) -> None:
  """Raises ConfigError naming the first field whose value cannot work."""
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
