"""Choosing the process's malloc for XLA on CPU (``CXRJAX_ALLOCATOR``).

XLA's CPU runtime allocates and frees large temporary buffers every step. Under glibc's
defaults those are mmap'd and unmapped each time, so every step pays hundreds of thousands
of page faults (measured: 205k per paper-config prior step). Two remedies, both chosen by
the environment variable ``CXRJAX_ALLOCATOR`` before the process starts:

  system       (default) whatever the process was started with.
  tcmalloc     gperftools' tcmalloc via LD_PRELOAD, as the PyTorch reference measurements
               used. Needs the library (Debian/Ubuntu: ``apt-get install libtcmalloc-minimal4``).
               Paper-config prior step 13.4 -> 9.3 s; peak RSS 15 GiB (glibc: 8.6 GiB).
  glibc_tuned  glibc kept in one arena with no mmap and no trim. As fast as tcmalloc but the
               heap fragments: 21 GiB peak RSS on the paper config, and one out-of-memory kill
               on a 24 GiB machine. For short benchmarks on big hosts only.

Both are re-executions (LD_PRELOAD and glibc's tunables are read only at process start):
entry points call ``reexec_with_allocator`` before importing jax. Where the choice is
unavailable (no tcmalloc library, not Linux/glibc) the process goes on with ``system`` and
says so on stderr.
"""
from __future__ import annotations

import ctypes.util
import glob
import os
import sys

ALLOCATORS = ("system", "tcmalloc", "glibc_tuned")

GLIBC_TUNED_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "100000000000",
    "MALLOC_TOP_PAD_": "1000000000",
}
_MARK = "CXRJAX_ALLOCATOR_ACTIVE"  # set in the re-executed process: what it runs with


LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                "/usr/local/lib", "/usr/local/lib64")


def find_tcmalloc(dirs: tuple[str, ...] = LIBRARY_DIRS) -> str | None:
  """Path of a tcmalloc shared library in the usual library directories, or None.

  Looks only in `dirs` themselves: a recursive search of /usr/lib follows symlinks and ran for
  minutes (without finding anything) on a machine without tcmalloc.
  """
  for name in ("tcmalloc_minimal", "tcmalloc"):
    try:
      found = ctypes.util.find_library(name)
    except OSError:  # e.g. a stale LD_PRELOAD: ctypes then parses the loader's error as a path
      found = None
    if found:
      for d in dirs:
        path = os.path.join(d, found)
        if os.path.exists(path):
          return path
  hits = sorted(h for d in dirs for h in glob.glob(os.path.join(d, "libtcmalloc*.so*")))
  return next((h for h in hits if "debug" not in h), None)


def active_allocator() -> str:
  """The allocator this process runs with (as set up by ``reexec_with_allocator``)."""
  return os.environ.get(_MARK, "system")


def reexec_with_allocator(argv: list[str], choice: str | None = None) -> None:
  """Replaces this process by ``argv`` running under ``choice`` (default: $CXRJAX_ALLOCATOR).

  Returns without re-executing when the choice is 'system', already active, or unavailable.
  Call before importing jax.
  """
  choice = choice or os.environ.get("CXRJAX_ALLOCATOR", "system")
  if choice not in ALLOCATORS:
    raise SystemExit(f"error: CXRJAX_ALLOCATOR must be one of {ALLOCATORS}, got {choice!r}")
  if choice == "system" or active_allocator() == choice:
    return
  if not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None:
    print(f"cxrjax: allocator {choice!r} needs Linux with glibc; using the system malloc",
          file=sys.stderr)
    return
  env = {**os.environ, _MARK: choice}
  if choice == "tcmalloc":
    lib = find_tcmalloc()
    if lib is None:
      print("cxrjax: no tcmalloc library found (apt-get install libtcmalloc-minimal4); "
            "using the system malloc", file=sys.stderr)
      return
    env["LD_PRELOAD"] = ":".join(p for p in (lib, os.environ.get("LD_PRELOAD", "")) if p)
  else:
    env.update(GLIBC_TUNED_ENV)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(argv[0], argv, env)
