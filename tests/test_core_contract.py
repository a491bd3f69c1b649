"""The loop's contract beyond one loss: parameter groups in sequence, non-gradient state,
frozen inputs, the EMA teacher, the step in the loss, evaluation that acts on training and
writes images, grafting, replicas."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.core import loop
from cxrjax.core.checkpoint import restore_state
from cxrjax.core.control import EarlyStopping, ReduceOnPlateau
from cxrjax.core.errors import CheckpointError, ConfigError
from cxrjax.core.mesh import create_mesh
from cxrjax.core.replicas import replicas, run_replicas
from cxrjax.core.stage import Run
from cxrjax.core.task import Task, Update
from cxrjax.data.iterators import ShuffledBatches

SGD = dict(name="sgd", lr=0.1, momentum=0.0, schedule="constant", weight_decay=0.0)


def _data(n=32, batch=8, seed=0):
  x = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
  return ShuffledBatches({"x": x, "index": np.arange(n, dtype=np.int32)}, batch, seed=seed)


def _train(tmp_path, task, steps, *, optim=SGD, data=None, **kw):
  kw.setdefault("schedule", loop.Schedule(num_steps=steps, log_every=steps, checkpoint_every=steps))
  return loop.train(task, data or _data(), mesh=create_mesh(), workdir=str(tmp_path), optim=optim,
                    seed=0, tensorboard=False, **kw)


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


# --- several parameter groups, in sequence, each its own optimizer and start ---------------------
def _gan_task(d_start):
  def init(rng):
    return {"params": {"g": jnp.array([2.0]), "d": jnp.array([-1.0])}}

  def g_loss(params, batch, ctx):
    loss = jnp.sum((params["g"] - 1.0) ** 2) + 0.0 * jnp.sum(params["d"])
    return loss, {"terms": {}}

  def d_loss(params, batch, ctx):  # pulls d towards the generator's *current* value
    loss = jnp.sum((params["d"] - params["g"]) ** 2)
    return loss, {"terms": {}}

  return Task("gan", init, updates=(Update("generator", g_loss, groups=("g",)),
                                    Update("discriminator", d_loss, groups=("d",), start_step=d_start)))


def test_groups_update_in_sequence_with_own_optimizers_and_start(tmp_path):
  optim = {"generator": dict(SGD, lr=0.1),
           "discriminator": dict(SGD, lr=0.25, schedule="linear", end_lr_factor=0.0)}
  res = _train(tmp_path, _gan_task(d_start=2), 5, optim=optim)
  g, d = 2.0, -1.0
  d_steps = 0
  for step in range(5):
    g = g - 0.1 * 2 * (g - 1.0)
    if step >= 2:  # the discriminator sees the generator's new value; its schedule counts its own steps
      lr = 0.25 * (1 - d_steps / 5)
      d = d - lr * 2 * (d - g)
      d_steps += 1
  params = _host(res.state.params)
  np.testing.assert_allclose(params["g"], [g], rtol=1e-6)
  np.testing.assert_allclose(params["d"], [d], rtol=1e-6)
  lines = [json.loads(l) for l in (tmp_path / "gan" / "metrics.jsonl").read_text().splitlines()]
  assert {"generator/loss", "discriminator/loss", "lr/generator", "lr/discriminator"} <= set(lines[-1])


def test_a_late_update_runs_in_a_program_of_its_own_with_the_same_numbers():
  """The loop steps a task with a late update through per-phase programs (no lax.cond around the
  update: XLA:CPU runs a conditional's backward convolutions far slower); the single program with
  the cond gives the same bits."""
  from cxrjax.core.task import compile_task
  optim = {"generator": dict(SGD, lr=0.1), "discriminator": dict(SGD, lr=0.25)}
  compiled = compile_task(_gan_task(d_start=2), mesh=create_mesh(), optim=optim, num_steps=5)
  assert sorted(compiled.phases) == [0, 2] and compiled.step_at(1) is compiled.phases[0]
  assert compiled.step_at(4) is compiled.phases[2]
  batch = {"x": np.zeros((8, 3), np.float32), "index": np.arange(8, dtype=np.int32)}
  a, b = compiled.init(0), compiled.init(0)
  for step in range(5):
    a, _ = compiled.step_at(step)(a, batch, None, None)
    b, _ = compiled.step(b, batch, None, None)
  for x, y in zip(jax.tree.leaves(_host(a.params)), jax.tree.leaves(_host(b.params))):
    np.testing.assert_array_equal(x, y)
  assert float(_host(a.params)["d"][0]) != -1.0  # the discriminator did move after its start


# --- non-gradient state: counters and a memory bank, sharded deliberately, resumed exactly ---------
def _bank_task(rows_sharded):
  def init(rng):
    return {"params": {"w": jnp.ones((3,))},
            "bank": {"rows": jnp.zeros((32, 3))}, "counts": {"n": jnp.zeros((), jnp.int32)}}

  def loss(params, batch, ctx):
    feats = batch["x"] * params["w"]
    bank = ctx.state["bank"]["rows"]
    # contrast against the bank as it stood, then write this batch's features into it
    value = jnp.mean(jnp.sum(feats ** 2, -1)) - 0.1 * jnp.mean(feats @ bank.T)
    new_bank = bank.at[batch["index"]].set(jax.lax.stop_gradient(feats))
    return value, {"terms": {}, "state": {"bank": {"rows": new_bank},
                                          "counts": {"n": ctx.state["counts"]["n"] + 1}}}

  return Task("bank", init, loss=loss,
              state_sharding=(("bank", "rows"),) if rows_sharded else ())


class _Crash:
  """A data iterator that fails after `after` batches: an interruption the loop survives."""

  def __init__(self, inner, after):
    self.inner, self.after = inner, after

  def __next__(self):
    if self.inner.position >= self.after:
      raise KeyboardInterrupt("simulated interruption")
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, s):
    self.inner.set_state(s)


def test_collections_threaded_checkpointed_and_resumed_bit_identically(tmp_path):
  sched = loop.Schedule(num_steps=9, log_every=3, checkpoint_every=3)
  full = _train(tmp_path / "full", _bank_task(False), 9, schedule=sched)
  assert int(full.state.collections["counts"]["n"]) == 9
  assert np.count_nonzero(np.abs(_host(full.state.collections)["bank"]["rows"]).sum(1)) == 32
  with pytest.raises(KeyboardInterrupt):
    _train(tmp_path / "cut", _bank_task(False), 9, schedule=sched, data=_Crash(_data(), 7))
  resumed = _train(tmp_path / "cut", _bank_task(False), 9, schedule=sched)
  for a, b in zip(jax.tree.leaves(_host(full.state)), jax.tree.leaves(_host(resumed.state))):
    np.testing.assert_array_equal(a, b)
  saved, _ = restore_state(str(tmp_path / "full" / "bank" / "ckpt"))
  np.testing.assert_array_equal(saved["collections"]["bank"]["rows"],
                                _host(full.state.collections)["bank"]["rows"])


def test_bank_sharded_by_rows_on_8_devices_matches_one_device(tmp_path):
  script = f"""
import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
import jax, numpy as np
from test_core_contract import _bank_task, _data, SGD
from cxrjax.core import loop
from cxrjax.core.mesh import create_mesh
out = {{}}
for n, rows in ((1, False), (8, True)):
  res = loop.train(_bank_task(rows), _data(), mesh=create_mesh(devices=jax.devices()[:n]),
                   workdir=sys.argv[1] + f"/{{n}}", optim=SGD, seed=0, tensorboard=False,
                   schedule=loop.Schedule(num_steps=6, log_every=6, checkpoint_every=6))
  bank = res.state.collections["bank"]["rows"]
  out[n] = (np.asarray(jax.device_get(bank)), np.asarray(jax.device_get(res.state.params["w"])))
  if n == 8:
    assert bank.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp")), bank.sharding
    assert len(bank.addressable_shards) == 8 and bank.addressable_shards[0].data.shape == (4, 3)
np.testing.assert_allclose(out[1][0], out[8][0], atol=1e-6)
np.testing.assert_allclose(out[1][1], out[8][1], atol=1e-6)
print("ok")
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# --- frozen inputs, the EMA copy as teacher, the step inside the loss ----------------------------
def _teacher_task():
  def init(rng):
    return {"params": {"w": jnp.zeros((3,))}}

  def loss(params, batch, ctx):
    pred = batch["x"] @ params["w"]
    target = batch["x"] @ ctx.frozen["teacher"]
    ema = ctx.ema if ctx.ema is not None else jax.lax.stop_gradient(params)
    consistency = jnp.sum((params["w"] - ema["w"]) ** 2)
    on = (ctx.step >= 2).astype(jnp.float32)  # the regression switches on at step 2
    value = on * jnp.mean((pred - target) ** 2) + consistency
    return value, {"terms": {"ema_sum": jnp.sum(ema["w"]), "seen_step": ctx.step.astype(jnp.float32)}}

  return Task("student", init, loss=loss)


def test_frozen_inputs_are_arguments_and_ema_teacher_and_step(tmp_path):
  teacher = np.array([1.0, -2.0, 0.5], np.float32)
  ema = dict(beta=0.5, update_after_step=0, update_every=1, power=1.0, use_for_eval=False)
  sched = loop.Schedule(num_steps=6, log_every=1, checkpoint_every=6)
  res = _train(tmp_path / "a", _teacher_task(), 6, frozen={"teacher": teacher}, ema=ema,
               schedule=sched)
  lines = [json.loads(l) for l in (tmp_path / "a" / "student" / "metrics.jsonl").read_text().splitlines()]
  assert [l["seen_step"] for l in lines] == [0, 1, 2, 3, 4, 5]  # ctx.step is the 0-based step
  assert lines[0]["loss"] == 0 and lines[1]["loss"] == 0  # nothing to learn before step 2
  # ctx.ema is the EMA *before* the step: zero until the first real update has been averaged in
  assert lines[2]["ema_sum"] == 0 and lines[4]["ema_sum"] != 0
  # use_for_eval=False: evaluation and later stages get the raw parameters, not the EMA
  np.testing.assert_array_equal(res.variables(best=False)["params"]["w"], _host(res.state.params)["w"])
  assert not np.array_equal(_host(res.state.params)["w"], _host(res.state.ema_params)["w"])
  saved, _ = restore_state(str(tmp_path / "a" / "student" / "ckpt"))
  assert "teacher" not in json.dumps(jax.tree.map(lambda x: x.shape, saved), default=str)
  # Another teacher, same program: different weights learnt, no recompilation.
  programs, task = {}, _teacher_task()
  a = _train(tmp_path / "b", task, 6, frozen={"teacher": teacher}, programs=programs)
  b = _train(tmp_path / "c", task, 6, frozen={"teacher": -teacher}, programs=programs)
  assert len(programs) == 1
  compiled = next(iter(programs.values()))
  assert compiled.step._cache_size() == 1
  np.testing.assert_allclose(_host(a.state.params)["w"], -_host(b.state.params)["w"], atol=1e-6)


# --- evaluation acts on training: best checkpoint, plateau, early stopping -------------------------
def _scripted_eval(values):
  def evaluate(state):
    return {"val_loss": values[int(state.step)]}
  return evaluate


def test_best_checkpoint_kept_off_the_save_cadence(tmp_path):
  """An evaluation every 15 steps with checkpoints every 5 (the crash of issue 15): every
  checkpoint carries its own evaluation or none, and the best evaluation is saved and returned."""
  values = {15: 0.5, 30: 0.2, 45: 0.4, 50: 0.3}
  sched = loop.Schedule(num_steps=50, log_every=50, checkpoint_every=5, eval_every=15, keep=1,
                        best_metric="val_loss", best_mode="min")
  res = _train(tmp_path, _teacher_task(), 50, schedule=sched, evaluate=_scripted_eval(values),
               frozen={"teacher": np.ones(3, np.float32)})
  assert res.best_step == 30 and int(res.best_state.step) == 30
  assert res.eval_metrics == {"val_loss": 0.2}
  assert sorted(int(d) for d in os.listdir(tmp_path / "student" / "ckpt") if d.isdigit()) == [30, 50]


def test_plateau_and_early_stopping_act_and_resume(tmp_path):
  values = {s: v for s, v in zip(range(2, 41, 2), [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9] + [0.95] * 12)}
  plateau = ReduceOnPlateau("val_loss", factor=0.5, patience=1, threshold=0.0)
  stop = EarlyStopping("val_loss", patience=6)
  sched = loop.Schedule(num_steps=40, log_every=1, checkpoint_every=4, eval_every=2,
                        plateau=plateau, early_stop=stop)
  kw = dict(schedule=sched, evaluate=_scripted_eval(values), frozen={"teacher": np.ones(3, np.float32)})
  full = _train(tmp_path / "full", _teacher_task(), 40, **kw)
  assert full.stopped_at == 16  # best 0.9 at step 4; six evaluations without improvement
  lines = [json.loads(l) for l in (tmp_path / "full" / "student" / "metrics.jsonl").read_text().splitlines()
           if '"lr"' in l]
  lrs = {l["step"]: l["lr"] for l in lines}
  # Evaluations at 6, 8 do not improve: patience 1 -> halved after the one at 8, again after 12, 16.
  assert lrs[8] == pytest.approx(0.1) and lrs[9] == pytest.approx(0.05) and lrs[13] == pytest.approx(0.025)
  assert max(lrs) == 16
  with pytest.raises(KeyboardInterrupt):
    _train(tmp_path / "cut", _teacher_task(), 40, data=_Crash(_data(), 11), **kw)
  resumed = _train(tmp_path / "cut", _teacher_task(), 40, **kw)
  assert resumed.stopped_at == 16
  np.testing.assert_array_equal(_host(full.state.params)["w"], _host(resumed.state.params)["w"])
  again = _train(tmp_path / "full", _teacher_task(), 40, **kw)  # a finished stage only loads
  assert again.stopped_at == 16 and int(again.state.step) == 16


def test_controllers_need_evaluations():
  with pytest.raises(ConfigError, match="eval_every > 0"):
    loop.Schedule(num_steps=10, eval_every=0, early_stop=EarlyStopping("val_loss"))


def test_evaluation_images_are_written(tmp_path):
  def evaluate(state):
    return {"val_loss": 1.0, "samples": np.linspace(0, 1, 5 * 8 * 6).reshape(5, 8, 6)}
  sched = loop.Schedule(num_steps=4, log_every=4, checkpoint_every=4, eval_every=2)
  _train(tmp_path, _teacher_task(), 4, schedule=sched, evaluate=evaluate,
         frozen={"teacher": np.ones(3, np.float32)})
  from PIL import Image
  files = sorted(os.listdir(tmp_path / "student" / "images"))
  assert files == ["samples_000002.png", "samples_000004.png"]
  grid = np.asarray(Image.open(tmp_path / "student" / "images" / files[0]))
  assert grid.shape == (2 * 8 + 2, 3 * 6 + 4)  # 5 images in a 2 x 3 grid with 2-pixel gaps
  assert grid[:8, :6].max() <= 255 and grid[:8, 6:8].max() == 0


# --- grafting a pretrained subtree -----------------------------------------------------------------
def _two_part_task():
  def init(rng):
    k1, k2 = jax.random.split(rng)
    return {"params": {"encoder": {"kernel": jax.random.normal(k1, (3, 4))},
                       "head": {"kernel": jax.random.normal(k2, (4,))}}}

  def loss(params, batch, ctx):
    return jnp.mean((batch["x"] @ params["encoder"]["kernel"] @ params["head"]["kernel"]) ** 2), {"terms": {}}

  return Task("finetune", init, loss=loss)


def test_graft_pretrained_subtree_and_mismatch_lists_paths(tmp_path):
  encoder = {"kernel": np.full((3, 4), 0.5, np.float32)}
  tiny = dict(SGD, lr=1e-12)
  res = _train(tmp_path / "a", _two_part_task(), 1, optim=tiny, graft={"params/encoder": encoder},
               ema=dict(beta=0.9))
  np.testing.assert_allclose(_host(res.state.params)["encoder"]["kernel"], encoder["kernel"], atol=1e-9)
  np.testing.assert_allclose(_host(res.state.ema_params)["encoder"]["kernel"], encoder["kernel"], atol=1e-9)
  fresh = _host(_train(tmp_path / "b", _two_part_task(), 1, optim=tiny).state.params)
  np.testing.assert_allclose(_host(res.state.params)["head"]["kernel"], fresh["head"]["kernel"], atol=1e-9)
  bad = {"kernel": np.zeros((3, 5), np.float32), "bias": np.zeros(4, np.float32)}
  with pytest.raises(CheckpointError) as e:
    _train(tmp_path / "c", _two_part_task(), 1, graft={"params/encoder": bad, "params/decoder": {}})
  msg = str(e.value)
  for fragment in ("params/encoder/kernel: shape (3, 5) given, (3, 4) expected",
                   "params/encoder/bias: not in the new model", "params/decoder: no such subtree"):
    assert fragment in msg, msg


# --- replicas: resumable sub-runs with derived seeds, one compiled program -------------------------
def test_replicas_share_one_program_and_resume(tmp_path):
  class Config(dict):
    def to_dict(self):
      return dict(self)
    __getattr__ = dict.__getitem__

  config = Config(mesh={"data": -1, "fsdp": 1}, tensorboard=False)
  block = dict(steps=4, batch_size=8, log_every=4, checkpoint_every=4, optim=SGD)
  task = _teacher_task()

  def one(run):
    def fold(rep):
      teacher = np.random.default_rng(rep.seed).normal(size=3).astype(np.float32)
      res = run.stage(task, _data(seed=rep.seed), block, seed=rep.seed, name=rep.stage("student"),
                      parent=rep.fingerprint({"data": 1}), frozen={"teacher": teacher})
      return _host(res.state.params)["w"], res.fingerprint
    return run_replicas(replicas("fold", range(3), seed=7), fold)

  run = Run.start(config, str(tmp_path))
  first = one(run)
  assert len(run.programs) == 1 and next(iter(run.programs.values())).step._cache_size() == 1
  assert sorted(os.listdir(tmp_path)) == ["student_fold0", "student_fold1", "student_fold2"]
  assert len({tuple(w) for w, _ in first.values()}) == 3  # derived seeds differ
  assert first[1][1]["fold"] == 1
  again = one(Run.start(config, str(tmp_path)))  # everything loads from its checkpoint
  for k in first:
    np.testing.assert_array_equal(first[k][0], again[k][0])
