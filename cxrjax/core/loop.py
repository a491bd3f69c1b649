"""THE training loop. Every stage of every system runs through `train`.

A system supplies a `Task` (how to initialise variables and compute the loss) and
a data iterator; the loop owns sharding, the jit-compiled donated step, EMA, the
NaN guard, metrics, evaluation, checkpoints and resumption:

  resume order: this stage's own checkpoint in the workdir > `init_params` > scratch.

Determinism: step s uses `fold_in(rng, s)` and the iterator's batch s, both
restored from the checkpoint, so an interrupted run that is restarted ends with
the same bits as one that never stopped.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
from typing import Any, Callable, Mapping, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metrics as clu_metrics

from cxrjax.core import mesh as mesh_lib
from cxrjax.core.checkpoint import Checkpointer, abstract_with_shardings
from cxrjax.core.ema import ema_update
from cxrjax.core.errors import CheckpointError, NonFiniteError
from cxrjax.core.optim import make_optimizer, stop_frozen_gradients
from cxrjax.core.state import NO_FAULT, TrainState
from cxrjax.core.writers import create_writer, say

# Test hook simulating preemption: "<stage>:<step>" SIGKILLs the process after that step.
FAULT_ENV = "CXRJAX_FAULT_KILL_AT"


class BatchIterator(Protocol):
  """What the loop needs from data: local numpy batches and a JSON-able position."""

  def __next__(self) -> dict[str, np.ndarray]: ...

  def get_state(self) -> dict: ...

  def set_state(self, state: dict) -> None: ...


@dataclasses.dataclass(frozen=True)
class Task:
  """A stage's model-specific parts.

  init(rng) -> variables: {'params': ..., optional 'batch_stats': ...}.
  loss(params, batch, rng, batch_stats) -> (scalar loss, aux) where aux has
    'terms': {name: scalar} (logged and NaN-checked) and optionally 'batch_stats'.
  """
  name: str
  init: Callable[[jax.Array], dict]
  loss: Callable[[Any, dict, jax.Array, Any], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How long and how often: steps, logging, checkpoints, evaluation."""
  num_steps: int
  log_every: int = 50
  checkpoint_every: int = 500
  keep: int = 2
  eval_every: int = 0  # 0: evaluate only at the end
  best_metric: str | None = None  # from evaluate(); keeps that checkpoint too
  best_mode: str = "max"


@dataclasses.dataclass
class CompiledTask:
  """A task bound to a mesh and optimizer: state initialiser and the jitted, donated step."""
  init: Callable[[], TrainState]  # fresh state, placed on `shardings`
  step: Callable  # (state, global batch) -> (state, clu metrics); donates the state
  abstract_state: TrainState
  shardings: TrainState
  term_names: list  # filled when `step` is first traced


def compile_task(task: Task, *, mesh, optim: Mapping[str, Any], num_steps: int, seed: int,
                 ema: Mapping[str, Any] | None = None) -> CompiledTask:
  """Builds the optimizer, shardings and jitted step of `task` (shared by the loop and benchmarks)."""
  tx, lr_schedule = make_optimizer(optim, num_steps)
  init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))

  def init_state(init_key, train_key):
    variables = task.init(init_key)
    return TrainState.create(params=variables["params"], tx=tx, rng=train_key,
                             use_ema=ema is not None, batch_stats=variables.get("batch_stats"))

  abstract = jax.eval_shape(init_state, init_key, train_key)
  shardings = mesh_lib.tree_shardings(abstract, mesh)
  term_names: list = []
  step = jax.jit(_train_step_fn(task, tx, lr_schedule, ema, term_names, optim.get("frozen")),
                 in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
  init = functools.partial(jax.jit(init_state, out_shardings=shardings), init_key, train_key)
  return CompiledTask(init=init, step=step, abstract_state=abstract, shardings=shardings,
                      term_names=term_names)


@dataclasses.dataclass
class TrainResult:
  state: TrainState  # at the last step
  best_state: TrainState  # at the best evaluation (the last state without best_metric)
  best_step: int
  eval_metrics: dict  # of the best state


def _train_step_fn(task: Task, tx, lr_schedule, ema_kwargs: Mapping | None, term_names: list,
                   frozen=()):
  """The jit-able step. term_names is filled at trace time (for the NaN error message).
  frozen: top-level parameter groups whose gradients are stopped (optim.frozen)."""
  frozen = tuple(frozen or ())

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      return task.loss(stop_frozen_gradients(params, frozen), batch, rng, state.batch_stats)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if state.batch_stats is not None and "batch_stats" not in aux:
      raise ValueError(f"task {task.name!r}: its init returned batch_stats, so its loss must "
                       f"return the updated ones as aux['batch_stats'] (got {sorted(aux)})")
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = (ema_update(state.ema_params, params, state.step, **ema_kwargs)
           if state.ema_params is not None else None)
    grad_norm = optax.tree.norm(grads)
    terms = dict(sorted(aux["terms"].items()))
    names = ["loss", *terms, "grad_norm"]
    term_names[:] = names
    finite = jnp.stack([jnp.isfinite(v) for v in (loss, *terms.values(), grad_norm)])
    ok = jnp.all(finite)

    # A non-finite step leaves the weights as they were; lax.cond picks one tree rather
    # than selecting element by element, so the guard costs no pass over the weights.
    updated = (params, opt_state, ema, None if state.batch_stats is None else aux["batch_stats"])
    previous = (state.params, state.opt_state, state.ema_params, state.batch_stats)
    params, opt_state, ema, batch_stats = jax.lax.cond(ok, lambda: updated, lambda: previous)
    first_fault = state.bad_step == NO_FAULT
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
        batch_stats=batch_stats,
        bad_step=jnp.where(~ok & first_fault, state.step, state.bad_step),
        bad_term=jnp.where(~ok & first_fault, jnp.argmin(finite).astype(jnp.int32), state.bad_term))
    values = {"loss": loss, **terms, "grad_norm": grad_norm}
    metrics = _metrics_collection(list(values))(
        _reduction_counter=clu_metrics._ReductionCounter(jnp.array(1, jnp.int32)),
        lr=clu_metrics.LastValue.from_model_output(lr_schedule(state.step)),
        **{k: clu_metrics.Average.from_model_output(v) for k, v in values.items()})
    return new_state, metrics

  return step_fn


