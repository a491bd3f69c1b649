"""Hugging Face ViT-MAE encoder state dicts -> ``models.vit.StudyEncoder`` params (spec D.3).

Reads a file the user already has (nothing is ever downloaded):
  *.safetensors        via safetensors.numpy (preferred; what ``save_pretrained`` writes)
  *.bin / *.pt / *.pth  via torch.load(weights_only=True): plain state dicts only, never unpickled
                       objects.

Two naming schemes are accepted, found from the keys:
  transformers 4.x (RadDiffusion pins 4.30.2; the hub's facebook/vit-mae-* files):
    embeddings.cls_token, embeddings.position_embeddings,
    embeddings.patch_embeddings.projection.{weight,bias},
    encoder.layer.{i}.attention.attention.{query,key,value}.{weight,bias},
    encoder.layer.{i}.attention.output.dense.*, encoder.layer.{i}.intermediate.dense.*,
    encoder.layer.{i}.output.dense.*, encoder.layer.{i}.layernorm_{before,after}.*, layernorm.*
  transformers 5.x: layers.{i}.attention.{q,k,v,o}_proj.*, layers.{i}.mlp.fc{1,2}.*, rest as 4.x.
A prefix before ``embeddings.`` (``vit.`` in ViTMAEForPreTraining, ``model.vit.`` from Lightning)
is found from where the patch projection sits; keys outside it (the MAE decoder) are ignored.

``embeddings.position_embeddings`` is a fixed table, not a weight: when present it must equal
``vit.sincos_2d`` (the encoder computes its own), otherwise the file was trained with positions
this model cannot reproduce and conversion stops. (transformers 5.x's ``ViTMAEModel(config)``
leaves that table at zeros, its init returning early; a model trained from such an init fails
here, as it should.)

Layouts: Linear (out, in) -> Dense kernel (in, out); conv OIHW -> HWIO; LayerNorm weight -> scale;
cls_token (1, 1, D) -> (D,).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core.errors import CheckpointError
from cxrjax.models.state_dicts import load_state_dict as read_state_dict
from cxrjax.models.vit import StudyEncoder, sincos_2d

_ANCHOR = "embeddings.patch_embeddings.projection.weight"
_POS = "embeddings.position_embeddings"
_SHOW = 12  # names listed per problem kind in an error message

# Per-layer names: flax path under layer_{i} -> (4.x name, 5.x name), both under the layer prefix.
_LAYER_NAMES = {
    ("attention", "query"): ("attention.attention.query", "attention.q_proj"),
    ("attention", "key"): ("attention.attention.key", "attention.k_proj"),
    ("attention", "value"): ("attention.attention.value", "attention.v_proj"),
    ("attention", "out"): ("attention.output.dense", "attention.o_proj"),
    ("fc1",): ("intermediate.dense", "mlp.fc1"),
    ("fc2",): ("output.dense", "mlp.fc2"),
    ("layernorm_before",): ("layernorm_before", "layernorm_before"),
    ("layernorm_after",): ("layernorm_after", "layernorm_after"),
}
_LAYER_PREFIX = {"4.x": "encoder.layer.{}.", "5.x": "layers.{}."}
_LAYER_INDEX = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.")


class ViTMAEWeightsError(CheckpointError, ValueError):
  """A ViT-MAE state dict that does not fit (missing, unexpected or misshapen names)."""


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """{torch key: numpy array} from a local .safetensors or .bin/.pt/.pth file."""
  return read_state_dict(path, "ViT-MAE weights", ViTMAEWeightsError)


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str | None) -> dict[str, np.ndarray]:
  if prefix is None:
    found = sorted(k[: -len(_ANCHOR)] for k in state_dict if k.endswith(_ANCHOR))
    if len(found) != 1:
      raise ViTMAEWeightsError(
          f"not a ViT-MAE encoder state dict: expected one '...{_ANCHOR}' key, found "
          f"{len(found)} {found[:4]} (pass prefix= to pick one; first keys: "
          f"{sorted(state_dict)[:5]})")
    prefix = found[0]
  return {k[len(prefix):]: np.asarray(v) for k, v in state_dict.items() if k.startswith(prefix)}


def _scheme(sd: Mapping[str, Any]) -> str:
  new = any(k.startswith("layers.") for k in sd)
  old = any(k.startswith("encoder.layer.") for k in sd)
  if new and old:
    raise ViTMAEWeightsError("state dict mixes transformers 4.x ('encoder.layer.') and 5.x "
                             "('layers.') layer names")
  return "5.x" if new else "4.x"


def expected_names(depth: int, scheme: str = "4.x") -> dict[str, tuple[tuple[str, ...], str]]:
  """{HF name: (flax param path, layout)} of an encoder with `depth` layers; layout is one of
  'dense', 'conv', 'cls', 'vector' (LayerNorm and biases)."""
  names = {"embeddings.cls_token": (("cls_token",), "cls"),
           "embeddings.patch_embeddings.projection.weight": (("patch_embed", "kernel"), "conv"),
           "embeddings.patch_embeddings.projection.bias": (("patch_embed", "bias"), "vector"),
           "layernorm.weight": (("layernorm", "scale"), "vector"),
           "layernorm.bias": (("layernorm", "bias"), "vector")}
  for i in range(depth):
    head = _LAYER_PREFIX[scheme].format(i)
    for path, (old, new) in _LAYER_NAMES.items():
      hf = head + (old if scheme == "4.x" else new)
      is_norm = path[0].startswith("layernorm")
      names[hf + ".weight"] = ((f"layer_{i}", *path, "scale" if is_norm else "kernel"),
                               "vector" if is_norm else "dense")
      names[hf + ".bias"] = ((f"layer_{i}", *path, "bias"), "vector")
  return names


def _to_flax(layout: str, value: np.ndarray) -> np.ndarray:
  if layout == "dense":
    return value.T  # (out, in) -> (in, out)
  if layout == "conv":
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if layout == "cls":
    return value.reshape(-1)
  return value


def infer_fields(state_dict: Mapping[str, Any], prefix: str | None = None) -> dict:
  """StudyEncoder fields readable from the shapes: patch_size, hidden, depth, mlp, channels, and
  image_size when the position table is stored. (heads is not: pass it yourself.)"""
  sd = _strip_prefix(state_dict, prefix)
  if _ANCHOR not in sd:
    raise ViTMAEWeightsError(f"missing {prefix or ''}{_ANCHOR}: cannot read the encoder's widths "
                             f"(pass model= to have every missing name listed)")
  proj = sd[_ANCHOR]  # (D, C, p, p)
  layers = {int(m.group(1)) for k in sd for m in [_LAYER_INDEX.match(k)] if m}
  scheme = _scheme(sd)
  fc1 = sd.get(_LAYER_PREFIX[scheme].format(0) + _LAYER_NAMES[("fc1",)][scheme == "5.x"]
               + ".weight")
  fields = {"patch_size": int(proj.shape[-1]), "hidden": int(proj.shape[0]),
            "depth": max(layers) + 1 if layers else 0, "channels": int(proj.shape[1])}
  if fc1 is not None:
    fields["mlp"] = int(fc1.shape[0])
  if _POS in sd:
    grid = int(round(np.sqrt(sd[_POS].shape[-2] - 1)))
    fields["image_size"] = grid * fields["patch_size"]
  return fields


def expected_params(model: StudyEncoder) -> dict:
  """The abstract params tree (ShapeDtypeStructs) of `model`, without compute."""
  shape = (1, 1, model.image_size, model.image_size, model.channels)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)["params"]


def from_hf_vit_mae(state_dict: Mapping[str, Any], model: StudyEncoder | None = None, *,
                    prefix: str | None = None, check_positions: bool = True) -> dict:
  """StudyEncoder params (a float32 numpy tree, the contents of {'params': ...}) from a transformers
  ``ViTMAEModel`` state dict (numpy or torch arrays; either naming scheme, see the module
  docstring).

  model: the encoder the params are for; its depth, widths, patch and channels are checked.
    Default: one built from the file's shapes (``infer_fields``), which only checks that the file
    is self-consistent.
  prefix: the prefix before 'embeddings.' (default: found from the patch projection).
  check_positions: refuse a stored position table that is not ``sincos_2d``.
  Raises ViTMAEWeightsError (a ValueError) listing every missing name, unexpected name and shape
  mismatch.
  """
  sd = _strip_prefix(state_dict, prefix)
  scheme = _scheme(sd)
  grid = None if model is None else model.image_size // model.patch_size
  if model is None:
    fields = infer_fields(sd, prefix="")
    fields.setdefault("mlp", 4 * fields["hidden"])
    fields["image_size"] = fields["patch_size"]  # params do not depend on it
    model = StudyEncoder(heads=1, **fields)
  abstract = expected_params(model)
  names = expected_names(model.depth, scheme)
  missing = [k for k in names if k not in sd]
  unexpected = sorted(k for k in sd if k not in names and k != _POS)
  mismatched, params = [], {}
  for key, (path, layout) in names.items():
    if key not in sd:
      continue
    value = _to_flax(layout, np.asarray(sd[key], np.float32))
    want = abstract
    for p in path:
      want = want[p]
    if value.shape != want.shape:
      mismatched.append(f"{key}: file {tuple(sd[key].shape)} -> {value.shape}, model "
                        f"{tuple(want.shape)}")
      continue
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.ascontiguousarray(value)
  if missing or unexpected or mismatched:
    parts = [f"{label} ({len(items)}): {', '.join(items[:_SHOW])}"
             f"{' ...' if len(items) > _SHOW else ''}"
             for label, items in (("missing", missing), ("unexpected", unexpected),
                                  ("shape mismatch", mismatched)) if items]
    raise ViTMAEWeightsError(
        f"ViT-MAE state dict ({scheme} names) does not fit the encoder (depth={model.depth}, "
        f"hidden={model.hidden}, mlp={model.mlp}, patch_size={model.patch_size}, "
        f"channels={model.channels}): " + "; ".join(parts))
  if check_positions and _POS in sd:
    _check_positions(np.asarray(sd[_POS], np.float32), model.hidden, grid)
  return params


def _check_positions(table: np.ndarray, hidden: int, grid: int | None) -> None:
  """grid: the model's patches per side (None: whatever square grid the table has)."""
  table = table.reshape(-1, table.shape[-1])
  grid = grid or int(round(np.sqrt(table.shape[0] - 1)))
  if table.shape != (grid * grid + 1, hidden):
    raise ViTMAEWeightsError(f"{_POS} has shape {table.shape}, not {(grid * grid + 1, hidden)} "
                             f"(a {grid}x{grid} patch grid of width {hidden})")
  diff = float(np.max(np.abs(table - sincos_2d(hidden, grid))))
  if diff > 1e-5:
    raise ViTMAEWeightsError(
        f"{_POS} differs from the fixed 2-D sin-cos table by up to {diff:.3g}: the file was "
        f"trained with other positions (e.g. transformers 5.x's all-zero table of a freshly "
        f"built ViTMAEModel), which StudyEncoder cannot reproduce; pass check_positions=False "
        f"to convert anyway")


def load_vit_mae(path: str, model: StudyEncoder | None = None, **kwargs) -> dict:
  """StudyEncoder params from a local weights file; see ``from_hf_vit_mae``."""
  return from_hf_vit_mae(load_state_dict(path), model, **kwargs)
