"""torchvision ResNet (BasicBlock) state dicts -> ``models.resnet`` variables.

Reads a file the user already has (nothing is ever downloaded), e.g. torchvision's ImageNet
``resnet18-5c106cde.pth`` (v1) or ``resnet18-f37072fd.pth`` (v2 URL, same architecture), which
GMCD's image branch starts from (spec gmcd.md §2.1):
  *.safetensors        via safetensors.numpy (torch not needed; preferred)
  *.pt / *.pth / *.bin  via torch.load(weights_only=True): plain state dicts only.
An in-memory state dict (numpy arrays or torch tensors) converts with ``convert_state_dict``.

Keys: torchvision names (``conv1.weight``, ``bn1.*``, ``layer{s}.{b}.{conv1,bn1,conv2,bn2}.*``,
``layer{s}.0.downsample.{0,1}.*``, ``fc.{weight,bias}``). A prefix before them (``module.`` from
DataParallel, ``model.`` from Lightning, ``path_net.`` from a GMCD checkpoint) is found from where
``layer1.0.conv1.weight`` sits, and keys outside it are ignored; ``num_batches_tracked`` is not a
weight. A model without a head (``num_classes=None``) ignores the file's ``fc.*``, as the seed's
``load_state_dict(strict=False)`` drops the ImageNet classifier.

Layouts: conv OIHW -> HWIO, linear (out, in) -> (in, out); BN weight/bias -> scale/bias and
running_mean/var -> batch_stats mean/var.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from cxrjax.core.errors import CheckpointError
from cxrjax.models.resnet import ResNet
from cxrjax.models.state_dicts import (TORCH_LEAF, expected_variables, fill_variables,
                                       load_state_dict as read_state_dict)

_ANCHOR = "layer1.0.conv1.weight"
_IGNORED = ("num_batches_tracked",)  # a buffer that is not a weight


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """{torch key: numpy array} from a local .safetensors or .pt/.pth/.bin file."""
  return read_state_dict(path, "ResNet weights")


def normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Strips the prefix before torchvision's names, drops keys outside it and non-weights;
  values become numpy arrays (torch tensors are detached and moved to the CPU)."""
  anchors = sorted(k[: -len(_ANCHOR)] for k in state_dict if k.endswith(_ANCHOR))
  if len(anchors) != 1:
    raise CheckpointError(f"not a ResNet state dict: expected one '...{_ANCHOR}' key, found "
                          f"{len(anchors)} {anchors[:4]} (first keys: {sorted(state_dict)[:5]})")
  prefix = anchors[0]
  out = {}
  for k, v in state_dict.items():
    if not k.startswith(prefix) or k.split(".")[-1] in _IGNORED:
      continue  # e.g. a GMCD checkpoint's omic branch, or a Lightning loss module
    out[k[len(prefix):]] = _numpy(v)
  return out


def _numpy(v: Any) -> np.ndarray:
  if hasattr(v, "detach"):  # a torch tensor, without importing torch
    v = v.detach().cpu()
    return (v.float() if str(v.dtype) == "torch.bfloat16" else v).numpy()
  return np.asarray(v)


def infer_config(state_dict: Mapping[str, Any]) -> dict:
  """ResNet fields (stage_sizes, num_classes (None without 'fc'), num_init_features) and the input
  channels `in_chans`, read from the keys and shapes of a state dict."""
  sd = normalize_keys(state_dict)
  if any(re.match(r"layer\d+\.\d+\.conv3\.", k) for k in sd):
    raise CheckpointError("the state dict holds a Bottleneck ResNet (ResNet-50 and deeper; "
                          "'conv3' in its blocks); models.resnet builds BasicBlock ResNets only")
  stages: dict[int, int] = {}
  for k in sd:
    m = re.match(r"layer(\d+)\.(\d+)\.", k)
    if m:
      s, b = int(m.group(1)), int(m.group(2))
      stages[s] = max(stages.get(s, 0), b + 1)
  if sorted(stages) != list(range(1, len(stages) + 1)) or "conv1.weight" not in sd:
    raise CheckpointError(f"cannot read the ResNet stages from the state dict (stages {stages}, "
                          f"'conv1.weight' {'present' if 'conv1.weight' in sd else 'missing'})")
  conv1 = sd["conv1.weight"]  # (O, I, 7, 7)
  fc = sd.get("fc.weight")
  return {"stage_sizes": tuple(stages[s] for s in sorted(stages)),
          "num_classes": None if fc is None else int(fc.shape[0]),
          "num_init_features": int(conv1.shape[0]), "in_chans": int(conv1.shape[1])}


