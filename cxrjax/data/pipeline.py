"""The study pipeline: a random-access study source -> checkpointable local batches, with grain.

Any source with ``len`` and ``[i]`` returning a study in the ``features.study_features()`` layout
works: a ``tfds.data_source`` split (array_record, no TensorFlow) or a plain list of dicts.

How batches are formed (the same contract as ``iterators.ShuffledBatches``):
  * the stream of study positions is ``grain.MapDataset.source(src)`` (each record tagged with its
    source index), ``.shuffle(seed)`` (grain folds the epoch into the seed, so every epoch has its
    own order) and ``.repeat(num_epochs)``; position p is epoch p // len(src);
  * global batch b holds stream positions [b G, (b + 1) G); this process reads only its contiguous
    block ``core.mesh.process_slice(G)`` of it, so 1 process and N processes see the same global
    batch at every step and no process reads another's studies;
  * augmentation randomness is drawn from ``np.random.default_rng([seed, epoch, source_index])``,
    independent of the process count, worker count or resume point;
  * the state is the number of batches served; resuming rebuilds the grain dataset and slices it
    at that batch (grain MapDatasets are random access, so nothing is replayed).
Training (``drop_remainder=True``) drops a final partial global batch; an infinite stream
(``num_epochs=None``) lets batches straddle epochs. Evaluation (``drop_remainder=False``, one epoch,
no shuffle) pads the last batch with rows whose ``_mask`` is False, so every study is seen once.

A local batch (B = global_batch_size / process_count, K = max_views, S = image_size):
  images     (B, K, S, S) uint8, or float32 in [0, 1] with image_dtype='float32'
  view_mask  (B, K) bool     True where a view is present (frontal views first)
  views      (B, K) int32    indices into labels.VIEWS; -1 in padded slots
  labels     (B, C) float32 in {1, 0, NaN}, the uncertain policy applied (C: the source's
             label count, 14 for CheXpert's labels; features.label_names names them)
  age_years, sex_male  (B,) float32, NaN when unknown
  index      (B,) int64      source index of the study; -1 for padding rows
  _mask      (B,) bool       False for evaluation padding rows (all other fields zero / -1 there)
  + whatever the tokenize hook returns, e.g. tokens (B, L) int32 and token_mask (B, L) bool.

Nothing usable is an error, not a silent zero loss: when the first batch a pipeline serves holds
no study with a kept view, it samples the source (``usable.sample_views``). A sample where no
view is known at all (every image UNKNOWN: a folder without a view column) makes a filter
without UNKNOWN admit it, with a log line (``admit_unknown``); a sample with no kept view
otherwise is a DataError naming the view filter and the views the data has.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from cxrjax.core.mesh import process_slice
from cxrjax.data import augment as aug_lib
from cxrjax.data import usable
from cxrjax.data.labels import UNCERTAIN_POLICIES, VIEW_INDEX, VIEWS, apply_uncertain_policy

# Frontal views sort first: most models (and RadDiffusion's view slot 0) expect one there.
_VIEW_RANK = {VIEW_INDEX["PA"]: 0, VIEW_INDEX["AP"]: 0, VIEW_INDEX["L"]: 1, VIEW_INDEX["UNKNOWN"]: 2}
PAD_VIEW = -1

Tokenize = Callable[[bytes], "np.ndarray | Mapping[str, np.ndarray]"]


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """What a study pipeline reads and how.

  global_batch_size: rows per step summed over processes (each process gets its contiguous block).
  seed: drives the shuffle and every augmentation draw.
  image_size: output side S. max_views: K, views per study after filtering (pad / drop beyond K).
  views: names from labels.VIEWS to keep (e.g. ('PA', 'AP') for frontal only); None keeps all.
  admit_unknown: when the data knows no view at all (all UNKNOWN), the filter admits UNKNOWN
    (said in a log line) rather than removing everything; False makes that an error.
  uncertain: 'ignore' (-1 -> NaN), 'ones' or 'zeros' (labels.apply_uncertain_policy).
  augment: an AugmentConfig (its size is replaced by image_size) or None for a plain resize.
  image_dtype: 'uint8' or 'float32' ([0, 1]).
  shuffle: shuffle each epoch. num_epochs: None for an infinite stream.
  drop_remainder: True for training; False pads the last batch (``_mask``) for evaluation.
  report_fields: which text fields are joined (by a newline, empty ones skipped) for the hook.
  read_threads: threads computing upcoming batches in this process (0: synchronous).
  prefetch_batches: batches computed ahead by those threads.
  worker_count: grain worker processes (spawned; the source and the tokenize hook must pickle,
    and the caller needs a ``__main__`` guard). 0 reads in this process.
  """
  global_batch_size: int
  seed: int = 0
  image_size: int = 256
  max_views: int = 2
  views: tuple[str, ...] | None = None
  admit_unknown: bool = True
  uncertain: str = "ignore"
  augment: aug_lib.AugmentConfig | None = None
  image_dtype: str = "uint8"
  shuffle: bool = True
  num_epochs: int | None = None
  drop_remainder: bool = True
  report_fields: tuple[str, ...] = ("findings", "impression")
  read_threads: int = 2
  prefetch_batches: int = 2
  worker_count: int = 0

  def __post_init__(self):
    if self.global_batch_size < 1 or self.max_views < 1 or self.image_size < 1:
      raise ValueError("global_batch_size, max_views and image_size must be >= 1")
    if self.uncertain not in UNCERTAIN_POLICIES:
      raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {self.uncertain!r}")
    if self.image_dtype not in ("uint8", "float32"):
      raise ValueError(f"image_dtype must be 'uint8' or 'float32', got {self.image_dtype!r}")
    if self.views is not None and not set(self.views) <= set(VIEWS):
      raise ValueError(f"views must be a subset of {VIEWS}, got {self.views}")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")
    if self.seed < 0 or min(self.read_threads, self.prefetch_batches, self.worker_count) < 0:
      raise ValueError("seed, read_threads, prefetch_batches and worker_count must be >= 0")

  @classmethod
  def for_eval(cls, global_batch_size: int, **kwargs) -> "PipelineConfig":
    """One ordered pass, last batch padded, no augmentation."""
    kwargs = {"shuffle": False, "num_epochs": 1, "drop_remainder": False, "augment": None, **kwargs}
    return cls(global_batch_size=global_batch_size, **kwargs)


def _text(value: Any) -> bytes:
  if isinstance(value, str):
    return value.encode("utf-8")
  return bytes(value) if value is not None else b""


def _scalar(value: Any) -> np.float32:
  return np.float32(np.nan if value is None else np.asarray(value, np.float32).reshape(()))


def _tag_index(index: int, record: Any) -> tuple[int, Any]:
  """map_with_index: keeps each record's source index (grain passes epoch-offset indices)."""
  return index, record


