"""RadDiffusion (seed 004, spec D): a multi-view ViT with a bottleneck-CLS token, pretrained by MAE
and by diffusion-MAE, probed during pretraining, fine-tuned.

`run(config, workdir)` executes the stages, each resuming from its own checkpoint:
  1. data             multi-view studies (phantoms rendered on first use); probe-train, validation
                      and test studies read once
  2. pretrain_mae     the encoder + MAE decoder; every pretrain.eval_every steps a linear probe of
  3. pretrain_diffmae the study features on validation (the probing curve) and reconstructions
  4. probes           the final probe of the random, MAE and diffusion-MAE encoders on test, with
                      and without the lateral views, and of block-averaged pixels (no encoder);
                      each minus random, paired bootstrap CI
  5. finetune_<init>  each encoder fine-tuned with a linear head (early stopping on val_loss)
  6. results          results.json / results.md, probe_curve.png, reconstructions.png,
                      diffusion_chain.png
"""
from __future__ import annotations

import os

import jax
import numpy as np

from cxrjax.core.stage import Run
from cxrjax.core.writers import say
from cxrjax.data.pipeline import StudyPipeline
from cxrjax.evaluate.figures import image_rows
from cxrjax.evaluate.multilabel import f1_at_half, macro, per_label
from cxrjax.evaluate.report import evaluation_dir, write_results_files
from cxrjax.losses.classification import masked_sigmoid_bce
from cxrjax.systems.raddiffusion import data as rdata
from cxrjax.systems.raddiffusion import evaluation
from cxrjax.systems.raddiffusion.finetune import (StudyClassifier, finetune_task, positive_weights,
                                                  predict_logits)
from cxrjax.systems.raddiffusion.pretrain import SCHEMES, chain, pretrainer, reconstruct
from cxrjax.systems.raddiffusion.probe import fit_probe, pixel_features, study_features
from cxrjax.systems.raddiffusion.validate import validate_config

__all__ = ["run", "validate_config"]

SEED_OFFSETS = {"mae": 1, "diffmae": 2, "random": 3}


