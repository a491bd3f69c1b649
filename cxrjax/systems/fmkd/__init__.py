"""CXR-FMKD (seed 003): foundation-model embeddings distilled into DenseNet-169; performance,
direct transfer and bias analysis (spec prior_and_fmkd.md B).

`run(config, workdir)` executes the stages; each resumes from its own checkpoint or files:
  1. data      phantom TFDS dataset (frontal views) in config.data.data_dir or <workdir>/data
  2. teacher   a DenseNet trained on the phantom labels (teacher.source='train') whose D-dim
               layer is the teacher embedding; 'embed' writes it for every un-augmented image
               to <workdir>/teacher/embeddings/<study_id>.npy. teacher.source='files' skips both.
  3. distill   student DenseNet-169 + Linear projector regresses the stored embeddings
               (read back through data.embeddings, which refuses misaligned files)
  4. downstream per seed: linear probes (teacher, student projector, student backbone),
               fine-tune of the student, DenseNet from scratch; tested in-domain and on unseen
               sites (direct transfer)
  5. bias      PCA / KS / bias score / t-SNE on test features of the chosen models
  6. results   results.json, results.md, PNGs; the tables are printed at the end
"""
from __future__ import annotations

import json
import os

import jax
from jax.experimental import multihost_utils

from cxrjax.core.replicas import replicas, run_replicas
from cxrjax.core.stage import Run
from cxrjax.core.writers import say
from cxrjax.data.augment import augment_config
from cxrjax.data.embeddings import load_embeddings, write_embeddings
from cxrjax.models.heads import EmbeddingClassifier
from cxrjax.systems.fmkd import data as fdata
from cxrjax.systems.fmkd import evaluation
from cxrjax.systems.fmkd.stages import train_classifier, train_distill, train_teacher
from cxrjax.systems.fmkd.validate import validate_config
from cxrjax.tasks.embedding_head import train_head

__all__ = ["run", "validate_config"]


# Probes of the student that probe.faithful_bn_leak runs through its train-mode backbone, and
# what their head reads.
LEAKY_PROBES = {"fmkd_lp": "embedding", "fmkd_direct_lp": "features"}


def _embed(encoder, splits: dict, out_dir: str, fingerprint: dict, *, mesh, batch_size: int) -> None:
  """Writes the teacher embedding of every (un-augmented) image once; a marker file with the
  fingerprint makes a rerun skip it and a changed teacher redo it."""
  marker = os.path.join(out_dir, "complete.json")
  want = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f) == want:
        say(f"[embed] teacher embeddings already in {out_dir}")
        return
    os.remove(marker)
  for split in splits.values():
    emb, _ = encoder.extract(split.images, mesh, batch_size)
    if jax.process_index() == 0:
      write_embeddings(out_dir, split.ids, emb, layout="npy")
  if jax.process_index() == 0:
    with open(marker, "w") as f:
      json.dump(want, f, sort_keys=True)
  if jax.process_count() > 1:  # the other processes read the files process 0 just wrote
    multihost_utils.sync_global_devices("fmkd_teacher_embeddings_written")
  say(f"[embed] wrote {sum(len(s) for s in splits.values())} teacher embeddings to {out_dir}")


