"""RayGen's text-conditioned masked-token generator (spec C.5-C.8): codes cached once per
tokenizer, the transformer trained through the core loop with the frozen text encoder as a frozen
input, and `Generator.generate(texts)` = iterative decoding -> VQ-GAN decoding -> images.

Training (C.6): per study r ~ U(0, 1), round(N cos(pi r / 2)) code positions masked (at least one),
cross-entropy over every masked token of the batch. Beyond the seed: the text is dropped to the
null condition with probability generator.text_dropout (classifier-free guidance; 0 = the seed),
and padded text positions are masked out of the cross-attention (generator.text_key_padding; False
= the seed, which attends to padding, C.10). The validation loss is the same masked CE with masks
fixed per study, so its evaluations are comparable; reduce-on-plateau reads it (C.7).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core import mesh as mesh_lib
from cxrjax.core.errors import ConfigError
from cxrjax.core.predict import sharded_map
from cxrjax.core.stage import Run
from cxrjax.core.task import Task, rbg_init_key
from cxrjax.core.writers import say
from cxrjax.data.iterators import ShuffledBatches
from cxrjax.losses.masked_tokens import cosine_mask, drop_text, mask_inputs, masked_token_loss
from cxrjax.models.mask_decoding import decode
from cxrjax.models.maskgit import TokenTransformer, make_tokens_to_logits
from cxrjax.models.vqgan import VQGAN
from cxrjax.systems.raygen.text import TextEncoder
from cxrjax.systems.raygen.tokenizer import ImageTokenizer


def tokenizer_digest(tokenizer: ImageTokenizer) -> str:
  """A short hash of the tokenizer's weights and architecture: the key of its code cache."""
  h = hashlib.sha1(repr(tokenizer.model).encode("utf-8"))
  for leaf in jax.tree.leaves(jax.device_get(tokenizer.params)):
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()[:16]


def cached_codes(tokenizer: ImageTokenizer, splits: dict, cache_dir: str, mesh,
                 batch_size: int) -> dict:
  """{split: (N, n_codes) int32}: each split's images encoded once and cached in
  <cache_dir>/<tokenizer digest>/<split>.npy. Codes of another tokenizer live under another
  digest and are never read; a cached file of the wrong length (other data) is refused."""
  folder = os.path.join(cache_dir, tokenizer_digest(tokenizer))
  out = {}
  for name, split in splits.items():
    path = os.path.join(folder, f"{name}.npy")
    if os.path.exists(path):
      codes = np.load(path)
      if codes.shape != (len(split), tokenizer.grid ** 2):
        raise ConfigError(f"{path} holds codes of shape {codes.shape}, not ({len(split)}, "
                          f"{tokenizer.grid ** 2}): the cache was written for other data; delete "
                          f"{folder} to re-encode")
    else:
      codes = tokenizer.encode(split.images, mesh, batch_size).astype(np.int32)
      if jax.process_index() == 0:
        os.makedirs(folder, exist_ok=True)
        np.save(path + ".tmp.npy", codes)
        os.replace(path + ".tmp.npy", path)
      say(f"[codes] {name}: {len(codes)} images -> {codes.shape[1]} codes each, cached in {folder}")
    out[name] = codes
  return out


def transformer(gc, tokenizer: ImageTokenizer, text_dim: int) -> TokenTransformer:
  return TokenTransformer(codebook_size=tokenizer.model.n_embed, seq_len=tokenizer.grid ** 2,
                          width=gc.width, depth=gc.depth, heads=gc.heads, ffn_hidden=gc.ffn_hidden,
                          text_dim=text_dim, attention_dropout=gc.attention_dropout,
                          text_key_padding=gc.text_key_padding)


