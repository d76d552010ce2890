"""train/host_memory.py: freed host memory stays in the process."""

import os
import platform
import subprocess
import sys

import pytest

from train import host_memory

# glibc's `mallinfo2()` as `libc.mallinfo2()`, for the probes below.
_MALLINFO2 = '''
import ctypes
class Info(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in (
      'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks '
      'fordblks keepcost').split()]
libc = ctypes.CDLL('libc.so.6')
libc.mallinfo2.restype = Info
'''


def _run_python(code: str, *args: str,
                environ: dict[str, str] | None = None) -> str:
  """The standard output of `python -c code args...` (in `environ`)."""
  return subprocess.run([sys.executable, '-c', code, *args], check=True,
                        capture_output=True, text=True, env=environ).stdout


# Allocates and touches BUFFERS buffers of 256 MB in a thread other than the
# main one (as XLA's workers do), frees them, then prints how much of them
# the process still holds.
_PROBE = '''
import ctypes, os, sys, threading
from train import host_memory
applied = sys.argv[1] == 'reuse' and host_memory.reuse_freed_host_memory()
buffers = int(sys.argv[2])
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
page = os.sysconf('SC_PAGE_SIZE')
def resident():
  return int(open('/proc/self/statm').read().split()[1]) * page
size = 256 << 20
kept = []
def allocate_and_free():
  before = resident()
  pointers = [libc.malloc(size) for _ in range(buffers)]
  for pointer in pointers:
    ctypes.memset(pointer, 1, size)
  for pointer in pointers:
    libc.free(pointer)
  kept.append(resident() - before)
thread = threading.Thread(target=allocate_and_free)
thread.start()
thread.join()
print(applied, kept[0])
'''

glibc_only = pytest.mark.skipif(
    platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc',
    reason='mallopt is glibc only')


def _probe(mode: str, buffers: int = 1) -> tuple[str, int]:
  output = _run_python(_PROBE, mode, str(buffers)).split()
  return output[0], int(output[1])


@glibc_only
def test_freed_memory_is_kept_for_reuse():
  applied, kept = _probe('reuse')
  assert applied == 'True'
  assert kept > 200 << 20, kept  # 256 MB freed, still resident.


@glibc_only
def test_by_default_glibc_unmaps_it():
  """The contrast: without the settings the same pages go back to the
  system, which is what makes each XLA step fault them in again."""
  applied, kept = _probe('system')
  assert applied == 'False'
  assert kept < 50 << 20, kept


@glibc_only
def test_more_than_2_gib_freed_is_kept_too():
  """9 x 256 MB: past the largest trim threshold mallopt takes (2 GiB),
  with which glibc gave all of it back, as it did the affNIST step's
  temporaries at the end of every step."""
  applied, kept = _probe('reuse', buffers=9)
  assert applied == 'True'
  assert kept > 2200 << 20, kept


def test_default_evaluation_batch_fits_in_the_training_steps_memory():
  """Evaluation (a forward pass) at no more than the training batch needs
  less temporary memory than the training step, and so reuses what the step
  freed; a larger one grows the heap past it (the CapsNet evaluated at 500:
  a 5.0 GB peak resident set instead of 2.3 GB)."""
  from train.configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  assert config.eval_batch_size <= config.batch_size


def test_peak_resident_bytes_is_the_high_water_mark():
  before = host_memory.peak_resident_bytes()
  if before is None:
    pytest.skip('no resource module')
  assert before > 10 << 20
  block = bytearray(before + (64 << 20))  # zeroed, so touched
  after = host_memory.peak_resident_bytes()
  del block
  assert after >= before + (64 << 20)
  assert host_memory.peak_resident_bytes() >= after


# Runs a jitted computation with about 256 MB of temporaries STEPS times in
# a worker-freed heap (the settings applied), waiting for each one's output
# and pausing PAUSE seconds before the next dispatch as the training loop
# does; prints the pause the loop would take, the temporaries' size and the
# most that was in use after a pause beyond what was in use before.
_RELEASE_PROBE = _MALLINFO2 + '''
import sys
from train import host_memory
assert host_memory.reuse_freed_host_memory()
import jax, jax.numpy as jnp
pause, steps = float(sys.argv[1]), int(sys.argv[2])
@jax.jit
def compute(x):
  exp = jnp.exp(x)
  return jnp.sum(jnp.cumsum(exp) * jnp.flip(exp))
x = jnp.ones((1 << 25,), jnp.float32) * 1e-3  # 128 MB
temporaries = compute.lower(x).compile().memory_analysis().temp_size_in_bytes
jax.block_until_ready(compute(x))
host_memory.pause_for_released_temporaries(pause)
base = libc.mallinfo2()
in_use = []
for _ in range(steps):
  jax.block_until_ready(compute(x))
  host_memory.pause_for_released_temporaries(pause)
  in_use.append(libc.mallinfo2().uordblks - base.uordblks)
print(host_memory.release_pause_seconds(), temporaries, max(in_use))
'''


