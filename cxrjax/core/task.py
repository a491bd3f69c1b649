"""What a stage trains (`Task`) and the one jitted, donated train step built from it.

A task is an `init` and one or more `Update`s. Each update is a loss over the parameters and one
optimizer over the part of them it owns (its `groups`); the updates of a step run in order and
each sees the parameters and collections the previous ones left (a GAN's discriminator step sees
the generator's new weights). A loss is

    loss(params, batch, ctx: StepContext) -> (scalar, aux)

with aux = {'terms': {name: scalar, ...}, optional 'state': {collection: new value}}: terms are
logged and NaN-checked, 'state' replaces those non-gradient collections (batch statistics, memory
banks, counters). `ctx` carries the step's key and number, the collections, the frozen inputs
(teacher networks, text encoders, tokenizers: arguments of the compiled step, never constants,
never donated, never saved) and the EMA copy of the parameters (a mean teacher).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from cxrjax.core import mesh as mesh_lib
from cxrjax.core.ema import ema_update
from cxrjax.core.errors import ConfigError
from cxrjax.core.optim import make_optimizer, stop_frozen_gradients
from cxrjax.core.state import NO_FAULT, TrainState

STATE_SHARDINGS = ("params", "replicated", "rows")


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What a loss sees besides its parameters and batch.

  rng: this update's key (folded with the step, so a resumed run draws the same numbers).
  step: () int32, the 0-based index of this optimizer step.
  state: {collection: tree} as the earlier updates of this step left it.
  frozen: the frozen inputs given to `train` (any pytree, or None).
  ema: the EMA parameters before this step, gradient stopped, or None without EMA.
  """
  rng: jax.Array
  step: jax.Array
  state: Mapping[str, Any]
  frozen: Any = None
  ema: Any = None