@functools.lru_cache(maxsize=8)
def generator_task(model: TokenTransformer, text: TextEncoder, text_dropout: float,
                   max_length: int) -> Task:
  """The masked-token task on {'codes': (B, N) int32, 'tokens': (B, L) int32, 'token_mask': (B, L)
  bool}; the text encoder's params are the frozen input 'text'."""
  n, mask_id = model.seq_len, model.mask_id

  def init(rng):
    ids = jnp.zeros((1, n), jnp.int32)
    states = jnp.zeros((1, max_length, model.text_dim), jnp.float32)
    return dict(model.init(rbg_init_key(rng), ids, states, jnp.ones((1, max_length), bool)))

  def loss(params, batch, ctx):
    k_mask, k_text, k_drop = jax.random.split(ctx.rng, 3)
    states = jax.lax.stop_gradient(text.states(ctx.frozen["text"], batch["tokens"],
                                               batch["token_mask"]))
    states, text_mask = drop_text(k_text, states, batch["token_mask"], text_dropout)
    codes = batch["codes"]
    mask = cosine_mask(k_mask, codes.shape[0], n)
    logits = model.apply({"params": params}, mask_inputs(codes, mask, mask_id), states, text_mask,
                         deterministic=False, rngs={"dropout": k_drop})
    value, accuracy = masked_token_loss(logits, codes, mask)
    return value, {"terms": {"masked_ce": value, "accuracy": accuracy}}

  return Task("generator", init, loss=loss)


@functools.lru_cache(maxsize=8)
def _val_loss_fn(model: TokenTransformer, text: TextEncoder):
  """fn(batch, params) -> (B, 3): masked count, correct count, summed CE per study, the mask drawn
  from the study's own key (batch['key_seed']) so every evaluation scores the same positions."""
  n, mask_id = model.seq_len, model.mask_id

  def fn(batch, params):
    states = text.states(params["text"], batch["tokens"], batch["token_mask"])
    masks = jax.vmap(lambda s: cosine_mask(jax.random.PRNGKey(s), 1, n)[0])(batch["key_seed"])
    logits = model.apply({"params": params["generator"]}, mask_inputs(batch["codes"], masks, mask_id),
                         states, batch["token_mask"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, batch["codes"][..., None], axis=-1)[..., 0]
    w = masks.astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch["codes"]).astype(jnp.float32)
    return jnp.stack([w.sum(1), (correct * w).sum(1), (ce * w).sum(1)], axis=1)

  return fn


def validation_loss(model, text: TextEncoder, gen_params, codes, tokens, token_mask, mesh,
                    batch_size: int) -> dict:
  arrays = {"codes": codes, "tokens": tokens, "token_mask": token_mask,
            "key_seed": np.arange(len(codes), dtype=np.uint32)}
  out = sharded_map(_val_loss_fn(model, text), arrays, mesh, batch_size=batch_size,
                    params={"generator": gen_params, "text": text.params})
  n, correct, ce = out.sum(axis=0)
  return {"val_loss": float(ce / max(n, 1.0)), "val_accuracy": float(correct / max(n, 1.0))}


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Decoding settings (mask_decoding.decode): the seed's production K=3, T0=1.3, alpha=0.5."""
  steps: int = 3
  temperature: float = 1.3
  topk_filter: float = 0.5
  variant: str = "raygen"
  choice_temperature: float = 4.5
  guidance_scale: float = 0.0

  @classmethod
  def from_config(cls, block) -> "Sampling":
    return cls(steps=block.steps, temperature=block.temperature, topk_filter=block.topk_filter,
               variant=block.variant, choice_temperature=block.choice_temperature,
               guidance_scale=block.guidance_scale)