def _metrics_collection(names: list[str]):
  """A clu Collection class with an Average per loss term and the last learning rate.

  Built directly rather than with Collection.create(**names), whose own `cls`
  parameter would clash with a loss term of that name.
  """
  fields = {"lr": clu_metrics.LastValue, **{k: clu_metrics.Average for k in names}}
  return flax.struct.dataclass(type("TrainMetrics", (clu_metrics.Collection,),
                                    {"__annotations__": fields}))


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


def _fault_step(stage: str) -> int | None:
  spec = os.environ.get(FAULT_ENV, "")
  name, _, step = spec.partition(":")
  return int(step) if name == stage and step else None


def train(task: Task, data: BatchIterator, *, mesh, workdir: str, schedule: Schedule,
          optim: Mapping[str, Any], seed: int, ema: Mapping[str, Any] | None = None,
          evaluate: Callable[[TrainState], dict] | None = None, init_params: Any = None,
          init_batch_stats: Any = None, fingerprint: dict | None = None, config: dict | None = None,
          tensorboard: bool = True) -> TrainResult:
  """Runs (or resumes, or just loads) one stage; checkpoints under `<workdir>/<task.name>/ckpt`.

  optim: an `optim` config block (see core.optim.make_optimizer).
  ema: keyword arguments of core.ema.ema_decay, or None for no EMA.
  evaluate(state) -> {name: float}, called every `schedule.eval_every` steps and at the end.
  init_params / init_batch_stats: full trees to start from instead of the task's init (e.g. a
    distilled backbone with a fresh head; BatchNorm running statistics travel with the weights).
  fingerprint: JSON-able values that define this stage; resuming a checkpoint written
    under a different fingerprint is refused rather than silently mixing runs.
  config: the whole run config (JSON-able), stored with every checkpoint for the record.
  """
  name, total = task.name, schedule.num_steps
  compiled = compile_task(task, mesh=mesh, optim=optim, num_steps=total, seed=seed, ema=ema)
  abstract, shardings = compiled.abstract_state, compiled.shardings
  ckpt = Checkpointer(os.path.join(workdir, name, "ckpt"), keep=schedule.keep,
                      best_metric=schedule.best_metric, best_mode=schedule.best_mode)
  meta = {"stage": name, "fingerprint": fingerprint or {}, "config": json_roundtrip(config or {})}
  start = ckpt.latest_step()
  if start is not None:
    _check_fingerprint(ckpt, start, meta["fingerprint"])
    state, data_state, _ = ckpt.restore(start, abstract_with_shardings(abstract, shardings))
    data.set_state(data_state)
    say(f"[{name}] {'already trained' if start >= total else 'resuming'}: step {start}/{total} "
        f"restored from {ckpt.directory}")
  else:
    state = compiled.init()
    if init_params is not None:
      state = _replace_params(state, init_params, shardings, ema is not None)
    if init_batch_stats is not None:
      state = _replace_batch_stats(state, init_batch_stats, shardings)
    start = 0

  writer = create_writer(workdir, name, total, tensorboard=tensorboard)
  try:
    state, last_eval = _run_steps(state, data, start, compiled=compiled, name=name, mesh=mesh,
                                  schedule=schedule, ckpt=ckpt, writer=writer, evaluate=evaluate,
                                  meta=meta)
  finally:  # also on errors: the last good checkpoint must be committed, never half-written
    writer.close()
    ckpt.wait()
  best_step = ckpt.best_step() if schedule.best_metric else total
  best_state, best_eval = state, last_eval
  if best_step is not None and best_step != total:
    best_state, _, _ = ckpt.restore(best_step, abstract_with_shardings(abstract, shardings))
    best_eval = evaluate(best_state) if evaluate is not None else {}
  ckpt.close()
  return TrainResult(state=state, best_state=best_state, best_step=best_step or total,
                     eval_metrics=best_eval)