LossFn = Callable[[Any, dict, StepContext], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Update:
  """One optimizer step inside the train step.

  name: the optimizer's key in `optim` and the prefix of its logged terms (with several updates).
  loss: the loss whose gradient this update follows.
  groups: the top-level parameter groups it trains (their gradient only; the rest enter its loss
    as constants); () = all parameters.
  start_step: the update runs from this 0-based step on (before it: no compute, no change; its
    terms log as 0), e.g. a discriminator that starts late.
  """
  name: str
  loss: LossFn
  groups: tuple[str, ...] = ()
  start_step: int = 0


@dataclasses.dataclass(frozen=True)
class Task:
  """A stage's model-specific parts.

  init(rng) -> variables {'params': {...}, other collections...}.
  loss: a single loss over all parameters (shorthand for updates=(Update('params', loss),)).
  updates: several updates run in sequence, each with its own optimizer.
  state_sharding: (collection, rule) pairs placing non-gradient state on the mesh: 'params' (the
    parameters' FSDP rule; replicated without fsdp; the default), 'replicated', or 'rows' (leading
    dimension split over the batch axes, e.g. a memory bank with one row per training example).
  """
  name: str
  init: Callable[[jax.Array], dict]
  loss: LossFn | None = None
  updates: tuple[Update, ...] = ()
  state_sharding: tuple[tuple[str, str], ...] = ()

  def __post_init__(self):
    if (self.loss is None) == (not self.updates):
      raise ValueError(f"task {self.name!r}: give either loss or updates")
    names = [u.name for u in self.all_updates]
    if len(set(names)) != len(names):
      raise ValueError(f"task {self.name!r}: update names repeat: {names}")
    for _, rule in self.state_sharding:
      if rule not in STATE_SHARDINGS:
        raise ValueError(f"task {self.name!r}: state sharding {rule!r}; choose {STATE_SHARDINGS}")

  @property
  def all_updates(self) -> tuple[Update, ...]:
    return self.updates or (Update("params", self.loss),)

  def program(self) -> "Task":
    """The task without its name: two stages with equal programs can share a compiled step."""
    return dataclasses.replace(self, name="")


def rbg_init_key(rng: jax.Array) -> jax.Array:
  """A key of the 'rbg' generator derived from a threefry key, for a task's `init`.

  XLA:CPU compiles every threefry draw of an initialiser separately and slowly: a VQ-GAN with a
  few hundred parameters spends ~15 s compiling its init, ~8 s with rbg keys (XLA's
  RngBitGenerator). The numbers differ from threefry's, not their distribution; a task opts in.
  """
  return jax.random.key(jax.random.bits(rng, (), jnp.uint32), impl="rbg")


def optim_by_update(task: Task, optim: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
  """{update name: optim block}. A single-update task takes one block; several updates take a
  mapping from each update's name to its block."""
  updates = task.all_updates
  if len(updates) == 1 and "lr" in optim:
    return {updates[0].name: optim}
  missing = [u.name for u in updates if u.name not in optim]
  extra = [k for k in optim if k not in {u.name for u in updates}]
  if missing or extra:
    raise ConfigError(f"task {task.name!r}: optim needs one block per update "
                      f"{[u.name for u in updates]} (missing {missing}, unknown {extra})")
  return {u.name: optim[u.name] for u in updates}


@dataclasses.dataclass
class CompiledTask:
  """A task bound to a mesh and its optimizers: state initialiser and the jitted, donated step.

  step(state, global batch, frozen, lr_scale) -> (state, metrics); donates the state. metrics:
  {'mean': {term: () value}, 'last': {lr name: () value}} (core.loop.MetricsAccumulator).
  frozen: placed pytree or None. lr_scale: () float32 multiplying every update (reduce-on-plateau),
  or None, which compiles a step without the multiplication (runs without a plateau controller
  keep their exact numbers).
  """
  init: Callable[[int], TrainState]  # seed -> fresh state placed on `shardings`
  step: Callable
  abstract_state: TrainState
  shardings: TrainState
  term_names: list  # filled when `step` is first traced
  lr_schedules: dict  # update name -> lr(step)
  # Tasks whose updates start late: {first 0-based step of a phase: the program of that phase}.
  phases: dict = dataclasses.field(default_factory=dict)

  def step_at(self, step: int) -> Callable:
    """The program of the 0-based step `step` (the loop knows it on the host): with late updates,
    the one in which exactly the updates started by then run, without a lax.cond around them;
    otherwise `step`."""
    if not self.phases:
      return self.step
    return self.phases[max(p for p in self.phases if p <= step)]

  def bind(self, frozen: Any = None) -> Callable:
    """step(state, batch) with these frozen inputs and no lr scale (benchmarks, tests): the
    program of the state's step (read from the device when the task has phases; without them
    nothing is read, so steps dispatch ahead of the computation as the loop's do)."""
    if not self.phases:
      return lambda state, batch: self.step(state, batch, frozen, None)
    return lambda state, batch: self.step_at(int(state.step))(state, batch, frozen, None)


def state_shardings(abstract: TrainState, mesh, state_sharding: Mapping[str, str]) -> TrainState:
  """Shardings of a train state: the FSDP rule for parameters and optimizer state, each
  collection by its declared rule."""
  shardings = mesh_lib.tree_shardings(abstract, mesh)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh_lib.BATCH_AXES))
  n = mesh_lib.batch_devices(mesh)
  collections = dict(shardings.collections)
  for name, rule in state_sharding.items():
    if name not in abstract.collections:
      raise ConfigError(f"state_sharding names {name!r}, not a collection of this task "
                        f"({sorted(abstract.collections)})")
    if rule == "replicated":
      collections[name] = jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract.collections[name])
    elif rule == "rows":
      def row_sharding(x, name=name):
        if not x.shape or x.shape[0] % n:
          raise ConfigError(f"collection {name!r}: a leaf of shape {x.shape} cannot be split by "
                            f"rows over {n} devices")
        return rows
      collections[name] = jax.tree.map(row_sharding, abstract.collections[name])
  return shardings.replace(collections=collections)


