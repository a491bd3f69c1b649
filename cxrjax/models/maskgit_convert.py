"""RayGen ModelV2 PyTorch state dicts -> ``models.maskgit.TokenTransformer`` params (spec C.5).

Reads a file the user already has (nothing is downloaded): *.safetensors, or a plain state dict in
*.pt / *.pth / *.bin (models/state_dicts.load_state_dict; a Lightning checkpoint's nested
``state_dict`` is unwrapped there). An in-memory state dict converts with ``convert_state_dict``.

Keys, as the seed's modules name them (farazali7/multimodal-xray src/models/model.py ``ModelV2``,
transformer.py ``TransformerDecoder`` / ``TransformerDecoderLayer`` / ``FeedForwardNetwork2``,
attention.py ``MultiHeadAttentionBlock`` wrapping ``nn.MultiheadAttention`` as ``.mha``):
  image_embedding.weight                       (C + 1, D)
  image_pos_emb.pos_emb                        (1, seq_len, D)
  text_projector.{weight,bias}                 (D, E), (D,)   absent when E == D (nn.Identity)
  transformer.dec_layers.{i}.{mha,cross_mha}.mha.in_proj_{weight,bias}   (3D, D), (3D,): q, k, v
  transformer.dec_layers.{i}.{mha,cross_mha}.mha.out_proj.{weight,bias}
  transformer.dec_layers.{i}.ffn.{layer_norm_1,linear_1,layer_norm_2,linear_2}.*
  transformer.dec_layers.{i}.layer_norm_3.*
  transformer.dec_layers.{i}.layer_norm_{1,2}.*   unused by the seed's forward: skipped
  final_dense.{weight,bias}                    (C, D)
A prefix before them (``model.`` from the Lightning ``FinalModelV2``, ``module.`` from DDP) is found
from where ``image_embedding.weight`` sits; keys outside it are ignored, and so is the frozen
CXR-BERT that ModelV2 holds as ``tokenizer.*`` (it converts separately).

Layouts: the packed in_proj is split into thirds (q, k, v in that order) and each (out, in) weight
is transposed to a (in, out) kernel; LayerNorm weight -> scale. When text_dim == width the seed
has no projector (nn.Identity) and the model's projector is set to the identity (kernel I, bias 0),
which computes the same.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core.errors import CheckpointError
from cxrjax.models.maskgit import TokenTransformer
from cxrjax.models.state_dicts import fill_variables, load_state_dict as read_state_dict

_ANCHOR = "image_embedding.weight"
_FROZEN_TEXT = "tokenizer."  # ModelV2's frozen CXR-BERT, not part of this model
_UNUSED = re.compile(r"^transformer\.dec_layers\.\d+\.layer_norm_[12]\.")
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}
_QKV = {"query": "q", "key": "k", "value": "v"}
_LAYER = re.compile(r"^dec_layers_(\d+)$")
_LAYER_KEY = re.compile(r"^transformer\.dec_layers\.(\d+)\.")


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """{torch key: numpy array} from a local .safetensors or .pt/.pth/.bin file."""
  return read_state_dict(path, "RayGen ModelV2 weights")


def _numpy(v: Any) -> np.ndarray:
  if hasattr(v, "detach"):  # a torch tensor, without importing torch
    v = v.detach().cpu()
    return (v.float() if str(v.dtype) == "torch.bfloat16" else v).numpy()
  return np.asarray(v)


def normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The seed's keys without their prefix, as numpy, the frozen text encoder dropped, and every
  packed ``in_proj_{weight,bias}`` split into ``in_proj_{weight,bias}[q|k|v]`` thirds (a length
  not divisible by 3 splits unevenly, so its thirds are reported as misshapen)."""
  anchors = sorted(k[: -len(_ANCHOR)] for k in state_dict if k.endswith(_ANCHOR))
  if len(anchors) != 1:
    raise CheckpointError(f"not a RayGen ModelV2 state dict: expected one '...{_ANCHOR}' key, "
                          f"found {len(anchors)} {anchors[:4]} (first keys: "
                          f"{sorted(state_dict)[:5]})")
  prefix = anchors[0]
  out: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    if not key.startswith(prefix):
      continue
    key = key[len(prefix):]
    if key.startswith(_FROZEN_TEXT):
      continue
    value = _numpy(value)
    if key.endswith((".in_proj_weight", ".in_proj_bias")):
      for name, third in zip("qkv", np.array_split(value, 3, axis=0)):
        out[f"{key}[{name}]"] = third
    else:
      out[key] = value
  return out


