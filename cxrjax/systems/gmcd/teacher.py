"""GMCD stage 1 (spec gmcd.md §2): the multimodal teacher with the M3LR low-rank constraint.

Per step, with two independent augmented views of the batch (data.augment) and the same tabular
vectors:
  online = teacher(view 1, tabular), train mode (batch statistics, dropout)
  ema    = teacher with the EMA parameters (ctx.ema, decay min(1 - 1/(k+1), 0.99): the loop's EMA
           with the configuration `EMA` below) on view 2, train mode as the seed's (never .eval()),
           no gradient; its batch statistics are discarded
  L = sum over the fused, image and tabular heads of NLL          (lambda_nll = 1)
    + kd_weight * sum over the heads of KL(p_ema || p_online)     (prediction KD, T = 1)
    + lambda_reg * sum |w| over the tabular branch                (L1, reg_type 'omic')
    + m3lr_weight * M3LR of the path and tabular relation tensors (losses.low_rank, §2.5)
The M3LR state (mu, the auxiliary tensors, their TNN) lives in the non-gradient collection
'm3lr', so a resumed run continues the mu schedule exactly. Evaluation uses the online weights
(the seed keeps the online model as the teacher).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cxrjax.core.task import Task
from cxrjax.losses import distill, low_rank
from cxrjax.models.gmcd import GMCDTeacher
from cxrjax.systems.gmcd.data import augment, center_view

# The seed's mean teacher: alpha = min(1 - 1/(step + 1), 0.99), a copy after the first step
# (core.ema's warm-up with power 1, no delay, every step).
EMA = {"beta": 0.99, "update_after_step": 0, "update_every": 1, "inv_gamma": 1.0, "power": 1.0,
       "use_for_eval": False}
HEADS = ("logits_fused", "logits_image", "logits_tabular")


def _rngs(key):
  return {"dropout": key}


@functools.lru_cache(maxsize=16)
def teacher_task(model: GMCDTeacher, *, batch_size: int, load_size: int, image_size: int,
                 n_views: int = 4, kd_weight: float = 1.0, lambda_reg: float = distill.LAMBDA_REG,
                 m3lr_weight: float = 1.0, lambda_global: float = low_rank.LAMBDA_GLOBAL,
                 rotate: bool = True, name: str = "teacher") -> Task:
  """The stage-1 Task. Batches as data.FoldBatches (image, tabular, label)."""

  def init(rng):
    image = jnp.zeros((batch_size, image_size, image_size, 3), jnp.float32)
    tabular = jnp.zeros((batch_size, model.input_dim), jnp.float32)
    variables = dict(model.init({"params": rng, "dropout": rng}, image, tabular, train=False))
    # one relation tensor per modality (image, tabular), n_views slices each
    variables["m3lr"] = low_rank.init_m3lr_state(batch_size, n_views)
    return variables

  def loss(params, batch, ctx):
    k_v1, k_v2, k_d1, k_d2 = jax.random.split(ctx.rng, 4)
    view1 = augment(k_v1, batch["image"], image_size)
    view2 = augment(k_v2, batch["image"], image_size)
    stats = ctx.state["batch_stats"]
    out, new = model.apply({"params": params, "batch_stats": stats}, view1, batch["tabular"],
                           train=True, rngs=_rngs(k_d1), mutable=["batch_stats"])
    ema, _ = model.apply({"params": ctx.ema, "batch_stats": stats}, view2, batch["tabular"],
                         train=True, rngs=_rngs(k_d2), mutable=["batch_stats"])
    ema = jax.lax.stop_gradient(ema)
    logp = jnp.stack([jax.nn.log_softmax(out[h]) for h in HEADS])  # (3, B, C)
    logp_ema = jnp.stack([jax.nn.log_softmax(ema[h]) for h in HEADS])
    nlls = [distill.nll(lp, batch["label"]) for lp in logp]
    kd = distill.prediction_kd(logp, logp_ema)
    reg = distill.l1_penalty(params["tabular"])
    relations = low_rank.pathomic_relations(out["fused"], ema["fused"], out["image"], ema["image"],
                                            out["tabular"], ema["tabular"], n_views)
    m3lr, m3lr_state, m3lr_terms = low_rank.m3lr_loss(
        relations, ctx.state["m3lr"], lambda_global=lambda_global, rotate=rotate)
    total = sum(nlls) + kd_weight * kd + lambda_reg * reg + m3lr_weight * m3lr
    terms = {"nll_fused": nlls[0], "nll_image": nlls[1], "nll_tabular": nlls[2], "pred_kd": kd,
             "l1_tabular": reg, **m3lr_terms}
    return total, {"terms": terms, "state": {"batch_stats": new["batch_stats"], "m3lr": m3lr_state}}

  return Task(name, init, loss=loss)


@functools.lru_cache(maxsize=16)
def predict_fn(model: GMCDTeacher, image_size: int):
  """fn(batch {'image' (B, L, L) uint8, 'tabular'}, variables) -> (B, 3 heads, C) log-probabilities
  (fused, image, tabular), eval mode; one function per model, so its program is compiled once."""

  def fn(batch, variables):
    out = model.apply(variables, center_view(batch["image"], image_size), batch["tabular"],
                      train=False)
    return jnp.stack([jax.nn.log_softmax(out[h]) for h in HEADS], axis=1)

  return fn