def compile_task(task: Task, *, mesh, optim: Mapping[str, Any], num_steps: int,
                 ema: Mapping[str, Any] | None = None, ema_for_eval: bool = True) -> CompiledTask:
  """Builds the optimizers, shardings and jitted step of `task` (shared by the loop and benchmarks).

  optim: one optim block, or {update name: block} for several updates (core.optim.make_optimizer).
  ema: keyword arguments of core.ema.ema_decay, or None for no EMA.
  """
  blocks = optim_by_update(task, optim)
  txs, schedules = {}, {}
  for name, block in blocks.items():
    txs[name], schedules[name] = make_optimizer(block, num_steps)
  frozen_groups = {name: tuple(block.get("frozen", ()) or ()) for name, block in blocks.items()}

  def init_state(key):
    init_key, train_key = jax.random.split(key)
    variables = dict(task.init(init_key))
    params = variables.pop("params")
    opt_state = {u.name: txs[u.name].init(_owned(params, u.groups)) for u in task.all_updates}
    return TrainState.create(params=params, opt_state=opt_state, rng=train_key,
                             use_ema=ema is not None, collections=variables,
                             ema_for_eval=ema_for_eval)

  abstract = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  shardings = state_shardings(abstract, mesh, dict(task.state_sharding))
  term_names: list = []

  def jit_step(started):
    return jax.jit(
        _train_step_fn(task, txs, schedules, ema, term_names, frozen_groups, started),
        in_shardings=(shardings, mesh_lib.batch_sharding(mesh), None, mesh_lib.replicated(mesh)),
        out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)

  step = jit_step(None)
  # An update that starts late runs in a program of its own from its start step on, rather than
  # under a lax.cond in one program: XLA:CPU runs the backward convolutions of a conditional's
  # branch 6-15x slower than the same ops outside one (a VQ-GAN step with its discriminator
  # branch: 4.4 s instead of 1.5 s). Each program compiles when its first step comes.
  starts = sorted({u.start_step for u in task.all_updates} | {0})
  phases = {} if starts == [0] else {
      p: jit_step(frozenset(u.name for u in task.all_updates if u.start_step <= p)) for p in starts}
  # The seed's key is an argument, not a static seed: stages and replicas with other seeds (k
  # folds) reuse one compiled initialiser instead of compiling the model's init once per seed.
  jitted_init = jax.jit(init_state, out_shardings=shardings)
  init = lambda seed: jitted_init(jax.random.PRNGKey(seed))
  return CompiledTask(init=init, step=step, abstract_state=abstract, shardings=shardings,
                      term_names=term_names, lr_schedules=schedules, phases=phases)


def program_key(task: Task, optim, num_steps: int, ema, ema_for_eval: bool, mesh) -> tuple:
  """What identifies a compiled program: stages with equal keys can share one."""
  text = json.dumps([optim, ema], sort_keys=True, default=str)
  return (task.program(), text, num_steps, ema_for_eval, mesh)


def _owned(params: Mapping[str, Any], groups: Sequence[str]):
  """The part of `params` an update trains: the named top-level groups, or all of it."""
  if not groups:
    return params
  missing = [g for g in groups if g not in params]
  if missing:
    raise ConfigError(f"update groups {missing} are not top-level parameter groups "
                      f"({sorted(params)})")
  return {g: params[g] for g in groups}


def _merge(params: Mapping[str, Any], owned, groups: Sequence[str]):
  return owned if not groups else {**params, **owned}


