"""Orbax checkpoints of (train state, data-iterator state, run metadata).

Layout: `<dir>/<step>/{state, data, meta}`. The manager keeps the last `keep` steps
and, when a metric is given, the best one too. Saves are asynchronous; a process
killed mid-save leaves a temporary directory Orbax never reads back, so the
previous step stays the latest.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from cxrjax.core.errors import CheckpointError
from cxrjax.core.quiet_logs import drop_absl_messages


# How long a failed restore keeps stderr held while TensorStore's in-flight reads finish.
_FAILED_READS_DRAIN_S = 1.0


@contextlib.contextmanager
def _stderr_held_back():
  """Holds file descriptor 2 in a temporary file for the duration of a restore.

  When a restore fails, TensorStore reads still in flight complete after Orbax has closed its
  event loop, and their callbacks print 'Event loop is closed' tracebacks straight to fd 2, some
  milliseconds later and from another thread. Holding fd 2 keeps a failed restore to the one
  error it raises: what was held is replayed if the restore succeeds and dropped, once the reads
  have drained, if it fails.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  failed = False
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    except BaseException:
      failed = True
      raise
    finally:
      if failed:
        time.sleep(_FAILED_READS_DRAIN_S)
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      if not failed:
        held.seek(0)
        text = held.read()
        if text:
          os.write(2, text)


# With a best metric, Orbax warns at every save that carries no metrics; the latest checkpoint
# between evaluations (what a resume needs) carries none on purpose, so that line is dropped.
_SAVE_WITHOUT_METRICS = "Requested `tracked_metric`; did not provide metrics."
drop_absl_messages((_SAVE_WITHOUT_METRICS,))


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for one training stage."""

  def __init__(self, directory: str, *, keep: int = 2, best_metric: str | None = None,
               best_mode: str = "max", async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    policies = [pp.LatestN(n=keep)]
    if best_metric:
      policies.append(pp.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                               n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=pp.AnyPreservationPolicy(policies),
        best_fn=(lambda m: m[best_metric]) if best_metric else None, best_mode=best_mode,
        enable_async_checkpointing=async_save, create=True)
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except Exception as e:  # a file where the directory should be, permissions, ...
      raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {e}") from e

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    return self._manager.best_step() if self.best_metric else self.latest_step()

  def save(self, step: int, state: Any, *, data_state: dict, meta: dict,
           metrics: dict | None = None) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restores onto `abstract_state` (ShapeDtypeStructs carrying shardings).

    Any failure (missing or truncated files, a tree that does not match this
    config) becomes one CheckpointError naming the directory; nothing is deleted.
    """
    path = os.path.join(self.directory, str(step))
    try:
      with _stderr_held_back():
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
    except Exception as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(
          f"checkpoint {path} cannot be restored ({type(e).__name__}: {first[:300]}). It may be "
          f"corrupt or from a different config; move it aside to resume from an earlier step, "
          f"or use a new --workdir.") from e
    return out.state, out.data, out.meta

  def restore_raw(self, step: int) -> tuple[dict, dict]:
    """(state as a plain nested dict of numpy arrays, meta), with no target tree needed."""
    try:
      # Onto one local device, so a checkpoint written on any mesh reads back anywhere.
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      with _stderr_held_back():
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(fallback_sharding=device), meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(f"checkpoint {self.directory}/{step} cannot be read: {e}") from e
    return jax.tree.map(np.asarray, out.state), out.meta

  def restore_meta(self, step: int) -> dict:
    try:
      return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:
      raise CheckpointError(f"checkpoint {self.directory}/{step} has no readable metadata: {e}") from e

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` placed on `shardings` (what Orbax restores onto)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_state(directory: str, step: int | None = None) -> tuple[dict, dict]:
  """(train state as nested dicts of numpy arrays, meta) of step `step` (default: latest) of a
  stage's checkpoint directory, e.g. runs/prior/prior/ckpt."""
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory {directory} does not exist")
  ckpt = Checkpointer(directory)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint found in {directory}")
    return ckpt.restore_raw(step)
  finally:
    ckpt.close()


def restore_variables(directory: str, step: int | None = None) -> tuple[dict, dict]:
  """({'params': the copy the stage evaluated with (EMA when kept and chosen), **collections},
  meta) of a stage checkpoint: what a model's apply, `train(graft=...)` or `frozen=` take."""
  state, meta = restore_state(directory, step)
  use_ema = state.get("ema_params") is not None and meta.get("ema_for_eval", True)
  variables = {"params": state["ema_params"] if use_ema else state["params"]}
  variables.update(state.get("collections") or {})
  return variables, meta
