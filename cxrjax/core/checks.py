"""Value checks shared by the systems' config validators: each raises one ConfigError naming the
field, so `python -m cxrjax.launch` can end with a single line."""
from __future__ import annotations

from cxrjax.core.errors import ConfigError
from cxrjax.core.optim import DECAY_MASKS, SCHEDULES


def choice(value, choices, field: str) -> None:
  if value not in choices:
    raise ConfigError(f"{field}={value!r}; choose one of {', '.join(map(str, choices))}")


def positive(value, field: str, allow_zero: bool = False) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
      (value == 0 and not allow_zero):
    raise ConfigError(f"{field}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def optim_block(o, field: str) -> None:
  """An `optim` block (core.optim.make_optimizer's keys)."""
  choice(o.schedule, SCHEDULES, f"{field}.schedule")
  choice(o.weight_decay_mask, DECAY_MASKS, f"{field}.weight_decay_mask")
  choice(o.name, ("adamw", "sgd"), f"{field}.name")
  positive(o.lr, f"{field}.lr")
  positive(o.weight_decay, f"{field}.weight_decay", allow_zero=True)
  positive(o.grad_clip, f"{field}.grad_clip", allow_zero=True)
  if o.schedule == "one_cycle" and o.get("warmup_steps", 0):
    raise ConfigError(f"{field}.schedule='one_cycle' has its own warm-up; set {field}.warmup_steps=0")


def train_block(b, field: str) -> None:
  """A stage block: steps, batch_size, log_every, checkpoint_every, eval_every and its optim."""
  for key in ("steps", "batch_size", "log_every", "checkpoint_every"):
    positive(b[key], f"{field}.{key}")
  positive(b.eval_every, f"{field}.eval_every", allow_zero=True)
  optim_block(b.optim, f"{field}.optim")


def densenet_block(b, field: str, min_blocks: int = 1) -> None:
  """block_config, growth_rate, num_init_features, bn_size of a DenseNet."""
  blocks = tuple(b.block_config)
  if len(blocks) < min_blocks or any(not isinstance(n, int) or n < 1 for n in blocks):
    raise ConfigError(f"{field}.block_config={blocks} needs >= {min_blocks} positive layer counts")
  for key in ("growth_rate", "num_init_features", "bn_size"):
    positive(b[key], f"{field}.{key}")
