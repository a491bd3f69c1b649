"""CXR->CTPA knowledge distillation with a latent diffusion prior (seed 000).

`run(config, workdir)` executes the four stages; each resumes from its own checkpoint:
  1. ctpa_only  - the CTPA teacher head h on real CTPA embeddings (labelled train rows)
  2. xray_only  - the X-ray-only baseline head on CXR embeddings
  3. prior      - the diffusion prior on CXR/CTPA pairs (labelled + unlabelled)
  4. evaluation - h(prior(CXR)) on the test set vs both heads -> results.json, table, roc.png
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from cxrjax.core import loop
from cxrjax.core.mesh import check_batch_size, create_mesh
from cxrjax.data import paired_embeddings
from cxrjax.data.normalize import fit_normalizer
from cxrjax.systems.prior import evaluation
from cxrjax.systems.prior.classifier import train_head
from cxrjax.systems.prior.diffusion_prior import PriorSampler, train_prior
from cxrjax.systems.prior.validate import validate_config


def load_data(config):
  """Loads and validates the paired embeddings named by config.data."""
  data = paired_embeddings.load(config.data.to_dict())
  paired_embeddings.validate(data)
  return data


def run(config, workdir: str) -> dict:
  """Runs (or resumes) all stages and returns the results dict written to results.json."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = create_mesh(**config.mesh)
  for what, size in (("classifier_train.batch_size", config.classifier_train.batch_size),
                     ("train.batch_size", config.train.batch_size)):
    check_batch_size(size, mesh, what)
  data = load_data(config)
  train, valid, test = data["train"], data["valid"], data["test"]
  labelled = train.labelled()
  if "unlabelled" in data:
    pairs_cxr = np.concatenate([train.cxr, data["unlabelled"].cxr])
    pairs_ctpa = np.concatenate([train.ctpa, data["unlabelled"].ctpa])
    pairs_label = np.concatenate([train.label, data["unlabelled"].label])
  else:
    pairs_cxr, pairs_ctpa, pairs_label = train.cxr, train.ctpa, train.label
  _print(f"data: {len(labelled)} labelled train, {len(pairs_cxr)} training pairs, "
         f"{len(valid)} valid, {len(test)} test; CXR dim {train.cxr.shape[1]}, "
         f"CTPA dim {train.ctpa.shape[1]}; {mesh.devices.size} device(s), "
         f"{jax.process_count()} process(es)")

  # Normalisers are fitted on all training pairs (no labels needed) and saved with the run.
  kind = config.data.normalize
  cxr_norm = fit_normalizer(kind, pairs_cxr)
  ctpa_norm = fit_normalizer(kind, pairs_ctpa)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "normalizers.json"), "w") as f:
      json.dump({"cxr": cxr_norm.to_json(), "ctpa": ctpa_norm.to_json()}, f, indent=2)

  data_fp = {"data": config.data.to_dict(), "seed": config.seed}
  head_fp = {**data_fp, "classifier": config.classifier.to_dict(),
             "train": config.classifier_train.to_dict()}
  teacher = train_head("ctpa_only", labelled.ctpa, labelled.label, valid.ctpa, valid.label,
                       config=config, mesh=mesh, workdir=workdir, fingerprint=head_fp)
  xray = train_head("xray_only", labelled.cxr, labelled.label, valid.cxr, valid.label,
                    config=config, mesh=mesh, workdir=workdir, fingerprint=head_fp)

  init_params = None
  if config.init_from:
    init_params, _ = loop.restore_params(config.init_from)
  prior_fp = {**head_fp, "prior": config.prior.to_dict(), "diffusion": config.diffusion.to_dict(),
              "loss": config.loss.to_dict(), "prior_train": config.train.to_dict(),
              "init_from": config.init_from}
  pairs = {"cxr": cxr_norm.apply(pairs_cxr).astype(np.float32),
           "ctpa": ctpa_norm.apply(pairs_ctpa).astype(np.float32),
           "label": pairs_label.astype(np.float32)}
  net, sched, prior = train_prior(pairs, teacher, ctpa_norm, config=config, mesh=mesh,
                                  workdir=workdir, fingerprint=prior_fp, init_params=init_params)

  sc = config.sampling
  _print(f"[evaluation] sampling {sc.num_samples} CTPA embedding(s) per validation and test CXR "
         f"({sc.steps} {'DDPM' if sc.steps == config.diffusion.timesteps else 'DDIM'} steps, "
         f"best of {sc.best_of})")
  sampler = PriorSampler.from_config(net, sched, config)
  params = prior.state.eval_params
  gen = {name: sampler.generate(params, cxr_norm.apply(split.cxr), mesh)
         for name, split in (("valid", valid), ("test", test))}
  probs = {}
  for name, split in (("valid", valid), ("test", test)):
    n, k, d = gen[name].shape
    # The distilled prediction averages the teacher over the prior's samples: a Monte Carlo
    # estimate of E[h(CTPA) | CXR] (one sample when num_samples=1, as in the seed).
    distilled = teacher.predict_proba(np.asarray(ctpa_norm.invert(gen[name].reshape(n * k, d))), mesh)
    probs[name] = {
        "ctpa_only": teacher.predict_proba(split.ctpa, mesh),
        "xray_only": xray.predict_proba(split.cxr, mesh),
        "distilled": distilled.reshape(n, k).mean(axis=1),
    }
  ec = config.eval
  rows = [evaluation.model_row(m, (valid.label, probs["valid"][m]), (test.label, probs["test"][m]),
                               n_bootstrap=ec.n_bootstrap, seed=ec.seed)
          for m in ("ctpa_only", "xray_only", "distilled")]
  cosine = evaluation.cosine_summary(cxr_norm.apply(test.cxr), ctpa_norm.apply(test.ctpa),
                                     gen["test"][:, 0])
  if jax.process_index() == 0:
    np.savez(os.path.join(workdir, "generated_test.npz"), generated=gen["test"][:, 0],
             samples=gen["test"], ids=test.ids,
             label=test.label, **{f"prob_{k}": v for k, v in probs["test"].items()})
  table = evaluation.write_results(
      workdir, rows, config_dict=config.to_dict(), n_test=len(test), n_valid=len(valid),
      cosine=cosine, curves={m: (test.label, probs["test"][m]) for m in probs["test"]})
  _print(f"\nPE classification on the test set (n={len(test)}), thresholds by Youden's J on "
         f"validation; AUC with 95% bootstrap CI ({ec.n_bootstrap} resamples):\n\n{table}\n\n"
         f"results: {os.path.join(workdir, 'results.json')}  ROC: {os.path.join(workdir, 'roc.png')}")
  if jax.process_index() != 0:
    return {"rows": rows}
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def _print(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)
  logging.info(msg)
