"""RadDiffusion end to end through the launcher on its :tiny variant: results, figures, reruns,
resumption and bad configs."""
import json
import os

import pytest

from launch_util import ROOT, copy_stages, launch, ok

TINY = ("--config", os.path.join(ROOT, "configs/raddiffusion.py:tiny"))
STAGES = ("pretrain_mae", "pretrain_diffmae", "finetune_random", "finetune_mae", "finetune_diffmae")


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("raddiffusion") / "run")
  return workdir, ok(launch(*TINY, "--workdir", workdir))


def test_tiny_run_writes_results_tables_and_figures(reference_run):
  workdir, proc = reference_run
  r = _results(workdir)
  assert set(r["probe"]) == {"random", "mae", "diffmae", "pixels"}
  for name in ("mae", "diffmae", "pixels"):
    assert r["probe"][name]["minus_random"]["lo"] <= r["probe"][name]["minus_random"]["value"]
  for scheme in ("mae", "diffmae"):  # the probing curve: an evaluation at every eval_every steps
    assert [step for step, _ in r["probe_curve"][scheme]] == [3, 6]
  assert 0 < r["probe_curve_random"] <= 1 and 0 < r["probe_curve_pixels"] <= 1
  for init in ("random", "mae", "diffmae"):
    assert r["finetune"][init]["macro"]["auroc"]["labels"] >= 1
  for name in ("random", "mae", "diffmae", "pixels"):
    assert set(r["multi_view"][name]) == {"frontal", "all"}
  for name in ("probe_curve.png", "reconstructions.png", "diffusion_chain.png", "results.md"):
    assert os.path.getsize(os.path.join(workdir, name)) > 1000 or name == "results.md"
  assert sorted(os.listdir(os.path.join(workdir, "pretrain_diffmae", "images"))) == [
      "reconstruction_000003.png", "reconstruction_000006.png"]
  text = open(os.path.join(workdir, "results.md")).read()
  assert "What the lateral view adds" in text and "minus random" in text
  assert "pixels, each view's means over a 16 x 16 grid of blocks (no encoder)" in text
  assert "[probe] mae: test macro AUROC" in proc.stdout


def test_rerun_loads_every_stage_and_reproduces(reference_run):
  workdir, _ = reference_run
  before = _results(workdir)
  proc = ok(launch(*TINY, "--workdir", workdir))
  assert proc.stdout.count("already trained") == len(STAGES)
  assert _results(workdir) == before


def test_killed_run_resumes_bit_identical(reference_run, tmp_path):
  workdir, _ = reference_run
  run = str(tmp_path / "run")
  # The data (no rendering) and the stages that do not depend on the killed one are copied from
  # the reference: the kill and the resumption are what is under test. finetune_diffmae is not
  # (its fingerprint names its init, not the weights it grafts: a copy would load whatever the
  # resumed stage ended with), so it retrains from the resumed encoder, and the results compare
  # the resumed stage's weights through it, its probes and its reconstructions.
  copy_stages(workdir, run, only=("data", "pretrain_mae", "finetune_random", "finetune_mae"))
  killed = launch(*TINY, "--workdir", run, env={"CXRJAX_FAULT_KILL_AT": "pretrain_diffmae:5"})
  assert killed.returncode != 0 and not os.path.exists(os.path.join(run, "results.json"))
  proc = ok(launch(*TINY, "--workdir", run))
  assert "[pretrain_mae] already trained" in proc.stdout
  # From the step-3 checkpoint, unless the kill came before its asynchronous save was committed.
  assert ("[pretrain_diffmae] resuming: step 3/6" in proc.stdout
          or "[pretrain_diffmae] training steps 0..6" in proc.stdout), proc.stdout[-3000:]
  assert _results(run) == _results(workdir)


@pytest.mark.parametrize("overrides,fragment", [
    (("--config.model.mask_ratio=1.5",), "model.mask_ratio=1.5"),
    (("--config.model.patch_size=7",), "not divisible by model.patch_size=7"),
    (("--config.model.image_size=64",), "differs from data.image_size"),
    (("--config.model.size=xl",), "model.size='xl'"),
    (("--config.finetune.eval_every=0",), "finetune.early_stop on 'val_loss'"),
    (("--config.probe.pixel_grid=12",), "probe.pixel_grid=12 does not divide data.image_size=32"),
])
def test_bad_config_is_one_line(tmp_path, overrides, fragment):
  proc = launch(*TINY, *overrides, "--workdir", str(tmp_path / "w"))
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and fragment in lines[0], lines
