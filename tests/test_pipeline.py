"""cxrjax.data.pipeline: batch layout, policies, eval padding, resume, multi-process, TFDS."""
import json
import sys

import jax
import numpy as np
import pytest

from cxrjax.data.augment import AugmentConfig
from cxrjax.data.labels import VIEW_INDEX
from cxrjax.data.pipeline import PAD_VIEW, PipelineConfig, StudyPipeline

PA, AP, L, UNK = (VIEW_INDEX[v] for v in ("PA", "AP", "L", "UNKNOWN"))
# Study i has views _VIEWSETS[i % 4] (lateral stored first in some, to test frontal-first).
_VIEWSETS = ([PA], [L, PA], [L, AP, UNK], [UNK])


def make_studies(n=10, size=24, seed=0):
  """n studies in the features.py layout; view j of study i is filled with 10 * (j + 1) + i."""
  rng = np.random.default_rng(seed)
  studies = []
  for i in range(n):
    views = _VIEWSETS[i % 4]
    images = [np.full((size + 4 * j, size, 1), 10 * (j + 1) + i, np.uint8) for j in range(len(views))]
    labels = rng.choice(np.array([1, 0, -1, np.nan], np.float32), 14)
    labels[:3] = (-1, 1, np.nan)
    studies.append(dict(study_id=f"s{i}".encode(), patient_id=b"p", images=images, views=views,
                        labels=labels, age_years=np.float32(20 + i), sex_male=np.float32(i % 2),
                        race=b"", site=b"", findings=f"finding {i}".encode(), impression=b"ok"))
  return studies


def take(pipe, n):
  return [next(pipe) for _ in range(n)]


def assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_shapes_dtypes_and_view_padding():
  src = make_studies(8)
  cfg = PipelineConfig(global_batch_size=8, image_size=16, max_views=2, shuffle=False, num_epochs=1,
                       read_threads=0)
  b = next(StudyPipeline(src, cfg))
  assert b["images"].shape == (8, 2, 16, 16) and b["images"].dtype == np.uint8
  assert b["view_mask"].dtype == bool and b["views"].dtype == np.int32
  assert b["labels"].shape == (8, 14) and b["labels"].dtype == np.float32
  assert b["index"].dtype == np.int64 and b["_mask"].all()
  np.testing.assert_array_equal(b["index"], np.arange(8))
  np.testing.assert_array_equal(b["age_years"], 20 + np.arange(8, dtype=np.float32))
  np.testing.assert_array_equal(b["views"][:4], [[PA, PAD_VIEW], [PA, L], [AP, L], [UNK, PAD_VIEW]])
  np.testing.assert_array_equal(b["view_mask"].sum(1), [1, 2, 2, 1] * 2)
  # Frontal first: study 1 stores (L, PA); slot 0 shows the PA image (fill 20 + 1).
  assert b["images"][1, 0, 0, 0] == 21 and b["images"][1, 1, 0, 0] == 11
  assert (b["images"][0, 1] == 0).all()  # padded slot
  f = next(StudyPipeline(src, PipelineConfig(global_batch_size=4, image_size=16, shuffle=False,
                                             image_dtype="float32", read_threads=0)))
  assert f["images"].dtype == np.float32
  np.testing.assert_allclose(f["images"][0, 0], 10 / 255, rtol=1e-6)


def test_view_filter_and_max_views():
  src = make_studies(8)
  b = next(StudyPipeline(src, PipelineConfig(global_batch_size=8, image_size=8, max_views=3,
                                             views=("L",), shuffle=False, read_threads=0)))
  np.testing.assert_array_equal(b["view_mask"][:4], [[0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]])
  assert set(b["views"][b["view_mask"]].tolist()) == {L}
  b = next(StudyPipeline(src, PipelineConfig(global_batch_size=4, image_size=8, max_views=3,
                                             shuffle=False, read_threads=0)))
  np.testing.assert_array_equal(b["views"][2], [AP, L, UNK])
  with pytest.raises(ValueError):
    PipelineConfig(global_batch_size=4, views=("LATERAL",))


@pytest.mark.parametrize("policy,value", [("ignore", np.nan), ("ones", 1.0), ("zeros", 0.0)])
def test_uncertain_policy(policy, value):
  b = next(StudyPipeline(make_studies(4), PipelineConfig(
      global_batch_size=4, image_size=8, uncertain=policy, shuffle=False, read_threads=0)))
  np.testing.assert_array_equal(b["labels"][:, 0], np.full(4, value, np.float32))
  np.testing.assert_array_equal(b["labels"][:, 1], 1.0)
  assert np.isnan(b["labels"][:, 2]).all()
  assert not (b["labels"] == -1).any()


def test_eval_padding_sees_every_study_once():
  src = make_studies(10)
  pipe = StudyPipeline(src, PipelineConfig.for_eval(4, image_size=8, read_threads=0))
  batches = list(pipe)
  assert len(batches) == len(pipe) == 3
  seen = np.concatenate([b["index"][b["_mask"]] for b in batches])
  np.testing.assert_array_equal(np.sort(seen), np.arange(10))
  last = batches[-1]
  np.testing.assert_array_equal(last["_mask"], [True, True, False, False])
  np.testing.assert_array_equal(last["index"][2:], -1)
  assert not last["view_mask"][2:].any() and (last["images"][2:] == 0).all()
  pipe.reset()
  assert_batches_equal(list(pipe), batches)
  # Training drops the partial batch.
  train = StudyPipeline(src, PipelineConfig(global_batch_size=4, num_epochs=1, image_size=8,
                                            read_threads=0))
  assert len(list(train)) == 2


