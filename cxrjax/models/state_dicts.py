"""Reading a PyTorch state dict from a local file, and filling a Flax model's variables from it: the
shared half of the weight converters beside each model (densenet_convert, resnet_convert).

Weights are never downloaded. safetensors files are read without torch; .pt / .pth / .bin files
need torch and are read with `torch.load(weights_only=True)`, never unpickling arbitrary objects.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import unflatten_dict

from cxrjax.core.errors import CheckpointError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch colours parts of its unpickling errors


def load_state_dict(path: str, what: str = "weights", error=CheckpointError) -> dict[str, np.ndarray]:
  """{torch key: numpy array} from a local .safetensors or .pt/.pth/.bin file.

  what: how messages name the weights (e.g. 'DenseNet weights'); error: the exception class raised
  (a CheckpointError subclass), with a message that says what to do.
  """
  if not os.path.isfile(path):
    raise error(f"{what} file {path} does not exist (weights are never downloaded: pass a local "
                f"state dict)")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise error(f"reading {path} needs safetensors: pip install 'cxrjax[torch]' (or just "
                  f"safetensors)") from e
    try:
      return dict(load_file(path))
    except Exception as e:  # a truncated or foreign file: say which and why
      raise error(f"cannot read {path} as safetensors: {e}") from e
  if ext in (".pt", ".pth", ".bin", ".ckpt"):  # .ckpt: Lightning's name for the same format
    return _load_torch(path, error)
  raise error(f"{path}: unknown weights format {ext!r}; expected .safetensors, .pt, .pth, .bin "
              f"or .ckpt")


def _load_torch(path: str, error) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise error(f"reading {path} needs torch: pip install 'cxrjax[torch]', or convert the file "
                f"to .safetensors elsewhere") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    first = _ANSI.sub("", str(e).strip()).splitlines()[0] if str(e).strip() else type(e).__name__
    raise error(f"cannot read {path} with torch.load(weights_only=True): {first}. "
                f"If it pickles a whole model (torchxrayvision's .pt files do), re-save it once, "
                f"where you trust the file, as torch.save(model.state_dict(), ...) or as "
                f"safetensors") from e
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]  # Lightning / training-script checkpoints
  if not isinstance(obj, Mapping):
    raise error(f"{path} holds a {type(obj).__name__}, not a state dict")
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy()
          for k, v in obj.items() if isinstance(v, torch.Tensor)}


# Flax leaf -> torch leaf: conv / linear kernels and BatchNorm scale are torch 'weight', running
# statistics live in batch_stats as mean / var.
TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
              "var": "running_var"}
_SHOW = 12  # names listed per problem kind in an error message


def to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  """A torch tensor in Flax's layout: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  return value


def expected_variables(model, in_chans: int) -> dict:
  """Abstract {'params', 'batch_stats'} of an image model called as model(x, train=False) on
  `in_chans`-channel NHWC inputs (no compute)."""
  x = jax.ShapeDtypeStruct((1, 32, 32, in_chans), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)


def fill_variables(state_dict: Mapping[str, np.ndarray], abstract: Mapping[str, Any], *,
                   torch_key: Callable[[tuple], str], skip: Sequence[str],
                   skipped: Callable[[str], bool], describe: str) -> dict:
  """{'params', 'batch_stats'} float32 numpy trees shaped as `abstract`, read from a normalised
  state dict: each Flax path (its first module not in `skip`) names its torch key by `torch_key`.

  Raises CheckpointError("<describe>: missing (n): ...; unexpected (n): ...; shape mismatch (n):
  ...") naming every problem at once; keys for which `skipped(key)` is true are not unexpected.
  """
  out: dict = {}
  missing, mismatched, used = [], [], set()
  for collection in ("params", "batch_stats"):
    flat = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(abstract.get(collection, {}))[0]:
      path = tuple(p.key for p in kp)
      if path[0] in skip:
        continue
      key = torch_key(path)
      used.add(key)
      if key not in state_dict:
        missing.append(key)
        continue
      value = to_flax_layout(path[-1], state_dict[key])
      if value.shape != leaf.shape:
        mismatched.append(f"{key}: file {tuple(state_dict[key].shape)} -> {value.shape}, model "
                          f"{tuple(leaf.shape)}")
        continue
      flat[path] = np.asarray(value, np.float32)
    out[collection] = unflatten_dict(flat)
  unexpected = sorted(k for k in state_dict if k not in used and not skipped(k))
  if missing or unexpected or mismatched:
    parts = [f"{label} ({len(items)}): {', '.join(items[:_SHOW])}"
             f"{' ...' if len(items) > _SHOW else ''}"
             for label, items in (("missing", missing), ("unexpected", unexpected),
                                  ("shape mismatch", mismatched)) if items]
    raise CheckpointError(f"{describe}: " + "; ".join(parts))
  return out
