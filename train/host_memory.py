"""Keeps freed host memory in the process, so XLA:CPU steps do not page-fault.

XLA:CPU allocates a step's temporary buffers (about 760 MB for the CapsNet
training step at batch 128: the PrimaryCaps patches and their gradient) with
`malloc` from its worker threads, and frees them when the step ends. glibc
serves a request that large from a thread's arena with a fresh `mmap`, and
`munmap`s it on `free`; so every step the kernel maps, zeroes and faults in
those pages again, one 4 KiB page at a time. Measured on 2 CPU cores:
the PrimaryCaps convolution forward takes 572 ms with glibc's defaults and
370 ms with the settings below; the whole training step 2.10 s and 1.65 s
(`python benchmarks/train_step.py` against `--system-malloc`).

The settings (the same as the environment variables MALLOC_ARENA_MAX=1,
MALLOC_MMAP_MAX_=0 and MALLOC_TRIM_THRESHOLD_=-1):

- one arena, the main heap, for every thread: other arenas fall back to
  `mmap` for requests beyond their 64 MB heaps whatever the other settings;
- no `mmap` for large requests: they come from the heap, and are reused;
- no trimming of the heap's top when memory is freed (-1 turns it off,
  mallopt(3)). A threshold is not enough: with the largest one mallopt
  takes, 2 GiB, a step whose temporaries pass it (the affNIST protocol's
  CapsNet step, 2.1 GB) gave them all back at its end, and the next step
  faulted them in again: about 570,000 minor page faults and 1.5-2.6 s a
  step, against none and 1.05-1.13 s with trimming off (alternating
  processes, 2 CPU cores).

The cost: the process keeps its peak heap until it exits (it never returns
freed memory to the system). Only glibc has `mallopt`; elsewhere this is a
no-op. Call it before the first computation (JAX's thread pools start with
the backend), as `train/main.py` and the benchmarks do.

With the heap kept, when a computation's temporaries are freed matters.
XLA:CPU frees them on its worker thread after it has made the outputs
ready, not before: a caller that waits for the outputs and dispatches the
next step at once gets there first (in 16 of 20 MNIST steps sampled with
`mallinfo2`, 0.62 GB of the last step's temporaries were still in use on
waking). The next step's temporaries then cannot reuse that memory and go
above it, the two steps' blocks and the small allocations between them
interleave, and the heap grows: a MultiMNIST step (1.44 GB of temporaries)
with an evaluation every 3 or 5 steps took it to 5.1-5.2 GB. Pausing for
`RELEASE_PAUSE_SECONDS` after each wait (`pause_for_released_temporaries`)
kept it at 2.4 GB (peak resident 2.7 GB); docs/speed.md, "Host memory".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys
import time

# From glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# M_TRIM_THRESHOLD's value that turns trimming off.
NO_TRIM = -1

# How long XLA:CPU's worker thread is given to free a finished computation's
# temporaries before the next computation is dispatched: 5 ms sufficed for
# the MultiMNIST step with another training process on the same 2 cores,
# and costs under 1% of a CPU training step. A more loaded machine can take
# longer to free them; the heap then grows as it did without the pause.
RELEASE_PAUSE_SECONDS = 0.005

_settings_applied = False


def reuse_freed_host_memory() -> bool:
  """Applies the settings above; True if they took effect (glibc only)."""
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  mallopt = libc.mallopt
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  # mallopt returns 1 on success, 0 on error.
  global _settings_applied
  _settings_applied = all(
      mallopt(option, value) == 1
      for option, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
                            (_M_TRIM_THRESHOLD, NO_TRIM)))
  return _settings_applied


def release_pause_seconds() -> float:
  """`RELEASE_PAUSE_SECONDS` where this process keeps its freed heap and
  computes on the CPU; 0 elsewhere (an accelerator's temporaries live in
  its own memory, and a pause would only cost time)."""
  if not _settings_applied:
    return 0.0
  import jax  # pylint: disable=g-import-not-at-top
  return RELEASE_PAUSE_SECONDS if jax.default_backend() == 'cpu' else 0.0


def pause_for_released_temporaries(seconds: float | None = None) -> None:
  """Call after waiting for a computation's outputs, before dispatching the
  next large one: gives XLA:CPU the moment it takes to free the finished
  computation's temporaries (`seconds`, by default
  `release_pause_seconds()`)."""
  if seconds is None:
    seconds = release_pause_seconds()
  if seconds > 0:
    time.sleep(seconds)


def peak_resident_bytes() -> int | None:
  """The process's peak resident memory so far (its high-water mark), or
  None where the OS does not report it."""
  try:
    import resource  # pylint: disable=g-import-not-at-top
  except ImportError:  # Not on Windows.
    return None
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  # Bytes on macOS, KiB on Linux and the BSDs.
  return peak if sys.platform == 'darwin' else peak * 1024
