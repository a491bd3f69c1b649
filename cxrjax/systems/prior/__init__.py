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

from cxrjax.core import loop
from cxrjax.core.mesh import check_batch_size, create_mesh
from cxrjax.core.writers import say
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
  say(f"data: {len(labelled)} labelled train, {len(pairs_cxr)} training pairs, "
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

  sampler = PriorSampler.from_config(net, sched, config)
  return evaluation.evaluate(sampler, prior.state.eval_params, teacher, xray, cxr_norm, ctpa_norm,
                             valid, test, config=config, mesh=mesh, workdir=workdir)


