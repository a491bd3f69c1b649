"""Every variant of every config file validates, and stays valid when its step counts change;
a config whose cadences cannot work is refused before anything runs, in one line."""
import glob
import importlib
import os

import pytest

from cxrjax.core.config import load_config
from cxrjax.core.errors import ConfigError
from launch_util import ROOT, launch

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _variants():
  out = []
  for path in CONFIGS:
    spec = importlib.util.spec_from_file_location("config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out += [(path, v) for v in module.VARIANTS]
  return out


def _stage_blocks(config):
  """(dotted name, block) of every training-stage block (those with steps and an optim)."""
  found = []

  def walk(node, prefix):
    for key in node.keys():
      value = node[key]
      if hasattr(value, "keys"):
        if "steps" in value and "optim" in value:
          found.append((prefix + key, value))
        walk(value, prefix + key + ".")
  walk(config, "")
  return found


@pytest.mark.parametrize("path,variant", _variants(),
                         ids=lambda x: os.path.basename(x) if str(x).endswith(".py") else x)
def test_every_variant_validates_and_survives_other_step_counts(path, variant):
  config = load_config(f"{path}:{variant}")
  system = importlib.import_module(f"cxrjax.systems.{config.system}")
  system.validate_config(config)
  blocks = _stage_blocks(config)
  assert blocks, "no training stage found"
  for steps in (1, 7, 100_000):  # cadences follow the step count
    changed = load_config(f"{path}:{variant}", {f"{name}.steps": steps for name, _ in blocks})
    system.validate_config(changed)
    for name, block in _stage_blocks(changed):
      assert 1 <= block.checkpoint_every <= steps and 1 <= block.log_every <= steps, name
      assert 0 <= block.eval_every <= steps, name


def test_cadence_that_cannot_happen_is_refused():
  from cxrjax.systems import prior
  tiny = os.path.join(ROOT, "configs/prior.py:tiny")
  config = load_config(tiny, {"classifier_train.eval_every": 40})
  with pytest.raises(ConfigError, match="classifier_train.eval_every=40 exceeds"):
    prior.validate_config(config)
  config = load_config(tiny)
  config.unlock()
  config.train.early_stop = dict(enabled=True, metric="val_loss", patience=2)
  with pytest.raises(ConfigError, match="train.early_stop on 'val_loss' acts at evaluations"):
    prior.validate_config(config)


def test_launcher_refuses_before_anything_runs(tmp_path):
  workdir = tmp_path / "run"
  proc = launch("--config", os.path.join(ROOT, "configs/prior.py:tiny"), "--workdir", str(workdir),
                "--config.train.checkpoint_every=500")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("error: train.checkpoint_every=500 exceeds")
  assert not workdir.exists()


def test_a_crash_mid_checkpoint_ends_in_one_line_with_the_traceback_kept(tmp_path):
  workdir = tmp_path / "run"
  proc = launch("--config", os.path.join(ROOT, "configs/prior.py:tiny"), "--workdir", str(workdir),
                env={"CXRJAX_FAULT_KILL_AT": "ctpa_only:10:raise"})
  assert proc.returncode == 1, (proc.stdout[-2000:], proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: the run failed with RuntimeError") and "crash.log" in last, last
  assert "Traceback" in (workdir / "crash.log").read_text()
  # The checkpoint written just before the failure is complete: a rerun resumes from it.
  proc = launch("--config", os.path.join(ROOT, "configs/prior.py:tiny"), "--workdir", str(workdir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[ctpa_only] resuming: step 10/20" in proc.stdout