def torch_key(path: Sequence[str]) -> str:
  """Flax variable path -> torchvision state-dict key, e.g. ('layer2', '0', 'downsample', '1',
  'mean') -> 'layer2.0.downsample.1.running_mean'. The leaf names alone decide the suffix
  (params and batch_stats names never collide), the module names are torchvision's."""
  *modules, leaf = path
  return ".".join(modules) + "." + TORCH_LEAF[leaf]


def convert_state_dict(state_dict: Mapping[str, Any], model: ResNet, *, in_chans: int | None = None,
                       skip: Sequence[str] = ()) -> dict:
  """{'params', 'batch_stats'} float32 numpy trees for `model` from a torchvision ResNet state dict.

  state_dict: {key: numpy array or torch tensor}, e.g. ``torch_model.state_dict()`` or
    ``load_state_dict(path)``.
  in_chans: input channels (default: read from conv1.weight).
  skip: top-level flax modules left out of the result and not required in the file, e.g.
    ('fc',) to put a new head on a pretrained backbone; the file's own entries for them are then
    ignored. 'fc' is always skipped when model.num_classes is None.
  Raises CheckpointError naming every missing key, unexpected key and shape mismatch.
  """
  sd = normalize_keys(state_dict)
  if "conv1.weight" not in sd:
    raise CheckpointError("ResNet state dict lacks 'conv1.weight' (the stem convolution)")
  skip = tuple(skip) + (("fc",) if model.num_classes is None else ())
  in_chans = in_chans or int(sd["conv1.weight"].shape[1])
  return fill_variables(
      sd, expected_variables(model, in_chans), torch_key=torch_key, skip=skip,
      skipped=lambda key: key.split(".")[0] in skip,
      describe=f"ResNet state dict does not fit the model (stage_sizes="
               f"{tuple(model.stage_sizes)}, num_classes={model.num_classes}, in_chans={in_chans})")


def load_resnet(path: str, **model_kwargs) -> tuple[ResNet, dict]:
  """(model, variables) from a local weights file, the architecture read from its keys and shapes.

  model_kwargs: further ResNet fields (dtype, num_classes=None for a headless backbone, ...);
  stage_sizes and num_init_features given here must agree with the file; num_classes=None
  drops the file's head, any other value must agree with it.
  """
  raw = load_state_dict(path)
  arch = infer_config(raw)
  in_chans = arch.pop("in_chans")
  for k in ("stage_sizes", "num_init_features"):
    if k in model_kwargs and tuple(np.atleast_1d(model_kwargs[k])) != tuple(np.atleast_1d(arch[k])):
      raise CheckpointError(f"{path} holds a ResNet with {k}={arch[k]}, not {model_kwargs[k]}")
  if model_kwargs.get("num_classes", arch["num_classes"]) not in (None, arch["num_classes"]):
    raise CheckpointError(f"{path} holds a ResNet with num_classes={arch['num_classes']}, not "
                          f"{model_kwargs['num_classes']} (pass num_classes=None for the backbone "
                          f"and put a new head on it)")
  model = ResNet(**{**arch, **model_kwargs})
  return model, convert_state_dict(raw, model, in_chans=in_chans)
