"""train/host_memory.py: freed host memory stays in the process."""

import platform
import subprocess
import sys

import pytest

from train import host_memory

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
  output = subprocess.run([sys.executable, '-c', _PROBE, mode, str(buffers)],
                          check=True, capture_output=True,
                          text=True).stdout.split()
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
