"""RayGen's text side: the WordPiece vocabulary and the BERT text encoder (spec C.4), trained on the
training reports by masked-language modelling unless `text.init_from` names a published checkpoint
(CXR-BERT's directory: its vocab and weights), and frozen afterwards as in the seed.

`TextEncoder.states(ids, mask)` is what the generator reads: the last hidden states, normalised as
text.normalize says ('sequence' = the seed's F.normalize(h, dim=1), 'token' = per token).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from cxrjax.core.errors import ConfigError
from cxrjax.core.task import Task, rbg_init_key
from cxrjax.core.predict import sharded_map
from cxrjax.core.stage import Run
from cxrjax.core.writers import say
from cxrjax.data.iterators import ShuffledBatches
from cxrjax.data.wordpiece import TextTokenizer, load_tokenizer, train_wordpiece
from cxrjax.losses.mlm import mask_tokens, mlm_loss
from cxrjax.models.bert import Bert, BertMaskedLM, normalize_text_states
from cxrjax.models.bert_convert import load_bert

VOCAB_STAMP = "stamp.json"


def vocabulary(texts: list, tc, workdir: str) -> TextTokenizer:
  """The tokenizer: CXR-BERT's (or any) from text.init_from, else a WordPiece vocabulary trained
  on `texts` once into <workdir>/wordpiece (reused when its stamp matches; a vocabulary trained on
  other texts or sizes is refused rather than silently mixed with a checkpoint built on it)."""
  if tc.init_from:
    return TextTokenizer(load_tokenizer(tc.init_from), max_length=tc.max_length)
  out = os.path.join(workdir, "wordpiece")
  stamp = {"vocab_size": tc.vocab_size,
           "texts": hashlib.sha1("\n".join(texts).encode("utf-8")).hexdigest()}
  stamp_path = os.path.join(out, VOCAB_STAMP)
  if os.path.exists(stamp_path):
    with open(stamp_path) as f:
      found = json.load(f)
    if found != stamp:
      raise ConfigError(f"{out} holds a vocabulary trained on other reports or another "
                        f"text.vocab_size ({found} vs {stamp}); use a fresh --workdir")
    return TextTokenizer(load_tokenizer(out), max_length=tc.max_length)
  if jax.process_index() == 0:
    train_wordpiece(texts, tc.vocab_size, out)
    with open(stamp_path, "w") as f:
      json.dump(stamp, f)
  if jax.process_count() > 1:  # the others read what process 0 wrote (a shared workdir)
    multihost_utils.sync_global_devices("raygen_wordpiece_written")
  tokenizer = TextTokenizer(load_tokenizer(out), max_length=tc.max_length)
  # text.vocab_size is an upper bound: a small corpus runs out of pieces before it
  say(f"[text] WordPiece vocabulary of {tokenizer.get_vocab_size()} pieces (at most "
      f"{tc.vocab_size}) trained on {len(texts)} reports -> {out}")
  return tokenizer


def bert(tc, vocab_size: int) -> BertMaskedLM:
  return BertMaskedLM(Bert(vocab_size=vocab_size, hidden=tc.hidden, layers=tc.layers,
                           heads=tc.heads, intermediate=tc.intermediate,
                           max_positions=max(tc.max_length, 16), dropout=tc.dropout))


@functools.lru_cache(maxsize=8)
def mlm_task(model: BertMaskedLM, max_length: int, mask_id: int, special_ids: tuple,
             rate: float) -> Task:
  """BERT's MLM on {'tokens': (B, L) int32, 'token_mask': (B, L) bool}: 15 % of the real pieces
  chosen (80 % [MASK], 10 % random, 10 % kept), cross-entropy over the chosen ones."""
  vocab = model.bert.vocab_size

  def init(rng):
    ids = jnp.zeros((1, max_length), jnp.int32)
    return dict(model.init(rbg_init_key(rng), ids, jnp.ones((1, max_length), bool)))

  def loss(params, batch, ctx):
    k_mask, k_drop = jax.random.split(ctx.rng)
    inputs, targets, chosen = mask_tokens(k_mask, batch["tokens"], batch["token_mask"], mask_id,
                                          vocab, special_ids, rate)
    logits = model.apply({"params": params}, inputs, batch["token_mask"], deterministic=False,
                         rngs={"dropout": k_drop})
    value, accuracy = mlm_loss(logits, targets, chosen)
    return value, {"terms": {"mlm": value, "accuracy": accuracy}}

  return Task("text", init, loss=loss)


@functools.lru_cache(maxsize=8)
def _mlm_counts(model: BertMaskedLM):
  """fn(batch, params) -> (B, 3): per row the masked count, correct count and summed NLL."""

  def fn(batch, params):
    logits = model.apply({"params": params}, batch["inputs"], batch["token_mask"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    w = batch["chosen"].astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    return jnp.stack([w.sum(1), (correct * w).sum(1), (nll * w).sum(1)], axis=1)

  return fn


def mlm_metrics(model, params, masked: dict, mesh, batch_size: int) -> dict:
  """MLM accuracy and loss over every chosen piece of a fixed masking of a split."""
  counts = sharded_map(_mlm_counts(model), masked, mesh, batch_size=batch_size, params=params)
  n, correct, nll = counts.sum(axis=0)
  return {"mlm_accuracy": float(correct / max(n, 1.0)), "mlm_loss": float(nll / max(n, 1.0))}


def fixed_masking(tokenizer: TextTokenizer, ids: np.ndarray, mask: np.ndarray, vocab: int,
                  rate: float, seed: int) -> dict:
  """One masking of a split, drawn once, so every evaluation scores the same positions."""
  inputs, targets, chosen = mask_tokens(jax.random.PRNGKey(seed), ids, mask, tokenizer.mask_id,
                                        vocab, tokenizer.special_ids, rate)
  return {"inputs": np.asarray(inputs), "targets": np.asarray(targets), "chosen": np.asarray(chosen),
          "token_mask": mask}


@dataclasses.dataclass(eq=False)
class TextEncoder:
  """The frozen text encoder: tokenizer, module (a Bert) and its params; normalize: 'sequence'
  (the seed's) or 'token'."""
  tokenizer: TextTokenizer
  module: Bert
  params: dict
  normalize: str
  mlm_model: BertMaskedLM | None = None  # with its MLM head, when this system trained it
  mlm_params: dict | None = None

  def states(self, params, ids, mask):
    """(B, L) ids and mask -> (B, L, hidden) normalised last hidden states (inside a jit)."""
    h = self.module.apply({"params": params}, ids, mask)
    return normalize_text_states(h, self.normalize)

  def encode(self, texts: list) -> tuple[np.ndarray, np.ndarray]:
    return self.tokenizer.encode_texts(texts)


def text_encoder(run: Run, train, valid, config, parent: dict) -> TextEncoder:
  """Loads text.init_from (evaluation only) or trains the vocabulary and the BERT by MLM."""
  tc = config.text
  tokenizer = vocabulary(train.texts, tc, run.workdir)
  if tc.init_from:
    module, variables = load_bert(tc.init_from, mlm_head=False, tokenizer=tokenizer)
    if tc.max_length > module.max_positions:
      raise ConfigError(f"text.max_length={tc.max_length} exceeds the positions of {tc.init_from} "
                        f"({module.max_positions})")
    say(f"[text] BERT from {tc.init_from}: {module.layers} layers x {module.hidden}")
    return TextEncoder(tokenizer, module, variables["params"], tc.normalize)
  if tokenizer.mask_id is None:
    raise ConfigError("the vocabulary has no [MASK] token: MLM pretraining needs one")
  model = bert(tc, tokenizer.get_vocab_size())
  ids, mask = tokenizer.encode_texts(train.texts)
  v_ids, v_mask = tokenizer.encode_texts(valid.texts)
  masked = fixed_masking(tokenizer, v_ids, v_mask, model.bert.vocab_size, tc.mask_rate, config.seed)
  check = lambda params: mlm_metrics(model, params, masked, run.mesh, config.eval.batch_size)
  task = mlm_task(model, tc.max_length, tokenizer.mask_id, tokenizer.special_ids, tc.mask_rate)
  data = ShuffledBatches({"tokens": ids, "token_mask": mask}, config.text_train.batch_size,
                         seed=config.seed + 3)
  result = run.stage(task, data, config.text_train, seed=config.seed + 3, name="text",
                     parent=parent, defines={"text": tc},
                     evaluate=lambda state: {f"val_{k}": v for k, v in check(state.params).items()})
  params = result.variables()["params"]
  metrics = check(params)
  say(f"[text] validation MLM accuracy {metrics['mlm_accuracy']:.3f} (loss {metrics['mlm_loss']:.3f})")
  return TextEncoder(tokenizer, model.bert, params["bert"], tc.normalize, model, params)


