"""torchvision / torchxrayvision DenseNet state dicts -> ``models.densenet`` variables.

Reads a file the user already has (nothing is ever downloaded):
  *.safetensors        via safetensors.numpy (torch not needed; preferred)
  *.pt / *.pth / *.bin  via torch.load(weights_only=True): plain state dicts only, never a pickled
                       module (torchxrayvision's own .pt files pickle the whole model; re-save those
                       as a state dict or safetensors once, in an environment you trust).

Key conventions handled: torchvision names (``features.conv0.weight``, ``features.norm0.*``,
``features.denseblock{b}.denselayer{l}.{norm1,conv1,norm2,conv2}.*``, ``features.transition{b}.*``,
``features.norm5.*``, ``classifier.{weight,bias}``); pre-0.4 checkpoints with ``norm.1``/``conv.2``
(fixed by the regex torchvision's own loader uses); a prefix before ``features.`` (``module.``
from DataParallel, ``model.`` from Lightning), found from where ``features.conv0.weight`` sits;
``num_batches_tracked`` and torchxrayvision's ``op_threshs`` buffers are not weights (the latter is
returned by ``load_densenet`` for calibrated outputs).

Layouts: conv OIHW -> HWIO, linear (out, in) -> (in, out); BN weight/bias -> scale/bias and
running_mean/var -> batch_stats mean/var.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from cxrjax.core.errors import CheckpointError
from cxrjax.models.state_dicts import (TORCH_LEAF, expected_variables, fill_variables,
                                       load_state_dict as read_state_dict)
from cxrjax.models.densenet import DenseNet

# torchvision.models.densenet._load_state_dict: 'denselayer1.norm.1.weight' -> 'denselayer1.norm1.weight'.
_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
_IGNORED = ("num_batches_tracked", "op_threshs")  # buffers that are not weights


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """{torch key: numpy array} from a local .safetensors or .pt/.pth/.bin file."""
  return read_state_dict(path, "DenseNet weights")


def normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Strips any prefix before 'features.'/'classifier.', fixes legacy names, drops non-weights."""
  anchors = [k[: -len("features.conv0.weight")] for k in state_dict
             if k.endswith("features.conv0.weight")]
  if len(anchors) != 1:
    raise CheckpointError(f"not a DenseNet state dict: expected one '...features.conv0.weight' "
                          f"key, found {len(anchors)} (first keys: {sorted(state_dict)[:5]})")
  prefix = anchors[0]
  out = {}
  for k, v in state_dict.items():
    if not k.startswith(prefix):
      continue  # e.g. a Lightning checkpoint's loss or teacher modules
    k = k[len(prefix):]
    if k.split(".")[-1] in _IGNORED:
      continue
    m = _LEGACY.match(k)
    out[m.group(1) + m.group(2) if m else k] = np.asarray(v)
  return out


def infer_config(state_dict: Mapping[str, Any]) -> dict:
  """DenseNet fields (block_config, num_classes, growth_rate, bn_size, num_init_features) and the
  input channels `in_chans`, read from the shapes of a (normalised) state dict."""
  sd = normalize_keys(state_dict)
  blocks: dict[int, int] = {}
  for k in sd:
    m = re.match(r"features\.denseblock(\d+)\.denselayer(\d+)\.", k)
    if m:
      b, l = int(m.group(1)), int(m.group(2))
      blocks[b] = max(blocks.get(b, 0), l)
  if not blocks or sorted(blocks) != list(range(1, len(blocks) + 1)):
    raise CheckpointError(f"cannot read the dense blocks from the state dict (found {blocks})")
  conv0 = sd["features.conv0.weight"]  # (O, I, 7, 7)
  conv2 = sd.get("features.denseblock1.denselayer1.conv2.weight")  # (growth, bn*growth, 3, 3)
  if conv2 is None or "classifier.weight" not in sd:
    missing = [k for k in ("features.denseblock1.denselayer1.conv2.weight", "classifier.weight")
               if k not in sd]
    raise CheckpointError(f"state dict lacks {missing}")
  return {"block_config": tuple(blocks[b] for b in sorted(blocks)),
          "num_classes": int(sd["classifier.weight"].shape[0]),
          "growth_rate": int(conv2.shape[0]), "bn_size": int(conv2.shape[1] // conv2.shape[0]),
          "num_init_features": int(conv0.shape[0]), "in_chans": int(conv0.shape[1])}


def torch_key(path: Sequence[str]) -> str:
  """Flax variable path -> torchvision state-dict key, e.g. ('denseblock1', 'denselayer1', 'conv1',
  'kernel') -> 'features.denseblock1.denselayer1.conv1.weight' (the leaf names alone decide the
  suffix: params and batch_stats names never collide)."""
  *modules, leaf = path
  head = "" if modules[0] == "classifier" else "features."
  return head + ".".join(modules) + "." + TORCH_LEAF[leaf]


def convert_state_dict(state_dict: Mapping[str, Any], model: DenseNet, *, in_chans: int | None = None,
                       skip: Sequence[str] = ()) -> dict:
  """{'params', 'batch_stats'} float32 numpy trees for `model` from a torch DenseNet state dict.

  in_chans: input channels (default: read from features.conv0.weight).
  skip: top-level flax modules left out of the result and not required in the file, e.g.
    ('classifier',) to put a new head (another num_classes) on a pretrained backbone; the file's
    own entries for them are then ignored.
  Raises CheckpointError naming every missing key, unexpected key and shape mismatch.
  """
  sd = normalize_keys(state_dict)
  in_chans = in_chans or int(sd["features.conv0.weight"].shape[1])
  return fill_variables(
      sd, expected_variables(model, in_chans), torch_key=torch_key, skip=tuple(skip),
      skipped=lambda key: any(key.startswith((f"{s}.", f"features.{s}.")) for s in skip),
      describe=f"DenseNet state dict does not fit the model (block_config="
               f"{tuple(model.block_config)}, num_classes={model.num_classes}, in_chans={in_chans})")


def load_densenet(path: str, **model_kwargs) -> tuple[DenseNet, dict, dict]:
  """(model, variables, extras) from a local weights file, the architecture read from its shapes.

  model_kwargs: further DenseNet fields (dtype, remat, concat, ...); architecture fields given
  here must agree with the file. extras: {'in_chans': int, 'op_threshs': (num_classes,) array
  or None} (torchxrayvision's operating thresholds, for its calibrated outputs).
  """
  raw = load_state_dict(path)
  arch = infer_config(raw)
  in_chans = arch.pop("in_chans")
  for k, v in model_kwargs.items():
    if k in arch and tuple(np.atleast_1d(arch[k])) != tuple(np.atleast_1d(v)):
      raise CheckpointError(f"{path} holds a DenseNet with {k}={arch[k]}, not {v}")
  model = DenseNet(**{**arch, **model_kwargs})
  variables = convert_state_dict(raw, model, in_chans=in_chans)
  ops = next((np.asarray(v) for k, v in raw.items() if k.split(".")[-1] == "op_threshs"), None)
  return model, variables, {"in_chans": in_chans, "op_threshs": ops}
