"""RayGen's text side before the encoder (spec raygen_and_raddiffusion.md C.2.2): impression
cleaning, BERT WordPiece vocabularies (trained here on phantom or user reports, or CXR-BERT's when
the user has it) and a picklable tokenize hook for the study pipeline (data/pipeline.py).

Layout of one text (BertTokenizer's with ``padding='max_length', truncation=True``):
``[CLS] pieces[:L - 2] [SEP] [PAD] ...``, L = max_length (RayGen: 256); the mask is True on
[CLS], the pieces and [SEP]. Vocabularies trained here number the specials [PAD]=0, [UNK]=1,
[CLS]=2, [SEP]=3, [MASK]=4; CXR-BERT's put [PAD] at 0 and the rest at 100..103. Either way the ids
are looked up by token, never assumed.

Needs the ``tokenizers`` package (a core dependency), not transformers.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Sequence

import numpy as np
from absl import logging

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_LENGTH = 256  # RayGen's padding / truncation length
_NOT_LETTER = re.compile(r"[^A-Za-z ]")
# Every character of cleaned text (and of most ASCII text) starts with a piece, so an unseen word
# falls back to characters rather than [UNK].
_ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789.,:;-/()%'")


def clean_impression(text: str | bytes) -> str:
  """RayGen's cleaning (C.2.2): the text after the LAST 'IMPRESSION:' when there is one, with
  every character but A-Z, a-z and space removed (digits, punctuation and newlines too, so words
  split only by a newline are glued), lowercased and stripped."""
  if isinstance(text, bytes):
    text = text.decode("utf-8", errors="replace")
  marker = text.rfind("IMPRESSION:")
  if marker >= 0:
    text = text[marker + len("IMPRESSION:"):]
  return _NOT_LETTER.sub("", text).lower().strip()


def _bert_pipeline(tok, lowercase: bool = True):
  """Gives a WordPiece ``tokenizers.Tokenizer`` BERT's normaliser, pre-tokeniser and decoder."""
  from tokenizers import decoders, normalizers, pre_tokenizers
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                              strip_accents=None, lowercase=lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix="##")
  return tok


def _add_template(tok):
  """[CLS] $A [SEP] as the tokenizer's own post-processor, so tokenizer.json is usable alone."""
  from tokenizers import processors
  ids = [(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")]
  if all(i is not None for _, i in ids):
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=ids)
  return tok


def train_wordpiece(texts: Iterable[str], vocab_size: int, out_dir: str, *, clean: bool = True,
                    min_frequency: int = 2) -> str:
  """Trains a BERT WordPiece vocabulary on ``texts`` (each ``clean_impression``-ed first unless
  clean=False) and writes ``<out_dir>/vocab.txt`` and ``<out_dir>/tokenizer.json``; returns
  out_dir (``load_tokenizer`` and ``TextTokenizer`` accept it). Specials get ids 0..4 in
  SPECIAL_TOKENS order; vocab_size counts them and is an upper bound (a small corpus stops
  earlier). The same texts give the same vocabulary on every run (see below)."""
  from tokenizers import Tokenizer, models, trainers
  seeded = [f"##{c}" for c in _ALPHABET if c.isalnum()]
  floor = len(SPECIAL_TOKENS) + len(_ALPHABET) + len(seeded)
  if vocab_size <= floor:
    raise ValueError(f"vocab_size={vocab_size} leaves no room beyond the specials and the "
                     f"alphabet ({floor} tokens)")
  # tokenizers' trainer numbers '##x' pieces in hash-map order as it meets them, and those numbers
  # break ties between equally frequent merges, so two runs can differ (huggingface/tokenizers
  # #1794). Declaring every '##x' of the alphabet up front (as extra 'special' tokens of the
  # trainer only) fixes their numbers; the saved tokenizer is rebuilt from the vocabulary without
  # them as specials. Characters outside the alphabet (clean=False on non-ASCII text) can still
  # bring the nondeterminism back.
  trainer = trainers.WordPieceTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency,
      special_tokens=[*SPECIAL_TOKENS, *seeded], initial_alphabet=_ALPHABET,
      continuing_subword_prefix="##", show_progress=False)
  trained = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]",
                                                      continuing_subword_prefix="##")))
  trained.train_from_iterator((clean_impression(t) if clean else t for t in texts), trainer)
  vocab = sorted(trained.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])
  if [i for _, i in vocab] != list(range(len(vocab))):
    raise RuntimeError("trained vocabulary ids are not contiguous")  # never seen; vocab.txt needs it
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
    f.writelines(t + "\n" for t, _ in vocab)
  _from_vocab(dict(vocab)).save(os.path.join(out_dir, "tokenizer.json"))
  return out_dir


def _from_vocab(vocab: dict[str, int] | str, lowercase: bool = True):
  """A BERT WordPiece tokenizer from {token: id} or a vocab.txt path."""
  from tokenizers import Tokenizer, models
  if isinstance(vocab, str):
    model = models.WordPiece.from_file(vocab, unk_token="[UNK]")
  else:
    model = models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##")
  tok = _bert_pipeline(Tokenizer(model), lowercase)
  # Registered as special (existing ids kept): never split, and skipped when decoding.
  tok.add_special_tokens([t for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None])
  return _add_template(tok)


