"""The CXR-FMKD system end to end through the launcher (configs/fmkd.py:tiny), its resume, and
teacher-embedding files that do not match the images (refused before anything trains)."""
import json
import os
import shutil

import numpy as np
import pytest

from cxrjax.data.embeddings import load_embeddings, write_embeddings
from cxrjax.data.errors import DataError
from launch_util import ROOT, launch, ok

TINY = ("--config", os.path.join(ROOT, "configs/fmkd.py:tiny"))
MODELS = {"teacher_lp", "fmkd_lp", "fmkd_direct_lp", "fmkd_ft", "scratch"}


@pytest.fixture(scope="module")
def reference_run(fmkd_tiny_run):
  """The session's uninterrupted tiny run (conftest.py; the FMKD notebook's test shares it)."""
  return fmkd_tiny_run


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def test_tiny_run_writes_results_tables_and_plots(reference_run):
  workdir, proc = reference_run
  r = _results(workdir)
  assert r["config"]["variant"] == "tiny" and r["seeds"] == [41, 42]
  assert set(r["performance"]) == {"in_domain", "transfer"}
  for domain in r["performance"].values():
    assert set(domain) == MODELS
    for model in domain.values():
      assert len(model["per_seed"]) == 2
      macro = model["summary"]["Macro"]
      assert set(macro) == {"auc", "auprc", "max_j", "j_at_fpr"}
      assert 0 <= macro["auc"]["mean"] <= 1 and set(macro["auc"]) == {"mean", "sd", "pct_sd"}
  assert set(r["bias"]) == {"teacher", "fmkd", "scratch"}
  for b in r["bias"].values():
    assert 0 <= b["combined"] <= 150 and {"race", "sex"} == set(b["attribute"])
  for table in ("Macro metrics, in-domain", "Direct transfer", "Bias analysis", "CXR-FMKD-FFT"):
    assert table in proc.stdout
  for name in ("bias_pca_teacher.png", "bias_tsne_fmkd.png", "bias_tsne_scratch.png"):
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  emb = os.path.join(workdir, "teacher", "embeddings")
  one = np.load(os.path.join(emb, sorted(f for f in os.listdir(emb) if f.endswith(".npy"))[0]))
  assert one.shape == (16,) and one.dtype == np.float32  # the seed's layout: float32 per image


def test_rerun_resumes_without_training(reference_run):
  workdir, _ = reference_run
  before = _results(workdir)
  proc = ok(launch(*TINY, "--workdir", workdir))
  assert "training steps" not in proc.stdout
  assert proc.stdout.count("already trained") == 2 + 2 * 5  # teacher, distill, 5 per seed
  assert _results(workdir) == before


def test_faithful_bn_leak_probes_train_the_head_on_a_train_mode_backbone(reference_run, tmp_path):
  # probe.faithful_bn_leak: the student's probes rerun through the train-mode backbone (the
  # seed's LP); teacher, distillation and fine-tunes are reused, the teacher's probe unchanged.
  workdir, _ = reference_run
  run = str(tmp_path / "leaky")
  shutil.copytree(workdir, run)
  proc = ok(launch(*TINY, "--workdir", run, "--config.probe.faithful_bn_leak=True"))
  before, after = _results(workdir), _results(run)
  for domain in ("in_domain", "transfer"):
    assert after["performance"][domain]["teacher_lp"] == before["performance"][domain]["teacher_lp"]
    for model in ("fmkd_lp", "fmkd_direct_lp"):
      assert after["performance"][domain][model] != before["performance"][domain][model]
  assert proc.stdout.count("already trained") == 2 + 2 * 3  # teacher, distill, per seed 3
  from cxrjax.core.checkpoint import Checkpointer
  from cxrjax.core.checkpoint import restore_state
  state, _ = restore_state(os.path.join(run, "fmkd_lp_leaky_s41", "ckpt"))
  # The probes start from the distillation's best checkpoint (lowest val_loss), not its last.
  distill = Checkpointer(os.path.join(run, "distill", "ckpt"), best_metric="val_loss", best_mode="min")
  best = distill.best_step()
  distill.close()
  student, _ = restore_state(os.path.join(run, "distill", "ckpt"), best)
  # Frozen weights, drifted running statistics.
  np.testing.assert_array_equal(state["params"]["backbone"]["conv0"]["kernel"],
                                student["params"]["student"]["conv0"]["kernel"])
  assert not np.array_equal(state["collections"]["batch_stats"]["backbone"]["norm0"]["mean"],
                            student["collections"]["batch_stats"]["norm0"]["mean"])


