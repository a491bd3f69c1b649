"""RadDiffusion's supervised fine-tuning (spec D.7.3): the whole encoder plus a linear head on the
study CLS (after the final LayerNorm, averaged over the present views), 14 labels, BCE with the
seed's positive weights 1 / sqrt(label mean) (here counted on the training split), no masking
(model.finetune_masking=True keeps the seed's masking on, also at test: D.8.5)."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core.predict import sharded_map
from cxrjax.core.task import Task
from cxrjax.losses.classification import masked_sigmoid_bce
from cxrjax.models.vit import INIT_STD, StudyEncoder, num_kept, random_masking
from cxrjax.systems.raddiffusion.pretrain import views_input


class StudyClassifier(nn.Module):
  """(B, V, S, S, 1) views + (B, V) view mask -> (B, num_classes) logits. Params: {'encoder': the
  StudyEncoder's (a pretrained one is grafted here), 'head': Dense}. mask_ratio > 0 masks each
  view at random (the seed's fine-tune, D.8.5); it needs an 'masking' rng."""
  encoder: StudyEncoder
  num_classes: int = 14
  mask_ratio: float = 0.0

  @nn.compact
  def __call__(self, x, view_mask):
    ids_keep = None
    if self.mask_ratio > 0:
      b, v = x.shape[:2]
      l = (self.encoder.image_size // self.encoder.patch_size) ** 2
      ids_keep = random_masking(self.make_rng("masking"), (b, v), l, self.mask_ratio)[0]
      assert ids_keep.shape[-1] == num_kept(l, self.mask_ratio)
    _, aux = self.encoder(x, view_mask, ids_keep)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(INIT_STD),
                    bias_init=nn.initializers.zeros, name="head")(aux["cls"])


def positive_weights(labels: np.ndarray) -> np.ndarray:
  """(14,) the seed's BCE pos_weight 1 / sqrt(label mean) from (N, 14) {0, 1} training labels;
  1 for a label that is never positive."""
  means = np.asarray(labels, np.float64).mean(axis=0)
  return np.where(means > 0, 1.0 / np.sqrt(np.maximum(means, 1e-12)), 1.0).astype(np.float32)


@functools.lru_cache(maxsize=8)
def finetune_task(model: StudyClassifier, image_size: int, views: int) -> Task:
  """{'images', 'view_mask', 'labels'} -> BCE(pos_weight = frozen 'pos_weight')."""

  def init(rng):
    x = jnp.zeros((1, views, image_size, image_size, 1))
    return {"params": model.init({"params": rng, "masking": rng}, x,
                                 jnp.ones((1, views), bool))["params"]}

  def loss(params, batch, ctx):
    logits = model.apply({"params": params}, views_input(batch["images"]), batch["view_mask"],
                         rngs={"masking": ctx.rng})
    bce = masked_sigmoid_bce(logits, batch["labels"], ctx.frozen["pos_weight"])
    return bce, {"terms": {"bce": bce}}

  return Task(name="finetune", init=init, loss=loss)


@functools.lru_cache(maxsize=8)
def _logits_fn(model: StudyClassifier):
  def fn(batch, params):
    # A fixed masking key at evaluation: the same masks for every checkpoint (seed behaviour only).
    return model.apply({"params": params}, views_input(batch["images"]), batch["view_mask"],
                       rngs={"masking": jax.random.PRNGKey(0)})
  return fn


def predict_logits(model: StudyClassifier, params, studies, mesh, batch_size: int) -> np.ndarray:
  """(N, 14) logits of every study."""
  return sharded_map(_logits_fn(model), {"images": studies.images, "view_mask": studies.view_mask},
                     mesh, batch_size=batch_size, params=params)
