"""Optimizers and learning-rate schedules built from plain config values.

Schedules are pure functions of the 0-based optimizer step. Warm-up follows
`pytorch_warmup.LinearWarmup` as the prior's seed uses it: at step k the factor
is min(1, (k + 1) / warmup_steps), so the first step already moves.

`optim.frozen` names top-level parameter subtrees that never change (a frozen backbone under
a trained head): their updates are zero and the training loop stops their gradients, so XLA
drops the backward pass into them. `optim.cycle_momentum` cycles Adam's beta1 against a
one-cycle learning rate as PyTorch's OneCycleLR does (max -> base while the lr rises, back
while it falls), the FMKD seed's KD optimiser.

`epoch_linear` and `epoch_step` are the per-epoch schedulers of seeds that step a torch scheduler
once per epoch: the lr is constant within an epoch, epoch = step // optim.steps_per_epoch.
`optim.name='adam'` is torch.optim.Adam, whose weight decay is L2 added to the gradient before
the moments (coupled), unlike adamw's decoupled decay. `optim.no_decay` exempts parameters from
weight decay by their '/'-joined path (fnmatch patterns), as the seeds' parameter groups do.
"""
from __future__ import annotations

import fnmatch
import math
import numbers
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from cxrjax.core.errors import ConfigError

SCHEDULES = ("constant", "cosine", "linear", "one_cycle", "epoch_linear", "epoch_step")
EPOCH_SCHEDULES = ("epoch_linear", "epoch_step")
DECAY_MASKS = ("ndim>=2", "all", "none")
OPTIMIZERS = ("adamw", "adam", "sgd")


def warmup_factor(step, warmup_steps: int):
  if warmup_steps <= 0:
    return jnp.ones_like(jnp.asarray(step, jnp.float32))
  return jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / warmup_steps)


def one_cycle(step, total_steps: int, start: float, middle: float, end: float, pct: float = 0.3):
  """torch OneCycleLR's two-phase cosine annealing (three_phase=False) of one quantity:
  start -> middle over steps 0 .. pct*total_steps - 1, then middle -> end at total_steps - 1."""
  step = jnp.asarray(step, jnp.float32)
  up_end, down_end = float(pct * total_steps) - 1.0, float(total_steps) - 1.0

  def anneal(a, b, frac):
    return b + (a - b) / 2.0 * (jnp.cos(jnp.pi * jnp.clip(frac, 0.0, 1.0)) + 1.0)

  rising = anneal(start, middle, step / max(up_end, 1e-12))
  falling = anneal(middle, end, (step - up_end) / max(down_end - up_end, 1e-12))
  return jnp.where(step <= up_end, rising, falling)


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def epoch_schedule(*, name: str, lr: float, total_steps: int, steps_per_epoch: int,
                   gamma: float = 0.1, step_epochs: int = 0) -> Callable:
  """lr(step) of a torch scheduler stepped once per epoch, epoch e = step // steps_per_epoch.

  epoch_linear: lr * (1 - (e + 1) / (E + 1)) with E = total_steps // steps_per_epoch, the
  CycleGAN / PathomicFusion lr_policy='linear' lambda with niter=0, niter_decay=E (epoch 0
  already runs at lr * E / (E + 1), the last whole epoch at lr / (E + 1); a trailing partial
  epoch and any step past it get 0). epoch_step: lr * gamma ** (e // step_epochs), torch StepLR
  with step_size counted in epochs.
  """
  if not _is_int(steps_per_epoch) or steps_per_epoch <= 0:
    raise ConfigError(f"optim.steps_per_epoch={steps_per_epoch!r} must be an integer > 0 "
                      f"for optim.schedule={name!r}")

  def epoch(step):
    # floor_divide keeps integer steps exact; a float step (vmap over arange) floors the same.
    return jnp.floor_divide(jnp.asarray(step), steps_per_epoch).astype(jnp.float32)

  if name == "epoch_linear":
    epochs = total_steps // steps_per_epoch
    if epochs < 1:
      raise ConfigError(f"optim.steps_per_epoch={steps_per_epoch} is more than the "
                        f"{total_steps} training steps: schedule='epoch_linear' needs >= 1 epoch")
    return lambda step: lr * jnp.maximum(0.0, 1.0 - (epoch(step) + 1.0) / (epochs + 1.0))
  if not 0 < gamma <= 1:
    raise ConfigError(f"optim.gamma={gamma!r} must be in (0, 1]")
  if not _is_int(step_epochs) or step_epochs < 1:
    raise ConfigError(f"optim.step_epochs={step_epochs!r} must be an integer >= 1 "
                      f"for optim.schedule='epoch_step'")
  return lambda step: lr * jnp.power(jnp.float32(gamma), jnp.floor(epoch(step) / step_epochs))


