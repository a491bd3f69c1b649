"""THE training loop. Every stage of every system runs through `train`.

A system supplies a `Task` (core.task: how to initialise variables and the losses of the step's
updates) and a data iterator; the loop owns sharding, the jit-compiled donated step, EMA, the
NaN guard, metrics, evaluation and what it may decide (best checkpoint, learning-rate reduction on
a plateau, early stopping), checkpoints and resumption:

  resume order: this stage's own checkpoint in the workdir > `graft` onto the task's init > init.

Determinism: step s uses `fold_in(rng, s)` and the iterator's batch s, both restored from the
checkpoint, as is the state of every controller, so an interrupted run that is restarted ends
with the same bits as one that never stopped.

What a task can express, one example each (the full contract is in core/task.py):

  * One loss over all parameters:
      Task("probe", init, loss=lambda params, batch, ctx: (bce, {"terms": {"bce": bce}}))
  * Several parameter groups, each with its own optimizer and schedule, updated in sequence
    (the second sees the first's update), one of them from a given step on:
      Task("vqgan", init, updates=(Update("generator", g_loss, groups=("generator",)),
                                   Update("discriminator", d_loss, groups=("discriminator",),
                                          start_step=30_000)))
      train(..., optim={"generator": {...}, "discriminator": {...}})
  * Non-gradient state: init returns {'params': ..., 'batch_stats': ..., 'bank': ...}; a loss
    returns aux['state'] = {'batch_stats': new, 'bank': new}; ctx.state holds the current values.
    Task(..., state_sharding=(("bank", "rows"),)) splits a per-example bank over the devices.
  * Frozen inputs (a teacher, a text encoder): train(..., frozen={"teacher": teacher_params});
    the loss reads ctx.frozen["teacher"]. They are step arguments placed on the mesh: not
    constants of the program, not donated, not EMA-averaged, not saved.
  * The EMA copy as a teacher: train(..., ema={"beta": 0.99, ..., "use_for_eval": False}); the
    loss reads ctx.ema (gradient stopped); use_for_eval picks the copy evaluation and
    TrainResult.variables() use.
  * The step number inside the loss: ctx.step (e.g. a loss weight that switches on at a step).
  * Evaluation that acts on training: Schedule(plateau=ReduceOnPlateau("val_loss", ...),
    early_stop=EarlyStopping("val_loss", patience=5)); both resume exactly.
  * Evaluation that writes images: evaluate(state) -> {"val_loss": 0.1, "recon": (N, H, W) array}
    (arrays of 2+ dimensions go to TensorBoard and <workdir>/<stage>/images/ as PNG grids).
  * A pretrained subtree: train(..., graft={"params/encoder": encoder, "batch_stats/encoder": bs});
    a mismatch lists every wrong path (core.graft).
  * Repeated sub-runs (k folds, several seeds): core.replicas; equal programs compile once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cxrjax.core import mesh as mesh_lib
from cxrjax.core.checkpoint import Checkpointer, abstract_with_shardings
from cxrjax.core.control import EarlyStopping, ReduceOnPlateau, StageControl
from cxrjax.core.errors import CheckpointError, ConfigError, NonFiniteError
from cxrjax.core.graft import graft as graft_variables
from cxrjax.core.state import NO_FAULT, TrainState
from cxrjax.core.task import CompiledTask, Task, compile_task, program_key
from cxrjax.core.writers import create_writer, say

# Test hook: "<stage>:<step>" SIGKILLs the process after that step (preemption);
# "<stage>:<step>:raise" raises an unexpected error there instead (a bug, mid-checkpoint).
FAULT_ENV = "CXRJAX_FAULT_KILL_AT"


class BatchIterator(Protocol):
  """What the loop needs from data: local numpy batches and a JSON-able position."""

  def __next__(self) -> dict[str, np.ndarray]: ...

  def get_state(self) -> dict: ...

  def set_state(self, state: dict) -> None: ...


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How long and how often: steps, logging, checkpoints, evaluation, and what evaluation decides.

  eval_every: 0 evaluates only at the end.
  best_metric: an evaluate() key; each evaluation that improves on the best so far is saved as a
    checkpoint carrying that step's metrics, independently of checkpoint_every, and kept.
  plateau / early_stop: core.control settings driven by their metric at every evaluation.
  """
  num_steps: int
  log_every: int = 50
  checkpoint_every: int = 500
  keep: int = 2
  eval_every: int = 0
  best_metric: str | None = None
  best_mode: str = "max"
  plateau: ReduceOnPlateau | None = None
  early_stop: EarlyStopping | None = None

  def __post_init__(self):
    for key in ("num_steps", "log_every", "checkpoint_every", "keep"):
      if int(getattr(self, key)) < 1:
        raise ConfigError(f"schedule {key}={getattr(self, key)} must be >= 1")
    if self.eval_every < 0:
      raise ConfigError(f"schedule eval_every={self.eval_every} must be >= 0")
    if self.best_mode not in ("min", "max"):
      raise ConfigError(f"schedule best_mode={self.best_mode!r}; choose 'min' or 'max'")
    for what, ctl in (("plateau", self.plateau), ("early_stop", self.early_stop)):
      if ctl is not None and not self.eval_every:
        raise ConfigError(f"{what} on {ctl.metric!r} acts at evaluations: it needs eval_every > 0")