class _Rows:
  """Local row j of this process -> (stream position, (tagged index, record) or None for padding).

  Local row j is row r = j % L of local batch b = j // L, i.e. global stream position
  b G + start + r. Positions past the stream's end (evaluation padding) yield None.
  """

  def __init__(self, stream: grain.MapDataset, total: int | None, global_batch: int, start: int,
               local_batch: int):
    self.stream, self.total = stream, total
    self.global_batch, self.start, self.local_batch = global_batch, start, local_batch

  def __call__(self, j: int) -> tuple[int, Any]:
    b, r = divmod(int(j), self.local_batch)
    pos = b * self.global_batch + self.start + r
    if self.total is not None and pos >= self.total:
      return pos, None
    return pos, self.stream[pos]


class _StudyLoader:
  """(position, (index, study) | None) -> one example dict of fixed-shape numpy arrays."""

  def __init__(self, config: PipelineConfig, num_examples: int, tokenize: Tokenize | None,
               num_labels: int, keep: frozenset[int] | None):
    self.config, self.num_examples, self.tokenize = config, num_examples, tokenize
    self.num_labels, self.keep = num_labels, keep
    augment = config.augment
    self.augment = None if augment is None else dataclasses.replace(augment, size=config.image_size)

  def _tokens(self, study: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    if self.tokenize is None:
      return {}
    parts = [] if study is None else [_text(study.get(f, b"")).strip()
                                      for f in self.config.report_fields]
    out = self.tokenize(b"\n".join(p for p in parts if p))
    if not isinstance(out, Mapping):
      out = {"tokens": out}
    return {k: np.asarray(v) for k, v in out.items()}

  def __call__(self, item: tuple[int, Any]) -> dict[str, np.ndarray]:
    pos, tagged = item
    cfg, k, s = self.config, self.config.max_views, self.config.image_size
    images = np.zeros((k, s, s), np.uint8)
    view_ids = np.full((k,), PAD_VIEW, np.int32)
    example = {"images": images, "view_mask": np.zeros((k,), bool), "views": view_ids,
               "labels": np.zeros((self.num_labels,), np.float32), "age_years": np.float32(0),
               "sex_male": np.float32(0), "index": np.int64(-1), "_mask": np.bool_(False)}
    if tagged is None:  # evaluation padding row
      example.update(self._tokens(None))
      return self._finish(example)
    raw_index, study = tagged
    index = raw_index % self.num_examples
    epoch = pos // self.num_examples
    views = [int(v) for v in study["views"]]
    order = sorted(range(len(views)), key=lambda i: _VIEW_RANK.get(views[i], 3))
    if self.keep is not None:
      order = [i for i in order if views[i] in self.keep]
    order = order[:k]
    rng = None
    if self.augment is not None:
      rng = np.random.default_rng([cfg.seed, epoch, index])
    for slot, i in enumerate(order):
      image = study["images"][i]
      if rng is None:
        images[slot] = aug_lib.resize(image, s)
      else:
        images[slot] = aug_lib.augment(image, rng, self.augment)
      view_ids[slot] = views[i]
    example["view_mask"][:len(order)] = True
    example.update(
        labels=apply_uncertain_policy(np.asarray(study["labels"], np.float32), cfg.uncertain),
        age_years=_scalar(study.get("age_years")), sex_male=_scalar(study.get("sex_male")),
        index=np.int64(index), _mask=np.bool_(True))
    example.update(self._tokens(study))
    return self._finish(example)

  def _finish(self, example: dict) -> dict:
    if self.config.image_dtype == "float32":
      example["images"] = example["images"].astype(np.float32) * np.float32(1 / 255)
    return example


class StudyPipeline:
  """Iterator of local batches (see the module docstring). Implements the loop's BatchIterator:
  ``__next__``, ``get_state() -> dict`` (JSON-able), ``set_state(dict)``.

  source: random-access studies (``len``, ``[i]``); tokenize: optional hook report bytes -> int
  array (stored as 'tokens') or a dict of fixed-shape arrays, called with b'' for padding rows.
  """

  def __init__(self, source: Sequence[Mapping[str, Any]], config: PipelineConfig, *,
               tokenize: Tokenize | None = None):
    self.source, self.config, self.tokenize = source, config, tokenize
    self.num_examples = len(source)
    if self.num_examples == 0:
      raise ValueError("cannot iterate over an empty source")
    g = config.global_batch_size
    self._local = process_slice(g)
    total = None if config.num_epochs is None else config.num_epochs * self.num_examples
    self.total_positions = total
    if total is None:
      self.num_batches = None
    else:
      self.num_batches = total // g if config.drop_remainder else -(-total // g)
    self.position = 0
    self._iter = None
    # The label count padding rows need, read from the first study.
    self.num_labels = len(np.asarray(source[0]["labels"]))
    self.keep = None if config.views is None else frozenset(VIEW_INDEX[v] for v in config.views)
    self._checked = False

  # --- the grain graph -------------------------------------------------------------------------

  def _stream(self) -> grain.MapDataset:
    """Stream position -> (source index, study), shuffled per epoch, repeated."""
    ds = grain.MapDataset.source(self.source).map_with_index(_tag_index)
    if self.config.shuffle:
      # A hashed seed: grain's per-epoch seed is seed + epoch, so raw seeds s and s+1 would
      # share all but one epoch order.
      ds = ds.shuffle(seed=int(np.random.SeedSequence([self.config.seed, 1]).generate_state(1)[0]))
    return ds.repeat(self.config.num_epochs)

  def dataset(self) -> grain.MapDataset:
    """Random-access MapDataset of this process's local batches (batch b is step b)."""
    local = self._local.stop - self._local.start
    num_batches = sys.maxsize // (2 * self.config.global_batch_size) if self.num_batches is None \
        else self.num_batches
    rows = _Rows(self._stream(), self.total_positions, self.config.global_batch_size,
                 self._local.start, local)
    loader = _StudyLoader(self.config, self.num_examples, self.tokenize, self.num_labels, self.keep)
    return grain.MapDataset.range(num_batches * local).map(rows).map(loader).batch(local)

  def _make_iter(self):
    cfg = self.config
    ds = self.dataset()[self.position:]
    threads = cfg.read_threads
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=cfg.prefetch_batches
                             if threads else 0)
    it_ds = ds.to_iter_dataset(read)
    if cfg.worker_count > 0:
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    return iter(it_ds)

  # --- BatchIterator protocol -----------------------------------------------------------------

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_batches is not None and self.position >= self.num_batches:
      raise StopIteration
    if self._iter is None:
      self._iter = self._make_iter()
    batch = next(self._iter)
    if not self._checked:
      self._checked = True
      if not (batch["_mask"] & batch["view_mask"].any(axis=1)).any() and self._nothing_usable():
        self.close()  # read the same batch again through the wider filter
        return next(self)
    if self.config.worker_count > 0:
      # Worker batches arrive in shared memory, unlinked when the array dies; plain copies let a
      # caller keep batches (e.g. to the end of the program) without leaking segments.
      batch = {k: np.array(v) for k, v in batch.items()}
    self.position += 1
    return batch

  def __len__(self) -> int:
    if self.num_batches is None:
      raise TypeError("an infinite pipeline (num_epochs=None) has no length")
    return self.num_batches

  def get_state(self) -> dict:
    return {"position": self.position, "seed": self.config.seed,
            "num_examples": self.num_examples, "global_batch_size": self.config.global_batch_size,
            "shuffle": self.config.shuffle}

  def set_state(self, state: Mapping[str, Any]) -> None:
    for key in ("seed", "num_examples", "global_batch_size", "shuffle"):
      mine = self.get_state()[key]
      if state.get(key) != mine:
        raise ValueError(f"iterator state was saved with {key}={state.get(key)}, "
                         f"this run has {mine}")
    self.close()
    self.position = int(state["position"])
    self._checked = False

  def _nothing_usable(self) -> bool:
    """The first batch had no study with a kept view: go on when the batch was merely unlucky
    (False), admit UNKNOWN when the data knows no view (True: read the batch again), or stop
    naming the filter (see the module doc)."""
    counts, kept = usable.sample_views(self.source, self.keep)
    if kept:
      return False
    cfg = self.config
    if cfg.admit_unknown and set(counts) == {"UNKNOWN"} and self.keep is not None:
      from cxrjax.core.writers import say
      say(f"[data] no study in a sample of {sum(counts.values())} has a known view (all UNKNOWN): "
          f"the view filter {tuple(cfg.views)} admits UNKNOWN views too")
      self.keep = self.keep | {VIEW_INDEX["UNKNOWN"]}
      return True
    raise usable.no_view_error(cfg.views, counts)

  def reset(self) -> None:
    """Back to the first batch (e.g. before another evaluation pass)."""
    self.close()
    self.position = 0

  def close(self) -> None:
    """Stops prefetch threads / worker processes; the next batch restarts them."""
    if self._iter is not None:
      close = getattr(self._iter, "close", None)
      if close is not None:
        close()
      self._iter = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown: nothing left to clean
      pass


def steps_per_epoch(num_examples: int, global_batch_size: int, *, drop_remainder: bool = True) -> int:
  """Global batches in one epoch of `num_examples` studies."""
  if drop_remainder:
    return num_examples // global_batch_size
  return math.ceil(num_examples / global_batch_size)
