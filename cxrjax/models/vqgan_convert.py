"""taming-transformers / UniXGen VQ-GAN state dicts -> ``models.vqgan.VQGAN`` params, and the
checkpoint's PatchGAN -> ``models.patchgan.NLayerDiscriminator`` variables.

Reads a file the user already has (nothing is ever downloaded; UniXGen's ``vqgan/last.ckpt`` is a
Google-Drive link in its README):
  *.safetensors              via safetensors.numpy (torch not needed; preferred)
  *.ckpt / *.pt / *.pth / *.bin  via torch.load(weights_only=True): tensors and plain containers
                             only. A Lightning checkpoint's ``state_dict`` is unwrapped. A file
                             whose pickle needs more (hyper-parameter objects, a whole model) is
                             refused with the command that re-saves its weights.
An in-memory state dict (numpy arrays or torch tensors) converts with ``convert_state_dict``.

Keys (taming's names): ``encoder.{conv_in,norm_out,conv_out}``,
``encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}``, ``encoder.down.{i}.attn.{j}.
{norm,q,k,v,proj_out}``, ``encoder.down.{i}.downsample.conv``, ``encoder.mid.{block_1,attn_1,
block_2}``, ``quant_conv``, ``quantize.embedding.weight``, ``post_quant_conv``, the same for
``decoder`` with ``up.{i}`` (taming's index: ``up.{n-1}`` is the coarsest level, applied first) and
``up.{i}.upsample.conv``. A prefix before them (``model.``, ``first_stage_model.`` in a latent
diffusion checkpoint) is found from where ``encoder.conv_in.weight`` sits; keys outside it, and the
training loss's ``loss.*`` (discriminator, LPIPS), are ignored with a logged note.

Layouts: conv OIHW -> HWIO; GroupNorm weight -> scale; the codebook (n_embed, embed_dim) as is.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cxrjax.core.errors import CheckpointError
from cxrjax.models.patchgan import NLayerDiscriminator
from cxrjax.models.state_dicts import TORCH_LEAF, fill_variables
from cxrjax.models.state_dicts import load_state_dict as read_state_dict
from cxrjax.models.vqgan import VQGAN

_ANCHOR = "encoder.conv_in.weight"
_DISC = "loss.discriminator."
_NUMBERED = re.compile(r"(down|up|block|attn)_(\d+)$")
_RESAVE = ("re-save its weights once, where you trust the file: python -c \"import torch; "
           "sd = torch.load('{path}', map_location='cpu', weights_only=False)['state_dict']; "
           "torch.save(sd, 'vqgan.pt')\" (or write sd with safetensors.torch.save_file) and pass "
           "vqgan.pt")


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """{torch key: numpy array} from a local .safetensors / .ckpt / .pt / .pth / .bin file."""
  try:
    return read_state_dict(path, "VQ-GAN weights")
  except CheckpointError as e:
    if "weights_only" not in str(e):
      raise
    raise CheckpointError(f"{e}. For a taming / UniXGen Lightning checkpoint, "
                          f"{_RESAVE.format(path=path)}") from None


def _numpy(v: Any) -> np.ndarray:
  if hasattr(v, "detach"):  # a torch tensor, without importing torch
    v = v.detach().cpu()
    return (v.float() if str(v.dtype) == "torch.bfloat16" else v).numpy()
  return np.asarray(v)


def _prefix(state_dict: Mapping[str, Any]) -> str:
  anchors = sorted(k[: -len(_ANCHOR)] for k in state_dict if k.endswith(_ANCHOR))
  if len(anchors) != 1:
    raise CheckpointError(f"not a taming VQ-GAN state dict: expected one '...{_ANCHOR}' key, found "
                          f"{len(anchors)} {anchors[:4]} (first keys: {sorted(state_dict)[:5]})")
  return anchors[0]


def normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The VQ model's keys without their prefix, as numpy arrays; ``loss.*`` and keys outside the
  prefix are dropped (and logged)."""
  prefix = _prefix(state_dict)
  out, ignored = {}, []
  for k, v in state_dict.items():
    rest = k[len(prefix):] if k.startswith(prefix) else None
    if rest is None or rest.startswith("loss."):
      ignored.append(k)
      continue
    out[rest] = _numpy(v)
  if ignored:
    logging.info("VQ-GAN weights: ignored %d keys that are not the VQ model's (the training "
                 "loss's discriminator / LPIPS, or outside prefix %r), e.g. %s", len(ignored),
                 prefix, ignored[:3])
  return out


