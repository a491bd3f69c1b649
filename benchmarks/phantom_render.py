"""Throughput of the phantom radiograph renderer (frontal views), 1 and 2 processes.

  python benchmarks/phantom_render.py [--size 256] [--n 400] [--repeats 5]

Prints one JSON line per (size, view, processes): images/s and ms per image, the median of
--repeats timed runs over the same attribute lists after a warm-up run (which also builds the
per-size texture caches in each worker). Attributes come from
``cxrjax.data.phantoms.attributes.sample_study`` when it exists, else from a local sampler of
valid random StudyAttributes. BLAS is pinned to one thread per process so processes = cores.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import json
import multiprocessing as mp
import statistics
import time

import numpy as np

from cxrjax.data.labels import LABEL_INDEX, NUM_LABELS
from cxrjax.data.phantoms import render, study


def _local_study(seed: int, index: int) -> study.StudyAttributes:
  """A valid random StudyAttributes with a few findings (fallback when no sampler exists)."""
  rng = np.random.default_rng([seed, index])
  truth = rng.random(NUM_LABELS) < 0.15
  truth[LABEL_INDEX["No Finding"]] = False
  if not truth.any():
    truth[LABEL_INDEX["No Finding"]] = True
  sev = np.where(truth, rng.uniform(0.2, 1.0, NUM_LABELS), 0.0).astype(np.float32)
  lat = np.where(truth, rng.integers(1, 4, NUM_LABELS), 0).astype(np.int8)
  names = ("Cardiomegaly", "Enlarged Cardiomediastinum", "Support Devices")
  cm, em, sd = (truth[LABEL_INDEX[k]] for k in names)
  return study.StudyAttributes(
      study_id=f"s{index}", patient_id=f"p{index}", render_seed=int(rng.integers(1 << 31)),
      age_years=float(rng.uniform(18, 95)), sex_male=float(rng.random() < 0.5), race="group_a",
      site=int(rng.integers(0, 5)), habitus=float(rng.uniform(-1, 1)), inspiration=float(rng.uniform(0, 1)),
      rotation=float(rng.normal(0, 2)), frontal_view="AP" if rng.random() < 0.4 else "PA",
      has_lateral=bool(rng.random() < 0.5),
      ctr=float(rng.uniform(0.52, 0.65) if cm else rng.uniform(0.38, 0.49)),
      mediastinum_width=float(rng.uniform(0.34, 0.42) if em else rng.uniform(0.22, 0.31)),
      labels=truth.astype(np.float32), truth=truth, severity=sev, laterality=lat,
      lesion_xy=rng.uniform(0, 1, 2).astype(np.float32), lesion_radius=float(rng.uniform(0.05, 0.2)),
      fracture_rib=int(rng.integers(0, 9)) if truth[LABEL_INDEX["Fracture"]] else -1,
      devices=int(rng.integers(1, 16)) if sd else 0, shortcut=float(rng.random() < 0.1), pe=0, grade=0,
      tabular=np.zeros(80, np.float32))


def make_studies(n: int, seed: int = 0) -> list:
  try:
    from cxrjax.data.phantoms.attributes import sample_study
    return [sample_study(seed, i) for i in range(n)]
  except Exception:  # the sampler is optional here (absent, or wants a config): fall back
    return [_local_study(seed, i) for i in range(n)]


def _render_chunk(args) -> int:
  studies, size = args
  for a in studies:
    render.render_frontal(a, size)
  return len(studies)


def _time(pool, studies, size: int, procs: int) -> float:
  chunks = [(studies[i::procs], size) for i in range(procs)]
  t = time.perf_counter()
  if pool is None:
    _render_chunk(chunks[0])
  else:
    pool.map(_render_chunk, chunks)
  return time.perf_counter() - t


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", type=int, nargs="+", default=[256])
  ap.add_argument("--n", type=int, default=400)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
  args = ap.parse_args()
  studies = make_studies(args.n)
  for size in args.size:
    for procs in args.processes:
      pool = mp.get_context("fork").Pool(procs) if procs > 1 else None
      try:
        _time(pool, studies[:max(procs * 8, args.n // 4)], size, procs)  # warm-up: caches per worker
        runs = [_time(pool, studies, size, procs) for _ in range(args.repeats)]
      finally:
        if pool is not None:
          pool.close()
          pool.join()
      sec = statistics.median(runs)
      print(json.dumps({"size": size, "view": "frontal", "images_per_s": round(len(studies) / sec, 1),
                        "ms_per_image": round(1000.0 * sec / len(studies), 3), "processes": procs}))


if __name__ == "__main__":
  main()
