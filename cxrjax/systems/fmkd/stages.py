"""FMKD's image-model stages, each one run of the core loop: teacher, distillation, fine-tune.

Images enter every network as the seed feeds them (spec B.1): raw grey levels 0..255 as float32,
no normalisation, replicated to 3 channels ("pseudo-RGB") unless data.pseudo_rgb is False.

Compilation is the dominant CPU cost of a DenseNet-169 (~1-2 min per program on 2 cores), so the
stages share programs: every image network is a models.densenet.DenseNet whose classifier slot
is the D-dim projector, and features are always extracted by the same forward
(`ImageNetwork.extract`, the backbone alone; heads are applied on the host). The fine-tune of the
distilled student and the from-scratch baseline are the same StackedClassifier task, so they and
all their seeds share one train-step program (Run.programs, and the persistent compilation cache
across runs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core.stage import Run, StageResult
from cxrjax.core.task import Task
from cxrjax.data.iterators import ShuffledBatches
from cxrjax.losses.classification import masked_sigmoid_bce
from cxrjax.losses.embedding import embedding_loss
from cxrjax.models.densenet import DenseNet, num_features
from cxrjax.models.fmkd import StackedClassifier, init_head
from cxrjax.systems.fmkd.data import Split, augmented_batches
from cxrjax.tasks.image_classifier import ImageNetwork, bce_classifier_task, image_input

INTENSITY = "raw"  # the seed feeds 0..255 grey levels


def channels(config) -> int:
  return 3 if config.data.pseudo_rgb else 1


def densenet(cfg, dim: int) -> DenseNet:
  """A `student`/`teacher` config block -> DenseNet whose classifier is the Linear(F -> dim)."""
  return DenseNet(block_config=tuple(cfg.block_config), num_classes=dim,
                  growth_rate=cfg.growth_rate, num_init_features=cfg.num_init_features,
                  bn_size=cfg.bn_size)


def _classifier_task(backbone: DenseNet, num_classes: int, config, head_input: str = "embedding") -> Task:
  model = StackedClassifier(backbone=backbone, num_classes=num_classes, head_input=head_input)
  return bce_classifier_task(model, image_size=config.data.image_size, intensity=INTENSITY,
                             channels=channels(config))


def _bce(logits: np.ndarray, y: np.ndarray) -> float:
  return float(masked_sigmoid_bce(jnp.asarray(logits), jnp.asarray(y)))


def head_logits(head: dict, x: np.ndarray) -> np.ndarray:
  """A Dense head's params applied on the host: (N, D) -> (N, C)."""
  return np.asarray(x, np.float32) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])


def _backbone(backbone: DenseNet, variables: dict, config) -> ImageNetwork:
  """The backbone part of a StackedClassifier's variables, as a network of its own."""
  return ImageNetwork(backbone, {"params": variables["params"]["backbone"],
                                 "batch_stats": variables["batch_stats"]["backbone"]},
                      INTENSITY, channels(config))


# --------------------------------------------------------------------------------------------
def train_teacher(run: Run, train: Split, valid: Split, *, config, parent: dict):
  """The 'foundation model' stand-in: StackedClassifier(DenseNet(teacher), 14) trained with
  masked BCE on every training study (un-augmented). Returns (the ImageNetwork whose D-dim
  projector output, the layer under the label head, is the teacher embedding, StageResult)."""
  cfg, tc = config.teacher, config.teacher.train
  backbone = densenet(cfg, cfg.dim)

  def evaluate(state) -> dict:
    emb, _ = _backbone(backbone, state.variables(), config).extract(
        valid.images, run.mesh, config.eval.batch_size)
    return {"val_bce": _bce(head_logits(state.params["head"], emb), valid.labels)}

  data = ShuffledBatches({"image": train.images, "labels": train.labels}, tc.batch_size,
                         seed=config.seed + 1)
  result = run.stage(_classifier_task(backbone, train.labels.shape[1], config), data, tc,
                     seed=config.seed + 1, name="teacher", parent=parent, evaluate=evaluate,
                     best=("val_bce", "min"))
  return _backbone(backbone, result.variables(), config), result


# --------------------------------------------------------------------------------------------
def _distill_task(student: DenseNet, config, learned: bool) -> Task:
  lc = config.distill.loss
  s = config.data.image_size
  loss_kwargs = dict(alpha=lc.alpha, mse_scale=lc.mse_scale, cos_scale=lc.cos_scale,
                     huber_delta=lc.huber_delta)

  def init(rng):
    v = student.init(rng, image_input(np.zeros((1, s, s), np.uint8), INTENSITY, channels(config)),
                     train=False)
    params = {"student": v["params"]}
    if learned:
      params["log_vars"] = jnp.zeros((2,), jnp.float32)  # s1 = s2 = 0 as in the seed
    return {"params": params, "batch_stats": v["batch_stats"]}

  def loss(params, batch, ctx):
    (pred, _), upd = student.apply({"params": params["student"], **ctx.state},
                                   image_input(batch["image"], INTENSITY, channels(config)),
                                   train=True, mutable=["batch_stats"])
    value, terms = embedding_loss(lc.kind, pred, batch["target"], log_vars=params.get("log_vars"),
                                  **loss_kwargs)
    return value, {"terms": terms, "state": {"batch_stats": upd["batch_stats"]}}

  return Task("distill", init, loss=loss)


