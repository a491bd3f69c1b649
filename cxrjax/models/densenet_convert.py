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

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core.errors import CheckpointError
from cxrjax.models.state_dicts import load_state_dict as read_state_dict
from cxrjax.models.densenet import DenseNet

# torchvision.models.densenet._load_state_dict: 'denselayer1.norm.1.weight' -> 'denselayer1.norm1.weight'.
_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
_IGNORED = ("num_batches_tracked", "op_threshs")  # buffers that are not weights
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
         "var": "running_var"}
_SHOW = 12  # names listed per problem kind in an error message


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


def torch_key(collection: str, path: Sequence[str]) -> str:
  """Flax variable path -> torchvision state-dict key, e.g. ('denseblock1', 'denselayer1', 'conv1',
  'kernel') -> 'features.denseblock1.denselayer1.conv1.weight'."""
  *modules, leaf = path
  del collection  # the leaf names alone decide: params and batch_stats names never collide
  name = _LEAF[leaf]
  head = "" if modules[0] == "classifier" else "features."
  return head + ".".join(modules) + "." + name


def _to_flax(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if leaf == "kernel" and value.ndim == 2:
    return value.T  # (out, in) -> (in, out)
  return value


def expected_variables(model: DenseNet, in_chans: int) -> dict:
  """Abstract {'params', 'batch_stats'} of `model` for `in_chans`-channel inputs (no compute)."""
  x = jax.ShapeDtypeStruct((1, 32, 32, in_chans), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)


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
  abstract = expected_variables(model, in_chans)
  out: dict = {}
  missing, mismatched, used = [], [], set()
  for collection in ("params", "batch_stats"):
    flat = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(abstract[collection])[0]:
      path = tuple(p.key for p in kp)
      if path[0] in skip:
        continue
      key = torch_key(collection, path)
      used.add(key)
      if key not in sd:
        missing.append(key)
        continue
      value = _to_flax(path[-1], sd[key])
      if value.shape != leaf.shape:
        mismatched.append(f"{key}: file {tuple(sd[key].shape)} -> {value.shape}, model "
                          f"{tuple(leaf.shape)}")
        continue
      flat[path] = np.asarray(value, np.float32)
    out[collection] = _unflatten(flat)
  unexpected = sorted(k for k in sd if k not in used and not _skipped(k, skip))
  if missing or unexpected or mismatched:
    parts = [f"{label} ({len(items)}): {', '.join(items[:_SHOW])}{' ...' if len(items) > _SHOW else ''}"
             for label, items in (("missing", missing), ("unexpected", unexpected),
                                  ("shape mismatch", mismatched)) if items]
    raise CheckpointError(f"DenseNet state dict does not fit the model (block_config="
                          f"{tuple(model.block_config)}, num_classes={model.num_classes}, "
                          f"in_chans={in_chans}): " + "; ".join(parts))
  return out


def _skipped(key: str, skip: Sequence[str]) -> bool:
  return any(key.startswith((f"{s}.", f"features.{s}.")) for s in skip)


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return tree


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