def _run_steps(state, data, start, *, compiled: "CompiledTask", name, mesh, schedule, ckpt, writer,
               evaluate, meta):
  """Steps start+1 .. num_steps with logging, evaluation and checkpoints; returns (state, eval)."""
  total = schedule.num_steps
  last_eval: dict = {}
  if start >= total:
    if evaluate is not None:
      last_eval = {k: float(v) for k, v in evaluate(state).items()}
    return state, last_eval
  step_fn, term_names = compiled.step, compiled.term_names
  kill_at = _fault_step(name)
  writer.write_text(f"[{name}] training steps {start}..{total} on {mesh.devices.size} device(s)")
  accumulated = None
  for step in range(start + 1, total + 1):
    batch = mesh_lib.global_batch(next(data), mesh)
    state, metrics = step_fn(state, batch)
    if step == start + 1:  # steps/s and ETA should not count compilation
      jax.block_until_ready(metrics)
      writer.start(step)
    accumulated = metrics if accumulated is None else accumulated.merge(metrics)
    is_last = step == total
    if step % schedule.log_every == 0 or is_last:
      _check_finite(state, term_names, name, ckpt)
      writer.write_scalars(step, {k: float(v) for k, v in accumulated.compute().items()})
      accumulated = None
    if evaluate is not None and (is_last or (schedule.eval_every and step % schedule.eval_every == 0)):
      last_eval = {k: float(v) for k, v in evaluate(state).items()}
      writer.write_scalars(step, {f"eval/{k}": v for k, v in last_eval.items()})
    if step % schedule.checkpoint_every == 0 or is_last:
      _check_finite(state, term_names, name, ckpt)
      ckpt.save(step, state, data_state=data.get_state(), meta=meta,
                metrics=last_eval if schedule.best_metric else None)
    if kill_at == step:
      logging.warning("[%s] %s: killing the process after step %d", name, FAULT_ENV, step)
      os.kill(os.getpid(), signal.SIGKILL)
  return state, last_eval


def _check_fingerprint(ckpt: Checkpointer, step: int, fingerprint: dict) -> None:
  stored = ckpt.restore_meta(step).get("fingerprint", {})
  if stored == json_roundtrip(fingerprint):
    return
  diffs = _dict_diff(stored, json_roundtrip(fingerprint))
  raise CheckpointError(
      f"{ckpt.directory} holds a run with a different config ({'; '.join(diffs[:4])}). "
      f"Rerun with the original config to resume, or pass a new --workdir.")


def json_roundtrip(x):
  """x as it reads back from JSON (tuples become lists, keys strings)."""
  return json.loads(json.dumps(x, sort_keys=True, default=str))


def _dict_diff(a, b, prefix=""):
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _dict_diff(va, vb, f"{prefix}{k}.")
    elif va != vb:
      out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
  return out


def _replace_params(state: TrainState, params: Any, shardings: TrainState, use_ema: bool) -> TrainState:
  """Starts from given parameters (e.g. --config.init_from); optimizer state stays fresh."""
  try:
    params = jax.tree.map(lambda p, ref, s: jax.device_put(jnp.asarray(p, ref.dtype).reshape(ref.shape), s),
                          params, state.params, shardings.params)
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"init_from parameters do not match this model: {e}") from e
  return state.replace(params=params,
                       ema_params=jax.tree.map(jnp.copy, params) if use_ema else None)


def _replace_batch_stats(state: TrainState, batch_stats: Any, shardings: TrainState) -> TrainState:
  """Starts from given BatchNorm statistics (the companion of init_params)."""
  try:
    stats = jax.tree.map(lambda p, ref, s: jax.device_put(jnp.asarray(p, ref.dtype).reshape(ref.shape), s),
                         batch_stats, state.batch_stats, shardings.batch_stats)
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"init batch_stats do not match this model: {e}") from e
  return state.replace(batch_stats=stats)


def restore_params(directory: str, step: int | None = None) -> tuple[Any, dict]:
  """Reads the params (EMA ones when kept) of a stage checkpoint, for init_from or inference.
  Models with batch norm also need their statistics: see restore_variables.

  directory: a stage's checkpoint directory, e.g. runs/prior/prior/ckpt.
  """
  state, meta = restore_state(directory, step)
  params = state.get("ema_params") or state["params"]
  return params, meta


def restore_variables(directory: str, step: int | None = None) -> tuple[dict, dict]:
  """({'params': ... (EMA ones when kept), 'batch_stats': ... (models with batch norm only)},
  meta) of a stage checkpoint: what loop.train's init_params / init_batch_stats or a model's
  apply take."""
  state, meta = restore_state(directory, step)
  variables = {"params": state.get("ema_params") or state["params"]}
  if state.get("batch_stats") is not None:
    variables["batch_stats"] = state["batch_stats"]
  return variables, meta


def restore_state(directory: str, step: int | None = None) -> tuple[dict, dict]:
  """(train state as nested dicts of numpy arrays, meta) of step `step` (default: latest)."""
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory {directory} does not exist")
  ckpt = Checkpointer(directory)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint found in {directory}")
    return ckpt.restore_raw(step)
  finally:
    ckpt.close()
