"""RayGen's image tokenizer: the VQ-GAN trained through the core loop (spec C.3), or loaded from
UniXGen's weights (`vqgan.init_from`), and `ImageTokenizer.encode / decode` for part 2.

One step of the stage is two updates of one compiled program, as taming's two optimizers:
  generator      L1 + perceptual_weight * perceptual + codebook_weight * codebook loss
                 (+ entropy_weight * MaskGIT's entropy term), and from disc_start on
                 + disc_weight * lambda * (-mean D(x_hat)), lambda = ||grad_W nll|| / (||grad_W g||
                 + 1e-4) clamped to [0, 1e4], W the decoder's last kernel (taming's adaptive weight)
  discriminator  from disc_start: hinge loss on D(x) and D(x_hat) with x_hat from the generator's
                 new weights (taming recomputes it in its second optimizer step too)
The discriminator's batch statistics and an EMA of the code usage are non-gradient collections.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core.errors import ConfigError
from cxrjax.core.task import Task, Update, rbg_init_key
from cxrjax.core.predict import sharded_map
from cxrjax.core.stage import Run
from cxrjax.core.writers import say
from cxrjax.data.iterators import ShuffledBatches
from cxrjax.evaluate import generation
from cxrjax.losses import vqgan as vq
from cxrjax.models.patchgan import NLayerDiscriminator
from cxrjax.models.vqgan import VQGAN, last_layer, with_last_layer
from cxrjax.models.vqgan_convert import load_vqgan
from cxrjax.systems.raygen.data import unit_images
from cxrjax.systems.raygen.perceptual import PerceptualNet

USAGE_DECAY = 0.99  # the usage EMA spans ~100 steps


def vqgan_model(vc, image_size: int) -> VQGAN:
  return VQGAN(ch=vc.ch, ch_mult=tuple(vc.ch_mult), num_res_blocks=vc.num_res_blocks,
               attn_resolutions=tuple(vc.attn_resolutions), resolution=image_size,
               z_channels=vc.z_channels, embed_dim=vc.embed_dim, n_embed=vc.n_embed,
               beta=vc.beta, legacy=vc.legacy, norm_groups=vc.norm_groups)


@dataclasses.dataclass(frozen=True)
class GanWeights:
  """The loss weights of the VQ-GAN stage (config.vqgan's), hashable so equal settings share a
  compiled step."""
  pixel: float
  perceptual: float
  codebook: float
  entropy: float
  entropy_temperature: float
  disc_start: int
  disc_weight: float


@functools.lru_cache(maxsize=8)
def vqgan_task(model: VQGAN, disc: NLayerDiscriminator, perceptual: PerceptualNet, w: GanWeights,
               image_size: int) -> Task:
  """The two-update task on {'images': (B, S, S) uint8}; perceptual net variables arrive as the
  frozen input 'perceptual'."""

  def init(rng):
    k_g, k_d = jax.random.split(rbg_init_key(rng))
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    d_vars = disc.init(k_d, x, train=False)
    return {"params": {"vqgan": model.init(k_g, x)["params"], "discriminator": d_vars["params"]},
            "batch_stats": d_vars["batch_stats"],
            "codebook": {"usage": jnp.full((model.n_embed,), 1.0 / model.n_embed, jnp.float32)}}

  def nll_of(x, recon, frozen):
    rec = jnp.mean(jnp.abs(x - recon))
    per = (vq.perceptual_distance(perceptual.feature_maps(frozen["perceptual"], x),
                                  perceptual.feature_maps(frozen["perceptual"], recon))
           if w.perceptual else jnp.zeros(()))
    return w.pixel * rec + w.perceptual * per, (rec, per)

  def discriminate(params, stats, images):
    logits, upd = disc.apply({"params": params, "batch_stats": stats}, images, train=True,
                             mutable=["batch_stats"])
    return logits, upd["batch_stats"]

  def generator_loss(params, batch, ctx):
    x = unit_images(batch["images"])
    p = params["vqgan"]
    forward = lambda kernel: model.apply({"params": with_last_layer(p, kernel)}, x)
    recon, pullback, aux = jax.vjp(forward, last_layer(p), has_aux=True)
    nll, (rec, per) = nll_of(x, recon, ctx.frozen)
    stats = ctx.state["batch_stats"]
    # The adaptive weight's gradients are taken at a gradient-stopped reconstruction: taken at the
    # live one, the step's own gradient would differentiate through them (second order, 3x the
    # step's cost) only to discard it.
    fixed = jax.lax.stop_gradient(recon)

    # As taming, the adversarial term and its weight are computed at every step and gated by
    # disc_factor (0 before disc_start): a lax.cond would put these backward convolutions in a
    # conditional, which XLA:CPU runs several times slower (core/task.py).
    logits, new_stats = discriminate(params["discriminator"], stats, recon)
    g = vq.generator_adversarial_loss(logits)
    d_nll = jax.grad(lambda r: nll_of(x, r, ctx.frozen)[0])(fixed)
    d_g = jax.grad(lambda r: vq.generator_adversarial_loss(
        discriminate(params["discriminator"], stats, r)[0]))(fixed)
    weight = (vq.adaptive_weight(pullback(d_nll)[0], pullback(d_g)[0]) * w.disc_weight
              * vq.adopt_weight(ctx.step, w.disc_start))
    entropy = (vq.codebook_entropy_loss(aux["distances"], w.entropy_temperature)
               if w.entropy else jnp.zeros(()))
    total = nll + w.codebook * aux["codebook_loss"] + w.entropy * entropy + weight * g
    counts = vq.codebook_usage(aux["indices"], model.n_embed).astype(jnp.float32)
    usage = USAGE_DECAY * ctx.state["codebook"]["usage"] + (1 - USAGE_DECAY) * counts / counts.sum()
    terms = {"l1": rec, "perceptual": per, "codebook": aux["codebook_loss"], "entropy": entropy,
             "g_adv": g, "adaptive_weight": weight,
             "perplexity": vq.perplexity(counts),
             "codes_in_use": jnp.sum(usage > 0.1 / model.n_embed).astype(jnp.float32)}
    return total, {"terms": terms, "state": {"batch_stats": new_stats, "codebook": {"usage": usage}}}

  def discriminator_loss(params, batch, ctx):
    x = unit_images(batch["images"])
    recon = jax.lax.stop_gradient(model.apply({"params": params["vqgan"]}, x)[0])
    stats = ctx.state["batch_stats"]
    real, stats = discriminate(params["discriminator"], stats, x)
    fake, stats = discriminate(params["discriminator"], stats, recon)
    loss = vq.hinge_d_loss(real, fake)
    return loss, {"terms": {"d_loss": loss, "logits_real": jnp.mean(real),
                            "logits_fake": jnp.mean(fake)},
                  "state": {"batch_stats": stats}}

  return Task("vqgan", init, updates=(
      Update("generator", generator_loss, groups=("vqgan",)),
      Update("discriminator", discriminator_loss, groups=("discriminator",),
             start_step=w.disc_start)))


@functools.lru_cache(maxsize=8)
def _encode_fn(model: VQGAN):
  def fn(batch, params):
    codes = model.apply({"params": params}, unit_images(batch["image"]), method=VQGAN.encode)
    return codes.reshape(codes.shape[0], -1)
  return fn


@functools.lru_cache(maxsize=8)
def _decode_fn(model: VQGAN, side: int):
  def fn(batch, params):
    codes = batch["codes"].reshape(-1, side, side)
    images = model.apply({"params": params}, codes, method=VQGAN.decode_indices)
    # UniXGen's decode wrapper: clamp to [-1, 1], then [0, 1]; channels averaged back to grey.
    return (jnp.clip(images, -1.0, 1.0).mean(axis=-1) + 1.0) / 2.0
  return fn


@dataclasses.dataclass(eq=False)
class ImageTokenizer:
  """A trained (or loaded) VQ-GAN: images (N, S, S) uint8 <-> codes (N, (S/f)^2) int32, row-major
  as the seed flattens them. Both directions are compiled once and sharded over the mesh."""
  model: VQGAN
  params: dict
  image_size: int

  @property
  def grid(self) -> int:
    return self.image_size // self.model.factor

  def encode(self, images: np.ndarray, mesh, batch_size: int) -> np.ndarray:
    return sharded_map(_encode_fn(self.model), {"image": images}, mesh, batch_size=batch_size,
                       params=self.params)

  def decode(self, codes: np.ndarray, mesh, batch_size: int) -> np.ndarray:
    """-> (N, S, S) float32 in [0, 1]."""
    return sharded_map(_decode_fn(self.model, self.grid), {"codes": codes}, mesh,
                       batch_size=batch_size, params=self.params)


def reconstruction_metrics(tokenizer: ImageTokenizer, images: np.ndarray, mesh,
                           batch_size: int) -> tuple[dict, np.ndarray, np.ndarray]:
  """L1, PSNR and SSIM (dm-pix, scikit-image's settings) of encode -> decode on [0, 1] images,
  and the codebook usage of those codes. Returns (metrics, codes, reconstructions)."""
  codes = tokenizer.encode(images, mesh, batch_size)
  recon = tokenizer.decode(codes, mesh, batch_size)
  x = images.astype(np.float32)[..., None] / 255.0
  y = recon[..., None]
  counts = np.bincount(codes.reshape(-1), minlength=tokenizer.model.n_embed)
  metrics = {"l1": float(generation.l1(x, y)), "psnr": float(generation.psnr(x, y, 1.0)),
             "ssim": float(generation.ssim(x, y, 1.0)),
             "codes_used": int((counts > 0).sum()), "n_embed": int(tokenizer.model.n_embed),
             "perplexity": float(vq.perplexity(jnp.asarray(counts)))}
  return metrics, codes, recon


def image_tokenizer(run: Run, train, valid, perceptual: PerceptualNet | None, config,
                    parent: dict) -> ImageTokenizer:
  """Loads vqgan.init_from (evaluation only) or trains the VQ-GAN (its validation
  reconstructions and code usage logged at every evaluation)."""
  vc, s = config.vqgan, config.data.image_size
  if vc.init_from:
    model, variables = load_vqgan(vc.init_from, resolution=s)
    say(f"[vqgan] loaded {vc.init_from}: {model.n_embed} codes x {model.embed_dim}, "
        f"{model.factor}x downsampling")
    tokenizer = ImageTokenizer(model, variables["params"], s)
  else:
    model = vqgan_model(vc, s)
    if s % model.factor:
      raise ConfigError(f"data.image_size={s} is not a multiple of the VQ-GAN's downsampling "
                        f"factor {model.factor} (2**(len(vqgan.ch_mult)-1))")
    disc = NLayerDiscriminator(in_channels=3, ndf=vc.disc_ndf, n_layers=vc.disc_layers)
    weights = GanWeights(vc.pixel_weight, vc.perceptual_weight, vc.codebook_weight,
                         vc.entropy_weight, vc.entropy_temperature, vc.disc_start, vc.disc_weight)
    task = vqgan_task(model, disc, perceptual, weights, s)
    shown = valid.images[: config.eval.show]

    def evaluate(state) -> dict:
      tok = ImageTokenizer(model, state.params["vqgan"], s)
      metrics, _, recon = reconstruction_metrics(tok, valid.images, run.mesh, config.eval.batch_size)
      grid = np.concatenate([shown / 255.0, recon[: len(shown)]], axis=1)  # original | recon
      return {**{f"val_{k}": v for k, v in metrics.items() if k != "n_embed"},
              "reconstructions": grid}

    data = ShuffledBatches({"images": train.images}, config.vqgan_train.batch_size,
                           seed=config.seed + 2)
    result = run.stage(task, data, config.vqgan_train, seed=config.seed + 2, name="vqgan",
                       parent=parent, defines={"vqgan": vc}, evaluate=evaluate,
                       frozen={"perceptual": perceptual.variables})
    tokenizer = ImageTokenizer(model, result.variables()["params"]["vqgan"], s)
  return tokenizer
