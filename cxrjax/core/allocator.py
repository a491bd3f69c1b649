"""glibc malloc settings for XLA on CPU.

XLA's CPU runtime allocates and frees large temporary buffers every step. With glibc's
defaults those are mmap'd and unmapped each time, so every step pays hundreds of
thousands of page faults (measured: 205k -> 430 per paper-config prior step, 1.2x faster
end to end). Keeping freed memory in one arena avoids that, at the cost of the process
holding on to its peak heap, which is what tcmalloc (used by the PyTorch reference) does
as well. Applied by the launcher and the benchmarks; set CXRJAX_MALLOC_TUNING=0 to opt out.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 1 << 30),
             (_M_ARENA_MAX, 1))


def tune_malloc() -> bool:
  """Applies the settings through mallopt; returns whether they took effect (glibc only)."""
  if os.environ.get("CXRJAX_MALLOC_TUNING", "1") == "0":
    return False
  name = ctypes.util.find_library("c")
  if not name:
    return False
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
    return False
  return all(mallopt(param, value) == 1 for param, value in _SETTINGS)