def run(config, workdir: str) -> dict:
  """Runs (or resumes) every stage; returns the results dict written to results.json."""
  validate_config(config)
  job = Run.start(config, workdir, {"pretrain.batch_size": config.pretrain.batch_size,
                                    "finetune.batch_size": config.finetune.batch_size})
  mesh, dc, ec = job.mesh, config.data, config.eval
  sources = dict(zip(("train", "valid", "test"), rdata.open_dataset(dc, workdir).values()))
  probe_train = rdata.load_studies(sources["train"], dc, seed=config.seed,
                                   limit=dc.probe_train_studies, name="probe-train")
  valid = rdata.load_studies(sources["valid"], dc, seed=config.seed, name="validation")
  test = rdata.load_studies(sources["test"], dc, seed=config.seed, name="test")
  fp = {"data": dc.to_dict(), "seed": config.seed}
  # pixel_grid shapes only the final tables, not a stage: left out so changing it retrains nothing.
  probe_fields = {k: v for k, v in config.probe.items() if k != "pixel_grid"}
  defines = {"model": config.model, "diffusion": config.diffusion, "probe": probe_fields}

  def fit(f_train, train, f_target, target) -> dict:
    return fit_probe(f_train, train.labels, f_target, target.labels,
                     max_iter=config.probe.max_iter, seed=config.seed,
                     standardize=config.probe.standardize)

  def probe(encoder, params, train, target) -> dict:
    def features(studies):
      return study_features(encoder, params, studies, mesh, config.probe.batch_size)
    return fit(features(train), train, features(target), target)

  # 2-3. pretraining, MAE and diffusion-MAE, with the probing curve.
  trainers = {s: pretrainer(config, s) for s in SCHEMES}
  encoder = trainers["mae"].encoder
  params = {}
  shown = valid.take(np.arange(min(2, len(valid))))
  for scheme, pt in trainers.items():
    def evaluate(state, pt=pt) -> dict:
      result = probe(encoder, state.params["encoder"], probe_train, valid)
      pictures = reconstruct(pt, state.params, shown.images, shown.view_mask, jax.random.PRNGKey(1))
      grid = np.concatenate([shown.images[:, :, None] / 255.0, np.asarray(pictures["masked"])[:, :, None],
                             np.asarray(pictures["recon"])[:, :, None]], axis=2)
      return {"probe_macro_auroc": result["macro_auroc"],
              "reconstruction": grid.reshape(-1, *grid.shape[-2:])}

    batches = rdata.StudyBatches(StudyPipeline(sources["train"], rdata.pipeline_config(
        dc, config.pretrain.batch_size, config.seed + SEED_OFFSETS[scheme], train=True)))
    result = job.stage(pt.task(f"pretrain_{scheme}", dc.max_views), batches, config.pretrain,
                       seed=config.seed + SEED_OFFSETS[scheme], parent=fp,
                       defines={**defines, "scheme": scheme}, evaluate=evaluate)
    params[scheme] = result.variables()["params"]
  params["random"] = jax.device_get(trainers["mae"].init(
      jax.random.PRNGKey(config.seed + SEED_OFFSETS["random"]), dc.max_views)["params"])

  # 4. the final probes on test, all views and frontal only, and the pixel reference.
  out_dir = evaluation_dir(workdir, config.to_dict(), ("eval", "probe"))
  probes, multi_view = {}, {}

  def readout(name, studies):
    if name == "pixels":  # the reference without an encoder
      return pixel_features(studies, config.probe.pixel_grid)
    return study_features(encoder, params[name]["encoder"], studies, mesh, config.probe.batch_size)

  frontal_train, frontal_test = probe_train.frontal_only(), test.frontal_only()
  for name in evaluation.PROBED:
    result = fit(readout(name, probe_train), probe_train, readout(name, test), test)
    frontal = fit(readout(name, frontal_train), frontal_train, readout(name, frontal_test),
                  frontal_test)
    scored = np.isfinite(result["scores"])  # labels the probe skipped are left out of the macro
    probes[name] = {"scores": result["scores"], "auroc": result["auroc"],
                    "skipped": result["skipped"],
                    "macro": macro(np.where(scored, test.labels, np.nan),
                                   np.nan_to_num(result["scores"]), n_resamples=ec.n_bootstrap,
                                   alpha=ec.alpha, seed=ec.seed)["auroc"]}
    multi_view[name] = {"all": result["macro_auroc"], "frontal": frontal["macro_auroc"]}
    say(f"[probe] {name}: test macro AUROC {result['macro_auroc']:.3f} (frontal only "
        f"{frontal['macro_auroc']:.3f}); skipped labels: {result['skipped'] or 'none'}")
  for name in ("mae", "diffmae", "pixels"):
    probes[name]["minus_random"] = evaluation.paired_difference(
        test.labels, probes[name]["scores"], probes["random"]["scores"], n_resamples=ec.n_bootstrap,
        alpha=ec.alpha, seed=ec.seed)

  # 5. fine-tuning of each encoder.
  finetuned = {}
  model = StudyClassifier(encoder, mask_ratio=trainers["mae"].mask_ratio
                          if config.model.finetune_masking else 0.0,
                          head_norm=config.model.finetune_head_norm)
  task = finetune_task(model, dc.image_size, dc.max_views)
  pos_weight = positive_weights(probe_train.labels)
  for name in evaluation.ENCODERS:
    def evaluate(state) -> dict:
      logits = predict_logits(model, jax.device_get(state.variables()), valid, mesh, ec.batch_size)
      loss = masked_sigmoid_bce(logits, valid.labels, pos_weight)
      return {"val_loss": float(loss)}

    batches = rdata.StudyBatches(StudyPipeline(sources["train"], rdata.pipeline_config(
        dc, config.finetune.batch_size, config.seed + 10 + SEED_OFFSETS[name], train=True)))
    result = job.stage(task, batches, config.finetune, seed=config.seed + 10 + SEED_OFFSETS[name],
                       name=f"finetune_{name}", parent=fp, defines={**defines, "init": name},
                       evaluate=evaluate, best=("val_loss", "min"),
                       graft={"params/encoder": params[name]["encoder"]},
                       frozen={"pos_weight": pos_weight})
    logits = predict_logits(model, result.variables(), test, mesh, ec.batch_size)
    probs = 1.0 / (1.0 + np.exp(-logits))
    kw = dict(n_resamples=ec.n_bootstrap, alpha=ec.alpha, seed=ec.seed)
    finetuned[name] = {"per_label": per_label(test.labels, probs, **kw),
                       "macro": macro(test.labels, probs, **kw),
                       "f1": f1_at_half(test.labels, probs),
                       "best_step": int(result.best_step), "stopped_at": result.stopped_at}

  # 6. results and figures.
  curve = {s: evaluation.probe_curve(workdir, f"pretrain_{s}") for s in SCHEMES}
  # The curve's floor on the curve's own split (validation), not the test split of the tables.
  curve_floor, curve_pixels = (
      fit(readout(name, probe_train), probe_train, readout(name, valid), valid)["macro_auroc"]
      for name in ("random", "pixels"))
  results = {"config": config.to_dict(), "alpha": ec.alpha,
             "counts": {"probe_train": len(probe_train), "validation": len(valid), "test": len(test)},
             "probe": {k: {kk: vv for kk, vv in v.items() if kk != "scores"} for k, v in probes.items()},
             "multi_view": multi_view, "finetune": finetuned, "probe_curve": curve,
             "probe_curve_random": curve_floor, "probe_curve_pixels": curve_pixels}
  text = "\n\n".join([f"# RadDiffusion on {dc.builder} ({config.variant})",
                      f"Studies: {results['counts']}.", evaluation.tables(results)])
  if jax.process_index() == 0:
    _figures(trainers, params, test, config, out_dir, curve, curve_floor, curve_pixels)
    write_results_files(out_dir, results, text)
  say("\n" + text + f"\n\nresults: {os.path.join(out_dir, 'results.json')}")
  return results