def torch_key(path: Sequence[str]) -> str:
  """Flax param path -> the seed's key, e.g. ('dec_layers_0', 'cross_mha', 'key', 'kernel') ->
  'transformer.dec_layers.0.cross_mha.mha.in_proj_weight[k]'."""
  if path == ("pos_emb",):
    return "image_pos_emb.pos_emb"
  *modules, leaf = path
  suffix = _LEAF[leaf]
  m = _LAYER.match(modules[0])
  if m is None:  # image_embedding, text_projector, final_dense
    return ".".join(modules) + "." + suffix
  rest = modules[1:]
  if rest[0] in ("mha", "cross_mha"):
    block = f"{rest[0]}.mha."
    if rest[1] in _QKV:
      return f"transformer.dec_layers.{m.group(1)}.{block}in_proj_{suffix}[{_QKV[rest[1]]}]"
    return f"transformer.dec_layers.{m.group(1)}.{block}out_proj.{suffix}"
  return f"transformer.dec_layers.{m.group(1)}." + ".".join(rest) + "." + suffix


def expected_params(model: TokenTransformer) -> dict:
  """Abstract params of ``model`` (shapes only, no compute)."""
  ids = jax.ShapeDtypeStruct((1, model.seq_len), jnp.int32)
  text = jax.ShapeDtypeStruct((1, 1, model.text_dim), jnp.float32)
  return jax.eval_shape(lambda i, t: model.init(jax.random.PRNGKey(0), i, t), ids, text)


def convert_state_dict(state_dict: Mapping[str, Any], model: TokenTransformer) -> dict:
  """{'params': float32 numpy tree} for ``model`` from a ModelV2 state dict.

  state_dict: {key: numpy array or torch tensor}, e.g. ``torch_model.state_dict()`` or
    ``load_state_dict(path)``.
  Raises CheckpointError naming every missing key, unexpected key and shape mismatch in one line.
  """
  sd = normalize_keys(state_dict)
  if model.text_dim == model.width and not any(k.startswith("text_projector.") for k in sd):
    sd["text_projector.weight"] = np.eye(model.width, dtype=np.float32)  # the seed's nn.Identity
    sd["text_projector.bias"] = np.zeros((model.width,), np.float32)
  variables = fill_variables(
      sd, expected_params(model), torch_key=torch_key, skip=(),
      skipped=lambda key: _UNUSED.match(key) is not None,
      describe=(f"RayGen ModelV2 state dict does not fit TokenTransformer(codebook_size="
                f"{model.codebook_size}, seq_len={model.seq_len}, width={model.width}, depth="
                f"{model.depth}, ffn_hidden={model.ffn_hidden}, text_dim={model.text_dim}) "
                f"([q|k|v] are thirds of a packed in_proj)"))
  return {"params": variables["params"]}


def infer_config(state_dict: Mapping[str, Any]) -> dict:
  """TokenTransformer fields read from shapes: codebook_size, seq_len, width, depth, ffn_hidden,
  text_dim. ``heads`` leaves no trace in a state dict and must be given (RayGen: 8)."""
  sd = normalize_keys(state_dict)
  try:
    width = int(sd[_ANCHOR].shape[1])
    layers = {int(m.group(1)) for k in sd if (m := _LAYER_KEY.match(k))}
    proj = sd.get("text_projector.weight")
    return {"codebook_size": int(sd["final_dense.weight"].shape[0]),
            "seq_len": int(sd["image_pos_emb.pos_emb"].shape[1]), "width": width,
            "depth": len(layers),
            "ffn_hidden": int(sd["transformer.dec_layers.0.ffn.linear_2.weight"].shape[1]),
            "text_dim": width if proj is None else int(proj.shape[1])}
  except (KeyError, IndexError) as e:
    raise CheckpointError(f"cannot read the ModelV2 sizes from the state dict: {e} missing or "
                          f"misshapen") from e


def load_token_transformer(path: str, **model_kwargs) -> tuple[TokenTransformer, dict]:
  """(model, variables) from a local ModelV2 weights file, sizes read from it.

  model_kwargs: further fields (heads, defaulting to RayGen's 8; dtype; attention_dropout;
  text_key_padding); a size given here that disagrees with the file is refused.
  """
  raw = load_state_dict(path)
  arch = infer_config(raw)
  for k, v in model_kwargs.items():
    if k in arch and v != arch[k]:
      raise CheckpointError(f"{path} holds a ModelV2 with {k}={arch[k]}, not {v}")
  model = TokenTransformer(**{**arch, **model_kwargs})
  return model, convert_state_dict(raw, model)
