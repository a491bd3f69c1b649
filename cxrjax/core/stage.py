"""One way to run a stage of a system: its config block in, a trained result out.

A system creates one `Run` (mesh, workdir, compile cache, the config recorded with every
checkpoint) and calls `run.stage(task, data, block, ...)` for each of its stages. The block is a
stage config block (configs/common.py writes them):

  steps, batch_size, log_every, checkpoint_every, eval_every, keep, optim,
  optional plateau / early_stop blocks ({'enabled': bool, 'metric': ..., settings of
  core.control's classes}).

Fingerprints chain: a stage's fingerprint is its parent's (what it was built from: the data, an
earlier stage's result) plus, under 'stage/<name>', its block, seed and what else defines it here;
the result carries it on, so a later stage that depends on this one is refused when this one
changed.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

from cxrjax.core import loop
from cxrjax.core.compile_cache import enable_compile_cache
from cxrjax.core.control import EarlyStopping, ReduceOnPlateau, from_block
from cxrjax.core.errors import ConfigError
from cxrjax.core.mesh import check_batch_size, create_mesh
from cxrjax.core.task import Task


def _plain(block) -> dict:
  return block.to_dict() if hasattr(block, "to_dict") else dict(block)


def schedule_from_block(block, best: tuple[str, str] | None = None) -> loop.Schedule:
  """A loop.Schedule from a stage block; best = (metric, 'min' | 'max') keeps the best evaluation."""
  b = _plain(block)
  return loop.Schedule(
      num_steps=b["steps"], log_every=b["log_every"], checkpoint_every=b["checkpoint_every"],
      keep=b.get("keep", 1), eval_every=b.get("eval_every", 0),
      best_metric=best[0] if best else None, best_mode=best[1] if best else "max",
      plateau=from_block(b.get("plateau"), ReduceOnPlateau),
      early_stop=from_block(b.get("early_stop"), EarlyStopping))


@dataclasses.dataclass
class StageResult(loop.TrainResult):
  """A TrainResult plus the fingerprint that defines it (a later stage's parent)."""
  fingerprint: dict = dataclasses.field(default_factory=dict)


def usable_workdir(workdir: str) -> None:
  """Creates `workdir` if needed; a ConfigError when it is a file or cannot be written (a run
  would otherwise fail at its first checkpoint, or after training, at its results)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is a file, not a directory; give a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"cannot create --workdir {workdir}: {e.strerror}") from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir {workdir} is not writable; give a writable directory (copy a "
                      f"finished run elsewhere to re-evaluate it)")


@dataclasses.dataclass
class Run:
  """What the stages of one run share.

  config: the whole run config as a dict (stored with every checkpoint for the record).
  programs: compiled train steps by program (core.task.program_key): stages and replicas with
    the same program compile once.
  """
  mesh: Any
  workdir: str
  config: dict
  tensorboard: bool = True
  programs: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def start(cls, config, workdir: str, batch_sizes: Mapping[str, int] | None = None) -> "Run":
    """Creates the workdir and the mesh (config.mesh), turns on the persistent compilation cache
    (config.compile_cache, when the config has one) and checks that each named batch size
    divides over the mesh."""
    usable_workdir(workdir)
    if "compile_cache" in config:
      enable_compile_cache(config.compile_cache, workdir)
    mesh = create_mesh(**config.mesh)
    for field, size in (batch_sizes or {}).items():
      check_batch_size(size, mesh, field)
    return cls(mesh=mesh, workdir=workdir, config=config.to_dict(),
               tensorboard=bool(config.get("tensorboard", True)))

  def stage(self, task: Task, data, block, *, seed: int, parent: Mapping[str, Any] | None = None,
            defines: Mapping[str, Any] | None = None, name: str | None = None,
            evaluate: Callable | None = None, best: tuple[str, str] | None = None,
            ema: Mapping[str, Any] | None = None, frozen: Any = None,
            graft: Mapping[str, Any] | None = None) -> StageResult:
    """Trains (or resumes, or loads) one stage through the core loop.

    block: the stage's config block (its optim may be one block or one per update of the task).
    parent: the fingerprint this stage builds on; defines: anything else that defines it (model
      sizes, loss settings), kept with the block and the seed under 'stage/<name>'.
    Other arguments as core.loop.train.
    """
    name = name or task.name
    b = _plain(block)
    defined = {k: _plain(v) if hasattr(v, "to_dict") else v for k, v in (defines or {}).items()}
    fingerprint = {**(parent or {}), f"stage/{name}": {"block": b, "seed": seed, **defined}}
    result = loop.train(task, data, mesh=self.mesh, workdir=self.workdir,
                        schedule=schedule_from_block(b, best), optim=b["optim"], seed=seed,
                        ema=ema, evaluate=evaluate, frozen=frozen, graft=graft,
                        fingerprint=fingerprint, config=self.config, tensorboard=self.tensorboard,
                        name=name, programs=self.programs)
    return StageResult(**vars(result), fingerprint=fingerprint)
