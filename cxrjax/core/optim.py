"""Optimizers and learning-rate schedules built from plain config values.

Schedules are pure functions of the 0-based optimizer step. Warm-up follows
`pytorch_warmup.LinearWarmup` as the prior's seed uses it: at step k the factor
is min(1, (k + 1) / warmup_steps), so the first step already moves.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from cxrjax.core.errors import ConfigError

SCHEDULES = ("constant", "cosine", "linear", "one_cycle")
DECAY_MASKS = ("ndim>=2", "all", "none")


def warmup_factor(step, warmup_steps: int):
  if warmup_steps <= 0:
    return jnp.ones_like(jnp.asarray(step, jnp.float32))
  return jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / warmup_steps)


def make_schedule(*, name: str, lr: float, total_steps: int, warmup_steps: int = 0,
                  end_lr_factor: float = 0.0, one_cycle_pct: float = 0.3,
                  one_cycle_div: float = 25.0, one_cycle_final_div: float = 1e4) -> Callable:
  """lr(step) for step = 0 .. total_steps - 1.

  constant / cosine / linear: warm-up, then the named decay from lr to lr * end_lr_factor
  over the remaining steps. one_cycle: the FMKD seed's OneCycleLR (cosine anneal up
  for one_cycle_pct of the steps from lr/div, then down to lr/(div*final_div)); it has its
  own warm-up, so warmup_steps must be 0.
  """
  if name not in SCHEDULES:
    raise ConfigError(f"optim.schedule={name!r}; choose one of {', '.join(SCHEDULES)}")
  if lr <= 0 or not math.isfinite(lr):
    raise ConfigError(f"optim.lr={lr} must be a positive finite number")
  if name == "one_cycle":
    if warmup_steps:
      raise ConfigError("optim.schedule='one_cycle' has its own warm-up; set optim.warmup_steps=0")
    return optax.cosine_onecycle_schedule(total_steps, lr, pct_start=one_cycle_pct,
                                          div_factor=one_cycle_div,
                                          final_div_factor=one_cycle_final_div)
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    if name == "constant":
      decay = 1.0
    elif name == "cosine":
      decay = end_lr_factor + (1 - end_lr_factor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    else:
      decay = 1.0 - (1 - end_lr_factor) * progress
    return lr * warmup_factor(step, warmup_steps) * decay

  return schedule


def decay_mask(params: Any, rule: str) -> Any:
  """Which parameters get weight decay. 'ndim>=2' is the DALLE-2 grouping (no decay on
  norm gains, biases and vectors such as a learned query)."""
  if rule not in DECAY_MASKS:
    raise ConfigError(f"optim.weight_decay_mask={rule!r}; choose one of {', '.join(DECAY_MASKS)}")
  return jax.tree.map(lambda p: {"ndim>=2": p.ndim >= 2, "all": True, "none": False}[rule], params)


def make_optimizer(optim: Mapping[str, Any], total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW (or Adam/SGD) with clipping and a masked weight decay, from an `optim` config block.

  Returns (tx, schedule) so the loop can log the learning rate.
  """
  schedule = make_schedule(name=optim["schedule"], lr=optim["lr"], total_steps=total_steps,
                           warmup_steps=optim.get("warmup_steps", 0),
                           end_lr_factor=optim.get("end_lr_factor", 0.0))
  name = optim.get("name", "adamw")
  rule = optim.get("weight_decay_mask", "ndim>=2")
  if name == "adamw":
    b1, b2 = optim.get("b1", 0.9), optim.get("b2", 0.999)
    core = optax.adamw(schedule, b1=b1, b2=b2, eps=optim.get("eps", 1e-8),
                       weight_decay=optim.get("weight_decay", 0.0),
                       mask=lambda p: decay_mask(p, rule))
  elif name == "sgd":
    core = optax.chain(optax.add_decayed_weights(optim.get("weight_decay", 0.0),
                                                 mask=lambda p: decay_mask(p, rule)),
                       optax.sgd(schedule, momentum=optim.get("momentum", 0.9)))
  else:
    raise ConfigError(f"optim.name={name!r}; choose 'adamw' or 'sgd'")
  clip = optim.get("grad_clip", 0.0)
  if clip and clip > 0:
    core = optax.chain(optax.clip_by_global_norm(clip), core)
  return core, schedule
