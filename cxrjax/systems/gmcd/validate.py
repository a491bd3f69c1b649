"""Checks of a gmcd config's values, before anything is rendered, loaded or trained."""
from __future__ import annotations

from cxrjax.core.checks import all_finite, choice, positive, probability, train_block
from cxrjax.core.errors import ConfigError
from cxrjax.losses.dscd import KINDS
from cxrjax.systems.gmcd.student import VARIANTS
from cxrjax.systems.gmcd.tabular import ID_KINDS

SELECT_ON = ("validation", "test")


def validate_config(c) -> None:
  """Raises ConfigError naming the first field whose value cannot work."""
  all_finite(c)
  d, m, e = c.data, c.model, c.eval
  for key in ("load_size", "image_size"):
    positive(d[key], f"data.{key}")
  if d.image_size > d.load_size:
    raise ConfigError(f"data.image_size={d.image_size} exceeds data.load_size={d.load_size}: the "
                      "training crop is taken from the loaded image")
  if d.table:
    choice(d.table_id, ID_KINDS, "data.table_id")
    if not (d.table.endswith(".csv") or d.table.endswith(".parquet")):
      raise ConfigError(f"data.table={d.table!r} must be a .csv or .parquet file")
  probability(d.val_fraction, "data.val_fraction")
  choice(e.select_on, SELECT_ON, "eval.select_on")
  if e.select_on == "validation" and not 0 < d.val_fraction <= 0.5:
    raise ConfigError(f"data.val_fraction={d.val_fraction} must be in (0, 0.5] with "
                      "eval.select_on='validation'")
  if not isinstance(e.folds, int) or e.folds < 2:
    raise ConfigError(f"eval.folds={e.folds!r} must be an integer >= 2")
  for key in ("input_dim", "num_classes", "feature_dim"):
    positive(m[key], f"model.{key}")
  if m.num_classes < 2:
    raise ConfigError(f"model.num_classes={m.num_classes} must be >= 2")
  if len(m.stage_sizes) != 4 or any(not isinstance(n, int) or n < 1 for n in m.stage_sizes):
    raise ConfigError(f"model.stage_sizes={tuple(m.stage_sizes)} needs 4 block counts >= 1")
  probability(m.dropout, "model.dropout")
  t, s = c.teacher_loss, c.student_loss
  choice(t.n_views, (2, 4, 6, 8), "teacher_loss.n_views")
  for key in ("kd_weight", "lambda_reg", "m3lr_weight", "lambda_global"):
    positive(t[key], f"teacher_loss.{key}", allow_zero=True)
  choice(s.kind, KINDS, "student_loss.kind")
  for v in s.variants:
    choice(v, VARIANTS, "student_loss.variants")
  if len(set(s.variants)) != len(s.variants) or not s.variants:
    raise ConfigError(f"student_loss.variants={tuple(s.variants)} must be distinct and non-empty")
  for key in ("num_candidates", "num_negatives", "num_pos", "temperature", "kd_t"):
    positive(s[key], f"student_loss.{key}")
  if s.num_pos > s.num_candidates:
    raise ConfigError(f"student_loss.num_pos={s.num_pos} exceeds student_loss.num_candidates="
                      f"{s.num_candidates}")
  probability(s.momentum, "student_loss.momentum")
  probability(s.gkm_momentum, "student_loss.gkm_momentum")
  positive(s.alpha, "student_loss.alpha", allow_zero=True)
  positive(s.beta, "student_loss.beta", allow_zero=True)
  for field in ("teacher", "student"):
    train_block(c[field], field)
  if c.teacher.batch_size != c.student.batch_size:
    raise ConfigError(f"teacher.batch_size={c.teacher.batch_size} and student.batch_size="
                      f"{c.student.batch_size} differ; the seed uses one batch size (16)")
  positive(e.batch_size, "eval.batch_size")
