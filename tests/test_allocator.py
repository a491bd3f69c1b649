"""CXRJAX_ALLOCATOR: entry points re-execute themselves under the chosen malloc."""
import os
import subprocess
import sys

from cxrjax.core.allocator import find_tcmalloc

SCRIPT = """
import os, sys
from cxrjax.core.allocator import active_allocator, reexec_with_allocator
reexec_with_allocator([sys.executable, *sys.argv])
print(active_allocator(), os.environ.get("MALLOC_ARENA_MAX", "-"), os.environ.get("LD_PRELOAD", "-"))
"""


def _run(tmp_path, choice):
  script = tmp_path / "entry.py"
  script.write_text(SCRIPT)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("CXRJAX_ALLOCATOR", "LD_PRELOAD"))}
  if choice is not None:
    env["CXRJAX_ALLOCATOR"] = choice
  return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                        timeout=60)


def test_system_is_the_default_and_glibc_tuned_sets_the_tunables(tmp_path):
  out = _run(tmp_path, None)
  assert out.returncode == 0 and out.stdout.split() == ["system", "-", "-"]
  out = _run(tmp_path, "glibc_tuned")
  assert out.returncode == 0 and out.stdout.split()[:2] == ["glibc_tuned", "1"]


def test_tcmalloc_is_preloaded_or_the_fallback_says_why(tmp_path):
  out = _run(tmp_path, "tcmalloc")
  assert out.returncode == 0
  lib = find_tcmalloc()
  if lib is None:
    assert out.stdout.split()[0] == "system" and "no tcmalloc library found" in out.stderr
  else:
    assert out.stdout.split() == ["tcmalloc", "-", lib]


def test_unknown_allocator_is_one_clear_line(tmp_path):
  out = _run(tmp_path, "jemalloc")
  assert out.returncode != 0 and "CXRJAX_ALLOCATOR must be one of" in out.stderr


def test_find_tcmalloc_looks_only_in_the_given_directories(tmp_path):
  empty, libdir = tmp_path / "empty", tmp_path / "lib"
  empty.mkdir()
  libdir.mkdir()
  (empty / "nested").mkdir()
  (empty / "nested" / "libtcmalloc_minimal.so.4").write_bytes(b"")  # below a listed dir: ignored
  assert find_tcmalloc((str(empty),)) is None
  (libdir / "libtcmalloc_minimal_debug.so.4").write_bytes(b"")
  assert find_tcmalloc((str(libdir),)) is None  # the debug build is never preloaded
  (libdir / "libtcmalloc_minimal.so.4").write_bytes(b"")
  assert find_tcmalloc((str(libdir),)) == str(libdir / "libtcmalloc_minimal.so.4")


def test_find_tcmalloc_survives_a_failing_library_lookup(tmp_path, monkeypatch):
  """A stale LD_PRELOAD made ctypes.util.find_library raise FileNotFoundError (seen here)."""
  def broken(name):
    raise FileNotFoundError(2, "No such file or directory", "'/missing/libtcmalloc.so'")
  monkeypatch.setattr("ctypes.util.find_library", broken)
  (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
  assert find_tcmalloc((str(tmp_path),)) == str(tmp_path / "libtcmalloc_minimal.so.4")
