"""The one training loop: learning, checkpoints, resume, NaN guard, fingerprints."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cxrjax.core import loop as loop_lib
from cxrjax.core.checkpoint import restore_variables
from cxrjax.core.errors import CheckpointError, NonFiniteError
from cxrjax.core.mesh import create_mesh
from toy_task import EMA, OPTIM, make_data, make_task


def _run(workdir, steps=30, task=None, data=None, **kw):
  return loop_lib.train(task or make_task(), data or make_data(), mesh=create_mesh(),
                        workdir=str(workdir),
                        schedule=loop_lib.Schedule(num_steps=steps, log_every=10, checkpoint_every=10),
                        optim=OPTIM, seed=0, ema=EMA, tensorboard=False, **kw)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_loss_decreases_and_metrics_written(tmp_path):
  res = _run(tmp_path, steps=60)
  lines = (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()
  first, last = eval(lines[0].replace("NaN", "float('nan')")), eval(lines[-1])
  assert last["mse"] < 0.5 * first["mse"]
  assert int(res.state.step) == 60
  assert res.state.collections["batch_stats"] is not None and res.state.ema_params is not None


def test_rerun_of_finished_stage_loads_without_training(tmp_path):
  a = _run(tmp_path)
  b = _run(tmp_path)
  for x, y in zip(_leaves(a.state.params), _leaves(b.state.params)):
    np.testing.assert_array_equal(x, y)


def test_kill_and_resume_bit_identical(tmp_path):
  script = f"""
import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
import numpy as np, jax
from cxrjax.core import loop as loop_lib
from cxrjax.core.checkpoint import restore_variables
from cxrjax.core.mesh import create_mesh
from toy_task import EMA, OPTIM, make_data, make_task
res = loop_lib.train(make_task(), make_data(), mesh=create_mesh(), workdir=sys.argv[1],
    schedule=loop_lib.Schedule(num_steps=30, log_every=5, checkpoint_every=10),
    optim=OPTIM, seed=0, ema=EMA, tensorboard=False)
np.savez(sys.argv[1] + '/params.npz', *[np.asarray(x) for x in jax.tree.leaves(jax.device_get(res.state))])
"""
  path = tmp_path / "run.py"
  path.write_text(script)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  full = subprocess.run([sys.executable, str(path), str(tmp_path / "full")], env=env,
                        capture_output=True, text=True)
  assert full.returncode == 0, full.stderr
  killed = subprocess.run([sys.executable, str(path), str(tmp_path / "cut")],
                          env=dict(env, CXRJAX_FAULT_KILL_AT="toy:17"), capture_output=True, text=True)
  assert killed.returncode != 0  # SIGKILL
  assert not (tmp_path / "cut" / "params.npz").exists()
  resumed = subprocess.run([sys.executable, str(path), str(tmp_path / "cut")], env=env,
                           capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr
  a, b = np.load(tmp_path / "full" / "params.npz"), np.load(tmp_path / "cut" / "params.npz")
  assert len(a.files) == len(b.files)
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k])


def test_nan_guard_names_step_and_term_and_keeps_checkpoint(tmp_path):
  task = make_task(nan_at_step=True)
  with pytest.raises(NonFiniteError, match=r"'loss' at step 13.*step 10"):
    _run(tmp_path, task=task, data=make_data(poison_batch=13))
  assert sorted(os.listdir(tmp_path / "toy" / "ckpt")) == ["10"]


def test_changed_config_refuses_to_resume(tmp_path):
  _run(tmp_path, fingerprint={"lr": 1})
  with pytest.raises(CheckpointError, match="lr: 1 -> 2"):
    _run(tmp_path, fingerprint={"lr": 2})


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
  _run(tmp_path, steps=10)
  step_dir = tmp_path / "toy" / "ckpt" / "10" / "state"
  for root, _, files in os.walk(step_dir):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  with pytest.raises(CheckpointError, match="cannot be restored"):
    _run(tmp_path, steps=20)


def test_orbax_warning_for_saves_without_metrics_is_dropped_and_nothing_else():
  import inspect
  import logging

  import orbax.checkpoint.checkpoint_manager as orbax_manager

  from cxrjax.core import checkpoint
  # The exact line Orbax logs (if Orbax rewords it, the filter would silently stop working).
  assert f"'{checkpoint._SAVE_WITHOUT_METRICS}'" in inspect.getsource(orbax_manager)
  logger = logging.getLogger("absl")
  record = lambda msg: logging.LogRecord("absl", logging.WARNING, __file__, 1, msg, (), None)
  assert not logger.filter(record(checkpoint._SAVE_WITHOUT_METRICS))
  assert logger.filter(record("any other Orbax warning"))
  # Asking again (a module imported twice) adds no second filter.
  from cxrjax.core.quiet_logs import drop_absl_messages
  before = len(logger.filters)
  drop_absl_messages((checkpoint._SAVE_WITHOUT_METRICS,))
  assert len(logger.filters) == before


def test_best_checkpoint_kept_and_returned(tmp_path):
  calls = []

  def evaluate(state):
    calls.append(int(state.step))
    return {"score": {10: 0.5, 20: 0.9, 30: 0.7}[int(state.step)]}

  res = loop_lib.train(make_task(), make_data(), mesh=create_mesh(), workdir=str(tmp_path),
                       schedule=loop_lib.Schedule(num_steps=30, log_every=10, checkpoint_every=10,
                                                  eval_every=10, keep=1, best_metric="score"),
                       optim=OPTIM, seed=0, tensorboard=False, evaluate=evaluate)
  assert res.best_step == 20 and int(res.best_state.step) == 20
  assert res.eval_metrics == {"score": 0.9}
  assert sorted(os.listdir(tmp_path / "toy" / "ckpt")) == ["20", "30"]


def test_init_from_starts_from_given_params(tmp_path):
  first = _run(tmp_path / "a", steps=20)
  variables, meta = restore_variables(str(tmp_path / "a" / "toy" / "ckpt"))
  params = variables["params"]
  assert meta["stage"] == "toy"
  tiny_lr = dict(OPTIM, lr=1e-12, weight_decay=0.0)
  second = loop_lib.train(make_task(), make_data(), mesh=create_mesh(), workdir=str(tmp_path / "b"),
                          schedule=loop_lib.Schedule(num_steps=1, log_every=1, checkpoint_every=1),
                          optim=tiny_lr, seed=1, ema=EMA, tensorboard=False,
                          graft={"params": params})
  for x, y in zip(_leaves(second.state.params), _leaves(first.state.ema_params)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  with pytest.raises(CheckpointError, match="does not exist"):
    restore_variables(str(tmp_path / "missing"))
  # The batch-norm statistics come back beside the (EMA) parameters.
  assert set(variables) == {"params", "batch_stats"}
  for x, y in zip(_leaves(variables["batch_stats"]), _leaves(first.state.collections["batch_stats"])):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(_leaves(variables["params"]), _leaves(first.state.ema_params)):
    np.testing.assert_array_equal(x, y)