def make_schedule(*, name: str, lr: float, total_steps: int, warmup_steps: int = 0,
                  end_lr_factor: float = 0.0, one_cycle_pct: float = 0.3,
                  one_cycle_div: float = 25.0, one_cycle_final_div: float = 1e4,
                  steps_per_epoch: int = 0, gamma: float = 0.1, step_epochs: int = 0) -> Callable:
  """lr(step) for step = 0 .. total_steps - 1.

  constant / cosine / linear: warm-up, then the named decay from lr to lr * end_lr_factor
  over the remaining steps. one_cycle: the FMKD seed's torch OneCycleLR, step for step
  (cosine anneal up for one_cycle_pct of the steps from lr/div, then down to
  lr/(div*final_div)); it has its own warm-up, so warmup_steps must be 0. epoch_linear /
  epoch_step: see `epoch_schedule` (steps_per_epoch, gamma, step_epochs); no warm-up either.
  """
  if name not in SCHEDULES:
    raise ConfigError(f"optim.schedule={name!r}; choose one of {', '.join(SCHEDULES)}")
  if lr <= 0 or not math.isfinite(lr):
    raise ConfigError(f"optim.lr={lr} must be a positive finite number")
  if name in EPOCH_SCHEDULES:
    if warmup_steps:
      raise ConfigError(f"optim.schedule={name!r} has no warm-up; set optim.warmup_steps=0")
    return epoch_schedule(name=name, lr=lr, total_steps=total_steps,
                          steps_per_epoch=steps_per_epoch, gamma=gamma, step_epochs=step_epochs)
  if name == "one_cycle":
    if warmup_steps:
      raise ConfigError("optim.schedule='one_cycle' has its own warm-up; set optim.warmup_steps=0")
    initial = lr / one_cycle_div
    return lambda step: one_cycle(step, total_steps, initial, lr, initial / one_cycle_final_div,
                                  one_cycle_pct)
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


def one_cycle_momentum(total_steps: int, *, base: float = 0.85, peak: float = 0.95,
                       one_cycle_pct: float = 0.3) -> Callable:
  """beta1(step) mirroring make_schedule('one_cycle'): cosine from `peak` to `base` while the
  lr rises, back to `peak` while it falls -- torch OneCycleLR's cycle_momentum with
  base_momentum / max_momentum."""
  if not 0 < base <= peak < 1:
    raise ConfigError(f"optim.momentum_range=({base}, {peak}) must satisfy 0 < base <= peak < 1")
  return lambda step: one_cycle(step, total_steps, peak, base, peak, one_cycle_pct)


def frozen_labels(params: Any, frozen) -> Any:
  """'frozen' / 'train' per leaf of `params`, by its top-level key being in `frozen`."""
  frozen = tuple(frozen or ())
  missing = [k for k in frozen if not isinstance(params, Mapping) or k not in params]
  if missing:
    have = list(params) if isinstance(params, Mapping) else type(params).__name__
    raise ConfigError(f"optim.frozen names {missing}, which are not top-level parameter groups "
                      f"of this model ({have})")
  return {k: jax.tree.map(lambda _, f=k in frozen: "frozen" if f else "train", v)
          for k, v in params.items()} if frozen else jax.tree.map(lambda _: "train", params)


def stop_frozen_gradients(params: Any, frozen) -> Any:
  """params with jax.lax.stop_gradient on the `frozen` top-level subtrees."""
  if not frozen:
    return params
  return {k: jax.lax.stop_gradient(v) if k in frozen else v for k, v in params.items()}


