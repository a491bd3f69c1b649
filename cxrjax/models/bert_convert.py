"""A local Hugging Face BERT checkpoint directory -> ``models.bert`` module and variables (spec C.4).

The directory is what ``save_pretrained`` writes (or a copy of microsoft/BiomedVLP-CXR-BERT-
specialized the user downloaded): ``config.json`` plus ``model.safetensors`` (or a sharded
``model.safetensors.index.json``) or ``pytorch_model.bin`` (read with torch.load(weights_only=True)).
Nothing is downloaded.

Names: ``BertModel`` keys (``embeddings.*``, ``encoder.layer.{i}.*``) or the same under ``bert.``
(``BertForMaskedLM``, and CXR-BERT's ``CXRBertModel`` which subclasses it). ``cls.predictions.*``
fills the MLM head when the file has it (or when asked, ``mlm_head=True``). Ignored: the pooler,
the ``position_ids`` / ``token_type_ids`` buffers older files store, BertForPreTraining's
next-sentence head and CXR-BERT's 128-d ``cls_projection_head`` (RayGen reads the hidden states,
not the projection). The decoder ``cls.predictions.decoder.weight``, when stored, must equal the
word embeddings: ``MlmHead`` ties them. TF-era ``LayerNorm.gamma`` / ``.beta`` names are accepted.

Every missing, unexpected or misshapen name is listed in one error; nothing half-converted is
returned.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core.errors import CheckpointError
from cxrjax.models.bert import Bert, BertMaskedLM
from cxrjax.models.state_dicts import fill_variables, load_state_dict

_IGNORED_PREFIXES = ("pooler.", "cls.seq_relationship.", "cls_projection_head.")
_IGNORED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")
_DECODER = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
# Flax module name -> HF name, at the top of Bert, inside layer_{i}, inside MlmHead.
_TOP = {"word_embeddings": "embeddings.word_embeddings",
        "position_embeddings": "embeddings.position_embeddings",
        "token_type_embeddings": "embeddings.token_type_embeddings",
        "embeddings_norm": "embeddings.LayerNorm"}
_LAYER = {"query": "attention.self.query", "key": "attention.self.key",
          "value": "attention.self.value", "attention_out": "attention.output.dense",
          "attention_norm": "attention.output.LayerNorm", "intermediate": "intermediate.dense",
          "output": "output.dense", "output_norm": "output.LayerNorm"}
_HEAD = {"transform": "cls.predictions.transform.dense",
         "transform_norm": "cls.predictions.transform.LayerNorm"}
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# config.json name -> Bert field, with BertConfig's defaults for files that leave one out.
_FIELDS = {"vocab_size": ("vocab_size", 30522), "hidden_size": ("hidden", 768),
           "num_hidden_layers": ("layers", 12), "num_attention_heads": ("heads", 12),
           "intermediate_size": ("intermediate", 3072),
           "max_position_embeddings": ("max_positions", 512),
           "type_vocab_size": ("type_vocab", 2), "layer_norm_eps": ("layer_norm_eps", 1e-12),
           "hidden_dropout_prob": ("dropout", 0.1),
           "attention_probs_dropout_prob": ("attention_dropout", 0.1)}


class BertWeightsError(CheckpointError, ValueError):
  """A BERT checkpoint directory that does not fit (config, names, shapes, vocabulary)."""


def read_config(checkpoint_dir: str) -> dict:
  """``Bert`` fields from ``<checkpoint_dir>/config.json``; refuses what Bert cannot compute."""
  path = os.path.join(checkpoint_dir, "config.json")
  if not os.path.isfile(path):
    raise BertWeightsError(f"{path} does not exist: pass a Hugging Face checkpoint directory "
                           f"(config.json + model.safetensors or pytorch_model.bin)")
  with open(path) as f:
    cfg = json.load(f)
  act = cfg.get("hidden_act", "gelu")
  position = cfg.get("position_embedding_type", "absolute")
  if act != "gelu" or position != "absolute" or cfg.get("is_decoder") or cfg.get(
      "add_cross_attention"):
    raise BertWeightsError(f"{path}: only an encoder with hidden_act='gelu' and absolute positions "
                           f"is supported, got hidden_act={act!r}, position_embedding_type="
                           f"{position!r}, is_decoder={cfg.get('is_decoder')}")
  return {field: type(default)(cfg.get(name, default)) for name, (field, default) in _FIELDS.items()}


def _weights_file(checkpoint_dir: str) -> list[str]:
  for name in ("model.safetensors", "pytorch_model.bin"):
    path = os.path.join(checkpoint_dir, name)
    if os.path.isfile(path):
      return [path]
  index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(checkpoint_dir, s) for s in shards]
  raise BertWeightsError(f"{checkpoint_dir} holds no model.safetensors, model.safetensors.index."
                         f"json or pytorch_model.bin (weights are never downloaded)")


def normalize_names(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """HF keys -> BertModel names (the ``bert.`` prefix removed; ``cls.*`` kept), gamma/beta ->
  weight/bias, numpy arrays."""
  prefixed = any(k.startswith("bert.") for k in state_dict)
  out = {}
  for key, value in state_dict.items():
    if prefixed and key.startswith("bert."):
      key = key[len("bert."):]
    if "LayerNorm." in key:
      key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                       "LayerNorm.bias")
    out[key] = np.asarray(value)
  return out


def _torch_key(path: tuple) -> str:
  """Flax param path (under 'params') -> HF name; paths of BertMaskedLM start with bert / head."""
  if path[0] == "bert":
    path = path[1:]
  elif path[0] == "head":
    return "cls.predictions.bias" if path[1] == "bias" else f"{_HEAD[path[1]]}.{_LEAF[path[-1]]}"
  if path[0].startswith("layer_"):
    return f"encoder.layer.{path[0][len('layer_'):]}.{_LAYER[path[1]]}.{_LEAF[path[-1]]}"
  return f"{_TOP[path[0]]}.{_LEAF[path[-1]]}"


def _ignored(key: str) -> bool:
  return key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES)


def _check_decoder(sd: dict[str, np.ndarray], describe: str) -> None:
  """The tied decoder: its weight (when stored) must be the word embeddings, its bias the head's."""
  weight, bias = (sd.pop(k, None) for k in _DECODER)
  table = sd.get("embeddings.word_embeddings.weight")
  if weight is not None and table is not None and (
      weight.shape != table.shape or not np.array_equal(weight, table)):
    raise BertWeightsError(f"{describe}: cls.predictions.decoder.weight differs from the word "
                           f"embeddings; MlmHead ties them (untied decoders are not supported)")
  if bias is not None:
    stored = sd.setdefault("cls.predictions.bias", bias)
    if stored.shape != bias.shape or not np.array_equal(stored, bias):
      raise BertWeightsError(f"{describe}: cls.predictions.decoder.bias differs from "
                             f"cls.predictions.bias (transformers ties them)")


