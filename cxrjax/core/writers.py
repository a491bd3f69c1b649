"""Metric writers: a console progress line and TensorBoard event files (no TensorFlow).

Only process 0 writes; the other processes get a writer that does nothing.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping

import jax
import numpy as np
from absl import logging


def _fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _fmt_value(v: float) -> str:
  return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def say(message: str) -> None:
  """A progress message for people: printed by process 0 only, always logged."""
  if jax.process_index() == 0:
    print(message, flush=True)
  logging.info(message)


def image_grid(images: np.ndarray) -> np.ndarray:
  """One picture of an evaluation's images: (H, W) one grey image, (N, H, W) grey images or
  (N, H, W, C) with C in {1, 3}; uint8, or float in [0, 1] (clipped). Returns uint8 (H', W', C),
  the batch tiled in a near-square grid with 2-pixel gaps."""
  x = np.asarray(images)
  if x.dtype != np.uint8:
    x = (np.clip(np.nan_to_num(x.astype(np.float32)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
  if x.ndim == 2:
    x = x[None]
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"images of shape {np.shape(images)}: give (H, W), (N, H, W) or (N, H, W, C) "
                     "with C in {1, 3}")
  n, h, w, c = x.shape
  cols = int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  grid = np.zeros((rows * (h + 2) - 2, cols * (w + 2) - 2, c), np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    grid[r * (h + 2):r * (h + 2) + h, q * (w + 2):q * (w + 2) + w] = x[i]
  return grid


class MetricWriter:
  """Interface: scalars per step, images per step, free text, flush/close."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None: ...

  def write_text(self, text: str) -> None: ...

  def close(self) -> None: ...


class ConsoleWriter(MetricWriter):
  """One progress line per log step: stage, step/total, metrics, steps/s, ETA."""

  def __init__(self, stage: str, total_steps: int, stream=None):
    self.stage, self.total = stage, total_steps
    self.stream = stream or sys.stdout
    self._last: tuple[int, float] | None = None

  def start(self, step: int) -> None:
    self._last = (step, time.perf_counter())

  def write_scalars(self, step, scalars):
    if scalars and all(k.startswith("eval/") for k in scalars):
      evals = "  ".join(f"{k[5:]} {_fmt_value(float(v))}" for k, v in scalars.items())
      print(f"[{self.stage}] step {step}/{self.total} eval: {evals}", file=self.stream, flush=True)
      return
    now = time.perf_counter()
    rate = None
    if self._last is not None and step > self._last[0]:
      rate = (step - self._last[0]) / max(now - self._last[1], 1e-9)
    self._last = (step, now)
    parts = [f"[{self.stage}] step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"]
    is_lr = lambda k: k == "lr" or k.startswith("lr/")
    parts += [f"{k} {_fmt_value(float(v))}" for k, v in scalars.items() if not is_lr(k)]
    parts += [f"{k} {float(v):.2e}" for k, v in scalars.items() if is_lr(k)]
    if rate:
      parts.append(f"{rate:.1f} steps/s  ETA {_fmt_duration((self.total - step) / rate)}")
    print("  ".join(parts), file=self.stream, flush=True)

  def write_text(self, text):
    print(text, file=self.stream, flush=True)


class TensorBoardWriter(MetricWriter):
  """TensorBoard event files through tensorboardX (TensorFlow not needed)."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it
    self._writer = SummaryWriter(logdir=logdir)

  def write_scalars(self, step, scalars):
    for k, v in scalars.items():
      self._writer.add_scalar(k, float(v), global_step=step)

  def write_images(self, step, images):
    for k, v in images.items():
      self._writer.add_image(k, image_grid(v), global_step=step, dataformats="HWC")

  def write_text(self, text):
    self._writer.add_text("log", text)

  def close(self):
    self._writer.flush()
    self._writer.close()


class JsonlWriter(MetricWriter):
  """Appends {"step": .., metrics} lines to a file, easy to load in a notebook."""

  def __init__(self, path: str):
    self.path = path

  def write_scalars(self, step, scalars):
    row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")


class PngWriter(MetricWriter):
  """Each evaluation image as <directory>/<name>_<step>.png (a grid for a batch); the console
  line names the files."""

  def __init__(self, directory: str, stream=None):
    self.directory, self.stream = directory, stream or sys.stdout

  def write_images(self, step, images):
    from PIL import Image
    os.makedirs(self.directory, exist_ok=True)
    paths = []
    for k, v in images.items():
      grid = image_grid(v)
      path = os.path.join(self.directory, f"{k.replace('/', '_')}_{int(step):06d}.png")
      Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
      paths.append(path)
    print(f"  images: {', '.join(paths)}", file=self.stream, flush=True)


class MultiWriter(MetricWriter):
  def __init__(self, writers):
    self.writers = list(writers)

  def start(self, step):
    for w in self.writers:
      if hasattr(w, "start"):
        w.start(step)

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self.writers:
      w.write_images(step, images)

  def write_text(self, text):
    for w in self.writers:
      w.write_text(text)

  def close(self):
    for w in self.writers:
      w.close()


def create_writer(workdir: str, stage: str, total_steps: int, *, tensorboard: bool = True,
                  console: bool = True) -> MultiWriter:
  """Writers for one stage: console + `<workdir>/tb/<stage>` + `<workdir>/<stage>/metrics.jsonl`
  + evaluation images as `<workdir>/<stage>/images/*.png`."""
  if jax.process_index() != 0:
    return MultiWriter([])
  writers: list[MetricWriter] = []
  if console:
    writers.append(ConsoleWriter(stage, total_steps))
  os.makedirs(os.path.join(workdir, stage), exist_ok=True)
  writers.append(JsonlWriter(os.path.join(workdir, stage, "metrics.jsonl")))
  writers.append(PngWriter(os.path.join(workdir, stage, "images")))
  if tensorboard:
    writers.append(TensorBoardWriter(os.path.join(workdir, "tb", stage)))
  return MultiWriter(writers)


def read_stage_metrics(workdir: str, stage: str, key: str) -> dict[int, dict]:
  """{step: row} of the rows of `<workdir>/<stage>/metrics.jsonl` that hold `key`, the last row per
  step (an evaluation repeated after a resume counts once); {} when the stage wrote nothing."""
  path = os.path.join(workdir, stage, "metrics.jsonl")
  rows: dict[int, dict] = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        row = json.loads(line)
        if key in row:
          rows[int(row["step"])] = row
  return rows
