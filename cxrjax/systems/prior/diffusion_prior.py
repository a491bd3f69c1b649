"""Stage 3: the DALLE-2 diffusion prior (spec A.2-A.4), CXR embedding -> CTPA embedding.

Everything lives in the normalised space of each modality; the diffusion target is
x0 = normalised CTPA * image_embed_scale (sqrt(dim) in the seed).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core import diffusion
from cxrjax.core.errors import ConfigError
from cxrjax.core.predict import sharded_map
from cxrjax.core.stage import Run
from cxrjax.core.task import Task
from cxrjax.data.iterators import ShuffledBatches
from cxrjax.data.normalize import Normalizer
from cxrjax.losses.diffusion import prior_loss
from cxrjax.models.prior import DiffusionPriorNetwork
from cxrjax.tasks.embedding_head import TrainedHead


def build_network(config, ctpa_dim: int, cxr_dim: int) -> DiffusionPriorNetwork:
  p = config.prior
  dim = p.dim or ctpa_dim
  return DiffusionPriorNetwork(
      dim=dim, depth=p.depth, heads=p.heads, dim_head=p.dim_head, ff_mult=p.ff_mult,
      attn_dropout=p.attn_dropout, ff_dropout=p.ff_dropout, num_timesteps=p.num_timesteps,
      max_text_len=p.max_text_len, normformer=p.normformer, rotary=p.rotary,
      cond_dim=cxr_dim if cxr_dim != dim else None, remat=p.remat, dtype=jnp.dtype(p.dtype))


def embed_scale(config, dim: int) -> float:
  return config.diffusion.image_embed_scale or math.sqrt(dim)


def prior_task(net: DiffusionPriorNetwork, sched: diffusion.Schedule, *, cxr_dim: int,
               teacher: TrainedHead, unnormalize, config) -> Task:
  """The prior's init and loss for the core loop.

  Batches: {'cxr': (B, Dx) normalised, 'ctpa': (B, D) normalised, 'label': (B,) with NaN}.
  teacher: the CTPA head on raw embeddings, whose variables the loss reads from the frozen input
  'teacher'; unnormalize: the CTPA normaliser's inverse (the seed's U).
  """
  scale = embed_scale(config, net.dim)
  param = config.diffusion.parametrisation
  p_drop = config.diffusion.cond_drop_prob
  lc = config.loss

  def init(rng):
    return {"params": net.init(rng, jnp.zeros((1, net.dim)), jnp.zeros((1,), jnp.int32),
                               jnp.zeros((1, cxr_dim)))["params"]}

  def loss(params, batch, ctx):
    r_t, r_noise, r_text, r_image, r_drop = jax.random.split(ctx.rng, 5)
    x0 = batch["ctpa"] * scale
    b = x0.shape[0]
    t = diffusion.diffusion_timestep_sample(r_t, b, sched.num_timesteps)
    noise = jax.random.normal(r_noise, x0.shape, x0.dtype)
    x_t = diffusion.q_sample(sched, x0, t, noise)
    # Conditioning dropout, drawn independently for the CXR token and the noisy-target token.
    text_keep = jax.random.bernoulli(r_text, 1 - p_drop, (b,))
    image_keep = jax.random.bernoulli(r_image, 1 - p_drop, (b,))
    out = net.apply({"params": params}, x_t, t, batch["cxr"], text_keep=text_keep,
                    image_keep=image_keep, deterministic=False, rngs={"dropout": r_drop})
    pred_x0 = diffusion.model_output_to_x0(sched, out, x_t, t, param)
    target = diffusion.training_target(sched, x0, noise, t, param)
    head_logits = lambda x: teacher.apply(ctx.frozen["teacher"], x)
    total, terms = prior_loss(out, target, pred_x0, x0, head_logits=head_logits,
                              unnormalize=unnormalize, scale=scale, w_diff=lc.w_diff,
                              w_cls=lc.w_cls, cls_target=lc.cls_target, labels=batch["label"],
                              faithful_no_grad_cls=lc.faithful_no_grad_cls)
    return total, {"terms": terms}

  return Task(name="prior", init=init, loss=loss)


def ema_kwargs(config) -> dict | None:
  ema = config.train.ema
  return {k: v for k, v in ema.to_dict().items() if k != "enabled"} if ema.enabled else None


def train_prior(run: Run, pairs: dict[str, np.ndarray], teacher: TrainedHead,
                ctpa_norm: Normalizer, *, config, parent: dict, graft=None):
  """pairs: {'cxr': (N, Dx) normalised, 'ctpa': (N, Dc) normalised, 'label': (N,) with NaN}.
  parent: the teacher head's fingerprint; graft: {'params': ...} to start from (init_from).

  Returns (network, schedule, StageResult); the result's state carries the EMA params.
  """
  cxr_dim = pairs["cxr"].shape[1]
  net = build_network(config, pairs["ctpa"].shape[1], cxr_dim)
  sched = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.timesteps)
  task = prior_task(net, sched, cxr_dim=cxr_dim, teacher=teacher, unnormalize=ctpa_norm.invert,
                    config=config)
  data = ShuffledBatches(pairs, config.train.batch_size, seed=config.seed + 1)
  defines = {k: config[k] for k in ("prior", "diffusion", "loss")}
  result = run.stage(task, data, config.train, seed=config.seed + 2, parent=parent,
                     defines={**defines, "init_from": config.init_from}, ema=ema_kwargs(config),
                     frozen={"teacher": teacher.variables}, graft=graft)
  return net, sched, result


@dataclasses.dataclass(eq=False)
class PriorSampler:
  """Samples CTPA embeddings for CXR conditions with a trained prior.

  Ancestral DDPM when steps == timesteps, DDIM otherwise. For each condition it draws
  `num_samples` embeddings; with `best_of` = r > 1 each of them is the most cosine-similar
  to the condition among r draws (the seed's sample()). Noise depends only on (seed, row),
  so results do not change with the mesh or the number of processes.
  """
  net: DiffusionPriorNetwork
  schedule: diffusion.Schedule
  scale: float
  parametrisation: str = "x0"
  steps: int = 64
  eta: float = 1.0
  best_of: int = 1
  num_samples: int = 1
  cond_scale: float = 1.0
  seed: int = 0
  batch_size: int = 512

  @classmethod
  def from_config(cls, net, schedule, config) -> "PriorSampler":
    sc = config.sampling
    return cls(net, schedule, embed_scale(config, net.dim), config.diffusion.parametrisation,
               sc.steps, sc.eta, sc.best_of, sc.num_samples, sc.cond_scale, sc.seed, sc.batch_size)

  def _denoiser(self, params, cond):
    def fn(x_t, t):
      out = self.net.apply({"params": params}, x_t, t, cond)
      if self.cond_scale != 1.0:
        null = self.net.apply({"params": params}, x_t, t, cond,
                              text_keep=jnp.zeros(t.shape, bool), image_keep=jnp.zeros(t.shape, bool))
        out = diffusion.classifier_free_guidance(out, null, self.cond_scale)
      return out
    return fn

  def _sample_batch(self, batch, params):
    """batch: {'cond': (B, Dx), 'row': (B,)} -> (B, num_samples, D), normalised CTPA space."""
    cond, rows = batch["cond"], batch["row"]
    b, k, r, d = cond.shape[0], self.num_samples, self.best_of, self.net.dim
    cond_rep = jnp.repeat(cond, k * r, axis=0)  # (B*K*r, Dx)
    rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), rows[0])
    x = diffusion.sample(self._denoiser(params, cond_rep), self.schedule, (b * k * r, d), rng,
                         num_steps=self.steps, eta=self.eta, parametrisation=self.parametrisation)
    x = x.reshape(b, k, r, d) / self.scale
    if r > 1:
      sim = jnp.einsum("bd,bkrd->bkr", _l2n(cond), _l2n(x))
      x = jnp.take_along_axis(x, jnp.argmax(sim, axis=2)[:, :, None, None], axis=2)
    return x[:, :, 0]

  def generate(self, params, cond: np.ndarray, mesh) -> np.ndarray:
    """CXR conditions (N, Dx), normalised -> (N, num_samples, D) normalised CTPA embeddings."""
    if self.best_of > 1 and cond.shape[1] != self.net.dim:
      raise ConfigError(f"sampling.best_of={self.best_of} ranks samples by cosine similarity to "
                        f"the CXR embedding, which needs equal dimensions (CXR {cond.shape[1]} vs "
                        f"CTPA {self.net.dim}); set --config.sampling.best_of=1")
    rows = np.arange(len(cond), dtype=np.int32)
    per_call = max(self.batch_size // (self.num_samples * self.best_of), 1)
    return sharded_map(self._sample_batch, {"cond": cond.astype(np.float32), "row": rows}, mesh,
                       batch_size=per_call, params=params)


def _l2n(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
