"""GMCD stage 2 (spec gmcd.md §3): the image-only student distilled from two teachers with logit KD,
DSCD and GKM.

Per step, with two augmented views of the batch:
  T1 = the frozen stage-1 teacher (ctx.frozen['teacher']) on view 1 + the tabular vector, in train
       mode as the seed runs it (batch statistics, active dropout; its statistics are discarded)
  T2 = the student's own EMA (ctx.ema, the seed's decay, teacher.EMA) on view 2, train mode
  student on view 1 -> f_s (B, 128) and logits
  five losses as functions of f_s (spec §3.5 order): alpha KL(T1), alpha KL(T2), beta DSCD(T1's fused
    feature), beta DSCD(T2's feature), CE; with GKM the four distillation terms are weighted by the
    running agreement of their gradients with respect to f_s (losses.gkm: ONE vjp over f_s, inside
    this jitted step), without it they are summed; L = CE + that.
DSCD's memory banks are the non-gradient collection 'bank' (one row per training study, split over
the batch devices: Task.state_sharding 'rows'), its normalisers 'dscd_z', GKM's running weights
'gkm'; all restore bit-identically on resume. The bank has `bank_rows` rows, the largest fold's
training set rounded up to the batch devices, so every fold and every ablation variant shares ONE
compiled step: the fold's true N (the NCE's) and the variant's weights come in ctx.frozen.

Ablation variants (VARIANTS: the weights of `variant_weights`): 'ce' (CE only), 'kd' (+ logit KD
from both teachers), 'dscd' (+ DSCD from both, the seed's fixed-weight fallback alpha(KL1 + KL2) +
beta(DSCD1 + DSCD2)), 'dscd_gkm' (the seed's method). 'ce' and 'kd' run the unused terms at weight
0 (the price of one program instead of four).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cxrjax.core.task import Task
from cxrjax.losses import distill, dscd, gkm
from cxrjax.models.gmcd import GMCDStudent, GMCDTeacher
from cxrjax.systems.gmcd.data import augment, center_view

VARIANTS = ("ce", "kd", "dscd", "dscd_gkm")
INSTANCES = ("0", "1")  # DSCD against T1 (the multimodal teacher) and T2 (the EMA student)
TERMS = ("kl_teacher", "kl_ema", "dscd_teacher", "dscd_ema", "ce")


def variant_weights(variant: str, alpha: float, beta: float) -> dict:
  """ctx.frozen['weights'] of an ablation variant: alpha (logit KD), beta (DSCD), gkm (0 or 1)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown student variant {variant!r}; choose one of {VARIANTS}")
  return {"alpha": jnp.float32(0.0 if variant == "ce" else alpha),
          "beta": jnp.float32(beta if variant in ("dscd", "dscd_gkm") else 0.0),
          "gkm": jnp.float32(1.0 if variant == "dscd_gkm" else 0.0)}


def _bank_state(state, i):
  return {"memory_s": state["bank"][f"s{i}"], "memory_t": state["bank"][f"t{i}"],
          "z_s": state["dscd_z"][f"s{i}"], "z_t": state["dscd_z"][f"t{i}"]}


