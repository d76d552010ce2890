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
- no `mmap` for large requests: they come from the heap, and are reused
  (below `SEPARATE_BLOCK_BYTES` where huge pages are on; see below);
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

Even so, a step whose temporaries come as one block of gigabytes (the
baseline CNN on 40x40 inputs: 3.2 GB) soon found its freed place taken by
some smaller allocation and went to the top of the heap, which then held
two such blocks' places (7.5 GB instead of 4.9 GB, in 8 of 9 runs of 60
steps). Blocks of `SEPARATE_BLOCK_BYTES` or more therefore get their own
mapping, outside the heap, where transparent huge pages make mapping them
afresh each step cheap (about 2,000 page faults for 3.2 GB instead of
780,000): only when glibc was started with `HUGE_PAGES_TUNABLE` in
`GLIBC_TUNABLES` (it reads it at start-up only; `python -m train.main`
starts itself again with it, `restart_with_huge_pages`) and the kernel
offers huge pages; otherwise every block stays in the heap, as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
import time
from typing import Mapping, Sequence

# From glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
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

# Requests this large get their own mapping where huge pages back them. A
# gigabyte: the 40x40 steps' blocks (2-3.2 GB) and not the MNIST step's
# (0.6 GB), which stay in the heap.
SEPARATE_BLOCK_BYTES = 1 << 30
# glibc >= 2.35: mapped chunks (and the heap) advised to use transparent
# huge pages.
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'
_TRANSPARENT_HUGE_PAGES = '/sys/kernel/mm/transparent_hugepage/enabled'
# How many mappings glibc may hold at once (its default).
_MMAP_MAX_DEFAULT = 65536

_settings_applied = False


def reuse_freed_host_memory() -> bool:
  """Applies the settings above; True if they took effect (glibc only)."""
  if not _is_glibc_linux():
    return False
  libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  mallopt = libc.mallopt
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  # mallopt returns 1 on success, 0 on error.
  if huge_pages_for_malloc():
    mapping = ((_M_MMAP_MAX, _MMAP_MAX_DEFAULT),
               (_M_MMAP_THRESHOLD, SEPARATE_BLOCK_BYTES))
  else:
    mapping = ((_M_MMAP_MAX, 0),)
  global _settings_applied
  _settings_applied = all(
      mallopt(option, value) == 1
      for option, value in ((_M_ARENA_MAX, 1), *mapping,
                            (_M_TRIM_THRESHOLD, NO_TRIM)))
  return _settings_applied


def _is_glibc_linux() -> bool:
  return platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'


def transparent_huge_pages_mode(path: str = _TRANSPARENT_HUGE_PAGES
                                ) -> str | None:
  """The kernel's transparent huge page mode ('always', 'madvise' or
  'never', the bracketed word of `path`), or None where there is none."""
  try:
    text = open(path).read()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else None


def huge_pages_available(mode: str | None = None) -> bool:
  """Whether glibc can be told to back its mappings with transparent huge
  pages here: glibc, and a kernel whose mode (`mode`, by default
  `transparent_huge_pages_mode()`) is 'always' or 'madvise'."""
  mode = transparent_huge_pages_mode() if mode is None else mode
  return _is_glibc_linux() and mode in ('always', 'madvise')


def _has_tunable(environ: Mapping[str, str]) -> bool:
  return HUGE_PAGES_TUNABLE in environ.get('GLIBC_TUNABLES', '').split(':')


def huge_pages_for_malloc(environ: Mapping[str, str] | None = None,
                          mode: str | None = None) -> bool:
  """Whether this process's glibc backs its mappings with huge pages:
  `huge_pages_available(mode)`, and started with `HUGE_PAGES_TUNABLE`."""
  environ = os.environ if environ is None else environ
  return huge_pages_available(mode) and _has_tunable(environ)


def environment_with_huge_pages(environ: Mapping[str, str],
                                mode: str | None = None
                                ) -> dict[str, str] | None:
  """`environ` with `HUGE_PAGES_TUNABLE` added to GLIBC_TUNABLES (other
  tunables kept), or None where that would change nothing: huge pages not
  `huge_pages_available(mode)`, or the tunable already there."""
  if not huge_pages_available(mode) or _has_tunable(environ):
    return None
  tunables = [item for item in environ.get('GLIBC_TUNABLES', '').split(':')
              if item]
  return {**environ,
          'GLIBC_TUNABLES': ':'.join([*tunables, HUGE_PAGES_TUNABLE])}


def restart_with_huge_pages(argv: Sequence[str]) -> None:
  """Starts this Python program again (same interpreter, same command
  line, same process id) with `HUGE_PAGES_TUNABLE` in its environment,
  where `environment_with_huge_pages` says it changes something; returns
  otherwise. Call it first thing, before any work worth keeping."""
  environ = environment_with_huge_pages(os.environ)
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *argv], environ)
  except OSError:  # Goes on as it was: every block in the heap.
    return


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