@glibc_only
def test_a_steps_temporaries_are_freed_during_the_pause():
  """XLA:CPU frees a computation's temporaries shortly after its outputs are
  ready; after the wait and the pause they are no longer in use, so the next
  dispatch can reuse them. (The pause is generous here, for a loaded test
  machine; the training loop's 5 ms and what it saves are measured in
  docs/speed.md, "Host memory".)"""
  output = _run_python(_RELEASE_PROBE, '0.2', '6').split()
  pause, temporaries, in_use = (float(output[0]), int(output[1]),
                                int(output[2]))
  # Applied, on the CPU: the loop's pause.
  assert pause == host_memory.RELEASE_PAUSE_SECONDS
  assert temporaries > 200 << 20, temporaries
  assert in_use < temporaries // 4, (in_use, temporaries)


def test_no_pause_without_the_settings():
  """Without the settings (or off the CPU) there is nothing to wait for."""
  output = _run_python('from train import host_memory; '
                       'print(host_memory.release_pause_seconds())')
  assert float(output) == 0.0


# Blocks of SEPARATE_BLOCK_BYTES or more get their own mapping where glibc
# backs mappings with huge pages.
_MAPPED_PROBE = _MALLINFO2 + '''
import sys
from train import host_memory
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
print(host_memory.reuse_freed_host_memory(),
      host_memory.huge_pages_for_malloc())
for size in (host_memory.SEPARATE_BLOCK_BYTES + (64 << 20), 256 << 20):
  before = libc.mallinfo2().hblkhd  # Mappings made before the settings.
  pointer = libc.malloc(size)
  mapped = libc.mallinfo2().hblkhd - before
  libc.free(pointer)
  print(size, mapped, libc.mallinfo2().hblkhd - before)
'''

huge_pages_only = pytest.mark.skipif(
    not host_memory.huge_pages_available(),
    reason='needs glibc and a kernel with transparent huge pages')


def _mapped_probe(environ: dict[str, str]) -> list[list[str]]:
  output = _run_python(_MAPPED_PROBE, environ=environ)
  return [line.split() for line in output.splitlines()]


def _environment_without_tunables() -> dict[str, str]:
  return {name: value for name, value in os.environ.items()
          if name != 'GLIBC_TUNABLES'}


@huge_pages_only
def test_with_huge_pages_a_gigabyte_block_gets_its_own_mapping():
  environ = host_memory.environment_with_huge_pages(
      _environment_without_tunables())
  (applied, huge), large, small = _mapped_probe(environ)
  assert (applied, huge) == ('True', 'True')
  size, mapped, after_free = map(int, large)
  assert mapped >= size and after_free == 0  # Outside the heap, given back.
  size, mapped, after_free = map(int, small)
  assert mapped == 0 and after_free == 0  # From the heap, kept.


@glibc_only
def test_without_huge_pages_every_block_stays_in_the_heap():
  (applied, huge), large, small = _mapped_probe(
      _environment_without_tunables())
  assert (applied, huge) == ('True', 'False')
  for line in (large, small):
    _, mapped, after_free = map(int, line)
    assert mapped == 0 and after_free == 0


_RESTART_PROBE = '''
import os, sys
from train import host_memory
print(os.getpid(), os.environ.get('GLIBC_TUNABLES', '-'), flush=True)
host_memory.restart_with_huge_pages(sys.orig_argv[1:])
print('went on', os.getpid(), os.environ.get('GLIBC_TUNABLES', '-'))
'''


@huge_pages_only
def test_restart_with_huge_pages_starts_the_same_process_again_once():
  environ = _environment_without_tunables()
  environ['GLIBC_TUNABLES'] = 'glibc.malloc.tcache_count=7'
  lines = _run_python(_RESTART_PROBE, environ=environ).splitlines()
  tunables = 'glibc.malloc.tcache_count=7:' + host_memory.HUGE_PAGES_TUNABLE
  first, second = lines[0].split(), lines[1].split()
  assert first[1] == 'glibc.malloc.tcache_count=7'
  assert second == [first[0], tunables]  # Same process, tunable added.
  assert lines[2:] == [f'went on {first[0]} {tunables}']


@glibc_only
def test_environment_with_huge_pages():
  assert host_memory.environment_with_huge_pages(
      {'HOME': '/h'}, mode='madvise') == {
          'HOME': '/h', 'GLIBC_TUNABLES': host_memory.HUGE_PAGES_TUNABLE}
  assert host_memory.environment_with_huge_pages(
      {'GLIBC_TUNABLES': 'a=1'}, mode='always') == {
          'GLIBC_TUNABLES': 'a=1:' + host_memory.HUGE_PAGES_TUNABLE}
  already = {'GLIBC_TUNABLES': 'a=1:' + host_memory.HUGE_PAGES_TUNABLE}
  assert host_memory.environment_with_huge_pages(already, 'madvise') is None
  assert host_memory.environment_with_huge_pages({}, mode='never') is None
  assert host_memory.huge_pages_for_malloc(already, mode='madvise')
  assert not host_memory.huge_pages_for_malloc(already, mode='never')
  assert not host_memory.huge_pages_for_malloc({}, mode='always')
  assert host_memory.huge_pages_available('always')
  assert not host_memory.huge_pages_available('never')


def test_transparent_huge_pages_mode(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert host_memory.transparent_huge_pages_mode(str(path)) == 'madvise'
  assert host_memory.transparent_huge_pages_mode(
      str(tmp_path / 'missing')) is None