def _train_step_fn(task: Task, txs: dict, schedules: dict, ema_kwargs: Mapping | None,
                   term_names: list, frozen_groups: Mapping[str, tuple],
                   started: frozenset | None = None):
  """The jit-able step. term_names is filled at trace time (for the NaN error message).

  started: None for one program in which a late update runs under lax.cond on the step; else the
  names of the updates that run in this phase's program (the others are idle: no compute).
  """
  updates = task.all_updates
  single = len(updates) == 1

  def prefix(u: Update, name: str) -> str:
    return name if single else f"{u.name}/{name}"

  def run_update(u: Update, i: int, operands, batch, frozen, lr_scale, base_rng, step, teacher):
    params, collections, opt_state = operands
    rng = base_rng if i == 0 else jax.random.fold_in(base_rng, i)
    ctx = StepContext(rng=rng, step=step, state=collections, frozen=frozen, ema=teacher)
    owned = _owned(params, u.groups)
    rest = {k: jax.lax.stop_gradient(v) for k, v in params.items() if k not in owned} \
        if u.groups else {}

    def loss_of(p):
      return u.loss(stop_frozen_gradients(_merge(rest, p, u.groups), frozen_groups[u.name]),
                    batch, ctx)

    (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(owned)
    new_owned_updates, opt_state = txs[u.name].update(grads, opt_state, owned)
    if lr_scale is not None:
      new_owned_updates = jax.tree.map(lambda x: x * lr_scale.astype(x.dtype), new_owned_updates)
    owned = optax.apply_updates(owned, new_owned_updates)
    collections = {**collections, **aux.get("state", {})}
    reserved = {"loss", "grad_norm", "step", "lr"} & set(aux["terms"])
    if reserved:
      raise ValueError(f"task {task.name!r}: loss terms {sorted(reserved)} clash with the loop's own "
                       "metric names; rename them")
    values = {"loss": loss, **dict(sorted(aux["terms"].items())),
              "grad_norm": optax.tree.norm(grads)}
    return (_merge(params, owned, u.groups), collections, opt_state), values

  def step_fn(state: TrainState, batch, frozen, lr_scale):
    step = state.step
    base_rng = jax.random.fold_in(state.rng, step)
    teacher = None if state.ema_params is None else jax.lax.stop_gradient(state.ema_params)
    params, collections, opt_states = state.params, state.collections, dict(state.opt_state)
    values: dict = {}
    for i, u in enumerate(updates):
      run = functools.partial(run_update, u, i, batch=batch, frozen=frozen, lr_scale=lr_scale,
                              base_rng=base_rng, step=step, teacher=teacher)
      operands = (params, collections, opt_states[u.name])
      if u.start_step > 0:
        shapes = jax.eval_shape(run, operands)[1]
        idle = lambda ops, shapes=shapes: (ops, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                             shapes))
        if started is None:
          (params, collections, opt_states[u.name]), out = jax.lax.cond(
              step >= u.start_step, run, idle, operands)
        else:
          (params, collections, opt_states[u.name]), out = (run if u.name in started else idle)(
              operands)
      else:
        (params, collections, opt_states[u.name]), out = run(operands)
      values.update({prefix(u, k): v for k, v in out.items()})
    ema = (ema_update(state.ema_params, params, step, **ema_kwargs)
           if state.ema_params is not None else None)
    term_names[:] = list(values)
    finite = jnp.stack([jnp.all(jnp.isfinite(v)) for v in values.values()])
    ok = jnp.all(finite)

    # A non-finite step leaves the state as it was; lax.cond picks one tree rather than
    # selecting element by element, so the guard costs no pass over the weights.
    updated = (params, opt_states, ema, collections)
    previous = (state.params, dict(state.opt_state), state.ema_params, state.collections)
    params, opt_states, ema, collections = jax.lax.cond(ok, lambda: updated, lambda: previous)
    first_fault = state.bad_step == NO_FAULT
    new_state = state.replace(
        step=step + 1, params=params, opt_state=opt_states, ema_params=ema, collections=collections,
        bad_step=jnp.where(~ok & first_fault, step, state.bad_step),
        bad_term=jnp.where(~ok & first_fault, jnp.argmin(finite).astype(jnp.int32), state.bad_term))
    scale_now = 1.0 if lr_scale is None else lr_scale
    # An update's schedule counts its own steps (it runs from its start_step on).
    lrs = {("lr" if single else f"lr/{u.name}"):
           schedules[u.name](jnp.maximum(step - u.start_step, 0)) * scale_now for u in updates}
    return new_state, {"mean": values, "last": lrs}

  return step_fn
