"""CXR->CTPA knowledge distillation with a latent diffusion prior (seed 000).

`run(config, workdir)` executes the four stages; each resumes from its own checkpoint:
  1. ctpa_only  - the CTPA teacher head h on real CTPA embeddings (labelled train rows)
  2. xray_only  - the X-ray-only baseline head on CXR embeddings
  3. prior      - the diffusion prior on CXR/CTPA pairs (labelled + unlabelled)
  4. evaluation - h(prior(CXR)) on the test set vs both heads and two linear references ->
                  results.json, table, roc.png
With curve.labelled set, the job then runs again at every size of the label-efficiency curve
(systems/prior/curve.py) and writes curve.json / curve.md / curve.png.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from cxrjax.core.checkpoint import restore_variables
from cxrjax.core.errors import ConfigError
from cxrjax.core.stage import Run
from cxrjax.core.writers import say
from cxrjax.data import paired_embeddings, paired_sources
from cxrjax.data.errors import DataError
from cxrjax.data.normalize import fit_normalizer
from cxrjax.models.heads import EmbeddingClassifier
from cxrjax.systems.prior import curve, evaluation
from cxrjax.systems.prior.diffusion_prior import PriorSampler, train_prior
from cxrjax.systems.prior.validate import validate_config
from cxrjax.tasks.embedding_head import train_head

__all__ = ["run", "validate_config", "load_data"]


def load_data(config, workdir: str | None = None, mesh=None):
  """Loads and validates the paired embeddings named by config.data; the labelled training rows,
  validation and test must each hold both classes (a head cannot learn, or an AUC be measured,
  from one), which is checked here, before anything trains. data.source='phantoms' first builds
  its pairs (encoder, features, CTPA side) in `workdir` on `mesh` (phantom_pairs.py)."""
  if config.data.source == "phantoms":
    if workdir is None or mesh is None:
      raise ConfigError("data.source='phantoms' builds its pairs inside a run: use prior.run, or "
                        "give load_data the run's workdir and mesh")
    from cxrjax.systems.prior import phantom_pairs  # late: it imports the TFDS builders
    data, _ = phantom_pairs.load(config, workdir, mesh)
  else:
    data = paired_sources.load(config.data.to_dict())
  paired_embeddings.validate(data)
  for name, labels in (("train (labelled rows)", data["train"].labelled().label),
                       ("valid", data["valid"].label), ("test", data["test"].label)):
    counts = {c: int((labels == c).sum()) for c in (0, 1)}
    if not all(counts.values()):
      raise DataError(f"split {name} holds {counts[0]} PE-negative and {counts[1]} PE-positive "
                      f"pair(s): it needs both classes (at least one of each)")
  return data


def _stage_seed(name: str, seed: int) -> int:
  """A per-stage seed offset that does not change between Python runs."""
  return seed + sum(ord(c) * (i + 1) for i, c in enumerate(name)) % 10_000


def run(config, workdir: str) -> dict:
  """Runs (or resumes) all stages and returns the results dict written to results.json."""
  validate_config(config)
  job = Run.start(config, workdir, {"classifier_train.batch_size": config.classifier_train.batch_size,
                                     "train.batch_size": config.train.batch_size})
  mesh = job.mesh
  data = load_data(config, workdir, mesh)
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

  # Normalisers are fitted on all training pairs (no labels needed) and saved with the run once
  # its stages have passed their fingerprint checks (a refused run changes nothing).
  kind = config.data.normalize
  cxr_norm = fit_normalizer(kind, pairs_cxr)
  ctpa_norm = fit_normalizer(kind, pairs_ctpa)

  data_fp = {"data": config.data.to_dict(), "seed": config.seed}
  if config.data.source == "phantoms":  # what the pairs are computed from
    data_fp["phantoms"] = config.phantoms.to_dict()
  head = EmbeddingClassifier(hidden=tuple(config.classifier.hidden), dropout=config.classifier.dropout)
  heads = {}
  for name, x_train, x_valid in (("ctpa_only", labelled.ctpa, valid.ctpa),
                                 ("xray_only", labelled.cxr, valid.cxr)):
    heads[name] = train_head(job, name, x_train, labelled.label, x_valid, valid.label, model=head,
                             block=config.classifier_train, seed=_stage_seed(name, config.seed),
                             parent=data_fp, select="auc")
  (teacher, teacher_fp), (xray, _) = heads["ctpa_only"], heads["xray_only"]

  graft = None
  if config.init_from:
    graft = {"params": restore_variables(config.init_from)[0]["params"]}
  pairs = {"cxr": cxr_norm.apply(pairs_cxr).astype(np.float32),
           "ctpa": ctpa_norm.apply(pairs_ctpa).astype(np.float32),
           "label": pairs_label.astype(np.float32)}
  net, sched, prior = train_prior(job, pairs, teacher, ctpa_norm, config=config, parent=teacher_fp,
                                  graft=graft)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "normalizers.json"), "w") as f:
      json.dump({"cxr": cxr_norm.to_json(), "ctpa": ctpa_norm.to_json()}, f, indent=2)

  sampler = PriorSampler.from_config(net, sched, config)
  results = evaluation.evaluate(sampler, prior.state.eval_params, teacher, xray, cxr_norm,
                                ctpa_norm, valid, test, (pairs_cxr, pairs_ctpa), config=config,
                                mesh=mesh, workdir=workdir)
  if config.curve.labelled:
    results["curve"] = curve.run_curve(config, workdir, run, own=results)
  return results