@dataclasses.dataclass
class TrainResult:
  state: TrainState  # at the last step
  best_state: TrainState  # at the best evaluation (the last state without best_metric)
  best_step: int
  eval_metrics: dict  # scalars of the best evaluation (of the last one without best_metric)
  stopped_at: int | None = None  # the step early stopping ended the stage at

  def variables(self, best: bool = True) -> dict:
    """{'params': the evaluation copy (EMA or raw, as chosen), **collections} of the best (or
    last) state, as host arrays: what a model's apply, a later stage's graft or frozen take."""
    return jax.device_get((self.best_state if best else self.state).variables())


def train(task: Task, data, *, mesh, workdir: str, schedule: Schedule,
          optim: Mapping[str, Any], seed: int, ema: Mapping[str, Any] | None = None,
          evaluate: Callable[[TrainState], dict] | None = None, frozen: Any = None,
          graft: Mapping[str, Any] | None = None, fingerprint: dict | None = None,
          config: dict | None = None, tensorboard: bool = True, name: str | None = None,
          programs: dict | None = None) -> TrainResult:
  """Runs (or resumes, or just loads) one stage; checkpoints under `<workdir>/<name>/ckpt`.

  optim: an `optim` config block (core.optim.make_optimizer), or {update name: block}.
  ema: keyword arguments of core.ema.ema_decay plus optional use_for_eval (default True), or None.
  evaluate(state) -> {name: float or image array}, every `schedule.eval_every` steps and at the end.
  frozen: inputs of the loss that do not train (ctx.frozen), placed on the mesh once.
  graft: {path: subtree} replacing parts of the fresh variables (core.graft), e.g.
    {'params': all_params} or {'params/encoder': ..., 'batch_stats/encoder': ...}.
  fingerprint: JSON-able values that define this stage; resuming a checkpoint written under a
    different fingerprint is refused rather than silently mixing runs.
  config: the whole run config (JSON-able), stored with every checkpoint for the record.
  name: the stage name (default task.name). programs: a dict shared by the stages of a run in
    which compiled programs are kept, so stages with equal programs compile once.
  """
  name = name or task.name
  total = schedule.num_steps
  ema_kwargs, ema_for_eval = _split_ema(ema)
  compiled = _compiled(task, mesh=mesh, optim=optim, num_steps=total, ema=ema_kwargs,
                       ema_for_eval=ema_for_eval, programs=programs)
  abstract, shardings = compiled.abstract_state, compiled.shardings
  ckpt = Checkpointer(os.path.join(workdir, name, "ckpt"), keep=schedule.keep,
                      best_metric=schedule.best_metric, best_mode=schedule.best_mode)
  writer = None
  try:
    meta = {"stage": name, "fingerprint": fingerprint or {}, "config": json_roundtrip(config or {}),
            "ema_for_eval": ema_for_eval}
    control = StageControl(schedule)
    start = ckpt.latest_step()
    if start is not None:
      _check_fingerprint(ckpt, start, meta["fingerprint"], meta["config"])
      state, data_state, stored = ckpt.restore(start, abstract_with_shardings(abstract, shardings))
      data.set_state(data_state)
      control.load(stored.get("control", {}))
      done = start >= total or control.stopped_at is not None
      say(f"[{name}] {'already trained' if done else 'resuming'}: step {start}/{total} "
          f"restored from {ckpt.directory}")
    else:
      state = compiled.init(seed)
      if graft:
        state = _graft(state, graft, shardings)
      start = 0
    placed = None if frozen is None else jax.device_put(frozen, mesh_lib.tree_shardings(frozen, mesh))
    writer = create_writer(workdir, name, total, tensorboard=tensorboard)
    state = _run_steps(state, data, start, compiled=compiled, frozen=placed, name=name, mesh=mesh,
                       schedule=schedule, ckpt=ckpt, writer=writer, evaluate=evaluate, meta=meta,
                       control=control)
    ckpt.wait()
    best_state, best_step, best_eval = state, int(state.step), control.last_eval
    if control.best_step is not None and control.best_step != int(state.step):
      best_state, _, _ = ckpt.restore(control.best_step, abstract_with_shardings(abstract, shardings))
    if control.best_step is not None:
      best_step, best_eval = control.best_step, control.best_eval
  finally:  # also on errors: the last good checkpoint is committed and the checkpointer's threads
    # end here, not in a wall of tracebacks at interpreter exit
    if writer is not None:
      writer.close()
    ckpt.close()
  return TrainResult(state=state, best_state=best_state, best_step=best_step,
                     eval_metrics=dict(best_eval), stopped_at=control.stopped_at)


