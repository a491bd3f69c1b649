"""Reading a PyTorch state dict from a local file, for the weight converters beside each model.

Weights are never downloaded. safetensors files are read without torch; .pt / .pth / .bin files
need torch and are read with `torch.load(weights_only=True)`, never unpickling arbitrary objects.
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from cxrjax.core.errors import CheckpointError


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
  if ext in (".pt", ".pth", ".bin"):
    return _load_torch(path, error)
  raise error(f"{path}: unknown weights format {ext!r}; expected .safetensors, .pt, .pth or .bin")


def _load_torch(path: str, error) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise error(f"reading {path} needs torch: pip install 'cxrjax[torch]', or convert the file "
                f"to .safetensors elsewhere") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise error(f"cannot read {path} with torch.load(weights_only=True): {str(e).splitlines()[0]}. "
                f"If it pickles a whole model (torchxrayvision's .pt files do), re-save it once, "
                f"where you trust the file, as torch.save(model.state_dict(), ...) or as "
                f"safetensors") from e
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]  # Lightning / training-script checkpoints
  if not isinstance(obj, Mapping):
    raise error(f"{path} holds a {type(obj).__name__}, not a state dict")
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy()
          for k, v in obj.items() if isinstance(v, torch.Tensor)}
