"""GMCD (seed 002, spec gmcd.md): a low-rank multimodal teacher distilled into an image-only
student with DSCD and GKM, cross-validated over patient-level folds.

`run(config, workdir)`: the cohort (data.py; phantoms rendered on first use), the k folds, then per
fold (core.replicas, each fold a resumable sub-run):
  teacher_fold<k>              stage 1 (teacher.py): image + tabular teacher, EMA, prediction KD,
                               M3LR, L1; the best checkpoint on the selection rows (fused accuracy,
                               the seed's criterion)
  student_<variant>_fold<k>    stage 2 (student.py) per ablation variant ('ce', 'kd', 'dscd',
                               'dscd_gkm'): the same seed and batches, the frozen teacher; the best
                               checkpoint by the seed's mean of AUC, AP, F1, F1-top on the selection rows
then evaluation.py on each fold's test rows -> results.json, results.md (the ablation, per fold,
the paired comparison of GMCD against the CE-only student), folds.png, gkm_weights.png.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core import mesh as mesh_lib
from cxrjax.core.predict import sharded_map
from cxrjax.core.replicas import replicas, run_replicas
from cxrjax.core.stage import Run
from cxrjax.core.writers import say
from cxrjax.evaluate.report import evaluation_dir, write_results_files
from cxrjax.models.gmcd import GMCDStudent, GMCDTeacher
from cxrjax.systems.gmcd import data as gdata
from cxrjax.systems.gmcd import evaluation
from cxrjax.systems.gmcd.student import predict_fn as student_predict
from cxrjax.systems.gmcd.student import student_task, variant_weights
from cxrjax.systems.gmcd.teacher import EMA, teacher_task
from cxrjax.systems.gmcd.teacher import predict_fn as teacher_predict
from cxrjax.systems.gmcd.validate import validate_config

__all__ = ["run", "validate_config", "models"]

HEAD_METHODS = ("teacher", "image_head", "tabular_head")  # the order of teacher_predict's heads


def models(config) -> tuple[GMCDTeacher, GMCDStudent]:
  """The teacher and the student of config.model (explicit fields, no ConfigDict inside)."""
  m = config.model
  stages = tuple(int(n) for n in m.stage_sizes)
  teacher = GMCDTeacher(input_dim=m.input_dim, image_dim=m.feature_dim, tabular_dim=m.feature_dim,
                        fused_dim=m.feature_dim, num_classes=m.num_classes, dropout_rate=m.dropout,
                        stage_sizes=stages)
  student = GMCDStudent(image_dim=m.feature_dim, num_classes=m.num_classes,
                        embed_dim=m.feature_dim, teacher_dims=(m.feature_dim, m.feature_dim),
                        stage_sizes=stages)
  return teacher, student


def _pretrained(config) -> dict | None:
  """The ImageNet backbone grafted into both image branches (model.pretrained, a local torchvision
  state dict), or None: nothing is downloaded."""
  if not config.model.pretrained:
    return None
  from cxrjax.models.resnet_convert import load_resnet
  _, variables = load_resnet(config.model.pretrained, num_classes=None,
                             stage_sizes=tuple(config.model.stage_sizes))
  return {"params/image/backbone": variables["params"],
          "batch_stats/image/backbone": variables["batch_stats"]}


def run(config, workdir: str) -> dict:
  """Runs (or resumes) every fold's stages; returns the results dict written to results.json."""
  validate_config(config)
  job = Run.start(config, workdir, {"teacher.batch_size": config.teacher.batch_size,
                                    "student.batch_size": config.student.batch_size})
  dc, ec, tl, sl = config.data, config.eval, config.teacher_loss, config.student_loss
  cohort = gdata.load_cohort(dc, workdir, config.model.num_classes, config.model.input_dim)
  candidates = 1 if sl.kind == "crd" else sl.num_candidates
  folds = gdata.make_folds(cohort, ec.folds, seed=config.seed, val_fraction=dc.val_fraction,
                           select_on=ec.select_on, num_candidates=candidates)
  teacher, student = models(config)
  batch = config.teacher.batch_size
  devices = mesh_lib.batch_devices(job.mesh)
  # One bank size for every fold (one compiled step); rows split evenly over the devices.
  bank_rows = math.ceil(max(len(f.train) for f in folds) / devices) * devices
  t_task = teacher_task(teacher, batch_size=batch, load_size=dc.load_size, image_size=dc.image_size,
                        n_views=tl.n_views, kd_weight=tl.kd_weight, lambda_reg=tl.lambda_reg,
                        m3lr_weight=tl.m3lr_weight, lambda_global=tl.lambda_global,
                        rotate=tl.rotate)
  s_task = student_task(student, teacher, batch_size=batch, image_size=dc.image_size,
                        bank_rows=bank_rows, kind=sl.kind, num_candidates=candidates,
                        num_pos=sl.num_pos, temperature=sl.temperature, momentum=sl.momentum,
                        kd_t=sl.kd_t, gkm_threshold=sl.gkm_threshold, gkm_momentum=sl.gkm_momentum)
  contrast = (candidates, sl.num_negatives, "exact" if sl.kind == "crd" else "multi_pos")
  graft = _pretrained(config)
  fp = {"data": dc.to_dict(), "seed": config.seed, "folds": ec.folds, "select_on": ec.select_on,
        "pretrained": config.model.pretrained}
  defines = {"model": config.model}
  t_predict = teacher_predict(teacher, dc.image_size)
  s_predict = student_predict(student, dc.image_size)

  def log_probs(fn, variables, rows, fold):
    arrays = {"image": cohort.images[rows], "tabular": fold.tabular[rows]}
    keep = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    return sharded_map(fn, arrays, job.mesh, batch_size=ec.batch_size, params=keep)

  def one_fold(rep) -> dict:
    fold = folds[rep.key]
    labels = {"val": cohort.labels[fold.val], "test": cohort.labels[fold.test]}
    say(f"[fold {rep.key}] {len(fold.train)} training, {len(fold.val)} selection "
        f"({ec.select_on}), {len(fold.test)} test studies")

    def teacher_metrics(variables, split) -> dict:
      lp = log_probs(t_predict, variables, getattr(fold, split), fold)
      return {m: evaluation.classification_metrics(labels[split], lp[:, i])
              for i, m in enumerate(HEAD_METHODS)}

    def evaluate_teacher(state) -> dict:
      by_head = teacher_metrics(jax.device_get(state.variables()), "val")
      return {f"{h}_{k}": v for h, ms in by_head.items() for k, v in ms.items()}

    result = job.stage(t_task, gdata.FoldBatches(cohort, fold, batch, seed=rep.seed),
                       config.teacher, seed=rep.seed, name=rep.stage("teacher"),
                       parent=rep.fingerprint(fp), defines={**defines, "loss": tl},
                       evaluate=evaluate_teacher, best=("teacher_acc", "max"), ema=EMA, graft=graft)
    t_vars = result.variables()
    out = {m: {**v, "best_step": result.best_step} for m, v in teacher_metrics(t_vars, "test").items()}
    frozen_teacher = {"params": t_vars["params"], "batch_stats": t_vars["batch_stats"]}

    def evaluate_student(state) -> dict:
      lp = log_probs(s_predict, jax.device_get(state.variables()), fold.val, fold)
      return evaluation.classification_metrics(labels["val"], lp)

    for variant in sl.variants:
      frozen = {"teacher": frozen_teacher, "weights": variant_weights(variant, sl.alpha, sl.beta),
                "num_samples": jnp.float32(len(fold.train))}
      batches = gdata.FoldBatches(cohort, fold, batch, seed=rep.seed + 1, contrast=contrast)
      res = job.stage(s_task, batches, config.student, seed=rep.seed + 1,
                      name=rep.stage(f"student_{variant}"), parent=result.fingerprint,
                      defines={**defines, "loss": sl, "variant": variant},
                      evaluate=evaluate_student, best=("select", "max"), ema=EMA, frozen=frozen,
                      graft=graft)
      lp = log_probs(s_predict, res.variables(), fold.test, fold)
      out[f"student_{variant}"] = {**evaluation.classification_metrics(labels["test"], lp),
                                   "best_step": res.best_step}
    say(f"[fold {rep.key}] test micro AUC: " + ", ".join(
        f"{m} {v['auc']:.3f}" for m, v in out.items()))
    return out

  by_fold = run_replicas(replicas("fold", range(ec.folds), seed=config.seed), one_fold)
  per_fold = {m: {f: by_fold[f][m] for f in by_fold} for m in by_fold[0]}
  results = {"config": config.to_dict(), "per_fold": per_fold,
             "summary": evaluation.summarize(per_fold),
             "counts": {"studies": len(cohort), "patients": int(len(set(cohort.patients))),
                        "classes": np.bincount(cohort.labels, minlength=cohort.num_classes).tolist(),
                        "folds": {f.index: {"train": len(f.train), "val": len(f.val),
                                            "test": len(f.test)} for f in folds}}}
  if "student_dscd_gkm" in per_fold and "student_ce" in per_fold:
    results["paired"] = evaluation.paired(per_fold, "student_dscd_gkm", "student_ce")
    results["verdict"] = evaluation.verdict(results["paired"])
  if "dscd_gkm" in sl.variants:
    results["gkm_weights"] = {f: evaluation.gkm_weights(workdir, f"student_dscd_gkm_fold{f}")
                              for f in range(ec.folds)}
  out_dir = evaluation_dir(workdir, config.to_dict(), ("eval",))
  text = "\n\n".join([f"# GMCD on {dc.builder} ({config.variant})",
                      f"Studies: {results['counts']['studies']} of {results['counts']['patients']} "
                      f"patients, classes {results['counts']['classes']}; {ec.folds} folds, model "
                      f"selection on the {ec.select_on} rows.", evaluation.tables(results)])
  if jax.process_index() == 0:
    evaluation.plot_folds(per_fold, os.path.join(out_dir, "folds.png"))
    if "gkm_weights" in results:
      evaluation.plot_gkm(results["gkm_weights"], os.path.join(out_dir, "gkm_weights.png"))
    write_results_files(out_dir, results, text)
  say("\n" + text + f"\n\nresults: {os.path.join(out_dir, 'results.json')}")
  return results