def _compiled(task: Task, *, mesh, optim, num_steps, ema, ema_for_eval, programs) -> CompiledTask:
  if programs is None:
    return compile_task(task, mesh=mesh, optim=optim, num_steps=num_steps, ema=ema,
                        ema_for_eval=ema_for_eval)
  key = program_key(task, optim, num_steps, ema, ema_for_eval, mesh)
  if key not in programs:
    programs[key] = compile_task(task, mesh=mesh, optim=optim, num_steps=num_steps, ema=ema,
                                 ema_for_eval=ema_for_eval)
  return programs[key]


def _split_ema(ema: Mapping[str, Any] | None) -> tuple[dict | None, bool]:
  if ema is None:
    return None, True
  kwargs = {k: v for k, v in dict(ema).items() if k not in ("use_for_eval", "enabled")}
  return kwargs, bool(ema.get("use_for_eval", True))


def _check_finite(state: TrainState, names: list, stage: str, ckpt: Checkpointer) -> None:
  bad_step = int(jax.device_get(state.bad_step))
  if bad_step == NO_FAULT:
    return
  term = names[int(jax.device_get(state.bad_term))]
  last = ckpt.latest_step()
  kept = f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None else \
      "no checkpoint had been written yet"
  raise NonFiniteError(f"[{stage}] non-finite {term!r} at step {bad_step}; training stopped and "
                       f"nothing after it was saved ({kept}). Lower the learning rate, check the "
                       f"inputs, or tighten optim.grad_clip.")


def _fault(stage: str) -> tuple[int | None, bool]:
  """(step after which to fail, whether to raise rather than kill) from FAULT_ENV."""
  name, step, *mode = os.environ.get(FAULT_ENV, "").split(":") + [""]
  if name != stage or not step:
    return None, False
  return int(step), mode[0] == "raise"


def _split_eval(out: Mapping[str, Any]) -> tuple[dict, dict]:
  """evaluate()'s result -> (scalars {name: float}, images {name: array of 2+ dims})."""
  scalars, images = {}, {}
  for k, v in out.items():
    arr = np.asarray(v)
    if arr.ndim >= 2:
      images[k] = arr
    elif arr.size == 1:
      scalars[k] = float(arr)
    else:
      raise ValueError(f"evaluation result {k!r} has shape {arr.shape}: give a scalar or an image "
                       "array (H, W[, C]) or a batch of them (N, H, W[, C])")
  return scalars, images


class MetricsAccumulator:
  """Averages the step metrics between two log lines on the device (one jitted add per step);
  the learning rates are the last ones."""

  def __init__(self):
    self.sums, self.count, self.last = None, 0, {}

  def add(self, metrics: dict) -> None:
    self.sums = metrics["mean"] if self.sums is None else _add(self.sums, metrics["mean"])
    self.count += 1
    self.last = metrics["last"]

  def compute(self) -> dict[str, float]:
    out = {k: float(v) / self.count for k, v in jax.device_get(self.sums).items()}
    out.update({k: float(v) for k, v in jax.device_get(self.last).items()})
    self.sums, self.count = None, 0
    return out