def param_path(path) -> str:
  """'encoder/Dense_0/kernel' from a jax key path (dict keys, attribute names, indices)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def no_decay_patterns(patterns) -> tuple[str, ...]:
  """optim.no_decay as a tuple of strings (a bare string would match letter by letter)."""
  if patterns is None:
    return ()
  if isinstance(patterns, str) or not isinstance(patterns, (tuple, list)) or \
      not all(isinstance(p, str) for p in patterns):
    raise ConfigError(f"optim.no_decay={patterns!r} must be a tuple of fnmatch patterns")
  return tuple(patterns)


def decay_mask(params: Any, rule: str, no_decay=()) -> Any:
  """Which parameters get weight decay. 'ndim>=2' is the DALLE-2 grouping (no decay on
  norm gains, biases and vectors such as a learned query). A leaf whose '/'-joined path
  matches one of the `no_decay` fnmatch patterns (case-sensitive; '*' also spans '/') gets
  none whatever the rule says: the BERT / ViT groups, e.g. ("*/bias", "*cls_token")."""
  if rule not in DECAY_MASKS:
    raise ConfigError(f"optim.weight_decay_mask={rule!r}; choose one of {', '.join(DECAY_MASKS)}")
  patterns = no_decay_patterns(no_decay)

  def decays(path, p):
    by_rule = {"ndim>=2": p.ndim >= 2, "all": True, "none": False}[rule]
    name = param_path(path)
    return by_rule and not any(fnmatch.fnmatchcase(name, pat) for pat in patterns)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: Mapping[str, Any], total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW (or Adam/SGD) with clipping and a masked weight decay, from an `optim` config block.

  name: 'adamw' (decoupled decay), 'adam' (torch Adam: coupled L2, grad += wd * p before
  the moments) or 'sgd' (coupled L2, momentum). The decay applies where `decay_mask` says
  (weight_decay_mask, no_decay). Returns (tx, schedule) so the loop can log the learning rate.
  """
  schedule = make_schedule(name=optim["schedule"], lr=optim["lr"], total_steps=total_steps,
                           warmup_steps=optim.get("warmup_steps", 0),
                           end_lr_factor=optim.get("end_lr_factor", 0.0),
                           steps_per_epoch=optim.get("steps_per_epoch", 0),
                           gamma=optim.get("gamma", 0.1), step_epochs=optim.get("step_epochs", 0))
  name = optim.get("name", "adamw")
  rule = optim.get("weight_decay_mask", "ndim>=2")
  no_decay = no_decay_patterns(optim.get("no_decay", ()))
  mask = lambda p: decay_mask(p, rule, no_decay)
  cycle = optim.get("cycle_momentum", False)
  if cycle and (name != "adamw" or optim["schedule"] != "one_cycle"):
    raise ConfigError("optim.cycle_momentum needs optim.name='adamw' and optim.schedule='one_cycle'")
  if name == "adamw":
    b1, b2 = optim.get("b1", 0.9), optim.get("b2", 0.999)
    if cycle:
      base, peak = optim.get("momentum_range", (0.85, 0.95))
      b1 = one_cycle_momentum(total_steps, base=base, peak=peak)
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",)) if cycle else optax.adamw
    core = adamw(schedule, b1=b1, b2=b2, eps=optim.get("eps", 1e-8),
                 weight_decay=optim.get("weight_decay", 0.0), mask=mask)
  elif name == "adam":
    core = optax.chain(optax.add_decayed_weights(optim.get("weight_decay", 0.0), mask=mask),
                       optax.scale_by_adam(b1=optim.get("b1", 0.9), b2=optim.get("b2", 0.999),
                                           eps=optim.get("eps", 1e-8)),
                       optax.scale_by_learning_rate(schedule))
  elif name == "sgd":
    core = optax.chain(optax.add_decayed_weights(optim.get("weight_decay", 0.0), mask=mask),
                       optax.sgd(schedule, momentum=optim.get("momentum", 0.9)))
  else:
    raise ConfigError(f"optim.name={name!r}; choose one of {', '.join(OPTIMIZERS)}")
  clip = optim.get("grad_clip", 0.0)
  if clip and clip > 0:
    core = optax.chain(optax.clip_by_global_norm(clip), core)
  frozen = tuple(optim.get("frozen", ()) or ())
  if frozen:
    core = optax.multi_transform({"train": core, "frozen": optax.set_to_zero()},
                                 lambda p: frozen_labels(p, frozen))
  return core, schedule
