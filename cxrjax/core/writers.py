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


class MetricWriter:
  """Interface: scalars per step, free text, flush/close."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

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
    parts += [f"{k} {_fmt_value(float(v))}" for k, v in scalars.items() if k != "lr"]
    if "lr" in scalars:
      parts.append(f"lr {float(scalars['lr']):.2e}")
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

  def write_text(self, text):
    for w in self.writers:
      w.write_text(text)

  def close(self):
    for w in self.writers:
      w.close()


def create_writer(workdir: str, stage: str, total_steps: int, *, tensorboard: bool = True,
                  console: bool = True) -> MultiWriter:
  """Writers for one stage: console + `<workdir>/tb/<stage>` + `<workdir>/<stage>/metrics.jsonl`."""
  if jax.process_index() != 0:
    return MultiWriter([])
  writers: list[MetricWriter] = []
  if console:
    writers.append(ConsoleWriter(stage, total_steps))
  os.makedirs(os.path.join(workdir, stage), exist_ok=True)
  writers.append(JsonlWriter(os.path.join(workdir, stage, "metrics.jsonl")))
  if tensorboard:
    writers.append(TensorBoardWriter(os.path.join(workdir, "tb", stage)))
  return MultiWriter(writers)