def _bad_embeddings(workdir, tmp_path, how):
  src = os.path.join(workdir, "teacher", "embeddings")
  dst = str(tmp_path / how)
  shutil.copytree(src, dst)
  files = sorted(f for f in os.listdir(dst) if f.endswith(".npy"))
  if how == "dim":
    np.save(os.path.join(dst, files[3]), np.zeros(17, np.float32))
  elif how == "count":
    os.remove(os.path.join(dst, files[0]))
  elif how == "ids":
    os.rename(os.path.join(dst, files[1]), os.path.join(dst, "s99999999.npy"))
  return dst, files


@pytest.mark.parametrize("how,message", [("dim", "expected (16,)"), ("count", "no npy embedding"),
                                         ("ids", "first missing")])
def test_bad_embedding_files_exit_2_before_training(reference_run, tmp_path, how, message):
  workdir, _ = reference_run
  path, files = _bad_embeddings(workdir, tmp_path, how)
  run_dir = str(tmp_path / "run")
  proc = launch(*TINY, "--workdir", run_dir, "--config.teacher.source=files",
                f"--config.teacher.path={path}",
                f"--config.data.data_dir={os.path.join(workdir, 'data')}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, last
  if how != "dim":
    assert files[0 if how == "count" else 1] in last  # the offending image is named
  assert not os.path.exists(os.path.join(run_dir, "distill"))  # nothing trained


def test_embedding_loader_layouts_and_errors(tmp_path):
  ids = [f"s{i:08d}" for i in range(6)]
  emb = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
  for layout in ("npy", "dat"):
    write_embeddings(str(tmp_path / layout), ids, emb, layout)
    np.testing.assert_array_equal(load_embeddings(str(tmp_path / layout), ids[::-1], 8), emb[::-1])
  write_embeddings(str(tmp_path / "e.npz"), ids, emb, "npz")
  np.testing.assert_array_equal(load_embeddings(str(tmp_path / "e.npz"), ids[2:], 8), emb[2:])
  emb[3].astype(np.float64).tofile(str(tmp_path / "dat" / f"{ids[3]}.dat"))
  with pytest.raises(DataError, match="float64"):
    load_embeddings(str(tmp_path / "dat"), ids, 8)
  with pytest.raises(DataError, match="dimension 8, expected 9"):
    load_embeddings(str(tmp_path / "e.npz"), ids, 9)
  with pytest.raises(DataError, match="1 of 7 images have no embedding"):
    load_embeddings(str(tmp_path / "e.npz"), ids + ["s_unknown"], 8)
  np.savez(str(tmp_path / "short.npz"), ids=np.array(ids), embeddings=emb[:5])
  with pytest.raises(DataError, match="6 ids but embeddings of shape"):
    load_embeddings(str(tmp_path / "short.npz"), ids, 8)
  with pytest.raises(DataError, match="repeat"):
    load_embeddings(str(tmp_path / "npy"), ids + ids[:1], 8)
  np.save(str(tmp_path / "npy" / f"{ids[0]}.npy"), np.full(8, np.nan, np.float32))
  with pytest.raises(DataError, match="non-finite"):
    load_embeddings(str(tmp_path / "npy"), ids, 8)


@pytest.mark.parametrize("field,value,message", [
    ("distill.loss.kind", "kl", "distill.loss.kind='kl'; choose one of"),
    ("data.target_sites", (0, 3), "must be disjoint"),
    ("teacher.source", "files", "needs --config.teacher.path"),
    ("eval.seeds", (), "eval.seeds=()"),
])
def test_bad_config_values_are_one_line_errors(field, value, message):
  import importlib.util
  from cxrjax.core.errors import ConfigError
  from cxrjax.systems.fmkd.validate import validate_config
  spec = importlib.util.spec_from_file_location("fmkd_config", os.path.join(ROOT, "configs/fmkd.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("tiny")
  block, _, key = field.rpartition(".")
  target = c
  for part in block.split("."):
    target = target[part]
  target[key] = value
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validate_config(c)
