"""GMCD's data (spec gmcd.md §1): one frontal image, a tabular vector and a class per study, the
patient-level k folds, and the two augmented views of a training batch.

The cohort is every study of the prepared dataset's `data.splits`, pooled (the seed cross-validates
the whole cohort): the first view of each study resized to `data.load_size` (uint8), its tabular
vector and its class. On the phantom world both come with the study (`phantom.tabular`, 80-d, and
`phantom.grade`, 3 classes). For any other prepared study dataset they come from the user's table
`data.table` (`tabular.py`: CSV or parquet keyed by study or patient id, with checks).

Folds (`make_folds`): patient-level k folds (core.replicas.kfold_rows, stratified by class); inside
each fold's training rows a patient-level inner validation split of `data.val_fraction` selects
the model. `eval.select_on='test'` is the seed's switch (spec §5): no inner split, selection on the
test fold. The tabular vectors are z-scored with the fold's training rows (the seed's StandardScaler).

Images: the grayscale view is repeated into ResNet's 3 channels rather than giving the network a
1-channel stem, so torchvision ImageNet weights graft unchanged (the same maths as summing conv1
over its input channels). Augmentation runs inside the jitted step (`augment`, §1.3): horizontal
and vertical flips, a random `image_size` crop of the `load_size` image, brightness and contrast
jitter (0.1; saturation and hue do nothing to a gray image), then [-1, 1] (mean 0.5, std 0.5).
Evaluation takes the centre crop.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core.mesh import process_slice
from cxrjax.core.replicas import kfold_rows
from cxrjax.core.writers import say
from cxrjax.data import augment as aug_lib
from cxrjax.data import registry
from cxrjax.data.errors import DataError
from cxrjax.losses import dscd


@dataclasses.dataclass
class Cohort:
  """Every study, row-aligned: images (N, L, L) uint8, tabular (N, D) float32 (raw), labels (N,)
  int32 in 0..num_classes-1, patients and ids (N,) str."""
  images: np.ndarray
  tabular: np.ndarray
  labels: np.ndarray
  patients: np.ndarray
  ids: np.ndarray
  num_classes: int

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass
class Fold:
  """Rows of the cohort: train (model fitting), val (model selection), test; tabular (N, D) z-scored
  with the train rows' mean and standard deviation (the whole cohort, so any row can be read)."""
  index: int
  train: np.ndarray
  val: np.ndarray
  test: np.ndarray
  tabular: np.ndarray


def _text(v) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)


def open_sources(dc, workdir: str) -> dict:
  data_dir = dc.data_dir or os.path.join(workdir, "data")
  return registry.open_study_dataset(dc.builder, data_dir, list(dc.builder_config),
                                     tuple(dc.splits), hint="set data.splits")


def load_cohort(dc, workdir: str, num_classes: int, input_dim: int) -> Cohort:
  """Reads every study of config.data once (phantoms rendered on first use)."""
  from cxrjax.systems.gmcd import tabular as tab  # the table reader pulls in pandas
  sources = open_sources(dc, workdir)
  images, tabular, labels, patients, ids = [], [], [], [], []
  for split, source in sources.items():
    for i in range(len(source)):
      ex = source[i]
      if not len(ex["images"]):
        raise DataError(f"split {split}: study {_text(ex['study_id'])} has no image")
      images.append(aug_lib.resize(ex["images"][0], dc.load_size))
      ids.append(_text(ex["study_id"]))
      patients.append(_text(ex["patient_id"]))
      if not dc.table:
        if "phantom" not in ex:
          raise DataError(f"data.builder={dc.builder!r} has no tabular vector or grade of its own; "
                          "give them in a table with data.table=<csv or parquet>")
        tabular.append(np.asarray(ex["phantom"]["tabular"], np.float32))
        labels.append(int(ex["phantom"]["grade"]))
  ids, patients = np.array(ids), np.array(patients)
  if dc.table:
    tabular, labels = tab.read_table(dc, ids, patients, num_classes)
  tabular, labels = np.asarray(tabular, np.float32), np.asarray(labels, np.int32)
  if tabular.ndim != 2 or tabular.shape[1] != input_dim:
    where = f"the table {dc.table}" if dc.table else f"data.builder={dc.builder!r}"
    raise DataError(f"{where} gives tabular vectors of width {tabular.shape[-1]}, but "
                    f"model.input_dim={input_dim}; set model.input_dim={tabular.shape[-1]}")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise DataError(f"classes must be 0..{num_classes - 1} (model.num_classes={num_classes}); "
                    f"found {sorted(set(labels.tolist()))}")
  say(f"[data] {len(ids)} studies of {len(set(patients))} patients; classes "
      f"{np.bincount(labels, minlength=num_classes).tolist()}")
  return Cohort(np.stack(images), tabular, labels, patients, ids, num_classes)


