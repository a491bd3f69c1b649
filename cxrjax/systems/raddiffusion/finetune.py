"""RadDiffusion's supervised fine-tuning (spec D.7.3): the whole encoder plus a linear head on the
study CLS (after the final LayerNorm, averaged over the present views), 14 labels, BCE with the
seed's positive weights 1 / sqrt(label mean) (here counted on the training split), no masking
(model.finetune_masking=True keeps the seed's masking on, also at test: D.8.5).

With head_norm the CLS passes a BatchNorm without scale or bias before the head (the MAE paper's
linear-probe head): the LayerNormed study CLS varies across studies by a few per cent of its size,
so a plain head at the seed's learning rate sees nearly one vector for every study; standardising
each feature over the batch gives the head the spread a probe gets from its standardisation. Its
running statistics live in the 'batch_stats' collection and serve at evaluation."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core.predict import sharded_map
from cxrjax.core.task import Task
from cxrjax.losses.classification import masked_sigmoid_bce
from cxrjax.models.transformer_layers import INIT_STD
from cxrjax.models.vit import StudyEncoder, num_kept, random_masking
from cxrjax.systems.raddiffusion.pretrain import views_input


class StudyClassifier(nn.Module):
  """(B, V, S, S, 1) views + (B, V) view mask -> (B, num_classes) logits. Params: {'encoder': the
  StudyEncoder's (a pretrained one is grafted here), 'head': Dense}. mask_ratio > 0 masks each
  view at random (the seed's fine-tune, D.8.5); it needs a 'masking' rng. head_norm: a BatchNorm
  without affine before the head (collection 'batch_stats'; batch statistics with train=True,
  running ones otherwise)."""
  encoder: StudyEncoder
  num_classes: int = 14
  mask_ratio: float = 0.0
  head_norm: bool = False

  @nn.compact
  def __call__(self, x, view_mask, train: bool = False):
    ids_keep = None
    if self.mask_ratio > 0:
      b, v = x.shape[:2]
      l = (self.encoder.image_size // self.encoder.patch_size) ** 2
      ids_keep = random_masking(self.make_rng("masking"), (b, v), l, self.mask_ratio)[0]
      assert ids_keep.shape[-1] == num_kept(l, self.mask_ratio)
    _, aux = self.encoder(x, view_mask, ids_keep)
    features = aux["cls"]
    if self.head_norm:
      # MAE's probe head: BatchNorm1d(affine=False, eps=1e-6), torch's momentum 0.1. Two-pass
      # variance: the features' spread is a few per cent of their mean, where E[x^2] - E[x]^2
      # loses most of its digits.
      features = nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                              momentum=0.9, epsilon=1e-6, use_fast_variance=False,
                              name="head_norm")(features)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(INIT_STD),
                    bias_init=nn.initializers.zeros, name="head")(features)


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
    return dict(model.init({"params": rng, "masking": rng}, x, jnp.ones((1, views), bool)))

  def loss(params, batch, ctx):
    variables = {"params": params, **ctx.state}
    logits, new = model.apply(variables, views_input(batch["images"]), batch["view_mask"],
                              train=True, rngs={"masking": ctx.rng}, mutable=list(ctx.state))
    bce = masked_sigmoid_bce(logits, batch["labels"], ctx.frozen["pos_weight"])
    return bce, {"terms": {"bce": bce}, **({"state": dict(new)} if ctx.state else {})}

  return Task(name="finetune", init=init, loss=loss)


@functools.lru_cache(maxsize=8)
def _logits_fn(model: StudyClassifier):
  def fn(batch, variables):
    # A fixed masking key at evaluation: the same masks for every checkpoint (seed behaviour only).
    return model.apply(variables, views_input(batch["images"]), batch["view_mask"],
                       rngs={"masking": jax.random.PRNGKey(0)})
  return fn


def predict_logits(model: StudyClassifier, variables, studies, mesh, batch_size: int) -> np.ndarray:
  """(N, 14) logits of every study; variables {'params', and 'batch_stats' with head_norm}."""
  return sharded_map(_logits_fn(model), {"images": studies.images, "view_mask": studies.view_mask},
                     mesh, batch_size=batch_size, params=variables)