def run(config, workdir: str) -> dict:
  """Runs (or resumes) every stage; returns the results dict written to results.json."""
  validate_config(config)
  job = Run.start(config, workdir, {
      "teacher.train.batch_size": config.teacher.train.batch_size,
      **{f"{k}.batch_size": config[k].batch_size for k in ("distill", "probe", "finetune")}})
  mesh = job.mesh
  dc = config.data
  sources = fdata.prepare(dc, workdir)
  splits = {name: fdata.load_split(name, src, dc.image_size) for name, src in sources.items()}
  train, valid, test = splits["train"], splits["validation"], splits["test"]
  src_train = train.rows_of_sites(dc.source_sites)
  valid_src = valid.take(valid.rows_of_sites(dc.source_sites))
  domains = {"in_domain": test.rows_of_sites(dc.source_sites),
             "transfer": test.rows_of_sites(dc.target_sites)}
  domains = {k: v for k, v in domains.items() if v.size}
  say(f"data: {len(train)} train ({src_train.size} at source sites {tuple(dc.source_sites)}), "
      f"{len(valid)} validation, {len(test)} test (" +
      ", ".join(f"{k} {v.size}" for k, v in domains.items()) + f"); {dc.image_size} px; "
      f"{mesh.devices.size} device(s)")
  if not src_train.size or not len(valid_src):
    raise fdata.DataError("no training or validation study at data.source_sites; raise "
                          "data.num_studies or change the sites")
  augment = augment_config(config.augment, dc.image_size)
  eb = config.eval.batch_size

  # 2. teacher embeddings: trained here, or the user's files.
  fp = {"data": dc.to_dict(), "seed": config.seed}
  tc = config.teacher
  if tc.source == "train":
    teacher, result = train_teacher(job, train, valid, config=config,
                                    parent={**fp, "teacher": tc.to_dict()})
    fp = result.fingerprint
    path, layout = os.path.join(workdir, "teacher", "embeddings"), "npy"
    _embed(teacher, splits, path, fp, mesh=mesh, batch_size=eb)
  else:
    path, layout = tc.path, tc.layout
    fp["teacher"] = {"source": "files", "path": os.path.abspath(path), "dim": tc.dim}
  # Every split is checked against its image ids before anything trains on the pairs.
  t_emb = {name: load_embeddings(path, s.ids, tc.dim, layout) for name, s in splits.items()}
  say(f"[teacher] {tc.dim}-d embeddings of {sum(len(v) for v in t_emb.values())} images from {path}")

  # 3. distillation.
  valid_rows = valid.rows_of_sites(dc.source_sites)
  student, distilled = train_distill(job, train, src_train, t_emb["train"], valid_src,
                                     t_emb["validation"][valid_rows], augment=augment,
                                     config=config, parent=fp)
  s_train = student.extract(train.images[src_train], mesh, eb)
  s_valid = student.extract(valid_src.images, mesh, eb)
  s_test = student.extract(test.images, mesh, eb)

  # 4. downstream, per seed. feats[model] = (train, valid, test) frozen features for the probes.
  feats = {"teacher_lp": (t_emb["train"][src_train], t_emb["validation"][valid_rows], t_emb["test"]),
           "fmkd_lp": (s_train[0], s_valid[0], s_test[0]),
           "fmkd_direct_lp": (s_train[1], s_valid[1], s_test[1])}
  y_train, y_valid = train.labels[src_train], valid_src.labels
  bias_feats: dict = {"teacher": t_emb["test"], "fmkd": s_test[0]}
  leaky = config.probe.faithful_bn_leak
  # The switch only changes the leaky probes: the others keep their checkpoints across it.
  probe_block = {k: v for k, v in config.probe.to_dict().items() if k != "faithful_bn_leak"}
  probe = EmbeddingClassifier(hidden=(), dropout=0.0, num_outputs=train.labels.shape[1])
  common = dict(augment=augment, config=config, dim=tc.dim)

  def one_seed(rep) -> dict:
    """{model: test probabilities (N_test, 14)} of one seed; fills bias_feats for the first."""
    probs, parent = {}, rep.fingerprint(distilled.fingerprint)
    for model, (xtr, xva, xte) in feats.items():
      if leaky and model in LEAKY_PROBES:
        # The seed's LP as it ran: the student in train mode under a trained head (spec B.2).
        clf = train_classifier(job, rep.stage(f"{model}_leaky"), train, src_train, valid_src,
                               seed=rep.seed, start=student, parent={**parent, "faithful_bn_leak": True},
                               stage=probe_block, head_input=LEAKY_PROBES[model],
                               frozen_backbone=True, **common)
        probs[model] = clf.predict(test.images, mesh, eb)[0]
        continue
      head, _ = train_head(job, rep.stage(model), xtr, y_train, xva, y_valid, model=probe,
                           block=probe_block, seed=rep.seed, parent=parent, select="bce")
      probs[model] = head.predict_proba(xte, mesh)
    for model, start in (("fmkd_ft", student), ("scratch", None)):
      clf = train_classifier(job, rep.stage(model), train, src_train, valid_src, seed=rep.seed,
                             start=start, parent={**parent, "init": model}, **common)
      p, emb, backbone = clf.predict(test.images, mesh, eb)
      probs[model] = p
      if rep.index == 0:  # one selected seed per model, as the seed's bias runs
        # The seed exports the projector output for FMKD models and the backbone for CXR-Model.
        bias_feats[model] = backbone if model == "scratch" else emb
    return probs

  per_seed = run_replicas(replicas("seed", config.eval.seeds), one_seed)
  probs = {m: [per_seed[s][m] for s in config.eval.seeds] for m in evaluation.MODELS}

  # 5-6. metrics, transfer, bias, results.
  return evaluation.evaluate(probs, bias_feats, test, domains, config=config, workdir=workdir,
                             counts={"train": int(src_train.size), "validation": len(valid_src),
                                     **{k: int(v.size) for k, v in domains.items()}})
