"""Decode + augment throughput of the study pipeline over a TFDS array_record dataset.

  python benchmarks/data_pipeline.py [--studies 512] [--views 2] [--size 256] [--batch 32]
                                    [--encoding jpeg png]

Builds (in a temporary directory) N studies of `views` 256 x 256 PNG images with the study feature
spec, then prints one JSON line per measurement, images/s as the median over `--repeats` timed
runs of `--steps` batches after a warm-up:
  source_decode     src[i] alone (array_record read + PNG decode by TFDS)
  augment           augment.augment on decoded images alone
  pipeline          the whole StudyPipeline (decode + augment + batch), for each
                    (worker_count, read_threads) in --configs
images_per_cpu_s divides by this process's CPU seconds instead of wall seconds (all its threads;
not reported with worker processes): on a shared machine it estimates what one free core does.
The images are phantom radiographs (``cxrjax.data.phantoms``; a pool of 32 rendered studies reused
across the N studies, since rendering is slower than reading) or, where the phantom world does not
import or render, smooth random fields (octaves of upsampled noise), which compress and decode like
radiographs far better than white noise.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def smooth_image(rng: np.random.Generator, size: int) -> np.ndarray:
  """(size, size) uint8: a sum of upsampled noise octaves plus a vertical gradient."""
  from PIL import Image

  acc = np.zeros((size, size), np.float32)
  for cells, weight in ((4, 1.0), (16, 0.5), (64, 0.25)):
    noise = rng.random((cells, cells), dtype=np.float32)
    up = Image.fromarray(noise, mode="F").resize((size, size), Image.BICUBIC)
    acc += weight * np.asarray(up)
  acc += np.linspace(0, 0.8, size, dtype=np.float32)[:, None]
  acc = (acc - acc.min()) / (np.ptp(acc) + 1e-6)
  return (acc * 255).astype(np.uint8)


def image_pool(size: int, count: int = 64) -> tuple[list[np.ndarray], str]:
  """`count` distinct (size, size) uint8 images, and where they came from."""
  try:
    from cxrjax.data.phantoms import sample_study
    from cxrjax.data.phantoms.render import render_views

    pool = []
    for i in range(count):
      pool.extend(np.asarray(im, np.uint8).reshape(size, size) for im in
                  render_views(sample_study(0, i), size)[0])
      if len(pool) >= count:
        return pool[:count], "phantom"
  except Exception as e:  # the phantom world is optional here; say why it was not used
    print(json.dumps({"note": f"phantoms unavailable ({e!r}); using smooth random images"}),
          flush=True)
  rng = np.random.default_rng(0)
  return [smooth_image(rng, size) for _ in range(count)], "smooth"


def build_source(data_dir: str, studies: int, views: int, size: int, pool: list[np.ndarray],
                 encoding: str):
  """Writes the array_record dataset and returns its train split as a tfds data source."""
  import tensorflow_datasets as tfds

  from cxrjax.data.features import encode_image, study_features
  from cxrjax.data.labels import NUM_LABELS, VIEWS

  tfds.disable_progress_bar()

  class BenchCxrStudies(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=study_features(encoding=encoding))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(0)
      view_names = ["PA", "L", "AP", "UNKNOWN"]
      for i in range(studies):
        labels = rng.choice(np.array([1, 0, -1, np.nan], np.float32), NUM_LABELS)
        yield str(i), dict(
            study_id=f"s{i}", patient_id=f"p{i}",
            images=[encode_image(pool[(i * views + j) % len(pool)], encoding)
                    for j in range(views)],
            views=[view_names[j % len(VIEWS)] for j in range(views)], labels=labels,
            age_years=np.float32(rng.uniform(20, 90)), sex_male=np.float32(i % 2), race="",
            site="a", findings="The lungs are clear.", impression="No acute disease.")

  builder = BenchCxrStudies(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder.as_data_source()["train"]


def timed(fn, repeats: int) -> tuple[list[float], float]:
  """Wall seconds of each run, and the median CPU seconds of this process (all its threads) per
  run: on a shared machine the CPU figure says what a free core would do."""
  wall, cpu = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return wall, statistics.median(cpu)


def rate(count: float, seconds: float) -> float:
  return round(count / max(seconds, 1e-9), 1)


def emit(**record) -> None:
  print(json.dumps(record), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--studies", type=int, default=512)
  parser.add_argument("--views", type=int, default=2)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=16, help="batches per timed run")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--encoding", nargs="+", default=["jpeg", "png"],
                      help="image encodings to build and measure (data/features.py)")
  parser.add_argument("--configs", default="0:0,0:2,2:0",
                      help="comma-separated worker_count:read_threads pairs")
  args = parser.parse_args()
  # grain's worker processes read absl flags; this script parses its own with argparse.
  from absl import flags
  flags.FLAGS.mark_as_parsed()

  pool, kind = image_pool(args.size)
  for encoding in args.encoding:
    common = dict(studies=args.studies, views=args.views, size=args.size, cpus=os.cpu_count(),
                  images=kind, encoding=encoding)
    with tempfile.TemporaryDirectory() as tmp:
      measure(tmp, args, pool, common)


def measure(tmp: str, args, pool: list[np.ndarray], common: dict) -> None:
  from cxrjax.data.augment import AugmentConfig, augment
  from cxrjax.data.pipeline import PipelineConfig, StudyPipeline

  t = time.perf_counter()
  src = build_source(tmp, args.studies, args.views, args.size, pool, common["encoding"])
  emit(measure="build", seconds=round(time.perf_counter() - t, 2), **common)

  n_decode = min(len(src), 128)
  times, cpu = timed(lambda: [src[i] for i in range(n_decode)], args.repeats)
  emit(measure="source_decode", images_per_s=rate(n_decode * args.views, statistics.median(times)),
       images_per_cpu_s=rate(n_decode * args.views, cpu), **common)

  images = [im for i in range(min(len(src), 64)) for im in src[i]["images"]]
  cfg = AugmentConfig(size=args.size)
  rng = np.random.default_rng(0)
  times, cpu = timed(lambda: [augment(im, rng, cfg) for im in images], args.repeats)
  emit(measure="augment", images_per_s=rate(len(images), statistics.median(times)),
       images_per_cpu_s=rate(len(images), cpu), **common)

  for spec in args.configs.split(","):
    workers, threads = (int(v) for v in spec.split(":"))
    pipe = StudyPipeline(src, PipelineConfig(
        global_batch_size=args.batch, image_size=args.size, max_views=args.views,
        augment=AugmentConfig(), seed=0, worker_count=workers, read_threads=threads,
        prefetch_batches=max(2, threads)))
    try:
      t = time.perf_counter()
      for _ in range(max(2, workers * 2)):  # warm-up: starts threads / spawns workers
        next(pipe)
      warm = time.perf_counter() - t
      times, cpu = timed(lambda: [next(pipe) for _ in range(args.steps)], args.repeats)
    except Exception as e:  # e.g. no multiprocessing here: report and go on
      emit(measure="pipeline", worker_count=workers, read_threads=threads, error=repr(e), **common)
      continue
    finally:
      pipe.close()
    n = args.steps * args.batch
    extra = {} if workers else {"images_per_cpu_s": rate(n * args.views, cpu)}
    emit(measure="pipeline", worker_count=workers, read_threads=threads,
         images_per_s=rate(n * args.views, statistics.median(times)),
         studies_per_s=rate(n, statistics.median(times)), **extra,
         warmup_s=round(warm, 2), runs_s=[round(x, 3) for x in times], **common)


if __name__ == "__main__":
  sys.exit(main())