def _train_config(**kw):
  kw = {"global_batch_size": 4, "image_size": 16, "max_views": 2, "seed": 3,
        "augment": AugmentConfig(), "read_threads": 0, **kw}
  return PipelineConfig(**kw)


def test_shuffle_changes_per_epoch_and_augmentation_is_applied():
  src = make_studies(8)
  batches = take(StudyPipeline(src, _train_config()), 4)
  e0 = np.concatenate([b["index"] for b in batches[:2]])
  e1 = np.concatenate([b["index"] for b in batches[2:]])
  assert sorted(e0) == sorted(e1) == list(range(8)) and not np.array_equal(e0, e1)
  plain = next(StudyPipeline(src, _train_config(augment=None)))
  assert not np.array_equal(batches[0]["images"], plain["images"])


def test_resume_mid_epoch_gives_identical_batches():
  src = make_studies(10)  # 10 % 4 != 0: batches straddle epochs
  ref = StudyPipeline(src, _train_config(read_threads=2), tokenize=_tokenize)
  take(ref, 3)
  state = json.loads(json.dumps(ref.get_state()))
  expected = take(ref, 4)
  ref.close()
  resumed = StudyPipeline(src, _train_config(), tokenize=_tokenize)  # threads differ: same data
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 4), expected)
  with pytest.raises(ValueError):
    StudyPipeline(src, _train_config(seed=4)).set_state(state)


def test_two_processes_see_the_global_batch(monkeypatch):
  src = make_studies(10)
  whole = take(StudyPipeline(src, _train_config(global_batch_size=6)), 3)
  parts = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for rank in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda rank=rank: rank)
    pipe = StudyPipeline(src, _train_config(global_batch_size=6))
    parts.append(take(pipe, 3))
    assert parts[-1][0]["images"].shape[0] == 3
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts)]
  assert_batches_equal(joined, whole)


def _tokenize(text: bytes) -> dict:
  ids = np.frombuffer(text[:12].ljust(12, b"\0"), np.uint8).astype(np.int32)
  return {"tokens": ids, "token_mask": ids > 0}


def test_tokenize_hook():
  pipe = StudyPipeline(make_studies(3), PipelineConfig.for_eval(4, image_size=8, read_threads=0),
                       tokenize=_tokenize)
  b = next(pipe)
  assert b["tokens"].shape == (4, 12) and b["tokens"].dtype == np.int32
  assert bytes(b["tokens"][0].astype(np.uint8)) == b"finding 0\nok"  # findings, impression
  assert b["token_mask"][0].all()
  assert not b["token_mask"][3].any()  # the padding row tokenises b''


def test_tiny_tfds_array_record_without_tensorflow(tmp_path):
  import tensorflow_datasets as tfds

  from cxrjax.data.features import encode_png, study_features

  studies = make_studies(6, size=20)

  class TinyCxrStudies(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=study_features())

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, s in enumerate(studies):
        ex = dict(s, images=[encode_png(im) for im in s["images"]],
                  views=[int(v) for v in s["views"]],
                  study_id=s["study_id"].decode(), patient_id="p", race="", site="",
                  findings=s["findings"].decode(), impression="ok")
        yield str(i), ex

  builder = TinyCxrStudies(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  src = builder.as_data_source()["train"]
  pipe = StudyPipeline(src, PipelineConfig.for_eval(4, image_size=16, read_threads=0),
                       tokenize=_tokenize)
  batches = list(pipe)
  assert [b["images"].shape for b in batches] == [(4, 2, 16, 16)] * 2
  expected = list(StudyPipeline(studies, PipelineConfig.for_eval(6, image_size=16, read_threads=0),
                                tokenize=_tokenize))[0]
  for b in batches:
    for r in np.flatnonzero(b["_mask"]):
      # TFDS reorders records: match each back to its original by study id ("s<i>").
      i = int(src[int(b["index"][r])]["study_id"].decode()[1:])
      for k in ("images", "views", "view_mask", "labels", "age_years", "tokens"):
        np.testing.assert_array_equal(b[k][r], expected[k][i], err_msg=k)
  assert sorted(np.concatenate([b["index"][b["_mask"]] for b in batches])) == list(range(6))
  assert "tensorflow" not in sys.modules


@pytest.mark.slow
def test_worker_processes_give_the_same_batches():
  """grain worker processes (spawned, ~2-4 s) read the same batches, resumed or not."""
  from absl import flags

  was_parsed = flags.FLAGS.is_parsed()
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags
  try:
    src = make_studies(10)
    ref = take(StudyPipeline(src, _train_config(), tokenize=_tokenize), 5)
    pipe = StudyPipeline(src, _train_config(worker_count=2), tokenize=_tokenize)
    got = take(pipe, 3)
    state = json.loads(json.dumps(pipe.get_state()))
    pipe.close()
    pipe = StudyPipeline(src, _train_config(worker_count=2), tokenize=_tokenize)
    pipe.set_state(state)
    got += take(pipe, 2)
    pipe.close()
    assert_batches_equal(got, ref)
  finally:
    if not was_parsed:
      flags.FLAGS.unparse_flags()
