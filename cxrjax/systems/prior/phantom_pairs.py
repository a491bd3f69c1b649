"""The prior's pairs from rendered phantom radiographs (`data.source='phantoms'`): the seed's own
pipeline, image -> CXR embedding -> prior -> PE, from one command on the embedded data.

1. cxr_encoder  the classifier system (configs/classifier.py; its config is `phantoms.encoder`)
                trained in <workdir>/cxr_encoder on the phantom studies' 14 finding labels (PE is
                not one of them, so no PE label reaches the CXR side), its best checkpoint kept;
                or `phantoms.encoder_file`, any local DenseNet file (torchvision or
                torchxrayvision; models/densenet_convert.py).
2. embed        the encoder's pooled features of every study's frontal image, train / validation /
                test splits of the same phantom dataset.
3. pairs        the CTPA side of the same studies from the phantom world's PE state
                (data/phantoms/prior_pairs.py), written with the CXR side to
                <workdir>/phantom_pairs/pairs.npz: the first `phantoms.n_labelled` training
                studies keep their PE labels, the others are the unlabelled pairs.
A marker holding the fingerprint (encoder, settings) makes a rerun read the file instead; a
changed encoder or setting writes it again. Each stage resumes like any other.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from cxrjax.core.checkpoint import restore_variables
from cxrjax.core.writers import say
from cxrjax.data import paired_embeddings
from cxrjax.data.builders.cxr_phantoms import CxrPhantoms
from cxrjax.data.errors import DataError
from cxrjax.data.phantoms.prior_pairs import write_prior_npz
from cxrjax.data.registry import make_config
from cxrjax.models.densenet_convert import load_densenet
from cxrjax.tasks.image_classifier import ImageNetwork

SPLITS = {"train": "train", "validation": "valid", "test": "test"}  # phantom split -> prior split


def _file_digest(path: str) -> str:
  h = hashlib.sha1()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _encoder(pc, workdir: str, num_labels: int) -> tuple[ImageNetwork, dict]:
  """(the CXR encoder in eval mode, what defines it)."""
  from cxrjax.systems import classifier  # a system used as a stage of this one

  enc = pc.encoder
  if pc.encoder_file:
    module, variables, extras = load_densenet(pc.encoder_file)
    say(f"[cxr_encoder] DenseNet from {pc.encoder_file} ({extras['in_chans']} input channel(s), "
        f"intensity {pc.encoder_intensity!r})")
    return (ImageNetwork(module, variables, pc.encoder_intensity, extras["in_chans"]),
            {"file": os.path.abspath(pc.encoder_file), "sha1": _file_digest(pc.encoder_file)})
  say(f"[cxr_encoder] the classifier system on the phantom findings, in {workdir}")
  results = classifier.run(enc, workdir)
  best = int(results["best_step"])
  variables, _ = restore_variables(os.path.join(workdir, "classifier", "ckpt"), best)
  model, _, channels = classifier.build_model(enc.model, enc.data.channels, num_labels)
  return (ImageNetwork(model, variables, enc.data.intensity, channels),
          {"encoder": enc.to_dict(), "best_step": best})


def _study_index(study_id) -> int:
  text = study_id.decode() if isinstance(study_id, bytes) else str(study_id)
  return int(text.lstrip("s"))


def load(config, workdir: str, mesh) -> tuple[paired_embeddings.PairedData, dict]:
  """(the validated pairs, their fingerprint) for `data.source='phantoms'`; builds what is
  missing (module docstring)."""
  from cxrjax.systems.classifier import data as cdata
  from cxrjax.systems.classifier import predict

  pc = config.phantoms
  dc = pc.encoder.data
  encoder_dir = os.path.join(workdir, "cxr_encoder")
  sources, names = cdata.open_dataset(dc, encoder_dir)  # renders the phantoms on first use
  network, encoder_fp = _encoder(pc, encoder_dir, len(names))
  world = make_config(CxrPhantoms, cdata.builder_items(dc.builder, dc.builder_config, dc.phantom_config))
  fingerprint = json.loads(json.dumps(
      {"cxr_encoder": encoder_fp, "n_labelled": pc.n_labelled, "ctpa_dim": pc.ctpa_dim,
       "world": {"seed": world.seed, "num_studies": world.num_studies, "size": world.size}},
      sort_keys=True, default=str))
  out_dir = os.path.join(workdir, "phantom_pairs")
  path, marker = os.path.join(out_dir, "pairs.npz"), os.path.join(out_dir, "complete.json")
  done = False
  if os.path.exists(marker):
    with open(marker) as f:
      done = json.load(f) == fingerprint
  if done:
    say(f"[phantom_pairs] pairs already in {path}")
  else:
    cxr = {}
    for phantom_split, split in SPLITS.items():
      source = sources[phantom_split]
      _, out = predict(network, source, pc.encoder, mesh, features=True)
      if len(out) != len(source):
        raise DataError(f"phantom split {phantom_split}: {len(source)} studies but {len(out)} "
                        f"frontal images kept by phantoms.encoder.data.views; the pairs need one per study")
      index = np.array([_study_index(source[i]["study_id"]) for i in range(len(source))])
      cxr[split] = (index, out[:, network.module.num_classes:])
    n = pc.n_labelled
    index, emb = cxr["train"]
    if not 0 < n < len(index):
      raise DataError(f"phantoms.n_labelled={n} must be between 1 and the {len(index) - 1} the "
                      f"phantom training split can spare for unlabelled pairs (raise "
                      f"phantoms.encoder.data.phantom_config num_studies)")
    cxr["train"], cxr["unlabelled"] = (index[:n], emb[:n]), (index[n:], emb[n:])
    if jax.process_index() == 0:
      write_prior_npz(path, world.seed, cxr, world.phantom_config(), ctpa_dim=pc.ctpa_dim)
      with open(marker, "w") as f:
        json.dump(fingerprint, f, sort_keys=True)
    if jax.process_count() > 1:  # the others read what process 0 just wrote
      multihost_utils.sync_global_devices("prior_phantom_pairs_written")
    say(f"[phantom_pairs] {sum(len(v[0]) for v in cxr.values())} studies: "
        f"{emb.shape[1]}-d CXR features, {pc.ctpa_dim}-d CTPA side, written to {path}")
  return paired_embeddings.load_npz(path), fingerprint
