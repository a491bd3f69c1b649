"""GMCD's system parts without a launcher: folds, batches, augmentation, the user's table checks,
config checks, and the stage-2 step with its DSCD bank split over 8 simulated devices."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cxrjax.core.config import load_config
from cxrjax.core.errors import ConfigError
from cxrjax.data.errors import DataError
from cxrjax.systems.gmcd import data as gdata
from cxrjax.systems.gmcd import tabular, validate
from launch_util import ROOT

TINY = os.path.join(ROOT, "configs/gmcd.py:tiny")


def _cohort(n=60, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  patients = np.array([f"p{i // 2}" for i in range(n)])  # two studies per patient
  labels = np.repeat(np.arange(n // 2) % classes, 2).astype(np.int32)
  return gdata.Cohort(rng.integers(0, 255, (n, 12, 12), dtype=np.uint8),
                      rng.normal(3.0, 2.0, (n, 5)).astype(np.float32), labels, patients,
                      np.array([f"s{i}" for i in range(n)]), classes)


@pytest.mark.parametrize("select_on", ["validation", "test"])
def test_folds_are_patient_disjoint_and_zscored_on_training_rows(select_on):
  cohort = _cohort()
  folds = gdata.make_folds(cohort, 3, seed=0, val_fraction=0.25, select_on=select_on,
                           num_candidates=4)
  tests = np.concatenate([f.test for f in folds])
  assert sorted(tests.tolist()) == list(range(len(cohort)))  # every study tested once
  for f in folds:
    parts = [set(cohort.patients[r]) for r in (f.train, f.val, f.test)]
    assert not parts[0] & parts[2] and not parts[0] & parts[1]
    if select_on == "test":
      np.testing.assert_array_equal(f.val, f.test)  # the seed's selection on the test fold
    else:
      assert not parts[1] & parts[2] and len(f.val) > 0
    np.testing.assert_allclose(f.tabular[f.train].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(f.tabular[f.train].std(0), 1, atol=1e-4)


def test_a_class_missing_from_a_folds_training_rows_is_refused():
  cohort = _cohort()
  cohort.labels[:] = np.repeat(np.arange(30) % 2, 2)
  cohort.labels[:2] = 2  # one patient holds class 2: the fold that tests it cannot train on it
  with pytest.raises(DataError, match=r"fold \d: class\(es\) \[2\] have no training study"):
    gdata.make_folds(cohort, 3, seed=0, val_fraction=0.25, select_on="test", num_candidates=4)


def test_fold_batches_drop_last_distinct_rows_contrast_indices_and_resume():
  cohort = _cohort()
  fold = gdata.make_folds(cohort, 3, seed=0, val_fraction=0.25, select_on="validation",
                          num_candidates=4)[0]
  it = gdata.FoldBatches(cohort, fold, 8, seed=1, contrast=(4, 6, "multi_pos"))
  batches = [next(it) for _ in range(it.per_epoch + 2)]
  labels = cohort.labels[fold.train]
  for b in batches:
    assert len(set(b["index"].tolist())) == 8
    np.testing.assert_array_equal(b["label"], labels[b["index"]])
    np.testing.assert_array_equal(b["contrast_index"][:, 0], b["index"])  # the self-positive
    same = labels[b["contrast_index"][:, :4]] == b["label"][:, None]
    other = labels[b["contrast_index"][:, 4:]] != b["label"][:, None]
    assert same.all() and other.all()
  resumed = gdata.FoldBatches(cohort, fold, 8, seed=1, contrast=(4, 6, "multi_pos"))
  resumed.set_state(dict(it.get_state(), position=3))
  for k, v in next(resumed).items():
    np.testing.assert_array_equal(v, batches[3][k])


def test_augment_views_are_in_range_and_differ():
  images = np.random.default_rng(0).integers(0, 255, (4, 20, 20), dtype=np.uint8)
  a = np.asarray(gdata.augment(jax.random.PRNGKey(0), images, 16))
  b = np.asarray(gdata.augment(jax.random.PRNGKey(1), images, 16))
  assert a.shape == (4, 16, 16, 3) and a.min() >= -1 and a.max() <= 1
  np.testing.assert_array_equal(a[..., 0], a[..., 2])  # gray repeated into 3 channels
  assert np.abs(a - b).max() > 0.1
  c = np.asarray(gdata.center_view(images, 16))
  np.testing.assert_allclose(c[..., 0], images[:, 2:18, 2:18] / 127.5 - 1, atol=1e-6)


def _table(tmp_path, rows, name="t.csv"):
  path = tmp_path / name
  path.write_text("\n".join(rows) + "\n")
  return str(path)


def _dc(path, key="study_id"):
  return type("DC", (), {"table": path, "table_id": key, "table_label": "grade",
                         "table_columns": ()})()


@pytest.mark.parametrize("rows,fragment", [
    (["study_id,grade,a", "s0,0,1.0"], "1 study_id(s) of the images have no row"),
    (["study_id,grade,a", "s0,0,1", "s1,1,2", "s9,1,2"], "name a study_id with no study"),
    (["study_id,grade,a", "s0,0,x", "s1,1,2"], "column 'a' is not numeric ('x' for study_id s0)"),
    (["study_id,grade,a", "s0,0,", "s1,1,2"], "column 'a' has missing (NaN) values, e.g. for study_id s0"),
    (["study_id,grade,a", "s0,0,1", "s1,3,2"], "column 'grade' must hold classes 0..2"),
    (["id,grade,a", "s0,0,1", "s1,1,2"], "no column 'study_id' (data.table_id)"),
    (["study_id,grade,a", "s0,0,1", "s0,1,2", "s1,1,2"], "repeats ids s0"),
])
def test_table_errors_name_the_file_and_column(tmp_path, rows, fragment):
  path = _table(tmp_path, rows)
  with pytest.raises(DataError) as e:
    tabular.read_table(_dc(path), np.array(["s0", "s1"]), np.array(["p0", "p0"]), 3)
  assert fragment in str(e.value) and path in str(e.value) and "\n" not in str(e.value)


def test_table_keyed_by_patient_is_shared_by_their_studies(tmp_path):
  path = _table(tmp_path, ["patient_id,grade,a,b", "p0,2,1.5,2", "p1,0,3,4"])
  x, y = tabular.read_table(_dc(path, "patient_id"), np.array(["s0", "s1", "s2"]),
                            np.array(["p1", "p0", "p1"]), 3)
  np.testing.assert_array_equal(x, [[3, 4], [1.5, 2], [3, 4]])
  np.testing.assert_array_equal(y, [0, 2, 0])


@pytest.mark.parametrize("overrides,fragment", [
    ({"data.image_size": 64}, "exceeds data.load_size"),
    ({"student_loss.variants": ("ce", "nope")}, "student_loss.variants='nope'"),
    ({"eval.select_on": "train"}, "eval.select_on='train'"),
    ({"student_loss.num_pos": 50}, "exceeds student_loss.num_candidates"),
])
def test_bad_config_fields_are_named(overrides, fragment):
  with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
    validate.validate_config(load_config(TINY, overrides))


def test_dscd_bank_split_over_8_devices_matches_one_device(tmp_path):
  """The student Task declares its banks 'rows': on 8 devices each holds 4 of the 32 rows. The
  DSCD step on such a bank (global contrast indices gathering rows of other devices, the momentum
  update scattering into them) equals the one-device step; checked on a linear student, so only
  small programs compile (the loop's own mesh tests cover the rest of the step)."""
  script = """
import jax, jax.numpy as jnp, numpy as np
from cxrjax.core import mesh as mesh_lib
from cxrjax.core.task import Task, compile_task
from cxrjax.losses import dscd
from cxrjax.models.gmcd import GMCDStudent, GMCDTeacher
from cxrjax.systems.gmcd.student import student_task
teacher = GMCDTeacher(input_dim=6, image_dim=8, tabular_dim=8, fused_dim=8, stage_sizes=(1, 1, 1, 1))
student = GMCDStudent(image_dim=8, embed_dim=8, teacher_dims=(8, 8), stage_sizes=(1, 1, 1, 1))
real = student_task(student, teacher, batch_size=8, image_size=16, bank_rows=32, num_candidates=4,
                    num_pos=2)
optim = dict(name="adam", lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
             weight_decay_mask="all", schedule="constant", warmup_steps=0, grad_clip=0.0)
mesh8 = mesh_lib.create_mesh(devices=jax.devices()[:8])
# The placement the real task's state gets (its initialiser's out_shardings), read without
# compiling that initialiser; the toy task below runs a state placed the same way.
placed = compile_task(real, mesh=mesh8, optim=optim, num_steps=1)
bank = placed.shardings.collections["bank"]["s0"]
shape = placed.abstract_state.collections["bank"]["s0"].shape
assert bank.spec == jax.sharding.PartitionSpec(("data", "fsdp")), bank
assert shape == (32, 8) and bank.shard_shape(shape) == (4, 8)

def init(rng):
  st = dscd.init_state(jax.random.PRNGKey(1), 32, 8)
  return {"params": {"ws": jax.random.normal(rng, (5, 8)), "wt": jax.random.normal(rng, (5, 8))},
          "bank": {"s": st["memory_s"], "t": st["memory_t"]}, "z": {"s": st["z_s"], "t": st["z_t"]}}

def loss(params, batch, ctx):
  bank, z = ctx.state["bank"], ctx.state["z"]
  state = {"memory_s": bank["s"], "memory_t": bank["t"], "z_s": z["s"], "z_t": z["t"]}
  q_s = dscd.l2_normalize(batch["x"] @ params["ws"])
  q_t = dscd.l2_normalize(batch["x"] @ params["wt"])
  value, new, terms = dscd.dscd_loss(q_s, q_t, state, batch["index"], batch["contrast_index"],
                                     num_candidates=4, num_pos=2, num_samples=30.0)
  return value, {"terms": terms, "state": {"bank": {"s": new["memory_s"], "t": new["memory_t"]},
                                           "z": {"s": new["z_s"], "t": new["z_t"]}}}

task = Task("dscd", init, loss=loss, state_sharding=(("bank", "rows"),))
rng = np.random.default_rng(0)
labels = np.arange(30) % 3
def batch():
  idx = rng.permutation(30)[:8]
  contrast = np.stack([np.r_[i, rng.choice(np.flatnonzero(labels == labels[i]), 3),
                             rng.choice(np.flatnonzero(labels != labels[i]), 6)] for i in idx])
  return {"x": rng.normal(size=(8, 5)).astype(np.float32), "index": idx.astype(np.int32),
          "contrast_index": contrast.astype(np.int32)}
batches = [batch() for _ in range(4)]
out = {}
for n in (1, 8):
  mesh = mesh_lib.create_mesh(devices=jax.devices()[:n])
  compiled = compile_task(task, mesh=mesh, optim=optim, num_steps=4)
  state = compiled.init(0)
  for b in batches:
    state, metrics = compiled.step(state, mesh_lib.global_batch(b, mesh), None, None)
  if n == 8:
    assert state.collections["bank"]["s"].addressable_shards[0].data.shape == (4, 8)
  out[n] = jax.device_get((state.collections, state.params, metrics["mean"]))
for a, b in zip(jax.tree.leaves(out[1]), jax.tree.leaves(out[8])):
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
print("ok")
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=600, cwd=ROOT)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_parquet_table_and_its_unreadable_file(tmp_path):
  import pandas as pd
  path = str(tmp_path / "t.parquet")
  pd.DataFrame({"study_id": ["s0", "s1"], "grade": [1, 2], "a": [0.5, 1.5]}).to_parquet(path)
  x, y = tabular.read_table(_dc(path), np.array(["s1", "s0"]), np.array(["p0", "p1"]), 3)
  np.testing.assert_array_equal(x, [[1.5], [0.5]])
  np.testing.assert_array_equal(y, [2, 1])
  bad = tmp_path / "bad.parquet"
  bad.write_text("not parquet")
  with pytest.raises(DataError, match="cannot be read as parquet"):
    tabular.read_table(_dc(str(bad)), np.array(["s0"]), np.array(["p0"]), 3)
