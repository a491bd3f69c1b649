"""Config blocks every system's config file writes the same way: optimizers and training stages
(the configs/*.py files import them; the library never reads a ConfigDict inside a model).

A stage block's cadences are *counts* tied to its step count through ml_collections field
references, so `--config.train.steps=5000` (or a variant changing `steps`) keeps them valid:
log_every = ceil(steps / logs), checkpoint_every = ceil(steps / checkpoints), eval_every =
ceil(steps / evals) (0 without evaluations). Setting a cadence field directly overrides it.

Keys of a stage block (read by cxrjax.core.stage and checked by cxrjax.core.checks.train_block):
  steps, batch_size, log_every, checkpoint_every, eval_every, keep, optim, and optionally
  plateau / early_stop ({'enabled': False, 'metric': ..., settings of core.control's classes}).
"""
import ml_collections


def optim(lr: float, *, name: str = "adamw", b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0, weight_decay_mask: str = "ndim>=2", schedule: str = "constant",
          warmup_steps: int = 0, grad_clip: float = 0.0, **extra) -> dict:
  """An optim block (cxrjax.core.optim.make_optimizer). name: 'adamw' (decoupled decay), 'adam'
  (PyTorch Adam: coupled L2) or 'sgd'; extra keys (end_lr_factor, no_decay, steps_per_epoch,
  cycle_momentum, ...) pass through."""
  return dict(name=name, lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
              weight_decay_mask=weight_decay_mask, schedule=schedule, warmup_steps=warmup_steps,
              grad_clip=grad_clip, **extra)


def torch_adam(lr: float, **kw) -> dict:
  """PyTorch's Adam without weight decay (what several seeds use): adamw with zero decay."""
  return optim(lr, weight_decay=0.0, weight_decay_mask="none", **kw)


def _every(steps_ref, count: int):
  return (steps_ref + (count - 1)) // count


def set_counts(block: ml_collections.ConfigDict, *, logs: int | None = None,
               evals: int | None = None, checkpoints: int | None = None) -> None:
  """(Re)ties the named cadences of `block` to its step count: `count` events over the run."""
  steps = block.get_ref("steps")
  if logs is not None:
    block.log_every = _every(steps, logs)
  if checkpoints is not None:
    block.checkpoint_every = _every(steps, checkpoints)
  if evals is not None:
    block.eval_every = _every(steps, evals) if evals else 0


def stage(steps: int, batch_size: int, optim_block: dict, *, logs: int = 10, evals: int = 0,
          checkpoints: int = 2, keep: int = 1, **extra) -> ml_collections.ConfigDict:
  """A training-stage block with cadences derived from `steps` (see the module docstring)."""
  block = ml_collections.ConfigDict()
  block.steps = steps
  block.batch_size = batch_size
  block.log_every = 0
  block.checkpoint_every = 0
  block.eval_every = 0
  set_counts(block, logs=logs, evals=evals, checkpoints=checkpoints)
  block.keep = keep
  block.optim = optim_block
  for key, value in extra.items():
    block[key] = value
  return block


def plateau(metric: str = "val_loss", *, enabled: bool = False, mode: str = "min",
            factor: float = 0.5, patience: int = 4, threshold: float = 1e-4,
            threshold_mode: str = "rel", cooldown: int = 0, min_scale: float = 0.0) -> dict:
  """A reduce-on-plateau block (torch ReduceLROnPlateau on the lr scale; core.control)."""
  return dict(enabled=enabled, metric=metric, mode=mode, factor=factor, patience=patience,
              threshold=threshold, threshold_mode=threshold_mode, cooldown=cooldown,
              min_scale=min_scale)


def early_stop(metric: str = "val_loss", *, enabled: bool = False, mode: str = "min",
               patience: int = 5, min_delta: float = 0.0) -> dict:
  """An early-stopping block (Lightning's EarlyStopping; core.control)."""
  return dict(enabled=enabled, metric=metric, mode=mode, patience=patience, min_delta=min_delta)


def variant(arg: str | None, variants: tuple[str, ...], path: str) -> str:
  """The variant named after ':' in `--config <path>:<variant>` (default 'default')."""
  name = arg or "default"
  if name not in variants:
    raise ValueError(f"unknown variant {name!r} of {path}; choose one of {variants}")
  return name