def zscore(tabular: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """(N, D) standardised with rows' mean and (population) std, sklearn's StandardScaler: a column
  constant over the rows is only centred."""
  mean, std = tabular[rows].mean(0), tabular[rows].std(0)
  return ((tabular - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def make_folds(cohort: Cohort, k: int, *, seed: int, val_fraction: float, select_on: str,
               num_candidates: int) -> list[Fold]:
  """The k patient-level folds, each with its selection rows (see the module docstring).

  A class missing from a fold's training rows is refused; one with fewer than `num_candidates`
  studies there is said once: DSCD then draws its same-class candidates with replacement
  (losses.dscd.sample_contrast_indices; the seed's sampler would raise).
  """
  folds = []
  for i, (train, test) in enumerate(kfold_rows(cohort.patients, k, seed=seed, labels=cohort.labels)):
    val = test
    if select_on == "validation":
      inner = max(2, round(1.0 / val_fraction))
      fit, held = kfold_rows(cohort.patients[train], inner, seed=seed + 1 + i,
                             labels=cohort.labels[train])[0]
      train, val = train[fit], train[held]
    counts = np.bincount(cohort.labels[train], minlength=cohort.num_classes)
    if (counts == 0).any():
      raise DataError(f"fold {i}: class(es) {np.flatnonzero(counts == 0).tolist()} have no "
                      f"training study (class counts {counts.tolist()}); add studies of them or "
                      "lower eval.folds")
    if counts.min() < num_candidates:
      say(f"[data] fold {i}: class {int(counts.argmin())} has {int(counts.min())} training studies, "
          f"fewer than the {num_candidates} DSCD candidates: they are drawn with replacement")
    folds.append(Fold(i, np.sort(train), np.sort(val), np.sort(test), zscore(cohort.tabular, train)))
  return folds


class FoldBatches:
  """The loop's BatchIterator over a fold's training rows, in memory: per-epoch permutations from
  (seed, epoch) with the seed's drop_last (every batch has distinct rows). Batch s is

    image (B, L, L) uint8, tabular (B, D) float32, label (B,) int32,
    index (B,) int32: positions in the fold's training rows (the memory-bank rows),
    contrast_index (B, P + K) int32 when contrast is given: DSCD's candidates and negatives,
      drawn from (seed, s) (losses.dscd.sample_contrast_indices, the seed's data loader).

  contrast: (num_candidates, num_negatives, mode) or None. The state is the batch count.
  """

  def __init__(self, cohort: Cohort, fold: Fold, batch_size: int, *, seed: int,
               contrast: tuple[int, int, str] | None = None):
    rows = fold.train
    if len(rows) < batch_size:
      raise DataError(f"fold {fold.index} has {len(rows)} training studies, fewer than one batch "
                      f"of {batch_size}; lower the batch size or use more studies")
    self.images, self.tabular = cohort.images[rows], fold.tabular[rows]
    self.labels = cohort.labels[rows].astype(np.int32)
    self.batch_size, self.seed, self.contrast = batch_size, seed, contrast
    self.per_epoch = len(rows) // batch_size
    self.position = 0
    self._local = process_slice(batch_size)
    self._labels_device = jnp.asarray(self.labels)

  def __iter__(self):
    return self

  def rows(self, batch: int) -> np.ndarray:
    epoch, i = divmod(batch, self.per_epoch)
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))
    return order[i * self.batch_size:(i + 1) * self.batch_size]

  def __next__(self) -> dict[str, np.ndarray]:
    rows = self.rows(self.position)
    out = {"image": self.images[rows], "tabular": self.tabular[rows], "label": self.labels[rows],
           "index": rows.astype(np.int32)}
    if self.contrast is not None:
      p, k, mode = self.contrast
      key = jax.random.fold_in(jax.random.PRNGKey(self.seed), self.position)
      out["contrast_index"] = np.asarray(dscd.sample_contrast_indices(
          key, self._labels_device, jnp.asarray(rows), num_candidates=p, num_negatives=k, mode=mode))
    self.position += 1
    return {name: v[self._local] for name, v in out.items()}

  def get_state(self) -> dict:
    return {"position": self.position, "seed": self.seed, "rows": len(self.labels)}

  def set_state(self, state: dict) -> None:
    if state.get("seed") != self.seed or state.get("rows") != len(self.labels):
      raise ValueError(f"iterator state was saved for seed {state.get('seed')} and "
                       f"{state.get('rows')} rows; this fold has seed {self.seed} and "
                       f"{len(self.labels)} rows")
    self.position = int(state["position"])


def _crop(image, y, x, size):
  return jax.lax.dynamic_slice(image, (y, x), (size, size))


def to_input(images: jax.Array) -> jax.Array:
  """(B, S, S) floats in [0, 1] -> (B, S, S, 3) in [-1, 1]: the seed's Normalize(0.5, 0.5)."""
  x = (images - 0.5) / 0.5
  return jnp.repeat(x[..., None], 3, axis=-1)


def center_view(images: jax.Array, size: int) -> jax.Array:
  """Evaluation input: (B, L, L) uint8 -> (B, size, size, 3) float32, the centre crop."""
  off = (images.shape[1] - size) // 2
  x = images[:, off:off + size, off:off + size].astype(jnp.float32) / 255.0
  return to_input(x)


def augment(key, images: jax.Array, size: int, jitter: float = 0.1) -> jax.Array:
  """One training view (spec §1.3): (B, L, L) uint8 -> (B, size, size, 3) float32 in [-1, 1].

  Flips (p = 0.5 each way), a uniform random crop, brightness x U(1 +- jitter), contrast
  (x - mean) U(1 +- jitter) + mean (torchvision's, the mean over the image), clipped to [0, 1].
  """
  b, side = images.shape[0], images.shape[1]
  k_flip, k_crop, k_b, k_c = jax.random.split(key, 4)
  flips = jax.random.bernoulli(k_flip, 0.5, (2, b))
  offsets = jax.random.randint(k_crop, (2, b), 0, side - size + 1)
  x = images.astype(jnp.float32) / 255.0
  x = jnp.where(flips[0][:, None, None], x[:, :, ::-1], x)
  x = jnp.where(flips[1][:, None, None], x[:, ::-1, :], x)
  x = jax.vmap(lambda im, y, xo: _crop(im, y, xo, size))(x, offsets[0], offsets[1])
  bright = jax.random.uniform(k_b, (b, 1, 1), minval=1 - jitter, maxval=1 + jitter)
  x = jnp.clip(x * bright, 0.0, 1.0)
  contrast = jax.random.uniform(k_c, (b, 1, 1), minval=1 - jitter, maxval=1 + jitter)
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  x = jnp.clip((x - mean) * contrast + mean, 0.0, 1.0)
  return to_input(x)