@jax.jit
def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _run_steps(state, data, start, *, compiled: CompiledTask, frozen, name, mesh, schedule, ckpt,
               writer, evaluate, meta, control: StageControl):
  """Steps start+1 .. num_steps with logging, evaluation and checkpoints; returns the state."""
  total = schedule.num_steps
  if start >= total or control.stopped_at is not None:
    return state
  term_names = compiled.term_names
  fault_at, fault_raises = _fault(name)
  writer.write_text(f"[{name}] training steps {start}..{total} on {mesh.devices.size} device(s)")
  replicated = mesh_lib.replicated(mesh)

  def lr_scale():
    if schedule.plateau is None:
      return None
    return jax.device_put(jnp.asarray(control.lr_scale, jnp.float32), replicated)

  scale = lr_scale()
  accumulated = MetricsAccumulator()
  for step in range(start + 1, total + 1):
    batch = mesh_lib.global_batch(next(data), mesh)
    state, metrics = compiled.step_at(step - 1)(state, batch, frozen, scale)
    if step == start + 1:  # steps/s and ETA should not count compilation
      jax.block_until_ready(metrics)
      writer.start(step)
    accumulated.add(metrics)
    is_last = step == total
    if step % schedule.log_every == 0 or is_last:
      _check_finite(state, term_names, name, ckpt)
      writer.write_scalars(step, accumulated.compute())
    new_best = False
    if evaluate is not None and (is_last or (schedule.eval_every and step % schedule.eval_every == 0)):
      _check_finite(state, term_names, name, ckpt)
      scalars, images = _split_eval(evaluate(state))
      writer.write_scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
      if images:
        writer.write_images(step, images)
      new_best = control.observe(step, scalars)
      scale = lr_scale()
      if control.stopped_at is not None:
        writer.write_text(f"[{name}] early stopping at step {step}: {schedule.early_stop.metric} "
                          f"has not improved in {schedule.early_stop.patience} evaluations")
    if step % schedule.checkpoint_every == 0 or is_last or new_best or control.stopped_at:
      _check_finite(state, term_names, name, ckpt)
      ckpt.save(step, state, data_state=data.get_state(), meta={**meta, "control": control.to_json()},
                metrics=control.best_eval if new_best else None)
    if fault_at == step:
      logging.warning("[%s] %s: failing after step %d", name, FAULT_ENV, step)
      if fault_raises:
        raise RuntimeError(f"{FAULT_ENV} asked stage {name} to fail after step {step}")
      os.kill(os.getpid(), signal.SIGKILL)
    if control.stopped_at is not None:
      break
  return state


def _check_fingerprint(ckpt: Checkpointer, step: int, fingerprint: dict, config: dict) -> None:
  """Refuses a checkpoint written under another fingerprint, naming what differs by its config
  path (e.g. classifier_train.steps) where the run configs show it, else by its fingerprint path."""
  meta = ckpt.restore_meta(step)
  stored, current = meta.get("fingerprint", {}), json_roundtrip(fingerprint)
  if stored == current:
    return
  config_diffs = _dict_diff(meta.get("config", {}), config)
  named: list[str] = []
  for path, old, new in _dict_diff(stored, current):
    paths = [p for p, a, b in config_diffs if (a, b) == (old, new)] or [path]
    named += [f"{p}: {old!r} -> {new!r}" for p in paths if f"{p}: {old!r} -> {new!r}" not in named]
  raise CheckpointError(
      f"{ckpt.directory} holds a run with a different config ({'; '.join(named[:6])}). "
      f"Rerun with the original config to resume, or pass a new --workdir.")


def json_roundtrip(x):
  """x as it reads back from JSON (tuples become lists, keys strings)."""
  return json.loads(json.dumps(x, sort_keys=True, default=str))


def _dict_diff(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
  """(dotted path, value in a, value in b) of every leaf that differs."""
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _dict_diff(va, vb, f"{prefix}{k}.")
    elif va != vb:
      out.append((f"{prefix}{k}", va, vb))
  return out


def _graft(state: TrainState, sources: Mapping[str, Any], shardings: TrainState) -> TrainState:
  """The fresh state with grafted variables; the EMA copy restarts from the grafted params and
  the optimizer state stays fresh."""
  variables = graft_variables(jax.device_get({"params": state.params, **state.collections}), sources)
  params = jax.device_put(variables.pop("params"), shardings.params)
  collections = jax.device_put(variables, shardings.collections)
  ema = None if state.ema_params is None else jax.tree.map(jnp.copy, params)
  return state.replace(params=params, collections=collections, ema_params=ema)