def expected_variables(module: Bert | BertMaskedLM) -> dict:
  """Abstract variables of ``module`` (no compute)."""
  ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  return jax.eval_shape(lambda i: module.init(jax.random.PRNGKey(0), i), ids)


def convert(state_dict: Mapping[str, Any], module: Bert | BertMaskedLM,
            describe: str = "BERT state dict") -> dict:
  """{'params': float32 numpy tree} of ``module`` from a transformers BERT state dict."""
  sd = normalize_names(state_dict)
  _check_decoder(sd, describe)
  masked_lm = isinstance(module, BertMaskedLM)
  bert = module.bert if masked_lm else module
  ignored = _ignored if masked_lm else (lambda k: _ignored(k) or k.startswith("cls.predictions."))
  abstract = expected_variables(module)
  describe = (f"{describe} does not fit {'BertMaskedLM' if masked_lm else 'Bert'}(layers="
              f"{bert.layers}, hidden={bert.hidden}, heads={bert.heads}, intermediate="
              f"{bert.intermediate}, vocab_size={bert.vocab_size}, max_positions="
              f"{bert.max_positions})")
  try:
    out = fill_variables(sd, abstract, torch_key=_torch_key, skip=(), skipped=ignored,
                         describe=describe)
  except CheckpointError as e:  # the shared helper's class; callers catch this module's
    raise BertWeightsError(str(e)) from None
  return {"params": out["params"]}


def load_bert(checkpoint_dir: str, *, mlm_head: bool | None = None, tokenizer: Any = None,
              **overrides) -> tuple[Bert | BertMaskedLM, dict]:
  """(module, {'params': ...}) from a local HF checkpoint directory.

  mlm_head: None builds ``BertMaskedLM`` when the file stores ``cls.predictions`` and ``Bert``
    otherwise; True requires the head; False always returns the bare ``Bert`` (head ignored).
  tokenizer: when given, ``check_vocab(tokenizer, variables)`` runs before returning.
  overrides: ``Bert`` fields replacing the config's (e.g. dropout=0.0, dtype=jnp.bfloat16).
  Raises BertWeightsError (a CheckpointError and ValueError) in one line.
  """
  fields = {**read_config(checkpoint_dir), **overrides}
  try:
    bert = Bert(**fields)
  except TypeError as e:
    raise BertWeightsError(f"bad Bert override: {e}") from e
  files = _weights_file(checkpoint_dir)
  state_dict: dict = {}
  for path in files:
    state_dict.update(load_state_dict(path, "BERT weights", BertWeightsError))
  has_head = any(k.startswith(("cls.predictions.", "bert.cls.predictions.")) for k in state_dict)
  if mlm_head and not has_head:
    raise BertWeightsError(f"{files[0]} has no cls.predictions.* (MLM head) weights; pass "
                           f"mlm_head=None or False for the encoder alone")
  module = BertMaskedLM(bert) if (has_head if mlm_head is None else mlm_head) else bert
  variables = convert(state_dict, module, describe=os.path.basename(files[0]))
  if tokenizer is not None:
    check_vocab(tokenizer, variables)
  return module, variables


def _vocab_size(tokenizer: Any) -> int:
  """Vocabulary size of a wordpiece.TextTokenizer, a tokenizers.Tokenizer or an HF tokenizer."""
  for attr in ("get_vocab_size", "vocab_size"):
    value = getattr(tokenizer, attr, None)
    if value is not None:
      return int(value() if callable(value) else value)
  return len(tokenizer)


def check_vocab(tokenizer: Any, variables: Mapping[str, Any]) -> None:
  """Refuses a tokenizer whose vocabulary size differs from the word-embedding rows (ids past the
  table would be clamped silently by a gather; ids short of it mean another vocabulary)."""
  params = variables["params"]
  params = params.get("bert", params)
  rows = int(params["word_embeddings"]["embedding"].shape[0])
  size = _vocab_size(tokenizer)
  if size != rows:
    raise BertWeightsError(f"tokenizer vocabulary has {size} tokens but the word embeddings have "
                           f"{rows} rows: the tokenizer and the weights come from different models")
