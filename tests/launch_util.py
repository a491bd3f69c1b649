"""Running `python -m cxrjax.launch` in a subprocess, as a user would, preparing and reading the
work directories of such runs (the kill-and-resume tests), and importing the benchmark scripts
whose code tests exercise (not a test module)."""
import importlib.util
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args, env=None, timeout=600, cwd=ROOT):
  """Returns the CompletedProcess; stdout and stderr as text."""
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
  full_env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "cxrjax.launch", *args], cwd=cwd, env=full_env,
                        capture_output=True, text=True, timeout=timeout)


def ok(proc):
  assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
  return proc


def copy_stages(src: str, dst: str, *, skip: tuple = (), only: tuple | None = None) -> None:
  """Copies the folders of the finished run `src` (its stages and data) into `dst`: `only` these,
  or every folder but `skip`. A kill-and-resume test copies what it does not rerun, so the kill
  and the resumption are all it pays for."""
  names = only if only is not None else [e for e in sorted(os.listdir(src)) if e not in skip and
                                         os.path.isdir(os.path.join(src, e))]
  for name in names:
    shutil.copytree(os.path.join(src, name), os.path.join(dst, name))


def restored_state(workdir: str, stage: str):
  """The last checkpoint of `stage` in the run `workdir`, as core.checkpoint.restore_state reads it."""
  from cxrjax.core.checkpoint import restore_state
  state, _ = restore_state(os.path.join(workdir, stage, "ckpt"))
  return state


def tree_digest(path) -> str:
  """sha256 over every file's relative path and bytes below `path`: equal iff nothing changed."""
  import hashlib
  h = hashlib.sha256()
  for d, _, files in sorted(os.walk(path)):
    for f in sorted(files):
      h.update(os.path.relpath(os.path.join(d, f), path).encode())
      with open(os.path.join(d, f), "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


def load_benchmark(name: str):
  """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
