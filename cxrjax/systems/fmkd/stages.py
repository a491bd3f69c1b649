"""FMKD's image-model stages, each one run of the core loop: teacher, distillation, fine-tune.

Images enter every network as the seed feeds them (spec B.1): raw grey levels 0..255 as float32,
no normalisation, replicated to 3 channels ("pseudo-RGB") unless data.pseudo_rgb is False.

Compilation is the dominant CPU cost of a DenseNet-169 (~1-2 min per program on 2 cores), so the
stages share programs: every image network is a models.densenet.DenseNet whose classifier slot
is the D-dim projector, and features are always extracted by the same forward
(`Encoder.extract`, the backbone alone; heads are applied on the host). The fine-tune of the
distilled student and the from-scratch baseline are the same StackedClassifier, so they and all
their seeds share one train-step program (the persistent compilation cache finds it again).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core import loop
from cxrjax.core.predict import sharded_map
from cxrjax.data.iterators import ShuffledBatches
from cxrjax.losses.classification import masked_sigmoid_bce
from cxrjax.losses.embedding import embedding_loss
from cxrjax.models.densenet import DenseNet, num_features
from cxrjax.models.fmkd import StackedClassifier, init_head
from cxrjax.systems.fmkd.data import AugmentedBatches, Split


def _bce_classifier(backbone, num_classes: int, config, head_input: str = "embedding"):
  """(init, loss) of backbone + linear head trained with masked BCE on 14 labels; the loss returns
  the updated batch-norm statistics, which the loop keeps when the step is finite."""
  model = StackedClassifier(backbone=backbone, num_classes=num_classes, head_input=head_input)
  s, rgb = config.data.image_size, config.data.pseudo_rgb

  def init(rng):
    return model.init(rng, prep(np.zeros((1, s, s), np.uint8), rgb), train=False)

  def loss(params, batch, rng, batch_stats):
    del rng
    (logits, _), upd = model.apply({"params": params, "batch_stats": batch_stats},
                                   prep(batch["image"], rgb), train=True, mutable=["batch_stats"])
    bce = masked_sigmoid_bce(logits, batch["labels"])
    return bce, {"terms": {"bce": bce}, "batch_stats": upd["batch_stats"]}

  return init, loss


def prep(images, pseudo_rgb: bool):
  """(B, S, S) uint8 -> (B, S, S, C) float32 in 0..255, C = 3 replicated channels or 1."""
  x = jnp.asarray(images).astype(jnp.float32)[..., None]
  return jnp.repeat(x, 3, axis=-1) if pseudo_rgb else x


def densenet(cfg, dim: int) -> DenseNet:
  """A `student`/`teacher` config block -> DenseNet whose classifier is the Linear(F -> dim)."""
  return DenseNet(block_config=tuple(cfg.block_config), num_classes=dim,
                  growth_rate=cfg.growth_rate, num_init_features=cfg.num_init_features,
                  bn_size=cfg.bn_size)


@functools.lru_cache(maxsize=16)
def _forward(module: DenseNet, pseudo_rgb: bool):
  """One long-lived forward per architecture (sharded_map keys its compiled program on it)."""

  def fn(batch, variables):
    out, aux = module.apply(variables, prep(batch["x"], pseudo_rgb), train=False)
    return jnp.concatenate([out, aux["features"]], axis=-1)

  return fn


@dataclasses.dataclass(eq=False)
class Encoder:
  """A trained DenseNet (eval mode: running BN statistics) and how its inputs are made."""
  module: DenseNet
  variables: dict  # {'params', 'batch_stats'} of the DenseNet alone
  pseudo_rgb: bool

  def extract(self, images: np.ndarray, mesh, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, S) uint8 -> (embedding (N, D) projector output, features (N, F) pooled)."""
    out = sharded_map(_forward(self.module, self.pseudo_rgb), {"x": images}, mesh,
                      batch_size=batch_size, params=self.variables)
    d = self.module.num_classes
    return out[:, :d], out[:, d:]


def _variables(state) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


def _schedule(cfg, best: str | None, mode: str = "min") -> loop.Schedule:
  return loop.Schedule(num_steps=cfg.steps, log_every=cfg.log_every,
                       checkpoint_every=cfg.checkpoint_every, keep=1, eval_every=cfg.eval_every,
                       best_metric=best, best_mode=mode)


def _bce(logits: np.ndarray, y: np.ndarray) -> float:
  return float(masked_sigmoid_bce(jnp.asarray(logits), jnp.asarray(y)))


