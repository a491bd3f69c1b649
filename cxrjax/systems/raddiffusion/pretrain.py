"""RadDiffusion's pretraining: the study encoder with an MAE or diffusion-MAE decoder (spec D.5, D.6).

Params: {'encoder': StudyEncoder, 'decoder': the scheme's decoder}. A batch is {'images': (B, V,
S, S) uint8, 'view_mask': (B, V) bool, ...}; views enter as (B, V, S, S, 1) in [0, 1] (D.2.1).
Each view of each study gets its own random mask (D.3); absent views are computed but weigh 0 in
the loss and never reach a present view.

  mae      the encoder sees the kept patches; the decoder fills the masked ones with a mask token;
           MSE on normalised pixels of the masked patches (D.5).
  diffmae  the masked patches are replaced by noised pixels at a per-view step t ~ U{0..T-1}
           (D.6.2-3) and the decoder (which never sees t) predicts their clean normalised pixels;
           the target is normalised once (the seed normalised it twice, D.6.6 / D.8.7).
With norm_pix False (config model.norm_pix_loss) both schemes predict raw pixels in [0, 1]
instead of per-patch standardised ones (the CPU default; see configs/raddiffusion.py).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core import diffusion
from cxrjax.core.task import Task
from cxrjax.losses.mae import denormalize, mae_loss, normalize_patches, patchify, unpatchify
from cxrjax.models.mae_decoders import DiffMAECrossSelfDecoder, DiffMAEJointDecoder, MAEDecoder
from cxrjax.models.vit import StudyEncoder, num_kept, random_masking, vit_size

SCHEMES = ("mae", "diffmae")
DIFFMAE_DECODERS = {"joint": DiffMAEJointDecoder, "cross_self": DiffMAECrossSelfDecoder}


def views_input(images) -> jax.Array:
  """(B, V, S, S) uint8 -> (B, V, S, S, 1) float32 in [0, 1] (the seed's do_rescale, no norm)."""
  return jnp.asarray(images).astype(jnp.float32)[..., None] / 255.0


def _pick(value, default):
  return value if value else default


def build_encoder(config) -> StudyEncoder:
  """The study encoder of config.model: spec D.3's size, with any non-zero override."""
  m, s = config.model, vit_size(config.model.size)
  return StudyEncoder(patch_size=m.patch_size, hidden=_pick(m.hidden, s.hidden),
                      depth=_pick(m.depth, s.depth), heads=_pick(m.heads, s.heads),
                      mlp=_pick(m.mlp, s.mlp), image_size=m.image_size, channels=1,
                      bottleneck=m.bottleneck, dtype=jnp.dtype(m.dtype),
                      layer_norm_eps=s.layer_norm_eps)


def build_decoder(config, scheme: str):
  m, s = config.model, vit_size(config.model.size)
  cls = MAEDecoder if scheme == "mae" else DIFFMAE_DECODERS[m.diffmae_decoder]
  kw = dict(hidden=_pick(m.decoder_hidden, s.decoder_hidden),
            depth=_pick(m.decoder_depth, s.decoder_depth),
            heads=_pick(m.decoder_heads, s.decoder_heads), mlp=_pick(m.decoder_mlp, s.decoder_mlp),
            patch_size=m.patch_size, num_patches=(m.image_size // m.patch_size) ** 2, channels=1,
            dtype=jnp.dtype(m.dtype))
  if cls is not DiffMAECrossSelfDecoder:
    kw["bottleneck"] = m.bottleneck
  return cls(**kw)


def mask_ratio(config) -> float:
  return config.model.mask_ratio or vit_size(config.model.size).mask_ratio


def diffusion_schedule(config) -> diffusion.Schedule:
  d = config.diffusion
  return diffusion.power_linspace_schedule(d.timesteps, d.beta_start, d.beta_end, d.rho)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: its Task's program key
class Pretrainer:
  """The encoder, one decoder and the scheme: init, the loss, and the reconstructions."""
  encoder: StudyEncoder
  decoder: object
  scheme: str
  mask_ratio: float
  schedule: diffusion.Schedule | None = None
  norm_pix: bool = True  # targets: each patch standardised (the seed's), else raw pixels in [0, 1]

  @property
  def num_patches(self) -> int:
    return (self.encoder.image_size // self.encoder.patch_size) ** 2

  def init(self, rng, views: int) -> dict:
    k_enc, k_dec = jax.random.split(rng)
    s, l = self.encoder.image_size, self.num_patches
    k = num_kept(l, self.mask_ratio)
    x = jnp.zeros((1, views, s, s, 1))
    mask = jnp.ones((1, views), bool)
    ids = jnp.tile(jnp.arange(l, dtype=jnp.int32), (1, views, 1))
    enc = self.encoder.init(k_enc, x, mask, ids[..., :k])["params"]
    tokens = jnp.zeros((1, views, 1 + k, self.encoder.hidden))
    dec_args = (tokens, ids, mask) if self.scheme == "mae" else (tokens, ids, mask, x)
    dec = self.decoder.init(k_dec, *dec_args)["params"]
    return {"params": {"encoder": enc, "decoder": dec}}

  def forward(self, params, images, view_mask, rng) -> tuple[jax.Array, jax.Array, jax.Array]:
    """-> (predictions (B, V, L, P) normalised pixels, mask (B, V, L), x (B, V, S, S, 1))."""
    # Keys by purpose, so reconstruct and chain mask the same patches for the same rng.
    r_mask, r_t, r_noise = (jax.random.fold_in(rng, i) for i in range(3))
    x = views_input(images)
    b, v = x.shape[:2]
    ids_keep, mask, ids_restore = random_masking(r_mask, (b, v), self.num_patches, self.mask_ratio)
    tokens, _ = self.encoder.apply({"params": params["encoder"]}, x, view_mask, ids_keep)
    if self.scheme == "mae":
      pred = self.decoder.apply({"params": params["decoder"]}, tokens, ids_restore, view_mask)
    else:
      t = diffusion.sample_timesteps(r_t, b * v, self.schedule.num_timesteps).reshape(b, v)
      noisy = diffusion.noise_masked_patches(r_noise, x, mask, t, self.schedule,
                                             self.encoder.patch_size)
      pred = self.decoder.apply({"params": params["decoder"]}, tokens, ids_restore, view_mask,
                                noisy)
    return pred, mask, x

  def loss(self, params, batch, ctx):
    pred, mask, x = self.forward(params, batch["images"], batch["view_mask"], ctx.rng)
    value = mae_loss(pred, x, mask, self.encoder.patch_size, norm_pix=self.norm_pix,
                     weights=batch["view_mask"])
    return value, {"terms": {"mse": value}}

  def task(self, name: str, views: int) -> Task:
    return Task(name=name, init=functools.partial(self.init, views=views), loss=self.loss)

  def reconstruct(self, params, images, view_mask, rng) -> dict:
    """One masked forward: {'masked': the visible patches only, 'recon': visible patches + the
    predicted ones de-normalised with each patch's true statistics (the usual MAE picture;
    it leaks the true mean and variance, D.6.7)}, each (B, V, S, S) in [0, 1]."""
    pred, mask, x = self.forward(params, images, view_mask, rng)
    return _pictures(pred, mask, x, self.encoder.patch_size, self.norm_pix)

  def chain(self, params, images, view_mask, rng, steps: int) -> jax.Array:
    """The seed's iterative diffusion-MAE chain (D.6.7): from the masked image, for t = T-1 ..
    down (`steps` levels spread over the schedule): re-noise the current estimate's masked
    patches to level t, predict, de-normalise with the clean patches' statistics, composite.
    A reconstruction, not a sample: it starts from the true image and its patch statistics.
    Returns (steps, B, V, S, S) in [0, 1]."""
    r_mask, r_noise = jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 2)
    x = views_input(images)
    b, v, s = x.shape[0], x.shape[1], x.shape[2]
    p = self.encoder.patch_size
    ids_keep, mask, ids_restore = random_masking(r_mask, (b, v), self.num_patches, self.mask_ratio)
    tokens, _ = self.encoder.apply({"params": params["encoder"]}, x, view_mask, ids_keep)
    _, mean, var = normalize_patches(patchify(x, p))
    levels = np.linspace(self.schedule.num_timesteps - 1, 0, steps).round().astype(np.int32)
    keep = (mask > 0)[..., None]

    def step(current, inputs):
      t, key = inputs
      noisy = diffusion.noise_masked_patches(key, current, mask, jnp.full((b, v), t),
                                             self.schedule, p)
      pred = self.decoder.apply({"params": params["decoder"]}, tokens, ids_restore, view_mask,
                                noisy)
      patches = jnp.where(keep, _pixels(pred, mean, var, self.norm_pix), patchify(current, p))
      current = unpatchify(patches, p, s, s)
      return current, current[..., 0]

    keys = jax.random.split(r_noise, steps)
    _, frames = jax.lax.scan(step, x, (jnp.asarray(levels), keys))
    return jnp.clip(frames, 0.0, 1.0)


@functools.partial(jax.jit, static_argnums=0)
def reconstruct(pt: Pretrainer, params, images, view_mask, rng) -> dict:
  """pt.reconstruct, compiled once per Pretrainer."""
  return pt.reconstruct(params, images, view_mask, rng)


@functools.partial(jax.jit, static_argnums=(0, 5))
def chain(pt: Pretrainer, params, images, view_mask, rng, steps: int) -> jax.Array:
  """pt.chain, compiled once per (Pretrainer, steps)."""
  return pt.chain(params, images, view_mask, rng, steps)


def _pixels(pred, mean, var, norm_pix: bool):
  """Predictions as pixels: de-normalised with the true patch statistics under norm_pix."""
  return denormalize(pred, mean, var) if norm_pix else pred


def _pictures(pred, mask, x, patch: int, norm_pix: bool) -> dict:
  s = x.shape[2]
  patches = patchify(x, patch)
  _, mean, var = normalize_patches(patches)
  keep = (mask > 0)[..., None]
  masked = unpatchify(jnp.where(keep, 0.0, patches), patch, s, s)[..., 0]
  recon = unpatchify(jnp.where(keep, _pixels(pred, mean, var, norm_pix), patches), patch, s,
                     s)[..., 0]
  return {"masked": masked, "recon": jnp.clip(recon, 0.0, 1.0)}


def pretrainer(config, scheme: str) -> Pretrainer:
  return Pretrainer(build_encoder(config), build_decoder(config, scheme), scheme, mask_ratio(config),
                    diffusion_schedule(config) if scheme == "diffmae" else None,
                    norm_pix=config.model.norm_pix_loss)