def load_tokenizer(path: str):
  """A ``tokenizers.Tokenizer`` from a ``tokenizer.json``, a ``vocab.txt`` (BERT normaliser and
  pre-tokeniser added; lowercasing from a ``tokenizer_config.json`` beside it, default on), or a
  directory holding either (tokenizer.json preferred), e.g. a local copy of CXR-BERT's."""
  from tokenizers import Tokenizer
  if os.path.isdir(path):
    for name in ("tokenizer.json", "vocab.txt"):
      if os.path.isfile(os.path.join(path, name)):
        return load_tokenizer(os.path.join(path, name))
    raise FileNotFoundError(f"{path} holds neither tokenizer.json nor vocab.txt")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file {path} does not exist (nothing is downloaded)")
  if path.endswith(".json"):
    return Tokenizer.from_file(path)
  lowercase, config = True, os.path.join(os.path.dirname(path), "tokenizer_config.json")
  if os.path.isfile(config):
    with open(config) as f:
      lowercase = bool(json.load(f).get("do_lower_case", True))
  return _from_vocab(path, lowercase)


class TextTokenizer:
  """The study pipeline's tokenize hook: report bytes -> {'tokens': (L,) int32, 'token_mask': (L,)
  bool} in the layout of the module docstring, L = max_length.

  tokenizer: a ``tokenizers.Tokenizer``, a transformers fast tokenizer (its backend is used) or
  a path for ``load_tokenizer``. clean: apply ``clean_impression`` first (RayGen's).
  Pickles as the tokenizer's JSON string (grain workers rebuild it on first use). The first
  truncation is logged once per process with the count of texts cut and the longest length;
  ``truncated`` counts the truncated texts this copy has seen.
  """

  def __init__(self, tokenizer, max_length: int = MAX_LENGTH, clean: bool = True):
    if max_length < 2:
      raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
    if isinstance(tokenizer, (str, os.PathLike)):
      tokenizer = load_tokenizer(os.fspath(tokenizer))
    tok = getattr(tokenizer, "backend_tokenizer", tokenizer)
    self.tokenizer_json, self.max_length, self.clean = tok.to_str(), max_length, clean
    self.truncated = 0
    self._tok, self._warned = tok, False
    missing = [t for t in ("[PAD]", "[CLS]", "[SEP]") if tok.token_to_id(t) is None]
    if missing:
      raise ValueError(f"tokenizer has no {', '.join(missing)} token: not a BERT WordPiece vocab")
    self.pad_id, self.cls_id, self.sep_id = (tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]"))
    self.mask_id = tok.token_to_id("[MASK]")  # None when the vocabulary has no [MASK]
    self.special_ids = tuple(sorted(i for i in (tok.token_to_id(t) for t in SPECIAL_TOKENS)
                                    if i is not None))

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_tok"] = None  # rebuilt from tokenizer_json where it is unpickled
    state["_warned"], state["truncated"] = False, 0  # each worker process warns once
    return state

  @property
  def tokenizer(self):
    if self._tok is None:
      from tokenizers import Tokenizer
      self._tok = Tokenizer.from_str(self.tokenizer_json)
    return self._tok

  def get_vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size()

  def _layout(self, pieces: Sequence[int]) -> tuple[np.ndarray, np.ndarray, bool]:
    keep = self.max_length - 2
    ids = np.full((self.max_length,), self.pad_id, np.int32)
    n = min(len(pieces), keep)
    ids[0], ids[1:n + 1], ids[n + 1] = self.cls_id, pieces[:n], self.sep_id
    return ids, np.arange(self.max_length) < n + 2, len(pieces) > keep

  def _note_truncation(self, count: int, longest: int) -> None:
    self.truncated += count
    if count and not self._warned:
      self._warned = True
      logging.warning("TextTokenizer: %d text(s) longer than max_length=%d (the longest %d tokens "
                      "with [CLS]/[SEP]) were truncated; later truncations are counted in "
                      ".truncated, not logged", count, self.max_length, longest + 2)

  def _pieces(self, texts: Sequence[str | bytes]) -> list[list[int]]:
    texts = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts]
    if self.clean:
      texts = [clean_impression(t) for t in texts]
    if len(texts) == 1:  # the pipeline hook: no thread pool per study
      return [self.tokenizer.encode(texts[0], add_special_tokens=False).ids]
    return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

  def __call__(self, report: bytes | str) -> dict[str, np.ndarray]:
    pieces = self._pieces([report])[0]
    ids, mask, cut = self._layout(pieces)
    self._note_truncation(int(cut), len(pieces))
    return {"tokens": ids, "token_mask": mask}

  def encode_texts(self, texts: Sequence[str | bytes]) -> tuple[np.ndarray, np.ndarray]:
    """texts -> (ids (N, L) int32, mask (N, L) bool)."""
    all_pieces = self._pieces(list(texts))
    rows = [self._layout(p) for p in all_pieces]
    ids = np.stack([r[0] for r in rows]) if rows else np.zeros((0, self.max_length), np.int32)
    mask = np.stack([r[1] for r in rows]) if rows else np.zeros((0, self.max_length), bool)
    cut = [len(p) for p, r in zip(all_pieces, rows) if r[2]]
    self._note_truncation(len(cut), max(cut, default=0))
    return ids, mask

  def decode(self, ids: Sequence[int]) -> str:
    """Text of one id row, specials and padding dropped."""
    special = set(self.special_ids)
    return self.tokenizer.decode([int(i) for i in ids if int(i) not in special])