def infer_config(state_dict: Mapping[str, Any], resolution: int = 512) -> dict:
  """VQGAN fields read from the keys and shapes: ch, ch_mult, num_res_blocks, z_channels,
  embed_dim, n_embed, in_channels, out_channels, and attn_resolutions (the levels holding
  attention, as resolution // 2**level for the given nominal `resolution`)."""
  sd = normalize_keys(state_dict)
  need = [k for k in (_ANCHOR, "encoder.conv_out.weight", "quantize.embedding.weight",
                      "decoder.conv_in.weight", "decoder.conv_out.weight") if k not in sd]
  if need:
    raise CheckpointError(f"cannot read the VQ-GAN architecture: missing {need}")
  levels = sorted({int(m.group(1)) for k in sd for m in [re.match(r"encoder\.down\.(\d+)\.", k)]
                   if m})
  blocks = {int(m.group(1)) for k in sd
            for m in [re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)] if m}
  if not levels or levels != list(range(len(levels))) or not blocks:
    raise CheckpointError(f"cannot read the VQ-GAN levels from the state dict (encoder.down "
                          f"levels {levels}, level-0 blocks {sorted(blocks)})")
  ch = int(sd[_ANCHOR].shape[0])
  try:
    mult = tuple(int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // ch for i in levels)
  except KeyError as e:
    raise CheckpointError(f"cannot read the VQ-GAN widths: missing {e}") from None
  z = int(sd["encoder.conv_out.weight"].shape[0])
  if int(sd["decoder.conv_in.weight"].shape[1]) != z:
    raise CheckpointError(f"encoder.conv_out gives {z} channels but decoder.conv_in takes "
                          f"{int(sd['decoder.conv_in.weight'].shape[1])} (double_z=True is a KL "
                          f"autoencoder, not a VQ model)")
  attn = sorted({int(m.group(1)) for k in sd for m in [re.match(r"encoder\.down\.(\d+)\.attn\.", k)]
                 if m})
  n_embed, embed_dim = (int(s) for s in sd["quantize.embedding.weight"].shape)
  return {"ch": ch, "ch_mult": mult, "num_res_blocks": max(blocks) + 1, "z_channels": z,
          "embed_dim": embed_dim, "n_embed": n_embed, "in_channels": int(sd[_ANCHOR].shape[1]),
          "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
          "attn_resolutions": tuple(resolution // 2 ** i for i in attn)}


def torch_key(path) -> str:
  """Flax path -> taming key, e.g. ('encoder', 'down_1', 'block_0', 'norm1', 'scale') ->
  'encoder.down.1.block.0.norm1.weight'; the mid block keeps 'block_1' / 'attn_1'."""
  *modules, leaf = path
  if tuple(path) == ("quantize", "embedding"):
    return "quantize.embedding.weight"
  parts = [m if prev == "mid" else _NUMBERED.sub(r"\1.\2", m)
           for prev, m in zip([None] + modules[:-1], modules)]
  return ".".join(parts) + "." + TORCH_LEAF[leaf]


def _abstract(model: VQGAN) -> dict:
  x = jax.ShapeDtypeStruct((1, model.factor, model.factor, model.in_channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)


def convert_state_dict(state_dict: Mapping[str, Any], model: VQGAN) -> dict:
  """{'params': float32 numpy tree} for `model` from a taming VQModel state dict.

  state_dict: {key: numpy array or torch tensor}, e.g. ``vq_model.state_dict()`` or
    ``load_state_dict(path)``.
  Raises CheckpointError naming the missing keys, unexpected keys and shape mismatches at once.
  """
  sd = normalize_keys(state_dict)
  out = fill_variables(
      sd, _abstract(model), torch_key=torch_key, skip=(), skipped=lambda key: False,
      describe=f"VQ-GAN state dict does not fit the model (ch={model.ch}, ch_mult="
               f"{tuple(model.ch_mult)}, num_res_blocks={model.num_res_blocks}, attn_resolutions="
               f"{tuple(model.attn_resolutions)}, z_channels={model.z_channels}, n_embed="
               f"{model.n_embed}, embed_dim={model.embed_dim})")
  return {"params": out["params"]}


def load_vqgan(path: str, **model_kwargs) -> tuple[VQGAN, dict]:
  """(model, {'params'}) from a local weights file; the architecture is read from its keys and
  shapes (``infer_config``), model_kwargs set the rest (resolution, beta, legacy, norm_groups,
  dtype) and must agree with the file on what it determines."""
  raw = load_state_dict(path)
  arch = infer_config(raw, model_kwargs.get("resolution", 512))
  clash = {k: (arch[k], model_kwargs[k]) for k in arch
           if k in model_kwargs and not _agrees(k, arch, model_kwargs)}
  if clash:
    raise CheckpointError(f"{path} holds a VQ-GAN that differs from the requested fields: "
                          + ", ".join(f"{k}: file {a}, asked {b}" for k, (a, b) in clash.items()))
  model = VQGAN(**{**arch, **model_kwargs})  # the caller's spelling of equal values wins
  return model, convert_state_dict(raw, model)


def _agrees(field: str, arch: dict, asked: dict) -> bool:
  if field == "attn_resolutions":  # equal when they put attention at the same levels
    res, n = asked.get("resolution", 512), len(arch["ch_mult"])

    def levels(resolutions):
      return {i for i in range(n) if res // 2 ** i in tuple(resolutions)}
    return levels(arch[field]) == levels(asked[field])
  return np.atleast_1d(arch[field]).tolist() == np.atleast_1d(asked[field]).tolist()


def discriminator_torch_key(path) -> str:
  """Flax path -> taming key under the checkpoint's loss, e.g. ('3', 'mean') ->
  'loss.discriminator.main.3.running_mean'."""
  *modules, leaf = path
  return _DISC + "main." + ".".join(modules) + "." + TORCH_LEAF[leaf]


def convert_discriminator(state_dict: Mapping[str, Any], model: NLayerDiscriminator) -> dict:
  """{'params', 'batch_stats'} for `model` from the ``loss.discriminator.main.*`` entries of a
  taming VQ-GAN checkpoint (any prefix before ``loss.``; resuming a VQ-GAN's GAN training)."""
  keys = [k for k in state_dict if _DISC + "main." in k]
  if not keys:
    raise CheckpointError(f"the state dict holds no '{_DISC}main.*' keys (a checkpoint saved "
                          f"without the training loss has no discriminator)")
  prefix = keys[0][: keys[0].index(_DISC)]
  sd = {k[len(prefix):]: _numpy(v) for k, v in state_dict.items()
        if k.startswith(prefix + _DISC) and not k.endswith("num_batches_tracked")}
  x = jax.ShapeDtypeStruct((1, 32, 32, model.in_channels), jnp.float32)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
  return fill_variables(
      sd, abstract, torch_key=discriminator_torch_key, skip=(), skipped=lambda key: False,
      describe=f"PatchGAN state dict does not fit the model (ndf={model.ndf}, n_layers="
               f"{model.n_layers}, in_channels={model.in_channels})")
