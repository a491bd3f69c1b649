"""Entry point: `python -m cxrjax.launch --config configs/<system>.py[:variant] [--workdir DIR]`.

Overrides: `--config.train.steps=100`. Multi-process: `--coordinator_address=host:port
--num_processes=N --process_id=i`, or run under SLURM / Open MPI (detected). The config is
validated (cxrjax.systems.<system>.validate_config) before anything runs. Errors the user can fix
end the run with one line on stderr and exit status 2; any other failure ends with one line
naming the file that holds its traceback (<workdir>/crash.log) and exit status 1.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/prior.py:tiny",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/<config>[-variant]).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_LOCAL_DEVICES = flags.DEFINE_integer("cpu_devices", None,
                                      "Simulated CPU devices per process (testing meshes).")

flags.mark_flags_as_required(["config"])


def default_workdir(config_arg: str) -> str:
  """runs/<config file stem>[-<variant>] for `configs/prior.py[:variant]`."""
  path, _, variant = config_arg.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", f"{stem}-{variant}" if variant else stem)


def _config_arg(argv) -> str:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return "config"


def _explain(error: BaseException, argv: list[str]) -> str:
  """One line for a flag/config error: absl and ml_collections bury it in long tracebacks."""
  config_arg = _config_arg(argv)
  path = config_arg.partition(":")[0]
  if config_arg != "config" and not os.path.exists(path):
    return f"config file {path!r} not found (relative to {os.getcwd()})"
  text = str(error)
  if "Did you mean" in text or isinstance(error, (AttributeError, KeyError)):
    field = next((a.split("=")[0] for a in argv if a.startswith("--config.")), "")
    guess = re.search(r'Did you mean "([^"]+)"', text)
    return f"unknown config field {field}" + (f" (did you mean {guess.group(1)!r}?)" if guess else "")
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  return lines[-1] if lines else type(error).__name__


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that ends bad flags, config files or overrides with one line."""
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value.system  # a failed config file only raises on first use; fail here
    return rest
  except (flags.Error, Exception) as e:  # pylint: disable=broad-except
    print(f"error: {_explain(e, argv)}", file=sys.stderr, flush=True)
    sys.exit(2)


def _crash(error: BaseException, workdir: str) -> str:
  """Writes the traceback of an unexpected error to <workdir>/crash.log (or a temporary file);
  returns the one line to print."""
  text = "".join(traceback.format_exception(error))
  path = os.path.join(workdir, "crash.log")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      f.write(text)
  except OSError:
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix="-cxrjax-crash.log", delete=False) as f:
      f.write(text)
      path = f.name
  message = str(error).strip().splitlines()[0] if str(error).strip() else ""
  return (f"error: the run failed with {type(error).__name__}: {message[:300]} -- a bug, not your "
          f"input; the traceback is in {path}")


def _exit(code: int) -> None:
  """Ends the process now, after flushing: an interpreter shutdown after a failed checkpoint
  restore lets TensorStore's pending callbacks print pages of 'Event loop is closed' tracebacks
  under the one error line. Everything worth keeping is already written and closed by then."""
  sys.stdout.flush()
  sys.stderr.flush()
  logging.flush()
  # Other threads (TensorStore's callbacks) may still be printing: from here on, nowhere.
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  os.dup2(devnull, 2)
  os._exit(code)


def main(argv) -> None:
  del argv
  from cxrjax.core.distributed import maybe_initialize
  from cxrjax.core.errors import CxrjaxError

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint step at INFO
  config = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(_config_arg(sys.argv))
  try:
    system = importlib.import_module(f"cxrjax.systems.{config.system}")
    system.validate_config(config)
    maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                     _LOCAL_DEVICES.value)
    system.run(config, workdir)
  except CxrjaxError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    _exit(2)
  except KeyboardInterrupt:
    print(f"interrupted; rerun the same command to resume from the last checkpoint in {workdir}",
          file=sys.stderr)
    _exit(130)
  except Exception as e:  # pylint: disable=broad-except
    print(_crash(e, workdir), file=sys.stderr, flush=True)
    _exit(1)


def run() -> None:
  from cxrjax.core.allocator import reexec_with_allocator
  reexec_with_allocator([sys.executable, "-m", "cxrjax.launch", *sys.argv[1:]])
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
