"""Value checks shared by the systems' config validators: each raises one ConfigError naming the
field, so `python -m cxrjax.launch` can end with a single line.

The pattern every system follows: `systems.<id>.validate_config(c)` starts with `all_finite(c)`,
then checks each field with these helpers (train_block for every training stage, probability for
every rate), before anything is loaded, rendered or written; the launcher calls it first.
"""
from __future__ import annotations

import math

from cxrjax.core.control import EarlyStopping, ReduceOnPlateau, from_block
from cxrjax.core.errors import ConfigError
from cxrjax.core.optim import DECAY_MASKS, SCHEDULES


def choice(value, choices, field: str) -> None:
  if value not in choices:
    raise ConfigError(f"{field}={value!r}; choose one of {', '.join(map(str, choices))}")


def positive(value, field: str, allow_zero: bool = False) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
      or value < 0 or (value == 0 and not allow_zero):
    raise ConfigError(f"{field}={value!r} must be a finite number {'>= 0' if allow_zero else '> 0'}")


def all_finite(config, prefix: str = "") -> None:
  """Every float field of a ConfigDict (and every float inside a tuple/list field) is finite: a NaN
  learning rate or loss weight is refused here, not found as a non-finite loss hours later."""
  for key in config.keys():
    value, field = config[key], f"{prefix}{key}"
    if hasattr(value, "keys"):
      all_finite(value, field + ".")
      continue
    items = value if isinstance(value, (tuple, list)) else (value,)
    for item in items:
      if isinstance(item, float) and not math.isfinite(item):
        raise ConfigError(f"{field}={value!r} must be finite")


def optim_block(o, field: str) -> None:
  """An `optim` block (core.optim.make_optimizer's keys)."""
  choice(o.schedule, SCHEDULES, f"{field}.schedule")
  choice(o.weight_decay_mask, DECAY_MASKS, f"{field}.weight_decay_mask")
  choice(o.name, ("adamw", "adam", "sgd"), f"{field}.name")
  positive(o.lr, f"{field}.lr")
  positive(o.weight_decay, f"{field}.weight_decay", allow_zero=True)
  positive(o.grad_clip, f"{field}.grad_clip", allow_zero=True)
  if o.schedule == "one_cycle" and o.get("warmup_steps", 0):
    raise ConfigError(f"{field}.schedule='one_cycle' has its own warm-up; set {field}.warmup_steps=0")
  # Keys added with the epoch schedules and no_decay are read with .get: older blocks lack them.
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  if o.schedule in ("epoch_linear", "epoch_step"):
    if o.get("warmup_steps", 0):
      raise ConfigError(f"{field}.schedule={o.schedule!r} has no warm-up; "
                        f"set {field}.warmup_steps=0")
    steps_per_epoch = o.get("steps_per_epoch", 0)
    if not is_int(steps_per_epoch) or steps_per_epoch <= 0:
      raise ConfigError(f"{field}.steps_per_epoch={steps_per_epoch!r} must be an integer > 0 "
                        f"for {field}.schedule={o.schedule!r}")
  if o.schedule == "epoch_step":
    gamma, step_epochs = o.get("gamma", 0.1), o.get("step_epochs", 0)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
      raise ConfigError(f"{field}.gamma={gamma!r} must be in (0, 1]")
    if not is_int(step_epochs) or step_epochs < 1:
      raise ConfigError(f"{field}.step_epochs={step_epochs!r} must be an integer >= 1 "
                        f"for {field}.schedule='epoch_step'")
  no_decay = o.get("no_decay", ()) or ()
  if isinstance(no_decay, str) or not isinstance(no_decay, (tuple, list)) or \
      not all(isinstance(p, str) for p in no_decay):
    raise ConfigError(f"{field}.no_decay={no_decay!r} must be a tuple of fnmatch patterns")


def probability(value, field: str, *, closed_high: bool = False) -> None:
  """A probability or rate: in [0, 1) (dropout, mask ratios), or [0, 1] with closed_high."""
  ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
      and (0 <= value <= 1 if closed_high else 0 <= value < 1)
  if not ok:
    raise ConfigError(f"{field}={value!r} must be in [0, 1{']' if closed_high else ')'}")


def train_block(b, field: str, *, updates: tuple[str, ...] = ()) -> None:
  """A stage block (core.config_blocks.stage): step count, batch size, cadences that fit the step
  count, its optim block (one per update name when `updates` is given), and its optional
  plateau / early_stop blocks, which act at evaluations and so need eval_every > 0."""
  for key in ("steps", "batch_size", "log_every", "checkpoint_every"):
    positive(b[key], f"{field}.{key}")
  positive(b.get("keep", 1), f"{field}.keep")
  positive(b.eval_every, f"{field}.eval_every", allow_zero=True)
  for key in ("log_every", "checkpoint_every", "eval_every"):
    if b[key] > b.steps:
      raise ConfigError(f"{field}.{key}={b[key]} exceeds {field}.steps={b.steps}: it would never "
                        f"happen before the end; lower it (or leave it to follow the step count)")
  if updates:
    for name in updates:
      optim_block(b.optim[name], f"{field}.optim.{name}")
  else:
    optim_block(b.optim, f"{field}.optim")
  for key in ("plateau", "early_stop"):
    block = b.get(key)
    if not block or not block.get("enabled", True):
      continue
    ctl = from_block(block, ReduceOnPlateau if key == "plateau" else EarlyStopping)
    if not b.eval_every:
      raise ConfigError(f"{field}.{key} on {ctl.metric!r} acts at evaluations: set "
                        f"{field}.eval_every > 0")


def densenet_block(b, field: str, min_blocks: int = 1) -> None:
  """block_config, growth_rate, num_init_features, bn_size of a DenseNet."""
  blocks = tuple(b.block_config)
  if len(blocks) < min_blocks or any(not isinstance(n, int) or n < 1 for n in blocks):
    raise ConfigError(f"{field}.block_config={blocks} needs >= {min_blocks} positive layer counts")
  for key in ("growth_rate", "num_init_features", "bn_size"):
    positive(b[key], f"{field}.{key}")