def head_logits(head: dict, x: np.ndarray) -> np.ndarray:
  """A Dense head's params applied on the host: (N, D) -> (N, C)."""
  return np.asarray(x, np.float32) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])


# --------------------------------------------------------------------------------------------
def train_teacher(train: Split, valid: Split, *, config, mesh, workdir: str, fingerprint: dict):
  """The 'foundation model' stand-in: StackedClassifier(DenseNet(teacher), 14) trained with
  masked BCE on every training study (un-augmented). Returns the Encoder whose D-dim projector
  output (the layer under the label head) is the teacher embedding."""
  cfg, tc = config.teacher, config.teacher.train
  backbone = densenet(cfg, cfg.dim)
  rgb = config.data.pseudo_rgb
  init, loss = _bce_classifier(backbone, train.labels.shape[1], config)

  def evaluate(state) -> dict:
    enc = _backbone_encoder(backbone, _variables(state), rgb)
    emb, _ = enc.extract(valid.images, mesh, config.eval.batch_size)
    return {"val_bce": _bce(head_logits(state.params["head"], emb), valid.labels)}

  data = ShuffledBatches({"image": train.images, "labels": train.labels}, tc.batch_size,
                         seed=config.seed + 1)
  result = loop.train(loop.Task("teacher", init, loss), data, mesh=mesh, workdir=workdir,
                      schedule=_schedule(tc, "val_bce"), optim=tc.optim.to_dict(),
                      seed=config.seed + 1, evaluate=evaluate, fingerprint=fingerprint,
                      config=config.to_dict(), tensorboard=config.tensorboard)
  return _backbone_encoder(backbone, _variables(result.best_state), rgb), result


def _backbone_encoder(backbone: DenseNet, variables: dict, rgb: bool) -> Encoder:
  return Encoder(backbone, {"params": variables["params"]["backbone"],
                            "batch_stats": variables["batch_stats"]["backbone"]}, rgb)


# --------------------------------------------------------------------------------------------
def train_distill(train: Split, rows: np.ndarray, targets: np.ndarray, valid: Split,
                  valid_targets: np.ndarray, *, augment, config, mesh, workdir: str,
                  fingerprint: dict) -> tuple[Encoder, Any]:
  """The student DenseNet (classifier slot = Linear(F -> D) projector) regresses the teacher
  embeddings `targets` (len(train), D) of the un-augmented images from augmented ones, rows
  `rows` of `train`; keeps the checkpoint with the lowest validation loss (the seed's
  ModelCheckpoint on val_loss). Params: {'student': DenseNet params, 'log_vars': (2,) only for
  mse_cosine_learned}."""
  dc, lc = config.distill, config.distill.loss
  student = densenet(config.student, targets.shape[1])
  s, rgb = config.data.image_size, config.data.pseudo_rgb
  learned = lc.kind == "mse_cosine_learned"
  loss_kwargs = dict(alpha=lc.alpha, mse_scale=lc.mse_scale, cos_scale=lc.cos_scale,
                     huber_delta=lc.huber_delta)

  def init(rng):
    v = student.init(rng, prep(np.zeros((1, s, s), np.uint8), rgb), train=False)
    params = {"student": v["params"]}
    if learned:
      params["log_vars"] = jnp.zeros((2,), jnp.float32)  # s1 = s2 = 0 as in the seed
    return {"params": params, "batch_stats": v["batch_stats"]}

  def loss(params, batch, rng, batch_stats):
    del rng
    (pred, _), upd = student.apply({"params": params["student"], "batch_stats": batch_stats},
                                   prep(batch["image"], rgb), train=True, mutable=["batch_stats"])
    value, terms = embedding_loss(lc.kind, pred, batch["target"], log_vars=params.get("log_vars"),
                                  **loss_kwargs)
    return value, {"terms": terms, "batch_stats": upd["batch_stats"]}

  def encoder(state) -> Encoder:
    return Encoder(student, {"params": state.params["student"],
                             "batch_stats": state.batch_stats}, rgb)

  def evaluate(state) -> dict:
    pred, _ = encoder(state).extract(valid.images, mesh, config.eval.batch_size)
    log_vars = state.params.get("log_vars") if learned else None
    value, terms = embedding_loss(lc.kind, jnp.asarray(pred), jnp.asarray(valid_targets),
                                  log_vars=log_vars, **loss_kwargs)
    return {"val_loss": float(value), "val_mse": float(terms["mse"]),
            "val_cosine": float(terms["cosine"])}

  data = AugmentedBatches(train, rows, {"target": targets}, batch_size=dc.batch_size,
                          image_size=s, seed=config.seed + 2, augment=augment)
  result = loop.train(loop.Task("distill", init, loss), data, mesh=mesh, workdir=workdir,
                      schedule=_schedule(dc, "val_loss"), optim=dc.optim.to_dict(),
                      seed=config.seed + 2, evaluate=evaluate, fingerprint=fingerprint,
                      config=config.to_dict(), tensorboard=config.tensorboard)
  return encoder(result.best_state), result


# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class TrainedClassifier:
  """A trained StackedClassifier: its backbone as an Encoder plus the host-side head, which
  reads the projector output (head_input 'embedding') or the pooled features ('features')."""
  encoder: Encoder
  head: dict
  head_input: str = "embedding"

  def logits(self, emb: np.ndarray, feats: np.ndarray) -> np.ndarray:
    return head_logits(self.head, emb if self.head_input == "embedding" else feats)

  def predict(self, images: np.ndarray, mesh, batch_size: int):
    """-> (probabilities (N, C), embedding (N, D), features (N, F))."""
    emb, feats = self.encoder.extract(images, mesh, batch_size)
    return 1 / (1 + np.exp(-self.logits(emb, feats))), emb, feats


def train_classifier(name: str, train: Split, rows: np.ndarray, valid: Split, *, seed: int,
                     start: Encoder | None, dim: int, augment, config, mesh, workdir: str,
                     fingerprint: dict, stage=None, head_input: str = "embedding",
                     frozen_backbone: bool = False) -> TrainedClassifier:
  """Trains StackedClassifier(student DenseNet with its D-dim projector, 14) with BCE on
  augmented rows `rows` of `train`; keeps the checkpoint with the lowest validation BCE.

  Full fine-tune (spec B.4 disease stage, `stage` = config.finetune): `start` is the distilled
  student (CXR-FMKD-FFT: its weights and BN statistics, a fresh head) or None (the from-scratch
  baseline). With frozen_backbone (the seed's linear probe as it ran, `stage` = config.probe):
  only the head trains (optim.frozen), but the backbone runs in train mode, so batch statistics
  normalise and the running statistics drift -- spec B.2's "LP subtlety". head_input picks
  what the head reads (see models.fmkd.StackedClassifier)."""
  fc = config.finetune if stage is None else stage
  backbone = densenet(config.student, dim)
  num_classes = train.labels.shape[1]
  s, rgb = config.data.image_size, config.data.pseudo_rgb
  init, loss = _bce_classifier(backbone, num_classes, config, head_input)
  if frozen_backbone and start is None:
    raise ValueError("a frozen backbone needs a trained one to start from")

  def classifier(state) -> TrainedClassifier:
    return TrainedClassifier(_backbone_encoder(backbone, _variables(state), rgb),
                             state.params["head"], head_input)

  def evaluate(state) -> dict:
    clf = classifier(state)
    emb, feats = clf.encoder.extract(valid.images, mesh, config.eval.batch_size)
    return {"val_bce": _bce(clf.logits(emb, feats), valid.labels)}

  init_params = init_stats = None
  if start is not None:
    in_dim = dim if head_input == "embedding" else num_features(
        tuple(config.student.block_config), config.student.growth_rate, config.student.num_init_features)
    head = init_head(jax.random.PRNGKey(seed), in_dim, num_classes)
    # Host copies: the loop donates its state, which must not delete the encoder's own arrays.
    init_params = jax.device_get({"backbone": start.variables["params"], "head": head})
    init_stats = jax.device_get({"backbone": start.variables["batch_stats"]})
  data = AugmentedBatches(train, rows, {"labels": train.labels}, batch_size=fc.batch_size,
                          image_size=s, seed=seed, augment=augment)
  optim = {**fc.optim.to_dict(), "frozen": ("backbone",) if frozen_backbone else ()}
  result = loop.train(loop.Task(name, init, loss), data, mesh=mesh, workdir=workdir,
                      schedule=_schedule(fc, "val_bce"), optim=optim, seed=seed,
                      evaluate=evaluate, init_params=init_params, init_batch_stats=init_stats,
                      fingerprint=fingerprint, config=config.to_dict(),
                      tensorboard=config.tensorboard)
  return classifier(result.best_state)