def train_distill(run: Run, train: Split, rows: np.ndarray, targets: np.ndarray, valid: Split,
                  valid_targets: np.ndarray, *, augment, config, parent: dict
                  ) -> tuple[ImageNetwork, StageResult]:
  """The student DenseNet (classifier slot = Linear(F -> D) projector) regresses the teacher
  embeddings `targets` (len(train), D) of the un-augmented images from augmented ones, rows
  `rows` of `train`; keeps the checkpoint with the lowest validation loss (the seed's
  ModelCheckpoint on val_loss). Params: {'student': DenseNet params, 'log_vars': (2,) only for
  mse_cosine_learned}."""
  dc, lc = config.distill, config.distill.loss
  student = densenet(config.student, targets.shape[1])
  learned = lc.kind == "mse_cosine_learned"

  def network(variables) -> ImageNetwork:
    return ImageNetwork(student, {"params": variables["params"]["student"],
                                  "batch_stats": variables["batch_stats"]},
                        INTENSITY, channels(config))

  def evaluate(state) -> dict:
    pred, _ = network(state.variables()).extract(valid.images, run.mesh, config.eval.batch_size)
    log_vars = state.params.get("log_vars") if learned else None
    value, terms = embedding_loss(lc.kind, jnp.asarray(pred), jnp.asarray(valid_targets),
                                  log_vars=log_vars, alpha=lc.alpha, mse_scale=lc.mse_scale,
                                  cos_scale=lc.cos_scale, huber_delta=lc.huber_delta)
    return {"val_loss": float(value), "val_mse": float(terms["mse"]),
            "val_cosine": float(terms["cosine"])}

  data = augmented_batches(train, rows, {"target": targets}, batch_size=dc.batch_size,
                           image_size=config.data.image_size, seed=config.seed + 2, augment=augment)
  result = run.stage(_distill_task(student, config, learned), data, dc, seed=config.seed + 2,
                     parent=parent, defines={"student": config.student, "augment": config.augment},
                     evaluate=evaluate, best=("val_loss", "min"))
  return network(result.variables()), result


# --------------------------------------------------------------------------------------------
class TrainedClassifier:
  """A trained StackedClassifier: its backbone as an ImageNetwork plus the host-side head, which
  reads the projector output (head_input 'embedding') or the pooled features ('features')."""

  def __init__(self, network: ImageNetwork, head: dict, head_input: str = "embedding"):
    self.network, self.head, self.head_input = network, head, head_input

  def logits(self, emb: np.ndarray, feats: np.ndarray) -> np.ndarray:
    return head_logits(self.head, emb if self.head_input == "embedding" else feats)

  def predict(self, images: np.ndarray, mesh, batch_size: int):
    """-> (probabilities (N, C), embedding (N, D), features (N, F))."""
    emb, feats = self.network.extract(images, mesh, batch_size)
    return 1 / (1 + np.exp(-self.logits(emb, feats))), emb, feats


def train_classifier(run: Run, name: str, train: Split, rows: np.ndarray, valid: Split, *, seed: int,
                     start: ImageNetwork | None, dim: int, augment, config, parent: dict,
                     stage: dict | None = None, head_input: str = "embedding",
                     frozen_backbone: bool = False) -> TrainedClassifier:
  """Trains StackedClassifier(student DenseNet with its D-dim projector, 14) with BCE on
  augmented rows `rows` of `train`; keeps the checkpoint with the lowest validation BCE.

  Full fine-tune (spec B.4 disease stage, `stage` None = config.finetune): `start` is the distilled
  student (CXR-FMKD-FFT: its weights and BN statistics grafted under a fresh head) or None (the
  from-scratch baseline). With frozen_backbone (the seed's linear probe as it ran, `stage` = the
  probe block): only the head trains (optim.frozen), but the backbone runs in train mode, so
  batch statistics normalise and the running statistics drift -- spec B.2's "LP subtlety".
  head_input picks what the head reads (see models.fmkd.StackedClassifier)."""
  fc = config.finetune.to_dict() if stage is None else dict(stage)
  backbone = densenet(config.student, dim)
  num_classes = train.labels.shape[1]
  if frozen_backbone and start is None:
    raise ValueError("a frozen backbone needs a trained one to start from")

  def classifier(variables) -> TrainedClassifier:
    return TrainedClassifier(_backbone(backbone, variables, config), variables["params"]["head"],
                             head_input)

  def evaluate(state) -> dict:
    clf = classifier(state.variables())
    emb, feats = clf.network.extract(valid.images, run.mesh, config.eval.batch_size)
    return {"val_bce": _bce(clf.logits(emb, feats), valid.labels)}

  graft = None
  if start is not None:
    s = config.student
    in_dim = dim if head_input == "embedding" else num_features(
        tuple(s.block_config), s.growth_rate, s.num_init_features)
    graft = {"params/backbone": start.variables["params"],
             "params/head": init_head(jax.random.PRNGKey(seed), in_dim, num_classes),
             "batch_stats/backbone": start.variables["batch_stats"]}
  data = augmented_batches(train, rows, {"labels": train.labels}, batch_size=fc["batch_size"],
                           image_size=config.data.image_size, seed=seed, augment=augment)
  block = {**fc, "optim": {**fc["optim"], "frozen": ("backbone",) if frozen_backbone else ()}}
  result = run.stage(_classifier_task(backbone, num_classes, config, head_input), data, block,
                     seed=seed, name=name, parent=parent, evaluate=evaluate, best=("val_bce", "min"),
                     graft=graft)
  return classifier(result.variables())