@functools.lru_cache(maxsize=16)
def student_task(model: GMCDStudent, teacher: GMCDTeacher, *, batch_size: int, image_size: int,
                 bank_rows: int, kind: str = "dscd", num_candidates: int = dscd.NUM_CANDIDATES,
                 num_pos: int = dscd.NUM_POSITIVES, temperature: float = dscd.TEMPERATURE,
                 momentum: float = dscd.MOMENTUM, kd_t: float = distill.KD_T,
                 gkm_threshold: float = gkm.THRESHOLD, gkm_momentum: float = gkm.MOMENTUM,
                 name: str = "student") -> Task:
  """The stage-2 Task. Batches as data.FoldBatches with contrast indices; frozen inputs
  {'teacher': stage-1 {'params', 'batch_stats'}, 'weights': variant_weights(...),
  'num_samples': () float32, the fold's training studies}."""
  candidates = 1 if kind == "crd" else num_candidates

  def init(rng):
    k_model, k_bank = jax.random.split(rng)
    image = jnp.zeros((batch_size, image_size, image_size, 3), jnp.float32)
    variables = dict(model.init({"params": k_model}, image, train=False))
    banks = [dscd.init_state(k, bank_rows, model.embed_dim) for k in jax.random.split(k_bank, 2)]
    variables["bank"] = {f"{side}{i}": b[f"memory_{side}"] for i, b in zip(INSTANCES, banks)
                         for side in ("s", "t")}
    variables["dscd_z"] = {f"{side}{i}": b[f"z_{side}"] for i, b in zip(INSTANCES, banks)
                           for side in ("s", "t")}
    variables["gkm"] = gkm.init_state(len(TERMS))
    return variables

  def loss(params, batch, ctx):
    k_v1, k_v2, k_t, k_e = jax.random.split(ctx.rng, 4)
    view1 = augment(k_v1, batch["image"], image_size)
    view2 = augment(k_v2, batch["image"], image_size)
    w, n = ctx.frozen["weights"], ctx.frozen["num_samples"]
    t_out, _ = teacher.apply(ctx.frozen["teacher"], view1, batch["tabular"], train=True,
                             rngs={"dropout": k_t}, mutable=["batch_stats"])
    stats = ctx.state["batch_stats"]
    e_out, _ = model.apply({"params": ctx.ema, "batch_stats": stats}, view2, train=True,
                           rngs={"dropout": k_e}, mutable=["batch_stats"])
    t_out, e_out = jax.lax.stop_gradient((t_out, e_out))
    s_out, new = model.apply({"params": params, "batch_stats": stats}, view1, train=True,
                             mutable=["batch_stats"])
    # The teacher projections train too (their gradient reaches them through x_t).
    q_t = model.apply({"params": params}, [t_out["fused"], e_out["image"]],
                      method=GMCDStudent.project_teacher)
    teacher_logits = (t_out["logits_fused"], e_out["logits_image"])

    def heads(f_s):
      logits = model.apply({"params": params}, f_s, method=GMCDStudent.classify)
      q_s = model.apply({"params": params}, f_s, method=GMCDStudent.project_student)
      kls = [w["alpha"] * distill.kd_kl(logits, t, kd_t) for t in teacher_logits]
      contrast, states = [], []
      for i in range(len(INSTANCES)):
        value, state, _ = dscd.dscd_loss(
            q_s[i], q_t[i], _bank_state(ctx.state, i), batch["index"], batch["contrast_index"],
            kind=kind, num_candidates=candidates, num_pos=num_pos, temperature=temperature,
            momentum=momentum, num_samples=n)
        contrast.append(w["beta"] * value)
        states.append(state)
      ce = distill.nll(jax.nn.log_softmax(logits), batch["label"])
      return jnp.stack([*kls, *contrast, ce]), states

    losses, grads, states = gkm.loss_gradients(heads, s_out["image"], has_aux=True)
    modulated, gkm_state, gkm_terms = gkm.gkm_loss(losses, grads, ctx.state["gkm"],
                                                   threshold=gkm_threshold, momentum=gkm_momentum)
    kd = w["gkm"] * modulated + (1.0 - w["gkm"]) * jnp.sum(losses[:-1])
    bank = {f"{side}{i}": s[f"memory_{side}"] for i, s in zip(INSTANCES, states) for side in "st"}
    z = {f"{side}{i}": s[f"z_{side}"] for i, s in zip(INSTANCES, states) for side in "st"}
    terms = {**dict(zip(TERMS, losses)), **gkm_terms, "kd_total": kd}
    return losses[-1] + kd, {"terms": terms, "state": {
        "batch_stats": new["batch_stats"], "bank": bank, "dscd_z": z, "gkm": gkm_state}}

  return Task(name, init, loss=loss, state_sharding=(("bank", "rows"),))


@functools.lru_cache(maxsize=16)
def predict_fn(model: GMCDStudent, image_size: int):
  """fn(batch {'image' (B, L, L) uint8}, variables) -> (B, C) log-probabilities, eval mode."""

  def fn(batch, variables):
    out = model.apply(variables, center_view(batch["image"], image_size), train=False)
    return jax.nn.log_softmax(out["logits_image"])

  return fn
