"""glibc malloc settings for XLA on CPU.

XLA's CPU runtime allocates and frees large temporary buffers every step. With glibc's
defaults those are mmap'd and unmapped each time, so every step pays hundreds of
thousands of page faults (measured: 205k -> 430 per paper-config prior step; 13.0 ->
9.8 s/step). Keeping freed memory in one arena avoids that, at the cost of the process
holding on to its peak heap, as tcmalloc (used by the PyTorch reference) does too.

glibc reads these settings only from the environment at process start (mallopt cannot
set a trim threshold above 2 GiB), so entry points re-execute themselves once with them
set when CXRJAX_MALLOC_TUNING=1. It is opt-in: with one arena that never trims, the heap
fragments and grows (paper-config prior step: 21 GiB peak RSS instead of 8.5 GiB, and an
out-of-memory kill on a 24 GiB machine with a 1 GiB top pad), which is fine for a short
benchmark on a big host and not as a default.
"""
from __future__ import annotations

import os
import sys

MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "100000000000",
    "MALLOC_TOP_PAD_": "1000000000",
}


def malloc_tuned() -> bool:
  return all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())


def reexec_with_tuned_malloc(argv: list[str]) -> None:
  """Replaces this process by `argv` with the malloc settings when CXRJAX_MALLOC_TUNING=1,
  they are not set yet, and the platform is Linux/glibc. Call before importing jax."""
  if (os.environ.get("CXRJAX_MALLOC_TUNING", "0") != "1" or malloc_tuned()
      or not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(argv[0], argv, {**os.environ, **MALLOC_ENV})