def _figures(trainers, params, test, config, out_dir: str, curve: dict, floor: float,
             pixels: float) -> None:
  """probe_curve.png, reconstructions.png (original / masked / MAE / diffusion-MAE, both views of
  the first two-view test studies) and diffusion_chain.png (the reverse chain, D.6.7)."""
  evaluation.plot_probe_curve(curve, floor, os.path.join(out_dir, "probe_curve.png"), pixels)
  two = np.flatnonzero(test.view_mask.sum(axis=1) == test.view_mask.shape[1])[:2]
  shown = test.take(two if two.size else np.arange(min(2, len(test))))
  key = jax.random.PRNGKey(config.seed)
  mae = reconstruct(trainers["mae"], params["mae"], shown.images, shown.view_mask, key)
  frames = np.asarray(chain(trainers["diffmae"], params["diffmae"], shown.images, shown.view_mask,
                            key, config.eval.chain_steps))
  flat = lambda x: np.asarray(x).reshape(-1, *np.shape(x)[-2:])  # (B, V, S, S) -> (B V, S, S)
  image_rows({"original": flat(shown.images / 255.0), "masked": flat(mae["masked"]),
                        "MAE": flat(mae["recon"]), "diffusion-MAE": flat(frames[-1])},
                       os.path.join(out_dir, "reconstructions.png"),
                       "Test studies, every view (columns); the same masks for both schemes")
  picks = np.unique(np.linspace(0, len(frames) - 1, 6).round().astype(int))
  image_rows({f"step {i + 1}/{len(frames)}": frames[i, 0] for i in picks},
                       os.path.join(out_dir, "diffusion_chain.png"),
                       "Diffusion-MAE reverse chain of the first study (a reconstruction: it starts "
                       "from the true image and its patch statistics, as the seed's)")
