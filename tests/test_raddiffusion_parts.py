"""RadDiffusion's pieces: absent views, the reverse chain, the probe, the fine-tune weights and
the paired comparison."""
import json

import jax
import numpy as np
import pytest

from cxrjax.core.config import load_config
from cxrjax.core.task import StepContext
from cxrjax.evaluate.multilabel import f1_at_half
from cxrjax.systems.raddiffusion import evaluation
from cxrjax.systems.raddiffusion.data import LATERAL, Studies
from cxrjax.systems.raddiffusion.finetune import StudyClassifier, finetune_task, positive_weights
from cxrjax.systems.raddiffusion.pretrain import pretrainer, views_input
from cxrjax.systems.raddiffusion.probe import fit_probe, pixel_features
from launch_util import ROOT

CONFIG = load_config(f"{ROOT}/configs/raddiffusion.py:tiny")


def _batch(seed=0, b=3):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(b, 2, 32, 32), dtype=np.uint8)
  view_mask = np.array([[True, True], [True, False], [True, False]])[:b]
  return {"images": images, "view_mask": view_mask}


@pytest.mark.parametrize("scheme", ["mae", "diffmae"])
def test_an_absent_view_changes_neither_loss_nor_gradient(scheme):
  pt = pretrainer(CONFIG, scheme)
  params = pt.init(jax.random.PRNGKey(0), 2)["params"]
  ctx = StepContext(rng=jax.random.PRNGKey(3), step=np.int32(0), state={})
  grad = jax.jit(jax.value_and_grad(lambda p, b: pt.loss(p, b, ctx)[0]))
  a = _batch()
  b = {**a, "images": a["images"].copy()}
  b["images"][1, 1] = 255 - b["images"][1, 1]  # the absent view of study 1
  (la, ga), (lb, gb) = grad(params, a), grad(params, b)
  assert float(la) == float(lb)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  c = {**a, "images": a["images"].copy()}
  c["images"][0, 1] = 255 - c["images"][0, 1]  # a present view does count
  assert float(grad(params, c)[0]) != float(la)


def test_reverse_chain_keeps_visible_patches_and_stays_in_range():
  pt = pretrainer(CONFIG, "diffmae")
  params = pt.init(jax.random.PRNGKey(0), 2)["params"]
  batch = _batch()
  frames = np.asarray(pt.chain(params, batch["images"], batch["view_mask"], jax.random.PRNGKey(5), 4))
  assert frames.shape == (4, 3, 2, 32, 32)
  assert frames.min() >= 0 and frames.max() <= 1
  pictures = pt.reconstruct(params, batch["images"], batch["view_mask"], jax.random.PRNGKey(5))
  visible = np.asarray(pictures["masked"]) > 0  # the same masks: fold_in(rng, 0) in both
  np.testing.assert_allclose(frames[-1][visible], (batch["images"] / 255.0)[visible], atol=1e-6)
  assert 0.3 < visible.mean() < 0.7  # mask ratio 0.5 (xs)


def test_probe_matches_sklearn_and_skips_one_class_labels():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(80, 6)).astype(np.float32)
  y = np.zeros((80, 14), np.float32)
  y[:, 0] = x[:, 0] > 0
  y[:, 1] = x[:, 1] + 0.5 * rng.normal(size=80) > 0
  y[:40, 2] = 1  # Consolidation: only positives in the probe-train half; Edema: never positive
  out = fit_probe(x[:40], y[:40], x[40:], y[40:], max_iter=200)
  assert out["auroc"]["Atelectasis"] > 0.9 and 0.6 < out["auroc"]["Cardiomegaly"] <= 1
  assert "Consolidation" in out["skipped"] and "Edema" in out["skipped"]
  assert np.isnan(out["scores"][:, 2]).all()
  assert out["macro_auroc"] == pytest.approx(np.mean(list(out["auroc"].values())))


def test_pixel_features_are_block_means_with_absent_views_zero():
  images = np.zeros((2, 2, 4, 4), np.uint8)
  images[0, 0, :2, :2] = 255  # the top-left block of study 0's frontal
  images[0, 0, 0, 3] = 51  # one pixel of its top-right block (row 0, column 1): mean 51 / 4 / 255
  images[0, 1] = 102  # a present lateral
  images[1, 1] = 204  # an absent lateral: must not count
  studies = Studies(images, np.array([[True, True], [True, False]]),
                    np.array([[0, LATERAL], [0, LATERAL]]), np.zeros((2, 14), np.float32))
  f = pixel_features(studies, 2)
  assert f.shape == (2, 8) and f.dtype == np.float32
  np.testing.assert_allclose(f[0], [1, 0.05, 0, 0, 0.4, 0.4, 0.4, 0.4], rtol=1e-6)
  np.testing.assert_array_equal(f[1], np.zeros(8))
  frontal = pixel_features(studies.frontal_only(), 2)  # the lateral masked out: its slot is zeros
  np.testing.assert_array_equal(frontal[:, 4:], 0)
  np.testing.assert_array_equal(frontal[:, :4], f[:, :4])
  with pytest.raises(ValueError, match="pixel_grid=3"):
    pixel_features(studies, 3)


def test_positive_weights_and_f1_known_answers():
  labels = np.zeros((100, 14), np.float32)
  labels[:25, 0] = 1
  labels[:4, 1] = 1
  w = positive_weights(labels)
  np.testing.assert_allclose(w[:3], [2.0, 5.0, 1.0])
  probs = np.zeros((4, 14), np.float32)
  probs[:, 0] = [0.9, 0.8, 0.1, 0.2]
  f1 = f1_at_half(np.array([[1], [0], [1], [0]], np.float32).repeat(14, 1), probs)
  assert f1["per_label"][0] == pytest.approx(0.5)  # tp 1, fp 1, fn 1