@functools.lru_cache(maxsize=16)
def _generate_fn(model: TokenTransformer, text: TextEncoder, tokenizer_model, grid: int,
                 sampling: Sampling, per_step: bool):
  """fn(batch {'tokens', 'token_mask', 'key_seed'}, params) -> (B, S, S) images in [0, 1], or with
  per_step (B, K, S, S): each decoding step's codes (every slot filled by that step's prediction)
  decoded, for the figure of the decoding steps."""

  def fn(batch, params):
    states = text.states(params["text"], batch["tokens"], batch["token_mask"])
    to_logits = make_tokens_to_logits(model, {"params": params["generator"]}, states,
                                      batch["token_mask"])
    key = jax.random.PRNGKey(batch["key_seed"][0])
    ids, steps = decode(to_logits, key, states.shape[0], model.seq_len, model.mask_id,
                        steps=sampling.steps, temperature=sampling.temperature,
                        topk_filter=sampling.topk_filter, variant=sampling.variant,
                        choice_temperature=sampling.choice_temperature,
                        guidance_scale=sampling.guidance_scale)

    def pixels(codes):
      images = tokenizer_model.apply({"params": params["tokenizer"]},
                                     codes.reshape(-1, grid, grid), method=VQGAN.decode_indices)
      return (jnp.clip(images, -1.0, 1.0).mean(axis=-1) + 1.0) / 2.0

    if per_step:
      frames = jax.vmap(pixels)(steps)  # (K, B, S, S)
      return jnp.moveaxis(frames, 0, 1)
    return pixels(ids)

  return fn


@dataclasses.dataclass(eq=False)
class Generator:
  """A trained generator with its text encoder and tokenizer: report texts -> radiographs."""
  model: TokenTransformer
  params: dict
  text: TextEncoder
  tokenizer: ImageTokenizer

  def generate(self, texts: list, mesh, *, seed: int, batch_size: int,
               sampling: Sampling = Sampling(), per_step: bool = False) -> np.ndarray:
    """texts (n,) -> (n, S, S) float32 images in [0, 1] ((n, K, S, S) with per_step). Batch b draws
    from PRNGKey(seed + b): the same texts, seed and batch size give the same images."""
    ids, mask = self.text.encode(list(texts))
    batch_size = -(-batch_size // mesh_lib.batch_devices(mesh)) * mesh_lib.batch_devices(mesh)
    key_seed = np.repeat(seed + np.arange(-(-len(texts) // batch_size)), batch_size)[: len(texts)]
    fn = _generate_fn(self.model, self.text, self.tokenizer.model, self.tokenizer.grid, sampling,
                      per_step)
    params = {"generator": self.params, "text": self.text.params, "tokenizer": self.tokenizer.params}
    return sharded_map(fn, {"tokens": ids, "token_mask": mask,
                            "key_seed": key_seed.astype(np.uint32)}, mesh,
                       batch_size=batch_size, params=params)


def train_generator(run: Run, splits: dict, codes: dict, text: TextEncoder,
                    tokenizer: ImageTokenizer, config, parent: dict) -> Generator:
  """Trains (or resumes) the generator stage on the training split's codes and reports."""
  gc = config.generator
  model = transformer(gc, tokenizer, text.module.hidden)
  train, valid = splits["train"], splits["valid"]
  ids, mask = text.encode(train.texts)
  v_ids, v_mask = text.encode(valid.texts)
  task = generator_task(model, text, gc.text_dropout, text.tokenizer.max_length)
  # The tokenizer's and text encoder's weights define this stage: a workdir whose generator was
  # trained on other codes or text states is refused on resume, naming these fields.
  defines = {"generator": gc, "tokenizer_digest": tokenizer_digest(tokenizer),
             "text": config.text}

  def evaluate(state) -> dict:
    return validation_loss(model, text, state.params, codes["valid"], v_ids, v_mask, run.mesh,
                           config.eval.batch_size)

  data = ShuffledBatches({"codes": codes["train"], "tokens": ids, "token_mask": mask},
                         config.generator_train.batch_size, seed=config.seed + 4)
  result = run.stage(task, data, config.generator_train, seed=config.seed + 4, name="generator",
                     parent=parent, defines=defines, evaluate=evaluate,
                     best=("val_loss", "min"), frozen={"text": text.params})
  return Generator(model, result.variables()["params"], text, tokenizer)