def test_head_norm_standardises_the_study_cls_over_the_batch_and_keeps_running_statistics():
  encoder = pretrainer(CONFIG, "mae").encoder
  model = StudyClassifier(encoder, head_norm=True)
  task = finetune_task(model, 32, 2)
  variables = task.init(jax.random.PRNGKey(0))
  assert set(variables) == {"params", "batch_stats"}
  batch = {**_batch(b=3), "labels": np.eye(3, 14, dtype=np.float32)}
  x, mask = views_input(batch["images"]), batch["view_mask"]
  cls = np.asarray(encoder.apply({"params": variables["params"]["encoder"]}, x, mask)[1]["cls"],
                   np.float64)
  head = {k: np.asarray(v, np.float64) for k, v in variables["params"]["head"].items()}
  mean, var = cls.mean(axis=0), cls.var(axis=0)
  # Training: batch statistics (biased variance, eps 1e-6), then the head.
  logits, _ = model.apply(variables, x, mask, train=True, mutable=["batch_stats"])
  expected = (cls - mean) / np.sqrt(var + 1e-6) @ head["kernel"] + head["bias"]
  np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-4)
  # The loss hands the loop running statistics moved 10 % towards the batch's.
  ctx = StepContext(rng=jax.random.PRNGKey(1), step=np.int32(0),
                    state={"batch_stats": variables["batch_stats"]},
                    frozen={"pos_weight": np.ones(14, np.float32)})
  _, aux = task.loss(variables["params"], batch, ctx)
  stats = aux["state"]["batch_stats"]["head_norm"]
  np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-4, atol=1e-7)
  # (Flax keeps the batch's biased variance, torch the unbiased one: a 1/(B-1) difference.)
  np.testing.assert_allclose((np.asarray(stats["var"], np.float64) - 0.9) / 0.1, var, rtol=0.02,
                             atol=2e-6)  # float32 resolution at 0.9
  # Evaluation reads the running statistics, not the batch's.
  evaluated = model.apply({"params": variables["params"], "batch_stats": aux["state"]["batch_stats"]},
                          x, mask)
  expected = ((cls - stats["mean"]) / np.sqrt(np.asarray(stats["var"]) + 1e-6) @ head["kernel"]
              + head["bias"])
  np.testing.assert_allclose(evaluated, expected, rtol=1e-3, atol=1e-4)
  # Without the norm the head reads the study CLS itself, and there is no 'batch_stats'.
  plain = finetune_task(StudyClassifier(encoder), 32, 2).init(jax.random.PRNGKey(0))
  assert set(plain) == {"params"}


def test_paired_difference_of_a_model_with_itself_is_zero_and_detects_a_gap():
  rng = np.random.default_rng(1)
  y = (rng.uniform(size=(200, 3)) < 0.3).astype(np.float32)
  good = y + 0.5 * rng.normal(size=y.shape)
  noise = rng.normal(size=y.shape)
  same = evaluation.paired_difference(y, good, good, n_resamples=200, alpha=0.05, seed=0)
  assert same["value"] == 0 and same["lo"] == 0 and same["hi"] == 0
  gap = evaluation.paired_difference(y, good, noise, n_resamples=200, alpha=0.05, seed=0)
  assert gap["lo"] > 0.2 and gap["labels"] == 3


def test_probe_curve_keeps_the_last_value_per_step(tmp_path):
  (tmp_path / "pretrain_mae").mkdir()
  rows = [{"step": 3, "eval/probe_macro_auroc": 0.6}, {"step": 3, "loss": 1.0},
          {"step": 6, "eval/probe_macro_auroc": 0.7}, {"step": 6, "eval/probe_macro_auroc": 0.72}]
  (tmp_path / "pretrain_mae" / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
  assert evaluation.probe_curve(str(tmp_path), "pretrain_mae") == [(3, 0.6), (6, 0.72)]


def test_frontal_only_masks_the_lateral_views():
  views = np.array([[0, LATERAL], [1, -1]], np.int32)
  s = Studies(np.zeros((2, 2, 4, 4), np.uint8), np.array([[True, True], [True, False]]), views,
              np.zeros((2, 14), np.float32))
  np.testing.assert_array_equal(s.frontal_only().view_mask, [[True, False], [True, False]])


@pytest.mark.parametrize("norm_pix", [False, True])
def test_pretraining_targets_are_raw_or_standardised_pixels(norm_pix):
  config = load_config(f"{ROOT}/configs/raddiffusion.py:tiny")
  config.model.norm_pix_loss = norm_pix
  pt = pretrainer(config, "mae")
  params = pt.init(jax.random.PRNGKey(0), 2)["params"]
  batch, rng = _batch(b=2), jax.random.PRNGKey(7)
  pred, mask, x = (np.asarray(a, np.float64) for a in pt.forward(params, batch["images"],
                                                                 batch["view_mask"], rng))
  p = config.model.patch_size
  g = x.shape[2] // p  # numpy patchify: (B, V, g, p, g, p, 1) -> (B, V, g*g, p*p)
  target = x[..., 0].reshape(2, 2, g, p, g, p).transpose(0, 1, 2, 4, 3, 5).reshape(2, 2, g * g, p * p)
  if norm_pix:
    target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
  weight = mask * batch["view_mask"][..., None]
  expected = (((pred - target) ** 2).mean(-1) * weight).sum() / weight.sum()
  value = pt.loss(params, batch, StepContext(rng=rng, step=np.int32(0), state={}))[0]
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)

